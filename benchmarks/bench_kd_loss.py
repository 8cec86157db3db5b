"""Fused-linear logit distillation, forward + backward: gkd vs plain torch (vs Liger-Kernel on a GPU).

Claim (issue 4, CPU): 4096 tokens, student hidden 1024, teacher hidden 2048, V = 128256, fp32, forward KL from
the final hidden states and both LM heads: gkd's peak memory above the inputs (everything the call allocates,
its loss and the student gradients included) is at most 1/8 of plain torch's, and its time at most 1.0x.

Providers:
* ``torch``: the plain implementation, materialising both (tokens x V) logits: ``log_softmax`` of both
  sides and ``kl_div(..., log_target=True)`` (jsd: the same with the mixture), autograd for the backward;
* ``gkd``: `gkd.kernels.fused_linear_kd_loss` (chunked over tokens, gradients computed in the forward);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (fkl as ``jsd_beta=0``, jsd as ``jsd_beta=beta``), only
  with a GPU and ``liger_kernel`` importable.

Memory: on CPU, `torch.distributed._tools.mem_tracker.MemTracker` counts the bytes of every live tensor
storage (a dispatch-mode tracker); the inputs are registered with it first and their bytes subtracted, so
views of them made inside the call do not count; on CUDA, `torch.cuda.max_memory_allocated` above the
allocation before the call. Memory is measured in a separate run that also serves as the warm-up; time is
the median (and min..max) of timed runs, which interleave the providers, in wall-clock and in process CPU
seconds (the steadier figure on a shared machine).

Usage: python benchmarks/bench_kd_loss.py [--tokens 4096 --student-hidden 1024 --teacher-hidden 2048
       --vocab 128256 --dtype float32 --divergence fkl --reps 3 --providers torch,gkd,liger]
       python benchmarks/bench_kd_loss.py --small     (1024 tokens, V = 32000: a quick look)
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gkd.kernels import fused_linear_kd_loss

MIB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Case:
    tokens: int
    student_hidden: int
    teacher_hidden: int
    vocab: int
    dtype: torch.dtype
    divergence: str
    beta: float = 0.5


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Student hidden/weight (requiring grad), teacher hidden/weight (frozen); logits of a realistic scale."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(case.dtype)

    hs = rnd(case.tokens, case.student_hidden, scale=1.0).requires_grad_()
    ws = rnd(case.vocab, case.student_hidden, scale=2.0 / case.student_hidden**0.5).requires_grad_()
    ht = rnd(case.tokens, case.teacher_hidden, scale=1.0)
    wt = rnd(case.vocab, case.teacher_hidden, scale=2.0 / case.teacher_hidden**0.5)
    return hs, ws, ht, wt


def plain_torch(case: Case, hs, ws, ht, wt) -> torch.Tensor:
    """The textbook implementation: both logits materialised, log-softmax, divergence, autograd."""
    log_q = F.log_softmax((hs @ ws.t()).float(), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax((ht @ wt.t()).float(), dim=-1)
    if case.divergence == "fkl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / case.tokens
    if case.divergence == "jsd":
        beta = case.beta
        log_m = torch.logaddexp(
            log_p + torch.log(torch.tensor(beta)), log_q + torch.log(torch.tensor(1 - beta))
        )
        kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="sum")
        kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="sum")
        return (beta * kl_p + (1 - beta) * kl_q) / case.tokens
    raise SystemExit(f"the torch provider implements fkl and jsd, not {case.divergence}")


def gkd_fused(case: Case, hs, ws, ht, wt) -> torch.Tensor:
    return fused_linear_kd_loss(hs, ws, ht, wt, divergence=case.divergence, beta=case.beta)


def liger_provider() -> Callable | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None

    def liger(case: Case, hs, ws, ht, wt) -> torch.Tensor:
        beta = 0.0 if case.divergence == "fkl" else case.beta
        return LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)(hs, ws, ht, wt)

    return liger


def step(provider: Callable, case: Case, inputs: Inputs) -> torch.Tensor:
    hs, ws = inputs[0], inputs[1]
    hs.grad = None
    ws.grad = None
    loss = provider(case, *inputs)
    loss.backward()
    return loss.detach()


def peak_bytes_above_inputs(provider: Callable, case: Case, inputs: Inputs) -> tuple[int, float]:
    """Peak bytes the call allocates (its loss and the gradients included), inputs excluded; and the loss."""
    inputs[0].grad = None
    inputs[1].grad = None
    gc.collect()
    device = inputs[0].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step(provider, case, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, loss.item()
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    # Register the inputs first: otherwise a view of an input made inside the call (``w.t()``, ``detach()``)
    # would count its whole storage as new.
    tracker.track_external(*inputs)
    with tracker:
        base = tracker.get_tracker_snapshot("current")[device]["Total"]
        loss = step(provider, case, inputs)
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"] - base), loss.item()


def timed_seconds(provider: Callable, case: Case, inputs: Inputs) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step.

    On a shared CPU the CPU seconds are the steadier figure: other processes' load stretches the wall clock,
    far less the CPU time this process itself needs."""
    gc.collect()
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    step(provider, case, inputs)
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


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
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--student-hidden", type=int, default=1024)
    parser.add_argument("--teacher-hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--divergence", default="fkl", choices=["fkl", "jsd"])
    parser.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per provider (after the memory run)")
    parser.add_argument("--providers", default="torch,gkd,liger")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="1024 tokens, V = 32000 (a quick look)")
    parser.add_argument(
        "--skip-memory", action="store_true", help="time only (the first run is a plain warm-up)"
    )
    args = parser.parse_args()
    if args.small:
        args.tokens, args.vocab = 1024, 32000
    device = torch.device(args.device)
    case = Case(
        tokens=args.tokens,
        student_hidden=args.student_hidden,
        teacher_hidden=args.teacher_hidden,
        vocab=args.vocab,
        dtype=getattr(torch, args.dtype),
        divergence=args.divergence,
        beta=args.beta,
    )
    providers: dict[str, Callable] = {"torch": plain_torch, "gkd": gkd_fused}
    liger = liger_provider() if device.type == "cuda" else None
    if liger is not None:
        providers["liger"] = liger
    wanted = [p for p in args.providers.split(",") if p in providers]
    machine = f"{platform.machine()}, torch {torch.__version__}, " + (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"# fused-linear {case.divergence}, forward + backward, {args.dtype}, tokens {case.tokens}, "
        f"student hidden {case.student_hidden}, teacher hidden {case.teacher_hidden}, V {case.vocab}"
    )
    print(f"# {machine}, commit {_commit()}, {args.reps} timed runs per provider")
    inputs = make_inputs(case, device)
    measured: dict[str, tuple[int | None, float]] = {}
    for name in wanted:
        if args.skip_memory:
            measured[name] = (None, step(providers[name], case, inputs).item())  # the warm-up only
            continue
        measured[name] = peak_bytes_above_inputs(providers[name], case, inputs)
        print(
            f"#   {name}: peak {measured[name][0] / MIB:.1f} MiB above inputs, loss {measured[name][1]:.6f}"
        )
    # Timed runs interleave the providers, so a change in machine load affects them alike.
    walls: dict[str, list[float]] = {name: [] for name in wanted}
    cpus: dict[str, list[float]] = {name: [] for name in wanted}
    for rep in range(args.reps):
        for name in wanted:
            wall, cpu = timed_seconds(providers[name], case, inputs)
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"#   {name}: run {rep + 1} {wall:.3f} s wall, {cpu:.3f} s CPU")
    med = {name: statistics.median(walls[name]) for name in wanted}
    med_cpu = {name: statistics.median(cpus[name]) for name in wanted}
    print(
        f"{'provider':<8} {'peak MiB above inputs':>22} {'median s':>10} {'min..max s':>17} "
        f"{'median CPU s':>13} {'loss':>10} {'peak / torch':>13} {'time / torch':>13} {'CPU / torch':>12}"
    )
    base = "torch" if "torch" in measured else None
    for name in wanted:
        peak, loss = measured[name]
        base_peak = measured[base][0] if base else None
        peak_txt = f"{peak / MIB:.1f}" if peak is not None else "-"
        mem_ratio = f"{peak / base_peak:.3f}" if peak is not None and base_peak else "-"
        time_ratio = f"{med[name] / med[base]:.3f}" if base else "-"
        cpu_ratio = f"{med_cpu[name] / med_cpu[base]:.3f}" if base else "-"
        spread = f"{min(walls[name]):.3f}..{max(walls[name]):.3f}"
        print(
            f"{name:<8} {peak_txt:>22} {med[name]:>10.3f} {spread:>17} {med_cpu[name]:>13.3f} {loss:>10.6f} "
            f"{mem_ratio:>13} {time_ratio:>13} {cpu_ratio:>12}"
        )
    if base and "gkd" in measured:
        gkd_peak, torch_peak = measured["gkd"][0], measured[base][0]
        if gkd_peak is not None and torch_peak is not None:
            print(f"# claim: gkd peak <= 1/8 of torch: {'yes' if gkd_peak * 8 <= torch_peak else 'NO'}")
        print(
            f"# claim: gkd time <= 1.0x torch: wall {'yes' if med['gkd'] <= med[base] else 'NO'}, "
            f"CPU {'yes' if med_cpu['gkd'] <= med_cpu[base] else 'NO'}"
        )


if __name__ == "__main__":
    main()
