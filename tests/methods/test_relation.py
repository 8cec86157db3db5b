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


def _relation_heads(teacher: str, student: str, options: dict | None = None, method: str = "minilmv2") -> int:
    from gkd.methods import resolve
    from gkd.models import resolve_model

    entry = {"name": method, "options": options or {}}
    resolved = resolve([entry], [resolve_model(teacher)], resolve_model(student))
    return int(resolved.methods[0].options["relation_heads"])


def test_relation_heads_auto_divides_every_width():
    """auto: the paper's 48 where it divides every q/k/v width, else 64, else the largest common divisor up
    to 64; the reference LLM pairs get 64 (GLM-10B's and Llama-2-7B's 4096, OPT-13B's 5120 and Llama-2-70B's
    grouped k/v width 1024 are not multiples of 48)."""
    assert _relation_heads("bert-base", "bert-base") == 48  # 768: the paper's value for base-size teachers
    assert _relation_heads("bert-large", "bert-base") == 64  # 1024: the paper's value for large teachers
    assert _relation_heads("glm-130b", "glm-10b-icetk") == 64
    assert _relation_heads("llama-2-70b", "llama-2-7b") == 64
    assert _relation_heads("opt-175b", "opt-13b") == 64
    assert _relation_heads("bert-base", "configs/tinybert-4.json") == 24  # gcd(768, 312) = 24


def test_mgskd_relation_heads_auto_keeps_the_reference_64_and_fits_small_widths():
    """mgskd's auto: 64 (the reference MGSKDLoss default) where it divides both hidden sizes, else their
    largest common divisor up to 64, so the default also runs on small models (tiny presets: 64 and 32)."""
    assert _relation_heads("bert-base", "bert-base", method="mgskd") == 64  # 768
    assert _relation_heads("bert-base", "configs/tinybert-4.json", method="mgskd") == 24  # gcd(768, 312)
    assert _relation_heads("tiny-bert-teacher", "tiny-bert-student", method="mgskd") == 32  # gcd(64, 32)


def test_relation_heads_that_do_not_divide_a_width_are_rejected_when_resolving():
    import pytest

    from gkd.errors import InputError

    with pytest.raises(InputError, match=r"relation_heads 48 must divide the widths 12288, 4096 .* 64") as e:
        _relation_heads("glm-130b", "glm-10b-icetk", {"relation_heads": 48})
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"'mgskd': relation_heads 64 must divide the widths 768, 312"):
        _relation_heads("bert-base", "configs/tinybert-4.json", {"relation_heads": 64}, "mgskd")
    assert _relation_heads("bert-base", "configs/tinybert-4.json", {"relation_heads": 12}, "mgskd") == 12
