"""What a run measures of its memory, per step and per rank, to set against its plan.

Device memory of one optimizer step (all its micro-batches):
- CUDA: `torch.cuda.max_memory_allocated` and `max_memory_reserved`, their peaks reset at the step's start.
  The allocated peak is what the plan predicts minus its reserve (CUDA context and fragmentation).
- CPU: an accounting of tensor storages, so that a CPU run measures what a GPU run does (tensor bytes, not
  the process's resident set, which also holds Python, the libraries and the allocator's free lists). At the
  start of training the storages reachable from the engines and the teachers are registered (weights,
  gradients, optimizer states, DeepSpeed's partitions and buffers); during each measured step a
  `TorchDispatchMode` registers every new storage an operator returns. Each registered storage carries a
  weakref finalizer that subtracts its bytes when it is freed, so `live` is the bytes of tensor storage
  alive now and `peak` its largest value during the step, model states included. Between steps the mode is
  off: what is created then (evaluation, checkpoints) is not counted, nor is a storage created in an
  unmeasured step that outlives it (in gkd's loop the optimizer states appear in the first step, which is
  measured).
Host memory: the process's proportional and private set sizes (PSS, USS = Private_Clean + Private_Dirty,
from /proc/self/smaps_rollup), not its RSS: forked workers share the parent's pages (the libraries), which
RSS counts once per process and PSS divides among them. Tensors are malloc'd, and glibc keeps what they
free in its arenas, so the runtime hands the freed pages back (`release_freed_memory`, glibc's
`malloc_trim(0)`) once per phase: after each model is loaded, after the engines are set up and after each
of the first steps; otherwise the footprint read after step 1 counts the allocator's free lists. Before
any model is built it also fixes glibc's mmap threshold (`map_large_allocations`), so that large tensors
freed during a step are unmapped at once instead of kept in its arenas.

Overhead: the dispatch mode runs Python code per operator (a dict lookup per output tensor, a finalizer per
new storage). On small models it is within a shared machine's noise (`benchmarks/plan_accuracy.py
--overhead`, GKD_MEASURE=0 turning it off); a model of tiny operators feels it more, so on the CPU only the
first steps, every `log_every`-th step (those the progress prints) and the last are measured; the others
log -1.

Not measured on the CPU: storages created outside the dispatcher (`torch.from_numpy`, a C++ extension's own
allocations), and resizing a storage in place (`untyped_storage().resize_`), which DeepSpeed's ZeRO does not
use (it replaces `param.data`).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterator
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


_LIBC: Any = None  # glibc, once found (False: not glibc, or not Linux)


def _glibc() -> Any:
    """glibc through ctypes where this process runs on it, else False (musl, macOS, Windows have no
    `malloc_trim`)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if libc.gnu_get_libc_version and libc.malloc_trim and libc.mallopt:  # glibc-only
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    libc.malloc_trim.restype = ctypes.c_int
                    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    libc.mallopt.restype = ctypes.c_int
                    _LIBC = libc
            except (OSError, AttributeError):
                pass
    return _LIBC


def release_freed_memory() -> bool:
    """Hand the memory the C allocator holds free back to the OS (glibc's `malloc_trim(0)`), and say
    whether it could. Tensors are allocated with malloc: glibc keeps what they free in its arenas (the
    main heap is only shrunk from its top, and chunks under the dynamic mmap threshold, which rises to
    32 MiB as large blocks are freed, live there), so after loading and engine setup, whose staging buffers
    and whole-tensor copies are freed, the process keeps pages that no tensor uses. The call walks the free
    lists (milliseconds on a few GiB), so it runs at phase ends, not per operator. A no-op off glibc."""
    libc = _glibc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True


# glibc's mallopt parameter (malloc.h) and the threshold the runtime fixes it at: large enough that small
# tensors stay in the heap (no mapping and page faults per allocation), small enough that weights,
# gathered parameters and activations of any model worth distilling are mapped. In the headline-shaped
# job of benchmarks/bench_load_memory.py, 128 KiB (glibc's initial value) and 4 MiB gave the same peak.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20


