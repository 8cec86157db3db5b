"""Multi-teacher methods of the GKD catalogue: TMKD, MT-BERT, RL-KD (reinforced teacher selection) and
uncertainty-driven teacher adoption (Dynamic KD).

TMKD (Yang et al., WSDM 2020): the mean over teachers of the soft MSE between student and teacher logits
(`soft` option, "mse" by default; the generic `soft` loss per teacher, averaged by the "mean" aggregation),
plus the hard loss at rate 1 / #teachers. Two stages: distillation pre-training on soft targets only, then
fine-tuning on soft targets and gold labels.

MT-BERT (Wu et al., ACL Findings 2021): for each teacher i and sample b, the soft loss (soft cross-entropy at
T = 1 by default) is weighted by 1 / (1 + CE_i(b)), the teacher's own cross-entropy on the gold labels of the
sample (its task loss, computed here from the teacher's logits and the labels, without gradient); plus PKD's
hidden loss on [CLS] vectors of mapped layers (L2-normalised MSE, summed over layer pairs), the student side
mapped to each teacher's width by a per-teacher linear map; both summed over teachers; plus the hard loss.

RL-KD (Yuan et al., AAAI 2021): an agent picks, per sample, which teachers to learn from. Its state is the
[CLS] representation of one "semantic" teacher (the first listed), each teacher's cross-entropy on the gold
labels and each teacher's soft labels; the selection probabilities are
sigmoid(Linear([semantic rep, teacher CE losses]) + Linear(concat teacher soft labels)), one per teacher, and
each teacher is selected by a Bernoulli draw (a CPU generator seeded from the `seed` option and the step, so
every run and every test is reproducible). The student learns a * (mean KD over the selected teachers) +
(1 - a) * hard (option `alpha` = a); the agent is trained by REINFORCE with reward
-(the student's per-sample loss), i.e. the term -mean_b(reward_b * log pi(actions_b)), which only reaches the
agent's parameters (its state and the reward are detached). Two stages: plain averaging over teachers, then
reinforced selection. The concatenation Linear([rep, CE]) is held as two linears (Linear(rep) with the bias +
Linear(CE) without), and Linear(concat soft labels) as one bias-free linear per teacher: the same function,
with extra shapes that are plain per-teacher expressions.

Uncertainty / Dynamic KD (Li et al., EMNLP 2021): the student's prediction entropy, normalised by log V and
averaged over a sample's real tokens (u in [0, 1]), decides how much each teacher teaches that sample.
`selection: soft`: teacher i of N gets weight proportional to u + (1 - 2u) * i / (N - 1) (for two teachers
u and 1 - u: uncertain samples lean on the first teacher); `selection: hard`: samples are ranked by u
(descending) and split into N equal groups, group k learning from teacher k only. List teachers from the most
to the least capable. Plus the hard loss.

Design choices:
- "Per sample" is a sequence: a per-token loss is averaged over the sample's real (mask) tokens; logits of
  shape (B, C) (classification) are already per sample. Batch losses are then means over samples.
- Teacher cross-entropies use the hard-loss kind (MLM, causal LM with the one-token shift, classification);
  with `hard_loss: none` they still use the model's natural kind (MLM for encoders, causal LM for decoders).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, hard, hard_loss_kind, logits_mask, pool, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import (
    ExtraSpec,
    LayerRule,
    LossTermSpec,
    MethodSpec,
    OptionSpec,
    StageSpec,
    TapSpec,
)

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch = lazy_import("torch")
    F = lazy_import("torch.nn.functional")

_DIVERGENCE = {"kl": "fkl", "soft_ce": "soft_ce", "mse": "mse"}


# ----------------------------------------------------------------------------------------------------
# Per-sample helpers shared by the methods of this file.


def _upcast(x: Tensor) -> Tensor:
    # Half-precision logits are upcast for the loss; float64 (tests) stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sample_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T) per-token values -> (B,) means over each sample's counted tokens; (B,) values pass through."""
    if per_token.dim() == 1:
        return per_token
    if mask is None:
        return per_token.mean(dim=1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def label_loss_kind(ctx: LossContext) -> str:
    """The kind of cross-entropy against gold labels (for teacher losses and per-sample student losses)."""
    kind = hard_loss_kind(ctx.options, encoder=ctx.student_is_encoder)
    if kind == "none":
        return "mlm" if ctx.student_is_encoder else "causal_lm"
    return kind


def sample_task_loss(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    """Per-sample cross-entropy on gold labels, (B,): the mean over a sample's labelled tokens (labels -100
    are ignored; causal LM shifts by one), or the per-example loss for classification."""
    logits = _upcast(logits)
    if kind == "classification":
        return F.cross_entropy(logits, labels, reduction="none")
    if kind == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif kind != "mlm":
        raise InputError(f"hard_loss {kind!r} is not mlm, causal_lm or classification")
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    counted = (labels != -100).to(nll.dtype)
    return (nll * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)


def teacher_task_loss(ctx: LossContext, teacher: int) -> Tensor:
    """A teacher's per-sample cross-entropy on the gold labels, (B,), without gradient."""
    if ctx.labels is None:
        raise InputError(
            f"method {ctx.method!r} needs the teachers' loss on the gold labels but the batch has no labels"
        )
    with torch.no_grad():
        return sample_task_loss(ctx.t("logits", teacher=teacher), ctx.labels, label_loss_kind(ctx))


def teacher_task_losses(ctx: LossContext) -> Tensor:
    """Every teacher's per-sample cross-entropy on the gold labels, (B, N), without gradient."""
    return torch.stack([teacher_task_loss(ctx, i) for i in range(ctx.num_teachers)], dim=-1)


def sample_soft(ctx: LossContext, teacher: int) -> Tensor:
    """Per-sample soft loss against one teacher, (B,), by the `soft` option: "kl" (KL(p_t || p_s) * T^2),
    "soft_ce" (-sum p_t log p_s at T, no T^2) or "mse" (mean over V of squared logit differences, T = 1)."""
    from gkd.kernels import kd_loss

    kind = ctx.options.get("soft", "kl")
    if kind not in _DIVERGENCE:
        raise InputError(f"method {ctx.method!r}: soft option {kind!r} is not kl, soft_ce or mse")
    s, t = ctx.s("logits"), ctx.t("logits", teacher=teacher)
    mask = logits_mask(ctx) if s.dim() == 3 else None
    temp = 1.0 if kind == "mse" else ctx.temperature
    per = kd_loss(s, t, divergence=_DIVERGENCE[kind], temperature=temp, mask=mask, reduction="none")
    if kind == "kl":
        per = per * temp**2
    return sample_mean(per, mask)


def _all_sample_soft(ctx: LossContext) -> Tensor:
    return torch.stack([sample_soft(ctx, i) for i in range(ctx.num_teachers)], dim=-1)  # (B, N)


SOFT_RATES = (
    OptionSpec(name="soft_rate", default=1.0, doc="weight of the soft loss"),
    OptionSpec(name="hard_rate", default=1.0, doc="weight of the hard (task / LM) loss; 0 drops it"),
)
_LOGITS = TapSpec(kind="logits")


def _soft_option(default: str) -> OptionSpec:
    return OptionSpec(
        name="soft", default=default, doc="soft loss: kl (x T^2), soft_ce (no T^2) or mse on logits"
    )


# ----------------------------------------------------------------------------------------------------
# TMKD


@register_loss("tmkd.hard")
def tmkd_hard(ctx: LossContext) -> Tensor:
    """The hard loss at rate 1 / #teachers (TMKD balances one gold label against N soft targets)."""
    return hard(ctx) / ctx.num_teachers


TMKD = register(
    MethodSpec(
        name="tmkd",
        title="TMKD: two-stage multi-teacher knowledge distillation",
        paper="Yang et al. Model Compression with Two-stage Multi-teacher Knowledge Distillation for Web "
        "Question Answering System. WSDM",
        year=2020,
        taps=(_LOGITS,),
        terms=(
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
            LossTermSpec(name="hard", fn="tmkd.hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.5,
                terms=("soft",),
                train="student",
                description="distillation pre-training on the teachers' soft targets only",
            ),
            StageSpec(
                name="finetune",
                fraction=0.5,
                terms=("soft", "hard"),
                train="student",
                description="multi-teacher fine-tuning: soft targets + gold labels at rate 1/#teachers",
            ),
        ),
        constraints=("equal_vocab",),
        teachers="multi",
        aggregation="mean",
        options=(_soft_option("mse"), *SOFT_RATES),
        description="Mean over teachers of the soft MSE on logits, + hard loss / #teachers; pretrain then "
        "finetune.",
    )
)


# ----------------------------------------------------------------------------------------------------
# MT-BERT


@register_loss("mt_bert.soft")
def mt_bert_soft(ctx: LossContext) -> Tensor:
    """Current teacher: mean over samples of soft_b / (1 + CE_teacher(b))."""
    ce = teacher_task_loss(ctx, ctx.teacher)
    return (sample_soft(ctx, ctx.teacher) / (1.0 + ce)).mean()


@register_loss("mt_bert.hidden")
def mt_bert_hidden(ctx: LossContext) -> Tensor:
    """Current teacher: PKD's loss on [CLS] vectors of mapped layers after the teacher's linear map."""
    from gkd.kernels import hidden_loss

    proj = ctx.extra("proj", ctx.teacher)
    total: Tensor | None = None
    for s_depth, t_depth in ctx.layer_pairs("hidden"):
        loss = hidden_loss(
            ctx.cls(ctx.s("hidden", s_depth)),
            ctx.cls(ctx.t("hidden", t_depth)),
            kind=ctx.options["hidden_kind"],
            projection=proj.weight,
            projection_bias=proj.bias,
        )
        total = loss if total is None else total + loss
    assert total is not None
    return total


MT_BERT = register(
    MethodSpec(
        name="mt_bert",
        title="MT-BERT: multi-teacher distillation weighted by teacher confidence",
        paper="Wu, Wu, Huang. One Teacher is Enough? Pre-trained Language Model Distillation from Multiple "
        "Teachers. ACL Findings",
        year=2021,
        taps=(_LOGITS, TapSpec(kind="hidden", layers=LayerRule(kind="uniform"))),
        terms=(
            LossTermSpec(
                name="soft",
                fn="mt_bert.soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
            LossTermSpec(
                name="hidden",
                fn="mt_bert.hidden",
                kernel="hidden_loss",
                taps=("hidden",),
                weight_option="hidden_rate",
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        extras=(ExtraSpec(name="proj", in_dim="student.hidden", out_dim="teacher.hidden", per="teacher"),),
        constraints=("equal_vocab",),
        teachers="multi",
        aggregation="sum",
        options=(
            _soft_option("soft_ce"),
            *SOFT_RATES,
            OptionSpec(name="hidden_rate", default=1.0, doc="weight of the PKD hidden loss"),
            OptionSpec(
                name="hidden_kind",
                default="normalized_mse",
                doc="hidden loss on [CLS]: normalized_mse (PKD), mse or cosine",
            ),
        ),
        description="Soft loss per teacher and sample weighted by 1/(1 + teacher CE on the gold label), "
        "+ PKD [CLS] hidden loss through a per-teacher Linear(Ds -> Dt), summed over teachers, + hard loss.",
    )
)


# ----------------------------------------------------------------------------------------------------
# RL-KD


def pooled_soft_labels(ctx: LossContext, logits: Tensor) -> Tensor:
    """A teacher's soft labels softmax(logits / T) for each sample, (B, V): pooled over tokens by the `cls`
    option (first / last position: pooled before the softmax, which is per position anyway)."""
    temp = ctx.temperature
    if logits.dim() == 2:
        return torch.softmax(logits / temp, dim=-1)
    choice = ctx.options.get("cls", "auto")
    if choice == "auto":
        choice = "first" if ctx.student_is_encoder else "last"
    encoder = ctx.student_is_encoder
    if choice == "mean":
        return pool(torch.softmax(logits / temp, dim=-1), "mean", ctx.mask, encoder=encoder)
    return torch.softmax(pool(logits, choice, ctx.mask, encoder=encoder) / temp, dim=-1)


def rl_agent(ctx: LossContext) -> tuple[Tensor, Tensor]:
    """The agent's selection logits (B, N) and its Bernoulli actions (B, N) bool for this step.

    The draw comes from a CPU generator seeded by (seed, step): every term of one step sees the same actions,
    and a run is reproducible."""
    n = ctx.num_teachers
    with torch.no_grad():
        semantic = ctx.cls(ctx.t("semantic", teacher=0))
        losses = teacher_task_losses(ctx)
        soft_labels = [pooled_soft_labels(ctx, ctx.t("logits", teacher=i)) for i in range(n)]
    logits = ctx.extra("agent_rep")(semantic) + ctx.extra("agent_loss")(losses.to(semantic.dtype))
    for i, labels in enumerate(soft_labels):
        logits = logits + ctx.extra("agent_soft", i)(labels.to(semantic.dtype))
    gen = torch.Generator().manual_seed(int(ctx.options["seed"]) * 1_000_003 + ctx.step)
    draws = torch.rand(logits.shape, generator=gen, dtype=torch.float64).to(logits.device)
    actions = draws < torch.sigmoid(logits.detach()).double()
    return logits, actions


def selected_soft(per_teacher: Tensor, actions: Tensor) -> Tensor:
    """(B,) mean soft loss over each sample's selected teachers (0 where none is selected)."""
    a = actions.to(per_teacher.dtype)
    return (a * per_teacher).sum(dim=-1) / a.sum(dim=-1).clamp(min=1)


@register_loss("rl_kd.average")
def rl_kd_average(ctx: LossContext) -> Tensor:
    """Stage 1: the plain average of the teachers' soft losses."""
    return _all_sample_soft(ctx).mean()


@register_loss("rl_kd.select")
def rl_kd_select(ctx: LossContext) -> Tensor:
    """Stage 2: the soft loss averaged over the teachers the agent selected for each sample."""
    _, actions = rl_agent(ctx)
    return selected_soft(_all_sample_soft(ctx), actions).mean()


@register_loss("rl_kd.policy")
def rl_kd_policy(ctx: LossContext) -> Tensor:
    """Stage 2: REINFORCE, -mean_b(reward_b * log pi(a_b | s_b)) with reward_b = -(student loss on b)."""
    logits, actions = rl_agent(ctx)
    with torch.no_grad():
        alpha = float(ctx.options["alpha"])
        student_loss = alpha * selected_soft(_all_sample_soft(ctx), actions)
        rate = 1.0 - alpha
        kind = hard_loss_kind(ctx.options, encoder=ctx.student_is_encoder)
        if rate != 0 and kind != "none" and ctx.labels is not None:
            student_loss = student_loss + rate * sample_task_loss(ctx.s("logits"), ctx.labels, kind)
        reward = -student_loss
    a = actions.to(logits.dtype)
    log_pi = (a * F.logsigmoid(logits) + (1 - a) * F.logsigmoid(-logits)).sum(dim=-1)
    return -(reward.to(log_pi.dtype) * log_pi).mean()


RL_KD = register(
    MethodSpec(
        name="rl_kd",
        title="RL-KD: reinforced multi-teacher selection",
        paper="Yuan et al. Reinforced Multi-Teacher Selection for Knowledge Distillation. AAAI",
        year=2021,
        taps=(_LOGITS, TapSpec(kind="final", side="teacher", teachers=0, name="semantic")),
        terms=(
            LossTermSpec(
                name="average",
                fn="rl_kd.average",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="alpha",
                temperature=10.0,
            ),
            LossTermSpec(
                name="select",
                fn="rl_kd.select",
                kernel="kd_loss",
                taps=("logits", "semantic"),
                weight_option="alpha",
                temperature=10.0,
            ),
            LossTermSpec(
                name="policy",
                fn="rl_kd.policy",
                kernel="kd_loss",
                taps=("logits", "semantic"),
                temperature=10.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="1-alpha", hard=True),
        ),
        extras=(
            # Linear([semantic rep, teacher CE losses]) -> one logit per teacher, held as two linears.
            ExtraSpec(name="agent_rep", in_dim="teacher.hidden", out_dim="teachers"),
            ExtraSpec(name="agent_loss", in_dim="teachers", out_dim="teachers", bias=False),
            # Linear(concat of the teachers' soft labels): one bias-free block per teacher.
            ExtraSpec(
                name="agent_soft", in_dim="teacher.vocab", out_dim="teachers", bias=False, per="teacher"
            ),
        ),
        stages=(
            StageSpec(
                name="average",
                fraction=0.5,
                terms=("average", "hard"),
                train="student",
                description="plain averaging over the teachers",
            ),
            StageSpec(
                name="reinforce",
                fraction=0.5,
                terms=("select", "policy", "hard"),
                description="the agent selects teachers per sample; trained by REINFORCE",
            ),
        ),
        constraints=("equal_vocab",),
        teachers="multi",
        aggregation="custom",
        options=(
            _soft_option("soft_ce"),
            OptionSpec(name="alpha", default=0.5, doc="a: soft loss weight; the hard loss gets 1 - a"),
            OptionSpec(name="seed", default=0, doc="seed of the Bernoulli teacher selection (with the step)"),
        ),
        description="An agent on [semantic [CLS] of teacher 0, teacher CE losses, teacher soft labels] "
        "selects teachers per sample (Bernoulli), trained by REINFORCE with reward -(student loss); "
        "a * selected KD + (1 - a) * hard. Stage 1 averages the teachers.",
    )
)


# ----------------------------------------------------------------------------------------------------
# Uncertainty (Dynamic KD)


def normalized_entropy(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample prediction entropy H(softmax(logits)) / log V, averaged over real tokens, (B,)."""
    logits = _upcast(logits)
    log_q = torch.log_softmax(logits, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(dim=-1) / math.log(logits.shape[-1])
    return sample_mean(entropy, mask if logits.dim() == 3 else None)


def uncertainty_weights(u: Tensor, teachers: int, selection: str) -> Tensor:
    """(B, N) teacher weights from normalised entropies u (B,).

    soft: w_i proportional to u + (1 - 2u) i / (N - 1), normalised to sum 1 (the sum is N / 2); hard: rank
    samples by u, descending (ties by position), and give rank r (0-based) to teacher floor(r N / B)."""
    if teachers == 1:
        return torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)
    if selection == "soft":
        ramp = torch.arange(teachers, dtype=u.dtype, device=u.device) / (teachers - 1)
        w = u[:, None] + (1 - 2 * u[:, None]) * ramp
        return w / w.sum(dim=-1, keepdim=True)
    if selection == "hard":
        order = torch.sort(u, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(u.shape[0], device=u.device)
        group = rank * teachers // u.shape[0]
        return F.one_hot(group, teachers).to(u.dtype)
    raise InputError(f"uncertainty: selection {selection!r} is not soft or hard")


@register_loss("uncertainty.soft")
def uncertainty_soft(ctx: LossContext) -> Tensor:
    """Mean over samples of sum_i w_i(u) * soft_i, with weights from the student's normalised entropy."""
    with torch.no_grad():
        u = normalized_entropy(ctx.s("logits"), logits_mask(ctx))
        weights = uncertainty_weights(u, ctx.num_teachers, ctx.options["selection"])
    per = _all_sample_soft(ctx)
    return (weights.to(per.dtype) * per).sum(dim=-1).mean()


UNCERTAINTY = register(
    MethodSpec(
        name="uncertainty",
        title="Uncertainty-driven teacher adoption (Dynamic KD)",
        paper="Li et al. Dynamic Knowledge Distillation for Pre-trained Language Models. EMNLP",
        year=2021,
        taps=(_LOGITS,),
        terms=(
            LossTermSpec(
                name="soft",
                fn="uncertainty.soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_vocab",),
        teachers="multi",
        aggregation="custom",
        options=(
            _soft_option("kl"),
            *SOFT_RATES,
            OptionSpec(
                name="selection",
                default="soft",
                doc="soft: entropy-weighted teachers; hard: samples ranked by entropy split among teachers",
            ),
        ),
        description="The student's normalised prediction entropy weights the teachers per sample (or assigns "
        "each sample to one teacher by entropy rank); teachers listed from most to least capable; + hard.",
    )
)
