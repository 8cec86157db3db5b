"""Activation facts for every sequence length from traces at two probe lengths.

Planning a job needs per-layer activation bytes at its sequence length, and the "what would fit" search
re-plans at shorter ones. Tracing at each length costs seconds per model, so gkd traces once per model and
expresses every byte count as an exact polynomial in the sequence length T:

- A tensor's size is a product of dimensions; in these models each dimension is either the sequence length or
  fixed by the config (the micro-batch is 1 in every trace and scaled by the planner). A storage therefore
  holds c * T^k elements with k in {0, 1, 2} (2: the attention matrix).
- Saved-for-backward storages: the same fake-tensor trace (`trace.trace_saved`) runs at two probe lengths
  T1 > T2. Storages are matched by the order autograd saves them; each one's exponent k is the one with
  bytes(T1) * T2^k == bytes(T2) * T1^k, and its coefficient is bytes(T1) / T1^k, exactly (integers).
  Anything else (a different number or order of storages, no integer exponent) raises `ProbeMismatch`, and
  the caller traces at the requested length instead.
- Graph nodes (the exported one-layer graph at T1, for the no-grad working set): T1 is a prime that equals
  no size in the model's config, so a dimension equal to T1 is the sequence length and nothing else (a prime
  is never a product of other sizes). The working set is a liveness walk over these symbolic sizes: its
  peak at T is the largest of the live totals after each allocation, each a polynomial, kept as a list
  (`peak`), since which moment peaks can change with T (attention matrices grow as T^2).

Probes must exercise the same code path as the requested length: both are at most the model's learned
positions and, for sliding-window attention, on the same side of the window (`probe_lengths`). Tests compare
the polynomials at other lengths with direct traces for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Coefficients (c0, c1, c2) of c0 + c1*T + c2*T^2 bytes.
Poly = tuple[int, int, int]
ZERO: Poly = (0, 0, 0)
# Probes stay small: traces run on fake or meta tensors, so their length costs nothing, but a short probe
# keeps every model with learned positions (BERT: 512) inside its range.
_PROBE_CEILING = 509


class ProbeMismatch(Exception):
    """The traces at the two probe lengths do not differ only in the sequence length."""


def evaluate(poly: Poly, seq_len: int) -> int:
    return poly[0] + poly[1] * seq_len + poly[2] * seq_len * seq_len


def peak(polys: tuple[Poly, ...], seq_len: int) -> int:
    """The largest of `polys` at `seq_len` (0 for none)."""
    return max((evaluate(p, seq_len) for p in polys), default=0)


def add(a: Poly, b: Poly) -> Poly:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def monomial(coefficient: int, degree: int) -> Poly:
    if not 0 <= degree <= 2:
        raise ProbeMismatch(f"a tensor grows as T^{degree}; only degrees 0-2 are expected")
    out = [0, 0, 0]
    out[degree] = coefficient
    return (out[0], out[1], out[2])


def prune(polys: list[Poly]) -> tuple[Poly, ...]:
    """Distinct polynomials, without those another one bounds coefficient-wise (never the peak for T >= 1)."""
    unique = sorted(set(polys), reverse=True)
    kept: list[Poly] = []
    for p in unique:
        if not any(all(q[i] >= p[i] for i in range(3)) for q in kept):
            kept.append(p)
    return tuple(kept)


# ----------------------------------------------------------------------------------------------------------
# Probe lengths


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _config_sizes(spec: Any) -> set[int]:
    sizes = {spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.ffn, spec.vocab, spec.layers}
    sizes.add(spec.max_positions)
    for value in spec.hf_config.values():
        if isinstance(value, int) and not isinstance(value, bool):
            sizes.add(value)
    return sizes


def sliding_window(spec: Any) -> int | None:
    """The attention window where the config enables one (Mistral; Qwen2 with use_sliding_window)."""
    window = spec.hf_config.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return None
    if spec.hf_config.get("use_sliding_window") is False:  # Qwen2/Qwen3 name a window and switch it off
        return None
    return window


def _learned_positions(spec: Any) -> bool:
    return bool(spec.learned_positions)


def probe_lengths(spec: Any, seq_len: int) -> tuple[str, int, int] | None:
    """(regime, T1, T2): two primes, T1 > T2, that take the same code path as `seq_len`; None if there are
    none (then trace at `seq_len` itself). The regime names that path, for cache keys."""
    window = sliding_window(spec)
    upper = spec.max_positions if _learned_positions(spec) and spec.max_positions else 1 << 30
    taken = _config_sizes(spec)
    if window is not None and seq_len > window:
        regime, candidates = f"windowed-{window}", range(window + 1, min(upper, window + 4096) + 1)
    else:
        hi = min(upper, _PROBE_CEILING, window if window is not None else upper)
        regime, candidates = "full", range(hi, 1, -1)
    found = [n for n in candidates if _is_prime(n) and n not in taken][:2]
    if len(found) < 2 or min(found) < 5:
        return None
    t1, t2 = max(found), min(found)
    return regime, t1, t2


# ----------------------------------------------------------------------------------------------------------
# Saved-for-backward bytes


@dataclass(frozen=True, kw_only=True)
class SavedPolys:
    """Bytes one layer saves for backward (the last traced layer) and bytes saved outside the layers."""

    layer: Poly
    outside: Poly


def saved_polys(first: Any, second: Any) -> SavedPolys:
    """Match two `trace.SavedTrace`s at probe lengths T1 (first) and T2 (second), storage by storage."""
    t1, t2 = first.seq_len, second.seq_len
    if len(first.tensors) != len(second.tensors):
        raise ProbeMismatch(
            f"{len(first.tensors)} saved storages at T={t1} but {len(second.tensors)} at T={t2}"
        )
    last = first.traced_layers - 1
    layer, outside = ZERO, ZERO
    for a, b in zip(first.tensors, second.tensors, strict=True):
        if (a.owner, a.layer, a.dtype, len(a.shape)) != (b.owner, b.layer, b.dtype, len(b.shape)):
            raise ProbeMismatch(f"saved storages differ between T={t1} and T={t2}: {a} vs {b}")
        degree = next(
            (k for k in range(3) if a.nbytes * t2**k == b.nbytes * t1**k and a.nbytes % t1**k == 0), None
        )
        if degree is None:
            raise ProbeMismatch(f"a saved storage of {a.nbytes} / {b.nbytes} bytes is not c * T^k")
        term = monomial(a.nbytes // t1**degree, degree)
        if a.owner == "outside":
            outside = add(outside, term)
        elif a.layer == last:
            layer = add(layer, term)
    return SavedPolys(layer=layer, outside=outside)


# ----------------------------------------------------------------------------------------------------------
# Graph sizes and the no-grad working set

DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "bool": 1,
    "int8": 1,
    "uint8": 1,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype named as in the traced graph ("bfloat16", ...); 4 when unknown."""
    return DTYPE_BYTES.get(dtype, 4)


