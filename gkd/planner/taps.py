"""The tap catalogue: every named intermediate tensor a distillation method may ask for, located in the traced
graph, with its shape, dtype and bytes, plus the bytes each layer saves for backward.

Tap names (shared contract): `emb`, `hidden[i]` (i = 0..L; hidden[0] is layer 0's input, hidden[i] for i >= 1
layer i-1's output), `q[i]`, `k[i]`, `v[i]` (as the attention function receives them, after RoPE, k/v before
any GQA repeat), `scores[i]` (masked, scaled QK^T before softmax), `probs[i]` (after softmax), `context[i]`
(attention output before the out-projection), `mlp_out[i]` (MLP block output, before the residual add),
`final` (after the final norm; hidden[L] where the model has none), `logits`, and for mixture-of-experts
models `router_logits[i]` (layer i's router output, one logit per expert and token, before the softmax and
top-k; captured like transformers' `output_router_logits`, see gkd.planner.moe).

How the runtime captures each tap (`Tap.capture`):
- "module_output": a forward hook on `module_path` (first element of the output);
- "module_input": a forward pre-hook on `module_path` (first positional argument);
- "attention_fn": the registered attention function (q, k, v it receives; scores and probs it computes);
- "attention_module": hooks on an attention module that computes attention itself (BLOOM: q, k, v split from
  the fused QKV projection's output as BLOOM splits it, scores and probs recomputed from them with ALiBi);
- "lm_head_input": logits are not materialised by the capture; the loss takes the LM head's input and weight.

Design choices:
- Taps are located in the exported eager-attention graph of a one-layer copy (the eager path is the one that
  has scores/probs nodes; q/k/v/context nodes are the same on both paths). Layer i's taps are layer 0's
  nodes, with the module path renamed: `Tap.fx_node` names the node in that shallow graph.
- Each tap's shape is stored concretely for the requested (micro_batch, seq_len) and symbolically as `dims`
  ("B", "T" or a fixed size), so `Tap.bytes_at(b, t)` rescales exactly (scores/probs carry the T^2 term). The
  concrete shape is checked against the traced node, so a wrong template fails loudly.
- Saved-for-backward bytes per layer come from `trace.trace_saved` (storages autograd keeps in a fake-tensor
  training forward; deduplicated, parameters excluded), for both attention paths; "full recompute" is the same
  measurement with activation checkpointing on, where a layer keeps only its inputs. They are exact for the
  requested sizes; rebuild the catalogue for other sizes (it takes well under a second once traced).
- BLOOM computes attention inside its own module (ALiBi, no attention-function hook): its attention taps are
  captured with "attention_module" hooks, and its "sdpa" figures equal its eager ones. `unavailable` lists
  tap kinds a model cannot offer (none for the supported families); asking for one raises InputError.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

from gkd.errors import InputError
from gkd.models import ModelSpec, supports_attention_interface
from gkd.planner.moe import layer_router
from gkd.planner.probe import dtype_bytes
from gkd.planner.trace import (
    TracedGraph,
    TracedNode,
    spec_key,
    trace_graph,
    trace_saved,
)

CAPTURE_METHODS = ("module_output", "module_input", "attention_fn", "attention_module", "lm_head_input")
LAYER_KINDS = ("hidden", "q", "k", "v", "scores", "probs", "context", "mlp_out", "router_logits")
ATTENTION_KINDS = ("q", "k", "v", "scores", "probs")
ATTENTION_PATHS = ("sdpa", "eager")
# (attention path, full recompute) of every saved-tensor trace the catalogue reads.
SAVED_VARIANTS = tuple((attention, recompute) for attention in ATTENTION_PATHS for recompute in (False, True))


@dataclass(frozen=True, kw_only=True)
class _Layout:
    """Module paths of one architecture (inside a layer, relative to the layer)."""

    embed: str
    final_norm: str | None
    head: str
    attention: str
    out_proj: str
    mlp_out: str


def layout_of(spec: ModelSpec) -> _Layout:
    """The module paths of `spec`'s architecture, from the layout gkd.architecture found on the model."""
    found = spec.layout
    return _Layout(
        embed=found["embed"],
        final_norm=found["final_norm"],
        head=found["head"],
        attention=found["attention"],
        out_proj=found["out_proj"],
        mlp_out=found["mlp"],
    )


