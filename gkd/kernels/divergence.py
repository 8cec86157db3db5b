"""Logit divergences for distillation (`kd_loss`): one blocked algorithm, a Triton and a torch implementation.

Contract. Logits of shape (..., V); leading dims are flattened to tokens. Both sides are divided by the
temperature T: s = student / T, t = teacher / T, q = softmax(s), p = softmax(t). The result is the divergence
summed over the vocabulary and averaged over the tokens where `mask` (bool, True = counts) is set; the
denominator is ``max(count, 1)``, so the all-masked input gives 0. No T^2 factor (the methods apply it).

Divergences (per token, sums over the vocabulary):

==========  ===========================================================================================
fkl         KL(p || q) = sum p (log p - log q)                                  (Hinton et al., 2015)
rkl         KL(q || p)                                                          (MiniLLM, Gu et al., 2024)
jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q; generalised JSD as in TRL's
            GKD (Agarwal et al., 2024), with its endpoints: beta = 0 is exactly fkl, beta = 1 exactly rkl
skew_fkl    KL(p || alpha p + (1 - alpha) q)                                    (DistiLLM, Ko et al., 2024)
skew_rkl    KL(q || (1 - alpha) p + alpha q)                                    (DistiLLM)
tvd         0.5 sum |p - q|
soft_ce     -sum p log q   (= fkl + entropy(p); same gradient as fkl)
mse         mean over V of (s - t)^2, on the temperature-scaled logits (averaged over V, not summed, so its
            scale does not grow with the vocabulary)
==========  ===========================================================================================

Gradient. Only the student receives a gradient; the teacher is frozen, so `teacher_logits` never gets one (its
``requires_grad`` is ignored). With h_j = dL/d(log q_j) and S = sum_j h_j, the softmax chain rule gives
dL/ds_j = h_j - q_j S, and dL/dstudent = (1/T) dL/ds. Per divergence (m as defined above):

* fkl, soft_ce: dL/ds = q - p (S = -1 in closed form);
* rkl: h = q (log q - log p);
* jsd: h = (1 - beta) q (log q - log m);
* skew_fkl: h = -(1 - alpha) p q / m;
* skew_rkl: h = q (log q - log m) - alpha q^2 / m (the constant +q term of d/dlog q cancels against -q S);
* tvd: h = 0.5 q sign(q - p) (the subgradient 0 at q = p);
* mse: dL/ds = 2 (s - t) / V.

Algorithm (the same in both implementations). Rows are processed independently; per row, three passes over
vocabulary blocks, accumulating in fp32:

1. online log-sum-exp of s and t (running max and rescaled running sum, so no pass needs the whole row);
2. the loss terms of each block, and S;
3. (only where S is not known in closed form) the gradient h - q S, recomputed from the logits rather than
   stored, so a low-precision gradient buffer never holds intermediate values.

mse needs no normalisation and takes one pass. The gradient has the student logits' dtype (computed in fp32,
rounded once); row losses and the reduction are fp32 (float64 inputs stay float64 on the torch path).

When the loss ends the graph (the usual case), the gradient is computed in the forward pass, as Liger-Kernel
does, and the backward only scales it by the upstream gradient (any value, a tensor, no host synchronisation).
The stored gradient is scaled in place and released after one backward, so a second backward through the same
graph (``retain_graph=True``) raises instead of silently reusing it.

Implementations. CUDA tensors run the Triton kernel below: one program per row, looping over the vocabulary
in blocks. CPU tensors run `_rows_torch`: the same three passes over vocabulary blocks, vectorised over a
chunk of rows, with block sizes chosen so that every fp32 temporary stays near `TILE_ELEMENTS` elements.
Nothing here synchronises with the host (no ``.item()``, no branching on tensor values).
`gkd.kernels.fused_linear` calls `kd_rows` on chunks of logits it computes itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gkd.errors import InputError
from gkd.kernels._dispatch import backend, interpreting, jit, tl

DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "soft_ce", "mse")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# Integer codes for the Triton kernel's constexpr branch (order of DIVERGENCES).
FKL, RKL, JSD, SKEW_FKL, SKEW_RKL, TVD, SOFT_CE, MSE = range(8)
# Divergences whose gradient is written in pass 2 (S known in closed form); the rest need pass 3.
_DIRECT_GRAD = (FKL, SOFT_CE, MSE)

# CPU path: target elements of one fp32 temporary (rows x vocabulary block), 4 Mi elements = 16 MiB.
TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True, kw_only=True)
class DivergenceSpec:
    """A validated divergence with its parameters; `code` indexes DIVERGENCES (jsd endpoints resolved)."""

    divergence: str
    code: int
    inv_temperature: float
    coef: float  # beta for jsd, alpha for skew_*, unused otherwise


def make_spec(divergence: str, *, temperature: float, beta: float, alpha: float) -> DivergenceSpec:
    """Validate the user's divergence options (python numbers, so no tensor is read)."""
    if divergence not in DIVERGENCES:
        raise InputError(f"unknown divergence {divergence!r}; use one of {', '.join(DIVERGENCES)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise InputError(f"beta must be a number in [0, 1], got {beta!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    code = DIVERGENCES.index(divergence)
    coef = 0.0
    if code == JSD:
        # TRL's GKD endpoints: the mixture formula degenerates to 0 at beta = 0 and 1, so use KL there.
        if beta == 0.0:
            code = FKL
        elif beta == 1.0:
            code = RKL
        coef = float(beta)
    elif code in (SKEW_FKL, SKEW_RKL):
        coef = float(alpha)
    return DivergenceSpec(
        divergence=divergence, code=code, inv_temperature=1.0 / float(temperature), coef=coef
    )


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------


@jit
def _tile_terms(logq, logp, q, p, DIV: tl.constexpr, coef):
    """Per-element loss terms and h = dL/dlog q for one block (DIV not in fkl/soft_ce/mse needs h).

    Terms with a zero probability factor are 0 (0 log 0 = 0), guarded with `where` so -inf logits give no NaN.
    """
    zero = tl.zeros_like(q)
    if DIV == 0:  # fkl: p (log p - log q)
        loss = tl.where(p > 0, p * (logp - logq), zero)
        h = zero
    elif DIV == 1:  # rkl: q (log q - log p); h is the same term
        loss = tl.where(q > 0, q * (logq - logp), zero)
        h = loss
    elif DIV == 2:  # jsd, m = beta p + (1 - beta) q
        logm = tl.log(coef * p + (1.0 - coef) * q)
        kq = tl.where(q > 0, q * (logq - logm), zero)
        loss = coef * tl.where(p > 0, p * (logp - logm), zero) + (1.0 - coef) * kq
        h = (1.0 - coef) * kq
    elif DIV == 3:  # skew_fkl, m = alpha p + (1 - alpha) q
        m = coef * p + (1.0 - coef) * q
        loss = tl.where(p > 0, p * (logp - tl.log(m)), zero)
        h = -(1.0 - coef) * tl.where(m > 0, p * q / m, zero)
    elif DIV == 4:  # skew_rkl, m = (1 - alpha) p + alpha q
        m = (1.0 - coef) * p + coef * q
        loss = tl.where(q > 0, q * (logq - tl.log(m)), zero)
        h = loss - coef * tl.where(m > 0, q * q / m, zero)
    elif DIV == 5:  # tvd: 0.5 |p - q|, h = 0.5 q sign(q - p)
        loss = 0.5 * tl.abs(p - q)
        h = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, zero))
    else:  # soft_ce: -p log q
        loss = tl.where(p > 0, -p * logq, zero)
        h = zero
    return loss, h


