"""GPU check of the logit kernels: correctness on the device, then memory and time vs torch and Liger-Kernel.

Part 1 (correctness): every `kd_loss` divergence (fp32 and bf16) and `fused_linear_kd_loss` / the top-k
variant on small odd shapes, against the plain formula in float64 on the same device (loss and student
gradients, the tolerance table of the tests: fp32 atol 1e-5 / rtol 5e-4, bf16 atol 5e-3 / rtol 5e-2).

Part 2 (the issue's GPU claim): bf16, 8192 tokens, student hidden 2048, teacher hidden 4096, V = 128256,
forward + backward of the fused-linear loss (fkl and jsd), providers side by side:
* ``torch``: both logits materialised and upcast to fp32, log_softmax, the divergence, autograd (the baseline
  of Liger-Kernel's own benchmark);
* ``gkd``: `gkd.kernels.fused_linear_kd_loss` (Triton row kernel between chunked matmuls);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (jsd_beta = 0 is forward KL), when importable.
Peak memory is ``torch.cuda.max_memory_allocated`` minus the allocation before the call (the inputs); time is
the median of timed runs after the memory run (which is also the warm-up and Triton compilation). Claim:
gkd's peak no higher than Liger's, gkd's time at most 0.8x torch's.

Prints the tables and keeps a markdown copy in $OUT/gpu_kernels.md when OUT is set. The whole script runs in
well under 4 minutes on an H100/H200.

``--dry-run``: tiny shapes on the CPU, with the Triton kernels under the interpreter
(``GKD_KERNELS=interpret``) when Triton is installed, so that the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument(
    "--dry-run", action="store_true", help="tiny shapes on the CPU (interpreted Triton kernels)"
)
ARGS.add_argument("--reps", type=int, default=5, help="timed runs per provider in part 2")
ARGS.add_argument("--skip-correctness", action="store_true")
ARGS.add_argument("--skip-table", action="store_true")
OPTS = ARGS.parse_args()
if OPTS.dry_run and importlib.util.find_spec("triton") is not None:
    # Must precede the first import of triton (gkd.kernels._dispatch); an explicit GKD_KERNELS wins.
    os.environ.setdefault("GKD_KERNELS", "interpret")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the repository's gkd

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gkd.kernels import _dispatch, fused_linear, fused_linear_kd_loss, fused_linear_topk_kd_loss, kd_loss  # noqa: E402

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "soft_ce", "mse")
TOL = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-3, 5e-2)}
MIB = 1 << 20
LINES: list[str] = []


def say(line: str = "") -> None:
    """Print a line and keep the markdown copy in $OUT up to date (a run cut short still leaves its lines)."""
    print(line, flush=True)
    LINES.append(line)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_kernels.md").write_text("\n".join(LINES) + "\n")


# ------------------------------------------------------------------------------------------------------------
# Plain float64 references
# ------------------------------------------------------------------------------------------------------------


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


def plain_rows(s: torch.Tensor, t: torch.Tensor, div: str, temp: float, beta: float, alpha: float):
    s, t = s.double() / temp, t.double() / temp
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    q, p = lq.exp(), lp.exp()
    if div == "fkl":
        return _kl_terms(p, lp, lq).sum(-1)
    if div == "rkl":
        return _kl_terms(q, lq, lp).sum(-1)
    if div == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        return beta * _kl_terms(p, lp, lm).sum(-1) + (1 - beta) * _kl_terms(q, lq, lm).sum(-1)
    if div == "skew_fkl":
        return _kl_terms(p, lp, (alpha * p + (1 - alpha) * q).log()).sum(-1)
    if div == "skew_rkl":
        return _kl_terms(q, lq, ((1 - alpha) * p + alpha * q).log()).sum(-1)
    if div == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if div == "soft_ce":
        return -torch.where(p > 0, p * lq, torch.zeros_like(p)).sum(-1)
    return ((s - t) ** 2).mean(-1)


def plain_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.double()
    return (rows * m).sum() / m.sum().clamp(min=1)


def worst(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(all within tolerance, largest |diff| / (atol + rtol |expected|))."""
    atol, rtol = TOL[dtype]
    ratio = ((actual.double() - expected.double()).abs() / (atol + rtol * expected.double().abs())).max()
    return bool(ratio <= 1.0), float(ratio)


