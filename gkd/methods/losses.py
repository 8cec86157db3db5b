"""Loss functions of the method library, registered by name, and the context they read.

A method's `LossTermSpec.fn` names a function registered here with `@register_loss(name)`. Its signature is
`fn(ctx: LossContext) -> Tensor` (a scalar, before the term's weight and schedule are applied). The context
gives the captured tensors by the method's tap names and layer pairs, the method's options and extras, the
labels and mask, the step, and which teacher is current. Loss functions call `gkd.kernels` where a fused
kernel exists (the term's `kernel` field says which) and are plain torch otherwise.

Design choices:
- One registry for every family: `generic` losses (the prediction-layer soft loss, the hard task / LM loss)
  live here because almost every method uses them; family-specific ones live in the family file.
- Multi-teacher aggregation is done by the caller (`gkd.methods.distill_loss.DistillLoss`): for "sum" /
  "mean" / "weighted" methods the function is called once per teacher with `ctx.teacher` set; "custom"
  methods (RL-KD, uncertainty) see every teacher through `ctx.num_teachers` and do their own aggregation.
- [CLS] on a decoder is an explicit choice (`cls` option): "last" non-pad token or "mean" pool; "first" is
  BERT's [CLS]; "auto" picks first for encoders and last for decoders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.mapping import Pair, tap_name

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
else:
    torch = lazy_import("torch")
    F = lazy_import("torch.nn.functional")

LossFn = Callable[["LossContext"], "Tensor"]
_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in _LOSSES and _LOSSES[name] is not fn:
            raise ValueError(f"loss function {name!r} registered twice")
        _LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    from gkd.methods.registry import names

    names()  # import family files so their losses are registered
    if name not in _LOSSES:
        raise KeyError(f"loss function {name!r} is not registered")
    return _LOSSES[name]


@dataclass(kw_only=True)
class LossContext:
    """What one loss term sees. Built by `DistillLoss` for each term (and each teacher, when aggregated)."""

    method: str
    term: str
    options: dict[str, Any]
    student: dict[str, Tensor]
    teachers: list[dict[str, Tensor]]
    # tap name (as declared in the method spec) -> per-teacher tuple of (student depth, teacher depth) pairs;
    # global taps have no entry.
    pairs: dict[str, tuple[tuple[Pair, ...], ...]]
    kinds: dict[str, str]  # tap name -> tap kind
    extras: nn.ModuleDict
    labels: Tensor | None = None
    mask: Tensor | None = None  # (B, T) bool, True = real token
    step: int = 0
    total_steps: int = 0
    temperature: float = 1.0
    teacher: int = 0  # the current teacher index
    student_is_encoder: bool = False
    # "student" / "teachers": LM-head weights for fused-linear terms
    heads: dict[str, Any] = field(default_factory=dict)
    # taps of extra forwards made by hook ops, keyed by op name (DIITO's interchange pass, LRC-BERT's
    # perturbed pass)
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    def layer_pairs(self, tap: str, teacher: int | None = None) -> tuple[Pair, ...]:
        """The (student depth, teacher depth) pairs of layered tap `tap` for a teacher (default: current)."""
        return self.pairs[tap][self.teacher if teacher is None else teacher]

    def s(self, tap: str, depth: int | None = None) -> Tensor:
        """The student tensor of tap `tap` at student depth `depth` (None for emb / final / logits)."""
        return self.student[tap_name(self.kinds[tap], depth)]

    def t(self, tap: str, depth: int | None = None, teacher: int | None = None) -> Tensor:
        """The teacher tensor of tap `tap` at teacher depth `depth`, from `teacher` (default: current)."""
        return self.teachers[self.teacher if teacher is None else teacher][tap_name(self.kinds[tap], depth)]

    def pair_index(self, tap: str, n: int) -> int:
        """Index of the copy of a per="pair" extra for pair n of `tap` and the current teacher (copies are
        laid
        out teacher by teacher, each with one copy per mapped pair)."""
        return sum(len(self.pairs[tap][i]) for i in range(self.teacher)) + n

    def teacher_layer_index(self, depth: int, layer_counts: list[int]) -> int:
        """Index of the copy of a per="teacher_layer" extra for teacher depth 1..Lt of the current teacher."""
        return sum(layer_counts[: self.teacher]) + depth - 1

    def extra(self, name: str, index: int | None = None) -> nn.Module:
        """The method's extra `name`; `index` selects the copy of a per-teacher / per-layer / per-pair extra
        (per="teacher": the teacher index; "student_layer": depth - 1; "pair": `pair_index`)."""
        module = self.extras[name]
        if index is None:
            return module
        return module[index]  # type: ignore[index]

    def cls(self, x: Tensor) -> Tensor:
        """Pool (B, T, D) to (B, D) by the `cls` option: first token, last real token, or masked mean."""
        return pool(x, self.options.get("cls", "auto"), self.mask, encoder=self.student_is_encoder)

    def flat_mask(self) -> Tensor | None:
        return None if self.mask is None else self.mask.reshape(-1)


def pool(x: Tensor, choice: str, mask: Tensor | None, *, encoder: bool) -> Tensor:
    """[CLS] representation of (B, T, D) states: "first", "last" (last real token), "mean" (masked mean)."""
    if choice == "auto":
        choice = "first" if encoder else "last"
    if choice == "first":
        return x[:, 0]
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if choice == "last":
        # Last real token per row; works for right padding (the usual) and no padding.
        idx = mask.long().sum(dim=1).clamp(min=1) - 1
        return x[torch.arange(x.shape[0], device=x.device), idx]
    if choice == "mean":
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    raise InputError(f"cls option {choice!r} is not first, last, mean or auto")


def hard_loss_kind(options: dict[str, Any], *, encoder: bool) -> str:
    kind = options.get("hard_loss", "auto")
    if kind == "auto":
        return "mlm" if encoder else "causal_lm"
    return kind


def task_loss(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    """The hard loss: MLM (labels -100 ignored), causal LM (shifted by one), or classification
    ((B, C) logits, (B,) labels). Token losses run `gkd.kernels.cross_entropy_loss`, which keeps only a
    gradient in the logits' dtype (not a float32 log-softmax); the causal shift moves the labels, not the
    logits, so the logits are never copied."""
    from gkd.kernels import cross_entropy_loss

    vocab = logits.shape[-1]
    if kind == "mlm":
        return cross_entropy_loss(logits.reshape(-1, vocab), labels.reshape(-1))
    if kind == "causal_lm":
        ignored = labels.new_full((*labels.shape[:-1], 1), -100)
        targets = torch.cat([labels[..., 1:], ignored], dim=-1)  # row t predicts token t + 1; the last none
        return cross_entropy_loss(logits.reshape(-1, vocab), targets.reshape(-1))
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels)
    raise InputError(f"hard_loss {kind!r} is not mlm, causal_lm, classification or none")


@register_loss("hard")
def hard(ctx: LossContext) -> Tensor:
    """The task / LM loss on the student's logits and the labels."""
    if ctx.labels is None:
        raise InputError(
            f"method {ctx.method!r} has a hard loss but the batch has no labels; set hard_rate: 0"
        )
    kind = hard_loss_kind(ctx.options, encoder=ctx.student_is_encoder)
    return task_loss(ctx.s("logits"), ctx.labels, kind)


