"""cross_entropy_loss: equals F.cross_entropy (value and gradient, float64, across chunks, with ignored rows)
and keeps only a gradient in the logits' dtype for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gkd.kernels.fused_linear as fused_linear
from gkd.errors import InputError
from gkd.kernels import cross_entropy_loss


@pytest.mark.parametrize("chunk_rows", [3, 8, 1000])
def test_equals_torch_cross_entropy(monkeypatch: pytest.MonkeyPatch, chunk_rows: int) -> None:
    monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", 50 * chunk_rows)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 50, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=gen)
    t[::5] = -100
    ours = cross_entropy_loss(x, t)
    (g_ours,) = torch.autograd.grad(ours * 3.0, x)
    ref = F.cross_entropy(x, t, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3.0, x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-15)


def test_every_row_ignored_is_zero_with_zero_gradient() -> None:
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    loss = cross_entropy_loss(x, torch.full((4,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_keeps_only_a_gradient_in_the_logits_dtype() -> None:
    """What autograd holds for the backward: one (N, V) bf16 tensor, not a float32 log-softmax."""
    x = torch.randn(64, 300, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = cross_entropy_loss(x, t)
    assert [(tuple(s.shape), s.dtype) for s in saved] == [((64, 300), torch.bfloat16)]
    loss.backward()
    ref = x.detach().float().requires_grad_()
    F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(
        x.grad.float(), ref.grad, rtol=2e-2, atol=1e-4
    )  # bf16 rounding of the gradient


def test_shapes_are_checked() -> None:
    with pytest.raises(InputError, match=r"\(N, V\) logits"):
        cross_entropy_loss(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
