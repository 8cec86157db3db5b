"""Self-attention relation methods: MiniLMv2 (Wang et al., ACL Findings 2021).

MiniLMv2: queries, keys and values of one student layer (default the last) and one teacher layer (default the
last; set `layer_map`, e.g. explicit:18 for an upper-middle layer) are concatenated back to (B, T, H * d) and
split into R relation heads (`relation_heads`, 48 for base-size and 64 for large teachers in the paper). R
must divide every width involved, including k / v widths under grouped-query attention, and is checked when
methods are resolved, so `gkd plan` rejects a job whose relations cannot be split. The default, auto, takes
48 where it divides every width, else 64, else the largest common divisor up to 64: 48 for BERT-base
students, 64 for the reference LLM pairs (GLM-10B's 4096 and OPT-13B's 5120 are not multiples of 48). For
each of Q, K, V the
relation softmax(X X^T / sqrt(d_r)) of the teacher is matched by KL to the student's
(`gkd.kernels.relation_kl_loss`), averaged over batch, relation heads and counted query rows; the three are
summed. Works across hidden sizes and head counts. On decoders the relations are causal (keys j <= i), since a
decoder token never attends to later ones; `causal` overrides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.methods.losses import LossContext, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import LayerRule, LossTermSpec, MethodSpec, OptionSpec, StageSpec, TapSpec

if TYPE_CHECKING:
    from torch import Tensor


@register_loss("minilmv2.relations")
def minilmv2_relations(ctx: LossContext) -> Tensor:
    from gkd.kernels.attention import relation_kl_loss, split_relation_heads

    heads = int(ctx.options["relation_heads"])
    causal = ctx.options.get("causal", "auto")
    causal = (not ctx.student_is_encoder) if causal == "auto" else bool(causal)
    total: Tensor | None = None
    for kind in ("q", "k", "v"):
        for s_depth, t_depth in ctx.layer_pairs(kind):
            s = split_relation_heads(ctx.s(kind, s_depth), heads)
            t = split_relation_heads(ctx.t(kind, t_depth), heads)
            loss = relation_kl_loss(
                s,
                s,
                t,
                t,
                s_scale=s.shape[-1] ** -0.5,
                t_scale=t.shape[-1] ** -0.5,
                mask=ctx.mask,
                causal=causal,
            )
            total = loss if total is None else total + loss
    assert total is not None
    return total


_LAST = LayerRule(kind="last")

MINILMV2 = register(
    MethodSpec(
        name="minilmv2",
        title="MiniLMv2: multi-head self-attention relation distillation",
        paper="Wang et al. MiniLMv2: Multi-Head Self-Attention Relation Distillation. ACL Findings",
        year=2021,
        taps=(
            TapSpec(kind="q", layers=_LAST),
            TapSpec(kind="k", layers=_LAST),
            TapSpec(kind="v", layers=_LAST),
        ),
        terms=(
            LossTermSpec(
                name="relations", fn="minilmv2.relations", kernel="relation_kl_loss", taps=("q", "k", "v")
            ),
        ),
        stages=(
            StageSpec(
                name="pretrain_kd",
                fraction=1.0,
                terms=("relations",),
                description="task-agnostic relation distillation",
            ),
        ),
        options=(
            OptionSpec(
                name="relation_heads",
                default="auto",
                doc="relation heads R; must divide every q/k/v width (auto: 48 as for base-size teachers in "
                "the paper, else 64 as for large ones, else the largest common divisor up to 64)",
                divides=("q", "kv"),
                preferred=(48, 64),
            ),
            OptionSpec(
                name="causal", default="auto", doc="restrict relations to keys j <= i (auto: decoders)"
            ),
        ),
        description="KL between Q-Q, K-K, V-V relations of one layer; works across hidden sizes and head "
        "counts. "
        "Plain finetuning follows as a separate run.",
    )
)
