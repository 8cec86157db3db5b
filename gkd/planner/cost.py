"""Step-time estimate: FLOPs at an efficiency, collectives over the interconnect, offload over the host link.

Per micro-step the teacher phase and the student phase each take the longest of their compute, their
interconnect traffic and their host-link traffic (DeepSpeed prefetches and overlaps transfers with compute, so
the slowest stream bounds the phase); once per optimizer step come the boundary collectives, the host round
trip of offloaded optimizer states and the optimizer update itself.

Rules (per GPU):
- FLOPs (Kaplan et al. 2020; Narayanan et al. 2021): forward 2 * params * tokens plus attention
  4 * b * s^2 * hidden per layer; training is 3x forward; a recomputed layer adds one layer forward. For a
  mixture-of-experts model `params` there are its active parameters (a token runs through k of each layer's
  E experts; Fedus et al. 2022), while every transfer below (ZeRO gathers, host-link streaming of offloaded
  weights, gradient collectives) moves all of them: each expert is gathered or streamed whether or not a
  token of this micro-batch is routed to it.
- Ring collectives move (N-1)/N of the buffer per GPU for all-gather and reduce-scatter, twice that for
  all-reduce. Over several nodes (hardware.gpus_per_node each) a collective is hierarchical, as NCCL runs it:
  within each node ring(g) of the buffer per GPU over the interconnect, and between nodes each GPU exchanges
  its 1/g share with its peers on the other nodes, ring(nodes) of that share, over `inter_node_bandwidth`
  (`collective`); the inter-node bytes per GPU and step are reported (`StepCost.inter_node_bytes`). Tensor
  parallelism stays within a node (gkd.planner.search), so its all-reduces never cross nodes.
  ZeRO-0/1 all-reduce gradients once per step; ZeRO-2 reduce-scatters every micro-step and
  all-gathers weights after the step; ZeRO-3 gathers weights in forward and backward and reduce-scatters
  gradients every micro-step. A ZeRO-3 teacher gathers all its weights every micro-step; a tensor-parallel
  teacher all-reduces activations twice per layer.
- Host link: offloaded teacher or student weights are read from pinned memory once per use by each GPU's
  own partition (2P/N bytes); optimizer offload moves bf16 gradients down and bf16 weights back up once per
  step and runs CPU Adam at `cpu_adam_params_per_s` per rank.
- GPU optimizer update: memory-bound, about 36 bytes read and written per local parameter at 1.5 TB/s.
- Every collective call also costs `collective_latency_s` (launch and synchronisation), which is what makes
  sharding a small model slower than replicating it: ZeRO-3 gathers each layer in forward and backward and
  reduce-scatters it (3 calls per layer per micro-step), a ZeRO-3 teacher gathers each layer once, a
  tensor-parallel teacher all-reduces twice per layer, ZeRO-2 reduces once per bucket.

- Generation (the `generation` config section, `Generation`): sampling `new` tokens after a prompt of
  seq - new runs one prompt forward, then new - 1 forwards of one token each; each of those is bound by the
  slowest of its FLOPs (2 * params * b plus attention over the cache), reading the weights from HBM once,
  and, for a sharded model, gathering them (all weights per token under ZeRO-3, plus the per-layer
  latency) or streaming them over the host link (offloaded). on_policy's student samples a `student_share`
  (lambda) of the micro-steps; sequence_kd's teacher generates once before training, counted in the step
  as one completion per trained row (its pass over the run's rows spread over the steps), with its
  placement's gathering: so a placement that fits but gathers per token loses to one that does not.
  The step's `generation` part holds both.

Not modelled: kernel launch overheads, pipeline bubbles of the teacher-then-student order (the two phases
run back to back), NCCL protocol efficiency beyond the configured bandwidth, data loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from gkd.config import HardwareConfig

HBM_BANDWIDTH = 1.5e12  # bytes/s, A100 HBM2 (used only for the optimizer update)


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the cost model needs of one model."""

    params: int
    layers: int
    hidden: int
    layer_params: int
    # Parameters a token runs through (routed experts only, gkd.planner.moe); None: all of them (dense).
    active_params: int | None = None
    active_layer_params: int | None = None

    @property
    def compute_params(self) -> int:
        return self.params if self.active_params is None else self.active_params

    @property
    def compute_layer_params(self) -> int:
        return self.layer_params if self.active_layer_params is None else self.active_layer_params


