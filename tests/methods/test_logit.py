"""kd (Hinton et al., 2015): the formula on random tensors, and forward + backward through real taps."""

from __future__ import annotations

import torch
from method_checks import assert_rel, check_backward, run_formula


def _kl_t2(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temp: float) -> torch.Tensor:
    p = torch.softmax(t / temp, -1)
    log_q = torch.log_softmax(s / temp, -1)
    per_tok = (p * (torch.log(p) - log_q)).sum(-1)
    return per_tok[mask].mean() * temp**2


def test_kd_kl_t2_plus_causal_hard():
    case = run_formula([{"name": "kd", "options": {"temperature": 3.0, "soft_rate": 0.7, "hard_rate": 0.3}}])
    s, t = case.student["logits"], case.teachers[0]["logits"]
    assert_rel(case.term("kd.soft"), 0.7 * _kl_t2(s, t, case.mask, 3.0))
    # causal LM: position i predicts token i + 1; padding labels (-100) are ignored
    logp = torch.log_softmax(s[:, :-1], -1)
    tgt = case.labels[:, 1:]
    keep = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    assert_rel(case.term("kd.hard"), 0.3 * nll)
    assert_rel(case.out.total, 0.7 * _kl_t2(s, t, case.mask, 3.0) + 0.3 * nll)


def test_kd_soft_ce_no_t2_mlm_hard():
    case = run_formula(
        [{"name": "kd", "weight": 2.0, "options": {"soft": "soft_ce", "temperature": 2.0}}], family="bert"
    )
    s, t = case.student["logits"], case.teachers[0]["logits"]
    p = torch.softmax(t / 2.0, -1)
    ce = -(p * torch.log_softmax(s / 2.0, -1)).sum(-1)[case.mask].mean()
    assert_rel(case.term("kd.soft"), 2.0 * ce)
    keep = case.labels != -100
    nll = (
        -torch.log_softmax(s, -1).gather(-1, case.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    )
    assert_rel(case.term("kd.hard"), 2.0 * nll)


def test_kd_hard_rate_zero_drops_term():
    case = run_formula([{"name": "kd", "options": {"hard_rate": 0}}])
    assert set(case.out.terms) == {"kd.soft"}


def test_kd_backward(family):
    out = check_backward(["kd"], family=family)
    assert set(out.terms) == {"kd.soft", "kd.hard"}
