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

import errno
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.config import STUDENT_OFFLOADS, TAP_LOSS_PLACES, TEACHER_PLACEMENTS
from gkd.errors import InputError, shown

PLAN_VERSION = 1


OP_KINDS = (
    "teacher_forward",
    "student_forward",
    "tap_loss",
    "logit_loss",
    "student_recompute",
    "student_backward",
    "gather",
    "optimizer_step",
    "offline_teacher_pass",
    "load_topk",
    "generate",
)
PHASES = ("micro", "step", "offline", "before")
PLAN_LOSS_PATHS = ("fused_linear", "logits", "topk")
ATTENTIONS = ("sdpa", "eager")
# Counts and sizes in a plan: anything larger is not one gkd wrote (2^62 bytes is 4 EiB).
_PLAN_MAX = 1 << 62


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
            raise ValueError(f"unknown memory category {shown(self.category)}")
        if self.bytes < 0:
            raise ValueError(f"tensor {self.name} has negative size {self.bytes}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "category": self.category}

    @classmethod
    def from_dict(cls, d: Any, where: str = "alloc") -> TensorAlloc:
        f = Fields(d, where)
        return cls(name=f.text("name"), bytes=f.count("bytes"), category=f.choice("category", CATEGORIES))


@dataclass(frozen=True, kw_only=True)
class Op:
    """One operation of the schedule.

    kind: teacher_forward | student_forward | tap_loss | logit_loss | student_recompute | student_backward |
    gather | optimizer_step | offline_teacher_pass | load_topk | generate. `model` is "student", "teacher0",
    ...;
    `layer` the layer index or -1 (embedding / head / whole model). `taps` are the tap names captured or read,
    `losses` the loss terms computed ("method.term"). `allocs` exist from the start of the op; `frees` are
    released at its end (a tensor in both is a transient workspace). `phase`: "micro" ops repeat once per
    micro-batch (grad_accum times), "step" ops once per optimizer step, "offline" ops run before training
    without the training's resident tensors, "before" ops once before training with them.

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
    - generate: `model` samples completions with a key/value cache (gkd.runtime.generation, sequence_kd):
      the student for a sampled micro-batch (on_policy), the first teacher before training (sequence_kd).
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
    def from_dict(cls, d: Any, where: str = "op") -> Op:
        f = Fields(d, where)
        return cls(
            name=f.text("name"),
            kind=f.choice("kind", OP_KINDS),
            model=f.text("model"),
            layer=f.count("layer", minimum=-1),
            phase=f.choice("phase", PHASES),
            recompute=f.flag("recompute"),
            taps=f.texts("taps"),
            losses=f.texts("losses"),
            allocs=tuple(TensorAlloc.from_dict(a, w) for a, w in f.items("allocs")),
            frees=f.texts("frees"),
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
    def from_dict(cls, d: Any, where: str = "schedule") -> Schedule:
        f = Fields(d, where)
        return cls(
            grad_accum=f.count("grad_accum", minimum=1),
            ops=tuple(Op.from_dict(o, w) for o, w in f.items("ops")),
            static=tuple(TensorAlloc.from_dict(a, w) for a, w in f.items("static")),
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
    def from_dict(cls, d: Any, where: str = "tap") -> TapCost:
        f = Fields(d, where)
        return cls(
            method=f.text("method"),
            model=f.text("model"),
            tap=f.text("tap"),
            bytes=f.count("bytes"),
            freed=f.text("freed"),
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
    def from_dict(cls, d: Any, where: str = "strategy") -> Strategy:
        """The strategy, each field's type and range checked (InputError naming the field): a plan file is
        data from outside, and these choices select what the runtime executes."""
        f = Fields(d, where)
        layers = [(f.whole(x, w), w) for x, w in f.items("recompute_layers")]
        for layer, w in layers:
            if layer < 0:
                raise f.bad(w, "a layer index >= 0", layer)
        return cls(
            student_zero_stage=f.count("student_zero_stage", maximum=3),
            student_offload=f.choice("student_offload", STUDENT_OFFLOADS),
            teacher_placement=f.choice("teacher_placement", TEACHER_PLACEMENTS),
            tensor_parallel=f.count("tensor_parallel", minimum=1),
            offline_teacher_placement=f.choice("offline_teacher_placement", ("", *TEACHER_PLACEMENTS)),
            micro_batch=f.count("micro_batch", minimum=1),
            grad_accum=f.count("grad_accum", minimum=1),
            recompute_layers=tuple(x for x, _ in layers),
            tap_loss=f.choice("tap_loss", TAP_LOSS_PLACES),
            loss_path=f.choice("loss_path", PLAN_LOSS_PATHS),
            attention=f.choice("attention", ATTENTIONS),
            taps=tuple(TapCost.from_dict(t, w) for t, w in f.items("taps")),
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
    def from_dict(cls, d: Any, where: str = "alternative") -> Alternative:
        f = Fields(d, where)
        return cls(
            strategy=Strategy.from_dict(f.get("strategy"), f.where_of("strategy")),
            peak_bytes=f.count("peak_bytes"),
            fits=f.flag("fits"),
            step_time_s=f.number("step_time_s"),
            reason=f.text("reason"),
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
    def from_dict(cls, d: Any, where: str = "pass") -> PassRecord:
        f = Fields(d, where)
        summary = f.text("summary") if "summary" in f.d else ""
        return cls(name=f.text("name"), seconds=f.number("seconds"), summary=summary)


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
    def from_dict(cls, d: Any) -> Plan:
        """The plan in `d` (parsed JSON), every field's type and range checked: InputError naming the first
        bad field. What the fields must agree with (the inputs, the DeepSpeed configs gkd generates) is
        checked where the plan is run (gkd.runtime.checks)."""
        if not isinstance(d, dict):
            raise InputError(
                f"not a gkd plan: its top level is a {type(d).__name__}; write plans with `gkd plan -o`"
            )
        missing = [k for k in PLAN_KEYS if k not in d]
        if missing:
            raise InputError(f"not a gkd plan: keys {missing} are missing; write plans with `gkd plan -o`")
        if d["version"] != PLAN_VERSION or isinstance(d["version"], bool):
            raise InputError(
                f"plan version {shown(d['version'])} is not {PLAN_VERSION}; re-run `gkd plan -o` to refresh "
                "it"
            )
        f = Fields(d, "")
        memory = f.mapping("memory")
        if set(memory) != set(CATEGORIES):
            raise f.bad("memory", f"an object with exactly the keys {', '.join(CATEGORIES)}", sorted(memory))
        sizes = {k: Fields(memory, "memory").count(k) for k in CATEGORIES}
        peak = f.count("peak_bytes")
        if sum(sizes.values()) != peak:
            raise f.bad("peak_bytes", f"the sum of memory's categories ({sum(sizes.values())})", peak)
        return cls(
            version=PLAN_VERSION,
            inputs=f.mapping("inputs"),
            fits=f.flag("fits"),
            budget_bytes=f.count("budget_bytes"),
            peak_bytes=peak,
            memory=sizes,
            host_bytes=f.count("host_bytes"),
            strategy=Strategy.from_dict(f.get("strategy"), "strategy"),
            schedule=Schedule.from_dict(f.get("schedule"), "schedule"),
            deepspeed=f.mapping("deepspeed"),
            estimates=f.mapping("estimates"),
            alternatives=tuple(Alternative.from_dict(a, w) for a, w in f.items("alternatives")),
            provenance=tuple(PassRecord.from_dict(p, w) for p, w in f.items("provenance")),
        )

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except RecursionError:
            raise InputError(
                "plan nests too deeply to be one; write plans with `gkd plan -o plan.json`"
            ) from None
        except ValueError as err:  # JSONDecodeError, and integers past Python's digit limit
            detail = shown(str(err).splitlines()[0] if str(err) else type(err).__name__, 160).strip("'\"")
            raise InputError(
                f"plan is not valid JSON ({detail}); write plans with `gkd plan -o plan.json`"
            ) from None
        return cls.from_dict(data)

    def write(self, path: str | Path) -> None:
        """Write the plan's JSON to `path` atomically (gkd.files.write_atomically): a reader sees the old file
        or the whole new one, and a full disk leaves the old file as it was. InputError naming the failure
        (e.g. "no space left on device")."""
        from gkd.files import write_atomically

        try:
            write_atomically(Path(path), self.to_json())
        except OSError as err:
            reason = (err.strerror or type(err).__name__).lower()
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            fix = "free space there or choose another path" if full else "choose a path in a writable folder"
            raise InputError(f"cannot write the plan to {path}: {reason}; {fix}") from None


class Fields:
    """One JSON object of a plan, read field by field with its type and range checked; `where` is the
    object's path in the plan ("strategy", "schedule.ops[3]"), so that a message names the bad field."""

    def __init__(self, d: Any, where: str) -> None:
        if not isinstance(d, dict):
            raise self.bad(where, "a JSON object", d)
        self.d: dict[str, Any] = d
        self.where = where

    def where_of(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    @staticmethod
    def bad(where: str, expected: str, value: Any) -> InputError:
        return InputError(
            f"plan field {where or 'top level'} must be {expected}, got {shown(value)}; re-plan with "
            "`gkd plan CONFIG -o plan.json` rather than editing a plan"
        )

    def get(self, key: str) -> Any:
        if key not in self.d:
            raise InputError(
                f"plan field {self.where_of(key)} is missing; re-plan with `gkd plan CONFIG -o plan.json`"
            )
        return self.d[key]

    def whole(self, value: Any, where: str, minimum: int = 0, maximum: int = _PLAN_MAX) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            span = f">= {minimum}" if maximum == _PLAN_MAX else f"from {minimum} to {maximum}"
            raise self.bad(where, f"a whole number {span}", value)
        return value

    def count(self, key: str, *, minimum: int = 0, maximum: int = _PLAN_MAX) -> int:
        return self.whole(self.get(key), self.where_of(key), minimum, maximum)

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.bad(self.where_of(key), "a finite number", value)
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.bad(self.where_of(key), "true or false", value)
        return value

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.bad(self.where_of(key), "a string", value)
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key)
        if not isinstance(value, str) or value not in allowed:
            raise self.bad(self.where_of(key), "one of " + ", ".join(repr(a) for a in allowed), value)
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self.bad(self.where_of(key), "a JSON object", value)
        return value

    def items(self, key: str) -> list[tuple[Any, str]]:
        """The items of a list field, each with its path ("schedule.ops[3]")."""
        value = self.get(key)
        if not isinstance(value, list):
            raise self.bad(self.where_of(key), "a list", value)
        return [(item, f"{self.where_of(key)}[{i}]") for i, item in enumerate(value)]

    def texts(self, key: str) -> tuple[str, ...]:
        out = []
        for item, where in self.items(key):
            if not isinstance(item, str):
                raise self.bad(where, "a string", item)
            out.append(item)
        return tuple(out)
