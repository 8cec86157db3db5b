"""Trace a model's forward into plain data: the FX graph of a shallow copy, and the tensors autograd saves.

Two views of one training-mode forward of a shallow copy (the first layers only) of the model:

1. `trace_graph`: `torch.export.export(..., strict=False)` on meta tensors. Every node (except runtime
   assertion nodes, which produce nothing) becomes a `TracedNode` (name, aten target, shape, dtype, module
   path from `nn_module_stack`, input node names), so later passes (tap location, liveness with networkx)
   need no FX. The copy has one layer by default: layers of one model are identical, so layer i's nodes are
   layer 0's with the module path renamed (`TracedGraph.layer_path`).
2. `trace_saved`: the same forward under `FakeTensorMode` (fake CPU tensors: shapes, dtypes and storages, no
   data) inside `torch.autograd.graph.saved_tensors_hooks`. Every tensor autograd keeps for the backward is
   recorded once per storage (views of one storage count once, with the storage's full size), parameters
   excluded, and attributed to the layer that first saved it. Tensors made outside the layers and handed to
   each of them (RoPE cos/sin, masks) count as non-layer. Fake CPU tensors make PyTorch pick the same kernels
   as a real CPU run (e.g. SDPA's CPU flash kernel, which saves the output and a float32 log-sum-exp instead
   of the attention matrix); CUDA's flash and memory-efficient kernels save the same tensors.

The traced forward takes what a run's forward takes: packed rows (gkd.runtime.data) of two documents each,
with position ids from 0 in each, given to the model by the runtime's own `gkd.runtime.packing.packed_inputs`,
so the attention mask a run makes is counted as the run makes it, per family:
- a family whose mask builder reads position ids (Llama, Qwen, Mistral, GPT-2, BERT, ...) gets them and no
  attention mask; transformers builds a (B, 1, T, T) bool mask that keeps the documents apart;
- OPT-like families and BLOOM get a (B, 1, T, T) block mask as their attention mask (bool under sdpa, the
  model's float dtype under eager).
With a mask SDPA cannot use its causal fast path: it converts a bool mask to an additive one in the
activation dtype inside each layer and saves that for the backward (B T^2 x 2 bytes per layer in bf16), and
transformers repeats the key and value heads of a grouped-query model to all heads before SDPA (its GQA fast
path needs no mask), which SDPA then saves. CUDA's flash kernel takes no mask, so a CUDA run takes the
memory-efficient kernel there, which saves the same tensors (its log-sum-exp padded to 32 positions). The plan
thus counts the mask of rows holding more than one document (a row of one document makes none on the
position-id path). The rows are full, so the trace gives `packed_inputs` no 2D mask, which it would drop or
read as all real tokens; the inputs are made as fake (or meta) tensors, holding no memory at any length.
Under FakeTensorMode or export transformers believes it is being traced and would build the packed mask
whatever the position ids; `_as_eager_run` gives it the answer a real run gets: the documents of the packed
inputs, and none where the model makes its own position ids. That keeps fake and real runs identical, which
tests/planner/test_taps.py checks against real CPU forward passes of packed rows.

The model runs in training mode, so dropout (where the config has it) is active and what it keeps is saved.
CPU and CUDA kernels differ there, only where the config has dropout (GPT-2 and the GPT-2-shaped GLM-10B,
BERT, OPT; not the Llama, Qwen, Mistral, GLM-130B or BLOOM presets): PyTorch's CPU dropout keeps a noise
tensor of the activation dtype (2 bytes per element in bf16) where CUDA's fused dropout keeps a 1-byte bool
mask; and with attention dropout on, CPU SDPA falls back to the unfused math path (which keeps T x T tensors)
where CUDA's flash kernel keeps only q, k, v, the output, a float32 log-sum-exp and its random-number state.
`trace_saved(..., kernels="cuda")` runs the CUDA choices on the CPU (`_cuda_kernels`): dropout through
`torch.native_dropout`, CUDA's fused kernel, which keeps the bool mask; SDPA asked for without dropout, so it
takes the flash kernel that keeps what CUDA's flash kernel keeps (the random-number state is a few bytes).
The planner plans for GPUs and uses "cuda"; `gkd inspect` reports "cpu", which the tests compare with real
CPU runs.
Results are cached per (model, micro-batch, sequence, attention implementation) within the process.

Speed: a cold `gkd inspect` or `gkd plan` is mostly imports (torch, torch.export, transformers: about 6 s of
CPU here) and these traces (about 2 s per model); node stack traces, which the export records for debugging
only, are switched off while exporting. Running the saved-tensor traces in a forked child alongside the export
was tried and measured no faster on two cores, so the traces stay in-process and simple.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gkd.models import ModelSpec, build_model, supports_attention_interface
from gkd.planner.moe import grouped_mm_any_dtype


def layer_container(spec: ModelSpec) -> str:
    """Where the model keeps its stack of blocks, e.g. "model.layers" (found by gkd.architecture)."""
    return str(spec.layout["layers"])


@dataclass(frozen=True, kw_only=True)
class TracedNode:
    """One node of the exported graph, as plain data."""

    name: str
    op: str  # "placeholder", "call_function", "output", ...
    target: str  # e.g. "aten.linear.default"; "" for placeholders
    shape: tuple[int, ...] | None  # None when the node is not a single tensor
    dtype: str | None  # e.g. "bfloat16"
    module_path: str  # innermost module that ran the node, "" at model level
    inputs: tuple[str, ...]  # names of the nodes it reads


@dataclass(frozen=True, kw_only=True)
class TracedGraph:
    """The exported forward graph of a shallow copy of `model`, extrapolated to `total_layers` layers."""

    model: str
    micro_batch: int
    seq_len: int
    attn_implementation: str
    traced_layers: int
    total_layers: int
    layer_container: str  # e.g. "model.layers"
    nodes: tuple[TracedNode, ...]

    def node(self, name: str) -> TracedNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def layer_path(self, layer: int, suffix: str = "") -> str:
        """Module path of `layer` or of `suffix` inside it: layer_path(3, "mlp") -> "model.layers.3.mlp"."""
        base = f"{self.layer_container}.{layer}"
        return f"{base}.{suffix}" if suffix else base

    def nodes_in(self, module_path: str) -> tuple[TracedNode, ...]:
        """Nodes run by `module_path` or its submodules, in graph order (traced layers only)."""
        prefix = module_path + "."
        return tuple(
            n for n in self.nodes if n.module_path == module_path or n.module_path.startswith(prefix)
        )

    def users(self, name: str) -> tuple[TracedNode, ...]:
        return tuple(n for n in self.nodes if name in n.inputs)


@dataclass(frozen=True, kw_only=True)
class SavedTensor:
    """One storage autograd keeps for the backward (first tensor seen on it)."""

    owner: str  # "layer" or "outside"
    layer: int  # layer index for owner == "layer", else -1
    nbytes: int  # bytes of the whole storage
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, kw_only=True)
class SavedTrace:
    """Tensors saved for backward by one training forward of a shallow copy with `traced_layers` layers."""

    model: str
    micro_batch: int
    seq_len: int
    attn_implementation: str  # as requested; BLOOM always runs its own (eager) attention
    traced_layers: int
    checkpointing: bool  # every layer checkpointed (full recompute): a layer keeps only its inputs
    tensors: tuple[SavedTensor, ...]
    kernels: str = "cpu"  # "cpu" or "cuda": whose dropout and attention kernels ran (module docstring)

    def layer_bytes(self, layer: int) -> int:
        return sum(t.nbytes for t in self.tensors if t.owner == "layer" and t.layer == layer)

    def outside_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.owner == "outside")


def spec_key(spec: ModelSpec) -> str:
    return json.dumps([spec.name, spec.dtype, spec.hf_config], sort_keys=True, default=str)


def _inputs(model: Any, spec: ModelSpec, micro_batch: int, seq_len: int, device: str) -> dict[str, Any]:
    """A run's model inputs for packed rows of two documents each (see the module docstring), made on
    `device` (call it under FakeTensorMode for fake tensors). `model`'s attention implementation must be the
    traced one: the block mask's dtype follows it."""
    import torch

    from gkd.runtime.packing import packed_inputs

    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device)
    first = (seq_len + 1) // 2
    positions = torch.cat([torch.arange(first, device=device), torch.arange(seq_len - first, device=device)])
    # (B, T) and contiguous, as the data gives them (an embedding backward that saves them keeps B T).
    positions = positions.expand(micro_batch, seq_len).contiguous()
    inputs = packed_inputs(model, {"input_ids": ids, "position_ids": positions})
    return inputs if spec.is_encoder else {**inputs, "use_cache": False}


