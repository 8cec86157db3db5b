"""What a run measures of its memory, per step and per rank, to set against its plan.

Device memory of one optimizer step (all its micro-batches):
- CUDA: `torch.cuda.max_memory_allocated` and `max_memory_reserved`, their peaks reset at the step's start.
  The allocated peak is what the plan predicts minus its reserve (CUDA context and fragmentation).
- CPU: an accounting of tensor storages, so that a CPU run measures what a GPU run does (tensor bytes, not
  the process's resident set, which also holds Python, the libraries and the allocator's free lists). At the
  start of training every live CPU tensor storage is found once through the garbage collector (weights,
  DeepSpeed's partitions and buffers, the teachers); during each step a `TorchDispatchMode` registers every
  new storage an operator returns. Each registered storage carries a weakref finalizer that subtracts its
  bytes when it is freed, so `live` is the bytes of tensor storage alive now and `peak` its largest value
  during the step, model states included. Between steps the mode is off: what is created then (evaluation,
  checkpoints) is not counted, and a storage created then that outlives the step would be missed (none does
  in gkd's loop).
Host memory: the process's proportional and private set sizes (PSS, USS = Private_Clean + Private_Dirty,
from /proc/self/smaps_rollup), not its RSS: forked workers share the parent's pages (the libraries), which
RSS counts once per process and PSS divides among them.

Overhead: the dispatch mode runs Python code per operator (a dict lookup per output tensor, a finalizer per
new storage), about 12 us per operator on this project's 2-core CPU machine: a tiny model's forward and
backward (about 500 operators, 6 ms) takes twice as long. So on the CPU only the first steps, every
`log_every`-th step (those the progress prints) and the last are measured; the others log -1.
`benchmarks/plan_accuracy.py --overhead` times runs with and without it (GKD_MEASURE=0 turns it off).

Not measured on the CPU: storages created outside the dispatcher (`torch.from_numpy`, a C++ extension's own
allocations), and resizing a storage in place (`untyped_storage().resize_`), which DeepSpeed's ZeRO does not
use (it replaces `param.data`).
"""

from __future__ import annotations

import gc
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")
# On the CPU, the steps measured: these first ones (the optimizer states appear in the first), then every
# `every`-th and the last (see StepMemory.begin).
FIRST_MEASURED_STEPS = 3


@dataclass(frozen=True, kw_only=True)
class HostMemory:
    """A process's host memory: proportional and private (unique) set sizes, in bytes."""

    pss: int
    uss: int

    def to_dict(self) -> dict[str, int]:
        return {"pss_bytes": self.pss, "uss_bytes": self.uss}


def host_memory(path: Path = SMAPS_ROLLUP) -> HostMemory | None:
    """This process's PSS and USS from smaps_rollup, or None where the kernel does not provide it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    if "Pss" not in fields:
        return None
    return HostMemory(pss=fields["Pss"], uss=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))


def _storage_tracker_class() -> type:
    """The dispatch-mode tracker class, defined on first use (importing this module imports no torch)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class StorageTracker(TorchDispatchMode):
        """Live and peak bytes of CPU tensor storages (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.sizes: dict[int, int] = {}  # storage key (its StorageImpl address) -> bytes
            self.live = 0
            self.peak = 0

        def add(self, t: Any) -> None:
            if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
                return
            if t.device.type != "cpu" or t.layout is not torch.strided:
                return
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.sizes:  # a view, an in-place result or a storage counted already
                return
            size = storage.nbytes()
            self.sizes[key] = size
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
            weakref.finalize(storage, self._freed, key)

        def _freed(self, key: int) -> None:
            self.live -= self.sizes.pop(key, 0)

        def scan(self) -> None:
            """Register every CPU tensor storage alive now (found through the garbage collector)."""
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self.add(obj)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.add(out)
            elif isinstance(out, (tuple, list)):
                for t in out:
                    if isinstance(t, torch.Tensor):
                        self.add(t)
            return out

    return StorageTracker


def measuring_enabled() -> bool:
    """GKD_MEASURE=0 turns the CPU storage accounting off (to time its overhead); on by default."""
    return os.environ.get("GKD_MEASURE", "1") != "0"


class StepMemory:
    """Per-step device memory of one rank (see the module docstring).

    `start()` once before the first step (after the models are placed and any checkpoint restored); then
    `with meter.step(): ...` around each optimizer step, and `meter.row()` for the step's figures.
    """

    def __init__(self, device: Any, *, every: int = 1, first: int = FIRST_MEASURED_STEPS) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.every, self.first = max(1, every), first
        self.measured = False  # whether the current step is measured
        self.tracker: Any = None
        self.peak = 0
        self.live_at_start = 0
        self.reserved_peak = 0

    @property
    def source(self) -> str:
        if self.cuda:
            return "cuda_max_memory_allocated"
        return "cpu_tensor_storage" if self.tracker is not None else "none"

    def start(self) -> None:
        if not self.cuda and measuring_enabled():
            self.tracker = _storage_tracker_class()()
            self.tracker.scan()

    def live(self) -> int:
        """Bytes of device tensors alive now."""
        import torch

        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self.tracker.live if self.tracker is not None else 0

    def begin(self, step: int, *, last: bool = False) -> None:
        """At the start of optimizer step `step` (0-based): reset the peak to what is alive now. On the CPU
        only the first steps, every `every`-th step and the last are measured (the tracker costs per op)."""
        import torch

        self.measured = self.cuda or (
            self.tracker is not None and (step < self.first or (step + 1) % self.every == 0 or last)
        )
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.live_at_start = int(torch.cuda.memory_allocated(self.device))
        elif self.measured:
            self.tracker.peak = self.live_at_start = self.tracker.live
            self.tracker.__enter__()

    def end(self) -> None:
        """At the end of an optimizer step (after `engine.step()`): read the step's peak."""
        import torch

        if self.cuda:
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            self.reserved_peak = int(torch.cuda.max_memory_reserved(self.device))
        elif self.measured:
            self.tracker.__exit__(None, None, None)
            self.peak = self.tracker.peak

    def row(self) -> dict[str, int]:
        """This step's device figures: the peak, the bytes alive when it started (model states) and, on CUDA,
        the allocator's reserved peak; -1 for a step that was not measured."""
        if not self.measured:
            return {"device_peak_bytes": -1, "device_live_at_start_bytes": -1}
        out = {"device_peak_bytes": self.peak, "device_live_at_start_bytes": self.live_at_start}
        if self.cuda:
            out["device_reserved_peak_bytes"] = self.reserved_peak
        return out


