"""Benchmark: `gkd inspect` on the two largest presets must finish in under 10 s with peak RSS under 3 GB.

Each run is a fresh `gkd inspect MODEL` subprocess (default sizes: micro-batch 1, sequence 2048) with an empty
cache folder, so import and trace time count (cold); a second run on the same cache shows the warm time.
Wall time is measured around the subprocess; peak RSS and CPU time (user + sys) come from
`resource.getrusage(RUSAGE_CHILDREN)`. Because RUSAGE_CHILDREN's peak is the maximum over all children ever
waited for, every measurement runs inside its own short-lived Python wrapper. The machine is shared, so the
load average is printed too: CPU time is the figure that does not depend on other processes.

Usage: .venv/bin/python benchmarks/bench_inspect.py [--repeats N] [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_SECONDS = 10.0
TARGET_RSS_GB = 3.0

_WRAPPER = r"""
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
start = time.perf_counter()
proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": proc.returncode, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_kb": usage.ru_maxrss, "stderr": proc.stderr[-500:]}))
"""


def gkd_command() -> list[str]:
    script = Path(sys.executable).with_name("gkd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gkd.cli"]


def measure(model: str, cache: str) -> dict[str, float]:
    cmd = [*gkd_command(), "inspect", model]
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, json.dumps(cmd)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GKD_CACHE_DIR": cache},
    )
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"gkd inspect {model} failed ({result['rc']}): {result['stderr']}")
    return {"wall": result["wall"], "cpu": result["cpu"], "rss_gb": result["rss_kb"] * 1024 / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["llama-2-70b", "bloom-176b"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"machine: {platform.node()} ({os.cpu_count()} cores), python {platform.python_version()}, "
        f"commit {commit or '?'}, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{args.repeats} fresh subprocess runs per model of `gkd inspect MODEL` (micro-batch 1, sequence "
        "2048), each with an empty cache (cold: built and traced), then once more on that cache (warm)"
    )
    header = (
        f"{'model':<14} {'wall median':>11} {'wall min-max':>14} {'cpu median':>10} {'peak RSS':>9} "
        f"{'< 10 s':>7} {'< 3 GB':>7} {'warm median':>11}"
    )
    print(header)
    print("-" * len(header))
    for model in args.models:
        runs, warm = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="gkd-bench-inspect-") as cache:
                runs.append(measure(model, cache))
                warm.append(measure(model, cache)["wall"])
        wall = [r["wall"] for r in runs]
        cpu = [r["cpu"] for r in runs]
        rss = max(r["rss_gb"] for r in runs)
        med = statistics.median(wall)
        print(
            f"{model:<14} {med:>10.2f}s {min(wall):>6.2f}-{max(wall):<6.2f}s {statistics.median(cpu):>9.2f}s "
            f"{rss:>7.2f}GB {'yes' if med < TARGET_SECONDS else 'NO':>7} "
            f"{'yes' if rss < TARGET_RSS_GB else 'NO':>7} {statistics.median(warm):>10.2f}s"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
