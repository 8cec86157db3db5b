"""The memory gate measures, not only re-plans: `gkd check --measure` runs the small configs recorded in
configs/measured/gkd-baseline.json (2 CPU processes, a few steps) and fails when a measured device peak
exceeds the run's prediction or its recorded measurement; and seven cases of benchmarks/plan_accuracy.py stay
within the accuracy goals (device 5%, the node's host memory 10%)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.planner.check import run_check

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "configs" / "measured" / "gkd-baseline.json"
TOLERANCE = "5%"  # the plan-accuracy goal for the device peak (benchmarks/plan_accuracy.py)

cuda = pytest.importorskip("torch").cuda.is_available()
pytestmark = pytest.mark.skipif(cuda, reason="the recorded measurements are of CPU runs")


def test_the_measured_configs_pass(capsys: pytest.CaptureFixture[str]) -> None:
    recorded = json.loads(BASELINE.read_text())["entries"]
    assert len(recorded) >= 3 and all(e.get("measured_peak_bytes", 0) > 0 for e in recorded.values())
    code = run_check(str(BASELINE), (), update=False, tolerance=TOLERANCE, measure_steps=2)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("measured 2 steps") == len(recorded)


def test_a_deflated_memory_rule_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The divergence's CPU tiles left out of the plan: the run measures more than its plan says."""
    from gkd.planner import analysis

    monkeypatch.setattr(analysis, "KD_CPU_LIVE_TILES", 0)
    config = str(BASELINE.parent / "llama-kd-zero2.yaml")
    code = run_check(str(BASELINE), (config,), update=False, tolerance=TOLERANCE, measure_steps=2)
    out = capsys.readouterr().out
    assert code == 1, out
    assert "exceeds the predicted" in out


def test_a_measured_peak_above_the_record_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = BASELINE.parent / "llama-kd-zero2.yaml"
    (tmp_path / config.name).write_text(config.read_text())
    entries = json.loads(BASELINE.read_text())["entries"]
    entry = dict(entries[config.name])
    entry["measured_peak_bytes"] = int(entry["measured_peak_bytes"] / 1.2)  # the run now measures 20% more
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"version": 1, "entries": {config.name: entry}}))
    code = run_check(str(baseline), (), update=False, tolerance=TOLERANCE, measure_steps=2)
    out = capsys.readouterr().out
    assert code == 1, out
    # The record was taken over 3 steps and this run measures 2: their peaks may differ by a few KiB, so the
    # reported growth is about 20%, not exactly.
    growth = re.search(r"measured peak \+(\d+\.\d)%", out)
    assert growth and abs(float(growth.group(1)) - 20) < 1, out


def test_measure_refuses_the_headline_job() -> None:
    r = CliRunner().invoke(
        main, ["check", "default", "--measure", "--baseline", str(ROOT / "gkd-baseline.json")]
    )
    assert r.exit_code == 2 and "far too large to run here" in r.output


def test_seven_plan_accuracy_cases_within_the_goals() -> None:
    """Four plain cases, the offline top-k one (the torch top-k KL the runtime runs: 31.5% under when the plan
    counted the fused kernel), a ZeRO-3 teacher (12.8% over while its partitions went unmeasured) and a ZeRO-3
    Llama student with a ZeRO-3 teacher (the family that drifted to 4.0-5.6% under while the plan left out the
    attention mask of packed rows; 2.6% under with it, benchmarks/results/plan_accuracy_cpu.txt)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plan_accuracy import check_bounds

    names = [
        "llama z1 replicated layerwise logits",
        "llama z2 replicated layerwise fused",
        "opt z1 replicated end logits",
        "bert z2 replicated layerwise logits",
        "llama z2 offline top-k",
        "opt z2 zero3 layerwise fused recompute layer 1",
        "llama z3 zero3 layerwise logits",
    ]
    assert check_bounds(names, steps=2) == []