def predicted_device_bytes(plan: Any) -> int:
    """What the device measurement is compared with: the plan's peak without its reserve (the CUDA context
    and the allocator's fragmentation are not tensors; a CPU plan has none)."""
    return int(plan.peak_bytes) - int(plan.memory.get("reserve", 0))


def error(predicted: int, measured: int) -> float | None:
    """|predicted - measured| / measured, or None when nothing was measured."""
    return abs(predicted - measured) / measured if measured > 0 else None


def ranks_per_node(plan: Any) -> int:
    """The ranks that share one host (the plan's GPUs per node, at most its GPUs)."""
    hw = plan.inputs.get("config", {}).get("hardware", {})
    gpus = int(hw.get("gpus", 1))
    return max(1, min(gpus, int(hw.get("gpus_per_node", gpus))))


def predicted_host_bytes(plan: Any, *, start_pss: int, cpu: bool) -> int:
    """A rank's predicted steady host memory (PSS): the process as it was before any model was built (its
    measured footprint: Python, torch, the libraries), plus its share of the plan's host bytes per node, plus,
    on the CPU, its device memory, which is host memory there."""
    share = int(plan.host_bytes) // ranks_per_node(plan)
    return start_pss + share + (predicted_device_bytes(plan) if cpu else 0)


class MemoryRecord:
    """The running maxima over a run's steps, per rank (rank 0 keeps it from the gathered figures), and
    run.json's `memory`: predicted against measured."""

    def __init__(
        self, plan: Any, *, start_pss: list[int], load_pss: list[int], cpu: bool, source: str
    ) -> None:
        self.plan, self.cpu, self.source = plan, cpu, source
        self.start_pss, self.load_pss = start_pss, load_pss
        world = len(start_pss)
        self.device_peaks, self.host_peaks = [0] * world, [0] * world
        self.steps = 0

    def add(self, device_peaks: list[int], host_pss: list[int]) -> None:
        """One step's figures (a device peak of -1: the step was not measured)."""
        self.host_peaks = [max(a, b) for a, b in zip(self.host_peaks, host_pss, strict=True)]
        if min(device_peaks) >= 0:
            self.device_peaks = [max(a, b) for a, b in zip(self.device_peaks, device_peaks, strict=True)]
            self.steps += 1

    def summary(self) -> dict[str, Any]:
        device_pred = predicted_device_bytes(self.plan)
        device_meas = max(self.device_peaks)
        host_pred = [predicted_host_bytes(self.plan, start_pss=s, cpu=self.cpu) for s in self.start_pss]
        # The rank furthest above its prediction, else the one furthest below.
        worst = max(range(len(host_pred)), key=lambda k: abs(self.host_peaks[k] - host_pred[k]))
        return {
            "source": self.source,
            "steps_measured": self.steps,
            "device": {
                "predicted_peak_bytes": device_pred,
                "measured_peak_bytes": device_meas,
                "measured_peak_bytes_per_rank": self.device_peaks,
                "error": error(device_pred, device_meas),
            },
            "host": {
                "predicted_pss_bytes_per_rank": host_pred,
                "measured_pss_bytes_per_rank": self.host_peaks,
                "start_pss_bytes_per_rank": self.start_pss,
                "load_pss_bytes_per_rank": self.load_pss,
                "error": error(host_pred[worst], self.host_peaks[worst]),
            },
        }
