"""gkd's own memory-regression gate: the headline job and every reference config plan exactly as recorded in
the repository's gkd-baseline.json. A change that moves these figures on purpose refreshes the record with
`gkd check --update` (from the repository root) and commits it with the change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkd.planner.check import run_check

ROOT = Path(__file__).resolve().parents[2]


def test_reference_configs_match_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    baseline = ROOT / "gkd-baseline.json"
    recorded = json.loads(baseline.read_text())["entries"]
    expected = {"default"} | {
        f"configs/reference/{p.name}" for p in (ROOT / "configs" / "reference").glob("*.yaml")
    }
    assert set(recorded) == expected
    code = run_check(str(baseline), (), update=False, tolerance="0%")
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"no regression in {len(expected)} config(s)" in out
