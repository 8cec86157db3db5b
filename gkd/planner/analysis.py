"""Analysis: the bytes of one training step, per model and per category, for a given strategy.

Two stages:
1. `model_facts(spec, ...)`: what is fixed for a model at a sequence length: parameter counts (total, per
   layer, largest module as DeepSpeed counts it, the small tensors ZeRO-3 keeps gathered), and per-layer
   activation bytes for micro-batch 1 from the tap catalogue (`gkd.planner.taps`, built on the traced FX
   graph): what a layer saves for backward on each attention path, what a recomputed layer keeps, the
   no-grad working set, the backward working set, and every tap's bytes. Facts need torch (a meta-device
   build and a trace), so they are cached on disk (`GKD_CACHE_DIR`, default ~/.cache/gkd), keyed by the
   model's config, the sequence length and a fingerprint of gkd's source; a warm `gkd plan` imports no torch.
2. `build_workload(...)`: for one candidate strategy, the resident tensors (model states, teacher weights,
   DeepSpeed buffers) and each model's activity scaled to the micro-batch (activations are linear in the
   batch: every activation tensor has a leading batch dimension), the loss terms with their taps, and the
   loss workspace of the logit loss on the chosen path.

Loss workspace rules (bytes, tokens = micro_batch x seq, V the vocabulary, h the hidden size):
- fused_linear (student hidden + LM-head weight, `gkd.kernels.fused_linear_kd_loss`): two (chunk x V) fp32
  logits buffers of CHUNK_ELEMENTS elements while running (student and teacher); kept until backward: the
  gradients of the student hidden (tokens x h) and of the head weight (V x h), bf16, computed in the forward.
  A teacher whose head is not resident (ZeRO-3, offload, tensor parallel) has its head weight gathered for the
  loss (V x h_t, bf16, transient). The teacher's side is its final hidden state (tokens x h_t).
- logits (`gkd.kernels.kd_loss`): the student logits (tokens x V, bf16) while the loss runs; it computes
  dL/dlogits in the forward and keeps that (tokens x V) until backward; teacher logits are a tap freed after
  the loss. A hard loss in plain torch (cross-entropy) keeps its log-softmax (tokens x V) as well.
- topk (offline teacher, `fused_linear_topk_kd_loss`): one (chunk x V) buffer and the same gradients as
  fused_linear, plus the stored top-k (k bf16 log-probs, k int32 indices, one fp32 tail mass per token) loaded
  per micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gkd.config import Config
from gkd.planner.memory import (
    BYTES_BF16,
    deepspeed_buffers,
    effective_deepspeed,
    student_model_states,
    teacher_residency,
)
from gkd.planner.plan import Strategy, TapCost, TensorAlloc
from gkd.planner.schedule import LossTerm, ModelActivity, Workload

FACTS_VERSION = 1
# Elements of one (chunk x V) fp32 logits buffer of the fused-linear kernels (gkd.kernels.fused_linear).
CHUNK_ELEMENTS = 1 << 25
ATTENTION_PATHS = ("sdpa", "eager")
LAYERED = ("hidden", "q", "k", "v", "scores", "probs", "context", "mlp_out")


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


FACTS_SOURCES = ("models.py", "planner/trace.py", "planner/taps.py", "planner/analysis.py")


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


# ----------------------------------------------------------------------------------------------------------
# Workload of one candidate


def _tap_kind(name: str) -> str:
    return name.split("[", 1)[0]


def _tap_index(name: str) -> int:
    return int(name.split("[", 1)[1].rstrip("]"))


def _activity(
    facts: ModelFacts,
    *,
    name: str,
    taps: frozenset[str] | set[str],
    micro_batch: int,
    attention: str,
    head_tap_bytes: dict[str, int],
    batch_factor: int = 1,
) -> ModelActivity:
    """One model's activity for a micro-batch, with the given taps placed where they are produced."""
    b = micro_batch
    saved_kinds = set(facts.saved_kinds.get(attention, ()))
    layer_taps: list[list[tuple[str, int, bool]]] = [[] for _ in range(facts.layers)]
    embed_taps: list[tuple[str, int, bool]] = []
    head_taps: list[tuple[str, int, bool]] = []
    for tap in sorted(taps):
        kind = _tap_kind(tap)
        if kind == "topk":
            continue  # a stored output of the offline teacher pass, never produced by a forward here
        if kind in ("final", "logits"):
            head_taps.append((tap, head_tap_bytes.get(tap, facts.tap_bytes.get(kind, 0) * b), True))
            continue
        if kind == "emb":
            embed_taps.append((tap, facts.tap_bytes.get("emb", 0) * b, True))
            continue
        if kind == "topk":  # a stored teacher output read from disk (offline pass), not made by this forward
            continue
        index = _tap_index(tap)
        size = facts.tap_bytes.get(kind, 0) * b
        if kind == "hidden":
            if index == 0:
                embed_taps.append((tap, size, True))
            else:
                layer_taps[min(index - 1, facts.layers - 1)].append((tap, size, True))
        else:
            layer_taps[min(index, facts.layers - 1)].append((tap, size, kind in saved_kinds))
    return ModelActivity(
        name=name,
        layers=facts.layers,
        saved=facts.saved[attention] * b,
        checkpoint=facts.checkpoint * b,
        # Tensor parallel: the teacher runs t ranks' micro-batches together, heads and FFN split t ways, so a
        # layer's working set per GPU stays that of one micro-batch; the hidden stream is replicated (x t).
        forward_workspace=facts.forward_workspace[attention] * b,
        backward_workspace=facts.backward_workspace[attention] * b,
        embed_saved=facts.embed_saved * b,
        hidden_bytes=facts.hidden * facts.seq_len * BYTES_BF16 * b * batch_factor,
        layer_taps=tuple(tuple(x) for x in layer_taps),
        embed_taps=tuple(embed_taps),
        head_taps=tuple(head_taps),
    )


