"""The Triton kernels of kd_loss and fused_linear_kd_loss, run by Triton's interpreter on CPU tensors.

`GKD_KERNELS=interpret` must be set before Triton is first imported, so the parent test runs this file again
in a child process with it set. There the `*interpreted*` tests run against the float64 references on tiny
shapes (the interpreter executes every block with numpy); in the parent they skip.
"""

from __future__ import annotations

import pytest
import torch
from kd_reference import DIVERGENCES, INTERPRETED, check_against_reference, check_fused, run_interpreted

from gkd.kernels import _dispatch, fused_linear, kd_loss


@pytest.mark.skipif(
    INTERPRETED or not _dispatch.HAS_TRITON, reason="needs Triton; runs the interpreter child"
)
def test_triton_kernels_under_interpreter():
    run_interpreted(__file__)


def _only_in_child() -> None:
    if not INTERPRETED:
        pytest.skip("runs in the GKD_KERNELS=interpret child process")
    assert _dispatch.backend(torch.zeros(1)) == "triton"


# Every divergence in fp32; bf16 loads and stores for a direct-gradient, a three-pass and the mse branch.
KD_CASES = [(div, torch.float32) for div in DIVERGENCES] + [
    (div, torch.bfloat16) for div in ("fkl", "jsd", "mse")
]


@pytest.mark.parametrize("div,dtype", KD_CASES)
def test_interpreted_kd_loss(div, dtype):
    _only_in_child()
    mask = torch.tensor([True, False, True, True, True])
    check_against_reference((5, 67), dtype, div, temperature=1.5, beta=0.3, alpha=0.2, mask=mask)


@pytest.mark.parametrize("div", ["fkl", "jsd", "mse"])
def test_interpreted_all_masked(div):
    _only_in_child()
    s = torch.randn(3, 20, requires_grad=True)
    loss = kd_loss(s, torch.randn(3, 20), divergence=div, mask=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize(
    "div,dtype",
    [("fkl", torch.bfloat16), ("jsd", torch.float32), ("skew_fkl", torch.bfloat16), ("mse", torch.float32)],
)
def test_interpreted_fused_linear(div, dtype, monkeypatch):
    _only_in_child()
    monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", 67 * 2)  # 2 tokens per chunk
    mask = torch.tensor([True, True, False, True, True])
    check_fused((5,), 8, 12, 67, dtype, div, mask=mask, temperature=1.5)