def map_large_allocations() -> bool:
    """Have glibc serve every allocation of MMAP_THRESHOLD_BYTES or more with its own mapping, unmapped
    when freed, and say whether it could (a no-op off glibc). By default glibc raises its mmap threshold
    to the size of each large block freed (up to 32 MiB), after which such blocks come from its arenas,
    which keep them when freed: in the headline-shaped ZeRO-3 job of `benchmarks/bench_load_memory.py
    --job-only` the workers' PSS peaked at about 3 GiB over their tensor storage that way, and at 0.4 GiB
    with the threshold fixed. Fixed, freed large tensors leave the process at once; called before any
    model is built. The cost is a fresh mapping, zeroed page by page, for each large allocation: on the
    CPU a step of large matmuls ran about 12% slower (`benchmarks/bench_mmap_threshold.py`). A threshold
    set in glibc's own environment variable (MALLOC_MMAP_THRESHOLD_) is left as it is."""
    libc = _glibc()
    if not libc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


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
            if self.sites is not None:
                self.sites[key] = self._site()
            if self.live > self.peak:
                self.peak = self.live
                if self.sites is not None:
                    self.at_peak = {}
                    for k, where in self.sites.items():
                        self.at_peak[where] = self.at_peak.get(where, 0) + self.sizes.get(k, 0)
            weakref.finalize(storage, self._freed, key)

        def _freed(self, key: int) -> None:
            self.live -= self.sizes.pop(key, 0)
            if self.sites is not None:
                self.sites.pop(key, None)

        # Diagnosis (GKD_MEASURE=sites): where each live storage was created, and what was alive at the peak.
        sites: dict[int, str] | None = None
        at_peak: dict[str, int] = {}
        op = ""

        def _site(self) -> str:
            if self.op.startswith("before training"):
                return self.op
            frame = sys._getframe(3)
            while frame is not None:
                name = frame.f_code.co_filename
                if ("/gkd/" in name or "/transformers/" in name or "/deepspeed/" in name) and (
                    "_python_dispatch" not in name and "gkd/runtime/memory" not in name
                ):
                    where = name.split("/site-packages/")[-1].split("/gkd/")[-1]
                    return f"{self.op} {where}:{frame.f_lineno} {frame.f_code.co_name}"
                frame = frame.f_back
            return f"{self.op} ?"

        def scan(self, *roots: Any) -> None:
            """Register the CPU tensor storages reachable from `roots` (see `_reachable_tensors`)."""
            for t in _reachable_tensors(roots):
                if self.sites is not None:
                    self.op = f"before training: {type(t).__name__} {t.dtype}"
                self.add(t)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            self.op = func.__name__ if self.sites is not None else ""
            if isinstance(out, torch.Tensor):
                self.add(out)
            elif isinstance(out, (tuple, list)):
                for t in out:
                    if isinstance(t, torch.Tensor):
                        self.add(t)
            return out

    return StorageTracker


# Objects whose attributes are searched for tensors: the engines, their optimizers, modules, gkd's own.
_WALKED_MODULES = ("deepspeed", "torch.optim", "torch.nn", "gkd", "transformers")
_WALK_DEPTH = 6


def _reachable_tensors(roots: tuple[Any, ...]) -> Iterator[Any]:
    """The tensors reachable from `roots` through modules (parameters, their ZeRO-3 partitions, buffers,
    gradients), optimizers (states) and the attributes, lists and dicts of DeepSpeed's, torch's and gkd's
    objects, to a bounded depth.

    Not the garbage collector's whole list: a forked worker shares its Python heap with the parent until it
    writes to it, and visiting every object (each visit writes its reference count) would copy all those pages
    into the worker, costing host memory that is then measured."""
    import torch

    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(r, 0) for r in roots]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > _WALK_DEPTH:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu" and obj.layout is torch.strided:
                yield obj
            if obj.grad is not None:
                stack.append((obj.grad, depth + 1))
            # A ZeRO-3 parameter's own partition: its `data` is empty between gathers, and a model without an
            # optimizer (a zero3 teacher) holds the partition nowhere else.
            partition = getattr(obj, "ds_tensor", None)
            if isinstance(partition, torch.Tensor):
                stack.append((partition, depth + 1))
            continue
        if isinstance(obj, torch.nn.Module):
            stack.extend((t, depth + 1) for t in obj.parameters())
            stack.extend((t, depth + 1) for t in obj.buffers())
        if isinstance(obj, torch.optim.Optimizer):
            stack.extend((v, depth + 1) for v in obj.state.values())
            stack.extend((g, depth + 1) for g in obj.param_groups)
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in obj)
        elif type(obj).__module__.startswith(_WALKED_MODULES) and hasattr(obj, "__dict__"):
            stack.extend((v, depth + 1) for v in vars(obj).values())