@dataclass(frozen=True, kw_only=True)
class WorkloadInfo:
    """Byproducts of building a workload that the plan reports."""

    host_bytes: int
    disk_bytes: int
    tap_costs: tuple[TapCost, ...]
    topk_bytes: int


def resident_tensors(
    *,
    config: Config,
    student: ModelFacts,
    teachers: tuple[ModelFacts, ...],
    resolved: Any,
    strategy: Strategy,
) -> tuple[tuple[TensorAlloc, ...], int]:
    """What stays on each GPU for the whole step (student model states, DeepSpeed buffers, online teachers'
    weights) and the host bytes per node that goes with it. Cheap: the search screens candidates with it."""
    hw, tr = config.hardware, config.training
    placement = strategy.teacher_placement
    online = placement != "offline"
    trainable = student.params + resolved.num_extra_parameters
    ds = effective_deepspeed(config.deepspeed, trainable)
    states = student_model_states(
        params=trainable,
        largest_module=student.largest_module,
        gpus=hw.gpus,
        gpus_per_node=hw.local_gpus,
        stage=strategy.student_zero_stage,
        offload=strategy.student_offload,
        optimizer=tr.optimizer,
    )
    static = [
        TensorAlloc(name="student.parameters", bytes=states.parameters, category="parameters"),
        TensorAlloc(name="student.gradients", bytes=states.gradients, category="gradients"),
        TensorAlloc(name="student.optimizer", bytes=states.optimizer, category="optimizer"),
        TensorAlloc(
            name="student.buckets",
            category="buffers",
            bytes=deepspeed_buffers(
                stage=strategy.student_zero_stage, offload=strategy.student_offload, ds=ds
            ),
        ),
    ]
    host = states.host_bytes
    for ti, t in enumerate(teachers):
        r = teacher_residency(
            params=t.params,
            largest_module=t.largest_module,
            persistent_params=t.persistent_params,
            placement=placement,
            gpus=hw.gpus,
            gpus_per_node=hw.local_gpus,
            tensor_parallel=strategy.tensor_parallel,
            ds=effective_deepspeed(config.deepspeed, t.params),
        )
        if online:
            static.append(
                TensorAlloc(name=f"teacher{ti}.parameters", bytes=r.parameters, category="parameters")
            )
            if r.buffers:
                static.append(TensorAlloc(name=f"teacher{ti}.prefetch", bytes=r.buffers, category="buffers"))
            host += r.host_bytes
    return tuple(static), host


