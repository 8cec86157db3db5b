"""The hard loss on materialised logits: token cross-entropy in chunks, its gradient computed in the forward.

``cross_entropy_loss(logits, target, *, ignore_index=-100)``: logits (N, V) in any float dtype, target (N,)
long; the mean over the rows whose target is not ``ignore_index`` of ``logsumexp(x) - x[target]`` (as
``F.cross_entropy``), 0 with zero gradients when every row is ignored.

Why not ``F.cross_entropy(logits.float(), target)``: it keeps the float32 log-softmax, (N x V) x 4 bytes,
from the forward to the backward, and makes a float32 copy of the logits first; for an LLM's vocabulary that
is twice the bf16 logits themselves, held across the whole backward. Here the rows are processed in chunks of
``chunk_rows(V)`` in float32 (float64 stays float64), the gradient ``(softmax(x) - onehot(target)) / n`` is
written into a tensor of the logits' own dtype during the forward, and that gradient (N x V in the logits'
dtype) is all that is kept: what the planner counts for the hard loss (`gkd.planner.analysis`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gkd.errors import InputError
from gkd.kernels.fused_linear import chunk_rows


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n_rows, vocab = logits.shape
        valid = target != ignore_index
        count = valid.sum().clamp(min=1).to(acc)
        grad = torch.empty_like(logits) if logits.requires_grad else None
        total = torch.zeros((), dtype=acc, device=logits.device)
        step = chunk_rows(vocab, logits.device)
        for start in range(0, n_rows, step):
            end = min(start + step, n_rows)
            # One float32 chunk at a time, updated in place: the chunk is the only transient buffer.
            x = logits[start:end].to(acc, copy=True)
            keep = valid[start:end]
            index = torch.where(keep, target[start:end], 0).unsqueeze(-1)
            lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, index).squeeze(-1)
            total = total + torch.where(keep, lse - picked, 0.0).sum()
            if grad is not None:
                g = x.sub_(lse.unsqueeze(-1)).exp_()  # softmax
                g.scatter_add_(-1, index, -torch.ones_like(index, dtype=acc))
                g.mul_(keep.unsqueeze(-1).to(acc) / count)
                grad[start:end].copy_(g)
            del x
        if grad is not None:
            ctx.save_for_backward(grad)
        return (total / count).to(acc)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        saved = ctx.saved_tensors
        if not saved:
            return None, None, None
        (grad,) = saved
        return grad * grad_out.to(grad.dtype), None, None


def cross_entropy_loss(logits: Tensor, target: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean token cross-entropy over the rows not ignored (see the module docstring)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise InputError(
            f"cross_entropy_loss takes (N, V) logits and (N,) targets, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return _ChunkedCrossEntropy.apply(logits, target.to(torch.long), ignore_index)
