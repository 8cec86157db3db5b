"""A rank killed at seeded random moments of `--save-every 1` checkpointing and of the final save: the run
then resumes (or, killed before its first complete checkpoint, runs again) to a student and log bit-identical
to an uninterrupted run's. A few cases here; benchmarks/fault_injection.py runs 24 and prints the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

_SPEC = importlib.util.spec_from_file_location(
    "fault_injection", Path(__file__).resolve().parents[2] / "benchmarks" / "fault_injection.py"
)
assert _SPEC is not None and _SPEC.loader is not None
faults: Any = importlib.util.module_from_spec(_SPEC)
sys.modules["fault_injection"] = faults  # its dataclass looks its module up there
_SPEC.loader.exec_module(faults)

# Three of the benchmark's 24 seeded cases (seed 0): inside DeepSpeed's own save (rank 0's first file cut
# short, `latest` not moved), between the complete marker and the pointer, and after the last checkpoint
# before the student is saved (the resume only saves it).
CASES = ["0:3:deepspeed-file", "0:3:marker", "1:4:student"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.reference_run(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("spec", CASES)
def test_a_killed_rank_resumes_to_the_same_student(reference: Path, tmp_path: Path, spec: str) -> None:
    rank, step, point = spec.split(":")
    case = faults.Case(int(rank), int(step), point)
    assert case in faults.draw_cases(24, 0)
    result = faults.run_case(case, reference, tmp_path)
    assert result["killed"], result
    assert result["then"] == "resume" and result["ok"] and result["identical"], result
