"""Hidden-state losses against the plain formulas in float64: loss and the gradients of every input."""

from __future__ import annotations

import pytest
import torch

from gkd.errors import InputError
from gkd.kernels import hidden_loss

# (atol, rtol) against the float64 reference, computed from the same (rounded) inputs.
TOLERANCES = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-3, 5e-2)}
KINDS = ["mse", "cosine", "normalized_mse"]


def reference(kind, student, teacher, projection=None, bias=None, mask=None):
    """Plain float64 formulas (see gkd/kernels/hidden.py for the definitions)."""
    s = student.double()
    if projection is not None:
        s = s @ projection.double().T
        if bias is not None:
            s = s + bias.double()
    t = teacher.double()
    if kind == "mse":
        per_pos = ((s - t) ** 2).sum(-1) / t.shape[-1]
    elif kind == "cosine":
        per_pos = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    else:
        per_pos = ((s / s.norm(dim=-1, keepdim=True) - t / t.norm(dim=-1, keepdim=True)) ** 2).sum(-1)
    if mask is None:
        return per_pos.mean()
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


def assert_close(name, got, want, atol, rtol):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    bad = (got - want).abs() > atol + rtol * want.abs()
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched, first at {list(idx)}: "
            f"got {got[idx].item():.6g} want {want[idx].item():.6g}; "
            f"max abs err {(got - want).abs().max().item():.3g} (atol {atol}, rtol {rtol})"
        )


# (leading dims, Ds, Dt, projection?, bias?)
SHAPES = [
    ((2, 37), 24, 24, False, False),
    ((2, 37), 24, 40, True, False),
    ((2, 37), 24, 40, True, True),
    ((37,), 24, 24, True, True),  # a square projection is allowed too
    ((2, 3, 5), 7, 11, True, True),
]


def run_case(kind, dtype, shape, with_mask, upstream, seed=0):
    lead, ds, dt, proj, bias = shape
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*lead, ds, generator=gen).to(dtype).requires_grad_()
    teacher = torch.randn(*lead, dt, generator=gen).to(dtype)
    weight = (torch.randn(dt, ds, generator=gen) / ds**0.5).to(dtype).requires_grad_() if proj else None
    b = (0.1 * torch.randn(dt, generator=gen)).to(dtype).requires_grad_() if bias else None
    mask = (torch.rand(*lead, generator=gen) > 0.3) if with_mask else None
    loss = hidden_loss(student, teacher, kind=kind, projection=weight, projection_bias=b, mask=mask)
    (loss * upstream).backward()
    named = [(n, x) for n, x in (("student", student), ("projection", weight), ("bias", b)) if x is not None]
    leaves = [x for _, x in named]
    refs = [x.detach().double().requires_grad_() for x in leaves]
    r_s = refs[0]
    r_w = refs[1] if proj else None
    r_b = refs[2] if bias else None
    want = reference(kind, r_s, teacher, r_w, r_b, mask)
    (want * upstream).backward()
    atol, rtol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss.detach(), want.detach(), atol, rtol)
    for (name, x), r in zip(named, refs, strict=True):
        assert x.grad.dtype == dtype, name
        assert_close(f"grad {name}", x.grad, r.grad, atol, rtol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}to{s[2]}-p{int(s[3])}b{int(s[4])}")
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_matches_reference_fp32(kind, shape, with_mask):
    run_case(kind, torch.float32, shape, with_mask, upstream=1.7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=["plain", "projected"])
def test_matches_reference_bf16(kind, shape):
    # upstream 300 lifts the gradients (~1e-4 at upstream 1) well above bf16's atol, so the check has teeth
    run_case(kind, torch.bfloat16, shape, with_mask=True, upstream=300.0)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_gives_zero_and_finite_gradients(kind):
    student = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    loss = hidden_loss(student, torch.randn(2, 9, 12), kind=kind, projection=weight, mask=mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_vectors_stay_finite(kind):
    student = torch.zeros(3, 8, requires_grad=True)
    loss = hidden_loss(student, torch.zeros(3, 8), kind=kind)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_normalized_mse_is_twice_cosine_and_scale_free():
    s, t = torch.randn(4, 16), torch.randn(4, 16)
    nmse = hidden_loss(s, t, kind="normalized_mse")
    assert torch.allclose(nmse, 2 * hidden_loss(s, t, kind="cosine"), atol=1e-6)
    assert torch.allclose(nmse, hidden_loss(5 * s, 0.1 * t, kind="normalized_mse"), atol=1e-6)


def test_teacher_gets_no_gradient():
    s = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 8, requires_grad=True)
    hidden_loss(s, t, kind="mse").backward()
    assert s.grad is not None and t.grad is None


def test_no_host_synchronisation(monkeypatch):
    student = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    mask = torch.rand(2, 9) > 0.5
    with monkeypatch.context() as patch:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__"):
            patch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} called"))
        for kind in KINDS:
            hidden_loss(student, torch.randn(2, 9, 12), kind=kind, projection=weight, mask=mask).backward()
    assert torch.isfinite(student.grad).all()


def test_input_errors():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    with pytest.raises(InputError, match="pass a projection of shape \\(12, 8\\)"):
        hidden_loss(s, t)
    with pytest.raises(InputError, match="must be \\(teacher width, student width\\)"):
        hidden_loss(s, t, projection=torch.randn(8, 12))
    with pytest.raises(InputError, match="projection_bias has shape"):
        hidden_loss(s, t, projection=torch.randn(12, 8), projection_bias=torch.randn(8))
    with pytest.raises(InputError, match="unknown kind"):
        hidden_loss(s, s, kind="l1")
    with pytest.raises(InputError, match="leading"):
        hidden_loss(s, s[:, :4])
    with pytest.raises(InputError, match="mask must be a bool"):
        hidden_loss(s, s, mask=torch.ones(2, 5))
    with pytest.raises(InputError, match="without projection"):
        hidden_loss(s, s, projection_bias=torch.randn(8))
