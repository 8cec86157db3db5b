"""Benchmark: one GPT-2 layer's saved-for-backward bytes, measured by gkd's catalogue, against the Korthikanti
et al. (2022) formula s*b*h*(34 + 5*a*s/h) (fp16, with dropout; see shared/reference/anchors.md).

Measured: `gkd.planner.taps.build_catalogue` on the GPT-2 small preset in float16, training mode, at
micro-batch 1 and a few sequence lengths. "with dropout" keeps GPT-2's own dropout (0.1 on embeddings,
attention probabilities and residuals), which is what the formula assumes; "no dropout" sets all three to 0.
The eager path materialises the attention matrix as the formula assumes; the sdpa path is listed for
comparison (with attention dropout on, PyTorch's CPU kernels fall back to the unfused math path, which saves
even more). After the table, the saved tensors of one layer are listed in units of s*b*h and a*s^2*b bytes,
which shows where and why the measurement and the formula differ.

Usage: .venv/bin/python benchmarks/bench_korthikanti.py
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess

from gkd.models import resolve_model, spec_from_config
from gkd.planner.taps import build_catalogue
from gkd.planner.trace import trace_saved

SEQ_LENS = (128, 256, 512, 1024)


def korthikanti(s: int, b: int, h: int, a: int) -> float:
    return s * b * h * (34 + 5 * a * s / h)


def gpt2_fp16(dropout: bool):  # noqa: ANN201 - a ModelSpec
    base = resolve_model("gpt2")
    if dropout:
        return dataclasses.replace(base, dtype="float16")
    config = dict(base.hf_config)
    config.update(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return spec_from_config(config, name="gpt2-no-dropout", dtype="float16")


def main() -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"machine: {platform.node()} ({os.cpu_count()} cores), commit {commit or '?'}")
    with_dropout, without = gpt2_fp16(True), gpt2_fp16(False)
    h, a, b = with_dropout.hidden, with_dropout.heads, 1
    print(f"GPT-2 small, one layer: h={h}, a={a}, b={b}, float16, training mode; bytes in MiB")
    header = (
        f"{'s':>5} {'formula':>9} {'eager+drop':>10} {'ratio':>6} {'sdpa+drop':>9} {'eager':>8} {'ratio':>6} "
        f"{'sdpa':>8}"
    )
    print(header)
    print("-" * len(header))
    mib = 2**20
    for s in SEQ_LENS:
        formula = korthikanti(s, b, h, a)
        drop = build_catalogue(with_dropout, micro_batch=b, seq_len=s).layer_activations[0]
        plain = build_catalogue(without, micro_batch=b, seq_len=s).layer_activations[0]
        print(
            f"{s:>5} {formula / mib:>9.2f} {drop.saved('eager') / mib:>10.2f} "
            f"{drop.saved('eager') / formula:>6.3f} {drop.saved('sdpa') / mib:>9.2f} "
            f"{plain.saved('eager') / mib:>8.2f} {plain.saved('eager') / formula:>6.3f} "
            f"{plain.saved('sdpa') / mib:>8.2f}"
        )
    print(
        "ratio = measured / formula; eager = no dropout, eager path; "
        "sdpa = no dropout, fused CPU flash kernel"
    )

    s = SEQ_LENS[-1]
    trace = trace_saved(with_dropout, micro_batch=b, seq_len=s, attn_implementation="eager")
    layer = trace.traced_layers - 1
    tensors = sorted(
        (t for t in trace.tensors if t.owner == "layer" and t.layer == layer), key=lambda t: -t.nbytes
    )
    print(
        f"\nSaved storages of one layer at s={s}, eager, with dropout "
        "(sbh = s*b*h bytes, as2b = a*s^2*b bytes):"
    )
    sbh, as2b = s * b * h, a * s * s * b
    total_sbh = total_as2b = 0.0
    for t in tensors:
        quadratic = len(t.shape) >= 3 and t.shape[-1] == s and t.shape[-2] == s
        unit = f"{t.nbytes / as2b:5.2f} as2b" if quadratic else f"{t.nbytes / sbh:5.2f} sbh "
        if quadratic:
            total_as2b += t.nbytes / as2b
        else:
            total_sbh += t.nbytes / sbh
        print(f"  {str(t.shape):<22} {t.dtype:<8} {t.nbytes:>10,} B  {unit}")
    print(f"  total: {total_sbh:.2f} sbh + {total_as2b:.2f} as2b   (formula: 34 sbh + 5 as2b)")
    cuda_sbh, cuda_as2b = _split(
        trace_saved(with_dropout, micro_batch=b, seq_len=s, attn_implementation="eager", kernels="cuda"),
        s,
        sbh,
        as2b,
    )
    print(
        f"  with CUDA's fused dropout (the planner's trace, kernels='cuda'): {cuda_sbh:.2f} sbh + "
        f"{cuda_as2b:.2f} as2b"
    )
    print(
        f"\nWhy they differ (measured {total_sbh:.0f} sbh + {total_as2b:.0f} as2b, formula 34 sbh + 5 as2b):"
    )
    print(EXPLANATION)


def _split(trace: object, s: int, sbh: int, as2b: int) -> tuple[float, float]:
    """A layer's saved bytes in units of sbh (linear in s) and as2b (the s x s attention tensors)."""
    layer = trace.traced_layers - 1  # type: ignore[attr-defined]
    linear = quadratic = 0.0
    for t in trace.tensors:  # type: ignore[attr-defined]
        if t.owner != "layer" or t.layer != layer:
            continue
        if len(t.shape) >= 3 and t.shape[-1] == s and t.shape[-2] == s:
            quadratic += t.nbytes / as2b
        else:
            linear += t.nbytes / sbh
    return linear, quadratic


EXPLANATION = """\
- Dropout masks. The formula stores each mask in 1 byte per element (CUDA's fused native_dropout
  keeps a bool mask). On the CPU, PyTorch's dropout multiplies by a noise tensor of the input's
  dtype and keeps that, 2 bytes per element in fp16: attention probabilities +1 as2b (6 instead
  of 5), and the two residual-branch masks +1 sbh each. The planner traces with CUDA's fused
  dropout (the line above this explanation), which takes both back. Without dropout the masks and
  the dropped-out copy of the probabilities vanish: 2 as2b (the softmax output only).
- MLP. The formula has 19 sbh (input 2, GeLU input 8, GeLU output 8, mask 1). GPT-2's gelu_new is
  the tanh approximation written as separate elementwise ops, and autograd keeps three more
  4h-wide intermediates (+24 sbh); with the 2-byte mask, 44 sbh. A fused GeLU would match.
- Attention, linear part: 11 sbh in the formula (QKV input 2, Q and K 4, V 2, out-projection
  input 2, mask 1); measured 12: Q, K, V are views of one fused c_attn output (6 sbh, stored
  once), plus the 2-byte mask. LayerNorm inputs: 4 sbh in both (PyTorch also keeps a per-token
  mean and rstd, negligible).
- Total excess: +26 sbh (24 GeLU, 2 masks) and +1 as2b (mask width): for this implementation the
  formula is a lower bound, closer at long sequences where the as2b term dominates. The fused
  sdpa kernel (without attention dropout) keeps its output and a float32 log-sum-exp, and no
  T x T tensor at all."""


if __name__ == "__main__":
    main()