# aten ops whose output shares its input's storage (a view keeps its base alive, and costs nothing itself).
_VIEW_OPS = (
    "view",
    "_unsafe_view",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "alias",
    "split",
    "unflatten",
    "as_strided",
    "unbind",
    "chunk",
    "narrow",
    "detach",
    "_reshape_alias",
    "movedim",
)


def is_view(target: str) -> bool:
    """Whether the aten op `target` (e.g. "aten.view.default") returns a view of its first input."""
    op = target.removeprefix("aten.").split(".")[0]
    return op in _VIEW_OPS or op == "t"


def node_poly(shape: tuple[int, ...], dtype: str, probe: int) -> Poly:
    """Bytes of a node of `shape` traced at sequence length `probe`, as a polynomial in T."""
    degree = sum(1 for d in shape if d == probe)
    fixed = 1
    for d in shape:
        if d != probe:
            fixed *= d
    return monomial(fixed * dtype_bytes(dtype), degree)


def workspace_polys(graph: Any, layer: int = 0) -> tuple[Poly, ...]:
    """The no-grad forward working set of one layer of `graph` (traced at T = graph.seq_len), as the
    candidates of `peak`.

    Nodes run by the layer allocate their output (views allocate nothing and keep their base alive); a
    storage is freed after its last reader. The layer's input and parameters are not counted (the input is
    the hidden stream the schedule counts; parameters are resident). Lifetimes come from the graph's edges
    (networkx)."""
    import networkx as nx

    probe = graph.seq_len
    prefix = graph.layer_path(layer)
    g = nx.DiGraph()
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        g.add_node(n.name)
        for src in n.inputs:
            g.add_edge(src, n.name)
    base: dict[str, str] = {}
    size: dict[str, Poly] = {}
    for n in graph.nodes:
        if n.op != "call_function" or not (n.module_path == prefix or n.module_path.startswith(prefix + ".")):
            continue
        if n.shape is None or n.dtype is None:
            continue
        if is_view(n.target) and n.inputs and n.inputs[0] in base:
            base[n.name] = base[n.inputs[0]]
            continue
        base[n.name] = n.name
        size[n.name] = node_poly(n.shape, n.dtype, probe)
    last: dict[str, int] = {}
    for name, root in base.items():
        users = [order[u] for u in g.successors(name)]
        last[root] = max([last.get(root, order[name]), order[name], *users])
    # (position, 0 for a free / 1 for an allocation, bytes): at one position frees come first.
    events = sorted(
        [(order[root], 1, root) for root in size] + [(last[root] + 1, 0, root) for root in size],
        key=lambda e: (e[0], e[1]),
    )
    live = ZERO
    candidates: list[Poly] = [ZERO]
    for _, is_alloc, root in events:
        p = size[root]
        if is_alloc:
            live = add(live, p)
            candidates.append(live)
        else:
            live = (live[0] - p[0], live[1] - p[1], live[2] - p[2])
    return prune(candidates)