def cap_memory(device: Any) -> None:
    """GKD_CUDA_MEMORY_CAP=BYTES caps this process's CUDA allocator at that many bytes
    (`torch.cuda.set_per_process_memory_fraction`): a GPU check runs a job that fits only because of offload
    or recompute on a GPU larger than its plan's budget (benchmarks/device/gpu_run.py)."""
    cap = os.environ.get("GKD_CUDA_MEMORY_CAP")
    if not cap:
        return
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap) / total), device)


def measuring_enabled() -> bool:
    """GKD_MEASURE=0 turns the CPU storage accounting off (to time its overhead); on by default."""
    return os.environ.get("GKD_MEASURE", "1") != "0"


class StepMemory:
    """Per-step device memory of one rank (see the module docstring).

    `start(engine, ...)` once before the first step (after the models are placed and
    any checkpoint restored); then `begin(step)` and `end()` around each optimizer step, and `row()` for the
    step's figures.
    """

    def __init__(self, device: Any, *, every: int = 1, first: int = FIRST_MEASURED_STEPS) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            cap_memory(device)
        self.every, self.first = max(1, every), first
        self.measured = False  # whether the current step is measured
        self.tracker: Any = None
        self.peak = 0
        self.live_at_start = 0
        self.reserved_peak = 0
        self.step = 0

    @property
    def source(self) -> str:
        if self.cuda:
            return "cuda_max_memory_allocated"
        return "cpu_tensor_storage" if self.tracker is not None else "none"

    def start(self, *roots: Any) -> None:
        """Before the first step: on the CPU, register the tensors alive now that are reachable from `roots`
        (the engines and the teachers: model states, DeepSpeed's partitions and buffers)."""
        if not self.cuda and measuring_enabled():
            self.tracker = _storage_tracker_class()()
            if os.environ.get("GKD_MEASURE") == "sites":
                self.tracker.sites = {}
                self.tracker.op = "before training"
            self.tracker.scan(*roots)

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

        self.step = step
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
        """At the end of an optimizer step (after `engine.step()`): read the step's peak. After the first
        steps, which initialise lazily (optimizer states, DeepSpeed's buffers, autograd's), the memory freed
        is handed back to the OS (`release_freed_memory`), so the footprint read after step 1 is what the
        process keeps, not what the allocator holds free."""
        import torch

        if self.step < self.first:
            release_freed_memory()

        if self.cuda:
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            self.reserved_peak = int(torch.cuda.max_memory_reserved(self.device))
        elif self.measured:
            self.tracker.__exit__(None, None, None)
            self.peak = self.tracker.peak
            if self.tracker.sites is not None:
                self._write_sites()

    def _write_sites(self) -> None:
        """Diagnosis: the bytes alive at this step's peak by creation site, largest first, into
        $GKD_MEASURE_DIR/sites-rank<R>.json (GKD_MEASURE=sites)."""
        import json

        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        folder = Path(os.environ.get("GKD_MEASURE_DIR", "."))
        rows = sorted(self.tracker.at_peak.items(), key=lambda kv: -kv[1])
        (folder / f"sites-rank{rank}.json").write_text(
            json.dumps({"peak": self.peak, "sites": rows}, indent=0)
        )

    def row(self) -> dict[str, int]:
        """This step's device figures: the peak, the bytes alive when it started (model states) and, on CUDA,
        the allocator's reserved peak; -1 for a step that was not measured."""
        if not self.measured:
            return {"device_peak_bytes": -1, "device_live_at_start_bytes": -1}
        out = {"device_peak_bytes": self.peak, "device_live_at_start_bytes": self.live_at_start}
        if self.cuda:
            out["device_reserved_peak_bytes"] = self.reserved_peak
        return out


