"""Many-to-many intermediate-layer methods: Universal-KD (Wu et al., EMNLP 2021) and RAIL-KD (Haidar et al.,
NAACL 2022).

Universal-KD. Every intermediate student layer j = 1..Ls-1 and teacher layer k = 1..Lt-1 is pooled to one
vector per sample ([CLS] by the `cls` option: first token on encoders, last real token or masked mean on
decoders) and mapped to a common size (the student width) by its own bias-free projection,
s_j = P_j pool(h^S_j) and t_k = Q_k pool(h^T_k). Each student layer attends over the teacher layers,

    a_jk = softmax_k(s_j . t_k),   tbar_j = sum_k a_jk t_k,
    L_inter = sum_j  mean_batch  KL(softmax(tbar_j) || softmax(s_j))

weighted 0.5 (`inter_rate`), plus the soft KL * T^2 on logits weighted 0.5 (`soft_rate`, T = 1). Gradients
reach the student through s_j and the attention, and both projection families through tbar_j. The variant that
uses the final layers only is `layer_map: last` (one pair, depth Ls against depth Lt). Stages: KD finetuning,
then plain finetuning on the hard loss (its own run: `stage: finetune`).

RAIL-KD. Each re-draw picks Ls-1 distinct teacher depths from 1..Lt-1 at random, sorted, for the student
depths 1..Ls-1 (the `random` layer rule with `drop_last`; re-drawn every `every` steps from `seed`, so the
draw is a pure function of the step: the paper re-draws each epoch, so set `every` to the steps per epoch
with `layer_map: {kind: random, every: N, seed: S, drop_last: true}`; default every 1000 steps). The mapped
states are mean pooled over real tokens, concatenated layer by layer and projected to u = 128 (`u`) on each
side, then L2-normalised:

    L_rail = mean_batch || s / ||s|| - t / ||t|| ||^2,   s = W_S [pool(h^S_1); ...],   t = W_T [...]

Both projections are trainable (a Linear over the concatenation, stored as one block per layer:
W [x_1; ...; x_m] + b = sum_j (W_j x_j + b_j), the same function family). Loss = 1/3 L_rail + 1/3 soft (soft
cross-entropy at T = 1, the finetuning default) + 1/3 hard. The student usually starts from a DistilBERT-style
truncated model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, pool, register_loss
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


def _need_layers(ctx: LossContext, tap: str, what: str) -> tuple[tuple[int, int], ...]:
    pairs = ctx.layer_pairs(tap)
    if not pairs:
        raise InputError(
            f"{ctx.method} needs at least one intermediate {what} layer (a student with 2 or more layers); "
            f"use layer_map: last for the final layers only"
        )
    return pairs


def _project(ctx: LossContext, name: str, index: int, x: Tensor) -> Tensor:
    """Apply copy `index` of extra `name`, in the extra's dtype (fp32 extras on bf16 taps compute in fp32)."""
    proj = ctx.extra(name, index)
    return proj(x.to(proj.weight.dtype))


@register_loss("universal_kd.inter")
def universal_kd_inter(ctx: LossContext) -> Tensor:
    s_pairs = _need_layers(ctx, "s_hidden", "student")
    t_pairs = _need_layers(ctx, "t_hidden", "teacher")
    s = torch.stack(
        [
            _project(ctx, "s_proj", ctx.pair_index("s_hidden", n), ctx.cls(ctx.s("s_hidden", depth)))
            for n, (depth, _) in enumerate(s_pairs)
        ],
        dim=1,
    )  # (B, Ms, D)
    t = torch.stack(
        [
            _project(ctx, "t_proj", ctx.pair_index("t_hidden", n), ctx.cls(ctx.t("t_hidden", depth)))
            for n, (_, depth) in enumerate(t_pairs)
        ],
        dim=1,
    )  # (B, Mt, D)
    attention = torch.softmax(s @ t.transpose(1, 2), dim=-1)  # (B, Ms, Mt)
    target = attention @ t  # (B, Ms, D)
    log_p = torch.log_softmax(target, dim=-1)
    log_q = torch.log_softmax(s, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, Ms)
    return kl.mean(0).sum()