def _packed(inputs: dict[str, Any], seq_len: int) -> bool:
    """Whether transformers finds packed documents in `inputs` (its position ids, without a mask)."""
    return seq_len > 1 and "position_ids" in inputs and "attention_mask" not in inputs


def _check_sizes(spec: ModelSpec, micro_batch: int, seq_len: int) -> None:
    from gkd.errors import InputError

    if micro_batch < 1 or seq_len < 1:
        raise InputError(f"micro-batch and sequence length must be positive, got {micro_batch} and {seq_len}")
    if spec.learned_positions and seq_len > spec.max_positions:
        raise InputError(
            f"sequence length {seq_len} exceeds {spec.name}'s {spec.max_positions} learned positions; "
            f"use --seq-len {spec.max_positions} or less"
        )


_GRAPHS: dict[tuple[Any, ...], TracedGraph] = {}


def trace_graph(
    spec: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    attn_implementation: str = "eager",
    traced_layers: int = 1,
) -> TracedGraph:
    """Export the training forward of a `traced_layers`-layer copy of `spec` on meta tensors."""
    import torch

    _check_sizes(spec, micro_batch, seq_len)
    key = (spec_key(spec), micro_batch, seq_len, attn_implementation, traced_layers)
    if key in _GRAPHS:
        return _GRAPHS[key]
    model = build_model(
        spec, device="meta", num_layers=traced_layers, attn_implementation=attn_implementation
    )
    model.train()
    # Stack traces of every node are recorded for debugging only (we keep none of them) and cost a tenth of
    # the export.
    # The switch exists only in recent torch releases; older ones simply record the traces.
    fx_config = torch.fx.config
    has_switch = hasattr(fx_config, "do_not_emit_stack_traces")
    emit_traces = getattr(fx_config, "do_not_emit_stack_traces", None)
    if has_switch:
        fx_config.do_not_emit_stack_traces = True
    try:
        inputs = _inputs(model, spec, micro_batch, seq_len, "meta")
        with grouped_mm_any_dtype(), _as_eager_run(_packed(inputs, seq_len)):  # MoE experts: gkd.planner.moe
            exported = torch.export.export(model, (), inputs, strict=False)
    finally:
        if has_switch:
            fx_config.do_not_emit_stack_traces = emit_traces
    # Runtime assertion nodes (aten._assert_tensor_metadata, ...) produce nothing; dropping them keeps
    # "users" and liveness about real data flow.
    nodes = tuple(
        _plain_node(n)
        for n in exported.graph_module.graph.nodes
        if not (n.op == "call_function" and str(n.target).startswith("aten._assert"))
    )
    graph = TracedGraph(
        model=spec.name,
        micro_batch=micro_batch,
        seq_len=seq_len,
        attn_implementation=attn_implementation,
        traced_layers=traced_layers,
        total_layers=spec.layers,
        layer_container=layer_container(spec),
        nodes=nodes,
    )
    _GRAPHS[key] = graph
    return graph


