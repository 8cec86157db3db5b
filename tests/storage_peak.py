"""`StoragePeak`: the peak of live CPU tensor storage bytes created inside a `with` block, for the tests that
check how much memory loading, splitting or a CPU kernel holds at once (tests/runtime/test_loading.py,
tests/planner/test_cpu_relation.py, tests/e2e/test_tensor_parallel.py)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class StoragePeak(TorchDispatchMode):
    """The largest sum of live CPU tensor storage bytes created inside (each storage counted once, freed when
    its storage is): `with StoragePeak() as peak: ...`, then `peak.peak`."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen and storage.nbytes():
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes
