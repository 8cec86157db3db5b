"""The GPU memory check script runs (predictions only) on the CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "gpu_memory.py"


def test_dry_run_prints_predictions() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny-llama")]
    assert len(rows) == 2
    predicted = [float(row.split("|")[4]) for row in rows]
    assert predicted[0] > predicted[1] >= 0  # full recompute keeps less than no recompute
