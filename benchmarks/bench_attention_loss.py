"""Attention-relation losses: gkd's blocked kernels vs plain torch, forward + backward, side by side.

Claim (issue 4): at T=2048, 12 heads, head dim 64, batch 1, fp32, the relation-KL loss's peak memory above
the inputs (everything the call allocates, its output and the student gradients included) is at most 1/4 of
plain torch's, which materialises both (B, H, T, T) score matrices, their log-softmaxes and the KL terms.

Memory: on CPU, `torch.distributed._tools.mem_tracker.MemTracker` counts the bytes of every tensor storage
created inside the measured call that is still alive (a dispatch-mode tracker), so the inputs, built before,
are excluded; on CUDA, `torch.cuda.max_memory_allocated` above the allocation before the call. Memory is
measured in a separate, untimed run; time is the median (and min..max) of several timed runs after a warm-up.

Usage: python benchmarks/bench_attention_loss.py [--reps 3] [--cases headline,causal,mse,small]
                                                 [--record results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gkd.kernels import relation_kl_loss, scores_mse_loss

MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    kind: str  # "kl" (MiniLM relation KL) or "mse" (TinyBERT score MSE)
    batch: int
    heads: int
    tokens: int
    head_dim: int
    causal: bool = False
    padded: bool = False  # the last quarter of the last sequence is padding


CASES = {
    "headline": Case(name="headline", kind="kl", batch=1, heads=12, tokens=2048, head_dim=64),
    "causal": Case(
        name="causal", kind="kl", batch=1, heads=12, tokens=2048, head_dim=64, causal=True, padded=True
    ),
    "mse": Case(name="mse", kind="mse", batch=1, heads=12, tokens=2048, head_dim=64),
    "small": Case(name="small", kind="kl", batch=2, heads=12, tokens=512, head_dim=64),
    # GPU only: plain torch needs ~25 GB here
    "long": Case(name="long", kind="kl", batch=1, heads=16, tokens=8192, head_dim=128, causal=True),
}


# ----------------------------------------------------------------------------------------------------
# Providers: each takes the inputs and returns the loss (the harness runs backward).


def _allowed(case: Case, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    allowed = None if mask is None else mask[:, None, None, :]
    if case.causal:
        tri = torch.ones(case.tokens, case.tokens, dtype=torch.bool, device=device).tril()
        allowed = tri if allowed is None else allowed & tri
    return allowed


def plain_torch(case: Case, s_a, s_b, t_a, t_b, s_scale, t_scale, mask):
    """The straightforward implementation: both score matrices, log-softmax, KL (or MSE), all materialised."""
    s = s_a @ s_b.transpose(-1, -2) * s_scale
    t = t_a @ t_b.transpose(-1, -2) * t_scale
    allowed = _allowed(case, mask, s_a.device)
    rows = (
        torch.ones(case.batch, 1, case.tokens, device=s.device) if mask is None else mask[:, None, :].float()
    )
    if case.kind == "mse":
        weight = rows[..., None] if allowed is None else rows[..., None] * allowed  # (B, 1, T, 1 or T)
        pairs = weight.expand(case.batch, 1, case.tokens, case.tokens).sum() * case.heads
        return ((s - t).square() * weight).sum() / pairs
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
        t = t.masked_fill(~allowed, -math.inf)
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    terms = log_p_t.exp() * (log_p_t - log_p_s)
    if allowed is not None:
        terms = torch.where(allowed, terms, 0.0)
    kl = terms.sum(-1) * rows
    return kl.sum() / (rows.sum() * case.heads)


def gkd_kernel(case: Case, s_a, s_b, t_a, t_b, s_scale, t_scale, mask):
    fn = relation_kl_loss if case.kind == "kl" else scores_mse_loss
    return fn(s_a, s_b, t_a, t_b, s_scale=s_scale, t_scale=t_scale, mask=mask, causal=case.causal)


PROVIDERS: dict[str, Callable] = {"gkd": gkd_kernel, "torch": plain_torch}


# ----------------------------------------------------------------------------------------------------
# Harness.


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.heads, case.tokens, case.head_dim)
    s_a, s_b, t_a, t_b = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    s_a.requires_grad_()
    s_b.requires_grad_()
    mask = None
    if case.padded:
        mask = torch.ones(case.batch, case.tokens, dtype=torch.bool, device=device)
        mask[-1, case.tokens - case.tokens // 4 :] = False
    scale = 1.0 / math.sqrt(case.head_dim)
    return (s_a, s_b, t_a, t_b, scale, scale, mask)


def step(provider: Callable, case: Case, inputs) -> torch.Tensor:
    s_a, s_b = inputs[0], inputs[1]
    s_a.grad = None
    s_b.grad = None
    loss = provider(case, *inputs)
    loss.backward()
    return loss.detach()


def peak_bytes_above_inputs(provider: Callable, case: Case, inputs) -> int:
    """Peak bytes the call allocates (outputs and gradients included), inputs excluded."""
    inputs[0].grad = None
    inputs[1].grad = None
    device = inputs[0].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(provider, case, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        step(provider, case, inputs)
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])


def median_seconds(provider: Callable, case: Case, inputs, reps: int) -> tuple[float, float, float]:
    step(provider, case, inputs)  # warm-up (and Triton compilation on a GPU)
    times = []
    for _ in range(reps):
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(provider, case, inputs)
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default="headline,causal,mse,small", help=f"comma list of {', '.join(CASES)}"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--record", default=None, help="append one JSON row per measurement to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    machine = (
        f"{platform.machine()} {platform.processor() or platform.node()}, torch {torch.__version__}, "
        + (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{torch.get_num_threads()} CPU threads"
        )
    )
    print(f"# attention-relation loss, forward + backward, {args.dtype}, {machine}, commit {_commit()}")
    header = f"{'case':<9} {'loss':<4} {'B':>2} {'H':>3} {'T':>5} {'d':>3} {'mask':<11} {'provider':<6} "
    header += f"{'peak MiB':>9} {'median ms':>10} {'min..max ms':>17} {'loss value':>11}"
    print(header)
    rows = []
    for name in args.cases.split(","):
        case = CASES[name]
        inputs = make_inputs(case, device, dtype)
        results = {}
        for provider_name, provider in PROVIDERS.items():
            value = step(provider, case, inputs).item()
            peak = peak_bytes_above_inputs(provider, case, inputs)
            med, lo, hi = median_seconds(provider, case, inputs, args.reps)
            results[provider_name] = (peak, med)
            mask_desc = ("causal" if case.causal else "full") + ("+pad" if case.padded else "")
            print(
                f"{case.name:<9} {case.kind:<4} {case.batch:>2} {case.heads:>3} {case.tokens:>5} "
                f"{case.head_dim:>3} {mask_desc:<11} {provider_name:<6} {peak / MIB:>9.1f} "
                f"{med * 1e3:>10.1f} {f'{lo * 1e3:.1f}..{hi * 1e3:.1f}':>17} {value:>11.6f}"
            )
            rows.append(
                {
                    "bench": "attention_loss",
                    "case": case.name,
                    "provider": provider_name,
                    "dtype": args.dtype,
                    "peak_bytes": peak,
                    "median_s": med,
                    "machine": machine,
                    "commit": _commit(),
                }
            )
        (g_peak, g_time), (t_peak, t_time) = results["gkd"], results["torch"]
        print(
            f"{'':<9} ratio gkd/torch: peak memory {g_peak / t_peak:.3f} (1/{t_peak / max(g_peak, 1):.1f}), "
            f"time {g_time / t_time:.2f}x"
        )
    if args.record:
        with open(args.record, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
