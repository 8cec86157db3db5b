"""Distillation methods as data: specs, layer mappings, combination, and the executable loss.

Public API: `get(name) -> MethodSpec`, `names() -> list[str]`, `resolve(methods, teachers, student, *, step=0,
total_steps=0) -> ResolvedMethods`, `DistillLoss(resolved, teachers, student)`.

How to add a method (see docs/methods.md for the full guide):
1. Put it in its family file `gkd/methods/<family>.py` (logit.py, divergence.py, hidden.py, relation.py,
   attention.py, multi_teacher.py, ...; a new file needs no registration anywhere: the registry imports every
   module of this package that is not framework).
2. Write its loss functions as `@register_loss("<method>.<term>") def f(ctx: LossContext) -> Tensor`, reading
   tensors with `ctx.s(tap, depth)` / `ctx.t(tap, depth)` over `ctx.layer_pairs(tap)`, extras with
   `ctx.extra(name, index)`, options from `ctx.options`; call `gkd.kernels` where a kernel exists. Name
   torch as the other family files do (`torch = lazy_import("torch")`, the real import under
   `TYPE_CHECKING`), never with a module-level `import torch`: resolving methods must not import it
   (tests/methods/test_torch_free.py checks).
3. Declare it with `register(MethodSpec(...))`: taps (`TapSpec(kind, layers=LayerRule(...))`), terms
   (`LossTermSpec(name, fn, kernel, taps, weight / weight_option, temperature, schedule)`), extras
   (`ExtraSpec`), constraints, stages (`StageSpec`), hook ops (`HookOpSpec`), teachers / aggregation, options.
4. Test it in `tests/methods/test_<family>.py` with the helpers of tests/methods/conftest.py: `check_formula`
   (loss on random tensors vs a float64 formula written in the test) and `check_backward` (tiny real models,
   real tap capture, gradients reach student and extras, never the teacher).

Importing this package, `get`, `names` and `resolve` import no torch: the planner resolves methods without
running anything, and importing torch alone costs about 2 s. Family files name torch through
`gkd.lazy.lazy_import`, so it is imported when a loss first runs; `DistillLoss` (an `nn.Module`, in
`gkd.methods.distill_loss`) is imported on first access to `gkd.methods.DistillLoss` (PEP 562).
"""

from typing import TYPE_CHECKING, Any

from gkd.methods.combine import ResolvedMethods, resolve
from gkd.methods.registry import get, names, register

if TYPE_CHECKING:
    from gkd.methods.distill_loss import DistillLoss


def __getattr__(name: str) -> Any:
    if name == "DistillLoss":
        from gkd.methods.distill_loss import DistillLoss

        return DistillLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DistillLoss", "ResolvedMethods", "get", "names", "register", "resolve"]