@jit
def _kd_rows_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    loss_ptr,
    w_ptr,
    V,
    inv_t,
    coef,
    DIV: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row. Writes loss_ptr[row] (unweighted row loss) and, if HAS_GRAD, the gradient row
    g = w[row] / T * dL/ds. g may alias s: every pass reads a block before writing the same block."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    scale = tl.load(w_ptr + row).to(tl.float32) * inv_t
    offs = tl.arange(0, BLOCK_V)

    if DIV == 7:
        # mse needs no normalisation: one pass, loss (s - t)^2 / V, gradient 2 (s - t) / V.
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            inside = cols < V
            s = tl.load(s_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_t
            t = tl.load(t_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_t
            d = s - t
            acc += d * d
            if HAS_GRAD:
                tl.store(g_row + cols, (2.0 * d / V * scale).to(g_ptr.dtype.element_ty), mask=inside)
        tl.store(loss_ptr + row, tl.sum(acc, axis=0) / V)
    else:
        # Pass 1: online log-sum-exp. For a running max m and sum z = sum exp(x - m), a new block with max
        # b gives m' = max(m, b), z' = z exp(m - m') + sum exp(x - m'). m' = -inf (all -inf so far) uses 0
        # as the shift so that no -inf - -inf appears.
        m_s = float("-inf")
        z_s = 0.0
        m_t = float("-inf")
        z_t = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            inside = cols < V
            s = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            t = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            new_s = tl.maximum(m_s, tl.max(s, axis=0))
            shift_s = tl.where(new_s > float("-inf"), new_s, 0.0)
            z_s = z_s * tl.exp(m_s - shift_s) + tl.sum(tl.exp(s - shift_s), axis=0)
            m_s = new_s
            new_t = tl.maximum(m_t, tl.max(t, axis=0))
            shift_t = tl.where(new_t > float("-inf"), new_t, 0.0)
            z_t = z_t * tl.exp(m_t - shift_t) + tl.sum(tl.exp(t - shift_t), axis=0)
            m_t = new_t
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)

        # Pass 2: loss terms and S = sum h; fkl and soft_ce write their gradient q - p here.
        loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        h_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            inside = cols < V
            s = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            t = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            logq = s - lse_s
            logp = t - lse_t
            q = tl.exp(logq)
            p = tl.exp(logp)
            loss, h = _tile_terms(logq, logp, q, p, DIV, coef)
            loss_acc += tl.where(inside, loss, 0.0)
            h_acc += tl.where(inside, h, 0.0)
            if HAS_GRAD and (DIV == 0 or DIV == 6):
                tl.store(g_row + cols, ((q - p) * scale).to(g_ptr.dtype.element_ty), mask=inside)
        tl.store(loss_ptr + row, tl.sum(loss_acc, axis=0))

        # Pass 3: dL/ds = h - q S, recomputing h from the logits.
        if HAS_GRAD and DIV != 0 and DIV != 6:
            total_h = tl.sum(h_acc, axis=0)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                inside = cols < V
                s = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
                t = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
                logq = s - lse_s
                logp = t - lse_t
                q = tl.exp(logq)
                p = tl.exp(logp)
                loss, h = _tile_terms(logq, logp, q, p, DIV, coef)
                g = (h - q * total_h) * scale
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inside)


