"""Attention-relation distillation losses, computed tile by tile without materialising (B, H, T, T).

Two losses share one blocked algorithm over the (query, key) plane of each (batch, head):

* ``relation_kl_loss``: KL(softmax(t_a t_b^T * t_scale) || softmax(s_a s_b^T * s_scale)) over the key
  axis. MiniLM (Wang et al., NeurIPS 2020) uses it on attention distributions (a = q, b = k, scale
  1/sqrt(d)) and on value relations (a = b = v); MiniLMv2 (Wang et al., ACL Findings 2021) on QQ^T, KK^T
  and VV^T after splitting the concatenated heads into "relation heads" (``split_relation_heads``), so
  teacher and student head dims may differ. Result: mean over (batch, head, counted query rows).
* ``scores_mse_loss``: TinyBERT's (Jiao et al., EMNLP Findings 2020) MSE between the scaled score
  matrices, averaged over the allowed (query, key) pairs and the heads. Pairs that a mask excludes do not
  count (the paper's intent), instead of comparing -inf-filled entries.

Masks: ``mask`` (B, T) bool, True = real token. A key with mask False is excluded from every row; a query
row with mask False does not count. ``causal=True`` also excludes keys j > i. A row with no allowed key
(only possible for a wholly padded sequence) contributes 0; the all-masked input gives loss 0 and finite
gradients.

Algorithm (flash-attention style). Forward: per block of query rows, loop over key blocks keeping for both
sides an online log-sum-exp (running max m, running sum l) and the running sum
acc = sum_j e^(S_t - m_t) (S_t - S_s). Because KL_i = sum_j p_t,ij (S_t,ij - S_s,ij) - lse_t,i + lse_s,i,
this gives the row KL in a single pass over the keys (acc is rescaled like l_t when m_t grows), instead of a
first pass for the LSEs and a second for the KL sum; the row LSEs of both sides are saved for the backward.
Backward recomputes each score tile from the inputs and the saved LSEs:
dL/dS_s,ij = c_i (p_s,ij - p_t,ij) for KL and 2 c_i (S_s,ij - S_t,ij) for MSE, with
c_i = upstream grad * row weight / count; then d s_a = s_scale dS s_b and d s_b = s_scale dS^T s_a. The
teacher side never receives gradients. When s_a and s_b are the same tensor (value relations, MiniLMv2)
autograd sums the two returned gradients.

Paths (``gkd.kernels._dispatch.backend``): the Triton path is a forward kernel (row LSEs and row losses)
and two backward kernels (dA over query blocks, dB over key blocks, so no atomics) that recompute the score
tiles from the saved LSEs. fp32 inputs use 3xTF32 dots (fp32-level accuracy on tensor cores), bf16 inputs
bf16 dots; all accumulation is fp32. The torch path (CPU, or no Triton) runs the same blocked algorithm with
full-width (B, H, rows, T) tiles of at most 256 rows within a 32 MiB budget: on a CPU a whole key row per
tile is simpler and faster (large matmuls, torch's fused log_softmax). It builds the student gradients
during the forward pass, when they are needed (each tile is then computed once instead of twice), and the
backward only scales them by the upstream gradient. Neither path synchronises with the host.

Grouped-query attention: b (keys/values) may have fewer heads than a when they divide a's head count; b is
then repeated per group (a copy of a's size) and autograd sums the group's gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gkd.errors import InputError
from gkd.kernels._dispatch import backend, interpreting, jit, tl, triton

_KL = 0
_MSE = 1


@jit
def _scores(a, b, scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # S = a b^T * scale for one (BLOCK_M, BLOCK_N) tile, fp32 accumulation. UPCAST (interpreter only): the
    # interpreter's tl.dot mis-handles bf16 operands, so they are widened to fp32 there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), input_precision=PREC) * scale


@jit
def _dot_grad(g, x, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # g (M, N) fp32 times x (N, D) in x's dtype (bf16 operands run on tensor cores), fp32 accumulation.
    if UPCAST:
        return tl.dot(g, x.to(tl.float32), input_precision=PREC)
    return tl.dot(g.to(x.dtype), x, input_precision=PREC)


@jit
def _allowed(offs_m, offs_n, key_ok, CAUSAL: tl.constexpr):
    # allowed[i, j] = key j is a real in-range key and (not causal or j <= i)
    ok = key_ok[None, :] & (offs_m[:, None] >= 0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


@jit
def _relation_fwd_kernel(
    SA,
    SB,
    TA,
    TB,
    MASK,
    LSE_S,
    LSE_T,
    ROW,
    s_scale,
    t_scale,
    T,
    H,
    DS,
    DT,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KIND: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, head). Loops over key blocks.
    # KL:  m, l online LSE per side; acc_i = sum_j e^(S_t,ij - m_t,i) (S_t,ij - S_s,ij)
    #      row_i = acc_i / l_t,i - lse_t,i + lse_s,i
    # MSE: row_i = sum_j allowed_ij (S_s,ij - S_t,ij)^2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)  # 64-bit base offsets: B * H * T * d may exceed 2^31
    b = pid_bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_in = offs_m < T
    sa = tl.load(
        SA + bh * T * DS + offs_m[:, None] * DS + offs_ds[None, :],
        mask=row_in[:, None] & (offs_ds[None, :] < DS),
        other=0.0,
    )
    ta = tl.load(
        TA + bh * T * DT + offs_m[:, None] * DT + offs_dt[None, :],
        mask=row_in[:, None] & (offs_dt[None, :] < DT),
        other=0.0,
    )
    # -1e30 is a finite "minus infinity": exp(m_old - m_new) never meets inf - inf on rows without keys yet.
    m_s = tl.full([BLOCK_M], -1.0e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < T
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b * T + offs_n, mask=offs_n < T, other=0) != 0)
        sb = tl.load(
            SB + bh * T * DS + offs_n[:, None] * DS + offs_ds[None, :],
            mask=(offs_n[:, None] < T) & (offs_ds[None, :] < DS),
            other=0.0,
        )
        tb = tl.load(
            TB + bh * T * DT + offs_n[:, None] * DT + offs_dt[None, :],
            mask=(offs_n[:, None] < T) & (offs_dt[None, :] < DT),
            other=0.0,
        )
        s_s = _scores(sa, sb, s_scale, PREC, UPCAST)
        s_t = _scores(ta, tb, t_scale, PREC, UPCAST)
        ok = _allowed(offs_m, offs_n, key_ok, CAUSAL)
        if KIND == 0:
            m_s_new = tl.maximum(m_s, tl.max(tl.where(ok, s_s, -1.0e30), axis=1))
            m_t_new = tl.maximum(m_t, tl.max(tl.where(ok, s_t, -1.0e30), axis=1))
            p_s = tl.where(ok, tl.exp(s_s - m_s_new[:, None]), 0.0)
            p_t = tl.where(ok, tl.exp(s_t - m_t_new[:, None]), 0.0)
            alpha_s = tl.exp(m_s - m_s_new)
            alpha_t = tl.exp(m_t - m_t_new)
            l_s = l_s * alpha_s + tl.sum(p_s, axis=1)
            l_t = l_t * alpha_t + tl.sum(p_t, axis=1)
            acc = acc * alpha_t + tl.sum(p_t * (s_t - s_s), axis=1)
            m_s = m_s_new
            m_t = m_t_new
        else:
            diff = tl.where(ok, s_s - s_t, 0.0)
            acc += tl.sum(diff * diff, axis=1)
    counted = row_in
    if HAS_MASK:
        counted = counted & (tl.load(MASK + b * T + offs_m, mask=row_in, other=0) != 0)
    if KIND == 0:
        nonempty = l_t > 0.0
        lse_s = tl.where(nonempty, m_s + tl.log(tl.where(nonempty, l_s, 1.0)), 0.0)
        lse_t = tl.where(nonempty, m_t + tl.log(tl.where(nonempty, l_t, 1.0)), 0.0)
        row = tl.where(nonempty, acc / tl.where(nonempty, l_t, 1.0) - lse_t + lse_s, 0.0)
        tl.store(LSE_S + bh * T + offs_m, lse_s, mask=row_in)
        tl.store(LSE_T + bh * T + offs_m, lse_t, mask=row_in)
    else:
        row = acc
    tl.store(ROW + bh * T + offs_m, tl.where(counted, row, 0.0), mask=row_in)


@jit
def _grad_scores(s_s, s_t, lse_s, lse_t, coef, ok, KIND: tl.constexpr):
    # dL/dS_s for one tile: KL -> c_i (p_s - p_t); MSE -> 2 c_i (S_s - S_t); zero outside allowed pairs.
    if KIND == 0:
        p_s = tl.exp(s_s - lse_s[:, None])
        p_t = tl.exp(s_t - lse_t[:, None])
        g = coef[:, None] * (p_s - p_t)
    else:
        g = 2.0 * coef[:, None] * (s_s - s_t)
    return tl.where(ok, g, 0.0)


@jit
def _relation_bwd_da_kernel(
    SA,
    SB,
    TA,
    TB,
    MASK,
    LSE_S,
    LSE_T,
    COEF,
    DA,
    s_scale,
    t_scale,
    T,
    H,
    DS,
    DT,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KIND: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    # dA[i] = s_scale * sum_j dS_ij s_b[j], for BLOCK_M query rows; loops over key blocks.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)  # 64-bit base offsets: B * H * T * d may exceed 2^31
    b = pid_bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_in = offs_m < T
    sa = tl.load(
        SA + bh * T * DS + offs_m[:, None] * DS + offs_ds[None, :],
        mask=row_in[:, None] & (offs_ds[None, :] < DS),
        other=0.0,
    )
    ta = tl.load(
        TA + bh * T * DT + offs_m[:, None] * DT + offs_dt[None, :],
        mask=row_in[:, None] & (offs_dt[None, :] < DT),
        other=0.0,
    )
    lse_s = tl.load(LSE_S + bh * T + offs_m, mask=row_in, other=0.0)
    lse_t = tl.load(LSE_T + bh * T + offs_m, mask=row_in, other=0.0)
    coef = tl.load(COEF + b * T + offs_m, mask=row_in, other=0.0)
    da = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < T
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b * T + offs_n, mask=offs_n < T, other=0) != 0)
        sb = tl.load(
            SB + bh * T * DS + offs_n[:, None] * DS + offs_ds[None, :],
            mask=(offs_n[:, None] < T) & (offs_ds[None, :] < DS),
            other=0.0,
        )
        tb = tl.load(
            TB + bh * T * DT + offs_n[:, None] * DT + offs_dt[None, :],
            mask=(offs_n[:, None] < T) & (offs_dt[None, :] < DT),
            other=0.0,
        )
        s_s = _scores(sa, sb, s_scale, PREC, UPCAST)
        s_t = _scores(ta, tb, t_scale, PREC, UPCAST)
        g = _grad_scores(s_s, s_t, lse_s, lse_t, coef, _allowed(offs_m, offs_n, key_ok, CAUSAL), KIND)
        da += _dot_grad(g, sb, PREC, UPCAST)
    tl.store(
        DA + bh * T * DS + offs_m[:, None] * DS + offs_ds[None, :],
        (da * s_scale).to(DA.dtype.element_ty),
        mask=row_in[:, None] & (offs_ds[None, :] < DS),
    )


@jit
def _relation_bwd_db_kernel(
    SA,
    SB,
    TA,
    TB,
    MASK,
    LSE_S,
    LSE_T,
    COEF,
    DB,
    s_scale,
    t_scale,
    T,
    H,
    DS,
    DT,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KIND: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    # dB[j] = s_scale * sum_i dS_ij s_a[i], for BLOCK_N keys; loops over query blocks.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)  # 64-bit base offsets: B * H * T * d may exceed 2^31
    b = pid_bh // H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    key_in = offs_n < T
    key_ok = key_in
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + b * T + offs_n, mask=key_in, other=0) != 0)
    sb = tl.load(
        SB + bh * T * DS + offs_n[:, None] * DS + offs_ds[None, :],
        mask=key_in[:, None] & (offs_ds[None, :] < DS),
        other=0.0,
    )
    tb = tl.load(
        TB + bh * T * DT + offs_n[:, None] * DT + offs_dt[None, :],
        mask=key_in[:, None] & (offs_dt[None, :] < DT),
        other=0.0,
    )
    db = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # rows i < j never see key j
    for start_m in range(lo, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in = offs_m < T
        sa = tl.load(
            SA + bh * T * DS + offs_m[:, None] * DS + offs_ds[None, :],
            mask=row_in[:, None] & (offs_ds[None, :] < DS),
            other=0.0,
        )
        ta = tl.load(
            TA + bh * T * DT + offs_m[:, None] * DT + offs_dt[None, :],
            mask=row_in[:, None] & (offs_dt[None, :] < DT),
            other=0.0,
        )
        lse_s = tl.load(LSE_S + bh * T + offs_m, mask=row_in, other=0.0)
        lse_t = tl.load(LSE_T + bh * T + offs_m, mask=row_in, other=0.0)
        coef = tl.load(COEF + b * T + offs_m, mask=row_in, other=0.0)
        s_s = _scores(sa, sb, s_scale, PREC, UPCAST)
        s_t = _scores(ta, tb, t_scale, PREC, UPCAST)
        g = _grad_scores(s_s, s_t, lse_s, lse_t, coef, _allowed(offs_m, offs_n, key_ok, CAUSAL), KIND)
        db += _dot_grad(tl.trans(g), sa, PREC, UPCAST)
    tl.store(
        DB + bh * T * DS + offs_n[:, None] * DS + offs_ds[None, :],
        (db * s_scale).to(DB.dtype.element_ty),
        mask=key_in[:, None] & (offs_ds[None, :] < DS),
    )


def _triton_config(s_a: Tensor, t_a: Tensor) -> dict[str, object]:
    """Block sizes, warps and dot precision: 16-wide tiles under the interpreter (CPU tensors), 32 or 64 on a
    GPU."""
    wide = max(s_a.shape[-1], t_a.shape[-1]) > 64
    # fp32 operands of head dim > 64 in 64-row tiles overflow shared memory (320 KiB asked on an H200 for
    # d = 128): halve the tiles and the pipeline depth there.
    fp32_wide = wide and s_a.dtype == torch.float32
    block = 16 if interpreting() else (32 if fp32_wide else 64)
    return {
        "num_warps": 8 if wide else 4,
        "num_stages": 2 if fp32_wide else 3,
        # fp32 inputs: three TF32 tensor-core products per dot (fp32-level accuracy, unlike plain TF32, and
        # far faster than the CUDA-core "ieee" path); the interpreter computes every dot in full precision.
        "PREC": "ieee" if interpreting() else ("tf32x3" if s_a.dtype == torch.float32 else "tf32"),
        "UPCAST": interpreting(),
        "BLOCK_M": block,
        "BLOCK_N": block,
        "BLOCK_DS": max(16, triton.next_power_of_2(s_a.shape[-1])),
        "BLOCK_DT": max(16, triton.next_power_of_2(t_a.shape[-1])),
    }


def _triton_forward(
    kind: int,
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    mask_i8: Tensor | None,
    s_scale: float,
    t_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel; returns (row losses, student LSE, teacher LSE), each (B*H, T) fp32."""
    bsz, heads, t, ds = s_a.shape
    dt = t_a.shape[-1]
    row = torch.empty(bsz * heads, t, device=s_a.device, dtype=torch.float32)
    lse_s = torch.empty_like(row)
    lse_t = torch.empty_like(row)
    cfg = _triton_config(s_a, t_a)
    grid = (triton.cdiv(t, cfg["BLOCK_M"]), bsz * heads)
    _relation_fwd_kernel[grid](
        s_a,
        s_b,
        t_a,
        t_b,
        mask_i8 if mask_i8 is not None else row,
        lse_s,
        lse_t,
        row,
        s_scale,
        t_scale,
        t,
        heads,
        ds,
        dt,
        HAS_MASK=mask_i8 is not None,
        CAUSAL=causal,
        KIND=kind,
        **cfg,
    )
    return row, lse_s, lse_t