@dataclass(frozen=True, kw_only=True)
class Tap:
    """One named tensor: where it is, how it is captured, and what it costs."""

    name: str  # e.g. "hidden[3]"
    kind: str  # emb, hidden, q, k, v, scores, probs, context, mlp_out, router_logits, final, logits
    layer: int | None  # layer index for per-layer kinds (hidden[i]: i), None for emb / final / logits
    fx_node: str  # node in the traced shallow graph (layer 0's node for every layer)
    module_path: str  # the module the capture hooks (for this layer)
    capture: str  # one of CAPTURE_METHODS
    dims: tuple[str | int, ...]  # symbolic shape: "B" (micro-batch), "T" (sequence) or a fixed size
    shape: tuple[int, ...]  # for the catalogue's micro_batch and seq_len
    dtype: str
    nbytes: int  # bytes of `shape`
    # The hooked module sees this tensor with batch and sequence flattened, (B*T, ...) (OPT's MLP); the
    # capture reshapes it to `shape`.
    tokens_flattened: bool = False

    def bytes_at(self, micro_batch: int, seq_len: int) -> int:
        """Bytes of this tap at another micro-batch / sequence length (exact: dims are symbolic)."""
        return dtype_bytes(self.dtype) * prod(
            micro_batch if d == "B" else seq_len if d == "T" else int(d) for d in self.dims
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "fx_node": self.fx_node,
            "module_path": self.module_path,
            "capture": self.capture,
            "dims": list(self.dims),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.nbytes,
            "tokens_flattened": self.tokens_flattened,
        }


@dataclass(frozen=True, kw_only=True)
class LayerActivations:
    """Bytes one layer keeps for backward, storages deduplicated, parameters excluded.

    saved_bytes keys: "sdpa", "eager" (no recompute), "sdpa_full_recompute", "eager_full_recompute" (the
    layer is checkpointed: it keeps only its inputs and recomputes the rest in the backward).
    """

    layer: int
    saved_bytes: dict[str, int]

    def saved(self, attention: str, *, recompute: bool = False) -> int:
        if attention not in ATTENTION_PATHS:
            raise InputError(f"attention path must be one of {', '.join(ATTENTION_PATHS)}, got {attention!r}")
        return self.saved_bytes[f"{attention}_full_recompute" if recompute else attention]


@dataclass(frozen=True, kw_only=True)
class TapCatalogue:
    """Taps and saved-activation bytes of one model at one (micro_batch, seq_len). Plain data."""

    model: str
    micro_batch: int
    seq_len: int
    taps: tuple[Tap, ...]
    layer_activations: tuple[LayerActivations, ...]  # one per layer
    # Saved bytes outside the layers (embeddings, final norm, LM head input), per key as in LayerActivations.
    non_layer_saved_bytes: dict[str, int]
    unavailable: dict[str, str]  # tap kind -> why this model does not offer it

    def get(self, name: str) -> Tap:
        for tap in self.taps:
            if tap.name == name:
                return tap
        kind = name.split("[", 1)[0]
        if kind in self.unavailable:
            raise InputError(f"tap {name} is not available for {self.model}: {self.unavailable[kind]}")
        if kind == "router_logits" and not any(t.kind == kind for t in self.taps):
            raise InputError(
                f"tap {name} is not available for {self.model}: it is a dense model (no mixture-of-experts "
                "router); router taps need a mixture-of-experts model on both sides"
            )
        raise InputError(
            f"unknown tap {name!r} for {self.model}; taps are emb, hidden[0..L], q/k/v/scores/probs/"
            f"context/mlp_out[0..L-1] (router_logits[0..L-1] for mixture-of-experts models), final, logits "
            f"with L = {len(self.layer_activations)}"
        )

    def names(self) -> list[str]:
        return [t.name for t in self.taps]

    def saved_bytes_total(self, attention: str, *, recompute: bool = False) -> int:
        """Saved bytes of the whole model: every layer plus the non-layer part."""
        key = f"{attention}_full_recompute" if recompute else attention
        layers = sum(a.saved(attention, recompute=recompute) for a in self.layer_activations)
        return layers + self.non_layer_saved_bytes[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "taps": [t.to_dict() for t in self.taps],
            "layer_activations": [
                {"layer": a.layer, "saved_bytes": dict(a.saved_bytes)} for a in self.layer_activations
            ],
            "non_layer_saved_bytes": dict(self.non_layer_saved_bytes),
            "unavailable": dict(self.unavailable),
        }


