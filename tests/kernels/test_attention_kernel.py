"""Attention-relation losses (relation KL, score MSE) against the plain formulas in float64.

The torch path runs in-process with a tiny tile budget so that every case spans several query tiles. The
Triton kernels run under the interpreter in a subprocess (``GKD_KERNELS=interpret`` must be set before Triton
is imported), on T <= 17 because the interpreter is slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gkd.errors import InputError
from gkd.kernels import attention, relation_kl_loss, scores_mse_loss, split_relation_heads

ROOT = Path(__file__).resolve().parents[2]

# (atol, rtol) against the float64 reference, computed from the same (rounded) inputs.
TOLERANCES = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-3, 5e-2)}


# ----------------------------------------------------------------------------------------------------
# Plain formulas (float64), materialising the (B, H, T, T) matrices.


def allowed_pairs(bsz: int, t: int, mask: torch.Tensor | None, causal: bool, device=None) -> torch.Tensor:
    """(B, 1, T, T) bool: key j allowed for query i."""
    allowed = torch.ones(bsz, 1, t, t, dtype=torch.bool, device=device)
    if mask is not None:
        allowed &= mask[:, None, None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return allowed


def ref_relation_kl(s_a, s_b, t_a, t_b, s_scale, t_scale, mask=None, causal=False):
    bsz, heads, t, _ = s_a.shape
    s_s = s_a.double() @ s_b.double().transpose(-1, -2) * s_scale
    s_t = t_a.double() @ t_b.double().transpose(-1, -2) * t_scale
    allowed = allowed_pairs(bsz, t, mask, causal, s_a.device)
    log_p_s = s_s.masked_fill(~allowed, -math.inf).log_softmax(-1)
    log_p_t = s_t.masked_fill(~allowed, -math.inf).log_softmax(-1)
    kl = torch.where(allowed, log_p_t.exp() * (log_p_t - log_p_s), 0.0).sum(-1)  # (B, H, T)
    rows = torch.ones(bsz, 1, t, dtype=torch.bool, device=s_a.device) if mask is None else mask[:, None, :]
    kl = torch.where(rows & allowed.any(-1), kl, 0.0)
    return kl.sum() / (rows.expand(bsz, heads, t).sum()).clamp(min=1)


def ref_scores_mse(s_q, s_k, t_q, t_k, s_scale, t_scale, mask=None, causal=False):
    bsz, heads, t, _ = s_q.shape
    s_s = s_q.double() @ s_k.double().transpose(-1, -2) * s_scale
    s_t = t_q.double() @ t_k.double().transpose(-1, -2) * t_scale
    pairs = allowed_pairs(bsz, t, mask, causal, s_q.device)
    if mask is not None:
        pairs = pairs & mask[:, None, :, None]
    sq = torch.where(pairs, (s_s - s_t) ** 2, 0.0)
    return sq.sum() / (pairs.expand(bsz, heads, t, t).sum()).clamp(min=1)


KERNELS = {"kl": (relation_kl_loss, ref_relation_kl), "mse": (scores_mse_loss, ref_scores_mse)}


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose that reports where and by how much it mismatched."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    bad = (got - want).abs() > atol + rtol * want.abs()
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        err = (got - want).abs().max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched, first at {idx}: "
            f"got {got[tuple(idx)].item():.6g} want {want[tuple(idx)].item():.6g}; "
            f"max abs err {err:.3g} (atol {atol}, rtol {rtol})"
        )


def make_inputs(bsz, heads, t, ds, dt, dtype, seed=0, kv_heads=None):
    gen = torch.Generator().manual_seed(seed)
    kv = heads if kv_heads is None else kv_heads

    def rnd(h, d):
        return torch.randn(bsz, h, t, d, generator=gen).to(dtype)

    return rnd(heads, ds), rnd(kv, ds), rnd(heads, dt), rnd(kv, dt)


def make_mask(bsz: int, t: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(bsz, t, dtype=torch.bool)
    if kind == "right_pad":  # padding at the end, one sequence shorter
        mask[-1, t - t // 3 :] = False
    elif kind == "left_pad":  # left padding plus a hole: rows and keys in the middle excluded too
        mask[0, :3] = False
        mask[-1, t // 2] = False
    return mask


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Force several query tiles per call, so the blocked loop (not one full tile) is what is tested."""
    monkeypatch.setattr(attention, "_TILE_ELEMENTS", 256)
    monkeypatch.setenv("GKD_KERNELS", "torch")
    monkeypatch.setattr(attention, "backend", lambda x: "torch")