def _plain_node(node: Any) -> TracedNode:
    import torch

    val = node.meta.get("val")
    shape = tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
    dtype = str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else None
    stack = node.meta.get("nn_module_stack") or {}
    # nn_module_stack maps a key to (path, type), outermost first; paths may carry a "L['self']." style prefix
    # in some torch versions, which we strip.
    path = str(list(stack.values())[-1][0]) if stack else ""
    path = path.removeprefix("L['self'].").removeprefix("L__self__.")
    inputs = tuple(a.name for a in node.all_input_nodes)
    target = "" if node.op in ("placeholder", "output") else str(node.target)
    return TracedNode(
        name=node.name, op=node.op, target=target, shape=shape, dtype=dtype, module_path=path, inputs=inputs
    )


@contextlib.contextmanager
def _as_eager_run(packed: bool) -> Iterator[None]:
    """Make transformers' mask builder behave as in a real run under FakeTensorMode or export (see module
    docstring): it finds documents where the inputs are `packed`, and none in position ids it makes itself."""
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    if not packed:
        masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextlib.contextmanager
def _cuda_kernels() -> Iterator[None]:
    """Dropout and SDPA as a CUDA run executes them (see the module docstring), for the saved-tensor trace.

    Models call `torch.nn.functional.dropout` (directly or through `nn.Dropout`) and
    `torch.nn.functional.scaled_dot_product_attention` by attribute, so replacing them for the duration of
    the trace reaches every call."""
    import torch
    import torch.nn.functional as F

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def fused_dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0.0:
            return input
        return torch.native_dropout(input, p, True)[0]  # keeps a bool mask, as CUDA's fused kernel does

    def flash_sdpa(*args: Any, dropout_p: float = 0.0, **kwargs: Any) -> Any:
        # CUDA's flash kernel applies dropout inside, from a random-number state: it keeps no more than
        # without dropout, so ask for none and the CPU picks the same flash kernel.
        return sdpa(*args, dropout_p=0.0, **kwargs)

    F.dropout, F.scaled_dot_product_attention = fused_dropout, flash_sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa


def _layers(model: Any, container: str) -> Any:
    module = model
    for part in container.split("."):
        module = getattr(module, part)
    return module


