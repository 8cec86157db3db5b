"""GPU check of the attention-relation Triton kernels: correctness against float64, then the benchmark.

1. Loss and student gradients of the compiled Triton kernels against the plain float64 formulas of
   tests/kernels/test_attention_kernel.py, with the same tolerance table (fp32 and bf16), on odd and larger
   shapes, with masks, causal, and a = b; each call runs under `torch.cuda.set_sync_debug_mode("error")`,
   so any host synchronisation inside forward or backward fails the case.
2. benchmarks/bench_attention_loss.py on the GPU (fp32 and bf16): peak memory above the inputs and median
   time, gkd vs plain torch.

Usage (on a GPU machine, from the repository root): python benchmarks/device/check_attention.py [--no-bench]
Exit code 1 when any correctness case fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

try:
    import gkd.kernels  # noqa: F401
except Exception as exc:  # another kernel family mid-edit must not block this check
    print(f"# gkd.kernels package import failed ({exc!r}); loading the attention module alone")
    pkg = types.ModuleType("gkd.kernels")
    pkg.__path__ = [str(ROOT / "gkd" / "kernels")]
    sys.modules["gkd.kernels"] = pkg

import test_attention_kernel as T  # noqa: E402

from gkd.kernels import _dispatch  # noqa: E402
from gkd.kernels.attention import relation_kl_loss, scores_mse_loss  # noqa: E402

FNS = {"kl": relation_kl_loss, "mse": scores_mse_loss}
REFS = {"kl": T.ref_relation_kl, "mse": T.ref_scores_mse}

# kind, dtype, (B, H, T, ds, dt), mask, causal, a is b
CASES = [
    ("kl", torch.float32, (2, 3, 37, 24, 24), "none", False, False),
    ("kl", torch.float32, (2, 3, 37, 24, 40), "left_pad", True, False),
    ("kl", torch.float32, (2, 3, 37, 24, 24), "right_pad", False, True),
    ("mse", torch.float32, (2, 3, 37, 24, 24), "left_pad", False, False),
    ("mse", torch.float32, (2, 3, 37, 8, 24), "right_pad", True, True),
    ("kl", torch.float32, (2, 12, 515, 64, 64), "right_pad", True, False),
    ("kl", torch.float32, (1, 8, 300, 128, 96), "left_pad", False, False),
    ("mse", torch.float32, (2, 12, 515, 64, 64), "none", True, False),
    ("kl", torch.bfloat16, (2, 3, 37, 24, 24), "left_pad", True, False),
    ("kl", torch.bfloat16, (2, 12, 515, 64, 64), "right_pad", False, False),
    ("kl", torch.bfloat16, (1, 8, 300, 128, 128), "none", True, True),
    ("mse", torch.bfloat16, (2, 12, 515, 64, 64), "left_pad", True, False),
]


def check_case(kind, dtype, shape, mask_kind, causal, same) -> str:
    bsz, heads, t, ds, dt = shape
    s_a, s_b, t_a, t_b = (x.cuda() for x in T.make_inputs(bsz, heads, t, ds, dt, dtype, seed=1))
    if same:
        s_b, t_b = s_a, t_a
    s_a.requires_grad_()
    s_b.requires_grad_()
    mask = T.make_mask(bsz, t, mask_kind)
    mask = None if mask is None else mask.cuda()
    upstream = 64.0 if dtype == torch.bfloat16 else 1.7
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = FNS[kind](s_a, s_b, t_a, t_b, s_scale=0.3, t_scale=0.2, mask=mask, causal=causal)
        (loss * upstream).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    r_a = s_a.detach().double().requires_grad_()
    r_b = r_a if same else s_b.detach().double().requires_grad_()
    want = REFS[kind](r_a, r_b, t_a, t_b, 0.3, 0.2, mask, causal)
    (want * upstream).backward()
    atol, rtol = T.TOLERANCES[dtype]
    try:
        T.assert_close("loss", loss.detach(), want.detach(), atol, rtol)
        T.assert_close("grad s_a", s_a.grad, r_a.grad, atol, rtol)
        if not same:
            T.assert_close("grad s_b", s_b.grad, r_b.grad, atol, rtol)
    except AssertionError as exc:
        return f"FAIL {exc}"
    err = max((s_a.grad.double() - r_a.grad).abs().max().item(), abs(loss.item() - want.item()))
    return f"ok   max abs err {err:.2e}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {_dispatch.triton.__version__}"
    )
    assert _dispatch.backend(torch.zeros(1, device="cuda")) == "triton"
    failures = 0
    for kind, dtype, shape, mask_kind, causal, same in CASES:
        start = time.perf_counter()
        try:
            verdict = check_case(kind, dtype, shape, mask_kind, causal, same)
        except Exception as exc:  # report and go on: one broken case must not hide the others
            verdict = f"FAIL {type(exc).__name__}: {exc}"
        failures += verdict.startswith("FAIL")
        name = f"{kind:<3} {str(dtype)[6:]:<8} {'x'.join(map(str, shape)):<16} {mask_kind:<9} "
        name += f"{'causal' if causal else 'full':<6} {'a=b' if same else '   '}"
        print(f"{name} {verdict}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"# correctness: {len(CASES) - failures}/{len(CASES)} passed")
    if not args.no_bench:
        bench = [sys.executable, str(ROOT / "benchmarks" / "bench_attention_loss.py"), "--device", "cuda"]
        for dtype in ("float32", "bfloat16"):
            cmd = [*bench, "--dtype", dtype, "--cases", "headline,causal,mse,long", "--reps", "10"]
            subprocess.run(cmd, check=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
