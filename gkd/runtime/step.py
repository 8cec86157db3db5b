"""One distillation step with hook ops honoured: `distill_step(...) -> LossOutput`.

Usage:
    resolved = resolve(methods, teacher_specs, student_spec, step=s, total_steps=n)
    out = distill_step(student, teachers, DistillLoss(resolved, teacher_specs, student_spec), batch,
                       resolved, step=s, total_steps=n)
    out.total.backward()

`batch` maps "input_ids" (B, T), optionally "attention_mask" (B, T; bool or 0/1, True = real token), "labels"
and any further model inputs (e.g. "token_type_ids"), which are passed to every model unchanged. Fields in
LOSS_BATCH_KEYS (e.g. MGSKD's "phrase_spans") are for losses only: they reach them as `ctx.aux["batch"]`
and never reach a model. "loss_mask" (B, T; bool, optional) marks the positions whose outputs the loss
trains (completion-only data, gkd.runtime.data): every term, hard and distillation alike, reads the
attention mask and it together as `ctx.mask`, and the labels carry -100 outside it. "position_ids" (B, T)
count from 0 at each packed document's start: every model gets them as its family must take them to keep the
documents apart, position ids or a block mask (gkd.runtime.packing.packed_inputs).

The order of operations (see `gkd.methods.hooks` for what each hook-op call may do):
1. build the step's hook ops from `resolved` and install them all: they stay active around every forward
   below, so an op can record teacher states (DIITO) or swap student modules (Theseus) first;
2. the teacher forward(s) under `torch.no_grad()`, capturing exactly `resolved.teacher_taps` (skipped for a
   teacher with no live taps: Theseus has no separate teacher pass, and stored top-k entries come from an
   offline teacher pass through `stored_teacher_taps`);
3. each op's `before_forward` (LRC-BERT's clean forward and embedding gradient);
4. the student forward, capturing `resolved.student_taps`;
5. each op's `extra_forward` (DIITO's interchange pass), whose results reach the loss as `ctx.aux`;
6. the loss (`DistillLoss`) on the captured taps.

With `tap_loss="layerwise"` (the plan's choice, `gkd.planner.schedule`), step 4 also computes each
intermediate-tap term as soon as the student layer holding its last tap has run
(`gkd.planner.schedule.layerwise_layer`, the planner's own rule): the term's value and its gradients with
respect to the student taps it read and its method's extras are computed at once (`_EarlyTerm`), the term's
own autograd graph is freed, the teacher taps no later term reads are dropped, and the gradients are kept
until the backward reaches the term. The values and gradients equal those of computing the term at the end.

Design choices:
- The backward pass is the caller's: it may scale, accumulate or hand the loss to DeepSpeed.
- A forward that fails to produce a requested tap raises: a silently missing tensor would otherwise surface
  as a KeyError deep inside a loss function.
- `StepRunner` is what hook ops see: the models, the batch and the loss, without the op needing to know how
  taps are captured or where the teachers live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gkd.errors import InputError
from gkd.methods.combine import DistillLoss, LossOutput, ResolvedMethods, ResolvedTerm
from gkd.methods.hooks import build_hook_ops
from gkd.methods.spec import STORED_KINDS
from gkd.planner.schedule import layerwise_layer
from gkd.runtime.capture import capture_taps, transformer_layers
from gkd.runtime.packing import packed_inputs

# Batch fields that losses read and models must not see.
LOSS_BATCH_KEYS = ("phrase_spans",)
# The batch field that restricts the loss to some positions (completion tokens); never a model input.
LOSS_MASK_KEY = "loss_mask"


@dataclass(kw_only=True)
class StepRunner:
    """Runs the models of one step on its batch under tap capture; handed to hook ops."""

    student: nn.Module
    teachers: Sequence[nn.Module]
    loss_module: DistillLoss
    resolved: ResolvedMethods
    batch: Mapping[str, Any]
    step: int = 0
    total_steps: int = 0
    teacher_taps: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def mask(self) -> Tensor:
        """(B, T) bool, True = a real token whose outputs the loss trains: the attention mask (all True when
        the batch has none), and the batch's loss mask where it has one."""
        ids = self.batch["input_ids"]
        mask = self.batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
        trained = self.batch.get(LOSS_MASK_KEY)
        return mask.bool() if trained is None else mask.bool() & trained.bool()

    @property
    def labels(self) -> Tensor | None:
        return self.batch.get("labels")

    def model_inputs(self) -> dict[str, Any]:
        skip = {"labels", LOSS_MASK_KEY, *LOSS_BATCH_KEYS}
        inputs = {k: v for k, v in self.batch.items() if k not in skip}
        if "attention_mask" in inputs and inputs["attention_mask"] is not None:
            inputs["attention_mask"] = inputs["attention_mask"].long()
        return inputs

    def run_student(
        self,
        names: Iterable[str],
        *,
        after_layer: Callable[[int, dict[str, Tensor]], None] | None = None,
        consumed: set[str] | None = None,
    ) -> dict[str, Tensor]:
        """One student forward (with gradients) capturing `names` (see `capture_taps` for `after_layer`;
        `consumed` names taps it may drop once read)."""
        return run_captured(
            self.student, names, self.model_inputs(), "student", after_layer=after_layer, consumed=consumed
        )

    def run_teacher(self, index: int, names: Iterable[str]) -> dict[str, Tensor]:
        """One forward of teacher `index` under no_grad capturing `names`."""
        with torch.no_grad():
            teacher = self.teachers[index]
            # A teacher split over a tensor-parallel group runs its own forward (gkd.runtime.tensor_parallel).
            if hasattr(teacher, "run_taps"):
                return teacher.run_taps(names, self.model_inputs())
            return run_captured(teacher, names, self.model_inputs(), f"teacher {index}")

    def heads(self) -> dict[str, Any]:
        """LM-head weights for fused-linear loss terms."""
        return {
            "student": _head_weight(self.student),
            "teachers": [_head_weight(t) for t in self.teachers],
        }

    def term(self, term: ResolvedTerm, student_taps: Mapping[str, Tensor]) -> Tensor | None:
        """One term's weighted value on the main teacher taps (None when its schedule weighs it 0)."""
        extras = {k: self.batch[k] for k in LOSS_BATCH_KEYS if k in self.batch}
        return self.loss_module.term(
            term,
            student_taps,
            self.teacher_taps,
            labels=self.labels,
            mask=self.mask,
            step=self.step,
            total_steps=self.total_steps,
            heads=self.heads() if self.resolved.fused_linear else None,
            aux={"batch": extras} if extras else None,
        )

    def loss(
        self,
        student_taps: Mapping[str, Tensor],
        teacher_taps: Sequence[Mapping[str, Tensor]] | None = None,
        aux: dict[str, Any] | None = None,
        done: Mapping[str, Tensor] | None = None,
    ) -> LossOutput:
        """The step's loss on the given taps (the main teacher taps unless others are passed). Batch fields
        only losses read (LOSS_BATCH_KEYS) reach them as `ctx.aux["batch"]`."""
        extras = {k: self.batch[k] for k in LOSS_BATCH_KEYS if k in self.batch}
        if extras:
            aux = {**(aux or {}), "batch": extras}
        heads = self.heads() if self.resolved.fused_linear else {}
        # A ZeRO-3 teacher's head is partitioned outside its forward; the student's is an external parameter
        # of the engine's module (`gkd.runtime.engines.make_engines`), gathered for its forward and backward.
        teacher_heads = heads.get("teachers", [])
        with _gathered(teacher_heads):
            return self.loss_module(
                student_taps,
                self.teacher_taps if teacher_taps is None else teacher_taps,
                labels=self.labels,
                mask=self.mask,
                step=self.step,
                total_steps=self.total_steps,
                heads=heads,
                aux=aux,
                done=done,
            )