def _triton_backward(
    kind: int,
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    mask_i8: Tensor | None,
    lse_s: Tensor,
    lse_t: Tensor,
    coef: Tensor,
    s_scale: float,
    t_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    """Launch the two backward kernels; returns (d s_a, d s_b) in the student's dtype."""
    bsz, heads, t, ds = s_a.shape
    dt = t_a.shape[-1]
    da = torch.empty_like(s_a)
    db = torch.empty_like(s_b)
    cfg = _triton_config(s_a, t_a)
    args = (s_a, s_b, t_a, t_b, mask_i8 if mask_i8 is not None else coef, lse_s, lse_t, coef)
    tail = (s_scale, t_scale, t, heads, ds, dt)
    flags = {"HAS_MASK": mask_i8 is not None, "CAUSAL": causal, "KIND": kind, **cfg}
    _relation_bwd_da_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), bsz * heads)](*args, da, *tail, **flags)
    _relation_bwd_db_kernel[(triton.cdiv(t, cfg["BLOCK_N"]), bsz * heads)](*args, db, *tail, **flags)
    return da, db


# ----------------------------------------------------------------------------------------------------
# Torch path: the same blocked algorithm, one (B, H, rows, T) tile at a time.

_TILE_ELEMENTS = 1 << 23  # fp32 elements per score tile (32 MiB); at most three tiles are alive at once
_MAX_TILE_ROWS = 256
# Finite fill for excluded pairs: exp(_MASKED - lse) = 0 and _MASKED - _MASKED = 0 (with -inf: NaN).
_MASKED = -1.0e30