def _rows_triton(s: Tensor, t: Tensor, w: Tensor, spec: DivergenceSpec, grad: Tensor | None) -> Tensor:
    """Host launcher: one program per row; returns the fp32 row losses and fills `grad` if given."""
    rows, vocab = s.shape
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    # Interpreter: small blocks (it runs numpy per block). GPU: 2048 per block over 8 warps is 8 elements per
    # thread for each of the ~12 live fp32 vectors of the jsd/skew terms, which stays in registers.
    block = min(64 if interpreting() else 2048, max(16, 1 << (vocab - 1).bit_length()))
    g = grad if grad is not None else s
    _kd_rows_kernel[(rows,)](
        s,
        s.stride(0),
        t,
        t.stride(0),
        g,
        g.stride(0),
        loss,
        w,
        vocab,
        spec.inv_temperature,
        spec.coef,
        DIV=spec.code,
        HAS_GRAD=grad is not None,
        BLOCK_V=block,
        num_warps=1 if interpreting() else 8,
    )
    return loss


# ------------------------------------------------------------------------------------------------------------
# Torch path (CPU): the same three passes over vocabulary blocks, vectorised over chunks of rows
# ------------------------------------------------------------------------------------------------------------


def _terms_torch(
    logq: Tensor, logp: Tensor, q: Tensor, p: Tensor, code: int, coef: float
) -> tuple[Tensor, Tensor]:
    """Loss terms and h = dL/dlog q for one tile; the torch twin of `_tile_terms`."""
    zero = q.new_zeros(())
    if code == FKL:
        return torch.where(p > 0, p * (logp - logq), zero), zero
    if code == RKL:
        loss = torch.where(q > 0, q * (logq - logp), zero)
        return loss, loss
    if code == JSD:
        logm = torch.log(coef * p + (1.0 - coef) * q)
        kq = torch.where(q > 0, q * (logq - logm), zero)
        loss = coef * torch.where(p > 0, p * (logp - logm), zero) + (1.0 - coef) * kq
        return loss, (1.0 - coef) * kq
    if code == SKEW_FKL:
        m = coef * p + (1.0 - coef) * q
        loss = torch.where(p > 0, p * (logp - torch.log(m)), zero)
        return loss, -(1.0 - coef) * torch.where(m > 0, p * q / m, zero)
    if code == SKEW_RKL:
        m = (1.0 - coef) * p + coef * q
        loss = torch.where(q > 0, q * (logq - torch.log(m)), zero)
        return loss, loss - coef * torch.where(m > 0, q * q / m, zero)
    if code == TVD:
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p)
    # soft_ce
    return torch.where(p > 0, -p * logq, zero), zero