_CATALOGUES: dict[tuple[Any, ...], TapCatalogue] = {}


def locate_taps(spec: ModelSpec, *, micro_batch: int, seq_len: int) -> tuple[Tap, ...]:
    """The catalogue's taps alone (located in the exported eager graph), without the saved-tensor traces."""
    graph = trace_graph(spec, micro_batch=micro_batch, seq_len=seq_len, attn_implementation="eager")
    return _locate_taps(spec, graph)


def build_catalogue(spec: ModelSpec, *, micro_batch: int, seq_len: int) -> TapCatalogue:
    """The tap catalogue of `spec` at (micro_batch, seq_len), from the traced graph and saved tensors."""
    key = (spec_key(spec), micro_batch, seq_len)
    if key in _CATALOGUES:
        return _CATALOGUES[key]
    graph = trace_graph(spec, micro_batch=micro_batch, seq_len=seq_len, attn_implementation="eager")
    taps = _locate_taps(spec, graph)
    activations, non_layer = _saved_bytes(spec, micro_batch=micro_batch, seq_len=seq_len)
    unavailable: dict[str, str] = {}  # every supported family offers every tap kind
    catalogue = TapCatalogue(
        model=spec.name,
        micro_batch=micro_batch,
        seq_len=seq_len,
        taps=taps,
        layer_activations=activations,
        non_layer_saved_bytes=non_layer,
        unavailable=unavailable,
    )
    _CATALOGUES[key] = catalogue
    return catalogue


# ----------------------------------------------------------------------------------------------------------
# Saved-for-backward bytes


def _saved_bytes(
    spec: ModelSpec, *, micro_batch: int, seq_len: int
) -> tuple[tuple[LayerActivations, ...], dict[str, int]]:
    per_layer: dict[str, int] = {}
    non_layer: dict[str, int] = {}
    for attention, recompute in SAVED_VARIANTS:
        trace = trace_saved(
            spec,
            micro_batch=micro_batch,
            seq_len=seq_len,
            attn_implementation=attention,
            checkpointing=recompute,
        )
        key = f"{attention}_full_recompute" if recompute else attention
        # Every layer repeats the last traced layer's bytes: layers are identical, and layer 0 (whose
        # input is the embedding output, not a layer output) saves the same amount (tests check it).
        per_layer[key] = trace.layer_bytes(trace.traced_layers - 1)
        non_layer[key] = trace.outside_bytes()
    layers = tuple(LayerActivations(layer=i, saved_bytes=dict(per_layer)) for i in range(spec.layers))
    return layers, non_layer


# ----------------------------------------------------------------------------------------------------------
# Locating taps in the graph

_VIEWS = (
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "expand",
    "unsqueeze",
    "squeeze",
    "clone",
    "contiguous",
    "alias",
    "slice",
    "_to_copy",
    "to",
)


def _op(node: TracedNode) -> str:
    return node.target.removeprefix("aten.").split(".")[0]


def _flat(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0] * shape[1], *shape[2:])


def _last_with_shape(
    nodes: tuple[TracedNode, ...], shape: tuple[int, ...], *, allow_flat: bool = False
) -> TracedNode | None:
    """The last node of `nodes` with `shape` (or, with allow_flat, its (B*T, ...) form)."""
    for node in reversed(nodes):
        if node.op == "call_function" and (
            node.shape == shape or (allow_flat and node.shape == _flat(shape))
        ):
            return node
    return None


def _first_with_shape(nodes: tuple[TracedNode, ...], shape: tuple[int, ...]) -> TracedNode | None:
    """The first node of `nodes` with `shape` or its (B*T, ...) form (a router's logits, before the softmax
    and top-k that follow with the same shape)."""
    for node in nodes:
        if node.op == "call_function" and node.shape in (shape, _flat(shape)):
            return node
    return None


def _external_input(
    graph: TracedGraph, nodes: tuple[TracedNode, ...], shape: tuple[int, ...]
) -> TracedNode | None:
    """The first node read by `nodes` but produced outside them, with `shape`."""
    inside = {n.name for n in nodes}
    for node in nodes:
        for name in node.inputs:
            if name not in inside:
                source = graph.node(name)
                if source.op == "call_function" and source.shape == shape:
                    return source
    return None