def run_case(kind, dtype, shape, mask_kind, causal, s_scale, t_scale, upstream=1.7, seed=0):
    bsz, heads, t, ds, dt = shape
    fn, ref = KERNELS[kind]
    s_a, s_b, t_a, t_b = make_inputs(bsz, heads, t, ds, dt, dtype, seed)
    mask = make_mask(bsz, t, mask_kind)
    s_a.requires_grad_()
    s_b.requires_grad_()
    loss = fn(s_a, s_b, t_a, t_b, s_scale=s_scale, t_scale=t_scale, mask=mask, causal=causal)
    (loss * upstream).backward()
    r_a = s_a.detach().double().requires_grad_()
    r_b = s_b.detach().double().requires_grad_()
    want = ref(r_a, r_b, t_a, t_b, s_scale, t_scale, mask, causal)
    (want * upstream).backward()
    atol, rtol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32
    assert_close("loss", loss.detach(), want.detach(), atol, rtol)
    assert s_a.grad.dtype == dtype and s_b.grad.dtype == dtype
    assert_close("grad s_a", s_a.grad, r_a.grad, atol, rtol)
    assert_close("grad s_b", s_b.grad, r_b.grad, atol, rtol)


SHAPES = [(2, 3, 37, 24, 24), (1, 2, 37, 24, 40), (2, 1, 5, 8, 16)]


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "right_pad", "left_pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference_fp32(kind, shape, mask_kind, causal):
    run_case(kind, torch.float32, shape, mask_kind, causal, s_scale=1 / math.sqrt(shape[3]), t_scale=0.3)


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference_bf16(kind, causal):
    # upstream 64 lifts the gradients (~1e-3 at upstream 1) well above bf16's atol, so the check has teeth
    run_case(kind, torch.bfloat16, (2, 3, 37, 24, 24), "left_pad", causal, 0.2, 0.25, upstream=64.0)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_same_tensor_for_a_and_b_sums_both_gradients(kind):
    """Value relations (MiniLM) and MiniLMv2: a = b = v, the gradient flows in twice."""
    fn, ref = KERNELS[kind]
    v_s, _, v_t, _ = make_inputs(2, 3, 37, 24, 40, torch.float32, seed=3)
    mask = make_mask(2, 37, "right_pad")
    v_s.requires_grad_()
    loss = fn(v_s, v_s, v_t, v_t, s_scale=0.2, t_scale=0.15, mask=mask)
    (loss * 0.6).backward()
    r = v_s.detach().double().requires_grad_()
    want = ref(r, r, v_t, v_t, 0.2, 0.15, mask)
    (want * 0.6).backward()
    assert_close("loss", loss.detach(), want.detach(), *TOLERANCES[torch.float32])
    assert_close("grad v", v_s.grad, r.grad, *TOLERANCES[torch.float32])


def test_minilmv2_relation_heads_across_widths():
    """Teacher width 48 and student width 36 (different head counts), both split into 4 relation heads."""
    gen = torch.Generator().manual_seed(5)
    q_s = torch.randn(2, 3, 17, 12, generator=gen, requires_grad=True)  # (B, H_s, T, d_s): width 36
    q_t = torch.randn(2, 17, 48, generator=gen)  # (B, T, D_t) before the head split
    a_s = split_relation_heads(q_s, 4)
    a_t = split_relation_heads(q_t, 4)
    assert a_s.shape == (2, 4, 17, 9) and a_t.shape == (2, 4, 17, 12)
    loss = relation_kl_loss(a_s, a_s, a_t, a_t, s_scale=1 / 3, t_scale=1 / math.sqrt(12))
    loss.backward()
    r = q_s.detach().double().requires_grad_()
    r_a = r.transpose(1, 2).reshape(2, 17, 4, 9).transpose(1, 2)
    t_a = q_t.double().reshape(2, 17, 4, 12).transpose(1, 2)
    want = ref_relation_kl(r_a, r_a, t_a, t_a, 1 / 3, 1 / math.sqrt(12))
    want.backward()
    assert_close("loss", loss.detach(), want.detach(), *TOLERANCES[torch.float32])
    assert_close("grad q_s", q_s.grad, r.grad, *TOLERANCES[torch.float32])


