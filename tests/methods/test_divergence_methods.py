"""LLM divergences fkl, rkl, jsd, skew_fkl, skew_rkl, tvd: paper formulas in float64, and backward."""

from __future__ import annotations

import pytest
import torch
from method_checks import assert_rel, check_backward, model_specs, run_formula

from gkd.methods import resolve


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (torch.log(a) - torch.log(b))).sum(-1)


def reference(
    name: str, s: torch.Tensor, t: torch.Tensor, temp: float, beta: float, alpha: float
) -> torch.Tensor:
    p = torch.softmax(t / temp, -1)  # teacher
    q = torch.softmax(s / temp, -1)  # student
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "jsd":  # TRL GKDTrainer: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_fkl":  # DistiLLM: KL(p || alpha p + (1 - alpha) q)
        return _kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_rkl":  # DistiLLM: KL(q || (1 - alpha) p + alpha q)
        return _kl(q, (1 - alpha) * p + alpha * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"])
def test_formula(name):
    options = {"temperature": 1.5}
    if name == "jsd":
        options["beta"] = 0.3
    if name.startswith("skew"):
        options["alpha"] = 0.2
    case = run_formula([{"name": name, "weight": 0.5, "options": options}])
    s, t = case.student["logits"], case.teachers[0]["logits"]
    expected = reference(name, s, t, 1.5, 0.3, 0.2)[case.mask].mean()
    assert_rel(case.term(f"{name}.div"), 0.5 * expected)
    assert set(case.out.terms) == {f"{name}.div"}  # hard_rate defaults to 0


def test_two_teachers_weighted():
    case = run_formula([{"name": "fkl", "options": {"teacher_weights": [0.25, 0.75]}}], teachers=2)
    s = case.student["logits"]
    per = [reference("fkl", s, t["logits"], 1.0, 0, 0)[case.mask].mean() for t in case.teachers]
    assert_rel(case.term("fkl.div"), 0.25 * per[0] + 0.75 * per[1])


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd", "skew_fkl"])
def test_backward(name):
    check_backward([name], family="llama")


def test_backward_two_teachers_gpt2():
    check_backward(["rkl"], family="gpt2", teachers=2)


@pytest.mark.parametrize("name", ["fkl", "skew_rkl"])
def test_fused_linear_path_matches_materialised_logits(name):
    """On decoders the divergence runs on final hidden states + LM-head weights; same value as on logits."""
    teachers, student = model_specs("llama")
    resolved = resolve([name], teachers, student)
    assert resolved.fused_linear and resolved.student_taps == {"final"}
    fused = check_backward([name], family="llama", fused_linear=True)
    plain = check_backward([name], family="llama", fused_linear=False)
    torch.testing.assert_close(fused.total.detach(), plain.total.detach(), rtol=1e-5, atol=1e-7)