def _row_block(bsz: int, heads: int, t: int) -> int:
    """Query rows per tile: within the tile budget, 16 to 256 rows (so a long sequence never has a full
    (T, T) tile), spread evenly over the tiles (no small remainder tile, whose matmuls run inefficiently)."""
    rows = max(16, min(t, _MAX_TILE_ROWS, _TILE_ELEMENTS // max(1, bsz * heads * t)))
    tiles = -(-t // rows)
    return -(-t // tiles)


def _tile_allowed(
    key_ok: Tensor | None, i0: int, i1: int, num_keys: int, causal: bool, device: torch.device
) -> Tensor | None:
    """Bool (B or 1, 1, rows, num_keys) mask of allowed pairs of query rows i0:i1 with keys 0:num_keys;
    None when all are allowed."""
    allowed = None if key_ok is None else key_ok[:, None, None, :num_keys]
    if causal:
        rows = torch.arange(i0, i1, device=device)[:, None]
        keys = torch.arange(num_keys, device=device)[None, :]
        tri = (keys <= rows)[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum_j x_ij y_ij over the last dim as a batched matmul (no (rows, T) temporary)."""
    return torch.matmul(x.unsqueeze(-2), y.unsqueeze(-1))[..., 0, 0]


def _torch_tile(
    kind: int,
    sa: Tensor,
    s_b: Tensor,
    ta: Tensor,
    t_b: Tensor,
    allowed: Tensor | None,
    coef: Tensor | None,
    s_scale: float,
    t_scale: float,
) -> tuple[Tensor, Tensor | None]:
    """Row losses (rows,) of one tile and, when coef (B, 1, rows, 1) is given, dL/dS_s for the tile; fp32.

    The scale is applied to the (rows, d) operand, not to the (rows, T) product. Tile temporaries are reused
    in place so that at most three (B, H, rows, T) buffers exist at once.
    """
    s_s = torch.matmul(sa * s_scale, s_b.transpose(-1, -2))
    s_t = torch.matmul(ta * t_scale, t_b.transpose(-1, -2))
    if kind == _MSE:
        diff = s_s.sub_(s_t)
        if allowed is not None:
            diff.masked_fill_(~allowed, 0.0)
        row = _rowdot(diff, diff)
        return row, None if coef is None else diff.mul_(2.0 * coef)
    if allowed is not None:
        s_s.masked_fill_(~allowed, _MASKED)
        s_t.masked_fill_(~allowed, _MASKED)
    # torch's fused log_softmax is the fastest CPU row normaliser; each replaces its score tile.
    log_p_s = torch.log_softmax(s_s, dim=-1)
    del s_s
    log_p_t = torch.log_softmax(s_t, dim=-1)
    del s_t
    p_t = log_p_t.exp()
    # KL_i = sum_j p_t (log p_t - log p_s); excluded pairs have p_t = 0 and log p_t - log p_s = 0.
    row = _rowdot(p_t, log_p_t.sub_(log_p_s))
    if coef is None:
        return row, None
    # dL/dS_s = c_i (p_s - p_t); p_s = p_t = 0 on excluded pairs, so no masking is needed.
    grad = log_p_s.exp_().sub_(p_t).mul_(coef)
    return row, grad


def _torch_forward(
    kind: int,
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    key_ok: Tensor | None,
    coef: Tensor | None,
    s_scale: float,
    t_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Row losses (B, H, T) and, when coef (B, T) is given, the fp32 gradients of s_a and s_b for an
    upstream gradient of 1.

    The gradient is built during the forward: each score tile is computed once instead of being recomputed
    in the backward, which on a CPU roughly halves the work; the backward only scales it by the upstream
    gradient. The memory held in between is the size of the gradients themselves.
    """
    bsz, heads, t, _ = s_a.shape
    s_b32, t_b32 = s_b.float(), t_b.float()
    row = torch.empty(bsz, heads, t, device=s_a.device, dtype=torch.float32)
    da = db = None
    if coef is not None:
        da = torch.empty(s_a.shape, device=s_a.device, dtype=torch.float32)
        db = torch.zeros(s_b.shape, device=s_b.device, dtype=torch.float32)
    step = _row_block(bsz, heads, t)
    for i0 in range(0, t, step):
        i1 = min(t, i0 + step)
        sa = s_a[:, :, i0:i1].float()
        c = None if coef is None else coef[:, None, i0:i1, None]
        # causal: rows i0:i1 see only keys 0:i1, so the tile stops there (half the work overall)
        kn = i1 if causal else t
        sb, tb = s_b32[:, :, :kn], t_b32[:, :, :kn]
        allowed = _tile_allowed(key_ok, i0, i1, kn, causal, s_a.device)
        r, grad = _torch_tile(kind, sa, sb, t_a[:, :, i0:i1].float(), tb, allowed, c, s_scale, t_scale)
        row[:, :, i0:i1] = r
        if grad is not None:
            da[:, :, i0:i1] = torch.matmul(grad, sb).mul_(s_scale)
            db[:, :, :kn].add_(torch.matmul(grad.transpose(-1, -2), sa), alpha=s_scale)
    return row, da, db


# ----------------------------------------------------------------------------------------------------
# Autograd.


def _row_weights(kind: int, mask: Tensor | None, bsz: int, heads: int, t: int, causal: bool, device) -> tuple:
    """Per-row weights (B, T) and the denominator: counted query rows (KL) or allowed pairs (MSE), times H."""
    weight = torch.ones(bsz, t, device=device) if mask is None else mask.to(torch.float32)
    if kind == _KL:
        count = weight.sum() * heads
    elif causal:
        # allowed pairs of row i: the real keys j <= i, i.e. the running count of real tokens
        count = (weight * weight.cumsum(-1)).sum() * heads
    else:
        count = (weight.sum(-1) ** 2).sum() * heads
    return weight, count.clamp(min=1.0)


class _RelationLoss(torch.autograd.Function):
    """Blocked relation KL / score MSE with gradients to the student's a and b only."""

    @staticmethod
    def forward(
        ctx,
        kind: int,
        s_a: Tensor,
        s_b: Tensor,
        t_a: Tensor,
        t_b: Tensor,
        mask: Tensor | None,
        s_scale: float,
        t_scale: float,
        causal: bool,
    ) -> Tensor:
        bsz, heads, t, _ = s_a.shape
        s_a, s_b, t_a, t_b = (x.contiguous() for x in (s_a, s_b, t_a, t_b))
        weight, count = _row_weights(kind, mask, bsz, heads, t, causal, s_a.device)
        ctx.triton_path = backend(s_a) == "triton"
        ctx.dtypes = (s_a.dtype, s_b.dtype)
        if ctx.triton_path:
            mask_i8 = None if mask is None else mask.to(torch.int8).contiguous()
            row, lse_s, lse_t = _triton_forward(kind, s_a, s_b, t_a, t_b, mask_i8, s_scale, t_scale, causal)
            ctx.save_for_backward(s_a, s_b, t_a, t_b, mask_i8, lse_s, lse_t, weight, count)
            ctx.kind, ctx.s_scale, ctx.t_scale, ctx.causal = kind, s_scale, t_scale, causal
        else:
            needs_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            coef = weight / count if needs_grad else None
            row, da, db = _torch_forward(kind, s_a, s_b, t_a, t_b, mask, coef, s_scale, t_scale, causal)
            ctx.save_for_backward(da, db)
        # Rows that do not count are dropped here (the Triton kernel already wrote 0 for them).
        row = torch.where(weight[:, None, :] > 0, row.view(bsz, heads, t), 0.0)
        return row.sum() / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.triton_path:
            s_a, s_b, t_a, t_b, mask_i8, lse_s, lse_t, weight, count = ctx.saved_tensors
            coef = (weight * (grad_out.to(torch.float32) / count)).contiguous()
            scales = (ctx.s_scale, ctx.t_scale, ctx.causal)
            da, db = _triton_backward(ctx.kind, s_a, s_b, t_a, t_b, mask_i8, lse_s, lse_t, coef, *scales)
        else:
            da, db = ctx.saved_tensors
            g = grad_out.to(torch.float32)
            da, db = (da * g).to(ctx.dtypes[0]), (db * g).to(ctx.dtypes[1])
        return None, da, db, None, None, None, None, None, None


def _check_inputs(
    name: str, s_a: Tensor, s_b: Tensor, t_a: Tensor, t_b: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validate shapes; expand grouped key/value heads of b to a's head count. Returns (s_b, t_b)."""
    for label, x in (("s_a", s_a), ("s_b", s_b), ("t_a", t_a), ("t_b", t_b)):
        if x.dim() != 4:
            raise InputError(
                f"{name}: {label} must be (batch, heads, tokens, dim), got shape {tuple(x.shape)}"
            )
        if x.device != s_a.device:
            raise InputError(f"{name}: {label} is on {x.device} but s_a on {s_a.device}; move them together")
    if s_a.dtype != s_b.dtype or t_a.dtype != t_b.dtype:
        raise InputError(
            f"{name}: a and b of one side must share a dtype (student {s_a.dtype}/{s_b.dtype}, teacher "
            f"{t_a.dtype}/{t_b.dtype}); cast them to one"
        )
    expanded = []
    for side, a, b in (("student", s_a, s_b), ("teacher", t_a, t_b)):
        if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2] or a.shape[3] != b.shape[3]:
            raise InputError(
                f"{name}: {side} a {tuple(a.shape)} and b {tuple(b.shape)} must agree in batch, "
                "tokens and head dim"
            )
        if a.shape[1] != b.shape[1]:
            if b.shape[1] == 0 or a.shape[1] % b.shape[1] != 0:
                raise InputError(
                    f"{name}: {side} a has {a.shape[1]} heads and b {b.shape[1]}; b's head count "
                    "must divide a's (grouped-query attention)"
                )
            # Grouped-query attention: each key/value head serves a group of query heads. The copy is the
            # size of a, small next to the (T, T) maps; autograd sums the group's gradients back into b.
            b = b.repeat_interleave(a.shape[1] // b.shape[1], dim=1)
        expanded.append(b)
    if s_a.shape[:3] != t_a.shape[:3]:
        raise InputError(
            f"{name}: student {tuple(s_a.shape[:3])} and teacher {tuple(t_a.shape[:3])} must have the "
            "same (batch, heads, tokens); split both into the same number of relation heads "
            "(split_relation_heads) when head counts differ"
        )
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (s_a.shape[0], s_a.shape[2])):
        raise InputError(
            f"{name}: mask must be a bool (batch, tokens) = {(s_a.shape[0], s_a.shape[2])} tensor, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return expanded[0], expanded[1]


def relation_kl_loss(
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    *,
    s_scale: float,
    t_scale: float,
    mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """KL(softmax(t_a t_b^T t_scale) || softmax(s_a s_b^T s_scale)) over keys, averaged over (batch, head,
    counted query rows).

    Inputs (B, H, T, d); student and teacher share B, H, T and may differ in d. b may have fewer heads than
    a when they divide (grouped-query attention). mask (B, T) bool, True = real token. The teacher gets no
    gradient. The result is a 0-dim fp32 tensor.
    """
    s_b, t_b = _check_inputs("relation_kl_loss", s_a, s_b, t_a, t_b, mask)
    return _RelationLoss.apply(
        _KL, s_a, s_b, t_a.detach(), t_b.detach(), mask, float(s_scale), float(t_scale), bool(causal)
    )


def scores_mse_loss(
    s_q: Tensor,
    s_k: Tensor,
    t_q: Tensor,
    t_k: Tensor,
    *,
    s_scale: float,
    t_scale: float,
    mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """TinyBERT: mean over allowed (query, key) pairs and heads of (s_q s_k^T s_scale - t_q t_k^T t_scale)^2.

    A pair (i, j) is allowed when both tokens are real (mask) and, with ``causal``, j <= i.
    """
    s_k, t_k = _check_inputs("scores_mse_loss", s_q, s_k, t_q, t_k, mask)
    return _RelationLoss.apply(
        _MSE, s_q, s_k, t_q.detach(), t_k.detach(), mask, float(s_scale), float(t_scale), bool(causal)
    )


def split_relation_heads(x: Tensor, num_heads: int) -> Tensor:
    """MiniLMv2 relation heads: (B, T, D) or (B, H, T, d) -> (B, R, T, D / R) with D = H * d.

    Per-head tensors are first concatenated back to (B, T, H * d) in head order, as before the model's
    head split.
    """
    if x.dim() == 4:
        bsz, heads, t, d = x.shape
        x = x.transpose(1, 2).reshape(bsz, t, heads * d)
    elif x.dim() != 3:
        raise InputError(
            f"split_relation_heads: expected (B, T, D) or (B, H, T, d), got shape {tuple(x.shape)}"
        )
    bsz, t, dim = x.shape
    if num_heads <= 0 or dim % num_heads != 0:
        raise InputError(
            f"split_relation_heads: {num_heads} relation heads do not divide the width {dim}; "
            "choose a divisor of both models' widths"
        )
    return x.view(bsz, t, num_heads, dim // num_heads).transpose(1, 2)
