"""Fused distillation-loss kernels: Triton on CUDA, the same blocked algorithm in plain torch on CPU.

Dispatch and the Triton import live in `gkd.kernels._dispatch`; one module per loss family.
"""

from gkd.kernels.attention import relation_kl_loss, scores_mse_loss, split_relation_heads
from gkd.kernels.cross_entropy import cross_entropy_loss
from gkd.kernels.divergence import kd_loss
from gkd.kernels.fused_linear import fused_linear_kd_loss, fused_linear_topk_kd_loss
from gkd.kernels.hidden import hidden_loss

__all__ = [
    "cross_entropy_loss",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "hidden_loss",
    "kd_loss",
    "relation_kl_loss",
    "scores_mse_loss",
    "split_relation_heads",
]
