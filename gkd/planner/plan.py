"""The Plan: what the planner decided, as plain versioned data with a JSON round-trip.

The runtime executes a Plan and nothing else, so everything it needs is here by name: the chosen strategy, the
schedule (ordered operations, each with the tensors it allocates and frees), and the DeepSpeed configs. The
rest explains the decision: predicted memory per category at the peak, host memory and disk, estimates, the
rejected alternatives with the reason each lost, and the provenance of every planner pass.

Top-level JSON keys (fixed): version, inputs, fits, budget_bytes, peak_bytes, memory, host_bytes, strategy,
schedule, deepspeed, estimates, alternatives, provenance.

Design choices:
- Frozen keyword-only dataclasses that refer to things by name; `to_dict`/`from_dict` are explicit (no
  pickling, no class paths), so a Plan written by one version is readable and diffable.
- `memory` maps each category to bytes on the most loaded GPU at the moment of its peak; the values sum to
  `peak_bytes` (checked in `__post_init__`).
- Sequences are tuples so that `Plan.from_json(plan.to_json()) == plan`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PLAN_VERSION = 1


def human_bytes(n: float) -> str:
    """Bytes in binary units, for messages and reports."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "taps",
    "loss_workspace",
    "buffers",
    "reserve",
)
PLAN_KEYS = (
    "version",
    "inputs",
    "fits",
    "budget_bytes",
    "peak_bytes",
    "memory",
    "host_bytes",
    "strategy",
    "schedule",
    "deepspeed",
    "estimates",
    "alternatives",
    "provenance",
)


