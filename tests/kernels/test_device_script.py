"""The GPU check script (benchmarks/device/gpu_kernels.py) runs end to end in its CPU dry run.

The dry run uses tiny shapes on the CPU; it must pass its correctness table, print the memory/time table and
write the markdown copy to $OUT. It runs here with the torch path (GKD_KERNELS=torch) to stay quick: the
Triton kernels themselves are checked under the interpreter by test_triton_interpreter.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device" / "gpu_kernels.py"


def test_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GKD_KERNELS="torch", PYTHONWARNINGS="ignore::RuntimeWarning")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "correctness: 26/26 ok" in out, out
    assert "FAIL" not in out
    for provider in ("torch", "gkd"):
        assert f"| fkl | {provider} |" in out and f"| jsd | {provider} |" in out, out
    written = (tmp_path / "gpu_kernels.md").read_text()
    assert "correctness: 26/26 ok" in written and "| jsd | gkd |" in written
