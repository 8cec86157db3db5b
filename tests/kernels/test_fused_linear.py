"""fused_linear_kd_loss and fused_linear_topk_kd_loss against plain float64 formulas on materialised logits.

Loss and every student gradient (hidden, weight, bias), odd shapes, differing hidden sizes, temperature,
upstream gradient != 1, masks (including all-masked), fp32 and bf16, several chunks, no (tokens x V)
allocation, no host synchronisation; the Triton row kernel between the matmuls runs under the interpreter
in a subprocess.
"""

from __future__ import annotations

import pytest
import torch
from kd_reference import (
    DIVERGENCES,
    INTERPRETED,
    NoHostSync,
    assert_close,
    check_fused,
    leaves,
    make_inputs,
)
from torch.utils._python_dispatch import TorchDispatchMode

from gkd.errors import InputError
from gkd.kernels import fused_linear, fused_linear_kd_loss, fused_linear_topk_kd_loss

# (leading dims, student hidden, teacher hidden, vocab)
SHAPES = [((37,), 24, 40, 1001), ((2, 5), 16, 16, 67), ((1,), 8, 12, 5)]


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}-{s[3]}")
@pytest.mark.parametrize("div", DIVERGENCES)
def test_matches_reference(div, shape, dtype):
    check_fused(*shape, dtype, div)


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("div", ["fkl", "jsd", "rkl", "tvd"])
def test_many_chunks_masks_no_bias(div, monkeypatch):
    monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", 1001 * 8)  # 8 tokens per chunk: 5 chunks, ragged last
    mask = torch.rand(37, generator=torch.Generator().manual_seed(3)) > 0.3
    check_fused(
        (37,), 24, 40, 1001, torch.float32, div, bias=False, mask=mask, temperature=0.8, upstream=-0.6
    )


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("div", ["fkl", "skew_rkl"])
def test_float64(div):
    check_fused((9,), 6, 10, 50, torch.float64, div)


def test_all_masked_gives_zero_and_no_nan():
    hs, ws, bs = leaves(*make_inputs((7,), 8, 12, 30, torch.float32, bias=True)[:3])
    _, _, _, ht, wt, _ = make_inputs((7,), 8, 12, 30, torch.float32, bias=True)
    loss = fused_linear_kd_loss(
        hs, ws, ht, wt, divergence="jsd", mask=torch.zeros(7, dtype=torch.bool), student_bias=bs
    )
    loss.backward()
    assert loss.item() == 0.0
    for x in (hs, ws, bs):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_only_requested_gradients_and_no_grad_mode():
    hs0, ws0, _, ht, wt, _ = make_inputs((6,), 8, 12, 30, torch.float32, bias=False)
    hs = hs0.clone().requires_grad_()
    ht.requires_grad_()
    loss = fused_linear_kd_loss(hs, ws0, ht, wt, divergence="fkl")  # frozen head
    loss.backward()
    assert hs.grad is not None and ws0.grad is None and ht.grad is None and wt.grad is None
    with torch.no_grad():
        again = fused_linear_kd_loss(hs, ws0, ht, wt, divergence="fkl")
    assert torch.equal(again, loss.detach())


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(InputError, match="student vocabulary 30 != teacher vocabulary 31"):
        fused_linear_kd_loss(
            torch.randn(4, 8), torch.randn(30, 8), torch.randn(4, 6), torch.randn(31, 6), divergence="fkl"
        )


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(30, 9), torch.randn(4, 6), torch.randn(30, 6)), "hidden size 8"),
        ((torch.randn(4, 8), torch.randn(30, 8), torch.randn(5, 6), torch.randn(30, 6)), "same tokens"),
    ],
)
def test_shape_errors(args, match):
    with pytest.raises(InputError, match=match):
        fused_linear_kd_loss(*args, divergence="fkl")


def test_second_backward_raises():
    hs = torch.randn(3, 8, requires_grad=True)
    loss = fused_linear_kd_loss(
        hs, torch.randn(20, 8), torch.randn(3, 4), torch.randn(20, 4), divergence="fkl"
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) any op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("topk", [False, True])
def test_never_allocates_tokens_by_vocab(topk, monkeypatch):
    tokens, vocab = 40, 1001
    monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", vocab * 16)  # 16 tokens per chunk
    hs, ws = leaves(torch.randn(tokens, 8), torch.randn(vocab, 8))
    with _LargestAllocation() as tracker:
        if topk:
            idx = torch.randint(0, vocab, (tokens, 5))
            loss = fused_linear_topk_kd_loss(hs, ws, idx, torch.full((tokens, 5), -3.0))
        else:
            loss = fused_linear_kd_loss(
                hs, ws, torch.randn(tokens, 12), torch.randn(vocab, 12), divergence="jsd"
            )
        loss.backward()
    # The largest live tensors are the weight gradient (V x 8) and one chunk of logits (16 x V).
    assert tracker.largest <= 16 * vocab, tracker.largest
    assert tracker.largest < tokens * vocab


