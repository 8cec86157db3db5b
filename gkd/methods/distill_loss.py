"""The executable loss: `DistillLoss(resolved, teachers, student)`, the `nn.Module` side of `ResolvedMethods`.

`DistillLoss` holds every method's trainable extras (so the optimizer and checkpoints include them);
`forward(student_taps, teacher_taps, ...)` evaluates each resolved term on the captured dicts and returns the
weighted total and the per-term values (`LossOutput`).

Design choices:
- It lives apart from `gkd.methods.combine` (which resolves methods into plain data) because it subclasses
  `torch.nn.Module` and so needs torch at import time; planning imports `combine` and never this module, so a
  plan that needs no model pays nothing for torch. `gkd.methods` re-exports it lazily.
- Schedules multiply a term's resolved weight per step here, not in `resolve`: the resolved weights are the
  planner's data, fixed for the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gkd.methods.combine import ResolvedExtra, ResolvedMethods, ResolvedTerm, stage_window
from gkd.methods.losses import LossContext, get_loss
from gkd.methods.registry import get
from gkd.methods.spec import LossTermSpec, MethodSpec


def _build_extra(extra: ResolvedExtra) -> nn.Module:
    def one(shape: tuple[int, int]) -> nn.Module:
        if extra.kind == "linear":
            return nn.Linear(shape[0], shape[1], bias=extra.bias)
        p = nn.Parameter(torch.empty(shape))
        nn.init.normal_(p, std=shape[0] ** -0.5)
        holder = nn.Module()
        holder.weight = p
        return holder

    if extra.per == "none":
        return one(extra.shapes[0])
    return nn.ModuleList(one(s) for s in extra.shapes)


@dataclass(kw_only=True)
class LossOutput:
    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # "<method>.<term>" -> weighted value


class DistillLoss(nn.Module):
    """The executable side of `ResolvedMethods`: holds every method's extras and evaluates the loss terms.

    Extras live in `self.extras[<method>][<extra>]` (an `nn.Linear`, or an `nn.ModuleList` of per-teacher /
    per-layer copies), so `DistillLoss.parameters()` are exactly the trainable extras.
    """

    def __init__(self, resolved: ResolvedMethods, teachers: Sequence[Any], student: Any) -> None:
        super().__init__()
        self.resolved = resolved
        self.student_is_encoder = bool(student.is_encoder)
        self.student_layers = int(student.layers)
        self.extras = nn.ModuleDict()
        for extra in resolved.extras:
            method, _, ename = extra.name.partition(".")
            if method not in self.extras:
                self.extras[method] = nn.ModuleDict()
            self.extras[method][ename] = _build_extra(extra)  # type: ignore[index]

    def forward(
        self,
        student_taps: Mapping[str, Tensor],
        teacher_taps: Sequence[Mapping[str, Tensor]],
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        step: int = 0,
        total_steps: int = 0,
        heads: dict[str, Any] | None = None,
        aux: dict[str, Any] | None = None,
        done: Mapping[str, Tensor] | None = None,
    ) -> LossOutput:
        """Weighted total and per-term values ("<method>.<term>", weighted) for one step.

        student_taps / teacher_taps: the captured dicts (tap name -> tensor), one dict per teacher; labels and
        mask (B, T) bool (True = real token); heads: {"student": W, "teachers": [W, ...]} LM-head weights for
        fused-linear terms; aux: tap dicts of hook-op extra forwards, keyed by op name. done: weighted
        values of terms already computed this step (layerwise tap losses, "<method>.<term>" -> value); they
        are summed in as given, not computed again.
        """
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        for term in self.resolved.loss_terms:
            key = f"{term.method}.{term.name}"
            if done is not None and key in done:
                weighted: Tensor | None = done[key]
            else:
                weighted = self.term(
                    term,
                    student_taps,
                    teacher_taps,
                    labels=labels,
                    mask=mask,
                    step=step,
                    total_steps=total_steps,
                    heads=heads,
                    aux=aux,
                )
            if weighted is None:
                continue
            values[key] = weighted
            total = weighted if total is None else total + weighted
        if total is None:
            total = torch.zeros(())
        return LossOutput(total=total, terms=values)

    def term(
        self,
        term: ResolvedTerm,
        student_taps: Mapping[str, Tensor],
        teacher_taps: Sequence[Mapping[str, Tensor]],
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        step: int = 0,
        total_steps: int = 0,
        heads: dict[str, Any] | None = None,
        aux: dict[str, Any] | None = None,
    ) -> Tensor | None:
        """One term's weighted value at `step`, or None when its schedule weighs it 0 there."""
        method = next(m for m in self.resolved.methods if m.name == term.method)
        spec = get(term.method)
        spec_term = next(t for t in spec.terms if t.name == term.name)
        _, stage_step, stage_total = stage_window(spec, method.options, step, total_steps)
        factor = spec_term.schedule.at(stage_step, stage_total, student_layers=self.student_layers)
        if factor == 0.0:
            return None
        fn = get_loss(term.fn)
        ctx = LossContext(
            method=term.method,
            term=term.name,
            options=method.options,
            student=dict(student_taps),
            teachers=[dict(t) for t in teacher_taps],
            pairs=method.pairs,
            kinds=method.kinds,
            extras=self.extras[term.method] if term.method in self.extras else nn.ModuleDict(),
            labels=labels,
            mask=mask,
            step=step,
            total_steps=total_steps,
            temperature=term.temperature if term.temperature is not None else 1.0,
            student_is_encoder=self.student_is_encoder,
            heads=heads or {},
            aux=aux or {},
        )
        return self._aggregate(spec, spec_term, fn, ctx) * (term.weight * factor)

    def extra_parameters(self, method: str) -> list[nn.Parameter]:
        """The trainable parameters of `method`'s extras (empty when it has none)."""
        if method not in self.extras:
            return []
        return [p for p in self.extras[method].parameters() if p.requires_grad]

    @staticmethod
    def _aggregate(spec: MethodSpec, term: LossTermSpec, fn: Any, ctx: LossContext) -> Tensor:
        # Hard losses and "custom" / "single" aggregation: one call. Otherwise one call per teacher, combined.
        if term.hard or spec.aggregation in ("single", "custom") or ctx.num_teachers == 1:
            return fn(ctx)
        per = []
        for i in range(ctx.num_teachers):
            ctx.teacher = i
            per.append(fn(ctx))
        ctx.teacher = 0
        stacked = torch.stack(per)
        if spec.aggregation == "sum":
            return stacked.sum()
        if spec.aggregation == "mean":
            return stacked.mean()
        weights = torch.tensor(ctx.options.get("teacher_weights") or [1.0] * len(per), dtype=stacked.dtype)
        return (stacked * weights.to(stacked.device)).sum()
