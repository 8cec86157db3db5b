"""Layer-mapping rules -> concrete (student depth, teacher depth) pairs, and depths -> tap names.

Depth d in 1..L is the output of layer d - 1; depth 0 is the embedding output (input of layer 0). A `hidden`
tap
at depth d is `hidden[d]`; an attention or MLP tap at depth d is `<kind>[d - 1]` (the d-th layer, 0-based
index
d - 1). Pure functions of (rule, Ls, Lt, step, total_steps): the same inputs always give the same pairs, so a
random rule is reproducible from its seed and the step.
"""

from __future__ import annotations

import random

from gkd.errors import InputError
from gkd.methods.spec import LayerRule

Pair = tuple[int, int]


def _uniform(ls: int, lt: int) -> list[Pair]:
    return [(j, j * lt // ls) for j in range(1, ls + 1)]


def pairs(rule: LayerRule, ls: int, lt: int, *, step: int = 0, total_steps: int = 0) -> tuple[Pair, ...]:
    """The (student depth, teacher depth) pairs a rule selects at `step` of `total_steps`."""
    if ls < 1 or lt < 1:
        raise InputError(f"layer mapping needs at least one layer on each side (student {ls}, teacher {lt})")
    if rule.kind == "uniform":
        out = _uniform(ls, lt)
    elif rule.kind == "last":
        out = [(ls, lt)]
    elif rule.kind == "skip":
        if rule.k * ls > lt:
            raise InputError(
                f"layer rule skip-{rule.k} needs teacher layers >= {rule.k} x student layers "
                f"({rule.k} x {ls} = {rule.k * ls}) but the teacher has {lt}; use uniform or a smaller k"
            )
        out = [(j, j * rule.k) for j in range(1, ls + 1)]
    elif rule.kind == "explicit":
        if rule.pairs:
            out = [tuple(p) for p in rule.pairs]  # type: ignore[misc]
        else:
            if len(rule.layers) != ls:
                raise InputError(
                    f"explicit layer map lists {len(rule.layers)} teacher layers but the student has "
                    f"{ls} layers;"
                    f" give one teacher depth per student layer"
                )
            out = [(j, t) for j, t in enumerate(rule.layers, start=1)]
        for s, t in out:
            if not (0 <= s <= ls and 0 <= t <= lt):
                raise InputError(
                    f"explicit layer map pair (student {s}, teacher {t}) is outside the models' depths "
                    f"(student 0..{ls}, teacher 0..{lt})"
                )
    elif rule.kind == "random":
        #  RAIL-KD: a fresh sorted sample of teacher layers every `every` steps, reproducible from seed and
        # step.
        draw = step // rule.every
        rng = random.Random(rule.seed * 1_000_003 + draw)
        n = ls if rule.random_last else ls - 1
        pool = list(range(1, lt + 1 if rule.random_last else lt))
        if n > len(pool):
            raise InputError(f"random layer map needs {n} distinct teacher layers but only {len(pool)} exist")
        chosen = sorted(rng.sample(pool, n))
        out = list(zip(range(1, n + 1), chosen, strict=True))
        if not rule.random_last and not rule.drop_last:
            out.append((ls, lt))
    elif rule.kind == "progressive":
        full = _uniform(ls, lt)
        #  SID: steps / (Ls + 1) per stage; stage n (0-based) unlocks pair n; the last stage adds the
        # prediction
        # loss (a term schedule, not a pair).
        span = max(total_steps // (ls + 1), 1) if total_steps > 0 else 1
        n = min(step // span, ls - 1) if total_steps > 0 else 0
        out = full[: n + 1] if rule.keep_unlocked else [full[n]]
    elif rule.kind == "all":
        out = [(ls, t) for t in range(1, lt + 1)]
    else:  # pragma: no cover - LayerRule validates kind
        raise AssertionError(rule.kind)
    if rule.drop_last:
        out = [p for p in out if p != (ls, lt)]
    if rule.include_emb:
        out = [(0, 0), *out]
    return tuple(out)


def progressive_stage(ls: int, step: int, total_steps: int) -> int:
    """Which progressive stage (0..Ls) a step falls in: Ls means every layer is unlocked (prediction
    loss on)."""
    if total_steps <= 0:
        return 0
    return min(step // max(total_steps // (ls + 1), 1), ls)


def tap_name(kind: str, depth: int | None) -> str:
    """The catalogue name of a tap of `kind` at `depth` (None for global kinds)."""
    if depth is None:
        return kind
    if kind == "hidden":
        return f"hidden[{depth}]"
    if depth < 1:
        raise InputError(f"tap {kind!r} has no depth 0 (only hidden has the embedding position); drop +emb")
    return f"{kind}[{depth - 1}]"
