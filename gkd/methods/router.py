"""Router distillation for mixture-of-experts pairs: router_kl (not in GKD).

At mapped layers (default rule: uniform over depths 1..Ls) the student's routing distribution over its experts
is matched to the teacher's: KL(p_t || p_s) * T^2 with p = softmax(router_logits / T) over the experts, per
token, averaged over real tokens (mask True) and then over the mapped pairs. It is Hinton et al.'s soft loss
(2015) applied to the routers' outputs instead of the LM head's, so that a student with the teacher's
experts per layer learns which expert the teacher would pick. Both models must be mixture-of-experts with
the same number of experts per layer. The router logits are the `router_logits[i]` taps
(gkd.planner.taps; one logit per expert and token, before the softmax and top-k).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import LayerRule, LossTermSpec, MethodSpec, TapSpec

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch")


@register_loss("router_kl.loss")
def router_kl(ctx: LossContext) -> Tensor:
    tau = ctx.temperature
    losses = []
    for s_depth, t_depth in ctx.layer_pairs("router_logits"):
        s = ctx.s("router_logits", s_depth).float() / tau
        t = ctx.t("router_logits", t_depth).float() / tau
        log_t = torch.log_softmax(t, dim=-1)
        per_token = (log_t.exp() * (log_t - torch.log_softmax(s, dim=-1))).sum(dim=-1)  # (B, T)
        if ctx.mask is None:
            losses.append(per_token.mean())
        else:
            mask = ctx.mask.to(per_token.dtype)
            losses.append((per_token * mask).sum() / mask.sum().clamp(min=1.0))
    return torch.stack(losses).mean() * tau**2


ROUTER_KL = register(
    MethodSpec(
        name="router_kl",
        title="Router distillation: KL between the teacher's and the student's expert routing",
        paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (the soft loss, here on "
        "mixture-of-experts router logits). arXiv 1503.02531",
        year=2015,
        taps=(TapSpec(kind="router_logits", layers=LayerRule(kind="uniform")),),
        terms=(LossTermSpec(name="loss", fn="router_kl.loss", taps=("router_logits",), temperature=1.0),),
        constraints=("equal_experts",),
        description="KL(p_t || p_s) * T^2 of the routing distributions at mapped layers; mixture-of-experts "
        "student and teacher with equal experts per layer. Combine with a logit method (kd).",
    )
)