@dataclass(frozen=True, kw_only=True)
class Generation:
    """The sampling work of a generating job (see the module docstring): the share of micro-steps the
    student samples, whether the first teacher generates (sequence_kd) and under which placement, and the
    tokens sampled after each prompt."""

    student_share: float
    teacher_placement: str | None  # None: the teacher does not generate
    new: int


@dataclass(frozen=True, kw_only=True)
class StepCost:
    step_time_s: float
    tokens_per_s: float
    parts: dict[str, float]  # seconds per step, by component
    inter_node_bytes: float = 0.0  # bytes per GPU per step sent between nodes (0 on one node)
    inter_node_s: float = 0.0  # seconds of the step's collectives spent on the links between nodes


def forward_flops(m: ModelShape, batch: int, seq: int) -> float:
    return 2.0 * m.compute_params * batch * seq + 4.0 * batch * seq * seq * m.hidden * m.layers


def layer_forward_flops(m: ModelShape, batch: int, seq: int) -> float:
    return 2.0 * m.compute_layer_params * batch * seq + 4.0 * batch * seq * seq * m.hidden


def generation_seconds(
    hw: HardwareConfig, m: ModelShape, *, batch: int, seq: int, new: int, gathered: bool, streamed: bool
) -> float:
    """Seconds for `m` to sample `new` tokens after `batch` prompts of seq - new tokens (see the module
    docstring): the prompt forward, then new - 1 one-token forwards."""
    n = hw.gpus
    flops = hw.peak_flops * hw.flops_efficiency
    prompt = forward_flops(m, batch, seq - new) / flops
    token = max(
        (2.0 * m.compute_params * batch + 4.0 * batch * seq * m.hidden * m.layers) / flops,
        2.0 * m.params / HBM_BANDWIDTH,
        collective(hw, 2.0 * m.params, n) + m.layers * hw.collective_latency_s if gathered and n > 1 else 0.0,
        2.0 * m.params / n / hw.host_link_bandwidth if streamed else 0.0,
    )
    return prompt + max(new - 1, 0) * token


def ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


@dataclass
class _Traffic:
    """The inter-node share of a step's collectives, summed as `step_cost` adds them up."""

    bytes: float = 0.0
    seconds: float = 0.0


