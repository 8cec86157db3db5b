"""Analysis: the bytes of one training step, per model and per category, for a given strategy.

From the model facts (`gkd.planner.facts`: parameter counts and per-layer activation bytes from the traced
graph) and the resolved methods, `build_workload` gives, for one candidate strategy, the resident tensors
(model states, teacher weights, DeepSpeed buffers: `resident_tensors`) and each model's activity scaled to
the micro-batch (activations are linear in the batch: every activation tensor has a leading batch
dimension), the loss terms with their taps, and the loss workspace of the logit loss on the chosen path. The
schedule (`gkd.planner.schedule`) turns that into operations and lifetimes.

Loss workspace rules (bytes, tokens = micro_batch x seq, V the vocabulary, h the hidden size):
- fused_linear (student hidden + LM-head weight, `gkd.kernels.fused_linear_kd_loss`): two (chunk x V) fp32
  logits buffers while running (student and teacher; chunk = CHUNK_ELEMENTS // V tokens, or all tokens when
  fewer, as `gkd.kernels.fused_linear.chunk_rows`); kept until backward: the
  gradients of the student hidden (tokens x h) and of the head weight (V x h), bf16, computed in the forward.
  A teacher whose head is not resident (ZeRO-3, offload, tensor parallel) has its head weight gathered for the
  loss (V x h_t, bf16, transient). The teacher's side is its final hidden state (tokens x h_t).
- logits (`gkd.kernels.kd_loss`): the student logits (tokens x V, bf16) while the loss runs; it computes
  dL/dlogits in the forward and keeps that (tokens x V) until backward; teacher logits are a tap freed after
  the loss. A hard loss in plain torch (cross-entropy) keeps its log-softmax (tokens x V) as well.
- topk (offline teacher, `fused_linear_topk_kd_loss`): one (chunk x V) buffer and the same gradients as
  fused_linear, plus the stored top-k (k bf16 log-probs, k int32 indices, one fp32 tail mass per token) loaded
  per micro-batch. A logit term without a fused-linear form (kd's soft loss) runs the methods' torch top-k KL
  on materialised logits instead (`gkd.methods.divergence.topk_kl_rows`, on every device): the logits (bf16)
  and `TOPK_TORCH_SAVED` fp32 (tokens x V) tensors kept until backward, `TOPK_TORCH_FORWARD` more while it
  runs, `TOPK_TORCH_BACKWARD` in its own backward (before the head's, which then holds the logits' gradient;
  `gkd.planner.memory`).

CPU processes (`hardware.device: cpu`, set by `gkd run` without CUDA) run the kernels' torch paths, so a CPU
plan counts those (`gkd.planner.memory`'s CPU rules): the (chunk x V) logits chunks in the 16-bit dtype rather
than fp32, plus `KD_CPU_LIVE_TILES` fp32 tiles of the divergence on the plain and fused paths; offloaded
student states and a zero3_offload teacher's partitions in the process's own memory (as without offload); no
reserve (`reserve_bytes`); MiniLMv2's relation term allocates the relation kernel's torch-path score tiles
and operand copies while it runs (`gkd.planner.cpu_relation`, a transient of its op). Not modelled on the CPU:
the other relation methods' tiles and other divergences' extra temporaries (`benchmarks/plan_accuracy.py`
measures what this leaves out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gkd.config import Config
from gkd.planner.cpu_relation import relation_cpu_workspace
from gkd.planner.facts import ModelFacts
from gkd.planner.memory import (
    BYTES_BF16,
    KD_CPU_LIVE_TILES,
    TOPK_TORCH_BACKWARD,
    TOPK_TORCH_FORWARD,
    TOPK_TORCH_SAVED,
    HostMemory,
    ModelLoad,
    cpu_chunk_rows,
    deepspeed_buffers,
    effective_deepspeed,
    host_memory,
    kd_cpu_tile_bytes,
    student_model_states,
    student_states_on,
    teacher_placement_on,
    teacher_residency,
    zero3_gather_buffer_bytes,
    zero3_gathered_bytes,
)
from gkd.planner.plan import Strategy, TapCost, TensorAlloc
from gkd.planner.schedule import Generation, LossTerm, ModelActivity, Workload

# Elements of one (chunk x V) fp32 logits buffer of the fused-linear kernels (gkd.kernels.fused_linear).
CHUNK_ELEMENTS = 1 << 25


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


def is_logit_term(term: Any) -> bool:
    """Whether a loss term is the logit loss: it reads logits or a stored top-k (topk_kl, against the offline
    teacher), or it is a divergence on the final hidden states, the fused-linear form of a logit term (the
    methods resolve logit terms that way when the plan takes the fused-linear path)."""
    if any(x.endswith((":logits", ":topk")) for x in term.taps):
        return True
    return term.kernel == "kd_loss" and "s:final" in term.taps


@dataclass(frozen=True, kw_only=True)
class WorkloadInfo:
    """Byproducts of building a workload that the plan reports."""

    host_bytes: int  # host.peak
    host: HostMemory
    disk_bytes: int
    tap_costs: tuple[TapCost, ...]
    topk_bytes: int


def _residency(teacher: Any, config: Any, placement: str, tensor_parallel: int) -> Any:
    """Teacher `teacher`'s residency under `placement` on the config's hardware (device and host sides)."""
    hw = config.hardware
    return teacher_residency(
        params=teacher.params,
        largest_module=teacher.largest_module,
        persistent_params=teacher.persistent_params,
        placement=placement,
        gpus=hw.gpus,
        gpus_per_node=hw.local_gpus,
        tensor_parallel=tensor_parallel,
        ds=effective_deepspeed(config.deepspeed, teacher.params),
    )


def resident_tensors(
    *,
    config: Config,
    student: ModelFacts,
    teachers: tuple[ModelFacts, ...],
    resolved: Any,
    strategy: Strategy,
) -> tuple[tuple[TensorAlloc, ...], int]:
    """What stays on each GPU for the whole step (student model states, DeepSpeed buffers, online teachers'
    weights) and the host bytes per node that goes with it (the largest of the steady state, the load and the
    final save: `host_parts`). Cheap: the search screens candidates with it."""
    hw, tr = config.hardware, config.training
    placement = teacher_placement_on(hw.device, strategy.teacher_placement)
    online = placement != "offline"
    trainable = student.params + resolved.num_extra_parameters
    ds = effective_deepspeed(config.deepspeed, trainable)
    states = student_model_states(
        params=trainable,
        largest_module=student.largest_module,
        gpus=hw.gpus,
        gpus_per_node=hw.local_gpus,
        stage=strategy.student_zero_stage,
        offload=student_states_on(hw.device, strategy.student_offload),
        optimizer=tr.optimizer,
    )
    parameters, gather_buffer = states.parameters, 0
    if strategy.student_zero_stage == 3:
        # DeepSpeed gathers a ZeRO-3 student ahead as it does a teacher (up to max-live plus the running
        # module), not one module at a time as its estimator's 2L assumes; with the prefetch group's
        # all-gather buffer (gkd.planner.memory.zero3_gathered_bytes, zero3_gather_buffer_bytes).
        gathered = zero3_gathered_bytes(trainable, student.largest_module, student.persistent_params, ds)
        parameters += gathered - 2 * student.largest_module
        gather_buffer = zero3_gather_buffer_bytes(trainable, student.persistent_params, ds)
    static = [
        TensorAlloc(name="student.parameters", bytes=parameters, category="parameters"),
        TensorAlloc(name="student.gradients", bytes=states.gradients, category="gradients"),
        TensorAlloc(name="student.optimizer", bytes=states.optimizer, category="optimizer"),
        TensorAlloc(
            name="student.buckets",
            category="buffers",
            bytes=deepspeed_buffers(
                stage=strategy.student_zero_stage,
                offload=strategy.student_offload,
                ds=ds,
                gather_buffer=gather_buffer,
            ),
        ),
    ]
    if hw.device == "cpu" and strategy.student_offload != "none":
        # An offloaded optimizer's fp32 gradient partition, allocated with the engine and kept for the whole
        # run (DeepSpeed: stage3.py grad_partitions_flat_buffer, stage_1_and_2.py
        # initialize_optimizer_states); on a GPU it is host memory (in the offload's host bytes), on the CPU
        # the process's own.
        grads = 4 * trainable // hw.gpus
        static.append(TensorAlloc(name="student.offload_gradients", bytes=grads, category="gradients"))
    if hw.device == "cpu" and strategy.student_zero_stage == 3:
        # A CPU plan moves the student's gradients and buckets to the backward (`build_workload`), but ZeRO-3
        # allocates two of them with its engine and keeps them (stage3.py; GKD_MEASURE=sites shows both alive
        # in the forward): the reduction bucket (contiguous_gradients) and, without offload, the gradient
        # partitions in bf16 (grad_partitions_flat_buffer; offloaded, it is the fp32 one above).
        kept = {
            "student.buckets": ("student.reduce_bucket", ds.reduce_bucket_size * BYTES_BF16),
            "student.gradients": (
                "student.gradient_partitions",
                2 * trainable // hw.gpus if strategy.student_offload == "none" else 0,
            ),
        }
        for i, alloc in enumerate(list(static)):
            if alloc.name in kept and kept[alloc.name][1]:
                name, size = kept[alloc.name]
                size = min(size, alloc.bytes)
                static[i] = TensorAlloc(name=alloc.name, bytes=alloc.bytes - size, category=alloc.category)
                static.append(TensorAlloc(name=name, bytes=size, category=alloc.category))
    for ti, t in enumerate(teachers):
        r = _residency(t, config, placement, strategy.tensor_parallel)
        if online:
            static.append(
                TensorAlloc(name=f"teacher{ti}.parameters", bytes=r.parameters, category="parameters")
            )
            if r.buffers:
                static.append(TensorAlloc(name=f"teacher{ti}.prefetch", bytes=r.buffers, category="buffers"))
    host = host_parts(config=config, student=student, teachers=teachers, resolved=resolved, strategy=strategy)
    return tuple(static), host.peak


# The runtime's way of building each model (gkd.runtime.engines.build_models, gkd.runtime.loading).
_LOAD_HOW = {
    "replicated": "device",
    "zero3": "partitioned",
    "zero3_offload": "partitioned",
    # Built on meta and split empty by AutoTP, each rank filling its slices on its device from the files
    # (gkd.runtime.tensor_parallel.build_tensor_parallel): one tensor staged at a time, as "device".
    "tensor_parallel": "device",
}


def host_parts(
    *,
    config: Config,
    student: ModelFacts,
    teachers: tuple[ModelFacts, ...],
    resolved: Any,
    strategy: Strategy,
) -> HostMemory:
    """Host bytes per node (gkd.planner.memory.host_memory): the steady state (offloaded student states,
    host-resident teacher partitions; during an offline teacher pass the teacher's instead, which the pass
    frees before training), the load of the student then each teacher as the runtime builds them, and the
    final save."""
    hw, tr = config.hardware, config.training
    trainable = student.params + resolved.num_extra_parameters
    states = student_model_states(
        params=trainable,
        largest_module=student.largest_module,
        gpus=hw.gpus,
        gpus_per_node=hw.local_gpus,
        stage=strategy.student_zero_stage,
        offload=student_states_on(hw.device, strategy.student_offload),
        optimizer=tr.optimizer,
    )
    offline = strategy.teacher_placement == "offline"
    # An offline teacher is built (as its pass places it) with the others, before the pass.
    placement = teacher_placement_on(
        hw.device,
        (strategy.offline_teacher_placement or "replicated") if offline else strategy.teacher_placement,
    )
    loads = [
        ModelLoad(
            params=student.params,
            largest_module=student.largest_module,
            how="partitioned" if strategy.student_zero_stage == 3 else "device",
        )
    ]
    steady = states.host_bytes
    for t in teachers:
        r = _residency(t, config, placement, strategy.tensor_parallel)
        loads.append(
            ModelLoad(
                params=t.params,
                largest_module=t.largest_module,
                how=_LOAD_HOW[placement],
                resident=r.host_bytes,
            )
        )
        steady = max(steady, r.host_bytes) if offline else steady + r.host_bytes
    return host_memory(
        steady=steady,
        loads=tuple(loads),
        student_params=student.params,
        student_largest_module=student.largest_module,
        gpus=hw.gpus,
        gpus_per_node=hw.local_gpus,
    )


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
    has_logit_terms = any(is_logit_term(term) for term in resolved.loss_terms)
    plain_hard = any(t.hard and t.kernel == "torch" and "s:logits" in t.taps for t in resolved.loss_terms)
    s_h, s_v = student.hidden, student.vocab
    head_tap_bytes: dict[str, dict[str, int]] = {}
    retained = transient = backward = loss_backward = 0
    topk_bytes = 0
    grads_in_forward = tokens * s_h * BYTES_BF16 + s_v * s_h * BYTES_BF16  # d hidden, d head weight
    # One (chunk x V) fp32 logits buffer: chunk_rows(V) = CHUNK_ELEMENTS // V tokens, or all tokens if fewer.
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // s_v)) * s_v * 4
    cpu = hw.device == "cpu"
    if cpu:
        # The torch paths: (chunk x V) logits in the 16-bit dtype, and the divergence's fp32 tiles on them.
        c_rows = min(tokens, cpu_chunk_rows(s_v))
        chunk = c_rows * s_v * BYTES_BF16
        kd_tiles = KD_CPU_LIVE_TILES * kd_cpu_tile_bytes(c_rows, s_v)
    if has_logit_terms:
        if not online:
            topk_bytes = tokens * (tr.offline_topk * (BYTES_BF16 + 4) + 4)
            if resolved.fused_linear:
                transient = chunk
                retained = grads_in_forward
            else:
                # A logit term without a fused-linear form reads the stored top-k on materialised logits
                # (`topk_kl_rows`): the logits, kept until backward, and its fp32 (tokens x V) tensors.
                fp32_logits = tokens * s_v * 4
                retained = tokens * s_v * BYTES_BF16 + TOPK_TORCH_SAVED * fp32_logits
                transient = TOPK_TORCH_FORWARD * fp32_logits
                loss_backward = TOPK_TORCH_BACKWARD * fp32_logits
                backward = tokens * s_v * BYTES_BF16  # then the logits' gradient, through the head
        elif strategy.loss_path == "fused_linear":
            transient = 2 * chunk + (kd_tiles if cpu else 0)
            if placement != "replicated":
                transient += max(t.head_params for t in teachers) * BYTES_BF16
            retained = grads_in_forward
            for ti, t in enumerate(teachers):
                head_tap_bytes[f"t{ti}"] = {"logits": tokens * t.hidden * BYTES_BF16}
        else:
            transient = tokens * s_v * BYTES_BF16  # the logits, dropped once the loss holds their gradient
            if cpu:
                transient += KD_CPU_LIVE_TILES * kd_cpu_tile_bytes(tokens, s_v)
            retained = tokens * s_v * BYTES_BF16  # kd_loss computes dL/dlogits in the forward and keeps it
            backward = tokens * s_v * BYTES_BF16
            for ti, t in enumerate(teachers):
                head_tap_bytes[f"t{ti}"] = {"logits": tokens * t.vocab * BYTES_BF16}
        materialised = (online and strategy.loss_path == "logits") or not (online or resolved.fused_linear)
        if plain_hard and not materialised:
            transient += tokens * s_v * BYTES_BF16  # the hard loss needs materialised logits
        if plain_hard:
            retained += tokens * s_v * BYTES_BF16  # cross_entropy_loss keeps its gradient (logits dtype)

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
            logits=is_logit_term(t),
            # The relation kernel's torch path (CPU) builds its score tiles in memory (cpu_relation).
            workspace=relation_cpu_workspace(t, student, teachers, micro_batch=b, seq=seq) if cpu else 0,
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
            r = _residency(t, config, strategy.offline_teacher_placement, 1)
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
        offline_allocs = tuple(allocs)

    generation = _generation(config, student, teachers, strategy, offline_allocs)

    backward_allocs: tuple[TensorAlloc, ...] = ()
    if hw.device == "cpu" and strategy.grad_accum == 1:
        # Measured on CPU runs (gkd.runtime.memory): DeepSpeed creates the student's gradients and reduction
        # buckets in the backward and frees them after the optimizer step, so they are not alive during the
        # forward, where a small job peaks. With several micro-batches they live across them: kept static.
        moved = {"student.gradients", "student.buckets"}
        backward_allocs = tuple(a for a in static if a.name in moved)
        static = tuple(a for a in static if a.name not in moved)
    workload = Workload(
        student=s_act,
        teachers=t_acts,
        terms=terms,
        static=static,
        logit_loss_retained=retained,
        logit_loss_transient=transient,
        logit_backward_transient=backward,
        loss_backward_transient=loss_backward,
        offline_allocs=offline_allocs,
        topk_bytes=topk_bytes,
        backward_allocs=backward_allocs,
        generation=generation,
    )
    parts = host_parts(
        config=config, student=student, teachers=teachers, resolved=resolved, strategy=strategy
    )
    assert parts.peak == host
    info = WorkloadInfo(
        host_bytes=host,
        host=parts,
        disk_bytes=disk,
        topk_bytes=topk_bytes,
        tap_costs=_tap_costs(resolved, s_act, t_acts, strategy, online, topk_bytes),
    )
    return workload, info


def kv_cache_bytes(facts: ModelFacts, micro_batch: int, positions: int) -> int:
    """The key/value cache of `micro_batch` rows of `positions` tokens: every layer's k and v, (B, kv_heads,
    T, head_dim) each in the 16-bit dtype, as the `k` tap has them (hidden x T when the facts lack it)."""
    per_token = facts.tap_bytes.get("k", facts.hidden * facts.seq_len * BYTES_BF16) / facts.seq_len
    return int(2 * facts.layers * per_token * positions * micro_batch)


def generation_allocs(
    facts: ModelFacts, name: str, *, micro_batch: int, seq: int, new: int, attention: str
) -> tuple[TensorAlloc, ...]:
    """What a model holds while it samples `new` tokens for `micro_batch` prompts of up to `seq - new` tokens
    (gkd.runtime.generation.sample): its key/value cache of up to `seq` positions; the prompt forward's
    logits (the model returns them for every prompt position, in the 16-bit dtype); one no-grad layer's
    workspace and the hidden stream of that forward, which is the largest (the later forwards are of one
    token). The parameters it runs with are the training's (a ZeRO-3 model gathers them as its training
    forward does: the static parameters and gather buffers)."""
    prompt = micro_batch * (seq - new)
    return (
        TensorAlloc(
            name=f"{name}.kv_cache", bytes=kv_cache_bytes(facts, micro_batch, seq), category="activations"
        ),
        TensorAlloc(
            name=f"{name}.prompt_logits", bytes=prompt * facts.vocab * BYTES_BF16, category="loss_workspace"
        ),
        TensorAlloc(
            name=f"{name}.workspace",
            category="activations",
            bytes=facts.forward_workspace[attention] * micro_batch + prompt * facts.hidden * BYTES_BF16,
        ),
    )


def _generation(
    config: Config,
    student: ModelFacts,
    teachers: tuple[ModelFacts, ...],
    strategy: Strategy,
    offline_allocs: tuple[TensorAlloc, ...],
) -> tuple[Generation, ...]:
    """The generate ops of the config's generation section (gkd.planner.schedule.Generation)."""
    g = config.generation
    if g.mode == "off" or not teachers:
        return ()
    kw = {
        "micro_batch": strategy.micro_batch,
        "seq": config.training.seq_len,
        "new": g.max_new_tokens,
        "attention": strategy.attention,
    }
    out = []
    if g.mode == "sequence_kd":
        allocs = generation_allocs(teachers[0], "generate.teacher0", **kw)
        if strategy.teacher_placement == "offline":
            # The pass's placement of the teacher, held as the top-k pass holds it.
            held = tuple(
                a
                for a in offline_allocs
                if a.name in ("offline.teacher0.parameters", "offline.teacher0.prefetch")
            )
            out.append(Generation(model="teacher0", phase="offline", allocs=held + allocs))
        else:
            out.append(Generation(model="teacher0", phase="before", allocs=allocs))
    if g.mode == "on_policy" or (g.fraction or 0) > 0:
        out.append(
            Generation(
                model="student", phase="micro", allocs=generation_allocs(student, "generate.student", **kw)
            )
        )
    return tuple(out)


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
