"""LLM logit divergences (not in GKD): fkl, rkl, jsd, skew_fkl, skew_rkl, tvd.

Each is one term computed by `gkd.kernels.kd_loss` (or, when every model is a decoder and the planner chose
the
fused path, `gkd.kernels.fused_linear_kd_loss` on final hidden states and LM-head weights, so the (tokens x V)
logits never exist). Definitions are the kernel's: fkl = KL(p_t || p_s) (Hinton 2015), rkl = KL(p_s || p_t)
(MiniLLM, Gu et al. 2024), jsd = generalised JSD(beta) as in TRL's GKDTrainer (Agarwal et al. 2024; beta 0 ~
fkl, 1 ~ rkl), skew_fkl / skew_rkl with mixing alpha (DistiLLM, Ko et al. 2024), tvd = 0.5 sum |p_t - p_s|.
No T^2 factor is applied (these are used at T = 1 for LLMs; set `t2_scale` to multiply by T^2).
An optional hard LM loss is added with `hard_rate` (default 0, so the fused path is available).

topk_kl: forward KL against a teacher's stored top-k log-probs (offline distillation), the k entries plus one
tail bucket holding the rest of the probability mass on both sides (`topk_kl_rows` gives the formula). Its
teacher tap is the stored kind `topk` (a `TopK` of indices and log-probs), so resolve() reports offline_ok and
no live teacher forward. On decoders the loss runs fused on the student's final hidden state and LM-head
weight (`gkd.kernels.fused_linear_topk_kd_loss`); otherwise on materialised logits, same formula, in torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, logits_mask, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import LossTermSpec, MethodSpec, OptionSpec, TapSpec

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch")

_PAPERS = {
    "fkl": ("Forward KL", "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network", 2015),
    "rkl": ("Reverse KL", "Gu et al. MiniLLM: Knowledge Distillation of Large Language Models. ICLR", 2024),
    "jsd": (
        "Generalised Jensen-Shannon divergence",
        "Agarwal et al. On-Policy Distillation of Language Models (GKD). ICLR",
        2024,
    ),
    "skew_fkl": (
        "Skew forward KL",
        "Ko et al. DistiLLM: Towards Streamlined Distillation for LLMs. ICML",
        2024,
    ),
    "skew_rkl": (
        "Skew reverse KL",
        "Ko et al. DistiLLM: Towards Streamlined Distillation for LLMs. ICML",
        2024,
    ),
    "tvd": (
        "Total variation distance",
        "Wen et al. f-Divergence Minimization for Sequence-Level KD. ACL",
        2023,
    ),
}


def divergence_loss(ctx: LossContext, divergence: str) -> Tensor:
    """The divergence of the current teacher's distribution and the student's, per the kernel contract."""
    kwargs = {
        "temperature": ctx.temperature,
        "beta": float(ctx.options.get("beta", 0.5)),
        "alpha": float(ctx.options.get("alpha", 0.1)),
    }
    scale = ctx.temperature**2 if ctx.options.get("t2_scale", False) else 1.0
    stored = stored_teacher(ctx)
    if stored is not None:
        if divergence != "fkl":
            raise InputError(
                f"{divergence} needs the teacher's whole distribution, which an offline teacher pass does "
                "not store (only its top-k); use a live teacher placement"
            )
        return topk_loss(ctx, stored) * scale
    if "logits" in ctx.student:
        from gkd.kernels import kd_loss

        value = kd_loss(
            ctx.s("logits"), ctx.t("logits"), divergence=divergence, mask=logits_mask(ctx), **kwargs
        )
    else:
        # Fused path: resolve() replaced the logits taps by `final`; the runtime passes the LM-head weights.
        from gkd.kernels import fused_linear_kd_loss  # type: ignore[attr-defined]

        s_w = ctx.heads["student"]
        t_w = ctx.heads["teachers"][ctx.teacher]
        mask = None if ctx.mask is None else ctx.mask.reshape(-1)
        value = fused_linear_kd_loss(
            ctx.student["final"].reshape(-1, ctx.student["final"].shape[-1]),
            s_w,
            ctx.teachers[ctx.teacher]["final"].reshape(-1, ctx.teachers[ctx.teacher]["final"].shape[-1]),
            t_w,
            divergence=divergence,
            mask=mask,
            **kwargs,
        )
    return value * scale


def _register(name: str) -> None:
    title, paper, year = _PAPERS[name]
    register_loss(f"{name}.div")(lambda ctx, _d=name: divergence_loss(ctx, _d))
    options = [
        OptionSpec(name="hard_rate", default=0.0, doc="weight of an added hard LM loss (0 = none)"),
        OptionSpec(name="t2_scale", default=False, doc="multiply the divergence by T^2"),
    ]
    if name == "jsd":
        options.append(OptionSpec(name="beta", default=0.5, doc="JSD interpolation (0 ~ fkl, 1 ~ rkl)"))
    if name in ("skew_fkl", "skew_rkl"):
        options.append(OptionSpec(name="alpha", default=0.1, doc="skew mixing coefficient"))
    register(
        MethodSpec(
            name=name,
            title=title,
            paper=paper,
            year=year,
            taps=(TapSpec(kind="logits"),),
            terms=(
                LossTermSpec(
                    name="div",
                    fn=f"{name}.div",
                    kernel="kd_loss",
                    taps=("logits",),
                    temperature=1.0,
                    fused_linear=True,
                ),
                LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
            ),
            constraints=("equal_vocab",),
            teachers="multi",
            aggregation="weighted",
            options=tuple(options),
            description=f"{title} between teacher and student token distributions.",
        )
    )


for _name in _PAPERS:
    _register(_name)


# ------------------------------------------------------------------------------------------------------------
# topk_kl: forward KL against stored top-k teacher log-probs (offline distillation)
# ------------------------------------------------------------------------------------------------------------


class TopK(NamedTuple):
    """A teacher's stored top-k per token: `indices` (..., k) int64 and `logprobs` (..., k), the teacher's
    log-softmax at those indices, computed from logits already divided by the distillation temperature.

    This is the value of the `topk` tap (a stored teacher output, `gkd.methods.spec.STORED_KINDS`): the
    offline teacher pass writes it and the training step reads it instead of running the teacher."""

    indices: Tensor
    logprobs: Tensor


def topk_targets(teacher_logits: Tensor, k: int, *, temperature: float = 1.0) -> TopK:
    """What the offline teacher pass stores: the top-k of log_softmax(teacher_logits / T) per token."""
    if not 1 <= k <= teacher_logits.shape[-1]:
        vocab = teacher_logits.shape[-1]
        raise InputError(f"top-k width {k} must be between 1 and the vocabulary size {vocab}")
    logp = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    return TopK(indices=indices, logprobs=values)


def topk_kl_rows(student_logits: Tensor, target: TopK, temperature: float) -> Tensor:
    """Per-token loss on materialised logits, the same formula as `fused_linear_topk_kd_loss`:

        L = sum_{i in K} p_i (log p_i - log q_i) + P (log P - log Q)      (0 log 0 = 0)

    with q = softmax(s / T), p_i = exp(stored log-prob), P = max(1 - sum_K p, 0) the teacher's tail mass and
    Q = sum_{j not in K} q_j the student's (its log from a log-sum-exp over the complement, so a tiny tail
    stays accurate). The teacher side is constant (no gradient)."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    idx = target.indices.to(log_q.device)
    logq_k = log_q.gather(-1, idx)
    log_tail_q = torch.logsumexp(log_q.scatter(-1, idx, -math.inf), dim=-1)
    logp = target.logprobs.detach().to(log_q.device, acc)
    p = logp.exp()
    tail_p = (1.0 - p.sum(-1)).clamp(min=0.0)
    zero = log_q.new_zeros(())
    head = torch.where(p > 0, p * (logp - logq_k), zero).sum(-1)
    has_tail = (tail_p > 0) & (log_tail_q > -math.inf)
    safe_tail_p = torch.where(has_tail, tail_p, torch.ones_like(tail_p))
    tail = torch.where(has_tail, tail_p * (torch.log(safe_tail_p) - log_tail_q), zero)
    return head + tail


