"""universal_kd (Wu et al., EMNLP 2021) and rail_kd (Haidar et al., NAACL 2022): formulas in float64,
RAIL-KD's re-sampling stepped through, backward on real models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from method_checks import assert_rel, check_backward, model_specs, run_formula

from gkd.errors import InputError
from gkd.methods import resolve
from gkd.methods.combine import DistillLoss


def kl_rows(target: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    p, q = torch.softmax(target, -1), torch.softmax(s, -1)
    return (p * (p.log() - q.log())).sum(-1)


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = [x[b][mask[b]].mean(0) for b in range(x.shape[0])]
    return torch.stack(rows)


def test_universal_kd_formula_decoder_last_token():
    case = run_formula([{"name": "universal_kd", "options": {"soft_rate": 0}}])
    # Student depths 1..Ls-1 = [1]; teacher depths 1..Lt-1 = [1, 2, 3].
    assert case.resolved.student_taps == {"hidden[1]"}
    assert case.resolved.teacher_taps == (frozenset({"hidden[1]", "hidden[2]", "hidden[3]"}),)
    extras = case.loss.extras["universal_kd"]
    last = case.mask.long().sum(1) - 1  # last real token of each row
    rows = torch.arange(case.mask.shape[0])
    s = [extras["s_proj"][0].weight @ case.student["hidden[1]"][rows, last].T]
    t = [extras["t_proj"][k].weight @ case.teachers[0][f"hidden[{k + 1}]"][rows, last].T for k in range(3)]
    total = 0.0
    for sj in s:  # (D, B)
        scores = torch.stack([(sj * tk).sum(0) for tk in t], dim=-1)  # (B, Mt)
        a = torch.softmax(scores, -1)
        target = sum(a[:, k : k + 1] * t[k].T for k in range(3))
        total = total + kl_rows(target, sj.T).mean()
    assert_rel(case.term("universal_kd.inter"), 0.5 * total)


def test_universal_kd_encoder_mean_pool_and_soft():
    case = run_formula([{"name": "universal_kd", "options": {"cls": "mean"}}], family="bert")
    extras = case.loss.extras["universal_kd"]
    s = masked_mean_pool(case.student["hidden[1]"], case.mask) @ extras["s_proj"][0].weight.T
    t = torch.stack(
        [
            masked_mean_pool(case.teachers[0][f"hidden[{k + 1}]"], case.mask) @ extras["t_proj"][k].weight.T
            for k in range(3)
        ],
        1,
    )
    a = torch.softmax(torch.einsum("bd,bkd->bk", s, t), -1)
    target = torch.einsum("bk,bkd->bd", a, t)
    assert_rel(case.term("universal_kd.inter"), 0.5 * kl_rows(target, s).mean())
    ls, lt = case.student["logits"], case.teachers[0]["logits"]
    assert_rel(case.term("universal_kd.soft"), 0.5 * kl_rows(lt, ls)[case.mask].mean())
    assert "universal_kd.hard" not in case.out.terms  # the hard loss is the finetune stage's


def test_universal_kd_final_only_and_stages():
    teachers, student = model_specs("llama")
    r = resolve([{"name": "universal_kd", "options": {"layer_map": "last"}}], teachers, student)
    assert r.student_taps == {"hidden[2]", "logits"} and r.teacher_taps == (
        frozenset({"hidden[4]", "logits"}),
    )
    assert [e.shapes for e in r.extras] == [((32, 32),), ((64, 32),)]
    r = resolve([{"name": "universal_kd", "options": {"stage": "finetune"}}], teachers, student)
    assert [t.name for t in r.loss_terms] == ["hard"] and not r.needs_teacher_forward


def test_rail_kd_formula():
    case = run_formula([{"name": "rail_kd", "options": {"u": 16}}], family="bert", step=3)
    ((s_depth, t_depth),) = case.resolved.methods[0].pairs["hidden"][0]
    assert s_depth == 1 and 1 <= t_depth <= 3
    extras = case.loss.extras["rail_kd"]
    hs = masked_mean_pool(case.student["hidden[1]"], case.mask)
    ht = masked_mean_pool(case.teachers[0][f"hidden[{t_depth}]"], case.mask)
    s = hs @ extras["s_proj"][0].weight.T + extras["s_proj"][0].bias
    t = ht @ extras["t_proj"][0].weight.T + extras["t_proj"][0].bias
    s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    assert_rel(case.term("rail_kd.inter"), ((s - t) ** 2).sum(-1).mean() / 3)
    ls, lt = case.student["logits"], case.teachers[0]["logits"]
    soft_ce = -(torch.softmax(lt, -1) * torch.log_softmax(ls, -1)).sum(-1)[case.mask].mean()
    assert_rel(case.term("rail_kd.soft"), soft_ce / 3)


def _draws(seed: int, every: int, steps: int) -> list[tuple[tuple[int, int], ...]]:
    teachers, student = model_specs("llama")
    # A 12-layer teacher and a 4-layer student give 3 of 11 teacher layers per draw.
    teacher = replace(teachers[0], layers=12)
    student = replace(student, layers=4)
    rule = {"kind": "random", "every": every, "seed": seed, "drop_last": True}
    out = []
    for step in range(steps):
        r = resolve(
            [{"name": "rail_kd", "options": {"layer_map": rule}}],
            [teacher],
            student,
            step=step,
            total_steps=steps,
        )
        pairs = r.methods[0].pairs["hidden"][0]
        assert r.varies_with_step
        assert r.student_taps == {"hidden[1]", "hidden[2]", "hidden[3]", "logits"}
        assert r.teacher_taps[0] == frozenset({f"hidden[{t}]" for _, t in pairs} | {"logits"})
        assert len(r.extras[0].shapes) == 3
        out.append(pairs)
    return out


def test_rail_kd_resampling_steps():
    every = 4
    draws = _draws(seed=7, every=every, steps=40)
    for step, pairs in enumerate(draws):
        assert [s for s, _ in pairs] == [1, 2, 3]
        teacher_layers = [t for _, t in pairs]
        assert teacher_layers == sorted(set(teacher_layers)) and all(1 <= t <= 11 for t in teacher_layers)
        if step % every:
            assert pairs == draws[step - 1], f"re-drawn inside a period at step {step}"
    periods = [draws[i] for i in range(0, 40, every)]
    assert len(set(periods)) >= 5  # new layers as the draw period passes
    assert draws == _draws(seed=7, every=every, steps=40)  # reproducible from the seed
    assert draws != _draws(seed=8, every=every, steps=40)


def test_rail_kd_needs_two_student_layers():
    teachers, student = model_specs("llama")
    one_layer = replace(student, layers=1)
    r = resolve(["rail_kd"], teachers, one_layer)
    assert r.student_taps == {"logits"}  # no intermediate student layer to map
    loss = DistillLoss(r, teachers, one_layer)
    logits = {"logits": torch.zeros(1, 2, 256)}
    with pytest.raises(InputError, match="intermediate student layer"):
        loss(logits, [dict(logits)], labels=torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("name", ["universal_kd", "rail_kd"])
def test_backward(name, family):
    check_backward([name], family=family, step=5)


def test_drop_last_rule():
    from gkd.methods.mapping import pairs
    from gkd.methods.spec import LayerRule, parse_rule

    assert pairs(parse_rule("uniform+emb-last"), 2, 4) == ((0, 0), (1, 2))
    assert pairs(LayerRule(kind="all", drop_last=True), 2, 4) == ((2, 1), (2, 2), (2, 3))
    rule = LayerRule(kind="random", drop_last=True, seed=3)
    assert len(pairs(rule, 4, 12)) == 3 and all(t < 12 for _, t in pairs(rule, 4, 12))
    assert pairs(LayerRule(kind="random", seed=3), 4, 12)[:3] == pairs(rule, 4, 12)
