"""The distillation config: what to distil, with which methods, on which hardware, with which training
settings.

A config comes from a YAML or JSON file, from command-line flags, or both (flags override the file). Every
section is a frozen keyword-only dataclass validated in `__post_init__`, so a bad value is rejected where it
enters with an `InputError` that says how to fix it. `Config.to_dict()` is the resolved config that
`gkd plan --explain` prints and that a Plan records under `inputs`.

Design choices:
- Sizes are bytes internally. In files and flags they may be written as numbers of bytes or with a unit:
  "40GiB", "40GB" (10^9), "512MiB", "1TiB"; a bare number below 2^20 is taken as GiB, which is how people say
  "40" for a 40 GB card.
- Defaults describe the headline job and machine: GLM-130B -> GLM-10B with kd + minilmv2, sequence 512, on
  one node of 8 x A100-40GB with NVLink (a DGX A100: 1 TiB host memory, 15 TB NVMe).
- `Overrides` pins any choice the search would otherwise make (ZeRO stage, offload, teacher placement,
  micro-batch, recompute layers, where tap losses run, the logit-loss path); the search then only fills in
  what is left free.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gkd.errors import InputError, shown

GiB = 1 << 30
DEFAULT_GPU_NAME = "A100-SXM4-40GB"
DEFAULT_GPU_MEMORY = 40 * GiB
# The name shown when the memory per GPU is not the default GPU's but the GPU is not named.
GENERIC_GPU_NAME = "GPU"


def gpu_label(name: str, memory_bytes: int) -> str:
    """The GPU's name for reports: the default GPU's name only while the memory is the default GPU's."""
    if name == DEFAULT_GPU_NAME and memory_bytes != DEFAULT_GPU_MEMORY:
        return GENERIC_GPU_NAME
    return name


MiB = 1 << 20

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": MiB,
    "gib": GiB,
    "tib": 1 << 40,
}

# The largest whole number a setting may take: exact as a float and far beyond any real count, so that
# arithmetic on settings stays finite (a 5,000-digit integer is refused where it enters, not deep inside).
MAX_INT = 2**53
# The largest size in bytes (8 PiB, MAX_INT), for the same reason.
MAX_BYTES = MAX_INT

TEACHER_PLACEMENTS = ("replicated", "zero3", "zero3_offload", "tensor_parallel", "offline")
STUDENT_OFFLOADS = ("none", "optimizer", "optimizer+parameters")
TAP_LOSS_PLACES = ("layerwise", "end")
LOSS_PATHS = ("fused_linear", "logits")
OPTIMIZERS = {"adamw": 8, "adam": 8, "sgd": 4}  # optimizer state bytes per parameter (fp32 moments)
# The optimizers a run can train with, by the DeepSpeed optimizer type the plan's student config names.
# DeepSpeed builds "Adam" and "AdamW" itself (deepspeed/runtime/config.py DEEPSPEED_OPTIMIZERS, matched
# case-blind); any other name is looked up as torch.optim.<name>, which "Sgd" is not, and ZeRO-Offload refuses
# torch optimizers. OPTIMIZERS above still sizes sgd's state for the memory model.
TRAINING_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}
# training.lr_schedule: the learning rate after the warmup (gkd.planner.pipeline emits DeepSpeed's scheduler).
LR_SCHEDULES = ("constant", "linear", "cosine")
# training.report_to: where the log rows go besides log.jsonl (gkd.runtime.reporting).
REPORTERS = ("tensorboard", "wandb")
# torch's and DeepSpeed's default Adam betas.
DEFAULT_BETAS = (0.9, 0.999)
# Names for hardware.interconnect. Only a label: the cost model reads hardware.interconnect_bandwidth
# (within a node) and hardware.inter_node_bandwidth (between nodes).
INTERCONNECTS = ("nvlink", "pcie", "infiniband", "ethernet")
DEVICES = ("cuda", "cpu")
DTYPES = ("bfloat16", "float16")
# How `gkd run` reads the records of --data (gkd.runtime.records) and which tokens its loss trains on.
DATA_FORMATS = ("auto", "text", "chat", "prompt_completion")
LOSS_MASKS = ("auto", "all", "completion")
# Where a run's training sequences come from (gkd.runtime.generation): the data ("off"), the teacher's
# completions generated before training ("sequence_kd", gkd.runtime.sequence_kd), or the student's own samples
# for a fraction of the batches ("on_policy").
GENERATION_MODES = ("off", "sequence_kd", "on_policy")


def parse_bytes(value: Any, what: str) -> int:
    """Bytes from an int, a float, or a string with a unit ("40GiB", "40GB", "512MiB"); bare small numbers
    are GiB."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be a size such as 40GiB, got {shown(value)}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
        if not math.isfinite(number):
            raise InputError(f"{what} must be a size such as 40GiB, got {shown(value)}")
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not match:
            raise InputError(f"{what} {shown(value)} is not a size; write it like 40GiB, 40GB or 512MiB")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise InputError(f"{what} must be a size such as 40GiB, got {shown(value)}")
    if unit == "":
        scale = GiB if number < MiB else 1
    elif unit in _UNITS:
        scale = _UNITS[unit]
    elif unit + "b" in _UNITS:  # "40G" -> GB, "40Gi" -> GiB
        scale = _UNITS[unit + "b"]
    else:
        raise InputError(
            f"{what} {shown(value)} has an unknown unit {shown(unit)}; use B, MiB, GiB, TiB, MB, GB or TB"
        )
    if number < 0:
        raise InputError(f"{what} must not be negative, got {shown(value)}")
    if not math.isfinite(number * scale) or number * scale > MAX_BYTES:
        raise InputError(f"{what} {shown(value)} is larger than any machine's memory; write it like 40GiB")
    return int(number * scale)


def _positive(value: Any, what: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{what} must be a number, got {shown(value)}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise InputError(f"{what} must be at most {MAX_INT}, got {shown(value)}")
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {shown(value)}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {shown(value)}")


def _int(value: Any, what: str, *, minimum: int = 1, maximum: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be a whole number, got {shown(value)}")
    if value < minimum:
        raise InputError(f"{what} must be at least {minimum}, got {shown(value)}")
    if value > maximum:
        raise InputError(f"{what} must be at most {maximum}, got {shown(value)}")


# Method names are short identifiers (the longest registered one has a few dozen characters).
_MAX_METHOD_NAME = 100


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """One distillation method: its registered name, its weight in the total loss and its options."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError("each method needs a name, e.g. methods: [{name: kd}] (see `gkd methods`)")
        if len(self.name) > _MAX_METHOD_NAME:
            raise InputError(
                f"method name {shown(self.name)} is too long to be a method; `gkd methods` lists their names"
            )
        _positive(self.weight, f"method {shown(self.name)} weight", allow_zero=True)
        if not isinstance(self.options, dict):
            raise InputError(
                f"method {shown(self.name)} options must be a mapping, e.g. options: {{temperature: 2}}"
            )

    def to_entry(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "options": dict(self.options)}