def _walk_back(graph: TracedGraph, node: TracedNode, shape: tuple[int, ...]) -> TracedNode | None:
    """Follow view-like ops back from `node` to the first tensor with `shape` (undoes transposes and
    GQA repeats)."""
    current: TracedNode | None = node
    while current is not None:
        if current.shape == shape:
            return current
        if current.op != "call_function" or _op(current) not in _VIEWS or not current.inputs:
            return None
        current = graph.node(current.inputs[0])
    return None


def _follow(graph: TracedGraph, node: TracedNode, ops: tuple[str, ...]) -> TracedNode:
    """Follow single users of `node` while they are one of `ops` (e.g. dtype casts after softmax)."""
    while True:
        users = graph.users(node.name)
        if len(users) != 1 or _op(users[0]) not in ops:
            return node
        node = users[0]


def _find_user(
    graph: TracedGraph, node: TracedNode, ops: tuple[str, ...], through: tuple[str, ...]
) -> TracedNode | None:
    """The first user of `node` that is one of `ops`, looking through ops in `through` (dropout, casts)."""
    frontier = [node]
    while frontier:
        current = frontier.pop(0)
        for user in graph.users(current.name):
            if _op(user) in ops:
                return user
            if _op(user) in through:
                frontier.append(user)
    return None


def _locate_taps(spec: ModelSpec, graph: TracedGraph) -> tuple[Tap, ...]:
    layout = layout_of(spec)
    b, t = graph.micro_batch, graph.seq_len
    hd = spec.head_dim
    width = spec.heads * hd
    dims: dict[str, tuple[str | int, ...]] = {
        "hidden": ("B", "T", spec.hidden),
        "context": ("B", "T", width),
        "mlp_out": ("B", "T", spec.hidden),
        "q": ("B", spec.heads, "T", hd),
        "k": ("B", spec.kv_heads, "T", hd),
        "v": ("B", spec.kv_heads, "T", hd),
        "scores": ("B", spec.heads, "T", "T"),
        "probs": ("B", spec.heads, "T", "T"),
        "logits": ("B", "T", spec.vocab),
    }
    router = layer_router(spec, graph.layer_path(0))
    if router is not None:
        dims["router_logits"] = ("B", "T", router[1])

    def concrete(kind: str) -> tuple[int, ...]:
        return tuple(b if d == "B" else t if d == "T" else int(d) for d in dims[kind])

    def need(node: TracedNode | None, what: str) -> TracedNode:
        if node is None:
            raise RuntimeError(f"{spec.name}: could not locate {what} in the traced {spec.model_type} graph")
        return node

    def make(
        name: str, kind: str, layer: int | None, node: TracedNode, path: str, capture: str, dims_kind: str
    ) -> Tap:
        shape = concrete(dims_kind)
        flattened = node.shape == _flat(shape) and node.shape != shape
        if node.shape != shape and not flattened:
            raise RuntimeError(
                f"{spec.name}: tap {name} expected shape {shape}, traced node {node.name} has {node.shape}"
            )
        dtype = node.dtype or spec.dtype
        return Tap(
            name=name,
            kind=kind,
            layer=layer,
            fx_node=node.name,
            module_path=path,
            capture=capture,
            dims=dims[dims_kind],
            shape=shape,
            dtype=dtype,
            nbytes=dtype_bytes(dtype) * prod(shape),
            tokens_flattened=flattened,
        )

    hidden_shape = concrete("hidden")
    layer0 = graph.nodes_in(graph.layer_path(0))
    emb = need(_last_with_shape(graph.nodes_in(layout.embed), hidden_shape), "the embedding output")
    layer_in = need(_external_input(graph, layer0, hidden_shape), "the layer input")
    layer_out = need(_last_with_shape(layer0, hidden_shape), "the layer output")
    out_proj = graph.nodes_in(graph.layer_path(0, layout.out_proj))
    context = need(_external_input(graph, out_proj, concrete("context")), "the attention context")
    mlp_out = need(
        _last_with_shape(graph.nodes_in(graph.layer_path(0, layout.mlp_out)), hidden_shape, allow_flat=True),
        "the MLP output",
    )
    head = graph.nodes_in(layout.head)
    logits = need(_last_with_shape(head, concrete("logits")), "the logits")
    final = (
        need(_last_with_shape(graph.nodes_in(layout.final_norm), hidden_shape), "the final norm output")
        if layout.final_norm
        else layer_out
    )
    router_logits = (
        need(
            _first_with_shape(graph.nodes_in(graph.layer_path(0, router[0])), concrete("router_logits")),
            "the router logits",
        )
        if router is not None
        else None
    )
    attention = _attention_nodes(graph, graph.nodes_in(graph.layer_path(0, layout.attention)), concrete, need)
    attention_capture = "attention_fn" if supports_attention_interface(spec) else "attention_module"

    taps: list[Tap] = [make("emb", "emb", None, emb, layout.embed, "module_output", "hidden")]
    last = spec.layers - 1
    taps.append(make("hidden[0]", "hidden", 0, layer_in, graph.layer_path(0), "module_input", "hidden"))
    for i in range(spec.layers):
        for kind in ATTENTION_KINDS:
            if kind in attention:
                taps.append(
                    make(
                        f"{kind}[{i}]",
                        kind,
                        i,
                        attention[kind],
                        graph.layer_path(i, layout.attention),
                        attention_capture,
                        kind,
                    )
                )
        taps.append(
            make(
                f"context[{i}]",
                "context",
                i,
                context,
                graph.layer_path(i, layout.out_proj),
                "module_input",
                "context",
            )
        )
        if router is not None and router_logits is not None:
            taps.append(
                make(
                    f"router_logits[{i}]",
                    "router_logits",
                    i,
                    router_logits,
                    graph.layer_path(i, router[0]),
                    "module_output",
                    "router_logits",
                )
            )
        taps.append(
            make(
                f"mlp_out[{i}]",
                "mlp_out",
                i,
                mlp_out,
                graph.layer_path(i, layout.mlp_out),
                "module_output",
                "mlp_out",
            )
        )
        taps.append(
            make(
                f"hidden[{i + 1}]", "hidden", i + 1, layer_out, graph.layer_path(i), "module_output", "hidden"
            )
        )
    if layout.final_norm:
        taps.append(make("final", "final", None, final, layout.final_norm, "module_output", "hidden"))
    else:
        taps.append(make("final", "final", None, final, graph.layer_path(last), "module_output", "hidden"))
    taps.append(make("logits", "logits", None, logits, layout.head, "lm_head_input", "logits"))
    return tuple(taps)


