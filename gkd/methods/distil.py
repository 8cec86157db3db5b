"""Distillation of a smaller copy of the teacher: PD (Turc et al., 2019), PKD (Sun et al., EMNLP 2019),
DistilBERT (Sanh et al., 2019) and ALP-KD (Passban et al., AAAI 2021).

PD, "Well-Read Students Learn Better": pretrain the student without a teacher (stage `pretrain`: the MLM or
causal LM loss), then distil at T = 1 with the soft loss only (stage `distill`; soft cross-entropy by default,
`soft: kl` for KL).

PKD, patient knowledge distillation: L = (1 - alpha) * hard + alpha * KL(p_t(T) || p_s(T)) + beta * L_PT,
T = 10, beta = 100, alpha = 0.5. L_PT sums over the mapped intermediate layers (student depths 1..Ls-1,
teacher depth j * Lt // Ls: every k-th layer for k = Lt / Ls, "PKD-skip"; the last layer is left to the
prediction loss) the squared distance between the L2-normalised [CLS] states, averaged over the batch
(`gkd.kernels.hidden_loss`, kind normalized_mse). [CLS] is the `cls` option (decoders: last real token by
default). The KL carries no T^2 factor (the paper's L_DS). Hidden sizes must match.

DistilBERT: 5 * KL(p_t(T) || p_s(T)) * T^2 (T = 2) + 2 * MLM + 1 * cosine distance 1 - cos between the
student's and teacher's final hidden states over the real tokens (`cos_positions: labels` restricts it to the
MLM positions). Decoders use the causal LM loss. Stages: distillation pretraining, then plain finetuning.
Hidden sizes must match.

ALP-KD: for every student depth j = 1..Ls, attention over all teacher depths k = 1..Lt of the [CLS] states:
alpha_jk = softmax_k(s_j . t_k), c_j = sum_k alpha_jk t_k, and L_ALP = sum_j MSE(s_j, c_j) (mean over batch
and features). Plus the soft loss (T = 20, weight 0.7; soft cross-entropy) and the hard loss (0.1); the ALP
weight `alp_rate` is applied (GLMKD parses its lambda but never uses it). Hidden sizes must match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, logits_mask, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import LayerRule, LossTermSpec, MethodSpec, OptionSpec, StageSpec, TapSpec

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch")

_LOGITS = TapSpec(kind="logits")
_SOFT_KIND = OptionSpec(name="soft", default="soft_ce", doc="soft loss: soft_ce (no T^2), kl (x T^2) or mse")

# ---------------------------------------------------------------------------------------------------------
# PD

PD = register(
    MethodSpec(
        name="pd",
        title="Pre-trained distillation (well-read students)",
        paper="Turc et al. Well-Read Students Learn Better: On the Importance of Pre-training Compact "
        "Models. arXiv 1908.08962",
        year=2019,
        taps=(_LOGITS,),
        terms=(
            LossTermSpec(name="pretrain", fn="hard", taps=("logits",), hard=True),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
        ),
        constraints=("equal_vocab",),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.5,
                terms=("pretrain",),
                train="student",
                teacher=False,
                description="pretrain the student without a teacher (MLM / causal LM)",
            ),
            StageSpec(name="distill", fraction=0.5, terms=("soft",), description="soft loss at T = 1 only"),
        ),
        options=(_SOFT_KIND, OptionSpec(name="soft_rate", default=1.0, doc="weight of the soft loss")),
        description="Plain pretraining of the student, then distillation on teacher soft labels at T = 1.",
    )
)


# ---------------------------------------------------------------------------------------------------------
# PKD


@register_loss("pkd.patient")
def pkd_patient(ctx: LossContext) -> Tensor:
    """Sum over intermediate pairs of ||s/|s| - t/|t|||^2 on [CLS] states, mean over the batch."""
    from gkd.kernels import hidden_loss

    pairs = ctx.layer_pairs("hidden")
    if not pairs:
        raise InputError(
            "pkd compares intermediate layers 1..Ls-1, so the student needs at least 2 layers; "
            "use kd for a 1-layer student"
        )
    losses = [
        hidden_loss(ctx.cls(ctx.s("hidden", s_d)), ctx.cls(ctx.t("hidden", t_d)), kind="normalized_mse")
        for s_d, t_d in pairs
    ]
    return torch.stack(losses).sum()


@register_loss("pkd.soft")
def pkd_soft(ctx: LossContext) -> Tensor:
    """KL(p_t(T) || p_s(T)) without T^2 (the paper's L_DS)."""
    from gkd.kernels import kd_loss

    return kd_loss(
        ctx.s("logits"), ctx.t("logits"), divergence="fkl", temperature=ctx.temperature, mask=logits_mask(ctx)
    )


PKD = register(
    MethodSpec(
        name="pkd",
        title="Patient knowledge distillation (PKD-skip)",
        paper="Sun et al. Patient Knowledge Distillation for BERT Model Compression. EMNLP",
        year=2019,
        taps=(TapSpec(kind="hidden", layers=LayerRule(kind="uniform", drop_last=True)), _LOGITS),
        terms=(
            LossTermSpec(
                name="patient", fn="pkd.patient", kernel="hidden_loss", taps=("hidden",), weight_option="beta"
            ),
            LossTermSpec(
                name="soft",
                fn="pkd.soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="alpha",
                temperature=10.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="1-alpha", hard=True),
        ),
        constraints=("equal_hidden", "equal_vocab"),
        options=(
            OptionSpec(name="alpha", default=0.5, doc="soft loss weight alpha; the hard loss gets 1 - alpha"),
            OptionSpec(name="beta", default=100.0, doc="weight beta of the patient [CLS] loss"),
        ),
        description="Normalised [CLS] MSE on every k-th teacher layer + (1-a) hard + a KL(T=10); "
        "hidden sizes must match.",
    )
)


# ---------------------------------------------------------------------------------------------------------
# DistilBERT


@register_loss("distilbert.cos")
def distilbert_cos(ctx: LossContext) -> Tensor:
    """Mean of 1 - cos(final_s, final_t) over the real tokens (or the MLM positions)."""
    from gkd.kernels import hidden_loss

    mask = ctx.mask
    where = ctx.options.get("cos_positions", "tokens")
    if where == "labels":
        if ctx.labels is None:
            raise InputError("distilbert: cos_positions: labels needs labels in the batch; use tokens")
        mask = ctx.labels != -100 if mask is None else mask & (ctx.labels != -100)
    elif where != "tokens":
        raise InputError(f"distilbert: cos_positions must be tokens or labels, got {where!r}")
    return hidden_loss(ctx.s("final"), ctx.t("final"), kind="cosine", mask=mask)


DISTILBERT = register(
    MethodSpec(
        name="distilbert",
        title="DistilBERT: soft targets + MLM + cosine of final hidden states",
        paper="Sanh et al. DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter. "
        "arXiv 1910.01108",
        year=2019,
        taps=(_LOGITS, TapSpec(kind="final")),
        terms=(
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=2.0,
            ),
            LossTermSpec(name="mlm", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
            LossTermSpec(
                name="cos",
                fn="distilbert.cos",
                kernel="hidden_loss",
                taps=("final",),
                weight_option="cos_rate",
            ),
            LossTermSpec(name="task", fn="hard", taps=("logits",), hard=True),
        ),
        constraints=("equal_hidden", "equal_vocab"),
        stages=(
            StageSpec(
                name="pretrain_kd",
                fraction=0.5,
                terms=("soft", "mlm", "cos"),
                description="distillation pretraining: 5 KL*T^2 + 2 MLM + 1 cosine",
            ),
            StageSpec(
                name="finetune",
                fraction=0.5,
                terms=("task",),
                train="student",
                teacher=False,
                description="plain finetuning on the task",
            ),
        ),
        options=(
            OptionSpec(name="soft", default="kl", doc="soft loss: kl (x T^2, the paper), soft_ce or mse"),
            OptionSpec(name="soft_rate", default=5.0, doc="weight of the soft loss (alpha_ce)"),
            OptionSpec(name="hard_rate", default=2.0, doc="weight of the MLM / LM loss (alpha_mlm)"),
            OptionSpec(name="cos_rate", default=1.0, doc="weight of the cosine loss (alpha_cos)"),
            OptionSpec(name="cos_positions", default="tokens", doc="cosine over real tokens or MLM labels"),
            OptionSpec(
                name="masked_positions_only", default=False, doc="soft loss only at MLM positions (encoders)"
            ),
        ),
        description="5 KL*T^2 (T=2) + 2 MLM + 1 cosine on final hidden states; hidden sizes must match.",
    )
)


# ---------------------------------------------------------------------------------------------------------
# ALP-KD


@register_loss("alp_kd.alp")
def alp_kd_alp(ctx: LossContext) -> Tensor:
    """Sum over student depths of MSE(s_j, sum_k softmax_k(s_j . t_k) t_k) on [CLS] states."""
    teacher = torch.stack(
        [ctx.cls(ctx.t("t_hidden", t_d)) for _, t_d in ctx.layer_pairs("t_hidden")], dim=1
    )  # (B, Lt, D)
    losses = []
    for s_d, _ in ctx.layer_pairs("s_hidden"):
        s = ctx.cls(ctx.s("s_hidden", s_d))  # (B, D)
        t = teacher.detach().to(s.dtype)
        alpha = torch.softmax(torch.einsum("bkd,bd->bk", t, s), dim=-1)
        context = torch.einsum("bk,bkd->bd", alpha, t)
        losses.append((s - context).square().mean())
    return torch.stack(losses).sum()


ALP_KD = register(
    MethodSpec(
        name="alp_kd",
        title="ALP-KD: attention-based layer projection",
        paper="Passban et al. ALP-KD: Attention-Based Layer Projection for Knowledge Distillation. AAAI",
        year=2021,
        taps=(
            # Student depths 1..Ls (the student side of the uniform pairs) and every teacher depth 1..Lt.
            TapSpec(kind="hidden", layers=LayerRule(kind="uniform"), side="student", name="s_hidden"),
            TapSpec(kind="hidden", layers=LayerRule(kind="all"), side="teacher", name="t_hidden"),
            _LOGITS,
        ),
        terms=(
            LossTermSpec(
                name="alp", fn="alp_kd.alp", taps=("s_hidden", "t_hidden"), weight_option="alp_rate"
            ),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=20.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_hidden", "equal_vocab"),
        options=(
            _SOFT_KIND,
            OptionSpec(name="alp_rate", default=1.0, doc="weight of the attention-projected [CLS] loss"),
            OptionSpec(name="soft_rate", default=0.7, doc="weight of the soft loss"),
            OptionSpec(name="hard_rate", default=0.1, doc="weight of the hard loss"),
        ),
        description="Per student layer, MSE to an attention-weighted sum of all teacher [CLS] states + soft "
        "(T=20, 0.7) + hard (0.1); hidden sizes must match.",
    )
)
