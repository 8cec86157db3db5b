"""The quality benchmark's smoke mode (benchmarks/quality.py --smoke) keeps working: tiny random models built
from configs (no download), a few steps, a table with one line per method asked for and its twin, and the
held-out loss it prints for a student equal to what `gkd eval --json` says for it (the script checks that)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


def test_quality_smoke_table(tmp_path: Path) -> None:
    out = tmp_path / "quality.md"
    command = [sys.executable, str(SCRIPT), "--smoke", "--seeds", "0", "--pairs", "causal"]
    command += ["--methods", "kd,minilmv2,student_init_ends"]
    command += ["--work", str(tmp_path / "runs"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = out.read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "twin", "kd", "minilmv2", "twin_wide", "student_init_ends"}, rows
    for name in ("kd", "minilmv2"):
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        assert cells[1] == "1"  # seeds
        assert float(cells[2]) > 0  # held-out loss
        assert 0.0 <= float(cells[4]) <= 1.0  # top-1 agreement
        assert cells[5].startswith(("+", "-"))  # the difference to the twin
    assert "`gkd eval --json` on twin seed 0" in out.read_text()
    assert "Command: `python benchmarks/quality.py --smoke" in out.read_text()


def test_quality_unknown_method(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--smoke", "--methods", "nosuch", "--work", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no row named nosuch" in result.stdout + result.stderr