@dataclass(frozen=True, kw_only=True)
class HardwareConfig:
    """The machine: GPUs, their memory, host memory and disk, and the speeds the cost model uses.

    reserve: `cuda_context_bytes` per GPU (CUDA context, cuBLAS/NCCL workspaces) plus `fragmentation` times
    the allocated peak (the caching allocator's rounding and fragmentation); both are counted in the plan's
    `reserve` category.
    """

    gpus: int = 8
    gpus_per_node: int = 8
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY
    host_memory_bytes: int = 1024 * GiB  # per node
    disk_bytes: int = 15 * 10**12  # per node, for offline teacher outputs
    gpu_name: str = DEFAULT_GPU_NAME
    peak_flops: float = 312e12  # dense bf16 tensor-core FLOP/s per GPU
    flops_efficiency: float = 0.4  # fraction of peak that large matmuls reach in practice
    interconnect: str = "nvlink"
    interconnect_bandwidth: float = (
        150e9  # bytes/s per GPU for ring collectives (NVLink3 bus bandwidth, A100)
    )
    # bytes/s per GPU between nodes: its own share of the node's network, one 200 Gb/s InfiniBand HDR adapter
    # per GPU (DGX A100: 8 per node); used for the part of a collective that crosses nodes (gkd.planner.cost).
    inter_node_bandwidth: float = 25e9
    host_link_bandwidth: float = 20e9  # bytes/s per GPU, pinned host <-> GPU (PCIe 4 x16, effective)
    disk_bandwidth: float = 5e9  # bytes/s per node (NVMe RAID read)
    cpu_adam_params_per_s: float = 1e9  # parameters per second one rank's CPU Adam updates
    collective_latency_s: float = 30e-6  # fixed cost of one collective call (NCCL launch and sync)
    cuda_context_bytes: int = 1 * GiB
    fragmentation: float = 0.05
    # What a "GPU" of the plan is: "cuda", or "cpu" for CPU processes (`gkd run` without CUDA sets it): the
    # plan then counts the losses' CPU code paths and no CUDA context or allocator reserve.
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise InputError(f"hardware.device {shown(self.device)} is not one of {', '.join(DEVICES)}")
        _int(self.gpus, "hardware.gpus")
        _int(self.gpus_per_node, "hardware.gpus_per_node")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise InputError(
                f"hardware.gpus ({self.gpus}) must be a multiple of gpus_per_node ({self.gpus_per_node}) "
                "when it spans several nodes"
            )
        for name in ("gpu_memory_bytes", "host_memory_bytes", "disk_bytes", "cuda_context_bytes"):
            _int(getattr(self, name), f"hardware.{name}", minimum=0)
        if self.gpu_memory_bytes == 0:
            raise InputError("hardware.gpu_memory must be > 0, e.g. --gpu-memory 40GiB")
        for name in (
            "peak_flops",
            "interconnect_bandwidth",
            "inter_node_bandwidth",
            "host_link_bandwidth",
            "disk_bandwidth",
            "cpu_adam_params_per_s",
            "collective_latency_s",
        ):
            _positive(getattr(self, name), f"hardware.{name}")
        _positive(self.flops_efficiency, "hardware.flops_efficiency")
        if self.flops_efficiency > 1:
            raise InputError(
                f"hardware.flops_efficiency is a fraction of peak (0-1], got {self.flops_efficiency}"
            )
        _positive(self.fragmentation, "hardware.fragmentation", allow_zero=True)
        if self.fragmentation >= 1:
            raise InputError(f"hardware.fragmentation is a fraction (0-1), got {self.fragmentation}")
        if not isinstance(self.gpu_name, str):
            raise InputError(
                f"hardware.gpu_name must be text, e.g. H100-SXM5-80GB, got {shown(self.gpu_name)}"
            )
        if not isinstance(self.interconnect, str) or self.interconnect not in INTERCONNECTS:
            raise InputError(
                f"hardware.interconnect {shown(self.interconnect)} is not one of {', '.join(INTERCONNECTS)}"
            )

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def local_gpus(self) -> int:
        """GPUs in one node (all of them when the job is smaller than a node)."""
        return min(self.gpus, self.gpus_per_node)


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSettings:
    """DeepSpeed knobs that take GPU memory; defaults are DeepSpeed's (deepspeed/runtime/zero/config.py)."""

    reduce_bucket_size: int = 500_000_000  # elements
    allgather_bucket_size: int = 500_000_000  # elements (ZeRO-1/2 parameter all-gather)
    stage3_prefetch_bucket_size: int = 50_000_000  # elements
    stage3_max_live_parameters: int = 1_000_000_000  # elements
    stage3_param_persistence_threshold: int = 100_000  # elements: smaller tensors stay gathered

    def __post_init__(self) -> None:
        for f in fields(self):
            _int(getattr(self, f.name), f"deepspeed.{f.name}", minimum=0)
        if self.reduce_bucket_size == 0:
            raise InputError("deepspeed.reduce_bucket_size must be > 0 (DeepSpeed's default is 500000000)")


class GlobalBatchError(InputError):
    """training.global_batch is not divisible by the GPU count; `batch` is the global batch, so that a caller
    with other flags than `gkd plan` (`gkd run`) can word its own fix."""

    def __init__(self, batch: int, message: str) -> None:
        super().__init__(message)
        self.batch = batch


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Sequence length, batch, precision and optimizer.

    micro_batch: the per-GPU micro-batch sizes the search may pick from; empty means auto (every power of two
    that divides the per-GPU batch, and the per-GPU batch itself). steps and offline_topk size the disk an
    offline teacher pass needs. optimizer, lr, weight_decay and adam_betas go into the student's DeepSpeed
    optimizer config (`gkd.planner.pipeline`); "adam" keeps Adam's L2 weight decay, "adamw" decouples it.

    lr_schedule, warmup_steps / warmup_ratio and min_lr become one of DeepSpeed's schedulers (see
    docs/config.md for the formula): the rate rises linearly from min_lr to lr over the warmup, then stays
    (constant) or falls to min_lr at `steps` (linear, cosine). clip_grad is DeepSpeed's gradient clipping
    (0: none). report_to names where the log rows go besides log.jsonl.
    """

    seq_len: int = 512
    global_batch: int = 64
    micro_batch: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    steps: int = 1000
    offline_topk: int = 64
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr: float = 0.0
    clip_grad: float = 1.0
    adam_betas: tuple[float, float] = DEFAULT_BETAS
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _int(self.seq_len, "training.seq_len")
        _int(self.global_batch, "training.global_batch")
        if not isinstance(self.micro_batch, tuple):
            raise InputError("training.micro_batch must be a list of sizes or 'auto'")
        for mb in self.micro_batch:
            _int(mb, "training.micro_batch")
        if self.dtype not in DTYPES:
            raise InputError(
                f"training.dtype {shown(self.dtype)} is not supported; use one of {', '.join(DTYPES)}"
            )
        if not isinstance(self.optimizer, str):
            raise InputError(
                f"training.optimizer must be a name ({', '.join(TRAINING_OPTIMIZERS)}), got "
                f"{shown(self.optimizer)}; set the learning rate and weight decay with training.lr and "
                "training.weight_decay"
            )
        if self.optimizer not in TRAINING_OPTIMIZERS:
            raise InputError(
                f"training.optimizer {shown(self.optimizer)} is not supported; use one of "
                f"{', '.join(TRAINING_OPTIMIZERS)}"
            )
        _positive(self.lr, "training.lr")
        _positive(self.weight_decay, "training.weight_decay", allow_zero=True)
        _int(self.steps, "training.steps")
        _int(self.offline_topk, "training.offline_topk")
        self._check_schedule()
        if not isinstance(self.report_to, tuple) or any(r not in REPORTERS for r in self.report_to):
            raise InputError(
                f"training.report_to must list some of {', '.join(REPORTERS)}, got {shown(self.report_to)}"
            )

    def _check_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(
                f"training.lr_schedule {shown(self.lr_schedule)} is not one of {', '.join(LR_SCHEDULES)}"
            )
        _int(self.warmup_steps, "training.warmup_steps", minimum=0)
        _positive(self.warmup_ratio, "training.warmup_ratio", allow_zero=True)
        if self.warmup_ratio >= 1:
            raise InputError(
                f"training.warmup_ratio is the fraction of training.steps spent warming up, below 1; got "
                f"{shown(self.warmup_ratio)}"
            )
        if self.warmup_steps and self.warmup_ratio:
            raise InputError("training gives both warmup_steps and warmup_ratio; keep one")
        _positive(self.min_lr, "training.min_lr", allow_zero=True)
        if self.min_lr > self.lr:
            raise InputError(
                f"training.min_lr ({self.min_lr}) is above training.lr ({self.lr}); the schedule goes from "
                "min_lr up to lr and back, so lower min_lr"
            )
        _positive(self.clip_grad, "training.clip_grad", allow_zero=True)
        betas = self.adam_betas
        if not isinstance(betas, tuple) or len(betas) != 2:
            raise InputError(f"training.adam_betas must be two numbers like [0.9, 0.999], got {shown(betas)}")
        for beta in betas:
            _positive(beta, "training.adam_betas entry", allow_zero=True)
            if beta >= 1:
                raise InputError(f"training.adam_betas entries must be below 1, got {shown(beta)}")

    @property
    def warmup(self) -> int:
        """The warmup in steps: warmup_steps, or warmup_ratio of `steps` rounded up."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.steps)

    def per_gpu_batch(self, gpus: int) -> int:
        if self.global_batch % gpus:
            raise GlobalBatchError(
                self.global_batch,
                f"training.global_batch ({self.global_batch}) must be divisible by the number of GPUs "
                f"({gpus}); "
                f"try --global-batch {max(gpus, self.global_batch - self.global_batch % gpus)}",
            )
        return self.global_batch // gpus


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How `gkd run` reads its --data source (gkd.runtime.records) and which tokens the loss trains on.

    format: "text" (the `text_field` of each record), "chat" (a "messages" list, rendered with the teacher
    tokenizer's chat template), "prompt_completion" ("prompt" and "completion" fields), or "auto" (chat when
    the records have "messages", prompt_completion when they have "prompt" and "completion", else text).
    loss_mask: "completion" trains on the completion tokens only (the assistant turns of a chat), for the
    hard and the distillation terms alike; "all" on every token; "auto" is completion for chat and
    prompt/completion records and all for text. split and subset pick a split and a configuration of a
    dataset folder or hub id (a single data file is its own "train" split); streaming reads the records one
    by one instead of through a datasets Arrow copy of the source.
    """

    format: str = "auto"
    text_field: str = "text"
    split: str = "train"
    subset: str | None = None
    loss_mask: str = "auto"
    streaming: bool = False

    def __post_init__(self) -> None:
        _choice(self.format, DATA_FORMATS, "data.format")
        _choice(self.loss_mask, LOSS_MASKS, "data.loss_mask")
        for name in ("text_field", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"data.{name} must be a non-empty name, got {shown(value)}")
        if self.subset is not None and (not isinstance(self.subset, str) or not self.subset.strip()):
            raise InputError(
                f"data.subset must be a configuration name or left out, got {shown(self.subset)}"
            )
        if not isinstance(self.streaming, bool):
            raise InputError(f"data.streaming must be true or false, got {shown(self.streaming)}")
        if self.format == "text" and self.loss_mask == "completion":
            raise InputError(
                "data.loss_mask completion needs records with a completion (format chat or "
                "prompt_completion); text records train on every token"
            )


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Where the training sequences come from (gkd.runtime.generation, gkd.runtime.sequence_kd; see
    docs/config.md).

    mode: "off" (the data's sequences); "sequence_kd": before training, the (first) teacher generates one
    completion for each prompt of the data, and training reads prompt + completion with the loss on the
    completion; "on_policy": the data's completions. In both generating modes, for a fraction `fraction`
    (the config's `lambda`, TRL's `lmbda`; 0.5 for on_policy, 0 for sequence_kd when not given) of the
    micro-batches, chosen from the seed and the step alone, the student samples completions of up to
    `max_new_tokens` tokens for the batch's prompts (at `temperature`, nucleus `top_p`; the teacher's
    generation uses the same three), and the step trains on prompt + sample with the loss on the sampled
    tokens only. `prompt_field` (sequence_kd): the record field read as the prompt (None: the data's own
    prompts). `refresh_every` (steps between two generations of the same sequences; None: the mode's own):
    0 for sequence_kd (generated once), 1 for on_policy (each sampled micro-batch at its step).
    """

    mode: str = "off"
    fraction: float | None = None
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_field: str | None = None
    refresh_every: int | None = None

    def __post_init__(self) -> None:
        _choice(self.mode, GENERATION_MODES, "generation.mode")
        if self.fraction is None:
            object.__setattr__(self, "fraction", 0.5 if self.mode == "on_policy" else 0.0)
        assert self.fraction is not None
        _positive(self.fraction, "generation.lambda", allow_zero=True)
        if self.fraction > 1:
            raise InputError(f"generation.lambda must be a fraction in 0..1, got {shown(self.fraction)}")
        _int(self.max_new_tokens, "generation.max_new_tokens")
        _positive(self.temperature, "generation.temperature")
        _positive(self.top_p, "generation.top_p")
        if self.top_p > 1:
            raise InputError(f"generation.top_p must be in (0, 1], got {shown(self.top_p)}")
        if self.prompt_field is not None:
            if not isinstance(self.prompt_field, str) or not self.prompt_field.strip():
                raise InputError(
                    f"generation.prompt_field must be a record field name or left out, got "
                    f"{shown(self.prompt_field)}"
                )
            if self.mode != "sequence_kd":
                raise InputError(
                    "generation.prompt_field names the field the teacher completes, so it needs "
                    "generation.mode sequence_kd (on_policy reads the data's prompt/completion records); "
                    "drop it"
                )
        own = {"sequence_kd": 0, "on_policy": 1}.get(self.mode)
        if self.refresh_every is not None:
            _int(self.refresh_every, "generation.refresh_every", minimum=0)
            if self.refresh_every != own:
                what = (
                    "sequence_kd generates the teacher's completions once, before training (refresh_every 0)"
                    if self.mode == "sequence_kd"
                    else "on_policy samples each drawn micro-batch with that step's student (refresh_every 1)"
                    if self.mode == "on_policy"
                    else "generation.mode off generates nothing"
                )
                raise InputError(
                    f"generation.refresh_every {shown(self.refresh_every)} is not built: {what}; drop it"
                )

    def to_entry(self) -> dict[str, Any]:
        entry = {
            "mode": self.mode,
            "lambda": self.fraction,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        # Left out while unset: the plans of earlier generating configs keep their keys.
        for name in ("prompt_field", "refresh_every"):
            if getattr(self, name) is not None:
                entry[name] = getattr(self, name)
        return entry


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """Choices pinned by the user; None leaves a choice to the search."""

    student_zero_stage: int | None = None
    student_offload: str | None = None
    teacher_placement: str | None = None
    tensor_parallel: int | None = None
    micro_batch: int | None = None
    recompute_layers: tuple[int, ...] | None = None  # student layers to recompute (empty tuple: none)
    tap_loss: str | None = None
    loss_path: str | None = None

    def __post_init__(self) -> None:
        if self.student_zero_stage is not None and self.student_zero_stage not in (0, 1, 2, 3):
            raise InputError(
                f"overrides.student_zero_stage must be 0, 1, 2 or 3, got {shown(self.student_zero_stage)}"
            )
        _choice(self.student_offload, STUDENT_OFFLOADS, "overrides.student_offload")
        _choice(self.teacher_placement, TEACHER_PLACEMENTS, "overrides.teacher_placement")
        _choice(self.tap_loss, TAP_LOSS_PLACES, "overrides.tap_loss")
        _choice(self.loss_path, LOSS_PATHS, "overrides.loss_path")
        if self.tensor_parallel is not None:
            _int(self.tensor_parallel, "overrides.tensor_parallel")
        if self.micro_batch is not None:
            _int(self.micro_batch, "overrides.micro_batch")
        if self.recompute_layers is not None:
            for layer in self.recompute_layers:
                _int(layer, "overrides.recompute_layers entry", minimum=0)
            if len(set(self.recompute_layers)) != len(self.recompute_layers):
                raise InputError(
                    f"overrides.recompute_layers {list(self.recompute_layers)} names a layer twice; "
                    "list each layer once"
                )
        if self.student_offload == "optimizer+parameters" and self.student_zero_stage not in (None, 3):
            raise InputError(
                "parameter offload needs ZeRO stage 3; set student_zero_stage: 3 or offload optimizer"
            )
        if self.student_offload not in (None, "none") and self.student_zero_stage == 0:
            raise InputError(
                "offload needs ZeRO stage 1, 2 or 3; raise student_zero_stage or drop the offload"
            )
        if (self.tensor_parallel or 1) > 1 and self.teacher_placement not in (None, "tensor_parallel"):
            raise InputError(
                f"overrides.tensor_parallel {self.tensor_parallel} splits the teacher, but "
                f"overrides.teacher_placement is {self.teacher_placement}; drop one of them"
            )


@dataclass(frozen=True, kw_only=True)
class StudentInit:
    """`student_init: {from: teacher, layers: [0, 2, 4] | every: k}`: the student starts from the teacher's
    embeddings, the listed blocks (student block i from teacher block layers[i]) and its head
    (gkd.runtime.student_init). `every: k` lists the teacher's blocks 0, k, 2k, ...; either way the list holds
    one teacher block per student block, each named once."""

    source: str = "teacher"  # `from` in files ("from" is a Python keyword)
    layers: tuple[int, ...] = ()
    every: int = 0

    def __post_init__(self) -> None:
        if self.source != "teacher":
            raise InputError(
                f"student_init.from {shown(self.source)} is not a model to copy from; write from: teacher "
                "(the first teacher)"
            )
        if not isinstance(self.layers, tuple):
            raise InputError(
                f"student_init.layers must be a list of teacher layer indices, got {shown(self.layers)}"
            )
        if bool(self.layers) == bool(self.every):
            raise InputError(
                "student_init needs exactly one of layers (e.g. layers: [0, 2, 4, 6]) or every (every: 2)"
            )
        for layer in self.layers:
            _int(layer, "student_init.layers entry", minimum=0)
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"student_init.layers {list(self.layers)} names a layer twice; list each once")
        if self.every:
            _int(self.every, "student_init.every")

    def teacher_layers(self, teacher_layers: int) -> tuple[int, ...]:
        """The teacher block each student block starts from, in student order."""
        return self.layers or tuple(range(0, teacher_layers, self.every))

    def to_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"from": self.source}
        if self.layers:
            entry["layers"] = list(self.layers)
        else:
            entry["every"] = self.every
        return entry