def logits_mask(ctx: LossContext) -> Tensor | None:
    """Token mask for logit losses: the padding mask, restricted to labelled (MLM) positions for MLM
    students when the `masked_positions_only` option is set."""
    mask = ctx.mask
    if ctx.labels is not None and ctx.student_is_encoder and ctx.options.get("masked_positions_only", False):
        label_mask = ctx.labels != -100
        mask = label_mask if mask is None else mask & label_mask
    return mask


@register_loss("soft")
def soft(ctx: LossContext) -> Tensor:
    """The generic prediction-layer soft loss on logits with temperature T (the `soft` option):

    "soft_ce": soft cross-entropy -sum p_t log p_s at T (no T^2), the finetuning default;
    "kl": KL(p_t || p_s) * T^2, the pretraining default (Hinton 2015); "mse": MSE on raw logits.
    Against an offline teacher (a stored top-k, `gkd.methods.divergence.stored_teacher`) kl and soft_ce are
    computed over the top-k entries plus the tail bucket.
    """
    from gkd.kernels import kd_loss
    from gkd.methods.divergence import stored_teacher, topk_loss

    kind = ctx.options.get("soft", "kl")
    stored = stored_teacher(ctx)
    if stored is not None:  # an offline teacher pass: its top-k log-probs at this temperature
        if kind == "mse":
            raise InputError(
                "the mse soft loss needs the teacher's raw logits, which an offline pass does not store"
            )
        value = topk_loss(ctx, stored, cross_entropy=kind == "soft_ce")
        return value * ctx.temperature**2 if kind == "kl" else value
    s, t = ctx.s("logits"), ctx.t("logits")
    mask = logits_mask(ctx)
    temp = ctx.temperature
    if kind == "kl":
        return kd_loss(s, t, divergence="fkl", temperature=temp, mask=mask) * temp**2
    if kind == "soft_ce":
        return kd_loss(s, t, divergence="soft_ce", temperature=temp, mask=mask)
    if kind == "mse":
        return kd_loss(s, t, divergence="mse", temperature=1.0, mask=mask)
    raise InputError(f"soft option {kind!r} is not kl, soft_ce or mse")
