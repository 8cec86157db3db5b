"""tinybert and mobilebert: formulas in float64 against straightforward implementations, the stage recipes
stepped through (TinyBERT's three stages, MobileBERT's progressive unlocking), forward + backward on real
taps."""

from __future__ import annotations

import pytest
import torch
from method_checks import (
    assert_rel,
    check_backward,
    make_batch,
    model_specs,
    run_formula,
    truncated_teacher_specs,
)

from gkd.methods import DistillLoss, resolve
from gkd.models import build_model
from gkd.runtime.capture import capture_taps


def visible(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, T, T): query i is real, key j is real, and j <= i when causal."""
    t = mask.shape[1]
    out = mask[:, :, None] & mask[:, None, :]
    if causal:
        out = out & torch.ones(t, t, dtype=torch.bool).tril()
    return out


def raw_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q K^T / sqrt(d), k heads repeated for grouped-query attention."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5


def scores_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    vis = visible(mask, causal)[:, None].expand_as(s)
    return ((s - t) ** 2)[vis].mean()


def attention_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Mean over (batch, head, real query rows) of KL(softmax(t) || softmax(s)) over visible keys."""
    rows = []
    vis = visible(mask, causal)
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            for i in range(s.shape[2]):
                if not mask[b, i]:
                    continue
                keys = vis[b, i]
                p = torch.softmax(t[b, h, i][keys], -1)
                log_q = torch.log_softmax(s[b, h, i][keys], -1)
                rows.append((p * (p.log() - log_q)).sum())
    return torch.stack(rows).mean()


def hidden_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, fit: torch.nn.Linear | None = None):
    y = s if fit is None else s @ fit.weight.T + fit.bias
    return ((y - t) ** 2).mean(-1)[mask].mean()


# ---------------------------------------------------------------------------------------------------------
# TinyBERT


@pytest.mark.parametrize(("family", "causal"), [("llama", True), ("bert", False)])
def test_tinybert_intermediate_formula(family, causal):
    case = run_formula([{"name": "tinybert", "weight": 0.5}], family=family)
    tap = case.student, case.teachers[0]
    # uniform 2 <- 4: attention at depths (1, 2), (2, 4); hidden: embedding, depth 1 <- 2, and final states
    assert case.resolved.student_taps == {"q[0]", "k[0]", "q[1]", "k[1]", "hidden[0]", "hidden[1]", "final"}
    assert case.resolved.teacher_taps == (
        frozenset({"q[1]", "k[1]", "q[3]", "k[3]", "hidden[0]", "hidden[2]", "final"}),
    )
    att = sum(
        scores_mse(
            raw_scores(tap[0][f"q[{i}]"], tap[0][f"k[{i}]"]),
            raw_scores(tap[1][f"q[{j}]"], tap[1][f"k[{j}]"]),
            case.mask,
            causal,
        )
        for i, j in ((0, 1), (1, 3))
    )
    fit = case.loss.extras["tinybert"]["fit_dense"]
    hid = sum(
        hidden_mse(tap[0][a], tap[1][b], case.mask, fit)
        for a, b in (("hidden[0]", "hidden[0]"), ("hidden[1]", "hidden[2]"), ("final", "final"))
    )
    assert_rel(case.term("tinybert.attention"), 0.5 * att)
    assert_rel(case.term("tinybert.hidden"), 0.5 * hid)
    assert "tinybert.prediction" not in case.out.terms


def test_tinybert_attention_from_scores_taps():
    case = run_formula([{"name": "tinybert", "options": {"attention_from": "scores"}}])
    assert {"scores[0]", "scores[1]"} <= case.resolved.student_taps
    assert not {"q[0]", "k[0]"} & case.resolved.student_taps  # the q/k path is off
    s, t = case.student, case.teachers[0]
    expected = scores_mse(s["scores[0]"], t["scores[1]"], case.mask, True) + scores_mse(
        s["scores[1]"], t["scores[3]"], case.mask, True
    )
    assert_rel(case.term("tinybert.attention_scores"), expected)
    assert "tinybert.attention" not in case.out.terms


def test_tinybert_qk_kernel_matches_scores_taps_on_real_models():
    """The fused q/k path and the captured scores give the same loss on real attention (mask fill
    excluded)."""
    t_specs, s_spec = model_specs("llama")
    gen = torch.Generator().manual_seed(0)
    ids, mask, labels = make_batch(s_spec, 2, 6, gen)
    torch.manual_seed(0)
    student, teacher = build_model(s_spec, device="cpu"), build_model(t_specs[0], device="cpu")
    values = []
    for source in ("qk", "scores"):
        r = resolve([{"name": "tinybert", "options": {"attention_from": source}}], t_specs, s_spec)
        with torch.no_grad(), capture_taps(teacher, r.teacher_taps[0]) as t_taps:
            teacher(input_ids=ids, attention_mask=mask.long())
        with torch.no_grad(), capture_taps(student, r.student_taps) as s_taps:
            student(input_ids=ids, attention_mask=mask.long())
        out = DistillLoss(r, t_specs, s_spec)(s_taps, [t_taps], labels=labels, mask=mask)
        values.append(float(out.terms.get("tinybert.attention", out.terms.get("tinybert.attention_scores"))))
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_tinybert_three_stages_stepped_through():
    t_specs, s_spec = model_specs("llama")
    got = []
    for step in range(9):
        r = resolve(["tinybert"], t_specs, s_spec, step=step, total_steps=9)
        (m,) = r.methods
        got.append((m.stage, m.terms, "q[0]" in r.student_taps, r.teacher_taps[0] == {"logits"}))
    intermediate = ("attention", "hidden")
    assert got[:3] == [("general_intermediate", intermediate, True, False)] * 3
    assert got[3:6] == [("task_intermediate", intermediate, True, False)] * 3
    assert got[6:] == [("task_prediction", ("prediction",), False, True)] * 3