def build_workload(
    *,
    config: Config,
    student: ModelFacts,
    teachers: tuple[ModelFacts, ...],
    resolved: Any,
    strategy: Strategy,
) -> tuple[Workload, WorkloadInfo]:
    """The Workload (see gkd.planner.schedule) of one candidate strategy, and what the report needs."""
    hw, tr = config.hardware, config.training
    b, seq = strategy.micro_batch, tr.seq_len
    tokens = b * seq
    placement = strategy.teacher_placement
    online = placement != "offline"
    static, host = resident_tensors(
        config=config, student=student, teachers=teachers, resolved=resolved, strategy=strategy
    )

    # Logit loss workspace (see the module docstring).
    has_logit_terms = any(  # a stored top-k tap (topk_kl) is a logit loss against the offline teacher
        any(x.endswith((":logits", ":topk")) for x in term.taps) for term in resolved.loss_terms
    )
    plain_hard = any(t.hard and t.kernel == "torch" and "s:logits" in t.taps for t in resolved.loss_terms)
    s_h, s_v = student.hidden, student.vocab
    head_tap_bytes: dict[str, dict[str, int]] = {}
    retained = transient = backward = 0
    topk_bytes = 0
    grads_in_forward = tokens * s_h * BYTES_BF16 + s_v * s_h * BYTES_BF16  # d hidden, d head weight
    # One (chunk x V) fp32 logits buffer: chunk_rows(V) = CHUNK_ELEMENTS // V tokens, or all tokens if fewer.
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // s_v)) * s_v * 4
    if has_logit_terms:
        if not online:
            topk_bytes = tokens * (tr.offline_topk * (BYTES_BF16 + 4) + 4)
            transient = chunk
            retained = grads_in_forward
        elif strategy.loss_path == "fused_linear":
            transient = 2 * chunk
            if placement != "replicated":
                transient += max(t.head_params for t in teachers) * BYTES_BF16
            retained = grads_in_forward
            for ti, t in enumerate(teachers):
                head_tap_bytes[f"t{ti}"] = {"logits": tokens * t.hidden * BYTES_BF16}
        else:
            transient = tokens * s_v * BYTES_BF16  # the logits, dropped once the loss holds their gradient
            retained = tokens * s_v * BYTES_BF16  # kd_loss computes dL/dlogits in the forward and keeps it
            backward = tokens * s_v * BYTES_BF16
            for ti, t in enumerate(teachers):
                head_tap_bytes[f"t{ti}"] = {"logits": tokens * t.vocab * BYTES_BF16}
        if plain_hard and (strategy.loss_path != "logits" or not online):
            transient += tokens * s_v * BYTES_BF16  # the hard loss needs materialised logits
        if plain_hard:
            retained += tokens * s_v * BYTES_BF16  # cross-entropy keeps its log-softmax for backward

    attention = strategy.attention
    s_taps = set(resolved.student_taps) - {"logits"}
    s_act = _activity(
        student, name="student", taps=s_taps, micro_batch=b, attention=attention, head_tap_bytes={}
    )
    tp = strategy.tensor_parallel if placement == "tensor_parallel" else 1
    t_acts = tuple(
        _activity(
            t,
            name=f"teacher{ti}",
            taps=resolved.teacher_taps[ti],
            micro_batch=b,
            attention=attention,
            head_tap_bytes=head_tap_bytes.get(f"t{ti}", {}),
            batch_factor=tp,
        )
        for ti, t in enumerate(teachers)
    )
    terms = tuple(
        LossTerm(
            name=f"{t.method}.{t.name}",
            taps=tuple(t.taps),
            logits=any(x.endswith((":logits", ":topk")) for x in t.taps),
        )
        for t in resolved.loss_terms
    )

    # The offline teacher pass (before training): the teacher alone, sharded or streamed, writing top-k.
    offline_allocs: tuple[TensorAlloc, ...] = ()
    disk = 0
    if not online:
        disk = tr.steps * tr.global_batch * seq * (tr.offline_topk * (BYTES_BF16 + 4) + 4) // hw.nodes
        allocs = []
        for ti, t in enumerate(teachers):
            r = teacher_residency(
                params=t.params,
                largest_module=t.largest_module,
                persistent_params=t.persistent_params,
                placement=strategy.offline_teacher_placement,
                gpus=hw.gpus,
                gpus_per_node=hw.local_gpus,
                tensor_parallel=1,
                ds=effective_deepspeed(config.deepspeed, t.params),
            )
            allocs += [
                TensorAlloc(
                    name=f"offline.teacher{ti}.parameters", bytes=r.parameters, category="parameters"
                ),
                TensorAlloc(name=f"offline.teacher{ti}.prefetch", bytes=r.buffers, category="buffers"),
                TensorAlloc(
                    name=f"offline.teacher{ti}.workspace",
                    category="activations",
                    bytes=t.forward_workspace[attention] * b + t.hidden * seq * BYTES_BF16 * b,
                ),
                TensorAlloc(
                    name=f"offline.teacher{ti}.logits",
                    bytes=tokens * t.vocab * BYTES_BF16,
                    category="loss_workspace",
                ),
            ]
            if strategy.offline_teacher_placement == "zero3_offload":
                host = max(host, r.host_bytes)
        offline_allocs = tuple(allocs)

    workload = Workload(
        student=s_act,
        teachers=t_acts,
        terms=terms,
        static=static,
        logit_loss_retained=retained,
        logit_loss_transient=transient,
        logit_backward_transient=backward,
        offline_allocs=offline_allocs,
        topk_bytes=topk_bytes,
    )
    info = WorkloadInfo(
        host_bytes=host,
        disk_bytes=disk,
        topk_bytes=topk_bytes,
        tap_costs=_tap_costs(resolved, s_act, t_acts, strategy, online, topk_bytes),
    )
    return workload, info


