"""Device dispatch for the loss kernels, and the one guarded Triton import.

Every kernel in `gkd.kernels` has two implementations of the same blocked algorithm: Triton kernels for CUDA
tensors and a plain-torch path for everything else. `backend(tensor)` picks one:

* CUDA tensor and Triton importable -> ``"triton"``;
* any other tensor (CPU) -> ``"torch"``;
* CUDA tensor without Triton -> ``"torch"``, with one warning per process (degrade loudly);
* ``GKD_KERNELS=interpret`` -> ``"triton"`` on every device: the Triton kernels run on CPU tensors under
  Triton's interpreter (``TRITON_INTERPRET=1``), which is how the kernels are tested without a GPU. The
  variable must be set before Triton is first imported, because ``triton.jit`` decides at decoration time
  whether a function is compiled or interpreted; this module sets it before its import;
* ``GKD_KERNELS=torch`` -> ``"torch"`` everywhere (for comparisons and debugging).

Kernel modules import ``triton``, ``tl`` and ``jit`` from here. Without Triton, ``jit`` is the identity and
``tl`` is None, so a kernel module still imports (its kernels are plain functions that are never launched;
their ``tl.constexpr`` annotations stay unevaluated strings because kernel modules use postponed annotations).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from gkd.errors import InputError

_MODES = ("auto", "torch", "interpret")
MODE: str = os.environ.get("GKD_KERNELS", "auto").strip().lower() or "auto"
if MODE == "interpret":
    # Must precede the first `import triton` in the process (see the module docstring).
    os.environ["TRITON_INTERPRET"] = "1"

triton: Any
tl: Any
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAS_TRITON = False


def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit` when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


_warned = False


def _warn_no_triton() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "gkd.kernels: Triton is not importable, so CUDA tensors use the plain-torch loss path "
            "(slower, same results); install triton to use the fused kernels",
            RuntimeWarning,
            stacklevel=3,
        )


def backend(tensor: torch.Tensor) -> Literal["triton", "torch"]:
    """Which implementation runs for `tensor`: ``"triton"`` or ``"torch"`` (see the module docstring)."""
    if MODE not in _MODES:
        raise InputError(
            f"GKD_KERNELS={MODE!r} is not a kernel mode; use one of {', '.join(_MODES)} or unset it"
        )
    if MODE == "torch":
        return "torch"
    if MODE == "interpret":
        if not HAS_TRITON:
            raise InputError("GKD_KERNELS=interpret needs Triton; install triton or unset GKD_KERNELS")
        return "triton"
    if tensor.is_cuda:
        if HAS_TRITON:
            return "triton"
        _warn_no_triton()
    return "torch"


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors; keep blocks small there)."""
    return MODE == "interpret"