@dataclass(frozen=True, kw_only=True)
class TensorAlloc:
    """A tensor an operation allocates: its name (unique within a micro-step), bytes and memory category."""

    name: str
    bytes: int
    category: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown memory category {self.category!r}")
        if self.bytes < 0:
            raise ValueError(f"tensor {self.name} has negative size {self.bytes}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "category": self.category}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorAlloc:
        return cls(name=d["name"], bytes=int(d["bytes"]), category=d["category"])


@dataclass(frozen=True, kw_only=True)
class Op:
    """One operation of the schedule.

    kind: teacher_forward | student_forward | tap_loss | logit_loss | student_recompute | student_backward |
    gather | optimizer_step | offline_teacher_pass | load_topk. `model` is "student", "teacher0", ...;
    `layer` the layer index or -1 (embedding / head / whole model). `taps` are the tap names captured or read,
    `losses` the loss terms computed ("method.term"). `allocs` exist from the start of the op; `frees` are
    released at its end (a tensor in both is a transient workspace). `phase`: "micro" ops repeat once per
    micro-batch (grad_accum times), "step" ops once per optimizer step, "offline" ops run before training.

    What the executor does per kind:
    - teacher_forward: run that teacher layer (or embedding / head, layer -1) under no_grad, keep `taps`.
    - student_forward: run that student layer; `recompute` means under activation checkpointing, keeping the
      tensors of `taps` that its losses read (selective checkpoint), so they are not recomputed.
    - tap_loss at a layer >= 0 (layerwise): compute `losses` from `taps`, then at once the gradient of the
      loss with respect to the student taps (torch.autograd.grad); keep those gradients (the alloc) and free
      the teacher taps listed in `frees`; add the kept gradients to the taps' gradients when the backward
      reaches that layer (a tensor hook). tap_loss at layer -1 (end): compute `losses` into the total loss.
    - logit_loss: the logit loss terms, on the strategy's loss_path.
    - student_recompute / student_backward: the backward of that layer (recompute first when listed).
    - optimizer_step: the DeepSpeed engine step. offline_teacher_pass: the teacher pass writing top-k.
    - load_topk: read this micro-batch's stored top-k teacher log-probs.
    """

    name: str
    kind: str
    model: str
    layer: int = -1
    phase: str = "micro"
    recompute: bool = False
    taps: tuple[str, ...] = ()
    losses: tuple[str, ...] = ()
    allocs: tuple[TensorAlloc, ...] = ()
    frees: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "model": self.model,
            "layer": self.layer,
            "phase": self.phase,
            "recompute": self.recompute,
            "taps": list(self.taps),
            "losses": list(self.losses),
            "allocs": [a.to_dict() for a in self.allocs],
            "frees": list(self.frees),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        return cls(
            name=d["name"],
            kind=d["kind"],
            model=d["model"],
            layer=int(d["layer"]),
            phase=d["phase"],
            recompute=bool(d["recompute"]),
            taps=tuple(d["taps"]),
            losses=tuple(d["losses"]),
            allocs=tuple(TensorAlloc.from_dict(a) for a in d["allocs"]),
            frees=tuple(d["frees"]),
        )


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Ordered operations of one optimizer step: run the "offline" ops once before training, then per step the
    "micro" ops `grad_accum` times and the "step" ops once. `static` lists what is resident throughout
    (model states, buffers, reserve): the executor allocates nothing for them, they are accounted here."""

    grad_accum: int
    ops: tuple[Op, ...]
    static: tuple[TensorAlloc, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "grad_accum": self.grad_accum,
            "static": [a.to_dict() for a in self.static],
            "ops": [o.to_dict() for o in self.ops],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(
            grad_accum=int(d["grad_accum"]),
            ops=tuple(Op.from_dict(o) for o in d["ops"]),
            static=tuple(TensorAlloc.from_dict(a) for a in d["static"]),
        )


@dataclass(frozen=True, kw_only=True)
class TapCost:
    """One tap a method reads, on which model, its bytes per micro-batch, and when it is freed."""

    method: str
    model: str
    tap: str
    bytes: int
    freed: str  # "after its loss (layerwise)", "after backward", ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "tap": self.tap,
            "bytes": self.bytes,
            "freed": self.freed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TapCost:
        return cls(
            method=d["method"], model=d["model"], tap=d["tap"], bytes=int(d["bytes"]), freed=d["freed"]
        )


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """The choices the search made (or the user pinned)."""

    student_zero_stage: int
    student_offload: str  # none | optimizer | optimizer+parameters
    teacher_placement: str  # replicated | zero3 | zero3_offload | tensor_parallel | offline
    tensor_parallel: int = 1  # teacher tensor-parallel degree (tensor_parallel placement)
    offline_teacher_placement: str = ""  # how the offline teacher pass holds the teacher
    micro_batch: int = 1
    grad_accum: int = 1
    recompute_layers: tuple[int, ...] = ()
    tap_loss: str = "end"  # layerwise | end
    loss_path: str = "logits"  # fused_linear | logits | topk
    attention: str = "sdpa"  # sdpa | eager
    taps: tuple[TapCost, ...] = ()

    def key(self) -> tuple[Any, ...]:
        return (
            self.student_zero_stage,
            self.student_offload,
            self.teacher_placement,
            self.tensor_parallel,
            self.micro_batch,
            self.tap_loss,
            self.loss_path,
        )

    def describe(self) -> str:
        placement = self.teacher_placement
        if placement == "tensor_parallel":
            placement = f"tensor_parallel x{self.tensor_parallel}"
        if placement == "offline":
            placement = f"offline top-k (teacher pass: {self.offline_teacher_placement})"
        offload = "" if self.student_offload == "none" else f" + offload {self.student_offload}"
        return (
            f"student ZeRO-{self.student_zero_stage}{offload}; teacher {placement}; "
            f"micro-batch {self.micro_batch}"
            f" x {self.grad_accum} accumulation; recompute {len(self.recompute_layers)} layers; "
            f"tap losses {self.tap_loss}; logit loss {self.loss_path}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "student_zero_stage": self.student_zero_stage,
            "student_offload": self.student_offload,
            "teacher_placement": self.teacher_placement,
            "tensor_parallel": self.tensor_parallel,
            "offline_teacher_placement": self.offline_teacher_placement,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "recompute_layers": list(self.recompute_layers),
            "tap_loss": self.tap_loss,
            "loss_path": self.loss_path,
            "attention": self.attention,
            "taps": [t.to_dict() for t in self.taps],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Strategy:
        return cls(
            student_zero_stage=int(d["student_zero_stage"]),
            student_offload=d["student_offload"],
            teacher_placement=d["teacher_placement"],
            tensor_parallel=int(d["tensor_parallel"]),
            offline_teacher_placement=d["offline_teacher_placement"],
            micro_batch=int(d["micro_batch"]),
            grad_accum=int(d["grad_accum"]),
            recompute_layers=tuple(int(x) for x in d["recompute_layers"]),
            tap_loss=d["tap_loss"],
            loss_path=d["loss_path"],
            attention=d["attention"],
            taps=tuple(TapCost.from_dict(t) for t in d["taps"]),
        )


@dataclass(frozen=True, kw_only=True)
class Alternative:
    """A strategy the search rejected: its predicted peak, step time, and why it lost."""

    strategy: Strategy
    peak_bytes: int
    fits: bool
    step_time_s: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.to_dict(),
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alternative:
        return cls(
            strategy=Strategy.from_dict(d["strategy"]),
            peak_bytes=int(d["peak_bytes"]),
            fits=bool(d["fits"]),
            step_time_s=float(d["step_time_s"]),
            reason=d["reason"],
        )


@dataclass(frozen=True, kw_only=True)
class PassRecord:
    """One planner pass: its name, wall time, and a one-line summary of what it produced."""

    name: str
    seconds: float
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": self.seconds, "summary": self.summary}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PassRecord:
        return cls(name=d["name"], seconds=float(d["seconds"]), summary=d.get("summary", ""))


@dataclass(frozen=True, kw_only=True)
class Plan:
    version: int = PLAN_VERSION
    inputs: dict[str, Any] = field(default_factory=dict)
    fits: bool
    budget_bytes: int
    peak_bytes: int
    memory: dict[str, int]
    host_bytes: int
    strategy: Strategy
    schedule: Schedule
    deepspeed: dict[str, Any] = field(default_factory=dict)
    estimates: dict[str, Any] = field(default_factory=dict)
    alternatives: tuple[Alternative, ...] = ()
    provenance: tuple[PassRecord, ...] = ()

    def __post_init__(self) -> None:
        if set(self.memory) != set(CATEGORIES):
            raise ValueError(
                f"plan memory must have exactly the categories {CATEGORIES}, got {sorted(self.memory)}"
            )
        if sum(self.memory.values()) != self.peak_bytes:
            raise ValueError(
                f"plan memory categories sum to {sum(self.memory.values())}, not peak_bytes {self.peak_bytes}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "inputs": self.inputs,
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "memory": {c: self.memory[c] for c in CATEGORIES},
            "host_bytes": self.host_bytes,
            "strategy": self.strategy.to_dict(),
            "schedule": self.schedule.to_dict(),
            "deepspeed": self.deepspeed,
            "estimates": self.estimates,
            "alternatives": [a.to_dict() for a in self.alternatives],
            "provenance": [p.to_dict() for p in self.provenance],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        missing = [k for k in PLAN_KEYS if k not in d]
        if missing:
            from gkd.errors import InputError

            raise InputError(f"not a gkd plan: keys {missing} are missing; write plans with `gkd plan -o`")
        if d["version"] != PLAN_VERSION:
            from gkd.errors import InputError

            raise InputError(
                f"plan version {d['version']} is not {PLAN_VERSION}; re-run `gkd plan -o` to refresh it"
            )
        return cls(
            version=int(d["version"]),
            inputs=d["inputs"],
            fits=bool(d["fits"]),
            budget_bytes=int(d["budget_bytes"]),
            peak_bytes=int(d["peak_bytes"]),
            memory={k: int(v) for k, v in d["memory"].items()},
            host_bytes=int(d["host_bytes"]),
            strategy=Strategy.from_dict(d["strategy"]),
            schedule=Schedule.from_dict(d["schedule"]),
            deepspeed=d["deepspeed"],
            estimates=d["estimates"],
            alternatives=tuple(Alternative.from_dict(a) for a in d["alternatives"]),
            provenance=tuple(PassRecord.from_dict(p) for p in d["provenance"]),
        )

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            from gkd.errors import InputError

            raise InputError(
                f"plan is not valid JSON ({err}); write plans with `gkd plan -o plan.json`"
            ) from None
        return cls.from_dict(data)
