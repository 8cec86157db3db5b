"""Layer-to-layer transformer distillation: TinyBERT (Jiao et al., EMNLP Findings 2020) and MobileBERT
(Sun et al., ACL 2020).

TinyBERT: student depth j is paired with teacher depth j * Lt // Ls (uniform). Losses, summed over layers:
- attention: per mapped layer, the MSE between the unnormalised attention matrices A = Q K^T / sqrt(d),
  averaged over heads and visible (query, key) pairs (padding keys/queries and, on decoders, keys j > i do
  not count: there the model's matrices hold mask fill values, not scores). By default computed by
  `gkd.kernels.scores_mse_loss` from the q and k taps (no (T x T) matrix stored); `attention_from: scores`
  reads the captured `scores` taps instead (the model's own masked matrices; eager attention).
- hidden: MSE(h_s W, h_t) with one learned `fit_dense` Linear(Ds -> Dt) (as in the TinyBERT code), over the
  embedding output (depth 0), the mapped layer outputs of depths 1..Ls-1 and the `final` states (the last
  layer's output after the final norm; for post-LN encoders it is the last layer's output itself), so
  Ls + 1 pairs as in the paper. Mean over real positions and features, via `gkd.kernels.hidden_loss`.
- prediction: soft cross-entropy -sum p_t(T) log p_s(T) (no T^2; T = 1 by default) on the logits.
Stages: general intermediate distillation (pretraining corpus), task intermediate distillation (augmented task
data), task prediction distillation. Head counts and vocabularies must match; hidden sizes may differ.

MobileBERT: progressive knowledge transfer. The distillation stage is split into Ls parts (steps / (Ls + 1)
each; the last part also runs until the stage ends); part n trains student layer n + 1 (1-based) against its
mapped teacher layer with the attention KL (`gkd.methods.attention.attention_kl`) plus the feature-map MSE
of the layer outputs (the embedding output belongs to the first part); layers trained in earlier parts stay in
the loss with weight `trained_weight` (0.1) instead of being frozen. Then pre-training distillation: MLM
(`mlm_rate` 0.5) + soft KL on the MLM logits (`soft_rate` 0.5), then plain finetuning.
Requirement on the models: the paper's teacher is IB-BERT, an inverted-bottleneck BERT whose layer outputs
(feature maps) have the student's width; train such a teacher first (its own run, not part of this recipe).
gkd checks what the losses need: equal hidden sizes (feature maps), equal head counts (attention), equal
vocabularies (MLM distillation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.lazy import lazy_import
from gkd.methods.attention import allowed_pairs, attention_kl, is_causal
from gkd.methods.losses import LossContext, register_loss
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
    from torch import Tensor
else:
    torch = lazy_import("torch")

# ---------------------------------------------------------------------------------------------------------
# TinyBERT


@register_loss("tinybert.attention")
def tinybert_attention(ctx: LossContext) -> Tensor:
    """Sum over mapped layers of the scores MSE, from q and k by the fused kernel."""
    from gkd.kernels import scores_mse_loss

    losses = []
    for s_d, t_d in ctx.layer_pairs("q"):
        s_q, s_k = ctx.s("q", s_d), ctx.s("k", s_d)
        t_q, t_k = ctx.t("q", t_d), ctx.t("k", t_d)
        losses.append(
            scores_mse_loss(
                s_q,
                s_k,
                t_q,
                t_k,
                s_scale=s_q.shape[-1] ** -0.5,
                t_scale=t_q.shape[-1] ** -0.5,
                mask=ctx.mask,
                causal=is_causal(ctx),
            )
        )
    return torch.stack(losses).sum()


def scores_mse(s_scores: Tensor, t_scores: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """MSE between (B, H, T, T) score matrices over the visible (query, key) pairs of real query rows."""
    b, h, t, _ = s_scores.shape
    allowed = allowed_pairs(mask, b, t, causal, s_scores.device)
    if mask is not None:
        allowed = allowed & mask[:, None, :, None]  # padding query rows do not count
    allowed = allowed.expand(b, h, t, t)
    diff = torch.where(allowed, s_scores - t_scores.detach().to(s_scores.dtype), 0.0)
    return diff.square().sum() / allowed.sum().clamp(min=1)


@register_loss("tinybert.attention_scores")
def tinybert_attention_scores(ctx: LossContext) -> Tensor:
    """Sum over mapped layers of the scores MSE, from the captured scores taps."""
    losses = [
        scores_mse(ctx.s("scores", s_d), ctx.t("scores", t_d), ctx.mask, is_causal(ctx))
        for s_d, t_d in ctx.layer_pairs("scores")
    ]
    return torch.stack(losses).sum()


@register_loss("tinybert.hidden")
def tinybert_hidden(ctx: LossContext) -> Tensor:
    """Sum of MSE(h_s W, h_t) over the embedding, the mapped intermediate layers and the final states."""
    from gkd.kernels import hidden_loss

    fit = ctx.extra("fit_dense")
    pairs = [(ctx.s("hidden", s_d), ctx.t("hidden", t_d)) for s_d, t_d in ctx.layer_pairs("hidden")]
    pairs.append((ctx.s("final"), ctx.t("final")))
    losses = [
        hidden_loss(s, t, kind="mse", projection=fit.weight, projection_bias=fit.bias, mask=ctx.mask)
        for s, t in pairs
    ]
    return torch.stack(losses).sum()


_UNIFORM = LayerRule(kind="uniform")
_INTERMEDIATE = ("attention", "attention_scores", "hidden")

TINYBERT = register(
    MethodSpec(
        name="tinybert",
        title="TinyBERT: transformer-layer, embedding and prediction distillation",
        paper="Jiao et al. TinyBERT: Distilling BERT for Natural Language Understanding. EMNLP Findings",
        year=2020,
        taps=(
            TapSpec(kind="q", layers=_UNIFORM),
            TapSpec(kind="k", layers=_UNIFORM),
            TapSpec(kind="scores", layers=_UNIFORM),
            TapSpec(kind="hidden", layers=LayerRule(kind="uniform", include_emb=True, drop_last=True)),
            TapSpec(kind="final"),
            TapSpec(kind="logits"),
        ),
        terms=(
            LossTermSpec(
                name="attention",
                fn="tinybert.attention",
                kernel="scores_mse_loss",
                taps=("q", "k"),
                when=(("attention_from", "qk"),),
            ),
            LossTermSpec(
                name="attention_scores",
                fn="tinybert.attention_scores",
                taps=("scores",),
                when=(("attention_from", "scores"),),
            ),
            LossTermSpec(name="hidden", fn="tinybert.hidden", kernel="hidden_loss", taps=("hidden", "final")),
            LossTermSpec(name="prediction", fn="soft", kernel="kd_loss", taps=("logits",), temperature=1.0),
        ),
        extras=(
            ExtraSpec(name="fit_dense", in_dim="student.hidden", out_dim="teacher.hidden", terms=("hidden",)),
        ),
        constraints=("equal_heads", "equal_vocab"),
        stages=(
            StageSpec(
                name="general_intermediate",
                fraction=1 / 3,
                terms=_INTERMEDIATE,
                description="attention + hidden (incl. embedding, final) distillation on a general corpus",
            ),
            StageSpec(
                name="task_intermediate",
                fraction=1 / 3,
                terms=_INTERMEDIATE,
                description="the same losses on (augmented) task data",
            ),
            StageSpec(
                name="task_prediction",
                fraction=1 / 3,
                terms=("prediction",),
                description="soft cross-entropy on the logits",
            ),
        ),
        options=(
            OptionSpec(
                name="attention_from",
                default="qk",
                doc="qk: scores MSE from q/k by the fused kernel; scores: from captured scores taps (OPT)",
            ),
            OptionSpec(
                name="soft", default="soft_ce", doc="prediction loss: soft_ce (paper), kl (x T^2) or mse"
            ),
        ),
        description="Attention-score MSE + hidden MSE through fit_dense (emb, mapped layers, final), then "
        "prediction soft CE; heads must match.",
    )
)


# ---------------------------------------------------------------------------------------------------------
# MobileBERT


def _progressive_weights(pairs: tuple[tuple[int, int], ...], trained: float) -> list[float]:
    """Weight 1 for the layer being trained (the newest unlocked pair; the embedding pair with the first
    layer), `trained` for layers trained in earlier parts."""
    layered = [p for p in pairs if p != (0, 0)]
    newest = layered[-1] if layered else None
    out = []
    for p in pairs:
        current = p == newest or (p == (0, 0) and len(layered) <= 1)
        out.append(1.0 if current else trained)
    return out


@register_loss("mobilebert.attention")
def mobilebert_attention(ctx: LossContext) -> Tensor:
    pairs = ctx.layer_pairs("q")
    weights = _progressive_weights(pairs, float(ctx.options["trained_weight"]))
    return torch.stack(
        [w * attention_kl(ctx, s_d, t_d) for w, (s_d, t_d) in zip(weights, pairs, strict=True)]
    ).sum()


@register_loss("mobilebert.feature")
def mobilebert_feature(ctx: LossContext) -> Tensor:
    from gkd.kernels import hidden_loss

    pairs = ctx.layer_pairs("hidden")
    weights = _progressive_weights(pairs, float(ctx.options["trained_weight"]))
    losses = [
        w * hidden_loss(ctx.s("hidden", s_d), ctx.t("hidden", t_d), kind="mse", mask=ctx.mask)
        for w, (s_d, t_d) in zip(weights, pairs, strict=True)
    ]
    return torch.stack(losses).sum()


_PROGRESSIVE = LayerRule(kind="progressive")

MOBILEBERT = register(
    MethodSpec(
        name="mobilebert",
        title="MobileBERT: progressive knowledge transfer",
        paper="Sun et al. MobileBERT: a Compact Task-Agnostic BERT for Resource-Limited Devices. ACL",
        year=2020,
        taps=(
            TapSpec(kind="q", layers=_PROGRESSIVE),
            TapSpec(kind="k", layers=_PROGRESSIVE),
            TapSpec(kind="hidden", layers=LayerRule(kind="progressive", include_emb=True)),
            TapSpec(kind="logits"),
        ),
        terms=(
            LossTermSpec(
                name="attention", fn="mobilebert.attention", kernel="relation_kl_loss", taps=("q", "k")
            ),
            LossTermSpec(name="feature", fn="mobilebert.feature", kernel="hidden_loss", taps=("hidden",)),
            LossTermSpec(name="mlm", fn="hard", taps=("logits",), weight_option="mlm_rate", hard=True),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
            LossTermSpec(name="task", fn="hard", taps=("logits",), hard=True),
        ),
        constraints=("equal_hidden", "equal_heads", "equal_vocab"),
        stages=(
            StageSpec(
                name="progressive_kd",
                fraction=0.5,
                terms=("attention", "feature"),
                description="layer by layer: attention KL + feature-map MSE; earlier layers weighted 0.1",
            ),
            StageSpec(
                name="pretrain_distill",
                fraction=0.25,
                terms=("mlm", "soft"),
                description="MLM + soft KL on the MLM logits",
            ),
            StageSpec(
                name="finetune",
                fraction=0.25,
                terms=("task",),
                train="student",
                teacher=False,
                description="plain finetuning on the task",
            ),
        ),
        options=(
            OptionSpec(name="trained_weight", default=0.1, doc="weight of layers trained in earlier parts"),
            OptionSpec(
                name="mlm_rate", default=0.5, doc="weight of the MLM loss in pre-training distillation"
            ),
            OptionSpec(
                name="soft_rate", default=0.5, doc="weight of the soft KL in pre-training distillation"
            ),
            OptionSpec(name="soft", default="kl", doc="soft loss: kl (x T^2), soft_ce or mse"),
        ),
        description="Progressive attention KL + feature-map MSE, then MLM distillation; needs an "
        "inverted-bottleneck teacher with the student's feature-map width and heads.",
    )
)