def _rows_torch(s: Tensor, t: Tensor, w: Tensor, spec: DivergenceSpec, grad: Tensor | None) -> Tensor:
    """Row losses (fp32; float64 for float64 input); if `grad` is given, writes w / T * dL/ds into it.

    `grad` may alias `s`: each tile's values are derived into new tensors before the same tile is written.
    """
    rows, vocab = s.shape
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32  # fp32 accumulation, float64 kept
    loss = torch.zeros(rows, dtype=acc, device=s.device)
    block = min(vocab, max(16, TILE_ELEMENTS // 64))  # 65536 by default: V = 128256 takes 2 blocks
    step = max(1, TILE_ELEMENTS // max(block, 1))
    inv_t, code = spec.inv_temperature, spec.code
    # Writing the gradient straight into `grad` (exp(..., out=)) needs the accumulation dtype.
    direct_out = grad is not None and grad.dtype == acc
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        scale = (w[r0:r1].to(acc) * inv_t).unsqueeze(1)

        def tiles(v0: int, r0: int = r0, r1: int = r1) -> tuple[Tensor, Tensor]:
            # Views when no conversion is needed: every use below derives new tensors from them.
            v1 = min(vocab, v0 + block)
            sb, tb = s[r0:r1, v0:v1].to(acc), t[r0:r1, v0:v1].to(acc)
            return (sb, tb) if inv_t == 1.0 else (sb * inv_t, tb * inv_t)

        if code == MSE:
            for v0 in range(0, vocab, block):
                sb, tb = tiles(v0)
                d = sb - tb
                loss[r0:r1] += torch.linalg.vecdot(d, d) / vocab
                if grad is not None:
                    grad[r0:r1, v0 : v0 + block] = d.mul_(scale * (2.0 / vocab))
            continue

        # Pass 1: online log-sum-exp over vocabulary blocks (log-space form of the running max/sum update).
        lse_s = torch.full((r1 - r0, 1), -math.inf, dtype=acc, device=s.device)
        lse_t = lse_s.clone()
        for v0 in range(0, vocab, block):
            sb, tb = tiles(v0)
            lse_s = torch.logaddexp(lse_s, torch.logsumexp(sb, dim=1, keepdim=True))
            lse_t = torch.logaddexp(lse_t, torch.logsumexp(tb, dim=1, keepdim=True))

        # Pass 2: loss terms and S = sum h; fkl and soft_ce write q - p here.
        total_h = torch.zeros((r1 - r0, 1), dtype=acc, device=s.device)
        for v0 in range(0, vocab, block):
            sb, tb = tiles(v0)
            logq, logp = sb - lse_s, tb - lse_t
            p = logp.exp()
            if code == FKL:
                # Lean form of the most used divergence: fewer passes over the tile than the generic terms.
                # p (log p - log q) with 0 log 0 = 0: -inf - -inf (NaN) and -inf differences only meet p = 0.
                d = logp.sub_(logq).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-torch.finfo(acc).max)
                loss[r0:r1] += torch.linalg.vecdot(p, d)
                q = None
            else:
                q = logq.exp()
                terms, h = _terms_torch(logq, logp, q, p, code, spec.coef)
                loss[r0:r1] += terms.sum(dim=1)
                if code not in _DIRECT_GRAD:
                    total_h += h.sum(dim=1, keepdim=True)
            if grad is not None and code in _DIRECT_GRAD:
                out = grad[r0:r1, v0 : v0 + block]
                if q is None and direct_out:
                    torch.exp(logq, out=out)  # q computed in place in the gradient buffer
                    out.sub_(p).mul_(scale)
                else:
                    out.copy_((logq.exp() if q is None else q).sub_(p).mul_(scale))

        # Pass 3: dL/ds = h - q S, recomputed from the logits.
        if grad is not None and code not in _DIRECT_GRAD:
            for v0 in range(0, vocab, block):
                sb, tb = tiles(v0)
                logq, logp = sb - lse_s, tb - lse_t
                q, p = logq.exp(), logp.exp()
                _, h = _terms_torch(logq, logp, q, p, code, spec.coef)
                grad[r0:r1, v0 : v0 + block] = h.sub_(q.mul_(total_h)).mul_(scale)
    return loss


def kd_rows(s: Tensor, t: Tensor, w: Tensor, spec: DivergenceSpec, grad: Tensor | None) -> Tensor:
    """Row losses of logits (rows, V) and optionally their weighted gradient; dispatches by device.

    `w` (rows,) weights each row's gradient (mask / count for a mean); the returned losses are unweighted.
    `s` and `t` must have unit stride along the vocabulary. `grad` may be `s` itself (computed in place).
    """
    if backend(s) == "triton":
        return _rows_triton(s, t, w, spec, grad)
    return _rows_torch(s, t, w, spec, grad)


def token_weights(
    mask: Tensor | None, tokens: int, reduction: str, device: torch.device, like: torch.dtype = torch.float32
) -> Tensor:
    """Per-token weights: mask / max(count, 1) for a mean, the 0/1 mask otherwise; no host sync.

    fp32, or float64 when `like` is float64 (so float64 inputs stay exact end to end).
    """
    dtype = torch.float64 if like == torch.float64 else torch.float32
    if mask is None:
        counted = torch.ones(tokens, dtype=dtype, device=device)
    else:
        if mask.dtype != torch.bool:
            raise InputError(f"mask must be a bool tensor (True = counts), got dtype {mask.dtype}")
        if mask.numel() != tokens:
            raise InputError(
                f"mask has {mask.numel()} elements but there are {tokens} tokens; pass one bool per token"
            )
        counted = mask.reshape(tokens).to(device=device, dtype=dtype)
    if reduction == "mean":
        return counted / counted.sum().clamp(min=1.0)
    return counted


def reduce_rows(row_loss: Tensor, w: Tensor, reduction: str) -> Tensor:
    """Weighted sum (mean/sum) or per-token losses (none); uncounted rows give exactly 0, even if inf."""
    weighted = torch.where(w > 0, row_loss, row_loss.new_zeros(())) * w
    return weighted if reduction == "none" else weighted.sum()


# ------------------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------------------


class _KDLossFunction(torch.autograd.Function):
    """Loss and student gradient in one forward; backward scales the stored gradient by the upstream one."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: Tensor, teacher: Tensor, w: Tensor, spec: DivergenceSpec, reduction: str
    ) -> Tensor:
        grad = torch.empty_like(student)
        row_loss = kd_rows(student, teacher, w, spec, grad)
        ctx.grad = grad
        ctx.reduction = reduction
        return reduce_rows(row_loss, w, reduction)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "gkd.kernels.kd_loss: backward ran twice through one graph; its gradient is computed in the "
                "forward and released after the first backward, so call kd_loss again instead of retain_graph"
            )
        ctx.grad = None
        upstream = grad_output.reshape(-1, 1) if ctx.reduction == "none" else grad_output
        grad.mul_(upstream.to(grad.dtype))
        return grad, None, None, None, None


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Divergence between teacher and student logits (see the module docstring for the contract).

    `reduction`: "mean" (over counted tokens), "sum" (over counted tokens), or "none" (per token, shape of the
    leading dims, uncounted tokens 0). Only `student_logits` receives a gradient.
    """
    spec = make_spec(divergence, temperature=temperature, beta=beta, alpha=alpha)
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if student_logits.shape != teacher_logits.shape:
        raise InputError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape (same tokens and vocabulary)"
        )
    if (
        student_logits.dim() < 1
        or not student_logits.is_floating_point()
        or not teacher_logits.is_floating_point()
    ):
        raise InputError("logits must be floating-point tensors of shape (..., vocab)")
    if student_logits.device != teacher_logits.device:
        raise InputError(
            f"student logits on {student_logits.device} but teacher logits on {teacher_logits.device}"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).contiguous()
    t = teacher_logits.detach().reshape(-1, vocab).contiguous()
    w = token_weights(mask, s.shape[0], reduction, s.device, s.dtype)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss = _KDLossFunction.apply(s, t, w, spec, reduction)
    else:
        loss = reduce_rows(kd_rows(s.detach(), t, w, spec, None), w, reduction)
    return loss.reshape(lead) if reduction == "none" else loss