def test_split_relation_heads_layout():
    x = torch.arange(2 * 5 * 12, dtype=torch.float32).reshape(2, 5, 12)
    out = split_relation_heads(x, 3)
    assert out.shape == (2, 3, 5, 4)
    assert torch.equal(out[1, 2, 4], x[1, 4, 8:12])
    per_head = x.reshape(2, 5, 2, 6).transpose(1, 2)  # (B, H=2, T, d=6)
    assert torch.equal(split_relation_heads(per_head, 3), out)
    with pytest.raises(InputError, match="do not divide"):
        split_relation_heads(x, 5)
    with pytest.raises(InputError, match="expected"):
        split_relation_heads(x[0, 0], 2)


def test_grouped_kv_heads_match_repeated_heads():
    q_s, k_s, q_t, k_t = make_inputs(2, 4, 17, 8, 16, torch.float32, seed=7, kv_heads=2)
    k_s.requires_grad_()
    loss = relation_kl_loss(q_s, k_s, q_t, k_t, s_scale=0.35, t_scale=0.25, causal=True)
    loss.backward()
    r_k = k_s.detach().double().requires_grad_()
    want = ref_relation_kl(
        q_s, r_k.repeat_interleave(2, 1), q_t, k_t.repeat_interleave(2, 1), 0.35, 0.25, causal=True
    )
    want.backward()
    assert_close("loss", loss.detach(), want.detach(), *TOLERANCES[torch.float32])
    assert_close("grad k_s", k_s.grad, r_k.grad, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_masked_gives_zero_and_finite_gradients(kind, causal):
    fn, _ = KERNELS[kind]
    s_a, s_b, t_a, t_b = make_inputs(2, 3, 17, 8, 8, torch.float32)
    s_a.requires_grad_()
    s_b.requires_grad_()
    mask = torch.zeros(2, 17, dtype=torch.bool)
    loss = fn(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.3, mask=mask, causal=causal)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s_a.grad, torch.zeros_like(s_a)) and torch.equal(s_b.grad, torch.zeros_like(s_b))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_partly_masked_batch_with_empty_sequence(kind):
    """One sequence wholly padded, the other real: the empty one adds nothing and yields no NaN."""
    fn, ref = KERNELS[kind]
    s_a, s_b, t_a, t_b = make_inputs(2, 2, 17, 8, 8, torch.float32, seed=2)
    s_a.requires_grad_()
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0] = False
    loss = fn(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.3, mask=mask)
    loss.backward()
    r = s_a.detach().double().requires_grad_()
    want = ref(r, s_b, t_a, t_b, 0.3, 0.3, mask)
    want.backward()
    assert_close("loss", loss.detach(), want.detach(), *TOLERANCES[torch.float32])
    assert_close("grad s_a", s_a.grad, r.grad, *TOLERANCES[torch.float32])


def test_teacher_gets_no_gradient():
    s_a, s_b, t_a, t_b = make_inputs(1, 2, 17, 8, 8, torch.float32)
    for x in (s_a, s_b, t_a, t_b):
        x.requires_grad_()
    relation_kl_loss(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.3).backward()
    assert s_a.grad is not None and s_b.grad is not None
    assert t_a.grad is None and t_b.grad is None


def test_kl_is_zero_when_student_equals_teacher():
    s_a, s_b, _, _ = make_inputs(1, 2, 17, 8, 8, torch.float32)
    loss = relation_kl_loss(s_a, s_b, s_a, s_b, s_scale=0.4, t_scale=0.4, causal=True)
    assert abs(loss.item()) < 1e-6