def student_init_from(value: Any) -> StudentInit | None:
    """The student_init section of a config file or resolved config (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InputError(
            f"student_init must be a mapping like {{from: teacher, every: 2}}, got {shown(value, 40)}"
        )
    unknown = set(value) - {"from", "layers", "every"}
    if unknown:
        raise InputError(f"student_init has unknown keys {sorted(unknown)}; use from, layers or every")
    layers = value.get("layers") or ()
    if isinstance(layers, list):
        layers = tuple(layers)
    return StudentInit(source=value.get("from", "teacher"), layers=layers, every=value.get("every") or 0)


# The longest path and file name the file systems gkd runs on take (Linux PATH_MAX and NAME_MAX, in bytes).
_PATH_MAX = 4096
_NAME_MAX = 255


def _check_model_ref(ref: str, what: str) -> None:
    """A model reference must be something a file system could hold (a preset name is a short one), so that
    looking it up reports an unknown model instead of failing in the file system."""
    if "\0" in ref:
        raise InputError(f"{what} {shown(ref)} holds a NUL character; give a preset name or a path")
    parts = Path(ref).parts
    if len(ref.encode("utf-8", "surrogatepass")) > _PATH_MAX or any(
        len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in parts
    ):
        raise InputError(
            f"{what} {shown(ref)} is too long to be a preset name or a path (a path holds at most "
            f"{_PATH_MAX} bytes, each name in it {_NAME_MAX}); give a preset name, config.json or folder"
        )


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value is not None and value not in allowed:
        raise InputError(f"{what} {shown(value)} is not one of {', '.join(allowed)}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole distillation job."""

    teachers: tuple[str, ...] = ("glm-130b",)
    student: str = "glm-10b-icetk"
    methods: tuple[MethodConfig, ...] = (MethodConfig(name="kd"), MethodConfig(name="minilmv2"))
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    overrides: Overrides = field(default_factory=Overrides)
    student_init: StudentInit | None = None
    # Model references (as written) whose custom code (auto_map) may run: `trust_remote_code: true` in the
    # model's entry ({model: REF, trust_remote_code: true}); a plan records them as a top-level list.
    trust_remote_code: tuple[str, ...] = ()
    base_dir: str = ""  # folder of the config file; model paths are relative to it
    # Of teacher, student and methods, those a config file left out (their defaults are the headline job's,
    # which a user's file almost never means); planning refuses them unless a flag gave them meanwhile.
    unset: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bad = [t for t in self.teachers if not isinstance(t, str) or not t]
        if not self.teachers or bad:
            got = f", got {shown(bad[0])}" if bad else ""
            raise InputError(
                "teacher must be a preset name, a config.json or a checkpoint folder, written as a string "
                f"(several: a list of strings; --teacher){got}"
            )
        if not isinstance(self.student, str) or not self.student:
            raise InputError(
                "student must be a preset name, a config.json or a checkpoint folder, written as a string "
                f"(--student), got {shown(self.student)}"
            )
        for ref in self.teachers:
            _check_model_ref(ref, "teacher")
        _check_model_ref(self.student, "student")
        for ref in self.trust_remote_code:
            if ref not in (*self.teachers, self.student):
                raise InputError(
                    f"trust_remote_code names {shown(ref)}, which is not the teacher or the student; "
                    "set trust_remote_code: true in that model's own entry"
                )
            from gkd.models import trust_remote_code

            trust_remote_code(self.model_path(ref))
        if not self.methods:
            raise InputError("no methods given; add at least one, e.g. methods: [{name: kd}] or --methods kd")
        if all(m.weight == 0 for m in self.methods):
            raise InputError("every method has weight 0, so nothing would be learned; give one a weight > 0")
        self.training.per_gpu_batch(self.hardware.gpus)
        pinned, sizes = self.overrides.micro_batch, self.training.micro_batch
        if pinned is not None and sizes and pinned not in sizes:
            raise InputError(
                f"overrides.micro_batch {pinned} is not among training.micro_batch "
                f"{', '.join(map(str, sizes))}; drop one of them"
            )
        new = self.generation.max_new_tokens
        if self.generation.mode != "off" and new >= self.training.seq_len:
            raise InputError(
                f"generation.max_new_tokens ({new}) must be below training.seq_len "
                f"({self.training.seq_len}): prompt and sample share a row; lower it or raise seq_len"
            )
        tp = self.overrides.tensor_parallel
        if tp is not None and self.hardware.local_gpus % tp:
            raise InputError(
                f"overrides.tensor_parallel ({tp}) must divide the GPUs of a node "
                f"({self.hardware.local_gpus})"
            )

    def model_path(self, ref: str) -> str:
        """A model reference as the runtime must open it: a local path made absolute (resolved against the
        config's folder first, then the current folder), so that a plan file runs from any folder; anything
        else (a preset name) as given."""
        path = Path(ref).expanduser()
        if path.is_absolute():
            return ref
        for folder in (self.base_dir, "."):
            if folder and (Path(folder) / path).exists():
                return str((Path(folder) / path).resolve())
        from gkd.hub import is_hub_id, snapshot_folder

        if is_hub_id(ref):  # a Hugging Face Hub id: its snapshot folder in the local cache
            return str(snapshot_folder(ref))
        return ref

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["teachers"] = list(self.teachers)
        out["methods"] = [m.to_entry() for m in self.methods]
        out["training"]["micro_batch"] = list(self.training.micro_batch) or "auto"
        rl = self.overrides.recompute_layers
        out["overrides"]["recompute_layers"] = None if rl is None else list(rl)
        out["student_init"] = self.student_init.to_entry() if self.student_init else None
        out.pop("base_dir")
        out.pop("unset")
        out["trust_remote_code"] = list(self.trust_remote_code)
        if not self.trust_remote_code:  # left out while empty: other plans' keys stay as they were
            out.pop("trust_remote_code")
        # Left out while off: the configs (and plan keys) of runs that do not generate stay as they were.
        out.pop("generation")
        if self.generation.mode != "off":
            out["generation"] = self.generation.to_entry()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str = "") -> Config:
        return _config_from_mapping(data, base_dir=base_dir)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------