# ------------------------------------------------------------------------------------------------------------
# Part 1: correctness
# ------------------------------------------------------------------------------------------------------------


def check_kd_loss(device: torch.device, tokens: int, vocab: int) -> list[bool]:
    oks = []
    gen = torch.Generator(device=device).manual_seed(0)
    mask = torch.rand(tokens, generator=gen, device=device) > 0.2
    for div in DIVERGENCES:
        for dtype in (torch.float32, torch.bfloat16):
            s0 = (torch.randn(tokens, vocab, generator=gen, device=device) * 2).to(dtype)
            t0 = (torch.randn(tokens, vocab, generator=gen, device=device) * 2).to(dtype)
            s = s0.clone().requires_grad_()
            loss = kd_loss(s, t0, divergence=div, temperature=1.5, beta=0.3, alpha=0.2, mask=mask)
            loss.backward(torch.tensor(1.7, device=device))
            r = s0.double().requires_grad_()
            ref = plain_mean(plain_rows(r, t0, div, 1.5, 0.3, 0.2), mask)
            ref.backward(torch.tensor(1.7, device=device, dtype=torch.float64))
            ok_l, el = worst(loss.detach(), ref.detach(), torch.float32)
            ok_g, eg = worst(s.grad, r.grad, dtype)
            oks.append(ok_l and ok_g)
            say(
                f"| kd_loss | {div} | {str(dtype)[6:]} | {tokens}x{vocab} | {el:.3f} | {eg:.3f} | "
                f"{'ok' if ok_l and ok_g else 'FAIL'} |"
            )
    return oks


def check_fused(device: torch.device, tokens: int, vocab: int, chunk_rows: int) -> list[bool]:
    oks = []
    gen = torch.Generator(device=device).manual_seed(1)
    budget = chunk_rows * vocab  # force several chunks on these small shapes
    fused_linear.CHUNK_ELEMENTS = fused_linear.CHUNK_ELEMENTS_CUDA = budget
    mask = torch.rand(tokens, generator=gen, device=device) > 0.2
    for div in ("fkl", "jsd", "tvd", "mse", "topk"):
        for dtype in (torch.float32, torch.bfloat16):
            hs0 = torch.randn(tokens, 24, generator=gen, device=device).to(dtype)
            ws0 = (torch.randn(vocab, 24, generator=gen, device=device) * 0.4).to(dtype)
            ht = torch.randn(tokens, 40, generator=gen, device=device).to(dtype)
            wt = (torch.randn(vocab, 40, generator=gen, device=device) * 0.3).to(dtype)
            hs, ws = hs0.clone().requires_grad_(), ws0.clone().requires_grad_()
            rh, rw = hs0.double().requires_grad_(), ws0.double().requires_grad_()
            if div == "topk":
                logp, idx = (ht.double() @ wt.double().t()).log_softmax(-1).topk(9, dim=-1)
                logp = logp.to(dtype)
                loss = fused_linear_topk_kd_loss(hs, ws, idx, logp, temperature=1.5, mask=mask)
                lq = ((rh @ rw.t()) / 1.5).log_softmax(-1)
                lq_k, p_k = lq.gather(-1, idx), logp.double().exp()
                tail_p = (1 - p_k.sum(-1)).clamp(min=0)
                tail_q = 1 - lq_k.exp().sum(-1)
                rows = _kl_terms(p_k, p_k.log(), lq_k).sum(-1) + _kl_terms(tail_p, tail_p.log(), tail_q.log())
            else:
                loss = fused_linear_kd_loss(
                    hs, ws, ht, wt, divergence=div, temperature=1.5, mask=mask, beta=0.3
                )
                rows = plain_rows(rh @ rw.t(), ht.double() @ wt.double().t(), div, 1.5, 0.3, 0.1)
            loss.backward(torch.tensor(0.7, device=device))
            ref = plain_mean(rows, mask)
            ref.backward(torch.tensor(0.7, device=device, dtype=torch.float64))
            ok_l, el = worst(loss.detach(), ref.detach(), dtype)
            ok_h, eh = worst(hs.grad, rh.grad, dtype)
            ok_w, ew = worst(ws.grad, rw.grad, dtype)
            ok = ok_l and ok_h and ok_w
            oks.append(ok)
            name = "fused_linear_topk" if div == "topk" else "fused_linear"
            say(
                f"| {name} | {'fkl' if div == 'topk' else div} | {str(dtype)[6:]} | {tokens}x{vocab} | "
                f"{el:.3f} | {max(eh, ew):.3f} | {'ok' if ok else 'FAIL'} |"
            )
    fused_linear.CHUNK_ELEMENTS, fused_linear.CHUNK_ELEMENTS_CUDA = 1 << 25, 1 << 27
    return oks


