"""minilmv2 (Wang et al., ACL Findings 2021): Q-Q / K-K / V-V relation KL, formula in float64, backward."""

from __future__ import annotations

import torch
from method_checks import assert_rel, check_backward, run_formula


def relation_kl(
    s: torch.Tensor, t: torch.Tensor, heads: int, mask: torch.Tensor, causal: bool
) -> torch.Tensor:
    """KL(teacher relation || student relation) per the paper, averaged over batch, relation heads and
    real query rows."""

    def rel(x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, n, h * d)  # concatenate heads back
        x = x.view(b, n, heads, h * d // heads).transpose(1, 2)  # split into relation heads
        scores = x @ x.transpose(-1, -2) / (x.shape[-1] ** 0.5)
        allowed = mask[:, None, None, :].expand_as(scores)
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
        return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), -1), allowed

    log_s, allowed = rel(s)
    log_t, _ = rel(t)
    p = log_t.exp()
    per_row = torch.where(allowed, p * (log_t - log_s), torch.zeros_like(p)).sum(-1)  # (B, R, T)
    rows = mask[:, None, :].expand_as(per_row)
    return per_row[rows].mean()


def test_formula_decoder_causal():
    case = run_formula([{"name": "minilmv2", "weight": 0.5, "options": {"relation_heads": 8}}])
    expected = sum(
        relation_kl(case.student[f"{k}[1]"], case.teachers[0][f"{k}[3]"], 8, case.mask, causal=True)
        for k in ("q", "k", "v")
    )
    assert_rel(case.term("minilmv2.relations"), 0.5 * expected)


def test_formula_encoder_bidirectional():
    case = run_formula([{"name": "minilmv2", "options": {"relation_heads": 4}}], family="bert")
    expected = sum(
        relation_kl(case.student[f"{k}[1]"], case.teachers[0][f"{k}[3]"], 4, case.mask, causal=False)
        for k in ("q", "k", "v")
    )
    assert_rel(case.term("minilmv2.relations"), expected)


def test_backward(family):
    check_backward([{"name": "minilmv2", "options": {"relation_heads": 8}}], family=family)
