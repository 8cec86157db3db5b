"""The GPU run check (benchmarks/device/gpu_run.py) plans every job on the CPU with --dry-run, so it cannot
rot between GPU sessions: each strategy it runs, and a capped job that fits only because the plan offloads
or recomputes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "gpu_run.py"


def test_dry_run_plans_every_job() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--tiny"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "MiB |" not in line]
    rows = [r for r in rows if not r.startswith("|---")]
    assert len(rows) == 11, done.stdout
    assert all(float(r.split("|")[2]) > 0 for r in rows)
    capped = next(r for r in rows if r.startswith("| capped"))
    how = re.search(r"budget (\d+) MiB: (\S+) offload, recompute (\d+)", capped)
    assert how is not None, capped
    budget, offload, recompute = int(how[1]), how[2], int(how[3])
    assert offload != "none" or recompute > 0  # it fits only because of one of them
    assert float(capped.split("|")[2]) <= budget
