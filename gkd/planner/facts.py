"""Model facts: what is fixed for one model at one sequence length, and their disk cache.

`model_facts(spec, seq_len=...)` gives parameter counts (total, per layer, the largest module as DeepSpeed
counts it, the small tensors ZeRO-3 keeps gathered, the LM head) and per-layer activation bytes for
micro-batch 1 from the tap catalogue (`gkd.planner.taps`, built on the traced FX graph): what a layer saves
for backward on each attention path, what a recomputed layer keeps, the no-grad working set (networkx liveness
over the exported graph), the backward working set, and every tap's bytes.

Facts need torch (a meta-device build and traces), so they are cached on disk (`GKD_CACHE_DIR`, default
~/.cache/gkd), keyed by the model's config, the sequence length and a fingerprint of the sources that compute
them (FACTS_SOURCES); with a warm cache `gkd plan` imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FACTS_VERSION = 1
ATTENTION_PATHS = ("sdpa", "eager")


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """Fixed facts of one model at one sequence length; activation bytes are for micro-batch 1."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    tied_embeddings: bool
    params: int
    layer_params: int
    largest_module: int
    persistent_params: int
    head_params: int
    seq_len: int
    saved: dict[str, int]  # attention path -> bytes one layer saves for backward
    checkpoint: int  # bytes a recomputed layer keeps (its input)
    forward_workspace: dict[str, int]  # attention path -> transient bytes of a no-grad layer forward
    backward_workspace: dict[str, int]  # attention path -> transient bytes of a layer backward
    embed_saved: int
    tap_bytes: dict[str, int]  # tap kind -> bytes (per layer for layered kinds)
    saved_kinds: dict[str, tuple[str, ...]]  # attention path -> tap kinds a layer saves anyway
    source: str = ""  # where the activation bytes came from

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["saved_kinds"] = {k: list(v) for k, v in self.saved_kinds.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFacts:
        d = dict(d)
        d["saved_kinds"] = {k: tuple(v) for k, v in d["saved_kinds"].items()}
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Facts and their cache


FACTS_SOURCES = ("models.py", "planner/trace.py", "planner/taps.py", "planner/facts.py")


def source_fingerprint(patterns: tuple[str, ...]) -> str:
    """A hash of the gkd sources that produce a cached value (size and mtime of each file matching `patterns`,
    relative to the package), so the value is recomputed whenever that code changes."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            stat = path.stat()
            h.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("GKD_CACHE_DIR") or Path.home() / ".cache" / "gkd")


def _facts_key(spec: Any, seq_len: int, persistence_threshold: int) -> str:
    payload = json.dumps(
        {
            "v": FACTS_VERSION,
            "hf": spec.hf_config,
            "dtype": spec.dtype,
            "seq": seq_len,
            "persist": persistence_threshold,
            "src": source_fingerprint(FACTS_SOURCES),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def model_facts(
    spec: Any, *, seq_len: int, persistence_threshold: int = 100_000, use_cache: bool = True
) -> ModelFacts:
    """Facts for `spec` at `seq_len`, from the disk cache or computed (needs torch)."""
    path = (
        cache_dir()
        / "facts"
        / f"{spec.name.replace('/', '_')}-{_facts_key(spec, seq_len, persistence_threshold)}.json"
    )
    if use_cache and path.is_file():
        try:
            return ModelFacts.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a stale or partial cache entry: recompute it
    facts = compute_facts(spec, seq_len=seq_len, persistence_threshold=persistence_threshold)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(facts.to_dict()))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: plan without the cache
    return facts


def parameter_facts(spec: Any, *, persistence_threshold: int = 100_000) -> dict[str, int]:
    """Parameter counts from meta-device builds with one and two layers (no storage is allocated).

    largest_module is DeepSpeed's "largest layer" (`model_to_params` in deepspeed/runtime/zero/stage3.py):
    the most parameters any single module holds directly. persistent_params counts the elements of tensors at
    or below ZeRO-3's persistence threshold, which stay gathered on every GPU.
    """
    from gkd.models import build_model, count_parameters

    one = build_model(spec, device="meta", num_layers=1)
    largest = 0
    for module in one.modules():
        largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))

    def persistent(model: Any) -> int:
        return sum(p.numel() for p in model.parameters() if p.numel() <= persistence_threshold)

    if spec.layers >= 2:
        two = build_model(spec, device="meta", num_layers=2)
        n1, n2 = sum(p.numel() for p in one.parameters()), sum(p.numel() for p in two.parameters())
        layer_params = n2 - n1
        p1, p2 = persistent(one), persistent(two)
        persist = p1 + (spec.layers - 1) * (p2 - p1)
    else:
        n1 = sum(p.numel() for p in one.parameters())
        embed = n1 - sum(p.numel() for n, p in one.named_parameters() if ".layers." in n or ".h." in n)
        layer_params = n1 - embed
        persist = persistent(one)
    head = one.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else spec.vocab * spec.hidden
    return {
        "params": count_parameters(spec),
        "layer_params": layer_params,
        "largest_module": largest,
        "persistent_params": persist,
        "head_params": head_params,
    }


def compute_facts(spec: Any, *, seq_len: int, persistence_threshold: int = 100_000) -> ModelFacts:
    """Parameter facts from meta builds and activation facts from the tap catalogue (`activation_facts`)."""
    params = parameter_facts(spec, persistence_threshold=persistence_threshold)
    act = activation_facts(spec, seq_len=seq_len)
    return ModelFacts(
        name=spec.name,
        layers=spec.layers,
        hidden=spec.hidden,
        heads=spec.heads,
        vocab=spec.vocab,
        tied_embeddings=spec.tied_embeddings,
        seq_len=seq_len,
        **params,
        **act,
    )


_DTYPE_BYTES = {
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
    "t.default",
    "unbind",
    "chunk",
    "narrow",
    "detach",
    "_reshape_alias",
    "movedim",
)


def _is_view(target: str) -> bool:
    op = target.removeprefix("aten.").split(".")[0]
    return any(op == v or op == v.split(".")[0] for v in _VIEW_OPS) or target.endswith("t.default")


def layer_workspace(graph: Any, layer: int = 0) -> int:
    """Peak bytes live inside one layer's no-grad forward: networkx liveness over the traced graph.

    Nodes run by the layer allocate their output (views allocate nothing and keep their base alive); a storage
    is freed after its last reader. The layer's input and parameters are not counted (the input is the hidden
    stream the schedule counts; parameters are resident)."""
    import networkx as nx

    prefix = graph.layer_path(layer)
    g = nx.DiGraph()
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        g.add_node(n.name)
        for src in n.inputs:
            g.add_edge(src, n.name)
    inside = [
        n
        for n in graph.nodes
        if n.op == "call_function" and (n.module_path == prefix or n.module_path.startswith(prefix + "."))
    ]
    base: dict[str, str] = {}
    size: dict[str, int] = {}
    for n in inside:
        if n.shape is None or n.dtype is None:
            continue
        if _is_view(n.target) and n.inputs and n.inputs[0] in base:
            base[n.name] = base[n.inputs[0]]
            continue
        base[n.name] = n.name
        elements = 1
        for d in n.shape:
            elements *= d
        size[n.name] = elements * _DTYPE_BYTES.get(n.dtype, 4)
    last: dict[str, int] = {}
    for name, root in base.items():
        users = [order[u] for u in g.successors(name)]
        last[root] = max([last.get(root, order[name]), order[name], *users])
    events: list[tuple[int, int]] = []
    for root, nbytes in size.items():
        events.append((order[root], nbytes))
        events.append((last[root] + 1, -nbytes))
    peak = live = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        live += delta
        peak = max(peak, live)
    return peak


def activation_facts(spec: Any, *, seq_len: int) -> dict[str, Any]:
    """Per-layer activation bytes at micro-batch 1 from the tap catalogue (gkd.planner.taps).

    saved / checkpoint: the catalogue's saved-for-backward bytes of one layer, without and with recompute.
    forward_workspace: liveness over the exported graph of one layer (the no-grad forward's peak).
    backward_workspace: the forward working set plus the gradient of the layer output (a layer's backward
    holds the incoming gradient and gradients of the same intermediates; not traced separately).
    tap_bytes: each tap kind's bytes from the catalogue. saved_kinds: the tap kinds whose tensors the layer
    saves anyway (a saved storage of the tap's shape), so a recomputed layer that keeps them for a loss adds
    nothing.
    """
    from gkd.planner.taps import build_catalogue
    from gkd.planner.trace import trace_graph, trace_saved

    cat = build_catalogue(spec, micro_batch=1, seq_len=seq_len)
    tap_bytes: dict[str, int] = {}
    tap_shape: dict[str, tuple[int, ...]] = {}
    for tap in cat.taps:
        if tap.kind not in tap_bytes:
            tap_bytes[tap.kind] = tap.nbytes
            tap_shape[tap.kind] = tuple(tap.shape)
    layer = cat.layer_activations[0]
    saved = {a: layer.saved(a) for a in ATTENTION_PATHS}
    checkpoint = min(layer.saved("sdpa", recompute=True), saved["sdpa"])
    forward_ws: dict[str, int] = {}
    backward_ws: dict[str, int] = {}
    saved_kinds: dict[str, tuple[str, ...]] = {}
    for attention in ATTENTION_PATHS:
        graph = trace_graph(spec, micro_batch=1, seq_len=seq_len, attn_implementation=attention)
        forward_ws[attention] = layer_workspace(graph, 0)
        backward_ws[attention] = forward_ws[attention] + tap_bytes.get("hidden", 0)
        trace = trace_saved(spec, micro_batch=1, seq_len=seq_len, attn_implementation=attention)
        last = trace.traced_layers - 1
        shapes = {t.shape for t in trace.tensors if t.owner == "layer" and t.layer == last}
        saved_kinds[attention] = tuple(
            k for k in ("q", "k", "v", "probs", "context") if k in tap_shape and tap_shape[k] in shapes
        )
    return {
        "saved": saved,
        "checkpoint": checkpoint,
        "forward_workspace": forward_ws,
        "backward_workspace": backward_ws,
        "embed_saved": cat.non_layer_saved_bytes["sdpa"],
        "tap_bytes": tap_bytes,
        "saved_kinds": saved_kinds,
        "source": "gkd.planner.taps catalogue (traced saved storages) + graph liveness (networkx)",
    }
