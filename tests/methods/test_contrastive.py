"""lrc_bert (Fu et al., AAAI 2021) and diito (Wu et al., NAACL 2022): their losses against the papers'
formulas written out here (float64), their stages stepped through, their hook ops checked on tiny real models
(gradient perturbation exactly, interchange positions and states, DIITO under activation checkpointing), and
forward + backward through the real tap capture."""

from __future__ import annotations

import random

import pytest
import torch
from method_checks import (
    assert_rel,
    check_backward,
    make_batch,
    model_specs,
    random_taps,
    run_formula,
    truncated_teacher_specs,
)

from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.methods.contrastive import DiitoInterchange, GradientPerturbation, interchange_positions
from gkd.methods.hooks import build_hook_ops
from gkd.models import build_model
from gkd.runtime.capture import capture_taps
from gkd.runtime.step import distill_step

# ------------------------------------------------------------------------------------------------ LRC-BERT


def cos_nce_reference(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's COS-NCE (its equation (1)) for one layer, sample by sample: g = 1 - mean token cosine
    (positions real in both samples), the other samples' teacher states as the K negatives,
    L_i = g(s_i, t_i) + (2K - sum_{j != i} (g(s_i, t_j) - g(s_i, t_i))) / (2K), averaged over i."""
    b = s.shape[0]

    def g(i: int, j: int) -> torch.Tensor:
        keep = mask[i] & mask[j]
        cos = torch.nn.functional.cosine_similarity(s[i][keep], t[j][keep], dim=-1)
        return 1 - cos.mean()

    k = b - 1
    losses = []
    for i in range(b):
        positive = g(i, i)
        margins = sum(g(i, j) - positive for j in range(b) if j != i)
        losses.append(positive + (2 * k - margins) / (2 * k))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_lrc_cos_nce_formula(family):
    case = run_formula(
        [{"name": "lrc_bert", "weight": 0.5, "options": {"stage": "contrastive"}}], family=family, batch=3
    )
    pairs = case.resolved.methods[0].pairs["hidden"][0]
    assert pairs == ((1, 2),)  # uniform without the last pair: the top layer is compared through `final`
    extras = case.loss.extras["lrc_bert"]
    expected = cos_nce_reference(
        case.student["final"] @ extras["proj_final"].weight.T, case.teachers[0]["final"], case.mask
    )
    for n, (sd, td) in enumerate(pairs):
        y = case.student[f"hidden[{sd}]"] @ extras["proj"][n].weight.T
        expected = expected + cos_nce_reference(y, case.teachers[0][f"hidden[{td}]"], case.mask)
    assert_rel(case.term("lrc_bert.cos_nce"), 0.5 * expected)
    assert set(case.out.terms) == {"lrc_bert.cos_nce"}


def test_lrc_cos_nce_equals_the_layer_concatenated_form():
    """The reference system's form: all layer pairs concatenated along the positions, one g per sample pair
    (cosine averaged over layers and positions), L_CN once, times the number of layers. Without padding it
    equals the per-layer sum (L_CN is linear in g)."""
    case = run_formula([{"name": "lrc_bert", "options": {"stage": "contrastive"}}], batch=4, seq=5, pad=False)
    extras = case.loss.extras["lrc_bert"]
    pairs = case.resolved.methods[0].pairs["hidden"][0]
    s_layers = [case.student[f"hidden[{sd}]"] @ extras["proj"][n].weight.T for n, (sd, _) in enumerate(pairs)]
    t_layers = [case.teachers[0][f"hidden[{td}]"] for _, td in pairs]
    s_layers.append(case.student["final"] @ extras["proj_final"].weight.T)
    t_layers.append(case.teachers[0]["final"])
    s_cat, t_cat = torch.cat(s_layers, dim=1), torch.cat(t_layers, dim=1)  # (B, layers * T, D)
    b = s_cat.shape[0]
    g = torch.empty(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            g[i, j] = 1 - torch.nn.functional.cosine_similarity(s_cat[i], t_cat[j], dim=-1).mean()
    # The reference system's line: the row sum includes the positive, and B positives are subtracted.
    per_sample = 1 - (g.sum(1) - g.diagonal() * b) / (b - 1) / 2 + g.diagonal()
    assert len(s_layers) == 2
    assert_rel(case.term("lrc_bert.cos_nce"), per_sample.mean() * len(s_layers))


def test_lrc_full_stage_adds_soft_kl_and_3x_hard():
    case = run_formula([{"name": "lrc_bert", "options": {"stage": "full"}}], batch=3)
    s, t = case.student["logits"], case.teachers[0]["logits"]
    temp = 1.1
    p = torch.softmax(t / temp, -1)
    kl = (p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1)[case.mask].mean() * temp**2
    assert_rel(case.term("lrc_bert.soft"), kl)
    logp = torch.log_softmax(s[:, :-1], -1)
    tgt = case.labels[:, 1:]
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[tgt != -100].mean()
    assert_rel(case.term("lrc_bert.hard"), 3 * nll)


def test_lrc_stages_by_progress_and_pretrain_option():
    t_specs, s_spec = model_specs("llama")
    got = [
        resolve(["lrc_bert"], t_specs, s_spec, step=s, total_steps=100).methods[0] for s in (0, 49, 50, 99)
    ]
    assert [m.stage for m in got] == ["contrastive", "contrastive", "full", "full"]
    assert [m.terms for m in got[1:3]] == [("cos_nce",), ("cos_nce", "soft", "hard")]
    pre = resolve([{"name": "lrc_bert", "options": {"stage": "pretrain"}}], t_specs, s_spec)
    assert pre.methods[0].terms == ("hard",) and not pre.needs_teacher_forward
    (op,) = build_hook_ops(pre)
    assert isinstance(op, GradientPerturbation) and not op.enabled  # no perturbation without the teacher
    (op,) = build_hook_ops(resolve(["lrc_bert"], t_specs, s_spec))
    assert op.enabled
    assert resolve(["lrc_bert"], t_specs, s_spec).extra_student_forwards == 1


def test_lrc_needs_two_samples():
    with pytest.raises(InputError, match="at least 2"):
        run_formula([{"name": "lrc_bert", "options": {"stage": "contrastive"}}], batch=1)


def test_gradient_perturbation_exact():
    """The step's loss equals the loss of a forward whose layer-0 input is e + g / ||g|| (per token), g being
    the gradient of the clean forward's loss with respect to e; computed here by hand in float64."""
    t_specs, s_spec = model_specs("llama")
    resolved = resolve(
        [{"name": "lrc_bert", "options": {"stage": "full"}}], t_specs, s_spec, fused_linear=False
    )
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu", dtype=torch.float64).eval()  # eval: no dropout to match
    teacher = build_model(t_specs[0], device="cpu", dtype=torch.float64).eval()
    ids, mask, labels = make_batch(s_spec, 3, 6, torch.Generator().manual_seed(0))
    loss = DistillLoss(resolved, t_specs, s_spec).double()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = distill_step(student, [teacher], loss, batch, resolved)

    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    with torch.no_grad(), capture_taps(teacher, resolved.teacher_taps[0]) as t_taps:
        teacher(**inputs)
    with capture_taps(student, resolved.student_taps | {"emb"}) as s_taps:
        student(**inputs)
    clean = loss(s_taps, [t_taps], labels=labels, mask=mask).total
    (grad,) = torch.autograd.grad(clean, s_taps["emb"])
    delta = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    assert (delta.norm(dim=-1)[mask] - 1).abs().max() < 1e-9  # a unit vector per real token

    def shift(_m, args, kwargs):
        return (args[0] + delta, *args[1:]), kwargs

    handle = student.model.layers[0].register_forward_pre_hook(shift, with_kwargs=True)
    try:
        with capture_taps(student, resolved.student_taps) as p_taps:
            student(**inputs)
    finally:
        handle.remove()
    expected = loss(p_taps, [t_taps], labels=labels, mask=mask).total
    assert_rel(out.total, expected, rtol=1e-9)
    assert abs(float(out.total.detach()) - float(clean.detach())) > 1e-6  # the perturbation changed the loss


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_lrc_backward(family):
    out = check_backward([{"name": "lrc_bert", "options": {"stage": "full"}}], family=family, batch=3)
    assert set(out.terms) == {"lrc_bert.cos_nce", "lrc_bert.soft", "lrc_bert.hard"}


# --------------------------------------------------------------------------------------------------- DIITO


def test_diito_formula_both_passes():
    t_specs, s_spec = truncated_teacher_specs("llama")
    resolved = resolve(["diito"], t_specs, s_spec, fused_linear=False)
    gen = torch.Generator().manual_seed(0)
    b, n = 3, 7
    student = random_taps(resolved.student_taps, s_spec, b, n, gen)
    teacher = random_taps(resolved.teacher_taps[0], t_specs[0], b, n, gen)
    aux = {
        "diito_interchange": {
            "student": random_taps(frozenset({"logits"}), s_spec, b, n, gen),
            "teachers": [random_taps(frozenset({"logits"}), t_specs[0], b, n, gen)],
        }
    }
    _, mask, labels = make_batch(s_spec, b, n, gen)
    out = DistillLoss(resolved, t_specs, s_spec).double()(
        student, [teacher], labels=labels, mask=mask, aux=aux
    )

    def kl_t2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(t / 2, -1)
        return (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1)[mask].mean() * 4

    logp = torch.log_softmax(student["logits"][:, :-1], -1)
    tgt = labels[:, 1:]
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[tgt != -100].mean()
    cos = torch.nn.functional.cosine_similarity(student["final"], teacher["final"], dim=-1)
    cf = aux["diito_interchange"]
    assert_rel(out.terms["diito.soft"], 0.25 * kl_t2(student["logits"], teacher["logits"]))
    assert_rel(out.terms["diito.hard"], 0.25 * nll)
    assert_rel(out.terms["diito.cosine"], 0.25 * (1 - cos)[mask].mean())
    assert_rel(out.terms["diito.causal"], 0.25 * kl_t2(cf["student"]["logits"], cf["teachers"][0]["logits"]))


def test_interchange_positions_are_consecutive_spans_from_the_next_example():
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False  # 7 real tokens
    mask[2, :4] = False  # left padding: 6 real tokens
    rows, pos, src_rows, src_pos = interchange_positions(mask, 0.3, random.Random(0))
    for b in range(3):
        sel = rows == b
        src = (b + 1) % 3
        count = int(0.3 * min(int(mask[b].sum()), int(mask[src].sum())))
        assert int(sel.sum()) == count
        assert (src_rows[sel] == src).all()
        for p, m in ((pos[sel], mask[b]), (src_pos[sel], mask[src])):
            assert m[p].all() and (p.diff() == 1).all()  # real tokens, consecutive
    again = interchange_positions(mask, 0.3, random.Random(0))
    assert all(torch.equal(x, y) for x, y in zip((rows, pos, src_rows, src_pos), again, strict=True))


def test_interchange_swaps_recorded_states_in_student_and_teacher_blocks():
    t_specs, s_spec = truncated_teacher_specs("llama")
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu").eval()
    teacher = build_model(t_specs[0], device="cpu").eval()
    ids, mask, _ = make_batch(s_spec, 3, 10, torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    op = DiitoInterchange(seed=4)
    with op.install(student, [teacher], step=3, total_steps=10):
        d, block = op.student_depth, op.teacher_depths[0]
        assert block == list(range(2 * d - 1, 2 * d + 1))  # student depth d <- teacher depths 2d-1, 2d
        names_s, names_t = {f"hidden[{d}]"}, {f"hidden[{t}]" for t in block}
        with torch.no_grad(), capture_taps(student, names_s) as s0, capture_taps(teacher, names_t) as t0:
            student(**inputs)
            teacher(**inputs)
        where = op.where = interchange_positions(mask, 0.3, random.Random(0))
        op.phase = "intervene"
        with torch.no_grad(), capture_taps(student, names_s) as s1, capture_taps(teacher, names_t) as t1:
            student(**inputs)
            teacher(**inputs)
    rows, pos, src_rows, src_pos = where
    assert rows.numel() > 0
    # The first intervened layer of each model: the source's clean states at the span, its own elsewhere. A
    # later layer of the teacher block sees the edited input, so only its span (the source's states) is fixed.
    firsts = [(s0, s1, f"hidden[{d}]", True)] + [(t0, t1, f"hidden[{t}]", t == block[0]) for t in block]
    for clean, swapped, name, first in firsts:
        expected = clean[name].clone()
        expected[rows, pos] = clean[name][src_rows, src_pos]
        if first:
            torch.testing.assert_close(swapped[name], expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(swapped[name][rows, pos], expected[rows, pos], rtol=0, atol=0)
            assert not torch.equal(swapped[name], expected)  # the edit upstream changed the other positions


@pytest.mark.parametrize("reentrant", [False, True])
def test_diito_under_activation_checkpointing_matches_without(reentrant):
    t_specs, s_spec = truncated_teacher_specs("llama")  # llama: no dropout, so both runs are deterministic
    resolved = resolve(["diito"], t_specs, s_spec, step=5, total_steps=10, fused_linear=False)
    torch.manual_seed(0)
    plain = build_model(s_spec, device="cpu", dtype=torch.float64).train()
    ckpt = build_model(s_spec, device="cpu", dtype=torch.float64).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    teacher = build_model(t_specs[0], device="cpu", dtype=torch.float64).eval()
    ids, mask, labels = make_batch(s_spec, 3, 8, torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    calls = []
    ckpt.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    outs = []
    for model in (plain, ckpt):
        loss = DistillLoss(resolved, t_specs, s_spec).double()
        out = distill_step(model, [teacher], loss, batch, resolved, step=5, total_steps=10)
        before = len(calls)
        out.total.backward()
        outs.append(out)
    assert len(calls) > before  # the checkpointed layer was recomputed in the backward pass
    assert out.terms["diito.causal"] > 0
    assert_rel(outs[1].total, outs[0].total, rtol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_diito_backward(family):
    out = check_backward(["diito"], specs=truncated_teacher_specs(family), batch=3, seq=8)
    assert set(out.terms) == {"diito.soft", "diito.hard", "diito.cosine", "diito.causal"}


def test_diito_finetune_stage_is_plain():
    t_specs, s_spec = truncated_teacher_specs("llama")
    r = resolve([{"name": "diito", "options": {"stage": "finetune"}}], t_specs, s_spec)
    assert r.methods[0].terms == ("hard",) and not r.needs_teacher_forward
    (op,) = build_hook_ops(r)
    assert not op.enabled
