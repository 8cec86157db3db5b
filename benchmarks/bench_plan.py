"""How long `gkd plan` takes on each reference config, and what it decides.

Claim checked: every reference config produces a plan that fits 8 x 40 GB, stating host memory and disk, and
plans in under 3 s on this machine. Each config runs as a separate `gkd plan CONFIG --json` process (so the
time includes interpreter start and imports):
- first: an empty user cache, as after installing gkd: specs and model facts come from the pack shipped in
  the package (gkd/data/pack, gkd.planner.pack), nothing is traced;
- traced: an empty user cache with the pack switched off (GKD_NO_PACK=1): models are built on the meta
  device and traced, as for a model the pack does not hold (its CPU time too: user + sys of the process and
  any children it waited for, from `resource.getrusage(RUSAGE_CHILDREN)`);
- warm: again on the cache the traced run filled (median of --repeat runs, with the spread);
- seq/2: one more warm plan at half the sequence length (model facts hold for every length).
Also printed: verdict, peak per GPU, host memory, disk and the chosen strategy; last, the floor of any
traced plan: the time a fresh process takes just to import torch, torch.export and transformers' model
modules.
The machine may be shared, so the load average is printed before and after: CPU time is the figure that does
not depend on other processes.

    python benchmarks/bench_plan.py [--repeat 3] [--cache DIR] [--first-only] [CONFIG ...]

`--first-only` times only the first plans and names the models each one traced; with another transformers
release on PYTHONPATH it shows which packed architectures that release keeps (gkd.planner.cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


def _version(dist: str) -> str:
    """The installed release of `dist`, as the child processes import it (PYTHONPATH included)."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "?"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plan_once(
    config: str | None, cache: str, extra: tuple[str, ...] = (), *, pack: bool = True
) -> tuple[float, dict, int, float]:
    """Wall seconds, the plan JSON, the exit code and the CPU seconds of one `gkd plan` process."""
    cmd = [sys.executable, "-m", "gkd.cli", "plan", "--json", *extra] + ([config] if config else [])
    env = {**os.environ, "GKD_CACHE_DIR": cache}
    env.pop("GKD_NO_PACK", None)
    if not pack:
        env["GKD_NO_PACK"] = "1"
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if proc.returncode not in (0, 1):
        raise SystemExit(
            f"gkd plan {config} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        )
    return wall, json.loads(proc.stdout), proc.returncode, cpu


# Exits without the interpreter's teardown, as gkd's entry point does (gkd.cli.entry).
_IMPORTS = (
    "import os, torch, torch.export; "
    "from transformers.models.llama.modeling_llama import LlamaForCausalLM; os._exit(0)"
)


def import_seconds() -> float:
    """Median wall time of a fresh process that only imports what any trace needs."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _IMPORTS], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_only(configs: list[str | None]) -> None:
    """The first plan of each config from an empty cache, and the models it had to trace."""
    worst = 0.0
    for config in configs:
        cache = tempfile.mkdtemp(prefix="gkd-bench-cache-")
        wall, plan, _, cpu = plan_once(config, cache)
        worst = max(worst, wall)
        traced = sorted(p.name.rsplit("-", 1)[0] for p in Path(cache).glob("facts/*.json"))
        print(
            f"{config or '(no arguments: headline)':<52} fits {str(plan['fits']):<5} first {wall:5.2f} s "
            f"(cpu {cpu:5.2f} s)  traced: {', '.join(traced) or 'nothing (all from the pack)'}"
        )
    print(f"# slowest first plan (empty cache, shipped pack): {worst:.2f} s (target: under 3 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "configs", nargs="*", help="config files (default: configs/reference/*.yaml and no-args)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="warm runs per config")
    parser.add_argument(
        "--first-only",
        action="store_true",
        help="only the first plan of each config, and which models it traced (the pack did not hold)",
    )
    parser.add_argument(
        "--cache", help="facts cache folder (default: a fresh temporary one per config, so each starts cold)"
    )
    args = parser.parse_args()
    configs: list[str | None] = args.configs or [None] + sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "reference").glob("*.yaml")
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"# gkd plan timings  machine={platform.node()} cpus={os.cpu_count()} "
        f"python={platform.python_version()} commit={commit.stdout.strip() or '?'} "
        f"torch={_version('torch')} transformers={_version('transformers')} "
        f"cache={args.cache or 'a fresh one per config'} "
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.first_only:
        first_only(configs)
        return
    header = (
        f"{'config':<48} {'fits':<5} {'peak/GPU':>9} {'host':>9} {'disk':>9} {'first s':>7} {'traced s':>8} "
        f"{'traced cpu':>10} {'warm s (median, min-max)':>25} {'seq/2 s':>7}  strategy"
    )
    print(header)
    print("-" * len(header))
    imports = import_seconds()
    worst, worst_first = 0.0, 0.0
    for config in configs:
        first = plan_once(config, tempfile.mkdtemp(prefix="gkd-bench-cache-"))[0]
        cache = args.cache or tempfile.mkdtemp(prefix="gkd-bench-cache-")
        cold, plan, rc, cold_cpu = plan_once(config, cache, pack=False)
        worst_first = max(worst_first, first)
        warm = [plan_once(config, cache)[0] for _ in range(args.repeat)]
        # Another sequence length on the same cache: model facts hold for every length, so nothing is traced.
        half = str(max(1, plan["inputs"]["config"]["training"]["seq_len"] // 2))
        other = plan_once(config, cache, ("--seq-len", half))[0]
        med = statistics.median(warm)
        worst = max(worst, med)
        s = plan["strategy"]
        strategy = (
            f"ZeRO-{s['student_zero_stage']}"
            f"{'' if s['student_offload'] == 'none' else '+' + s['student_offload']}, "
            f"teacher {s['teacher_placement']}"
            f"{' x' + str(s['tensor_parallel']) if s['teacher_placement'] == 'tensor_parallel' else ''}, "
            f"mb {s['micro_batch']}x{s['grad_accum']}, recompute {len(s['recompute_layers'])}, "
            f"{plan['estimates']['tokens_per_s']:,.0f} tok/s"
        )
        name = config or "(no arguments: headline)"
        print(
            f"{name:<48} {str(plan['fits']):<5} {plan['peak_bytes'] / GiB:>7.2f}Gi "
            f"{plan['host_bytes'] / GiB:>7.1f}Gi {plan['estimates'].get('disk_bytes', 0) / GiB:>7.1f}Gi "
            f"{first:>7.2f} {cold:>8.2f} {cold_cpu:>10.2f} "
            f"{med:>9.2f} ({min(warm):.2f}-{max(warm):.2f})       "
            f"{other:>7.2f}  {strategy}"
        )
    print(f"# slowest first plan (empty cache, shipped pack): {worst_first:.2f} s (target: under 3 s)")
    print(f"# slowest warm plan: {worst:.2f} s (target: under 3 s)")
    print(
        f"# a traced plan's floor: importing torch and transformers' Llama modules and torch.export takes "
        f"{imports:.2f} s here (median of 3 fresh processes), before any tracing"
    )
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