# Loading


_HARDWARE_SIZES = {
    "gpu_memory": "gpu_memory_bytes",
    "host_memory": "host_memory_bytes",
    "disk": "disk_bytes",
    "cuda_context": "cuda_context_bytes",
}


def _section(cls: type, data: Any, what: str, renames: Mapping[str, str] | None = None) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise InputError(f"{what} must be a mapping of settings, got {type(data).__name__}")
    allowed = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        target = (renames or {}).get(key, key)
        if target not in allowed:
            known = sorted(allowed | set(renames or {}))
            raise InputError(f"{what} has no setting {shown(key)}; known settings: {', '.join(known)}")
        if target in kwargs:
            # gpu_memory and gpu_memory_bytes (the name plans store) both given: neither may win silently.
            raise InputError(f"{what} gives {shown(key)} twice, under two names; keep one")
        if target.endswith("_bytes"):
            value = parse_bytes(value, f"{what}.{key}")
        kwargs[target] = value
    return cls(**kwargs)


def _micro_batch(value: Any) -> tuple[int, ...]:
    if value is None or value == "auto":
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise InputError(
                f"micro_batch {shown(value)} must be 'auto', a size, or a list like 1,2,4"
            ) from None
    if isinstance(value, list | tuple):
        return tuple(value)
    raise InputError(f"micro_batch {shown(value)} must be 'auto', a size, or a list like [1, 2, 4]")


