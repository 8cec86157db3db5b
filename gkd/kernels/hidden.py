"""Hidden-state distillation losses: MSE, cosine and L2-normalised MSE, with an optional fused projection.

``hidden_loss(student, teacher, *, kind, projection=None, projection_bias=None, mask=None)``; student
(..., Ds), teacher (..., Dt), leading dims are positions. With ``projection`` (a (Dt, Ds) weight,
TinyBERT's ``fit_dense``) the student is mapped first: student @ W^T (+ bias). ``mask`` (bool, the leading
shape) selects the positions that count; the all-masked input gives 0 with finite gradients.

Definitions (n = number of counted positions):
* ``mse``: sum over counted positions and features of (s - t)^2 / (n * Dt), the mean over all counted
  elements (TinyBERT's hidden and embedding loss).
* ``cosine``: mean over counted positions of 1 - cos(s, t) (DistilBERT's cosine embedding loss, target 1).
* ``normalized_mse``: PKD (Sun et al., EMNLP 2019, eq. 4): the squared L2 distance between the
  L2-normalised vectors, ||s/||s|| - t/||t|| ||^2, summed over the feature dim and averaged over counted
  positions (the paper sums over samples and layers; the mean over positions keeps the scale independent
  of the batch size; methods combine layers and apply beta). It equals 2 * (1 - cos), twice ``cosine``.

Design: these losses cost O(positions x D), the same as the activations they read, so a plain-torch
composition under autograd is already memory- and time-efficient on every device; a Triton kernel would
only fuse a few elementwise ops. The projection goes through ``F.linear``; masking uses ``torch.where`` on
per-position values (never boolean indexing, which would synchronise with the host). Norms use an epsilon
so zero vectors give finite values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gkd.errors import InputError

KINDS = ("mse", "cosine", "normalized_mse")
_EPS = 1e-8


def _check(
    student: Tensor,
    teacher: Tensor,
    kind: str,
    projection: Tensor | None,
    projection_bias: Tensor | None,
    mask: Tensor | None,
) -> None:
    if kind not in KINDS:
        raise InputError(f"hidden_loss: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if student.dim() < 1 or teacher.dim() < 1 or student.shape[:-1] != teacher.shape[:-1]:
        raise InputError(
            f"hidden_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
            "share their leading (position) dims"
        )
    ds, dt = student.shape[-1], teacher.shape[-1]
    if projection is None:
        if ds != dt:
            raise InputError(
                f"hidden_loss: student width {ds} differs from teacher width {dt}; pass a "
                f"projection of shape ({dt}, {ds})"
            )
        if projection_bias is not None:
            raise InputError("hidden_loss: projection_bias given without projection; pass both or neither")
    else:
        if tuple(projection.shape) != (dt, ds):
            raise InputError(
                f"hidden_loss: projection has shape {tuple(projection.shape)}; it must be "
                f"(teacher width, student width) = ({dt}, {ds})"
            )
        if projection_bias is not None and tuple(projection_bias.shape) != (dt,):
            raise InputError(
                f"hidden_loss: projection_bias has shape {tuple(projection_bias.shape)}; it must be ({dt},)"
            )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != student.shape[:-1]):
        raise InputError(
            f"hidden_loss: mask must be a bool tensor of shape {tuple(student.shape[:-1])}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )


def hidden_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    kind: str = "mse",
    projection: Tensor | None = None,
    projection_bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Hidden-state loss (``mse``, ``cosine`` or ``normalized_mse``), averaged over counted positions.

    Gradients flow to ``student``, ``projection`` and ``projection_bias``; the teacher is detached.
    Computed in fp32 whatever the input dtype; returns a 0-dim fp32 tensor.
    """
    _check(student, teacher, kind, projection, projection_bias, mask)
    s = student.float()
    if projection is not None:
        s = F.linear(s, projection.float(), None if projection_bias is None else projection_bias.float())
    t = teacher.detach().float()
    if kind == "mse":
        per_pos = (s - t).square().mean(-1)
    elif kind == "cosine":
        per_pos = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=_EPS)
    else:
        s_unit = s / s.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        t_unit = t / t.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        per_pos = (s_unit - t_unit).square().sum(-1)
    if mask is None:
        return per_pos.mean() if per_pos.numel() > 0 else per_pos.sum()
    # where (not multiplication) so that a non-finite value at a masked position cannot leak NaN into the sum
    total = torch.where(mask, per_pos, 0.0).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)