def collective(
    hw: HardwareConfig, size: float, gpus: int, traffic: _Traffic | None = None, *, times: int = 1
) -> float:
    """Seconds of `times` all-gathers or reduce-scatters (an all-reduce is two) of a `size`-byte buffer over
    `gpus` GPUs laid out node by node (hardware.gpus_per_node each), bandwidth only: ring(g) of the buffer
    per GPU within a node, then ring(nodes) of each GPU's 1/g share between nodes (see the module
    docstring). Adds the inter-node part to `traffic`."""
    local = min(gpus, hw.gpus_per_node)
    nodes = -(-gpus // hw.gpus_per_node)
    inter = times * ring(nodes) * size / local
    if traffic is not None:
        traffic.bytes += inter
        traffic.seconds += inter / hw.inter_node_bandwidth
    return times * ring(local) * size / hw.interconnect_bandwidth + inter / hw.inter_node_bandwidth


def step_cost(
    *,
    hw: HardwareConfig,
    student: ModelShape,
    student_trainable: int,
    teachers: tuple[ModelShape, ...],
    stage: int,
    offload: str,
    placement: str,
    tensor_parallel: int,
    micro_batch: int,
    grad_accum: int,
    seq: int,
    recomputed_layers: int,
    global_batch: int,
    topk_bytes_per_micro: int = 0,
    reduce_bucket: int = 500_000_000,
    generation: Generation | None = None,
) -> StepCost:
    """Seconds per optimizer step and tokens per second (see the module docstring for the rules)."""
    n = hw.gpus
    alpha = hw.collective_latency_s if n > 1 else 0.0
    flops = hw.peak_flops * hw.flops_efficiency
    bw, host = hw.interconnect_bandwidth, hw.host_link_bandwidth
    b = micro_batch
    p_s = 2.0 * student_trainable  # bf16 bytes of the student (and extras)

    per_micro = _Traffic()  # the inter-node share of each micro-step's collectives

    # Teacher phase, per micro-step.
    t_compute = t_comm = t_host = 0.0
    if placement != "offline":
        for t in teachers:
            t_compute += forward_flops(t, b, seq) / flops
            if placement in ("zero3", "zero3_offload"):
                t_comm += collective(hw, 2.0 * t.params, n, per_micro) + t.layers * alpha
            if placement == "zero3_offload":
                t_host += 2.0 * t.params / n / host
            if placement == "tensor_parallel":
                tp = tensor_parallel
                t_comm += t.layers * 2 * (2 * ring(tp) * (tp * b * seq * t.hidden * 2) / bw + alpha)
    else:
        t_host += topk_bytes_per_micro / (hw.disk_bandwidth / hw.local_gpus)
    teacher_phase = max(t_compute, t_comm, t_host)

    # Student phase, per micro-step.
    s_compute = 3.0 * forward_flops(student, b, seq) / flops
    s_compute += recomputed_layers * layer_forward_flops(student, b, seq) / flops
    s_comm = s_host = 0.0
    buckets = max(1, round(p_s / 2 / reduce_bucket))
    if stage == 2:
        s_comm += collective(hw, p_s, n, per_micro) + buckets * alpha
    if stage == 3:
        s_comm += collective(hw, p_s, n, per_micro, times=3) + 3 * student.layers * alpha
    if offload == "optimizer+parameters":
        s_host += 2.0 * p_s / n / host
    if offload != "none":
        s_host += p_s / n / host  # gradients of this micro-step to the host accumulator
    student_phase = max(s_compute, s_comm, s_host)

    # Once per step.
    boundary = 0.0
    once = _Traffic()
    if stage in (0, 1):
        boundary += collective(hw, p_s, n, once, times=2) + buckets * alpha
    if stage in (1, 2) and offload == "none":
        boundary += collective(hw, p_s, n, once)
    local = student_trainable / (n if stage >= 1 else 1)
    if offload != "none":
        optimizer = local / hw.cpu_adam_params_per_s + p_s / n / host
    else:
        optimizer = 36.0 * local / HBM_BANDWIDTH

    parts = {
        "teacher_compute": grad_accum * t_compute,
        "teacher_transfer": grad_accum * max(t_comm, t_host),
        "student_compute": grad_accum * s_compute,
        "student_transfer": grad_accum * max(s_comm, s_host),
        "boundary_collectives": boundary,
        "optimizer": optimizer,
    }
    step = grad_accum * (teacher_phase + student_phase) + boundary + optimizer
    if generation is not None:
        g = generation
        sample = generation_seconds(
            hw,
            student,
            batch=b,
            seq=seq,
            new=g.new,
            gathered=stage == 3,
            streamed=offload == "optimizer+parameters",
        )
        per_micro_gen = g.student_share * sample
        if g.teacher_placement is not None and teachers:
            per_micro_gen += generation_seconds(
                hw,
                teachers[0],
                batch=b,
                seq=seq,
                new=g.new,
                gathered=g.teacher_placement in ("zero3", "zero3_offload"),
                streamed=g.teacher_placement == "zero3_offload",
            )
        parts["generation"] = grad_accum * per_micro_gen
        step += parts["generation"]
    return StepCost(
        step_time_s=step,
        tokens_per_s=global_batch * seq / step if step > 0 else 0.0,
        parts=parts,
        inter_node_bytes=grad_accum * per_micro.bytes + once.bytes,
        inter_node_s=grad_accum * per_micro.seconds + once.seconds,
    )


def bottleneck(parts: dict[str, float]) -> str:
    """The component that costs the most, in words."""
    name = max(parts, key=lambda k: parts[k])
    return f"{name.replace('_', ' ')} {parts[name]:.2f} s"