def _methods(value: Any) -> tuple[MethodConfig, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise InputError("methods must be a list, e.g. methods: [{name: kd, weight: 1.0}]")
    out = []
    for entry in value:
        if isinstance(entry, MethodConfig):
            out.append(entry)
        elif isinstance(entry, str):
            out.append(MethodConfig(name=entry))
        elif isinstance(entry, Mapping):
            unknown = set(entry) - {"name", "weight", "options"}
            if unknown:
                raise InputError(
                    f"method entry has unknown keys {sorted(unknown)}; use name, weight and options"
                )
            if "name" not in entry:
                raise InputError(
                    f"method entry {shown(dict(entry))} needs a name, e.g. {{name: kd, weight: 1.0}}"
                )
            options = entry.get("options") or {}
            if not isinstance(options, Mapping):
                raise InputError(
                    f"method {shown(entry['name'])} options must be a mapping, e.g. options: "
                    "{temperature: 2}"
                )
            out.append(
                MethodConfig(name=entry["name"], weight=entry.get("weight", 1.0), options=dict(options))
            )
        else:
            raise InputError(
                f"method entry {shown(entry)} must be a name or a mapping with name/weight/options"
            )
    return tuple(out)


def _trusted_list(value: Any) -> list[str]:
    """The top-level trust_remote_code list (what a plan records), as a list to extend."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(
            f"trust_remote_code must be a list of model references, got {shown(value, 40)}; "
            "or write trust_remote_code: true in the model's entry"
        )
    return list(value)


def _model_entry(value: Any, what: str, trusted: list[str]) -> Any:
    """A model entry: a reference, or {model: REF, trust_remote_code: true|false}; a trusted REF is added
    to `trusted`. Anything else is returned as given for Config to refuse by its type."""
    if not isinstance(value, Mapping):
        return value
    unknown = set(value) - {"model", "trust_remote_code"}
    if unknown or "model" not in value:
        raise InputError(
            f"{what} must be a preset name, a config.json, a checkpoint folder or a hub id, or a mapping "
            f"{{model: REF, trust_remote_code: true}}; got {shown(value, 60)}"
        )
    flag = value.get("trust_remote_code", False)
    if not isinstance(flag, bool):
        raise InputError(f"{what} trust_remote_code must be true or false, got {shown(flag)}")
    if flag and isinstance(value["model"], str):
        trusted.append(value["model"])
    return value["model"]


def _config_from_mapping(data: Mapping[str, Any], *, base_dir: str = "") -> Config:
    if not isinstance(data, Mapping):
        raise InputError("the config must be a mapping with teacher, student, methods, hardware, training")
    allowed = {
        "teacher",
        "teachers",
        "student",
        "methods",
        "hardware",
        "training",
        "data",
        "deepspeed",
        "overrides",
        "student_init",
        "generation",
        "trust_remote_code",
    }
    unknown = set(data) - allowed
    if unknown:
        raise InputError(
            f"config has unknown keys {sorted(unknown)}; known keys: {', '.join(sorted(allowed))}"
        )
    if "teacher" in data and "teachers" in data:
        raise InputError("the config gives both teacher and teachers; keep one (teachers for several)")
    kwargs: dict[str, Any] = {"base_dir": base_dir}
    trusted = _trusted_list(data.get("trust_remote_code"))
    teachers = data.get("teachers", data.get("teacher"))
    if teachers is not None:
        # A lone non-string (teacher: 5) becomes a one-item tuple, which Config then refuses by its type.
        entries = teachers if isinstance(teachers, list | tuple) else (teachers,)
        kwargs["teachers"] = tuple(_model_entry(t, "teacher", trusted) for t in entries)
    if "student" in data:
        kwargs["student"] = _model_entry(data["student"], "student", trusted)
    kwargs["trust_remote_code"] = tuple(dict.fromkeys(trusted))
    if "methods" in data:
        kwargs["methods"] = _methods(data["methods"])
    for section in ("hardware", "training", "data", "generation", "deepspeed", "overrides"):
        if data.get(section) is not None and not isinstance(data[section], Mapping):
            raise InputError(
                f"{section} must be a mapping of settings (e.g. {section}: {{...}}), got "
                f"{type(data[section]).__name__} {shown(data[section], 40)}"
            )
    kwargs["hardware"] = _section(HardwareConfig, data.get("hardware"), "hardware", _HARDWARE_SIZES)
    training = dict(data.get("training") or {})
    if "micro_batch" in training:
        training["micro_batch"] = _micro_batch(training["micro_batch"])
    for key in ("adam_betas", "report_to"):  # lists in a file, tuples in the frozen section
        if isinstance(training.get(key), list):
            training[key] = tuple(training[key])
    if isinstance(training.get("report_to"), str):
        training["report_to"] = (training["report_to"],)
    kwargs["training"] = _section(TrainingConfig, training, "training")
    kwargs["data"] = _section(DataConfig, data.get("data"), "data")
    kwargs["generation"] = _section(
        GenerationConfig, data.get("generation"), "generation", {"lambda": "fraction"}
    )
    kwargs["deepspeed"] = _section(DeepSpeedSettings, data.get("deepspeed"), "deepspeed")
    overrides = dict(data.get("overrides") or {})
    if overrides.get("recompute_layers") is not None:
        rl = overrides["recompute_layers"]
        if rl == "none":
            rl = []
        if not isinstance(rl, list | tuple):
            raise InputError("overrides.recompute_layers must be a list of student layer indices or 'none'")
        overrides["recompute_layers"] = tuple(rl)
    kwargs["overrides"] = _section(Overrides, overrides, "overrides")
    kwargs["student_init"] = student_init_from(data.get("student_init"))
    return Config(**kwargs)


def load_config(path: str | Path, *, gpus: Any = None, global_batch: Any = None) -> Config:
    """A Config from a YAML or JSON file. `gpus` and `global_batch` (flag values) replace the file's before
    it is checked, since the file's global batch need only divide the GPU count the job really has."""
    p = Path(path)
    data = _read_config_file(p, str(path))
    if data is not None and not isinstance(data, Mapping):
        raise InputError(
            f"{path} is not a config: its top level is a {type(data).__name__}, not a mapping with teacher, "
            "student, methods, hardware, training"
        )
    data = data or {}
    if isinstance(data, Mapping) and (gpus is not None or global_batch is not None):
        data = dict(data)
        for section, key, value, flag in (
            ("hardware", "gpus", gpus, "--gpus"),
            ("training", "global_batch", global_batch, "--global-batch"),
        ):
            if value is not None and isinstance(data.get(section) or {}, Mapping):
                data[section] = {**(data.get(section) or {}), key: _flag_int(value, flag)}
    config = _config_from_mapping(data, base_dir=str(p.parent.resolve()))
    given = {"teacher" if key == "teachers" else key for key in data}
    return replace(config, unset=tuple(k for k in ("teacher", "student", "methods") if k not in given))


# A config is a page of settings; a larger file is not one (and is not read whole into memory).
MAX_CONFIG_BYTES = 1 << 20
# Values a config file may expand to (aliases counted once per use) and how deeply it may nest: a real config
# has about a hundred values, six levels deep. The bounds refuse a YAML "billion laughs" (a few hundred
# bytes of nested aliases that expand to 10^9 values) before anything walks or prints it.
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_DEPTH = 32


def _read_config_file(p: Path, name: str) -> Any:
    """The parsed content of a YAML or JSON config file, or an InputError that says what is wrong."""
    try:
        if not p.exists():
            raise InputError(
                f"config file {shown(name)} does not exist; give a YAML or JSON file or no argument"
            )
        if not p.is_file():
            raise InputError(f"config {shown(name)} is not a regular file; give a YAML or JSON file")
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise InputError(f"cannot read config {shown(name)}: {err.strerror or type(err).__name__}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InputError(
            f"config {p.name} is larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config is; give the "
            "YAML or JSON file of the job's settings"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"config {p.name} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text, parse_int=lambda digits: _json_int(digits, p.name))
        except InputError:
            raise
        except RecursionError:
            raise InputError(f"config {p.name} nests deeper than {MAX_CONFIG_DEPTH} levels") from None
        except ValueError as err:  # JSONDecodeError, and integers past Python's digit limit
            raise InputError(f"config {p.name} is not valid JSON: {_first_line(err)}") from None
        _check_json_shape(data, p.name)
        return data

    try:
        loader = _config_loader()(text)
        loader.config_name = p.name
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"config {p.name} nests deeper than {MAX_CONFIG_DEPTH} levels") from None
    except Exception as err:  # yaml.YAMLError and its subclasses, ValueError of an oversized integer
        raise InputError(f"config {p.name} is not valid YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: Exception) -> str:
    """What the YAML parser found wrong and where ("expected ',' or ']', but got '<stream end>' at line 2,
    column 1"): its message's first line is only the context ("while parsing a flow sequence")."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem or mark is None:
        return _first_line(err)
    text = problem if len(problem) <= 120 else problem[:117] + "..."  # it may quote a long token
    return f"{text} at line {mark.line + 1}, column {mark.column + 1}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return shown(text.splitlines()[0], 200).strip("'\"") if text else type(err).__name__


@functools.cache
def _config_loader() -> type:
    """PyYAML's SafeLoader, measuring each document before constructing it: its values counted with every
    alias expanded, and its depth (both bounded; see MAX_CONFIG_VALUES). Made on first use, so that importing
    gkd.config does not import yaml."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        config_name = "config"

        def compose_document(self) -> Any:
            node = super().compose_document()
            _check_yaml_shape(node, self.config_name)
            return node

        def construct_bounded_int(self, node: Any) -> int:
            digits = sum(ch.isdigit() for ch in str(node.value))
            if digits > _MAX_DIGITS:
                raise _huge_number(self.config_name, node.start_mark.line + 1, digits)
            return int(self.construct_yaml_int(node))

    ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_bounded_int)
    return ConfigLoader


# Digits of the longest integer a config may hold (every setting is below MAX_INT, which has 16).
_MAX_DIGITS = 100


def _huge_number(name: str, line: int | None, digits: int) -> InputError:
    where = f" line {line}" if line is not None else ""
    return InputError(
        f"config {name}{where} holds a number of {digits} digits, beyond every setting's range; fix the value"
    )


def _json_int(text: str, name: str) -> int:
    if len(text) > _MAX_DIGITS:
        raise _huge_number(name, None, len(text.lstrip("-")))
    return int(text)


def _check_yaml_shape(root: Any, name: str) -> None:
    """Refuse a composed YAML document that expands to more than MAX_CONFIG_VALUES values, nests deeper
    than MAX_CONFIG_DEPTH, or holds an alias inside its own anchor. Shared nodes (aliases) are measured once
    and counted at every use, so the walk costs the size of the file, not of its expansion."""
    import yaml

    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values when expanded, depth)
    open_nodes: set[int] = set()

    def measure(node: Any) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise InputError(f"config {name} has a YAML alias inside its own anchor; write the value out")
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        open_nodes.add(key)
        count, depth = 1, 0
        for child in children:
            c, d = measure(child)
            count, depth = count + c, max(depth, d)
            if count > MAX_CONFIG_VALUES or depth + 1 > MAX_CONFIG_DEPTH:
                break
        open_nodes.discard(key)
        sizes[key] = (count, depth + 1)
        if count > MAX_CONFIG_VALUES:
            raise InputError(
                f"config {name} expands to more than {MAX_CONFIG_VALUES:,} values (its YAML aliases repeat "
                "values many times over); write the settings out without nested aliases"
            )
        if depth + 1 > MAX_CONFIG_DEPTH:
            raise InputError(f"config {name} nests deeper than {MAX_CONFIG_DEPTH} levels")
        return sizes[key]

    if root is not None:
        measure(root)