def _masked_mean(rows: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return rows.mean()
    m = mask.to(rows.dtype)
    return (rows * m).sum() / m.sum().clamp(min=1.0)


def topk_entropy_rows(target: TopK) -> Tensor:
    """The teacher's entropy per token as the stored top-k sees it: -sum_K p log p - P log P (tail P)."""
    logp = target.logprobs.float() if target.logprobs.dtype != torch.float64 else target.logprobs
    p = logp.exp()
    tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    zero = logp.new_zeros(())
    head = torch.where(p > 0, -p * logp, zero).sum(-1)
    safe = torch.where(tail > 0, tail, torch.ones_like(tail))
    return head + torch.where(tail > 0, -tail * torch.log(safe), zero)


def topk_loss(ctx: LossContext, target: TopK, *, cross_entropy: bool = False) -> Tensor:
    """Forward KL (or, with `cross_entropy`, the soft cross-entropy = KL + the teacher's entropy) of the
    student against a stored top-k with the tail bucket, averaged over the masked tokens: fused on the final
    hidden state and LM-head weight when resolve() chose the fused path (decoders), else on the logits."""
    if "logits" in ctx.student:
        rows = topk_kl_rows(ctx.s("logits"), target, ctx.temperature)
        if cross_entropy:
            rows = rows + topk_entropy_rows(target).to(rows.device, rows.dtype)
        return _masked_mean(rows, logits_mask(ctx))
    from gkd.kernels import fused_linear_topk_kd_loss

    value = fused_linear_topk_kd_loss(
        ctx.student["final"],
        ctx.heads["student"],
        target.indices,
        target.logprobs,
        temperature=ctx.temperature,
        mask=ctx.mask,
    )
    if cross_entropy:
        entropy = topk_entropy_rows(target).reshape(-1)
        mask = None if ctx.mask is None else ctx.mask.reshape(-1).to(entropy.device)
        value = value + _masked_mean(entropy.to(value.device), mask)
    return value


def stored_teacher(ctx: LossContext) -> TopK | None:
    """The current teacher's stored top-k when the run reads the teacher from an offline pass: the runtime
    then serves its `logits` (or, on the fused path, `final`) tap as a `TopK` instead of a live tensor."""
    taps = ctx.teachers[ctx.teacher] if ctx.teachers else {}
    for name in ("logits", "final"):
        if isinstance(taps.get(name), TopK):
            return taps[name]
    return None


@register_loss("topk_kl.div")
def topk_kl_loss(ctx: LossContext) -> Tensor:
    """Forward KL against the stored top-k with the tail bucket (see `topk_loss`)."""
    target = ctx.t("topk")
    if not isinstance(target, TopK):
        raise InputError("the topk tap must hold the stored (indices, log-probs) of the offline teacher pass")
    return topk_loss(ctx, target)


TOPK_KL = register(
    MethodSpec(
        name="topk_kl",
        title="Top-k forward KL against stored teacher log-probs (offline teacher)",
        paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (forward KL), "
        "truncated to stored top-k teacher entries plus a tail bucket",
        year=2015,
        # The teacher side is stored (offline pass), never a live forward: resolve() reports offline_ok and
        # needs_teacher_forward False for this method alone.
        taps=(TapSpec(kind="logits", side="student"), TapSpec(kind="topk", side="teacher")),
        terms=(
            LossTermSpec(
                name="div",
                fn="topk_kl.div",
                kernel="fused_linear_topk_kd_loss",
                taps=("logits", "topk"),
                temperature=1.0,
                fused_linear=True,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_vocab",),
        options=(OptionSpec(name="hard_rate", default=0.0, doc="weight of an added hard LM loss, 0 = none"),),
        description="KL(p_t || p_s) over the stored top-k entries plus one bucket for the rest of the "
        "vocabulary; the teacher runs once, offline, and stores (indices, log-probs) per token.",
    )
)