@pytest.mark.skipif(INTERPRETED, reason="the interpreter itself reads tensors on the host")
def test_no_host_sync(monkeypatch):
    hs, ws, bs = leaves(torch.randn(2, 5, 8), torch.randn(40, 8), torch.randn(40))
    mask = torch.rand(2, 5) > 0.5
    idx = torch.stack([torch.randperm(40)[:4] for _ in range(10)]).reshape(2, 5, 4)
    with NoHostSync(monkeypatch):
        for div in DIVERGENCES:
            loss = fused_linear_kd_loss(
                hs, ws, torch.randn(2, 5, 6), torch.randn(40, 6), divergence=div, mask=mask, student_bias=bs
            )
            loss.backward(torch.tensor(0.5))
        loss = fused_linear_topk_kd_loss(hs, ws, idx, torch.full((2, 5, 4), -2.0), mask=mask, student_bias=bs)
        loss.backward()
    assert hs.grad is not None


# ------------------------------------------------------------------------------------------------------------
# top-k teacher
# ------------------------------------------------------------------------------------------------------------


def reference_topk(s, idx, logp, temperature, mask):
    """The (k + 1)-bucket KL built explicitly from materialised float64 logits."""
    logq = (s / temperature).log_softmax(-1)
    logq_k = logq.gather(-1, idx)
    p_k = logp.exp()
    tail_p = (1 - p_k.sum(-1)).clamp(min=0)
    tail_q = 1 - logq_k.exp().sum(-1)
    head = torch.where(p_k > 0, p_k * (logp - logq_k), torch.zeros_like(p_k)).sum(-1)
    tail = torch.where(tail_p > 0, tail_p * (tail_p.log() - tail_q.log()), torch.zeros_like(tail_p))
    rows = head + tail
    counted = torch.ones_like(rows) if mask is None else mask.double()
    return (rows * counted).sum() / counted.sum().clamp(min=1)


def make_topk(tokens, vocab, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 2
    logp_full = teacher.log_softmax(-1)
    logp, idx = logp_full.topk(k, dim=-1)
    return idx, logp


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_topk_matches_plain_implementation(k, dtype, monkeypatch):
    tokens, hdim, vocab = 37, 24, 1001
    monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", vocab * 10)  # 4 chunks
    idx, logp = make_topk(tokens, vocab, k)
    gen = torch.Generator().manual_seed(5)
    hs0 = (torch.randn(tokens, hdim, generator=gen, dtype=torch.float64)).to(dtype)
    ws0 = (torch.randn(vocab, hdim, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    bs0 = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(tokens, generator=gen) > 0.2
    hs, ws, bs = leaves(hs0, ws0, bs0)
    loss = fused_linear_topk_kd_loss(hs, ws, idx, logp.to(dtype), temperature=1.5, mask=mask, student_bias=bs)
    loss.backward(torch.tensor(2.0))
    rh, rw, rb = leaves(hs0.double(), ws0.double(), bs0.double())
    ref = reference_topk(rh @ rw.t() + rb, idx, logp.to(dtype).double(), 1.5, mask)
    ref.backward(torch.tensor(2.0, dtype=torch.float64))
    assert_close(loss, ref, dtype, "top-k loss")
    for name, got, want in (("hidden", hs, rh), ("weight", ws, rw), ("bias", bs, rb)):
        assert_close(got.grad, want.grad, dtype, f"top-k grad {name}")


def test_topk_with_all_entries_is_forward_kl():
    tokens, vocab = 6, 30
    hs0, ws0, _, ht, wt, _ = make_inputs((tokens,), 8, 12, vocab, torch.float64, bias=False)
    teacher = ht @ wt.t()
    logp, idx = teacher.log_softmax(-1).topk(vocab, dim=-1)
    a = leaves(hs0, ws0)
    b = leaves(hs0, ws0)
    la = fused_linear_topk_kd_loss(a[0], a[1], idx, logp)
    lb = fused_linear_kd_loss(b[0], b[1], ht, wt, divergence="fkl")
    la.backward()
    lb.backward()
    assert_close(la, lb, torch.float64, "loss")
    assert_close(a[0].grad, b[0].grad, torch.float64, "grad hidden")
    assert_close(a[1].grad, b[1].grad, torch.float64, "grad weight")


def test_topk_input_errors():
    with pytest.raises(InputError, match="int64"):
        fused_linear_topk_kd_loss(
            torch.randn(3, 4), torch.randn(9, 4), torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2)
        )
    with pytest.raises(InputError, match="top-k indices"):
        fused_linear_topk_kd_loss(
            torch.randn(3, 4), torch.randn(9, 4), torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 3)
        )