def _head_weight(model: nn.Module) -> Tensor | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if head is None else head.weight


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs; not masked LMs)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextmanager
def _gathered(weights: Iterable[Tensor | None]) -> Iterator[None]:
    """Gather ZeRO-3 partitioned weights for the duration (read-only: the teachers' LM heads, which the
    fused-linear loss reads outside their module's forward). Other weights pass through untouched."""
    partitioned = [w for w in weights if w is not None and hasattr(w, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def run_captured(
    model: nn.Module,
    names: Iterable[str],
    inputs: dict[str, Any],
    who: str,
    *,
    after_layer: Callable[[int, dict[str, Tensor]], None] | None = None,
    consumed: set[str] | None = None,
) -> dict[str, Tensor]:
    wanted = set(names)
    inputs = packed_inputs(model, inputs)
    if getattr(getattr(model, "config", None), "use_cache", False):
        # A training step never reuses keys and values; a cache would also be sized for the model's own layer
        # count, which a module swap (Theseus) changes.
        inputs = {**inputs, "use_cache": False}
    if "logits" not in wanted and _keeps_logits(model):
        # Nothing reads this forward's logits (the fused-linear loss reads `final` and the head weight): the
        # head runs on the last position only, so the (tokens x vocabulary) logits the plan does not count are
        # never made.
        inputs = {**inputs, "logits_to_keep": 1}
    with capture_taps(model, wanted, after_layer=after_layer) as taps:
        model(**inputs)
    missing = wanted - set(taps) - (consumed or set())  # consumed: read and dropped during the forward
    if missing:
        raise RuntimeError(f"the {who} forward did not produce taps {sorted(missing)}")
    return dict(taps)


def _teacher_pass(runner: StepRunner, stored: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Tensor]]:
    out = []
    for i, names in enumerate(runner.resolved.teacher_taps):
        given = dict(stored[i]) if stored is not None and i < len(stored) else {}
        offline = {n for n in names if n in STORED_KINDS}
        if offline - set(given):
            raise InputError(
                f"teacher {i} needs the stored taps {sorted(offline - set(given))} "
                "from an offline teacher pass"
            )
        # A teacher run offline serves its logits (or final) taps from storage too (`gkd.runtime.offline`).
        from_store = {n for n in names if n in given}
        live = set(names) - from_store
        taps = runner.run_teacher(i, live) if live else {}
        taps.update({n: given[n] for n in from_store})
        out.append(taps)
    return out


class _EarlyTerm(torch.autograd.Function):
    """A loss term computed during the student forward, with its gradients (layerwise tap losses).

    forward(compute, n_taps, *taps, *params): `compute(leaves)` evaluates the term on detached copies of the
    student `taps`; the gradients with respect to those copies and to `params` (the method's extras) are
    computed at once and kept on `ctx` (not saved tensors, so a recomputed layer around the call never
    replays it), and the term's own graph is freed. backward hands them to the taps and the parameters,
    scaled by the incoming gradient (DeepSpeed's loss scaling and accumulation). Returns the value, detached.
    """

    @staticmethod
    def forward(ctx: Any, compute: Callable[[list[Tensor]], Tensor], n_taps: int, *inputs: Tensor) -> Tensor:
        taps, params = inputs[:n_taps], inputs[n_taps:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in taps]
            value = compute(leaves)
            everything = (*leaves, *params)
            wrt = [x for x in everything if x.requires_grad]
            found = torch.autograd.grad(value, wrt, allow_unused=True) if wrt and value.requires_grad else ()
        by_id = {id(x): g for x, g in zip(wrt, found, strict=False)}
        ctx.grads = [by_id.get(id(x)) for x in everything]
        return value.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (None, None, *grads)


class _Layerwise:
    """Runs the step's intermediate-tap terms as the student forward reaches them (see `_EarlyTerm`)."""

    def __init__(self, runner: StepRunner) -> None:
        self.runner = runner
        self.done: dict[str, Tensor] = {}
        layers = len(transformer_layers(runner.student))
        self.at: dict[int, list[ResolvedTerm]] = {}
        for term in runner.resolved.loss_terms:
            where = layerwise_layer(term.taps, layers)
            if where is not None:
                self.at.setdefault(where, []).append(term)
        # Taps are dropped after the last term that reads them ("t<i>:<tap>" / "s:<tap>" -> term key; "" for
        # a term at the end): teacher taps are freed, and so are student taps autograd does not save anyway
        # (e.g. attention probabilities computed for the loss alone), as the plan's schedule has it.
        self.last_read: dict[str, str] = {}
        early = [t for where in sorted(self.at) for t in self.at[where]]
        late = [t for t in runner.resolved.loss_terms if t not in early]
        for term in early + late:
            for x in term.taps:
                self.last_read[x] = "" if term in late else f"{term.method}.{term.name}"
        self.consumed: set[str] = set()  # student taps dropped during the forward

    def after_layer(self, layer: int, student_taps: dict[str, Tensor]) -> None:
        """Called by `capture_taps` after each student layer, with the taps captured so far."""
        for term in self.at.get(layer, ()):
            key = f"{term.method}.{term.name}"
            names = sorted({x.split(":", 1)[1] for x in term.taps if x.startswith("s:")})
            taps = [student_taps[n] for n in names]
            params = self.runner.loss_module.extra_parameters(term.method)
            skipped = False

            def compute(leaves: list[Tensor], term: ResolvedTerm = term, names: list[str] = names) -> Tensor:
                nonlocal skipped
                # Only the taps the term declares: the plan sized these, so a term reading others must fail.
                value = self.runner.term(term, dict(zip(names, leaves, strict=True)))
                if value is None:  # its schedule weighs it 0 at this step
                    skipped = True
                    return leaves[0].new_zeros(()) if leaves else torch.zeros(())
                return value

            value = _EarlyTerm.apply(compute, len(taps), *taps, *params)
            if not skipped:
                self.done[key] = value
            for x, reader in self.last_read.items():
                if reader != key:
                    continue
                side, _, tap = x.partition(":")
                if side == "s":
                    student_taps.pop(tap, None)
                    self.consumed.add(tap)
                else:
                    self.runner.teacher_taps[int(side.removeprefix("t"))].pop(tap, None)


def distill_step(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    loss_module: DistillLoss,
    batch: Mapping[str, Any],
    resolved: ResolvedMethods,
    step: int = 0,
    total_steps: int = 0,
    *,
    stored_teacher_taps: Sequence[Mapping[str, Any]] | None = None,
    tap_loss: str = "end",
) -> LossOutput:
    """Run one distillation step's forwards and return its loss (see the module docstring).

    tap_loss: "end" (every term after the forwards) or "layerwise" (intermediate-tap terms during the student
    forward, as the plan's strategy says; not with hook ops, whose extra forwards read taps at the end).

    stored_teacher_taps: per teacher, taps written by an offline teacher pass (the stored kinds of
    `gkd.methods.spec.STORED_KINDS`, e.g. `topk`); they are not captured live, and a teacher whose taps are
    all stored runs no forward.
    """
    if "input_ids" not in batch:
        raise InputError("a training batch needs input_ids")
    if len(teachers) != len(resolved.teacher_taps):
        raise InputError(
            f"the methods were resolved for {len(resolved.teacher_taps)} teachers but {len(teachers)} "
            "teacher models were given"
        )
    runner = StepRunner(
        student=student,
        teachers=list(teachers),
        loss_module=loss_module,
        resolved=resolved,
        batch=batch,
        step=step,
        total_steps=total_steps,
    )
    if tap_loss not in ("end", "layerwise"):
        raise InputError(f"tap_loss must be 'end' or 'layerwise', got {tap_loss!r}")
    if tap_loss == "layerwise" and resolved.hook_ops:
        raise InputError(
            "layerwise tap losses cannot run with hook ops "
            f"({', '.join(sorted({h.op for h in resolved.hook_ops}))}); plan with overrides.tap_loss: end"
        )
    ops = build_hook_ops(resolved)
    layerwise: _Layerwise | None = None
    with ExitStack() as stack:
        for op in ops:
            stack.enter_context(op.install(student, list(teachers), step=step, total_steps=total_steps))
        runner.teacher_taps = _teacher_pass(runner, stored_teacher_taps)
        for op in ops:
            op.before_forward(runner)
        if tap_loss == "layerwise":
            layerwise = _Layerwise(runner)
            student_taps = runner.run_student(
                resolved.student_taps, after_layer=layerwise.after_layer, consumed=layerwise.consumed
            )
        else:
            student_taps = runner.run_student(resolved.student_taps)
        aux: dict[str, Any] = {}
        for op in ops:
            extra = op.extra_forward(runner)
            if extra is not None:
                aux[op.name] = extra
    return runner.loss(student_taps, aux=aux, done=layerwise.done if layerwise is not None else None)