class _NoHostSync:
    """Make .item(), .cpu(), .tolist(), .numpy() and bool(tensor) raise while active."""

    NAMES = ("item", "cpu", "tolist", "numpy", "__bool__")

    def __init__(self, monkeypatch):
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._raiser(name))

    @staticmethod
    def _raiser(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called inside the loss")

        return fail


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_no_host_synchronisation(kind, monkeypatch):
    fn, _ = KERNELS[kind]
    s_a, s_b, t_a, t_b = make_inputs(2, 3, 37, 24, 16, torch.float32)
    s_a.requires_grad_()
    s_b.requires_grad_()
    mask = make_mask(2, 37, "left_pad")
    with monkeypatch.context() as patch:
        _NoHostSync(patch)
        loss = fn(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.2, mask=mask, causal=True)
        loss.backward()
    assert torch.isfinite(s_a.grad).all()


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_never_materialises_full_score_matrix(kind):
    fn, _ = KERNELS[kind]
    bsz, heads, t = 2, 3, 64
    s_a, s_b, t_a, t_b = make_inputs(bsz, heads, t, 8, 8, torch.float32)
    s_a.requires_grad_()
    s_b.requires_grad_()
    with _LargestAllocation() as mode:
        fn(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.3, mask=make_mask(bsz, t, "right_pad")).backward()
    # the small_tiles fixture caps a tile at max(16 rows, 256 elements): 16 of 64 query rows
    assert mode.largest <= bsz * heads * 16 * t < bsz * heads * t * t


def test_input_errors():
    s_a, s_b, t_a, t_b = make_inputs(2, 2, 9, 8, 8, torch.float32)
    with pytest.raises(InputError, match="same \\(batch, heads, tokens\\)"):
        relation_kl_loss(s_a, s_b, t_a[:, :1], t_b[:, :1], s_scale=1, t_scale=1)
    with pytest.raises(InputError, match="must be \\(batch, heads, tokens, dim\\)"):
        relation_kl_loss(s_a[0], s_b, t_a, t_b, s_scale=1, t_scale=1)
    with pytest.raises(InputError, match="must agree"):
        scores_mse_loss(s_a, s_b[..., :4], t_a, t_b, s_scale=1, t_scale=1)
    with pytest.raises(InputError, match="mask must be a bool"):
        relation_kl_loss(s_a, s_b, t_a, t_b, s_scale=1, t_scale=1, mask=torch.ones(2, 9))
    with pytest.raises(InputError, match="share a dtype"):
        relation_kl_loss(s_a, s_b.double(), t_a, t_b, s_scale=1, t_scale=1)
    with pytest.raises(InputError, match="must divide"):
        relation_kl_loss(torch.randn(2, 3, 9, 8), s_b, t_a, t_b, s_scale=1, t_scale=1)


# ----------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess: the mode must be set before Triton is imported).

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch
    sys.path.insert(0, {tests!r})
    import test_attention_kernel as T
    from gkd.kernels import _dispatch, relation_kl_loss, scores_mse_loss
    assert _dispatch.backend(torch.zeros(1)) == "triton"
    results = []
    cases = [
        # kind, dtype, (B, H, T, ds, dt), mask, causal, same a/b
        ("kl", "float32", (2, 2, 17, 24, 16), "none", False, False),
        ("kl", "float32", (1, 2, 17, 24, 40), "left_pad", True, False),
        ("kl", "float32", (2, 1, 13, 8, 8), "right_pad", False, True),
        ("mse", "float32", (2, 2, 17, 24, 16), "left_pad", False, False),
        ("mse", "float32", (1, 2, 17, 8, 24), "right_pad", True, True),
        ("kl", "bfloat16", (1, 2, 17, 24, 24), "left_pad", True, False),
        ("mse", "bfloat16", (1, 2, 17, 24, 24), "none", True, False),
    ]
    for kind, dt_name, shape, mask_kind, causal, same in cases:
        dtype = getattr(torch, dt_name)
        fn, ref = T.KERNELS[kind]
        s_a, s_b, t_a, t_b = T.make_inputs(*shape, dtype, seed=11)
        if same:
            s_b, t_b = s_a, t_a
        s_a.requires_grad_()
        s_b.requires_grad_()
        mask = T.make_mask(shape[0], shape[2], mask_kind)
        loss = fn(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.2, mask=mask, causal=causal)
        (loss * 1.7).backward()
        r_a = s_a.detach().double().requires_grad_()
        r_b = r_a if same else s_b.detach().double().requires_grad_()
        want = ref(r_a, r_b, t_a, t_b, 0.3, 0.2, mask, causal)
        (want * 1.7).backward()
        atol, rtol = T.TOLERANCES[dtype]
        err = ""
        try:
            T.assert_close("loss", loss.detach(), want.detach(), atol, rtol)
            T.assert_close("grad s_a", s_a.grad, r_a.grad, atol, rtol)
            if not same:
                T.assert_close("grad s_b", s_b.grad, r_b.grad, atol, rtol)
        except AssertionError as exc:
            err = str(exc)
        results.append([kind, dt_name, list(shape), mask_kind, causal, same, err])
    # all-masked input
    s_a, s_b, t_a, t_b = T.make_inputs(2, 1, 9, 8, 8, torch.float32)
    s_a.requires_grad_()
    none = torch.zeros(2, 9, dtype=torch.bool)
    loss = relation_kl_loss(s_a, s_b, t_a, t_b, s_scale=1.0, t_scale=1.0, mask=none)
    loss.backward()
    zero_ok = loss.item() == 0.0 and bool((s_a.grad == 0).all())
    print(json.dumps({{"results": results, "all_masked_ok": zero_ok}}))
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton", reason="the Triton kernels need triton installed")
    env = dict(os.environ, GKD_KERNELS="interpret", TRITON_INTERPRET="1")
    script = _INTERPRET_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = [r for r in out["results"] if r[-1]]
    assert not failures, "\n".join(map(str, failures))
    assert len(out["results"]) == 7
    assert out["all_masked_ok"]


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_forward_without_gradients_matches(kind):
    """The torch path skips the gradient work when no student input needs it; the loss must not change."""
    fn, ref = KERNELS[kind]
    s_a, s_b, t_a, t_b = make_inputs(2, 3, 37, 24, 16, torch.float32, seed=4)
    mask = make_mask(2, 37, "left_pad")
    with torch.no_grad():
        loss = fn(s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.2, mask=mask, causal=True)
    want = ref(s_a, s_b, t_a, t_b, 0.3, 0.2, mask, True)
    assert not loss.requires_grad
    assert_close("loss", loss, want, *TOLERANCES[torch.float32])


@pytest.mark.parametrize(("bsz", "heads", "t"), [(1, 12, 2048), (2, 12, 512), (1, 1, 17), (4, 32, 8192)])
def test_row_blocks_are_even_and_bounded(bsz, heads, t, monkeypatch):
    monkeypatch.setattr(attention, "_TILE_ELEMENTS", 1 << 23)
    rows = attention._row_block(bsz, heads, t)
    tiles = -(-t // rows)
    assert rows <= attention._MAX_TILE_ROWS or rows == t
    assert bsz * heads * rows * t <= max(1 << 23, bsz * heads * 16 * t)
    assert t - (tiles - 1) * rows >= rows - tiles  # the last tile is not a small remainder


def test_benchmark_harness_memory_claim_small():
    """The benchmark's providers agree, and its tracker sees gkd allocate < 1/4 of plain torch (small T)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_attention_loss as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    case = bench.Case(
        name="tiny", kind="kl", batch=1, heads=4, tokens=256, head_dim=16, causal=True, padded=True
    )
    inputs = bench.make_inputs(case, torch.device("cpu"), torch.float32)
    got = bench.step(bench.gkd_kernel, case, inputs)
    grad_gkd = inputs[0].grad.clone()
    want = bench.step(bench.plain_torch, case, inputs)
    assert_close("loss", got, want, *TOLERANCES[torch.float32])
    assert_close("grad s_a", grad_gkd, inputs[0].grad, *TOLERANCES[torch.float32])
    gkd_peak = bench.peak_bytes_above_inputs(bench.gkd_kernel, case, inputs)
    torch_peak = bench.peak_bytes_above_inputs(bench.plain_torch, case, inputs)
    # gradients of s_a and s_b alone are 2 * 64 KiB; four (T, T) maps per head are 4 MiB
    assert 2 * inputs[0].numel() * 4 <= gkd_peak < torch_peak / 4, (gkd_peak, torch_peak)