# ------------------------------------------------------------------------------------------------------------
# Part 2: memory and time
# ------------------------------------------------------------------------------------------------------------


def torch_provider(div: str) -> Callable:
    def run(hs, ws, ht, wt):
        log_q = F.log_softmax((hs @ ws.t()).float(), dim=-1)
        with torch.no_grad():
            log_p = F.log_softmax((ht @ wt.t()).float(), dim=-1)
        if div == "fkl":
            return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / hs.shape[0]
        log_m = torch.logaddexp(log_p + torch.log(torch.tensor(0.5)), log_q + torch.log(torch.tensor(0.5)))
        kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="sum")
        kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="sum")
        return (0.5 * kl_p + 0.5 * kl_q) / hs.shape[0]

    return run


def gkd_provider(div: str) -> Callable:
    return lambda hs, ws, ht, wt: fused_linear_kd_loss(hs, ws, ht, wt, divergence=div, beta=0.5)


def liger_provider(div: str) -> Callable | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    module = LigerFusedLinearJSD(jsd_beta=0.0 if div == "fkl" else 0.5, temperature=1.0)
    return lambda hs, ws, ht, wt: module(hs, ws, ht, wt, None)  # shift_labels=None: every token counts


def measure(fn: Callable, inputs, reps: int) -> tuple[float | None, float | None, float | None, str]:
    """(peak bytes above inputs, median s, loss value, note); OOM is reported, not raised."""
    hs, ws = inputs[0], inputs[1]
    cuda = hs.is_cuda

    def step():
        hs.grad = None
        ws.grad = None
        loss = fn(*inputs)
        loss.backward()
        return loss.detach()

    hs.grad = None  # a previous provider's gradients must not count as inputs
    ws.grad = None
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            tracker = MemTracker()
            tracker.track_external(*inputs)
            with tracker:
                base = tracker.get_tracker_snapshot("current")[hs.device]["Total"]
                loss = step()
            peak = tracker.get_tracker_snapshot("peak")[hs.device]["Total"] - base
        value = float(loss)
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(peak), statistics.median(times), value, ""
    except Exception as err:  # noqa: BLE001 - a provider that fails (OOM, API change) is reported, not fatal
        hs.grad = None
        ws.grad = None
        if cuda:
            torch.cuda.empty_cache()
        note = "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else f"error: {err}"[:200]
        return None, None, None, note.replace("|", "/").replace("\n", " ")


