"""Attention-distribution methods: MiniLM (Wang et al., NeurIPS 2020) and SID (Aguilar et al., AAAI 2020).

Shared helpers (also used by TinyBERT and MobileBERT in `gkd.methods.tinybert`):
- `attention_kl`: KL(A_t || A_s) between the attention distributions A = softmax(Q K^T / sqrt(d)) of a student
  and a teacher layer, computed by `gkd.kernels.relation_kl_loss` from the captured q and k taps, so the
  (B, H, T, T) matrices are never stored; it equals the KL of the `probs` taps (tests check this on real
  models). Averaged over batch, heads and real query rows; padding keys are excluded, and on decoders keys
  j > i too (the model never attends to them). Grouped-query k is shared across its query heads.
- `scores_kl`: the same KL from captured `scores` taps (plain torch), where the model's own masked
  matrices are wanted (eager attention).

MiniLM: the last student layer against the last teacher layer (`layer_map` overrides), attention KL plus the
value-relation KL between softmax(V V^T / sqrt(d)) of both, each a KL over the key axis; softmax is applied
once to the scaled dot products (the paper), not again to probabilities (a GLMKD quirk). On decoders both
relations are causal (keys j <= i), as for MiniLMv2. Head counts must match; values of grouped-query models
are expanded to the query heads when the two sides group differently.
Recipe: task-agnostic distillation, then plain finetuning (stage `finetune`, no teacher).

SID (stacked internal distillation): the uniform layer pairs are unlocked one at a time; stage n of Ls + 1
(steps / (Ls + 1) each, counted within the distillation stage) trains pairs 1..n+1 with the attention KL and
the cosine distance 1 - cos between [CLS] states (`cls` option; on decoders the last real token by default),
both summed over the unlocked pairs; the prediction loss (soft + hard) starts when every layer is unlocked.
The [CLS] state of depth d is `hidden[d]` (the layer's output; for post-LN encoders the last one is `final`).
Recipe: plain pretraining (stage `pretrain`, no teacher), then the progressive distillation. Heads and hidden
sizes must match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import (
    LayerRule,
    LossTermSpec,
    MethodSpec,
    OptionSpec,
    Schedule,
    StageSpec,
    TapSpec,
)

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch")


def is_causal(ctx: LossContext) -> bool:
    """Decoders attend to keys j <= i only; attention-derived losses compare those entries."""
    return not ctx.student_is_encoder


def attention_kl(ctx: LossContext, s_depth: int, t_depth: int) -> Tensor:
    """KL(softmax(t_q t_k^T / sqrt(d_t)) || softmax(s_q s_k^T / sqrt(d_s))) of one layer pair (taps q, k)."""
    from gkd.kernels import relation_kl_loss

    s_q, s_k = ctx.s("q", s_depth), ctx.s("k", s_depth)
    t_q, t_k = ctx.t("q", t_depth), ctx.t("k", t_depth)
    return relation_kl_loss(
        s_q,
        s_k,
        t_q,
        t_k,
        s_scale=s_q.shape[-1] ** -0.5,
        t_scale=t_q.shape[-1] ** -0.5,
        mask=ctx.mask,
        causal=is_causal(ctx),
    )


def allowed_pairs(mask: Tensor | None, batch: int, tokens: int, causal: bool, device: torch.device) -> Tensor:
    """(B, 1, T, T) bool: key j is visible from query i (real key, and j <= i when causal)."""
    keys = torch.ones(batch, tokens, dtype=torch.bool, device=device) if mask is None else mask
    allowed = keys[:, None, None, :].expand(batch, 1, tokens, tokens)
    if causal:
        allowed = allowed & torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    return allowed


def scores_kl(s_scores: Tensor, t_scores: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """KL(softmax(t) || softmax(s)) over the allowed keys of (B, H, T, T) scores; mean over batch, heads and
    real query rows."""
    b, h, t, _ = s_scores.shape
    allowed = allowed_pairs(mask, b, t, causal, s_scores.device)
    # A large finite fill (not -inf) keeps rows without any allowed key finite; they never count.
    s = s_scores.float() if s_scores.dtype in (torch.float16, torch.bfloat16) else s_scores
    t_ = t_scores.detach().to(s.dtype)
    neg = torch.finfo(s.dtype).min
    log_s = torch.log_softmax(s.masked_fill(~allowed, neg), dim=-1)
    log_t = torch.log_softmax(t_.masked_fill(~allowed, neg), dim=-1)
    per_row = torch.where(allowed, log_t.exp() * (log_t - log_s), 0.0).sum(-1)  # (B, H, T)
    rows = (torch.ones(b, t, dtype=torch.bool, device=s.device) if mask is None else mask)[:, None, :]
    rows = rows.expand(b, h, t)
    return torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp(min=1)


def _expand_heads(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


# ---------------------------------------------------------------------------------------------------------
# MiniLM


@register_loss("minilm.attention")
def minilm_attention(ctx: LossContext) -> Tensor:
    losses = [attention_kl(ctx, s_d, t_d) for s_d, t_d in ctx.layer_pairs("q")]
    return torch.stack(losses).sum()


@register_loss("minilm.value")
def minilm_value(ctx: LossContext) -> Tensor:
    """Value relation: KL(softmax(V_t V_t^T / sqrt(d_t)) || softmax(V_s V_s^T / sqrt(d_s))) per head."""
    from gkd.kernels import relation_kl_loss

    losses = []
    for s_d, t_d in ctx.layer_pairs("v"):
        s_v, t_v = ctx.s("v", s_d), ctx.t("v", t_d)
        if s_v.shape[1] != t_v.shape[1]:
            # Grouped-query models group differently: compare per query head (what each head attends with).
            heads = ctx.s("q", s_d).shape[1]
            s_v, t_v = _expand_heads(s_v, heads), _expand_heads(t_v, heads)
        losses.append(
            relation_kl_loss(
                s_v,
                s_v,
                t_v,
                t_v,
                s_scale=s_v.shape[-1] ** -0.5,
                t_scale=t_v.shape[-1] ** -0.5,
                mask=ctx.mask,
                causal=is_causal(ctx),
            )
        )
    return torch.stack(losses).sum()


_LAST = LayerRule(kind="last")

MINILM = register(
    MethodSpec(
        name="minilm",
        title="MiniLM: deep self-attention distillation",
        paper="Wang et al. MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of "
        "Pre-Trained Transformers. NeurIPS",
        year=2020,
        taps=(
            TapSpec(kind="q", layers=_LAST),
            TapSpec(kind="k", layers=_LAST),
            TapSpec(kind="v", layers=_LAST),
            TapSpec(kind="logits", side="student"),
        ),
        terms=(
            LossTermSpec(name="attention", fn="minilm.attention", kernel="relation_kl_loss", taps=("q", "k")),
            LossTermSpec(name="value", fn="minilm.value", kernel="relation_kl_loss", taps=("q", "v")),
            LossTermSpec(name="task", fn="hard", taps=("logits",), hard=True),
        ),
        constraints=("equal_heads",),
        stages=(
            StageSpec(
                name="pretrain_kd",
                fraction=0.5,
                terms=("attention", "value"),
                description="task-agnostic attention and value-relation distillation of the last layer",
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
        description="Last-layer attention KL + value-relation KL (softmax once); heads must match.",
    )
)


# ---------------------------------------------------------------------------------------------------------
# SID


@register_loss("sid.attention")
def sid_attention(ctx: LossContext) -> Tensor:
    return torch.stack([attention_kl(ctx, s_d, t_d) for s_d, t_d in ctx.layer_pairs("q")]).sum()


@register_loss("sid.cls")
def sid_cls(ctx: LossContext) -> Tensor:
    """Cosine distance 1 - cos between the [CLS] states of each unlocked pair, mean over the batch, summed."""
    from gkd.kernels import hidden_loss

    losses = [
        hidden_loss(ctx.cls(ctx.s("hidden", s_d)), ctx.cls(ctx.t("hidden", t_d)), kind="cosine")
        for s_d, t_d in ctx.layer_pairs("hidden")
    ]
    return torch.stack(losses).sum()


_PROGRESSIVE = LayerRule(kind="progressive")
_AFTER_ALL = Schedule(kind="after_progressive")

SID = register(
    MethodSpec(
        name="sid",
        title="SID: stacked internal distillation with progressive layer unlocking",
        paper="Aguilar et al. Knowledge Distillation from Internal Representations. AAAI",
        year=2020,
        taps=(
            TapSpec(kind="q", layers=_PROGRESSIVE),
            TapSpec(kind="k", layers=_PROGRESSIVE),
            TapSpec(kind="hidden", layers=_PROGRESSIVE),
            TapSpec(kind="logits"),
        ),
        terms=(
            LossTermSpec(name="attention", fn="sid.attention", kernel="relation_kl_loss", taps=("q", "k")),
            LossTermSpec(name="cls", fn="sid.cls", kernel="hidden_loss", taps=("hidden",)),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
                schedule=_AFTER_ALL,
            ),
            LossTermSpec(
                name="hard",
                fn="hard",
                taps=("logits",),
                weight_option="hard_rate",
                hard=True,
                schedule=_AFTER_ALL,
            ),
            LossTermSpec(name="pretrain", fn="hard", taps=("logits",), hard=True),
        ),
        constraints=("equal_heads", "equal_hidden", "equal_vocab"),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.5,
                terms=("pretrain",),
                train="student",
                teacher=False,
                description="plain pretraining of the student",
            ),
            StageSpec(
                name="progressive",
                fraction=0.5,
                terms=("attention", "cls", "soft", "hard"),
                description="layers unlocked one per steps/(Ls+1); prediction loss once all are unlocked",
            ),
        ),
        options=(
            OptionSpec(
                name="soft", default="soft_ce", doc="prediction soft loss: soft_ce, kl (x T^2) or mse"
            ),
            OptionSpec(name="soft_rate", default=1.0, doc="weight of the prediction soft loss"),
            OptionSpec(name="hard_rate", default=1.0, doc="weight of the prediction hard loss"),
        ),
        description="Progressive attention KL + [CLS] cosine distance, prediction loss last; heads and "
        "hidden sizes must match.",
    )
)
