"""Prediction-layer (logit) methods of the GKD catalogue: KD (Hinton et al., 2015).

KD: the generic soft loss on logits with temperature T (`soft`: "kl" = KL(p_t || p_s) * T^2, the pretraining
default; "soft_ce" = -sum p_t log p_s with no T^2, the finetuning default; "mse" on logits), weighted by
`soft_rate`, plus the hard task / LM loss weighted by `hard_rate`. Both use the generic loss functions
"soft" and "hard" of `gkd.methods.losses`.
"""

from __future__ import annotations

from gkd.methods.registry import register
from gkd.methods.spec import LossTermSpec, MethodSpec, OptionSpec, TapSpec

SOFT_OPTIONS = (
    OptionSpec(name="soft", default="kl", doc="soft loss: kl (x T^2), soft_ce (no T^2) or mse on logits"),
    OptionSpec(name="soft_rate", default=1.0, doc="weight of the soft loss"),
    OptionSpec(name="hard_rate", default=1.0, doc="weight of the hard (task / LM) loss; 0 drops it"),
)

KD = register(
    MethodSpec(
        name="kd",
        title="Knowledge distillation (soft targets)",
        paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv 1503.02531",
        year=2015,
        taps=(TapSpec(kind="logits"),),
        terms=(
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=2.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_vocab",),
        options=SOFT_OPTIONS,
        description="Soft targets at temperature T plus the hard loss; works across any model sizes.",
    )
)