def table(device: torch.device, tokens: int, hs_dim: int, ht_dim: int, vocab: int, reps: int) -> list[bool]:
    gen = torch.Generator(device=device).manual_seed(2)
    dtype = torch.bfloat16
    hs = torch.randn(tokens, hs_dim, generator=gen, device=device).to(dtype).requires_grad_()
    ws = (
        (torch.randn(vocab, hs_dim, generator=gen, device=device) * 2 / hs_dim**0.5)
        .to(dtype)
        .requires_grad_()
    )
    ht = torch.randn(tokens, ht_dim, generator=gen, device=device).to(dtype)
    wt = (torch.randn(vocab, ht_dim, generator=gen, device=device) * 2 / ht_dim**0.5).to(dtype)
    inputs = (hs, ws, ht, wt)
    say()
    say(
        f"bf16, {tokens} tokens, student hidden {hs_dim}, teacher hidden {ht_dim}, V {vocab}, "
        "forward + backward"
    )
    say()
    say("| divergence | provider | peak MiB above inputs | median ms | loss | peak / liger | time / torch |")
    say("|---|---|---|---|---|---|---|")
    verdicts = []
    for div in ("fkl", "jsd"):
        providers = {"torch": torch_provider(div), "gkd": gkd_provider(div)}
        liger = liger_provider(div) if device.type == "cuda" else None
        if liger is not None:
            providers["liger"] = liger
        results = {name: measure(fn, inputs, reps) for name, fn in providers.items()}
        torch_time = results["torch"][1]
        liger_peak = results["liger"][0] if "liger" in results else None
        for name, (peak, med, value, note) in results.items():
            if peak is None:
                say(f"| {div} | {name} | {note} | - | - | - | - |")
                continue
            vs_liger = f"{peak / liger_peak:.3f}" if liger_peak else "-"
            vs_torch = f"{med / torch_time:.3f}" if torch_time else "-"
            say(
                f"| {div} | {name} | {peak / MIB:.1f} | {med * 1e3:.2f} | {value:.6f} | {vs_liger} | "
                f"{vs_torch} |"
            )
        gkd_peak, gkd_time = results["gkd"][0], results["gkd"][1]
        if liger_peak and gkd_peak is not None:
            verdicts.append(gkd_peak <= liger_peak)
            say(f"claim ({div}): gkd peak <= liger peak: {'yes' if verdicts[-1] else 'NO'}")
        if torch_time and gkd_time is not None:
            verdicts.append(gkd_time <= 0.8 * torch_time)
            say(f"claim ({div}): gkd time <= 0.8x torch: {'yes' if verdicts[-1] else 'NO'}")
        say()
    return verdicts


def main() -> None:
    started = time.perf_counter()
    device = torch.device("cpu" if OPTS.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not OPTS.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run for the CPU check of this script")
    liger = importlib.util.find_spec("liger_kernel") is not None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    triton_version = "absent"
    if _dispatch.HAS_TRITON:
        triton_version = _dispatch.triton.__version__
    say(f"# gkd logit kernels on {name}")
    say(
        f"torch {torch.__version__}, triton {triton_version}, "
        f"liger_kernel {'present' if liger else 'absent'}, "
        f"kernel backend {_dispatch.backend(torch.zeros(1, device=device))}"
    )
    oks: list[bool] = []
    if not OPTS.skip_correctness:
        say()
        say("| kernel | divergence | dtype | shape | loss err / tol | grad err / tol | result |")
        say("|---|---|---|---|---|---|---|")
        if OPTS.dry_run:
            oks += check_kd_loss(device, 5, 67)
            oks += check_fused(device, 5, 67, chunk_rows=2)
        else:
            oks += check_kd_loss(device, 37, 5003)
            oks += check_fused(device, 300, 5003, chunk_rows=128)
        say(f"correctness: {sum(oks)}/{len(oks)} ok")
    if not OPTS.skip_table:  # the claims are printed in the table; they do not set the exit status
        if OPTS.dry_run:
            table(device, 6, 16, 24, 67, reps=1)
        else:
            table(device, 8192, 2048, 4096, 128256, reps=OPTS.reps)
    say(f"total {time.perf_counter() - started:.1f} s")
    if not all(oks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
