"""Checkpoints and resume in real 2-process runs of configs/tiny.yaml on the CPU: a resume from any checkpoint
repeats the uninterrupted run bit for bit (losses and final weights), checkpoints are complete or not used,
and only data is ever loaded from a checkpoint.

One reference run (12 steps, a checkpoint after each) is shared by the tests of this module; each test
resumes copies of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gkd.runtime.executor import run_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
# What a resume must repeat exactly; seconds, tokens/s and memory are measurements, not results.
MEASURED = ("seconds", "tokens_per_s", "peak_memory_bytes", "memory", "memory_source")


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    [file] = (out / "student").glob("*.safetensors")
    return load_file(str(file))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml run for STEPS steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_job(
        str(ROOT / "configs" / "tiny.yaml"),
        steps=STEPS,
        out=str(out),
        processes=2,
        save_every=1,
        echo=lambda _: None,
    )
    return out


def _copy_at(reference: Path, to: Path, step: int) -> Path:
    """A copy of the reference run as a run stopped right after its checkpoint at `step` leaves it."""
    out = to / f"at-{step}"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("student"))
    (out / "checkpoints" / "latest").write_text(f"step-{step}")
    run = json.loads((out / "run.json").read_text())
    run["completed_steps"] = step if step < STEPS else STEPS - 1
    (out / "run.json").write_text(json.dumps(run))
    return out


def test_resume_from_every_checkpoint_is_bit_identical(reference: Path, tmp_path: Path) -> None:
    """From each of the 12 checkpoints (the last one: only the student's save is left), the resumed run's
    log rows and final weights equal the uninterrupted run's exactly."""
    rows, weights = _rows(reference), _weights(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    differ = []
    for step in range(1, STEPS + 1):
        out = _copy_at(reference, tmp_path, step)
        run_job(None, out=str(out), resume=True, echo=lambda _: None)
        again = _weights(out)
        same_weights = again.keys() == weights.keys() and all(
            torch.equal(again[k], weights[k]) for k in again
        )
        if _rows(out) != rows or not same_weights:
            differ.append(step)
        shutil.rmtree(out)
    assert not differ, f"resumed from these checkpoints, the run differs from the uninterrupted one: {differ}"