@register_loss("rail_kd.inter")
def rail_kd_inter(ctx: LossContext) -> Tensor:
    pairs = _need_layers(ctx, "hidden", "student")
    s_vec: Tensor | None = None
    t_vec: Tensor | None = None
    for n, (s_depth, t_depth) in enumerate(pairs):
        index = ctx.pair_index("hidden", n)
        hs = pool(ctx.s("hidden", s_depth), "mean", ctx.mask, encoder=ctx.student_is_encoder)
        ht = pool(ctx.t("hidden", t_depth), "mean", ctx.mask, encoder=ctx.student_is_encoder)
        s_part = _project(ctx, "s_proj", index, hs)
        t_part = _project(ctx, "t_proj", index, ht)
        s_vec = s_part if s_vec is None else s_vec + s_part
        t_vec = t_part if t_vec is None else t_vec + t_part
    assert s_vec is not None and t_vec is not None
    s_unit = torch.nn.functional.normalize(s_vec, p=2, dim=-1)
    t_unit = torch.nn.functional.normalize(t_vec, p=2, dim=-1)
    return (s_unit - t_unit).square().sum(-1).mean()


UNIVERSAL_KD = register(
    MethodSpec(
        name="universal_kd",
        title="Universal-KD: attention over teacher layers, output-space KL per student layer",
        paper="Wu, Rezagholizadeh, Ghaddar, Haidar, Ghodsi. Universal-KD: Attention-based Output-Grounded "
        "Intermediate Layer Knowledge Distillation. EMNLP",
        year=2021,
        taps=(
            TapSpec(
                kind="hidden",
                layers=LayerRule(kind="uniform", drop_last=True),
                side="student",
                name="s_hidden",
            ),
            TapSpec(
                kind="hidden", layers=LayerRule(kind="all", drop_last=True), side="teacher", name="t_hidden"
            ),
            TapSpec(kind="logits"),
        ),
        terms=(
            LossTermSpec(
                name="inter",
                fn="universal_kd.inter",
                taps=("s_hidden", "t_hidden"),
                weight_option="inter_rate",
            ),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        extras=(
            ExtraSpec(
                name="s_proj",
                in_dim="student.hidden",
                out_dim="student.hidden",
                bias=False,
                per="pair",
                pair_tap="s_hidden",
            ),
            ExtraSpec(
                name="t_proj",
                in_dim="teacher.hidden",
                out_dim="student.hidden",
                bias=False,
                per="pair",
                pair_tap="t_hidden",
            ),
        ),
        constraints=("equal_vocab",),
        stages=(
            StageSpec(name="kd", fraction=1.0, terms=("inter", "soft"), description="KD finetuning"),
            StageSpec(
                name="finetune",
                fraction=0.0,
                terms=("hard",),
                teacher=False,
                description="plain finetuning on the hard loss, its own run (stage: finetune)",
            ),
        ),
        options=(
            OptionSpec(name="inter_rate", default=0.5, doc="weight of the layer-attention KL"),
            OptionSpec(name="soft", default="kl", doc="soft loss on logits: kl (x T^2), soft_ce or mse"),
            OptionSpec(name="soft_rate", default=0.5, doc="weight of the soft loss"),
            OptionSpec(name="hard_rate", default=1.0, doc="weight of the hard loss in the finetune stage"),
        ),
        description="Student layers attend over projected teacher layers; works across sizes and depths.",
    )
)

RAIL_KD = register(
    MethodSpec(
        name="rail_kd",
        title="RAIL-KD: random intermediate layers, concatenated and projected",
        paper="Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais, Poupart. RAIL-KD: RAndom Intermediate "
        "Layer Mapping for Knowledge Distillation. NAACL Findings",
        year=2022,
        taps=(
            TapSpec(kind="hidden", layers=LayerRule(kind="random", every=1000, drop_last=True)),
            TapSpec(kind="logits"),
        ),
        terms=(
            LossTermSpec(name="inter", fn="rail_kd.inter", taps=("hidden",), weight_option="inter_rate"),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        extras=(
            ExtraSpec(name="s_proj", in_dim="student.hidden", out_dim="opt:u", per="pair", pair_tap="hidden"),
            ExtraSpec(name="t_proj", in_dim="teacher.hidden", out_dim="opt:u", per="pair", pair_tap="hidden"),
        ),
        constraints=("equal_vocab",),
        stages=(
            StageSpec(
                name="finetune",
                fraction=1.0,
                terms=("inter", "soft", "hard"),
                description="task finetuning from a DistilBERT-style student",
            ),
        ),
        options=(
            OptionSpec(name="u", default=128, doc="size of the projected layer representation"),
            OptionSpec(name="inter_rate", default=1 / 3, doc="weight of the layer loss"),
            OptionSpec(name="soft", default="soft_ce", doc="soft loss on logits: soft_ce, kl (x T^2) or mse"),
            OptionSpec(name="soft_rate", default=1 / 3, doc="weight of the soft loss"),
            OptionSpec(name="hard_rate", default=1 / 3, doc="weight of the hard loss"),
        ),
        description="Teacher layers re-drawn at random every `every` steps (layer_map); student 1..Ls-1.",
    )
)
