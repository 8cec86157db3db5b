"""kd_loss against the plain formulas in float64: loss and student gradient, shapes, dtypes, masks, dispatch.

The Triton kernels are checked under Triton's interpreter in a subprocess (``GKD_KERNELS=interpret`` must be
set before Triton is imported), on tiny shapes because the interpreter is slow; the tests named
``*interpreted*`` run only there. References and helpers: kd_reference.py.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from kd_reference import (
    DIVERGENCES,
    INTERPRETED,
    NoHostSync,
    assert_close,
    check_against_reference,
    reference,
)

from gkd.errors import InputError
from gkd.kernels import _dispatch, divergence, kd_loss

# ------------------------------------------------------------------------------------------------------------
# torch path (or whichever backend the device selects)
# ------------------------------------------------------------------------------------------------------------

SHAPES = [(37, 1001), (2, 3, 67), (1, 5)]


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("div", DIVERGENCES)
def test_matches_reference(div, shape, dtype):
    check_against_reference(shape, dtype, div, temperature=2.0, beta=0.3, alpha=0.2)


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("div", DIVERGENCES)
def test_masks_and_reductions(div, reduction):
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    check_against_reference((4, 9, 131), torch.float32, div, mask=mask, reduction=reduction, upstream=0.3)


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("div", DIVERGENCES)
def test_float64_is_exact(div):
    check_against_reference((7, 50), torch.float64, div, temperature=0.7, beta=0.6, alpha=0.4)


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("div", ["fkl", "jsd", "tvd", "skew_rkl"])
def test_vocabulary_blocks_and_row_chunks(div, monkeypatch):
    # Tiles of 1024 elements: vocabulary blocks of 16 (ragged last block of 301) and row chunks of 64.
    monkeypatch.setattr(divergence, "TILE_ELEMENTS", 1024)
    check_against_reference((70, 301), torch.float32, div, temperature=1.3)


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("div", DIVERGENCES)
def test_all_masked_gives_zero_and_no_nan(div):
    s = torch.randn(6, 40, requires_grad=True)
    t = torch.randn(6, 40)
    loss = kd_loss(s, t, divergence=div, mask=torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("other,beta", [("fkl", 0.0), ("rkl", 1.0)])
def test_jsd_endpoints_are_kl(other, beta):
    s0, t = torch.randn(5, 33), torch.randn(5, 33)
    grads = []
    losses = []
    for div, b in (("jsd", beta), (other, 0.5)):
        s = s0.clone().requires_grad_()
        loss = kd_loss(s, t, divergence=div, beta=b)
        loss.backward()
        losses.append(loss)
        grads.append(s.grad)
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.skipif(INTERPRETED, reason="interpreter runs only the tiny 'interpreted' cases")
@pytest.mark.parametrize("div", ["fkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "soft_ce"])
def test_teacher_with_minus_inf_logits(div):
    # A teacher that rules tokens out (-inf) must give finite losses and gradients equal to the formula's.
    s = torch.randn(4, 30, dtype=torch.float64)
    t = torch.randn(4, 30, dtype=torch.float64)
    t[:, :7] = -torch.inf
    s1 = s.clone().requires_grad_()
    loss = kd_loss(s1, t, divergence=div)
    loss.backward()
    s2 = s.clone().requires_grad_()
    ref = reference(s2, t, div)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(s1.grad).all()
    assert_close(loss, ref, torch.float64, "loss")
    assert_close(s1.grad, s2.grad, torch.float64, "grad")


def test_teacher_gets_no_gradient_and_no_grad_mode_matches():
    s = torch.randn(3, 4, 21, requires_grad=True)
    t = torch.randn(3, 4, 21, requires_grad=True)
    loss = kd_loss(s, t, divergence="jsd")
    loss.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        assert torch.equal(kd_loss(s, t, divergence="jsd"), loss.detach())


def test_second_backward_raises():
    s = torch.randn(3, 11, requires_grad=True)
    loss = kd_loss(s, torch.randn(3, 11), divergence="fkl")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"divergence": "kl"}, "unknown divergence"),
        ({"divergence": "fkl", "temperature": 0.0}, "temperature"),
        ({"divergence": "jsd", "beta": 1.5}, "beta"),
        ({"divergence": "skew_fkl", "alpha": -0.1}, "alpha"),
        ({"divergence": "fkl", "reduction": "avg"}, "reduction"),
        ({"divergence": "fkl", "mask": torch.ones(4)}, "bool"),
        ({"divergence": "fkl", "mask": torch.ones(5, dtype=torch.bool)}, "tokens"),
    ],
)
def test_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        kd_loss(torch.randn(4, 8), torch.randn(4, 8), **kwargs)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(InputError, match=r"\(4, 8\).*\(4, 9\)"):
        kd_loss(torch.randn(4, 8), torch.randn(4, 9), divergence="fkl")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter itself reads tensors on the host")
@pytest.mark.parametrize("div", DIVERGENCES)
def test_no_host_sync(div, monkeypatch):
    s = torch.randn(2, 5, 70, requires_grad=True)
    t = torch.randn(2, 5, 70)
    mask = torch.rand(2, 5) > 0.5
    with NoHostSync(monkeypatch):
        loss = kd_loss(s, t, divergence=div, mask=mask, temperature=1.5)
        loss.backward(torch.tensor(2.0))
    assert s.grad is not None


def test_no_host_sync_guard_can_fail(monkeypatch):
    with NoHostSync(monkeypatch), pytest.raises(AssertionError, match="host synchronisation"):
        torch.ones(1).item()


# ------------------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------------------


def test_dispatch_cpu_is_torch_and_missing_triton_warns_once(monkeypatch):
    if _dispatch.MODE == "auto":
        assert _dispatch.backend(torch.zeros(1)) == "torch"
    monkeypatch.setattr(_dispatch, "MODE", "auto")
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    monkeypatch.setattr(_dispatch, "_warned", False)
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with pytest.warns(RuntimeWarning, match="Triton is not importable"):
        assert _dispatch.backend(fake_cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.backend(fake_cuda) == "torch"
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    assert _dispatch.backend(fake_cuda) == "triton"
    monkeypatch.setattr(_dispatch, "MODE", "torch")
    assert _dispatch.backend(fake_cuda) == "torch"


def test_bad_kernel_mode_is_an_input_error(monkeypatch):
    monkeypatch.setattr(_dispatch, "MODE", "fast")
    with pytest.raises(InputError, match="GKD_KERNELS"):
        _dispatch.backend(torch.zeros(1))
