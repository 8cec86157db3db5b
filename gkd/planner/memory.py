"""Resident memory per GPU and on the host: model states, teacher placement, DeepSpeed buffers, reserve.

These are the bytes that exist for the whole step (the schedule adds activations, taps and loss workspace on
top). All functions are pure arithmetic on counts, so the planner runs without torch.

Student model states follow DeepSpeed's own estimators (ZeRO paper, Rajbhandari et al. 2020; the functions
`estimate_zero2_model_states_mem_needs` in deepspeed/runtime/zero/stage_1_and_2.py and
`estimate_zero3_model_states_mem_needs` in stage3.py), split into categories, with P parameters, N GPUs and
L the parameters of the largest single module (what DeepSpeed's `model_to_params` calls the largest layer):

| stage | offload | GPU bytes | host bytes (per node) |
|---|---|---|---|
| 0 | none | 2P + (2 + 4 + 4 + s)P | 0 |
| 1 | none | 2P + 2P + (4 + 4 + s)P/N | 0 |
| 2 | none | 2P + (2 + 4 + 4 + s)P/N | 0 |
| 1, 2 | optimizer | 2P | P * max(4N, 16) * 1.5 |
| 3 | none | 4L + (2 + 4 + 4 + s)P/N | 0 |
| 3 | optimizer | 4L + 2P/N | 16P * 1.5 |
| 3 | optimizer+parameters | 4L | 18P * 1.5 |

s is the optimizer state bytes per parameter (8 for Adam: momentum and variance in fp32); DeepSpeed's
estimators assume Adam. 2 bf16 weights, 2 bf16 grads, 4 fp32 grads, 4 fp32 master weights. In ZeRO-3, 4L is
the gathered bf16 weight and gradient of the largest module; the plan counts the gathered weights as
DeepSpeed holds them (`zero3_gathered_bytes`: max-live plus the largest module) in place of the first 2L,
and the all-gather buffer with the buffers (`deepspeed_buffers`). The host columns are DeepSpeed's
(including its 1.5 buffer factor); without offload DeepSpeed's estimator reports the host memory needed to
*load* the model whole, which gkd never needs (`gkd.runtime.loading` builds models under zero.Init or on
the meta device and fills them tensor by tensor), so the steady state is 0; what loading and the final
save do hold on the host is counted apart (`host_memory`, at the end of this file).
DeepSpeed's ZeRO-3 estimator without offload omits the bf16 weight partition (2P/N) that stage 3 keeps, and
counts 4P/N of fp32 gradients that stage 3 does not keep. Measured (benchmarks/bench_zero3_states.py, 2 CPU
processes, bf16, torch AdamW; stage3.py's code, the same on CUDA), a rank holds 16P/N between steps and
through the forward and backward: 2 bf16 weight partition (`defragment`), 2 bf16 gradient partition
(`grad_partitions_flat_buffer`, in the model dtype since gkd sets no grad_accum_dtype), 4 fp32 master, 8 Adam
moments. The fp32 gradient exists only inside the optimizer step, one sub-group at a time
(`_prepare_fp32_grad_for_sub_group`, freed by `_release_sub_group`): with G = min(sub_group_size, P/N)
elements (gkd leaves sub_group_size at DeepSpeed's 1e9), the step peaks at 16P/N + 4G + the optimizer's
temporaries (torch's Adam: 8G on its single-tensor path, the CPU default, 28.02 P/N measured with G = P/N;
4G on its foreach path, the CUDA default, 24.02 P/N measured with --foreach), while the activations are
gone. gkd keeps the estimator's 18P/N for every phase: it over-counts the forward and backward by 2P/N and
leaves the step to the margin. For the headline job the step is not the peak (16P/N + 8G with the teacher
and buffers, 34.44 GiB with the reserve, under the planned 39.05 GiB); a job whose activations are small
beside 6G could peak in the step above the plan.

Not modelled: partition padding (at most N-1 elements per tensor), the fp32 copy DeepSpeed keeps of
tensors below the persistence threshold, NCCL's own buffers (inside the CUDA-context reserve).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from gkd.config import OPTIMIZERS, DeepSpeedSettings, HardwareConfig

BYTES_BF16 = 2
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor
# The final save (gkd.runtime.save) writes the student in safetensors shards of at most this many bytes,
# gathered to rank 0 one module at a time: rank 0's host holds at most one shard (plus the module being
# gathered), whatever the student's size. The plan's host memory counts this save peak.
SAVE_SHARD_BYTES = 2 << 30


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Student model states: per-GPU bytes by category, and host bytes per node."""

    parameters: int
    gradients: int
    optimizer: int
    host_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def student_model_states(
    *,
    params: int,
    largest_module: int,
    gpus: int,
    gpus_per_node: int,
    stage: int,
    offload: str,
    optimizer: str = "adamw",
) -> ModelStates:
    """Per-GPU and host bytes of the student's weights, gradients and optimizer states (table above)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if offload not in ("none", "optimizer", "optimizer+parameters"):
        raise ValueError(f"unknown offload {offload!r}")
    if offload == "optimizer+parameters" and stage != 3:
        raise ValueError("parameter offload needs ZeRO-3")
    if offload != "none" and stage == 0:
        raise ValueError("offload needs ZeRO stage >= 1")
    p, n = params, gpus
    nodes = max(1, gpus // gpus_per_node)
    state = OPTIMIZERS[optimizer]
    opt_bytes = 4 + state  # fp32 master + moments
    if stage == 0:
        return ModelStates(parameters=2 * p, gradients=6 * p, optimizer=opt_bytes * p, host_bytes=0)
    if stage in (1, 2) and offload == "optimizer":
        host = int(p * max(4 * n, 16) * HOST_BUFFER_FACTOR)
        return ModelStates(parameters=2 * p, gradients=0, optimizer=0, host_bytes=host)
    if stage == 1:
        return ModelStates(
            parameters=2 * p, gradients=2 * p + 4 * p // n, optimizer=opt_bytes * p // n, host_bytes=0
        )
    if stage == 2:
        return ModelStates(parameters=2 * p, gradients=6 * p // n, optimizer=opt_bytes * p // n, host_bytes=0)
    big = 2 * largest_module  # one gathered bf16 copy of the largest module (weights; grads likewise)
    if offload == "none":
        # DeepSpeed's estimator counts 18P/N here; stage 3 keeps 16P/N (2 bf16 weights, 2 bf16 grads, 4 fp32
        # weights, 8 Adam) plus fp32 grads one sub-group at a time inside the step (see the module docstring).
        return ModelStates(
            parameters=big, gradients=6 * p // n + big, optimizer=opt_bytes * p // n, host_bytes=0
        )
    if offload == "optimizer":
        host = int(p * (2 + 2 + opt_bytes) / nodes * HOST_BUFFER_FACTOR)
        return ModelStates(parameters=2 * p // n + big, gradients=big, optimizer=0, host_bytes=host)
    host = int(p * (2 + 2 + 2 + opt_bytes) / nodes * HOST_BUFFER_FACTOR)
    return ModelStates(parameters=big, gradients=big, optimizer=0, host_bytes=host)


def zero3_gathered_bytes(
    params: int, largest_module: int, persistent_params: int, ds: DeepSpeedSettings
) -> int:
    """Bytes of a ZeRO-3 model's weights held gathered at once (bf16), for a student and a teacher, on any
    device, with `ds` the settings gkd emits (`effective_deepspeed`).

    DeepSpeed's parameter coordinator (partitioned_param_coordinator.py `fetch_sub_module`) gathers the
    running module's parameters whatever it holds, then prefetches the next ones in its recorded trace while
    it holds fewer than stage3_max_live_parameters (M), at most the prefetch bucket at a time and one
    parameter past either limit; a module's parameters are released after its forward (or backward). The
    prefetch bucket does not bound what is held: prefetched parameters stay gathered until their module
    has run, so the gathered set grows to M (measured: benchmarks/bench_zero3_gathered.py, an inference
    forward on 2 CPU processes holds M plus about one module from its second forward, whatever the
    bucket). gkd therefore emits M no larger than the prefetch bucket, and counts M plus the largest module
    (the running module, or the one parameter past M), no more than the whole model, plus the small tensors
    kept gathered (below the persistence threshold). The code path is DeepSpeed's, not the device's, so
    the rule is the same on CUDA and on CPU processes; the CPU figures are measured (bench_zero3_gathered,
    benchmarks/plan_accuracy.py), the CUDA ones not yet (benchmarks/device/gpu_run.py would).
    """
    sharded = max(params - persistent_params, 0)
    live = min(ds.stage3_max_live_parameters + largest_module, sharded)
    return (live + persistent_params) * BYTES_BF16


def zero3_gather_buffer_bytes(params: int, persistent_params: int, ds: DeepSpeedSettings) -> int:
    """Bytes of the all-gather buffer a ZeRO-3 model holds beside its gathered weights (bf16). DeepSpeed
    gathers each prefetch group into one flat buffer and copies every parameter out of it when the first is
    waited for (partition_parameters.py `_all_gather_dtype`, `AllGatherCoalescedHandle.wait`); the handle,
    and with it the buffer, lives until the group's last parameter is used. A group is at most what may be
    prefetched at once: max-live (no more than the prefetch bucket in gkd's settings), no more than the
    partitioned weights. Measured on 2 CPU processes (benchmarks/bench_zero3_gathered.py: about one bucket
    of storage beyond the gathered weights); the same code runs on CUDA."""
    sharded = max(params - persistent_params, 0)
    group = min(ds.stage3_max_live_parameters, ds.stage3_prefetch_bucket_size, sharded)
    return group * BYTES_BF16


@lru_cache(maxsize=256)
def effective_deepspeed(ds: DeepSpeedSettings, params: int) -> DeepSpeedSettings:
    """The settings gkd emits and plans with: every bucket capped at the model's parameter count (DeepSpeed
    allocates its reduction buckets at full size whatever the model, stage_1_and_2.py `setup_buckets`, so a
    bucket larger than the model only wastes memory), and stage3_max_live_parameters capped at the
    prefetch bucket: DeepSpeed keeps prefetching until it holds max-live parameters gathered, so with its
    default (1e9) a ZeRO-3 model under 1e9 parameters is gathered whole from its second forward
    (`zero3_gathered_bytes`). The cap makes the working set the bucket plus the running module, as planned;
    the price is less prefetch while a module larger than the bucket runs (raise the bucket for more, and
    the plan counts it). The emitted DeepSpeed config carries these capped values."""
    cap = max(params, 1)
    prefetch = min(ds.stage3_prefetch_bucket_size, cap)
    return replace(
        ds,
        reduce_bucket_size=min(ds.reduce_bucket_size, cap),
        allgather_bucket_size=min(ds.allgather_bucket_size, cap),
        stage3_prefetch_bucket_size=prefetch,
        stage3_max_live_parameters=min(ds.stage3_max_live_parameters, prefetch),
    )


def deepspeed_buffers(*, stage: int, offload: str, ds: DeepSpeedSettings, gather_buffer: int = 0) -> int:
    """Device bytes of DeepSpeed's buffers for the student engine (bf16 elements).

    ZeRO-0: one flattening bucket for the gradient all-reduce. ZeRO-1/2: two reduction buckets (DeepSpeed
    double-buffers them when overlap_comm is on, which gkd's config sets; `setup_buckets` in
    stage_1_and_2.py); the parameter all-gather works in place and allocates nothing. ZeRO-3: one reduction
    bucket (stage3.py) plus `gather_buffer`, the prefetch group's all-gather buffer
    (`zero3_gather_buffer_bytes`), on every device.
    """
    del offload  # the offloaded optimizer's pinned host buffers are on the host
    reduce = ds.reduce_bucket_size * BYTES_BF16
    if stage == 0:
        return reduce
    if stage in (1, 2):
        return 2 * reduce
    return reduce + gather_buffer


@dataclass(frozen=True, kw_only=True)
class TeacherResidency:
    """A teacher's resident GPU bytes (weights and gathered-weight working set), buffers, and host bytes."""

    parameters: int
    buffers: int
    host_bytes: int


