"""LLM logit divergences (not in GKD): fkl, rkl, jsd, skew_fkl, skew_rkl, tvd.

Each is one term computed by `gkd.kernels.kd_loss` (or, when every model is a decoder and the planner chose
the
fused path, `gkd.kernels.fused_linear_kd_loss` on final hidden states and LM-head weights, so the (tokens x V)
logits never exist). Definitions are the kernel's: fkl = KL(p_t || p_s) (Hinton 2015), rkl = KL(p_s || p_t)
(MiniLLM, Gu et al. 2024), jsd = generalised JSD(beta) as in TRL's GKDTrainer (Agarwal et al. 2024; beta 0 ~
fkl, 1 ~ rkl), skew_fkl / skew_rkl with mixing alpha (DistiLLM, Ko et al. 2024), tvd = 0.5 sum |p_t - p_s|.
No T^2 factor is applied (these are used at T = 1 for LLMs; set `t2_scale` to multiply by T^2).
An optional hard LM loss is added with `hard_rate` (default 0, so the fused path is available).
"""

from __future__ import annotations

from torch import Tensor

from gkd.methods.losses import LossContext, logits_mask, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import LossTermSpec, MethodSpec, OptionSpec, TapSpec

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
