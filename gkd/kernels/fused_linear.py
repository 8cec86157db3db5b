"""Fused LM-head + divergence: the distillation loss from final hidden states, never allocating (tokens x V).

`fused_linear_kd_loss` has the contract of `gkd.kernels.kd_loss` (mean over counted tokens) on the logits
``hidden @ weight.T (+ bias)`` of both models; `fused_linear_topk_kd_loss` takes the teacher as stored top-k
log-probabilities instead (offline distillation).

Algorithm (the standard chunked fused-linear design, as in Liger-Kernel's chunked losses): tokens are
processed in chunks of `chunk_rows(V)` rows. Per chunk:

1. student logits ``s = h_s[c] @ W_s.T (+ b_s)``, teacher logits ``t = h_t[c] @ W_t.T (+ b_t)`` (no gradient);
2. the row losses and the gradient dL/ds, written in place over ``s`` (`gkd.kernels.divergence.kd_rows`: the
   Triton row kernel on CUDA, the blocked torch path on CPU);
3. immediately ``grad_h_s[c] = g @ W_s``, ``grad_W_s += g.T @ h_s[c]`` (in place, ``addmm_``) and
   ``grad_b_s += sum_rows g``; the chunk's logits are then dropped.

So the gradients exist after the forward pass; the backward only scales them by the upstream gradient (in
place, then released: a second backward through one graph raises). Transient memory is two (chunk x V) logits
buffers plus the kernel's small tiles, independent of the number of tokens. `chunk_rows` targets
`CHUNK_ELEMENTS` elements per logits buffer on CPU (128 MiB in fp32; 4x the elements on CUDA), in multiples of
128 rows: large enough that the per-chunk matmuls run at full speed and the ``grad_W_s`` read-modify-write
(one pass over V x H_s per chunk) stays a small part of the time, small enough to be a fraction of what
materialising the logits costs.

The top-k variant runs its row computation (a log-sum-exp, gathers and scatters over the chunk's logits) in
torch on every device: the chunk's logits exist already, and the matmuls dominate its cost.

Teacher and student hidden sizes may differ; the vocabularies must match. Gradients flow to the student hidden
state, weight and bias only; the teacher side (hidden, weight, bias, top-k entries) is frozen and gets none.
Gradient accumulators have the dtype of the tensor they belong to (for bf16 weights, each chunk's ``g.T @ h``
is accumulated by the GEMM in fp32 and rounded once per chunk, as in Liger-Kernel); the divergence itself is
computed in fp32. No host synchronisation anywhere in the forward or backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gkd.errors import InputError
from gkd.kernels.divergence import DivergenceSpec, kd_rows, make_spec, reduce_rows, token_weights

# Target elements of one (chunk x V) logits buffer: 32 Mi on CPU (128 MiB in fp32), 128 Mi on CUDA (256 MiB
# in bf16: a few percent of what the logits would take there, and large GEMMs).
CHUNK_ELEMENTS = 1 << 25
CHUNK_ELEMENTS_CUDA = 1 << 27


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Tokens per chunk: the element budget // vocab, rounded down to a multiple of 128 (a GEMM tile) when
    that is possible, at least 1. V = 128256: 256 on CPU, 1024 on CUDA."""
    budget = CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS
    rows = max(1, budget // max(vocab, 1))
    return rows // 128 * 128 if rows >= 128 else rows


def _flatten_hidden(name: str, hidden: Tensor, weight: Tensor) -> Tensor:
    if weight.dim() != 2:
        raise InputError(f"{name} LM-head weight must be 2-D (vocab, hidden), got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise InputError(
            f"{name} hidden size {hidden.shape[-1] if hidden.dim() else '?'} does not match its LM head "
            f"{tuple(weight.shape)} (vocab, hidden); pass the final hidden states of the same model"
        )
    return hidden.reshape(-1, hidden.shape[-1])


def _check_bias(name: str, bias: Tensor | None, vocab: int) -> None:
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise InputError(f"{name} bias must have shape ({vocab},) like its LM head, got {tuple(bias.shape)}")


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def _release(ctx: Any) -> tuple[Tensor | None, ...]:
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            "gkd.kernels fused-linear loss: backward ran twice through one graph; its gradients are computed "
            "in the forward and released after the first backward, so call the loss again (no retain_graph)"
        )
    ctx.grads = None
    return grads


def _scale(grads: tuple[Tensor | None, ...], grad_output: Tensor) -> tuple[Tensor | None, ...]:
    return tuple(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads)


