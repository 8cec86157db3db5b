"""gkd.runtime.executor's parent side in one process (the workers replaced by a stand-in): when OUT is
published after a failure, and what a plan file must match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gkd.runtime.checks as checks
import gkd.runtime.executor as executor
from gkd.config import Config
from gkd.errors import InputError
from gkd.planner.pipeline import plan as make_plan
from gkd.runtime.launch import WorkerFailedError


@pytest.fixture
def plan_file(models_dir: Path, job_config: Any, tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(make_plan(Config.from_dict(job_config(models_dir, "llama", {}))).to_json())
    return path


def _fake_launch(error: Exception, *, checkpoint: bool) -> Any:
    def launch(fn: Any, args: Any, *, processes: int, cpu_ops: Any = ()) -> None:
        settings = args[1]
        if checkpoint:
            (Path(settings.out) / "checkpoints").mkdir()
            (Path(settings.out) / "checkpoints" / "latest").write_text("step-2")
        raise error

    return launch


def _run(plan_file: Path, out: Path) -> None:
    executor.run_job(str(plan_file), out=str(out), processes=2, steps=4, echo=lambda _: None)


def test_a_failure_after_a_checkpoint_publishes_out(
    plan_file: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    failure = WorkerFailedError("worker 1 failed: RuntimeError: oom")
    monkeypatch.setattr(executor, "launch", _fake_launch(failure, checkpoint=True))
    out = tmp_path / "out"
    with pytest.raises(WorkerFailedError, match=f"oom; resume from its last checkpoint with .*--out {out}"):
        _run(plan_file, out)
    assert (out / "plan.json").is_file() and (out / "checkpoints" / "latest").is_file()
    assert json.loads((out / "run.json").read_text())["completed_steps"] == 0
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize(
    ("error", "checkpoint"),
    [
        (WorkerFailedError("worker 0 failed: RuntimeError: oom"), False),
        (InputError("bad data"), True),  # bad input never publishes, whatever was written
    ],
)
def test_other_failures_leave_no_out(
    plan_file: Path, tmp_path: Path, monkeypatch: Any, error: Exception, checkpoint: bool
) -> None:
    monkeypatch.setattr(executor, "launch", _fake_launch(error, checkpoint=checkpoint))
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        _run(plan_file, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_out_must_be_new_and_plans_must_match(plan_file: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(InputError, match="exists and is not empty"):
        _run(plan_file, taken)
    with pytest.raises(InputError, match="made for 2 GPUs but this run has 4 processes"):
        checks.load_or_plan(str(plan_file), processes=4, echo=lambda _: None)


@pytest.mark.parametrize("target", ["empty", "missing", "loop"])
def test_a_symlink_as_out_is_refused_before_the_run(plan_file: Path, tmp_path: Path, target: str) -> None:
    """A link to an empty folder, a dangling link and a loop: the run's folder cannot be renamed onto a link,
    which failed after the whole run; refused before anything starts."""
    link = tmp_path / "out"
    if target == "empty":
        (tmp_path / "real").mkdir()
        link.symlink_to(tmp_path / "real")
    elif target == "missing":
        link.symlink_to(tmp_path / "nowhere")
    else:
        link.symlink_to(link)
    fix = f"--out {tmp_path / 'real'}" if target == "empty" else "leads nowhere"
    with pytest.raises(InputError, match=f"is a symbolic link .*{fix}"):
        _run(plan_file, link)
    assert link.is_symlink() and not list(tmp_path.glob(".out.*"))


def test_out_inside_the_data_folder_is_refused(plan_file: Path, tmp_path: Path) -> None:
    """A run writing into its own `datasets` folder changes its data's identity: it could never resume."""
    data = tmp_path / "data"  # refused before the folder is read: its files need not be a dataset's
    data.mkdir()
    (data / "data-00000-of-00001.arrow").write_bytes(b"")
    with pytest.raises(InputError, match="is inside the data folder"):
        executor.run_job(
            str(plan_file), data=str(data), out=str(data / "run"), processes=2, steps=4, echo=lambda _: None
        )
    assert not (data / "run").exists()