def _check_json_shape(data: Any, name: str) -> None:
    """Refuse parsed JSON deeper than MAX_CONFIG_DEPTH (JSON has no aliases: its size is the file's)."""
    level: list[Any] = [data]
    for _ in range(MAX_CONFIG_DEPTH):
        level = [
            child
            for value in level
            if isinstance(value, dict | list)
            for child in (value.values() if isinstance(value, dict) else value)
        ]
        if not level:
            return
    raise InputError(f"config {name} nests deeper than {MAX_CONFIG_DEPTH} levels")


def _flag_int(value: Any, flag: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise InputError(f"{flag} must be a whole number, got {shown(value)}") from None


def _flag_model(ref: str) -> str:
    """A model given on the command line: a path there is relative to the current folder (not to the
    config's), so an existing one is made absolute here; a preset name stays as it is."""
    ref = ref.strip()
    path = Path(ref).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.exists() else ref


def apply_flags(config: Config, **flags: Any) -> Config:
    """The config with command-line flags applied (None means the flag was not given)."""
    for key, flag in (("gpus", "--gpus"), ("seq_len", "--seq-len"), ("global_batch", "--global-batch")):
        if flags.get(key) is not None:
            flags[key] = _flag_int(flags[key], flag)
    out = config
    if flags.get("teacher"):
        teachers = tuple(_flag_model(t) for t in str(flags["teacher"]).split(",") if t.strip())
        out = replace(out, teachers=teachers, unset=tuple(k for k in out.unset if k != "teacher"))
    if flags.get("student"):
        out = replace(
            out, student=_flag_model(flags["student"]), unset=tuple(k for k in out.unset if k != "student")
        )
    if flags.get("methods"):
        out = replace(
            out, methods=_methods(flags["methods"]), unset=tuple(k for k in out.unset if k != "methods")
        )
    hw: dict[str, Any] = {}
    if flags.get("gpus") is not None:
        hw["gpus"] = flags["gpus"]
    if flags.get("gpu_memory") is not None:
        hw["gpu_memory_bytes"] = parse_bytes(flags["gpu_memory"], "--gpu-memory")
    if flags.get("host_memory") is not None:
        hw["host_memory_bytes"] = parse_bytes(flags["host_memory"], "--host-memory")
    tr: dict[str, Any] = {}
    if flags.get("seq_len") is not None:
        tr["seq_len"] = flags["seq_len"]
    if flags.get("global_batch") is not None:
        tr["global_batch"] = flags["global_batch"]
    if flags.get("micro_batch") is not None:
        tr["micro_batch"] = _micro_batch(flags["micro_batch"])
    # Build the sections first, then the Config, so that cross-field checks see the final values.
    hardware = replace(out.hardware, **hw) if hw else out.hardware
    training = replace(out.training, **tr) if tr else out.training
    return Config(
        teachers=out.teachers,
        student=out.student,
        methods=out.methods,
        hardware=hardware,
        training=training,
        data=out.data,
        generation=out.generation,
        deepspeed=out.deepspeed,
        overrides=out.overrides,
        student_init=out.student_init,
        trust_remote_code=out.trust_remote_code,
        base_dir=out.base_dir,
        unset=out.unset,
    )


def default_config() -> Config:
    """The headline job: configs/default.yaml when it is present in the source tree, else the built-in one."""
    path = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    if path.is_file():
        return load_config(path)
    return Config()
