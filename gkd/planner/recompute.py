"""Which layers to recompute: a 0/1 knapsack with interchangeable solvers.

Every solver has the signature `(sizes, costs, budget) -> selection`:
- sizes[i]: bytes that recomputing item i frees (its saved activations minus what its checkpoint keeps);
- costs[i]: the time recomputing item i adds to a step;
- budget: the most bytes the items that are *not* recomputed may keep;
- selection: the frozenset of item indices to recompute, such that the kept items fit the budget and the
  recompute cost is as low as the solver can make it. When even recomputing everything does not fit, every
  item is selected (the caller sees that the plan still does not fit).

Solvers: `greedy` (cheapest recompute per freed byte first; ties go to the earliest item, which also lowers
the
backward-pass moments of the later layers; optimal when items are identical, as the layers of one model are),
`dp` (exact knapsack over the kept items on a byte grid, sizes rounded up so the budget always holds), and
`solve`, which picks greedy for identical items and dp otherwise (functorch's
torch/_functorch/_activation_checkpointing/knapsack.py has the same split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Solver = Callable[[Sequence[int], Sequence[float], int], frozenset[int]]


def _check(sizes: Sequence[int], costs: Sequence[float], budget: int) -> None:
    if len(sizes) != len(costs):
        raise ValueError(f"sizes ({len(sizes)}) and costs ({len(costs)}) differ in length")
    if any(s < 0 for s in sizes) or any(c < 0 for c in costs):
        raise ValueError("sizes and costs must be non-negative")


def greedy(sizes: Sequence[int], costs: Sequence[float], budget: int) -> frozenset[int]:
    """Recompute the items with the lowest cost per freed byte until the kept bytes fit the budget."""
    _check(sizes, costs, budget)
    kept = sum(sizes)
    chosen: list[int] = []
    order = sorted(range(len(sizes)), key=lambda i: (costs[i] / sizes[i] if sizes[i] else float("inf"), i))
    for i in order:
        if kept <= max(budget, 0):
            break
        if sizes[i] == 0:
            continue
        chosen.append(i)
        kept -= sizes[i]
    if kept > max(budget, 0):
        return frozenset(range(len(sizes)))
    return frozenset(chosen)


def dp(sizes: Sequence[int], costs: Sequence[float], budget: int, *, grid: int = 2000) -> frozenset[int]:
    """Exact 0/1 knapsack: keep the items whose recompute costs most, within the budget.

    Bytes are counted in units of budget/grid, each size rounded up, so a selection that fits the grid fits
    the budget. O(len(sizes) * grid).
    """
    _check(sizes, costs, budget)
    n = len(sizes)
    if sum(sizes) <= max(budget, 0):
        return frozenset()
    if budget <= 0:
        return frozenset(i for i in range(n) if sizes[i] > 0)
    unit = max(1, -(-budget // grid))
    cap = budget // unit
    weights = [-(-s // unit) for s in sizes]
    # best[c] = max kept cost with kept weight <= c; keep[i][c] whether item i is kept at capacity c.
    best = [0.0] * (cap + 1)
    keep = [bytearray(cap + 1) for _ in range(n)]
    # Items go in from the last; ties keep the items placed first, so the earliest items are recomputed.
    order = list(range(n - 1, -1, -1))
    for i in order:
        w, v = weights[i], costs[i]
        if w == 0:
            keep[i][:] = b"\x01" * (cap + 1)
            for c in range(cap + 1):
                best[c] += v
            continue
        for c in range(cap, w - 1, -1):
            cand = best[c - w] + v
            if cand > best[c]:
                best[c] = cand
                keep[i][c] = 1
    c = cap
    recompute = []
    for i in reversed(order):
        if keep[i][c]:
            c -= weights[i]
        else:
            recompute.append(i)
    return frozenset(recompute)


def solve(sizes: Sequence[int], costs: Sequence[float], budget: int) -> frozenset[int]:
    """Greedy when every item is the same (optimal there, and fast), the exact DP otherwise."""
    _check(sizes, costs, budget)
    if len(set(zip(sizes, costs, strict=True))) <= 1:
        return greedy(sizes, costs, budget)
    return dp(sizes, costs, budget)


SOLVERS: dict[str, Solver] = {"greedy": greedy, "dp": dp, "auto": solve}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        from gkd.errors import InputError

        raise InputError(f"unknown recompute solver {name!r}; use one of {', '.join(SOLVERS)}") from None
