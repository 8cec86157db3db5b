"""hidden_mse / hidden_cos through learned per-pair projections: formula in float64, and backward."""

from __future__ import annotations

import pytest
import torch
from method_checks import assert_rel, check_backward, run_formula


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cos"])
def test_formula(name):
    case = run_formula([{"name": name, "weight": 1.5}])
    pairs = case.resolved.methods[0].pairs["hidden"][0]
    assert pairs == ((1, 2), (2, 4))  # uniform: student depth j <- teacher depth 2j
    losses = []
    for n, (sd, td) in enumerate(pairs):
        proj = case.loss.extras[name]["proj"][n]
        y = case.student[f"hidden[{sd}]"] @ proj.weight.T + proj.bias
        t = case.teachers[0][f"hidden[{td}]"]
        if name == "hidden_mse":
            per_pos = ((y - t) ** 2).mean(-1)
        else:
            per_pos = 1 - (y * t).sum(-1) / (y.norm(dim=-1) * t.norm(dim=-1))
        losses.append(per_pos[case.mask].mean())
    assert_rel(case.term(f"{name}.loss"), 1.5 * sum(losses) / len(losses))


def test_layer_map_option_changes_pairs_and_extras():
    case = run_formula([{"name": "hidden_mse", "options": {"layer_map": "last+emb"}}])
    assert case.resolved.methods[0].pairs["hidden"][0] == ((0, 0), (2, 4))
    assert case.resolved.student_taps == {"hidden[0]", "hidden[2]"}
    assert case.resolved.teacher_taps == (frozenset({"hidden[0]", "hidden[4]"}),)
    (extra,) = case.resolved.extras
    assert extra.shapes == ((32, 64), (32, 64)) and extra.num_parameters == 2 * (32 * 64 + 64)


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cos"])
def test_backward(name, family):
    check_backward([name], family=family)


def test_backward_two_teachers_of_different_widths():
    out = check_backward(["hidden_mse"], teachers=2)
    assert torch.isfinite(out.total)
