"""Recompute solvers: table-driven cases, the empty input, a zero budget, zero-byte items, and greedy vs dp vs
brute force on random small instances."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.errors import InputError
from gkd.planner.recompute import dp, get_solver, greedy, solve

CASES = [
    # sizes, costs, budget, expected recompute set
    ([], [], 0, frozenset()),
    ([10, 10, 10], [1, 1, 1], 30, frozenset()),
    ([10, 10, 10], [1, 1, 1], 20, frozenset({0})),
    ([10, 10, 10], [1, 1, 1], 0, frozenset({0, 1, 2})),
    ([10, 10, 10], [1, 1, 1], -5, frozenset({0, 1, 2})),
    ([0, 10], [5, 1], 0, frozenset({1})),
    ([10, 20], [1, 1], 15, frozenset({1})),  # freeing 20 bytes for the same cost
    ([10, 20], [1, 10], 20, frozenset({0})),
]


@pytest.mark.parametrize("solver", [greedy, dp, solve])
@pytest.mark.parametrize("sizes,costs,budget,expected", CASES)
def test_table(solver, sizes, costs, budget, expected):
    assert solver(sizes, costs, budget) == expected


def _brute(sizes, costs, budget):
    best = None
    for r in range(len(sizes) + 1):
        for combo in itertools.combinations(range(len(sizes)), r):
            kept = sum(s for i, s in enumerate(sizes) if i not in combo)
            if kept <= budget:
                cost = sum(costs[i] for i in combo)
                if best is None or cost < best:
                    best = cost
    return best


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 100)), min_size=0, max_size=7),
    budget=st.integers(0, 4000),
)
def test_solvers_fit_and_dp_is_optimal(items, budget):
    sizes = [s for s, _ in items]
    costs = [float(c) for _, c in items]
    best = _brute(sizes, costs, budget)
    for solver in (greedy, dp, solve):
        sel = solver(sizes, costs, budget)
        kept = sum(s for i, s in enumerate(sizes) if i not in sel)
        if best is None:
            assert sel == frozenset(range(len(sizes)))
        else:
            assert kept <= budget
    if best is not None:
        sel = dp(sizes, costs, budget)
        # dp rounds sizes up to a grid of budget/2000, so it may recompute slightly more than the optimum
        assert sum(costs[i] for i in sel) <= best + 1e-9 or budget > 2000


def test_mismatched_lengths():
    with pytest.raises(ValueError):
        greedy([1, 2], [1.0], 0)


def test_get_solver():
    assert get_solver("greedy") is greedy
    with pytest.raises(InputError):
        get_solver("simplex")