def teacher_residency(
    *,
    params: int,
    largest_module: int,
    persistent_params: int,
    placement: str,
    gpus: int,
    gpus_per_node: int,
    tensor_parallel: int,
    ds: DeepSpeedSettings,
) -> TeacherResidency:
    """Resident bytes of an inference-only teacher (bf16 weights, no gradients, no optimizer).

    replicated: all weights on every GPU. tensor_parallel: weights split t ways (Megatron-style; embedding and
    head split by vocabulary). zero3: weights partitioned over N GPUs, plus the gathered working set during
    the forward (`zero3_gathered_bytes`: max-live plus the largest module, and the small tensors kept
    gathered below the persistence threshold) and the prefetch group's all-gather buffer
    (`zero3_gather_buffer_bytes`). zero3_offload: as zero3, but the partitions live in pinned host memory
    (2P bytes per node) and stream to the GPU with prefetch. offline: no teacher during training (its top-k
    outputs are read from disk).

    The working set follows DeepSpeed's code, the same on CUDA and CPU processes (measured on the CPU:
    benchmarks/bench_zero3_gathered.py, benchmarks/plan_accuracy.py); a CPU process holds a zero3_offload
    teacher's host partitions in its own memory (`teacher_placement_on`).
    """
    nodes = max(1, gpus // gpus_per_node)
    full = params * BYTES_BF16
    if placement == "replicated":
        return TeacherResidency(parameters=full, buffers=0, host_bytes=0)
    if placement == "tensor_parallel":
        return TeacherResidency(parameters=full // tensor_parallel, buffers=0, host_bytes=0)
    if placement == "offline":
        return TeacherResidency(parameters=0, buffers=0, host_bytes=0)
    gathered = zero3_gathered_bytes(params, largest_module, persistent_params, ds)
    prefetch = zero3_gather_buffer_bytes(params, persistent_params, ds)
    if placement == "zero3":
        return TeacherResidency(parameters=full // gpus + gathered, buffers=prefetch, host_bytes=0)
    if placement == "zero3_offload":
        return TeacherResidency(parameters=gathered, buffers=prefetch, host_bytes=full // nodes)
    raise ValueError(f"unknown teacher placement {placement!r}")


def reserve_bytes(allocated_peak: int, hw: HardwareConfig) -> int:
    """CUDA context and workspaces plus allocator fragmentation (a fraction of the allocated peak); none for
    CPU processes (`hardware.device: cpu`), which have no CUDA context and whose tensors are measured as
    storage bytes."""
    if hw.device == "cpu":
        return 0
    return hw.cuda_context_bytes + int(hw.fragmentation * allocated_peak)


def offline_disk_bytes(*, tokens: int, topk: int) -> int:
    """Disk for stored teacher top-k outputs: per token k bf16 log-probs, k int32 indices, and one fp32 tail
    log-mass (the probability the top-k leaves out)."""
    return tokens * (topk * (BYTES_BF16 + 4) + 4)


# ----------------------------------------------------------------------------------------------------------
# Host memory per node: the steady state, the load and the final save


@dataclass(frozen=True, kw_only=True)
class ModelLoad:
    """How one model is built and filled (`gkd.runtime.loading`), in the order the runtime builds them
    (the student, then each teacher).

    how: "partitioned" (under zero.Init, each rank filling its own slice: ZeRO-3 student, zero3 and
    zero3_offload teachers), "device" (built on meta and filled tensor by tensor onto the GPU: ZeRO-0/1/2
    student, replicated teacher, a tensor-parallel teacher's slices), "host" (whole on the host of each
    rank) or "none" (not built: an offline teacher during training).
    resident: host bytes per node the model keeps once loaded (a zero3_offload teacher's partitions; 0 else).
    """

    params: int
    largest_module: int
    how: str
    resident: int = 0


@dataclass(frozen=True, kw_only=True)
class HostMemory:
    """Host bytes per node: `steady` for the whole run, `load` the peak while building the models, `save`
    the peak of the final save on rank 0's node. The plan's host memory is the largest of the three."""

    steady: int
    load: int
    save: int

    @property
    def peak(self) -> int:
        return max(self.steady, self.load, self.save)


def load_staging_bytes(m: ModelLoad, *, gpus: int, gpus_per_node: int) -> int:
    """Host bytes per node that loading model `m` holds on top of what it keeps (weights in the 16-bit
    training dtype, the checkpoint stored in it): per rank, a partitioned model stages at most its slice of
    one tensor (a module is never larger than the largest one: L/N elements), a model filled onto the device
    one whole tensor (at most L elements), and a host-built one the whole model."""
    local = min(gpus, gpus_per_node)
    per_rank = {
        "partitioned": -(-m.largest_module // gpus),
        "device": m.largest_module,
        "host": m.params,
        "none": 0,
    }[m.how]
    return local * per_rank * BYTES_BF16


def host_memory(
    *,
    steady: int,
    loads: tuple[ModelLoad, ...],
    student_params: int,
    student_largest_module: int,
    gpus: int,
    gpus_per_node: int,
) -> HostMemory:
    """Host bytes per node (see HostMemory). `steady`: the run's host bytes (offloaded student states and
    teachers' host-resident partitions). Load: the models are built one after another, each keeping its
    `resident` bytes, so the peak is the largest of (what the models built so far keep + the staging of the
    one being filled). Save: the steady state plus rank 0's shard of the student (SAVE_SHARD_BYTES at most)
    and the module being gathered into it."""
    load = kept = 0
    for m in loads:
        kept += m.resident
        load = max(load, kept + load_staging_bytes(m, gpus=gpus, gpus_per_node=gpus_per_node))
    shard = min(student_params * BYTES_BF16, SAVE_SHARD_BYTES)
    save = steady + shard + student_largest_module * BYTES_BF16
    return HostMemory(steady=steady, load=load, save=save)


# ----------------------------------------------------------------------------------------------------------
# CPU processes (`hardware.device: cpu`): what the losses' torch code paths allocate


# The torch paths' sizes (gkd.kernels.divergence.TILE_ELEMENTS, gkd.kernels.fused_linear.CHUNK_ELEMENTS);
# copied because the planner imports no torch; tests/runtime/test_memory_measure.py checks that they match.
KD_TILE_ELEMENTS = 1 << 22
CPU_CHUNK_ELEMENTS = 1 << 25
# fp32 tiles the divergence's torch path (`_rows_torch`, the fkl form used by kd and fkl) holds at once: the
# student and teacher tiles in fp32 (scaled by 1/T), log q, log p, p, and q computed for a gradient in the
# logits' 16-bit dtype. Other divergences build a few more temporaries (not modelled).
KD_CPU_LIVE_TILES = 6


# The methods' torch top-k KL on materialised logits (`gkd.methods.divergence.topk_kl_rows`: an offline
# teacher's stored top-k read by a term that has no fused-linear form, e.g. kd's soft loss), on any device.
# Autograd saves two fp32 (tokens x V) tensors until backward: log_softmax's output and the scattered copy
# whose logsumexp gives the student's tail mass; while the forward runs one more (the scaled fp32 logits
# log_softmax reads); logsumexp's backward holds three at once (the difference from its result, its exp and
# their product with the upstream gradient).
TOPK_TORCH_SAVED = 2
TOPK_TORCH_FORWARD = 1
TOPK_TORCH_BACKWARD = 3


def kd_cpu_tile_bytes(rows: int, vocab: int) -> int:
    """Bytes of one fp32 tile of the divergence's torch path over `rows` rows of (rows x vocab) logits: row
    chunks of TILE // block rows, vocabulary blocks of TILE // 64 columns (`_rows_torch`)."""
    block = min(vocab, max(16, KD_TILE_ELEMENTS // 64))
    step = max(1, KD_TILE_ELEMENTS // max(block, 1))
    return min(rows, step) * block * 4


def cpu_chunk_rows(vocab: int) -> int:
    """Tokens per chunk of the fused-linear and cross-entropy kernels on the CPU (`chunk_rows`)."""
    rows = max(1, CPU_CHUNK_ELEMENTS // max(vocab, 1))
    return rows // 128 * 128 if rows >= 128 else rows


def student_states_on(device: str, offload: str) -> str:
    """The student offload whose device bytes a CPU process holds: on the CPU, the "offloaded" states stay
    in the same memory as the rest, so a CPU plan counts them as not offloaded (and no host bytes)."""
    return "none" if device == "cpu" else offload


def teacher_placement_on(device: str, placement: str) -> str:
    """Likewise for a teacher: zero3_offload's host partitions are the CPU process's own memory (as zero3)."""
    return "zero3" if device == "cpu" and placement == "zero3_offload" else placement
