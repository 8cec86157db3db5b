"""Annealed-teacher logit methods: Annealing-KD (Jafari et al., EACL 2021) and Continuation-KD (Jafari et al.,
EMNLP Findings 2022).

Annealing-KD. The student regresses the teacher's logits scaled by a factor phi that grows in tau_max equal
steps over the annealed stage: phi = 1/tau_max, 2/tau_max, ..., 1 (the paper's temperature T counts down from
tau_max to 1 and phi(T) = 1 - (T - 1) / tau_max; `max_temperature`, default 7). The loss is

    L_anneal = MSE(z_s, phi * z_t)     (mean over the vocabulary / classes and over counted tokens)

computed by `gkd.kernels.kd_loss(divergence="mse")` on the raw logits (no temperature, no T^2). Stages: plain
pretraining of the student (its own run: `stage: pretrain`), the annealed stage (2/3 of the steps, teacher
logits only), then plain finetuning on the hard loss alone (1/3, no teacher), as the reference code's two
student phases of 200 and 100 epochs.

Continuation-KD. One finetuning stage that starts from a smoothed objective and ends at the task loss:

    L = (1 - psi(p)) * L_cont + psi(p) * L_hard
    L_cont = mean over tokens and classes of  m * (z_s - phi(p) z_t)^2,   m = 1[ |z_s - phi(p) z_t| > margin ]
    psi(p) = 0 for p < hard_start,  min(p / psi_denominator, 1) for p >= hard_start

with p the progress through the stage, phi(p) the Annealing-KD staircase with tau_max = `max_temperature` (10)
over the whole stage, `margin` = 1, `hard_start` = 0.666 and `psi_denominator` = 1.333 (the reference system's
recipe: `--continuation_kd_max_t=10 --continuation_kd_margin=1 --continuation_kd_psi_sep=0.666
--continuation_kd_psi_denominator=1.333 --distill_ft_soft_mse --distill_ft_hard`; psi jumps to 1/2 when the
hard loss starts and reaches 3/4 at the end). The margin mask m treats differences to the annealed teacher
smaller than the margin as teacher noise: they carry no loss and no gradient (m is a constant of the step).

Provenance. This formula is a reconstruction, not a transcription: the paper's method section (arXiv
2212.05998) was not available to check it against (only its abstract: a smoothed KD objective made harder as
training proceeds, against the capacity gap and the teacher's noise), and the reference system's recipe gives
the option names and values above but not the code of the loss. Two readings of "a margin on the teacher's
noise" fit that recipe, so both are offered: `margin_mode: mask` (default, above: a difference beyond the
margin counts in full) and `margin_mode: hinge` (only the part beyond the margin counts:
L_cont = mean of relu(|z_s - phi(p) z_t| - margin)^2). The schedule (phi's staircase, psi) is the recipe's.

The annealing factors are functions of the progress within the named stage (`stage_progress`): the
stage's window of the whole run when stages follow by progress, or the whole run when a stage is chosen with
the `stage` option (a run per stage). `anneal_schedule(tau_max)` states phi as a piecewise `Schedule` (data).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, hard, logits_mask, register_loss
from gkd.methods.registry import get, register
from gkd.methods.spec import LossTermSpec, MethodSpec, OptionSpec, Schedule, StageSpec, TapSpec

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch")


def anneal_schedule(tau_max: int) -> Schedule:
    """phi over stage progress p: k / tau_max for p in [(k - 1) / tau_max, k / tau_max), k = 1..tau_max."""
    if not isinstance(tau_max, int) or isinstance(tau_max, bool) or tau_max < 1:
        raise InputError(f"max_temperature must be an integer >= 1, got {tau_max!r}")
    return Schedule(kind="piecewise", points=tuple((k / tau_max, (k + 1) / tau_max) for k in range(tau_max)))


def stage_steps(
    method: str, options: dict[str, Any], stage: str, step: int, total_steps: int
) -> tuple[int, int]:
    """(step within `stage`, steps of `stage`): the stage's window of the run (stages follow by progress, the
    window [a, b) of fractions holding the steps s with a <= s / total < b), or the whole run when a stage was
    chosen with the `stage` option."""
    if options.get("stage") is not None or total_steps <= 0:
        return step, total_steps
    edge = 0.0
    for st in get(method).stages:
        if st.name == stage:
            start = math.ceil(edge * total_steps - 1e-9)
            end = math.ceil((edge + st.fraction) * total_steps - 1e-9)
            return step - start, max(end - start, 1)
        edge += st.fraction
    raise KeyError(f"method {method!r} has no stage {stage!r}")


def stage_progress(ctx: LossContext, stage: str) -> float:
    """Progress p in [0, 1] through `stage` at the current step."""
    local, length = stage_steps(ctx.method, ctx.options, stage, ctx.step, ctx.total_steps)
    return 0.0 if length <= 0 else min(max(local / length, 0.0), 1.0)


def phi_at(ctx: LossContext, stage: str) -> float:
    """The annealing factor phi at the current step of `stage` (`max_temperature` steps up to 1)."""
    local, length = stage_steps(ctx.method, ctx.options, stage, ctx.step, ctx.total_steps)
    return anneal_schedule(ctx.options["max_temperature"]).at(local, length)


@register_loss("annealing_kd.anneal")
def annealing_loss(ctx: LossContext) -> Tensor:
    from gkd.kernels import kd_loss

    phi = phi_at(ctx, "anneal")
    return kd_loss(ctx.s("logits"), phi * ctx.t("logits"), divergence="mse", mask=logits_mask(ctx))


def continuation_psi(ctx: LossContext) -> float:
    """The hard-loss share psi at the current step of the finetune stage (0 before `hard_start`)."""
    p = stage_progress(ctx, "finetune")
    if p < float(ctx.options["hard_start"]):
        return 0.0
    denominator = float(ctx.options["psi_denominator"])
    if denominator <= 0:
        raise InputError(f"continuation_kd psi_denominator must be > 0, got {denominator}")
    return min(p / denominator, 1.0)


@register_loss("continuation_kd.kd")
def continuation_loss(ctx: LossContext) -> Tensor:
    s, t = ctx.s("logits"), ctx.t("logits")
    phi = phi_at(ctx, "finetune")
    diff = s.float() if s.dtype != torch.float64 else s
    diff = diff - phi * t.to(diff.dtype)
    margin = float(ctx.options["margin"])
    mode = ctx.options.get("margin_mode", "mask")
    if mode == "mask":
        keep = (diff.detach().abs() > margin).to(diff.dtype)  # constant of the step
        per_token = (keep * diff.square()).mean(-1)
    elif mode == "hinge":
        per_token = torch.relu(diff.abs() - margin).square().mean(-1)
    else:
        raise InputError(f"continuation_kd margin_mode must be 'mask' or 'hinge', got {mode!r}")
    mask = logits_mask(ctx)
    if mask is None:
        value = per_token.mean()
    else:
        m = mask.to(per_token.dtype)
        value = (per_token * m).sum() / m.sum().clamp(min=1.0)
    return (1.0 - continuation_psi(ctx)) * value


@register_loss("continuation_kd.hard")
def continuation_hard(ctx: LossContext) -> Tensor:
    if ctx.options.get("stage") in ("pretrain", 0):  # the plain pretraining run: the hard loss alone
        return hard(ctx)
    psi = continuation_psi(ctx)
    if psi == 0.0:
        logits = ctx.s("logits")
        return logits.new_zeros((), dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype)
    return psi * hard(ctx)


_LOGITS = (TapSpec(kind="logits"),)
_HARD_RATE = OptionSpec(name="hard_rate", default=1.0, doc="weight of the hard loss in the plain stages")

ANNEALING_KD = register(
    MethodSpec(
        name="annealing_kd",
        title="Annealing-KD: MSE to the teacher's logits scaled up step by step",
        paper="Jafari et al. Annealing Knowledge Distillation. EACL",
        year=2021,
        taps=_LOGITS,
        terms=(
            LossTermSpec(name="anneal", fn="annealing_kd.anneal", kernel="kd_loss", taps=("logits",)),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_vocab",),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.0,
                terms=("hard",),
                teacher=False,
                description="plain pretraining of the student, its own run (stage: pretrain)",
            ),
            StageSpec(
                name="anneal",
                fraction=2 / 3,
                terms=("anneal",),
                description="MSE(z_s, phi z_t), phi = 1/tau_max ... 1 in tau_max equal steps",
            ),
            StageSpec(
                name="finetune",
                fraction=1 / 3,
                terms=("hard",),
                teacher=False,
                description="plain finetuning on the hard loss",
            ),
        ),
        options=(
            OptionSpec(name="max_temperature", default=7, doc="tau_max: phi = 1/tau_max, 2/tau_max, ..., 1"),
            _HARD_RATE,
        ),
        description="Logit MSE against a teacher annealed from 1/tau_max of its logits to all of them, then "
        "the hard loss alone.",
    )
)

CONTINUATION_KD = register(
    MethodSpec(
        name="continuation_kd",
        title="Continuation-KD: margin-masked annealed-teacher MSE, then the hard loss mixed in",
        paper="Jafari et al. Continuation KD: Improved Knowledge Distillation through the Lens of "
        "Continuation Optimization. EMNLP Findings",
        year=2022,
        taps=_LOGITS,
        terms=(
            LossTermSpec(name="kd", fn="continuation_kd.kd", kernel="torch", taps=("logits",)),
            LossTermSpec(
                name="hard", fn="continuation_kd.hard", taps=("logits",), weight_option="hard_rate", hard=True
            ),
        ),
        constraints=("equal_vocab",),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.0,
                terms=("hard",),
                teacher=False,
                description="plain pretraining of the student, its own run (stage: pretrain; psi = 1 there)",
            ),
            StageSpec(
                name="finetune",
                fraction=1.0,
                terms=("kd", "hard"),
                description="(1 - psi) margin-masked MSE(z_s, phi z_t) + psi hard; psi = 0 before hard_start",
            ),
        ),
        options=(
            OptionSpec(name="max_temperature", default=10, doc="tau_max of the annealed teacher phi"),
            OptionSpec(name="margin", default=1.0, doc="logit differences within the margin carry no loss"),
            OptionSpec(
                name="margin_mode",
                default="mask",
                doc="mask: differences beyond the margin count in full; hinge: only the part beyond it",
            ),
            OptionSpec(name="hard_start", default=0.666, doc="stage share before the hard loss starts"),
            OptionSpec(name="psi_denominator", default=1.333, doc="psi = progress / psi_denominator then"),
            _HARD_RATE,
        ),
        description="Annealed teacher with a noise margin; the task loss takes over the last third.",
    )
)
