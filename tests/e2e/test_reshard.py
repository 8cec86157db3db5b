"""Resuming on another number of processes (`gkd run --resume --out OUT --processes M`) in real CPU runs of
the tiny config: the checkpoint is converted to DeepSpeed's universal form, the job is planned again for M,
and the run goes on from the checkpoint's loss on exactly the rows the uninterrupted run trains on.

Each case: an uninterrupted run of STEPS steps with a checkpoint at step AT, and a copy of it stopped right
after that checkpoint, resumed on the other number of processes. The planner's own choices for the tiny
config are ZeRO-2 (micro-batch 4) on 2 processes and ZeRO-0 (micro-batch 1, 8 accumulation steps) on 1, so
the unpinned cases also change the micro-batch; the ZeRO-3 case pins the stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import main
from gkd.runtime.worker import RECORD_ROWS_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
AT = 1  # the checkpoint the resume starts from


def _config(folder: Path, stage: int | None) -> str:
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["training"]["steps"] = STEPS
    if stage is not None:
        config["overrides"] = {"student_zero_stage": stage}
    path = folder / f"tiny-z{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _gkd_run(*args: str) -> list[str]:
    """`gkd run ARGS` in a process of its own (what it printed): a forked CPU worker that runs with more than
    one thread hangs in OpenMP when the process that forks it ran OpenMP work before (other tests in this
    pytest process), so one-process runs are not started from here."""
    env = {**os.environ, RECORD_ROWS_ENV: "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gkd", "run", *args], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def _reference(folder: Path, stage: int | None, processes: int) -> Path:
    """The uninterrupted run, with a checkpoint at step AT and the rows of each step in its log."""
    out = folder / "reference"
    _gkd_run(
        _config(folder, stage), "--out", str(out), "--processes", str(processes), "--save-every", str(AT)
    )
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml on 2 processes, as planned: ZeRO-2, micro-batch 4."""
    return _reference(tmp_path_factory.mktemp("two"), None, 2)


def _log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _stopped_at(reference: Path, to: Path) -> Path:
    """A copy of the reference run as a run stopped right after its checkpoint at step AT leaves it."""
    shutil.copytree(reference, to, ignore=shutil.ignore_patterns("student"))
    (to / "checkpoints" / "latest").write_text(f"step-{AT}")
    run = json.loads((to / "run.json").read_text())
    run["completed_steps"] = AT
    (to / "run.json").write_text(json.dumps(run))
    return to


def _check_resume(
    reference: Path, out: Path, resumed_with: int, said: list[str], expected: list[str]
) -> None:
    for words in expected:
        assert any(words in line for line in said), (words, said)
    want, got = _log(reference), _log(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # Every step trained on exactly the rows of the uninterrupted run (8 a step, none twice, none skipped).
    assert [r["rows"] for r in got] == [r["rows"] for r in want]
    assert all(len(r["rows"]) == 8 for r in got)
    # The loss goes on from the checkpoint's: the first resumed step within 1e-3 of the uninterrupted run's.
    assert abs(got[AT]["loss"] - want[AT]["loss"]) <= 1e-3 * abs(want[AT]["loss"])
    # The run goes on with the new plan, which a later resume reads.
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inputs"]["config"]["hardware"]["gpus"] == resumed_with
    assert json.loads((out / "run.json").read_text())["processes"] == resumed_with
    assert (out / "student").is_dir()


def _resume(reference: Path, to: Path, processes: int) -> tuple[Path, list[str]]:
    out = _stopped_at(reference, to)
    return out, _gkd_run("--resume", "--out", str(out), "--processes", str(processes))


def test_two_processes_resume_on_one(two_processes: Path, tmp_path: Path) -> None:
    """ZeRO-2 on 2 processes -> 1 process: converted to the universal form; the plan for 1 process (ZeRO-0,
    micro-batch 1 x 8) is made again with ZeRO-1, which loads it."""
    out, said = _resume(two_processes, tmp_path / "resumed", 1)
    converting = f"Converting checkpoint step-{AT} of 2 processes for 1"
    _check_resume(two_processes, out, 1, said, [converting, "planning again with ZeRO-1"])
    assert (out / "checkpoints" / "universal" / f"step-{AT}" / "complete").is_file()


@pytest.mark.parametrize("stage", [None, 3], ids=["zero0", "zero3"])
def test_one_process_resumes_on_two(tmp_path: Path, stage: int | None) -> None:
    """1 process -> 2. As planned (ZeRO-0: one whole file, loaded as it is, so the plan for 2 is made again
    with ZeRO-0); and ZeRO-3 on both sides (converted to the universal form)."""
    reference = _reference(tmp_path, stage, 1)
    out, said = _resume(reference, tmp_path / "resumed", 2)
    if stage is None:
        expected = ["planning again with ZeRO-0"]
        assert not (out / "checkpoints" / "universal").exists()
    else:
        expected = [f"Converting checkpoint step-{AT} of 1 processes for 2"]
    _check_resume(reference, out, 2, said, expected)
    assert json.loads((out / "plan.json").read_text())["strategy"]["student_zero_stage"] == (stage or 0)


def _one_line_exit_2(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd: error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output


def test_bad_resumes_on_another_number_of_processes_exit_2(two_processes: Path, tmp_path: Path) -> None:
    """A world size the global batch cannot be split over, and a checkpoint DeepSpeed cannot convert: one
    line, exit code 2, and nothing written (no universal folder, the plan unchanged)."""
    import torch

    out = _stopped_at(two_processes, tmp_path / "stopped")
    resume = ["run", "--resume", "--out", str(out), "--processes"]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    _one_line_exit_2([*resume, "3"], "global batch of 8, which 3 processes do not divide")
    # A ZeRO partition that holds only a tensor (loadable as data; the marker updated to match it).
    where = out / "checkpoints" / f"step-{AT}"
    [optim] = sorted(where.glob("*pp_rank_0_*optim_states.pt"))
    torch.save({"not": torch.zeros(1)}, optim)
    marker = json.loads((where / "complete").read_text())
    marker["files"][optim.name] = optim.stat().st_size
    (where / "complete").write_text(json.dumps(marker))
    _one_line_exit_2(
        [*resume, "1"], f"checkpoint {where} cannot be converted for another number of processes"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert json.loads((out / "plan.json").read_text())["inputs"]["config"]["hardware"]["gpus"] == 2