def _chunked_student_pass(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    w: Tensor,
    needs: tuple[bool, bool, bool],
    rows_loss_and_grad: Any,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Shared chunk loop. `rows_loss_and_grad(r0, r1, s, want_grad)` returns the chunk's unweighted row losses
    and, when `want_grad`, has overwritten the student logits `s` with the weighted gradient dL/dlogits."""
    tokens, vocab = hs.shape[0], ws.shape[0]
    want_grad = any(needs)
    grad_h = torch.empty_like(hs) if needs[0] else None
    grad_w = torch.zeros_like(ws) if needs[1] else None
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32  # fp32 accumulation, float64 kept
    grad_b = torch.zeros(vocab, dtype=acc, device=hs.device) if needs[2] else None
    loss = torch.zeros((), dtype=acc, device=hs.device)
    step = chunk_rows(vocab, hs.device)
    for r0 in range(0, tokens, step):
        r1 = min(tokens, r0 + step)
        h_chunk = hs[r0:r1]
        s = _logits(h_chunk, ws, bs)
        row_loss = rows_loss_and_grad(r0, r1, s, want_grad)
        loss += reduce_rows(row_loss, w[r0:r1], "mean")
        if grad_h is not None:
            torch.mm(s, ws, out=grad_h[r0:r1])
        if grad_w is not None:
            grad_w.addmm_(s.t(), h_chunk)
        if grad_b is not None:
            grad_b += s.sum(dim=0, dtype=acc)
        del s
    if grad_b is not None and bs is not None:
        grad_b = grad_b.to(bs.dtype)
    return loss, (grad_h, grad_w, grad_b)


def _kd_pass(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    ht: Tensor,
    wt: Tensor,
    bt: Tensor | None,
    w: Tensor,
    spec: DivergenceSpec,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    def rows(r0: int, r1: int, s: Tensor, want_grad: bool) -> Tensor:
        t = _logits(ht[r0:r1], wt, bt)
        return kd_rows(s, t, w[r0:r1], spec, s if want_grad else None)

    return _chunked_student_pass(hs, ws, bs, w, needs, rows)


class _FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:  # type: ignore[override]
        loss, ctx.grads = _kd_pass(*args)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = _scale(_release(ctx), grad_output)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _needs(hs: Tensor, ws: Tensor, bs: Tensor | None) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return (False, False, False)
    return (hs.requires_grad, ws.requires_grad, bs is not None and bs.requires_grad)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """`kd_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)`, no logits kept.

    Hidden states (..., H_s) and (..., H_t) with equal leading dims; weights (V, H_s) and (V, H_t); biases
    (V,). Returns the mean over counted tokens (a scalar, fp32).
    """
    spec = make_spec(divergence, temperature=temperature, beta=beta, alpha=alpha)
    hs = _flatten_hidden("student", student_hidden, student_weight)
    ht = _flatten_hidden("teacher", teacher_hidden, teacher_weight)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise InputError(
            f"student vocabulary {student_weight.shape[0]} != teacher vocabulary {teacher_weight.shape[0]}; "
            "logit distillation needs one shared vocabulary (use a student with the teacher's tokenizer)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise InputError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
            "must cover the same tokens (equal leading dims)"
        )
    vocab = student_weight.shape[0]
    _check_bias("student", student_bias, vocab)
    _check_bias("teacher", teacher_bias, vocab)
    w = token_weights(mask, hs.shape[0], "mean", hs.device, hs.dtype)
    ht, wt = ht.detach(), teacher_weight.detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    needs = _needs(student_hidden, student_weight, student_bias)
    args = (hs, student_weight, student_bias, ht, wt, bt, w, spec, needs)
    if not any(needs):
        with torch.no_grad():
            return _kd_pass(*args)[0]
    return _FusedLinearKDFunction.apply(*args)


# ------------------------------------------------------------------------------------------------------------
# Top-k teacher
# ------------------------------------------------------------------------------------------------------------


def _topk_rows(s: Tensor, idx: Tensor, logp: Tensor, w: Tensor, inv_t: float, want_grad: bool) -> Tensor:
    """Row losses of the top-k forward KL; overwrites `s` (rows, V) with w / T * dL/ds when `want_grad`.

    K = the stored indices, p_i = exp(logp_i) on K, P = max(1 - sum_K p, 0) the teacher's tail mass; the
    student q = softmax(s / T), Q = sum over j not in K of q_j (its log from a log-sum-exp over the
    complement, so a tiny tail stays accurate). The loss is the KL between the (k + 1)-bucket distributions:

        L = sum_K p_i (log p_i - log q_i) + P (log P - log Q)           (0 log 0 = 0)

    With c = sum_K p + P (1 unless rounding pushed sum_K p above 1):
        dL/ds_j = c q_j - p_j                      for j in K,
        dL/ds_j = q_j (c - P / Q)                  for j not in K (the tail bucket's gradient, spread by q).
    """
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32  # fp32 accumulation, float64 kept
    x = s.to(acc) * inv_t
    x.sub_(torch.logsumexp(x, dim=1, keepdim=True))  # log q
    logq_k = x.gather(1, idx)
    x.scatter_(1, idx, -math.inf)
    log_tail_q = torch.logsumexp(x, dim=1)
    x.scatter_(1, idx, logq_k)
    logp = logp.to(acc)
    p_k = logp.exp()
    sum_p = p_k.sum(dim=1)
    tail_p = (1.0 - sum_p).clamp(min=0.0)
    zero = x.new_zeros(())
    head = torch.where(p_k > 0, p_k * (logp - logq_k), zero).sum(dim=1)
    # k = V leaves no tail bucket (Q = 0): rounding in sum_K p must not then turn into an infinite term.
    has_tail = (tail_p > 0) & (log_tail_q > -math.inf)
    tail = torch.where(has_tail, tail_p * (torch.log(tail_p) - log_tail_q), zero)
    if want_grad:
        c = sum_p + tail_p
        ratio = torch.where(has_tail, tail_p * torch.exp(-log_tail_q), zero)
        g = x.exp_().mul_((c - ratio).unsqueeze(1))
        g.scatter_(1, idx, logq_k.exp() * c.unsqueeze(1) - p_k)
        g.mul_((w.to(acc) * inv_t).unsqueeze(1))
        s.copy_(g)
    return head + tail


def _topk_pass(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    idx: Tensor,
    logp: Tensor,
    w: Tensor,
    inv_t: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    def rows(r0: int, r1: int, s: Tensor, want_grad: bool) -> Tensor:
        return _topk_rows(s, idx[r0:r1], logp[r0:r1], w[r0:r1], inv_t, want_grad)

    return _chunked_student_pass(hs, ws, bs, w, needs, rows)


class _FusedLinearTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:  # type: ignore[override]
        loss, ctx.grads = _topk_pass(*args)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = _scale(_release(ctx), grad_output)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_topk_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    student_bias: Tensor | None = None,
) -> Tensor:
    """Forward KL against a stored top-k teacher, with the teacher's remaining mass as one tail bucket.

    `topk_indices` (..., k) int64, distinct per token; `topk_logprobs` (..., k): the teacher's log-softmax
    values at those indices, computed from teacher logits already divided by the distillation temperature
    (store them that way); `temperature` divides the student logits. Formula and gradient: see `_topk_rows`.
    Mean over counted tokens; gradients to the student hidden state, weight and bias.
    """
    make_spec("fkl", temperature=temperature, beta=0.5, alpha=0.1)  # validates the temperature
    hs = _flatten_hidden("student", student_hidden, student_weight)
    vocab = student_weight.shape[0]
    _check_bias("student", student_bias, vocab)
    if topk_indices.shape != topk_logprobs.shape or topk_indices.shape[:-1] != student_hidden.shape[:-1]:
        raise InputError(
            f"top-k indices {tuple(topk_indices.shape)} and log-probs {tuple(topk_logprobs.shape)} must be "
            f"(tokens..., k) with the student hidden's leading dims {tuple(student_hidden.shape[:-1])}"
        )
    if topk_indices.dtype != torch.int64 or not topk_logprobs.is_floating_point():
        raise InputError("top-k indices must be int64 and top-k log-probs floating point")
    k = topk_indices.shape[-1]
    if not 1 <= k <= vocab:
        raise InputError(f"top-k width {k} must be between 1 and the vocabulary size {vocab}")
    idx = topk_indices.reshape(-1, k).to(hs.device)
    logp = topk_logprobs.detach().reshape(-1, k).to(hs.device)
    w = token_weights(mask, hs.shape[0], "mean", hs.device, hs.dtype)
    needs = _needs(student_hidden, student_weight, student_bias)
    args = (hs, student_weight, student_bias, idx, logp, w, 1.0 / float(temperature), needs)
    if not any(needs):
        with torch.no_grad():
            return _topk_pass(*args)[0]
    return _FusedLinearTopKFunction.apply(*args)