def _attention_nodes(
    graph: TracedGraph, nodes: tuple[TracedNode, ...], concrete: Any, need: Any
) -> dict[str, TracedNode]:
    """q, k, v, scores, probs in an eager attention: the softmax, the matmul before it and the one after."""
    softmax = need(
        next((n for n in nodes if _op(n) in ("softmax", "_softmax")), None), "the attention softmax"
    )
    scores = graph.node(softmax.inputs[0])
    probs = _follow(graph, softmax, ("to", "_to_copy", "type_as"))
    # QK^T: walk back from the scores through the scaling, the mask and BLOOM's (B*H, T, T) view.
    qk: TracedNode | None = scores
    while qk is not None and _op(qk) not in ("matmul", "bmm", "baddbmm"):
        qk = (
            graph.node(qk.inputs[0])
            if qk.inputs and _op(qk) in ("add", "mul", "div", "to", "where", "masked_fill", "view", "tanh")
            else None
        )
    qk = need(qk, "the QK^T matmul")
    first = 1 if _op(qk) == "baddbmm" else 0  # baddbmm(bias, q, k^T): BLOOM's ALiBi bias comes first
    pv = need(
        _find_user(graph, probs, ("matmul", "bmm"), ("dropout", "native_dropout", "to", "_to_copy", "view")),
        "the probs @ V matmul",
    )
    return {
        "q": need(_walk_back(graph, graph.node(qk.inputs[first]), concrete("q")), "q"),
        "k": need(_walk_back(graph, graph.node(qk.inputs[first + 1]), concrete("k")), "k"),
        "v": need(_walk_back(graph, graph.node(pv.inputs[1]), concrete("v")), "v"),
        "scores": scores,
        "probs": probs,
    }
