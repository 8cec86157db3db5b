"""In-flight tensor operations ("hook ops"): named implementations of `HookOpSpec.op`.

A hook op changes the student's forward rather than adding a loss on captured tensors: BERT-of-Theseus swaps
student blocks for teacher blocks, DIITO swaps token states between examples at aligned layers, LRC-BERT runs
a
second forward with a perturbed embedding. The spec names the op (so the planner can charge its extra forwards
and teacher-module placement without running it); the runtime looks the implementation up here.

An implementation is a class registered with `register_hook_op(name)`; the runtime builds one per resolved
method with (spec options, the method's options) and, every step, calls `install(student, teachers, step,
total_steps)`, which returns a context manager active around the student forward(s). Ops with
`extra_forwards > 0` also implement `extra_forward(run_student, batch)` that performs the additional
forward(s)
and returns their tap dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from torch import Tensor, nn

from gkd.errors import InputError

_HOOK_OPS: dict[str, type] = {}


class HookOp(Protocol):
    """What a registered hook-op class implements. Constructed with keyword options (the spec's `options`
    merged with the method's options)."""

    def install(
        self, student: nn.Module, teachers: list[nn.Module], *, step: int, total_steps: int
    ) -> AbstractContextManager[None]:
        """Active around the student forward(s) of one step: swap modules (Theseus), register forward hooks
        that edit hidden states (DIITO), or nothing (LRC-BERT)."""
        ...

    def extra_forward(
        self, run_student: Callable[[], Mapping[str, Tensor]], batch: Mapping[str, Tensor]
    ) -> Mapping[str, Tensor]:
        """Only for ops with extra_forwards > 0: run the additional student forward (`run_student` runs the
        student under tap capture and returns its taps) and return those taps; `DistillLoss` passes them to
        the loss functions as `ctx.aux[<op name>]`."""
        ...


def register_hook_op(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _HOOK_OPS and _HOOK_OPS[name] is not cls:
            raise ValueError(f"hook op {name!r} registered twice")
        _HOOK_OPS[name] = cls
        return cls

    return deco


def get_hook_op(name: str) -> type:
    from gkd.methods.registry import names

    names()  # family files register their hook ops on import
    cls = _HOOK_OPS.get(name)
    if cls is None:
        raise InputError(
            f"hook op {name!r} has no implementation; known: {', '.join(sorted(_HOOK_OPS)) or 'none'}"
        )
    return cls


def hook_op_names() -> list[str]:
    return sorted(_HOOK_OPS)


def make_hook_op(name: str, options: dict[str, Any]) -> Any:
    return get_hook_op(name)(**options)