def test_tinybert_prediction_stage_soft_ce():
    case = run_formula([{"name": "tinybert", "options": {"stage": "task_prediction", "temperature": 2.0}}])
    s, t = case.student["logits"], case.teachers[0]["logits"]
    p = torch.softmax(t / 2, -1)
    expected = -(p * torch.log_softmax(s / 2, -1)).sum(-1)[case.mask].mean()
    assert_rel(case.term("tinybert.prediction"), expected)
    assert set(case.out.terms) == {"tinybert.prediction"}


def test_tinybert_backward(family):
    out = check_backward(["tinybert"], family=family)
    assert set(out.terms) == {"tinybert.attention", "tinybert.hidden"}


def test_tinybert_prediction_stage_has_no_fit_dense_and_backward():
    t_specs, s_spec = model_specs("llama")
    r = resolve([{"name": "tinybert", "options": {"stage": "task_prediction"}}], t_specs, s_spec)
    assert r.extras == () and r.student_taps == {"logits"}
    r = resolve(["tinybert"], t_specs, s_spec)
    assert [(e.name, e.shapes) for e in r.extras] == [("tinybert.fit_dense", ((32, 64),))]
    out = check_backward([{"name": "tinybert", "options": {"stage": "task_prediction"}}], family="bert")
    assert set(out.terms) == {"tinybert.prediction"}


def test_tinybert_backward_scores_taps():
    out = check_backward([{"name": "tinybert", "options": {"attention_from": "scores"}}], family="gpt2")
    assert set(out.terms) == {"tinybert.attention_scores", "tinybert.hidden"}


# ---------------------------------------------------------------------------------------------------------
# MobileBERT


def test_mobilebert_progressive_unlocking_and_stages():
    t_specs, s_spec = truncated_teacher_specs("bert")
    rows = []
    for step in range(20):
        r = resolve(["mobilebert"], t_specs, s_spec, step=step, total_steps=20)
        (m,) = r.methods
        rows.append(
            (m.stage, m.pairs.get("hidden", ((),))[0] if m.terms[0] == "attention" else None, m.terms)
        )
    # progressive_kd covers steps 0..9: 10 // (2 + 1) = 3 steps per part; the last part runs to the stage end.
    first = ((0, 0), (1, 2))
    both = ((0, 0), (1, 2), (2, 4))
    assert rows[:3] == [("progressive_kd", first, ("attention", "feature"))] * 3
    assert rows[3:10] == [("progressive_kd", both, ("attention", "feature"))] * 7
    assert rows[10:15] == [("pretrain_distill", None, ("mlm", "soft"))] * 5
    assert rows[15:] == [("finetune", None, ("task",))] * 5
    assert not resolve(["mobilebert"], t_specs, s_spec, step=15, total_steps=20).needs_teacher_forward


@pytest.mark.parametrize(
    ("step", "weights"), [(1, {(0, 0): 1.0, (1, 2): 1.0}), (5, {(0, 0): 0.1, (1, 2): 0.1, (2, 4): 1.0})]
)
def test_mobilebert_progressive_formula(step, weights):
    case = run_formula(
        ["mobilebert"], family="bert", specs=truncated_teacher_specs("bert"), step=step, total_steps=20
    )
    s, t = case.student, case.teachers[0]
    feature = sum(
        w * hidden_mse(s[f"hidden[{a}]"], t[f"hidden[{b}]"], case.mask) for (a, b), w in weights.items()
    )
    att = sum(
        w
        * attention_kl(
            raw_scores(s[f"q[{a - 1}]"], s[f"k[{a - 1}]"]),
            raw_scores(t[f"q[{b - 1}]"], t[f"k[{b - 1}]"]),
            case.mask,
            causal=False,
        )
        for (a, b), w in weights.items()
        if a > 0
    )
    assert_rel(case.term("mobilebert.feature"), feature)
    assert_rel(case.term("mobilebert.attention"), att)


def test_mobilebert_pretrain_distillation_formula():
    case = run_formula(
        ["mobilebert"], family="bert", specs=truncated_teacher_specs("bert"), step=12, total_steps=20
    )
    s, t = case.student["logits"], case.teachers[0]["logits"]
    keep = case.labels != -100
    mlm = -torch.log_softmax(s, -1)[keep].gather(-1, case.labels[keep].unsqueeze(-1)).mean()
    p = torch.softmax(t, -1)
    kl = (p * (p.log() - torch.log_softmax(s, -1))).sum(-1)[case.mask].mean()
    assert_rel(case.term("mobilebert.mlm"), 0.5 * mlm)
    assert_rel(case.term("mobilebert.soft"), 0.5 * kl)


def test_mobilebert_backward(family):
    out = check_backward(["mobilebert"], specs=truncated_teacher_specs(family), step=5, total_steps=20)
    assert set(out.terms) == {"mobilebert.attention", "mobilebert.feature"}