_SAVED: dict[tuple[Any, ...], SavedTrace] = {}
# One fake model per (spec, sizes, depth), reused for every attention path and recompute setting.
_FAKE_MODELS: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def trace_saved(
    spec: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    attn_implementation: str,
    traced_layers: int = 2,
    checkpointing: bool = False,
    kernels: str = "cpu",
) -> SavedTrace:
    """Record the storages a training forward saves for backward (fake tensors; see module docstring).

    checkpointing: run every layer under `torch.utils.checkpoint` (non-reentrant), as full recompute does; a
    layer then saves only its inputs, and its internals are recomputed in the backward.
    kernels: "cpu" (what a CPU run keeps) or "cuda" (dropout and attention as CUDA runs them, see
    `_cuda_kernels`).
    """
    _check_sizes(spec, micro_batch, seq_len)
    if kernels not in ("cpu", "cuda"):
        raise ValueError(f"kernels must be 'cpu' or 'cuda', got {kernels!r}")
    key = (spec_key(spec), micro_batch, seq_len, attn_implementation, traced_layers, checkpointing, kernels)
    if key in _SAVED:
        return _SAVED[key]
    mode, model = _fake_model(spec, micro_batch, seq_len, traced_layers)
    if supports_attention_interface(spec):
        model.set_attn_implementation(attn_implementation)
    with mode:
        inputs = _inputs(model, spec, micro_batch, seq_len, "cpu")
    layers = _layers(model, layer_container(spec))
    if checkpointing:
        for layer in layers:
            _checkpoint_forward(layer)
    try:
        context = [mode, _as_eager_run(_packed(inputs, seq_len)), grouped_mm_any_dtype()]
        context += [_cuda_kernels()] if kernels == "cuda" else []
        tensors = record_saved_tensors(model, layers, inputs, context=context)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # undo _checkpoint_forward
    saved = SavedTrace(
        model=spec.name,
        micro_batch=micro_batch,
        seq_len=seq_len,
        attn_implementation=attn_implementation,
        traced_layers=traced_layers,
        checkpointing=checkpointing,
        kernels=kernels,
        tensors=tensors,
    )
    _SAVED[key] = saved
    return saved


def _fake_model(spec: ModelSpec, micro_batch: int, seq_len: int, traced_layers: int) -> tuple[Any, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (spec_key(spec), micro_batch, seq_len, traced_layers)
    if key not in _FAKE_MODELS:
        mode = FakeTensorMode()
        with mode:
            model = build_model(spec, device="cpu", num_layers=traced_layers, attn_implementation="sdpa")
        model.train()
        _FAKE_MODELS.clear()  # keep one: fake models hold no storage, but their Python objects add up
        _FAKE_MODELS[key] = (mode, model)
    return _FAKE_MODELS[key]


def _checkpoint_forward(layer: Any) -> None:
    """Run `layer.forward` under non-reentrant activation checkpointing (an instance attribute, so the
    module's hooks still run around it and attribute what the checkpoint saves to this layer)."""
    from torch.utils.checkpoint import checkpoint

    forward = layer.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed


def record_saved_tensors(
    model: Any, layers: Any, inputs: dict[str, Any], context: list[Any] | None = None
) -> tuple[SavedTensor, ...]:
    """Run `model(**inputs)` and return the storages autograd saved, deduplicated, parameters excluded, each
    attributed to the layer (an element of `layers`) that first saved it or to "outside".

    A layer's non-hidden tensor arguments (RoPE cos/sin, masks, ...) are made once and shared by all layers,
    so they are attributed to "outside" even when a layer saves them first.
    """
    import torch

    def storage_key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    params = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
    current = [-1]
    records: dict[int, SavedTensor] = {}

    shared_seen: set[int] = set()

    def pre_hook(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[0] = index
            # args[0] is the hidden state (per layer); everything else is shared across layers.
            others = list(args[1:]) + list(kwargs.values())
            for value in others:
                for t in _tensors(value):
                    shared_seen.add(storage_key(t))

        return hook

    def post_hook(module: Any, args: Any, output: Any) -> None:
        current[0] = -1

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = storage_key(t)
        if k not in params and k not in records:
            layer = -1 if k in shared_seen else current[0]
            records[k] = SavedTensor(
                owner="layer" if layer >= 0 else "outside",
                layer=layer,
                nbytes=int(t.untyped_storage().nbytes()),
                shape=tuple(t.shape),
                dtype=str(t.dtype).removeprefix("torch."),
            )
        return t

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook))
    try:
        with contextlib.ExitStack() as stack:
            for ctx in context or []:
                stack.enter_context(ctx)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(records.values())


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
