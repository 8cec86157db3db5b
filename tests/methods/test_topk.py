"""topk_kl: forward KL against stored top-k teacher log-probs, explicit tail bucket, offline teacher."""

from __future__ import annotations

import pytest
import torch
from method_checks import TOPK_WIDTH, assert_rel, check_backward, model_specs, run_formula

from gkd.kernels import kd_loss
from gkd.methods import resolve
from gkd.methods.divergence import TopK, topk_kl_rows, topk_targets


def reference(s: torch.Tensor, target: TopK, temp: float) -> torch.Tensor:
    """Per token: KL of the (k + 1)-bucket distributions, probabilities summed directly (no log-sum-exp)."""
    q = torch.softmax(s / temp, -1)
    p_k = target.logprobs.exp()
    q_k = q.gather(-1, target.indices)
    p_tail = 1 - p_k.sum(-1)
    q_tail = 1 - q_k.sum(-1)
    return (p_k * (p_k.log() - q_k.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


def test_formula():
    case = run_formula([{"name": "topk_kl", "weight": 0.5, "options": {"temperature": 1.5}}])
    target = case.teachers[0]["topk"]
    assert target.indices.shape == (2, 5, TOPK_WIDTH)
    expected = reference(case.student["logits"], target, 1.5)[case.mask].mean()
    assert_rel(case.term("topk_kl.div"), 0.5 * expected)
    assert set(case.out.terms) == {"topk_kl.div"}  # hard_rate defaults to 0


def test_full_width_equals_forward_kl():
    """With k = V there is no tail: the loss is the full forward KL."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    rows = topk_kl_rows(s, topk_targets(t.double(), 16), 1.0)
    target = topk_targets(t, 16)
    target = TopK(target.indices, torch.log_softmax(t, -1).gather(-1, target.indices))
    full = kd_loss(s, t, divergence="fkl")
    assert_rel(topk_kl_rows(s, target, 1.0).mean(), full)
    assert torch.allclose(rows.mean(), full, rtol=1e-5)


def test_resolve_reports_offline_teacher():
    teachers, student = model_specs("llama")
    r = resolve(["topk_kl"], teachers, student)
    assert r.teacher_taps == (frozenset({"topk"}),)
    assert r.offline_ok and not r.needs_teacher_forward and not r.needs_teacher_logits
    assert r.fused_linear and r.student_taps == {"final"}
    # kd reads the teacher's logits too; one stored top-k serves both only at one temperature.
    same_t = [{"name": "topk_kl"}, {"name": "kd", "options": {"temperature": 1.0}}]
    r2 = resolve(same_t, teachers, student)
    assert r2.offline_ok and r2.needs_teacher_forward and r2.teacher_taps == (frozenset({"topk", "logits"}),)
    assert not resolve(["topk_kl", "kd"], teachers, student).offline_ok  # T = 1 and T = 2
    teachers, student = model_specs("bert")
    r3 = resolve(["topk_kl"], teachers, student)
    assert not r3.fused_linear and r3.student_taps == {"logits"} and not r3.needs_teacher_forward


@pytest.mark.parametrize(("family", "fused"), [("gpt2", True), ("bert", False)])
def test_backward(family, fused):
    check_backward(["topk_kl"], family=family, fused_linear=fused)


def test_fused_matches_logits_path():
    fused = check_backward(["topk_kl"], family="llama", fused_linear=True)
    plain = check_backward(["topk_kl"], family="llama", fused_linear=False)
    torch.testing.assert_close(fused.total.detach(), plain.total.detach(), rtol=1e-5, atol=1e-7)
