"""Plain float64 references and helpers shared by the logit-kernel tests (test_divergence, test_fused_linear).

The references are the textbook formulas on materialised logits, differentiated by autograd; they share no
code with gkd.kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkd.kernels import _dispatch, divergence, fused_linear_kd_loss, kd_loss

DIVERGENCES = divergence.DIVERGENCES
# Tolerances relative to the float64 reference (Liger-Kernel's table).
TOL = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-3, 5e-2), torch.float64: (1e-10, 1e-8)}
INTERPRETED = _dispatch.MODE == "interpret"


def _xlogy_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) with 0 log 0 = 0."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


def reference_rows(s: torch.Tensor, t: torch.Tensor, div: str, temperature: float, beta: float, alpha: float):
    s = s.double() / temperature
    t = t.double() / temperature
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    q, p = lq.exp(), lp.exp()
    if div == "fkl" or (div == "jsd" and beta == 0.0):
        return _xlogy_terms(p, lp, lq).sum(-1)
    if div == "rkl" or (div == "jsd" and beta == 1.0):
        return _xlogy_terms(q, lq, lp).sum(-1)
    if div == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        return beta * _xlogy_terms(p, lp, lm).sum(-1) + (1 - beta) * _xlogy_terms(q, lq, lm).sum(-1)
    if div == "skew_fkl":
        return _xlogy_terms(p, lp, (alpha * p + (1 - alpha) * q).log()).sum(-1)
    if div == "skew_rkl":
        return _xlogy_terms(q, lq, ((1 - alpha) * p + alpha * q).log()).sum(-1)
    if div == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if div == "soft_ce":
        return -(torch.where(p > 0, p * lq, torch.zeros_like(p))).sum(-1)
    assert div == "mse"
    return ((s - t) ** 2).mean(-1)


def reference(s, t, div, *, temperature=1.0, beta=0.5, alpha=0.1, mask=None, reduction="mean"):
    vocab = s.shape[-1]
    rows = reference_rows(s.reshape(-1, vocab), t.reshape(-1, vocab), div, temperature, beta, alpha)
    counted = torch.ones_like(rows) if mask is None else mask.reshape(-1).double()
    rows = torch.where(counted > 0, rows, torch.zeros_like(rows)) * counted
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    total = rows.sum()
    return total / counted.sum().clamp(min=1) if reduction == "mean" else total


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """allclose with the dtype's tolerance; on failure, say where and by how much."""
    atol, rtol = TOL[dtype]
    a, e = actual.double(), expected.double()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        err = (a - e).abs()
        idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if a.dim() else ()
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} mismatched (atol {atol}, rtol {rtol}); first at {idx}: "
            f"{a[idx].item()} vs {e[idx].item()}; worst at {worst}: |diff| {err.max().item():.3g}"
        )


def check_against_reference(
    shape,
    dtype,
    div,
    *,
    temperature=1.0,
    beta=0.5,
    alpha=0.1,
    mask=None,
    reduction="mean",
    upstream=1.7,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    s0 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t0 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    s = s0.clone().requires_grad_()
    loss = kd_loss(
        s, t0, divergence=div, temperature=temperature, beta=beta, alpha=alpha, mask=mask, reduction=reduction
    )
    up = torch.full(loss.shape, upstream, dtype=loss.dtype)
    loss.backward(up)
    s_ref = s0.double().requires_grad_()
    ref = reference(
        s_ref,
        t0.double(),
        div,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        mask=mask,
        reduction=reduction,
    )
    ref.backward(up.double())
    assert loss.shape == ref.shape
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    assert s.grad.dtype == dtype
    assert_close(loss, ref, dtype if dtype != torch.bfloat16 else torch.float32, f"{div} loss")
    assert_close(s.grad, s_ref.grad, dtype, f"{div} student grad")


class NoHostSync:
    """Patch the Tensor methods that read device values on the host so that any call raises."""

    NAMES = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def __enter__(self) -> None:
        def forbid(name):
            def raiser(*args, **kwargs):
                raise AssertionError(f"host synchronisation: Tensor.{name} called")

            return raiser

        for name in self.NAMES:
            self.monkeypatch.setattr(torch.Tensor, name, forbid(name))

    def __exit__(self, *exc) -> None:
        self.monkeypatch.undo()


def run_interpreted(test_file: str) -> None:
    """Run `test_file`'s `interpreted` tests in a fresh process with GKD_KERNELS=interpret."""
    env = dict(os.environ, GKD_KERNELS="interpret")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::RuntimeWarning",
            "-k",
            "interpreted",
            test_file,
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def make_inputs(lead, hs_dim, ht_dim, vocab, dtype, *, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    hs = rnd(*lead, hs_dim)
    ws = rnd(vocab, hs_dim, scale=hs_dim**-0.5 * 2)
    ht = rnd(*lead, ht_dim)
    wt = rnd(vocab, ht_dim, scale=ht_dim**-0.5 * 2)
    bs = rnd(vocab) if bias else None
    bt = rnd(vocab) if bias else None
    return hs, ws, bs, ht, wt, bt


def leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_() for x in tensors]


def check_fused(
    lead, hs_dim, ht_dim, vocab, dtype, div, *, bias=True, mask=None, temperature=2.0, upstream=1.7
):
    hs0, ws0, bs0, ht, wt, bt = make_inputs(lead, hs_dim, ht_dim, vocab, dtype, bias=bias)
    hs, ws, bs = leaves(hs0, ws0, bs0)
    loss = fused_linear_kd_loss(
        hs,
        ws,
        ht,
        wt,
        divergence=div,
        temperature=temperature,
        mask=mask,
        student_bias=bs,
        teacher_bias=bt,
        beta=0.3,
        alpha=0.2,
    )
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))

    rh, rw, rb = leaves(*(None if x is None else x.double() for x in (hs0, ws0, bs0)))
    s = rh @ rw.t() + (rb if rb is not None else 0)
    t = ht.double() @ wt.double().t() + (bt.double() if bt is not None else 0)
    ref = reference(s, t, div, temperature=temperature, beta=0.3, alpha=0.2, mask=mask)
    ref.backward(torch.tensor(upstream, dtype=torch.float64))

    # bf16: the logits themselves are bf16 GEMM outputs, so the loss carries bf16 rounding (bf16 tolerance).
    assert_close(loss, ref, dtype, f"{div} loss")
    for name, got, want in (("hidden", hs, rh), ("weight", ws, rw), ("bias", bs, rb)):
        if got is None:
            continue
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad, dtype, f"{div} grad {name}")