def training_memory(plan: Any) -> dict[str, int]:
    """The plan's bytes per category at the peak of its training steps: `plan.memory`, unless an offline
    teacher's pass (which runs before training and is not measured) is the plan's peak."""
    from dataclasses import replace

    from gkd.planner.schedule import simulate

    # What runs before training (an offline pass, sequence_kd's generation) is not measured per step.
    training = tuple(op for op in plan.schedule.ops if op.phase not in ("offline", "before"))
    if len(training) == len(plan.schedule.ops):
        return {k: int(v) for k, v in plan.memory.items()}
    return dict(simulate(replace(plan.schedule, ops=training)).by_category)


def predicted_device_bytes(plan: Any) -> int:
    """What the device measurement is compared with: the plan's peak of the training steps (`training_memory`)
    without its reserve (the CUDA context and the allocator's fragmentation are not tensors; a CPU plan has
    none)."""
    memory = training_memory(plan)
    return sum(memory.values()) - memory.get("reserve", 0)


def error(predicted: int, measured: int) -> float | None:
    """|predicted - measured| / measured, or None when nothing was measured."""
    return abs(predicted - measured) / measured if measured > 0 else None


def ranks_per_node(plan: Any) -> int:
    """The ranks that share one host (the plan's GPUs per node, at most its GPUs)."""
    hw = plan.inputs.get("config", {}).get("hardware", {})
    gpus = int(hw.get("gpus", 1))
    return max(1, min(gpus, int(hw.get("gpus_per_node", gpus))))


def predicted_host_bytes(plan: Any, *, footprint: int, cpu: bool) -> int:
    """A rank's predicted steady host memory (PSS): its measured footprint (see `MemoryRecord`), plus its
    share of the plan's host bytes per node, plus, on the CPU, its predicted device peak (host memory there).
    """
    share = int(plan.host_bytes) // ranks_per_node(plan)
    return footprint + share + (predicted_device_bytes(plan) if cpu else 0)


class MemoryRecord:
    """The running maxima over a run's steps, per rank (rank 0 keeps it from the gathered figures), and
    run.json's `memory`: predicted against measured.

    The plan predicts tensors, not the process around them (Python, the libraries, DeepSpeed's threads, what
    the first step initialises lazily), so the host prediction adds a measured footprint: the process's PSS
    at the end of its first step, less, on the CPU, the tensor storage alive then (the device accounting:
    there the tensors are host memory, which the plan predicts). The steady state it is compared with is the
    largest PSS of the later steps (of the first, when the run has one step)."""

    def __init__(
        self, plan: Any, *, start_pss: list[int], load_pss: list[int], cpu: bool, source: str
    ) -> None:
        self.plan, self.cpu, self.source = plan, cpu, source
        self.start_pss, self.load_pss = start_pss, load_pss
        world = len(start_pss)
        self.device_peaks = [0] * world
        self.footprint: list[int] | None = None
        self.first_pss: list[int] = [0] * world
        self.host_peaks: list[int] | None = None  # after the first step
        self.steps = 0

    def add(self, device_peaks: list[int], host_pss: list[int], device_live: list[int]) -> None:
        """One step's figures per rank: its device peak (-1: not measured), the PSS at its end and the device
        bytes alive then."""
        if self.footprint is None:
            self.first_pss = host_pss
            live = device_live if self.cpu else [0] * len(host_pss)
            self.footprint = [p - t for p, t in zip(host_pss, live, strict=True)]
        else:
            before = self.host_peaks or [0] * len(host_pss)
            self.host_peaks = [max(a, b) for a, b in zip(before, host_pss, strict=True)]
        if min(device_peaks) >= 0:
            self.device_peaks = [max(a, b) for a, b in zip(self.device_peaks, device_peaks, strict=True)]
            self.steps += 1

    def summary(self) -> dict[str, Any]:
        device_pred = predicted_device_bytes(self.plan)
        device_meas = max(self.device_peaks)
        footprint = self.footprint or self.start_pss
        host_peaks = self.host_peaks or self.first_pss
        host_pred = [predicted_host_bytes(self.plan, footprint=f, cpu=self.cpu) for f in footprint]
        host_errors = [error(p, m) for p, m in zip(host_pred, host_peaks, strict=True)]
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
                "measured_pss_bytes_per_rank": host_peaks,
                "start_pss_bytes_per_rank": self.start_pss,
                "load_pss_bytes_per_rank": self.load_pss,
                "footprint_bytes_per_rank": footprint,
                "error": max((e for e in host_errors if e is not None), default=None),  # the worst rank
            },
        }