def _tap_costs(
    resolved: Any,
    s_act: ModelActivity,
    t_acts: tuple[ModelActivity, ...],
    strategy: Strategy,
    online: bool,
    topk_bytes: int,
) -> tuple[TapCost, ...]:
    sizes: dict[str, int] = {} if online else {"t0:logits": topk_bytes, "t0:topk": topk_bytes}
    for prefix, act in [("s", s_act), *[(f"t{i}", a) for i, a in enumerate(t_acts)]]:
        for coll in (act.embed_taps, act.head_taps, *act.layer_taps):
            for n, b, _ in coll:
                sizes.setdefault(f"{prefix}:{n}", b)
    out: list[TapCost] = []
    seen: set[tuple[str, str]] = set()
    for term in resolved.loss_terms:
        for tap in term.taps:
            if (term.method, tap) in seen:
                continue
            seen.add((term.method, tap))
            side, _, name = tap.partition(":")
            model = "student" if side == "s" else f"teacher{side[1:]}"
            if name == "logits" and side == "s":
                freed = {
                    "fused_linear": "never materialised (fused-linear loss)",
                    "logits": "in loss_workspace; dL/dlogits kept until backward",
                    "topk": "never materialised (fused top-k loss)",
                }[strategy.loss_path]
            elif name == "logits":
                freed = {
                    "fused_linear": "final hidden state; freed after the loss",
                    "logits": "freed after the loss",
                    "topk": "stored top-k on disk, read per micro-batch",
                }[strategy.loss_path]
            elif name == "topk":  # the stored kind of topk_kl: always read from the offline pass's files
                freed = "stored top-k on disk, read per micro-batch"
            elif side == "s":
                freed = "with its layer's backward"
            else:
                freed = "after its loss (layerwise)" if strategy.tap_loss == "layerwise" else "after backward"
            out.append(
                TapCost(method=term.method, model=model, tap=name, bytes=sizes.get(tap, 0), freed=freed)
            )
    return tuple(out)
