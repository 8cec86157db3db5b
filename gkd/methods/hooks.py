"""In-flight tensor operations ("hook ops"): named implementations of `HookOpSpec.op`.

A hook op changes the student's forward rather than adding a loss on captured tensors: BERT-of-Theseus swaps
student blocks for teacher blocks, DIITO swaps token states between examples at aligned layers, LRC-BERT runs
a second forward with a perturbed embedding. The spec names the op (so the planner can charge its extra
forwards and teacher-module placement without running it); the runtime looks the implementation up here and
`gkd.runtime.step.distill_step` drives it.

An implementation is a class registered with `register_hook_op(name)`, usually subclassing `HookOpBase`. The
runtime builds one per resolved method and step (`build_hook_ops`) with keyword arguments: the spec's
`options`, then the method's options, and `method=` (the `ResolvedMethod`: active stage and terms). One step
then runs, in this order (`distill_step`):

1. `install(student, teachers, step=, total_steps=)`: a context manager active around every forward of the
   step, teachers' included: swap modules (Theseus), register forward hooks that record or edit hidden
   states (DIITO, LRC-BERT).
2. the teacher forward(s), under `torch.no_grad()` and tap capture.
3. `before_forward(runner)`: work that must precede the student's main forward (LRC-BERT's clean forward,
   whose embedding gradient perturbs the main one).
4. the student's main forward under tap capture.
5. `extra_forward(runner)`: additional forwards after the main one (DIITO's interchange pass); the returned
   mapping reaches the loss functions as `ctx.aux[<op name>]`.

`runner` is a `gkd.runtime.step.StepRunner`: it runs the student or a teacher on the step's batch under
capture, evaluates the loss, and exposes the batch's mask and the teacher taps of the main pass.

Design choices:
- Ops are rebuilt every step from plain data (spec, options, step), and every random choice they make is
  drawn from a generator seeded by the method's `seed` option and the step, so a step is reproducible and
  needs no op state carried between steps.
- Forward hooks that edit states sit on whole transformer layers. transformers checkpoints a layer's
  `forward`, not its `__call__`, so such hooks run outside the checkpointed region: the recompute in the
  backward pass replays the layer on the already edited input and never re-runs the edit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from gkd.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor, nn

_HOOK_OPS: dict[str, type] = {}


class HookOp(Protocol):
    """What a registered hook-op class implements (see the module docstring for when each is called)."""

    def install(
        self, student: nn.Module, teachers: list[nn.Module], *, step: int, total_steps: int
    ) -> AbstractContextManager[None]: ...

    def before_forward(self, runner: Any) -> None: ...

    def extra_forward(self, runner: Any) -> Mapping[str, Any] | None: ...


class HookOpBase:
    """Defaults for every hook op: no module changes, nothing before or after the main forward.

    Subclasses read their options from keyword arguments; unknown options (the method's other options) are
    ignored, since the runtime passes the whole option dict.
    """

    name = ""

    def __init__(self, *, method: Any = None, seed: int = 0, **_options: Any) -> None:
        self.method = method
        self.seed = int(seed)

    def rng(self, step: int, salt: int = 0) -> random.Random:
        """A generator determined by the seed, the step and a salt: the same step draws the same choices."""
        return random.Random((self.seed * 1_000_003 + step) * 7919 + salt)

    @contextmanager
    def _nothing(self) -> Iterator[None]:
        yield

    def install(
        self, student: nn.Module, teachers: list[nn.Module], *, step: int, total_steps: int
    ) -> AbstractContextManager[None]:
        return self._nothing()

    def before_forward(self, runner: Any) -> None:
        return None

    def extra_forward(self, runner: Any) -> Mapping[str, Any] | None:
        return None


def register_hook_op(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _HOOK_OPS and _HOOK_OPS[name] is not cls:
            raise ValueError(f"hook op {name!r} registered twice")
        _HOOK_OPS[name] = cls
        cls.name = name  # type: ignore[attr-defined]
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
    from gkd.methods.registry import names

    names()
    return sorted(_HOOK_OPS)


def make_hook_op(name: str, options: dict[str, Any]) -> Any:
    return get_hook_op(name)(**options)


def build_hook_ops(resolved: Any) -> list[Any]:
    """One op instance per hook op of `resolved` (a `ResolvedMethods`), built from the owning method's spec
    options, its resolved options and the method itself (`method=`), in the order the methods were given."""
    from gkd.methods.registry import get

    ops = []
    wanted = {h.op for h in resolved.hook_ops}
    for method in resolved.methods:
        if not method.terms:
            continue  # resolve only adds the hook ops of methods with active terms
        for spec_op in get(method.name).hook_ops:
            if spec_op.op in wanted:
                options = {**dict(spec_op.options), **method.options, "method": method}
                ops.append(make_hook_op(spec_op.op, options))
    return ops


def layer_output(output: Any) -> Tensor:
    """The hidden states of a transformer layer's output (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, tuple | list) else output


def replace_layer_output(output: Any, states: Tensor) -> Any:
    """`output` with its hidden states replaced by `states`, keeping the layer's output structure."""
    if isinstance(output, tuple | list):
        return type(output)((states, *output[1:]))
    return states
