"""Hidden-state methods for any encoder or decoder: hidden_mse, hidden_cos (not in GKD).

Mapped student hidden states (default rule: uniform over depths 1..Ls) are passed through a learned
projection Linear(Ds -> Dt), one per mapped pair (as TinyBERT's fit_dense, per layer), and compared with the
teacher's by `gkd.kernels.hidden_loss` ("mse": mean squared error over counted positions and features;
"cosine": mean of 1 - cos over counted positions). The per-pair losses are averaged over pairs. Padding
positions (mask False) do not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import ExtraSpec, LayerRule, LossTermSpec, MethodSpec, TapSpec

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch")


def projected_hidden_loss(ctx: LossContext, kind: str) -> Tensor:
    from gkd.kernels import hidden_loss

    losses = []
    for n, (s_depth, t_depth) in enumerate(ctx.layer_pairs("hidden")):
        proj = ctx.extra("proj", ctx.pair_index("hidden", n))
        losses.append(
            hidden_loss(
                ctx.s("hidden", s_depth),
                ctx.t("hidden", t_depth),
                kind=kind,
                projection=proj.weight,
                projection_bias=proj.bias,
                mask=ctx.mask,
            )
        )
    return torch.stack(losses).mean()


for _name, _kind, _title in (
    ("hidden_mse", "mse", "Hidden-state MSE"),
    ("hidden_cos", "cosine", "Hidden-state cosine"),
):
    register_loss(f"{_name}.loss")(lambda ctx, _k=_kind: projected_hidden_loss(ctx, _k))
    register(
        MethodSpec(
            name=_name,
            title=f"{_title} through learned projections",
            paper="Jiao et al. TinyBERT (hidden-state loss with fit_dense), EMNLP Findings",
            year=2020,
            taps=(TapSpec(kind="hidden", layers=LayerRule(kind="uniform")),),
            terms=(LossTermSpec(name="loss", fn=f"{_name}.loss", kernel="hidden_loss", taps=("hidden",)),),
            extras=(
                ExtraSpec(
                    name="proj",
                    in_dim="student.hidden",
                    out_dim="teacher.hidden",
                    per="pair",
                    pair_tap="hidden",
                ),
            ),
            teachers="multi",
            aggregation="weighted",
            description=f"{_title} of mapped layers after a Linear(Ds -> Dt) per pair; any sizes.",
        )
    )
