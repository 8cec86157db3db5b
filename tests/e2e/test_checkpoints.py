"""Checkpoints and resume in real 2-process runs of configs/tiny.yaml on the CPU: a resume from any checkpoint
repeats the uninterrupted run bit for bit (losses and final weights), checkpoints are complete or not used,
and only data is ever loaded from a checkpoint.

One reference run (12 steps, a checkpoint after each) is shared by the tests of this module; each test
resumes copies of it."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import gkd.runtime.executor as executor
import gkd.runtime.publishing as publishing
from gkd.cli import main
from gkd.errors import InputError
from gkd.runtime.checkpoints import CheckpointWriteError, incomplete_reason, resumable, write_errors
from gkd.runtime.executor import _kept_log_rows, run_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
# What a resume must repeat exactly; seconds, tokens/s and memory are measurements, not results.
MEASURED = ("seconds", "tokens_per_s", "peak_memory_bytes", "memory", "memory_source")


def _one_line(result: Any, code: int, expected: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd: error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output
    return lines[0]


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


# ----------------------------------------------------------------------------------------------------------
# A checkpoint is complete or it is not used


def _damage(out: Path, step: int, how: str) -> None:
    where = out / "checkpoints" / f"step-{step}"
    if how == "no marker":
        (where / "complete").unlink()
    elif how == "no rank file":
        (where / "rng-rank1.pt").unlink()
    elif how == "cut short":
        [optim] = sorted(where.glob("*rank_1*optim_states.pt"))
        os.truncate(optim, optim.stat().st_size // 2)


@pytest.mark.parametrize("how", ["no marker", "no rank file", "cut short"])
def test_resumable_passes_over_an_incomplete_checkpoint(reference: Path, tmp_path: Path, how: str) -> None:
    out = _copy_at(reference, tmp_path, 6)
    _damage(out, 6, how)
    tag, note = resumable(out / "checkpoints", 2)
    assert tag == "step-5" and "step-6 cannot be resumed from" in note and "resuming from step-5" in note
    assert incomplete_reason(out / "checkpoints" / "step-5", 4) == "it was written by 2 processes, not 4"


@pytest.mark.parametrize("latest", ["step-abc", "", "step-99"])
def test_an_odd_latest_is_passed_over_or_one_line(reference: Path, tmp_path: Path, latest: str) -> None:
    out = _copy_at(reference, tmp_path, 4)
    (out / "checkpoints" / "latest").write_text(latest)
    tag, note = resumable(out / "checkpoints", 2)
    assert tag == "step-12" and "resuming from step-12" in note
    for step in range(1, STEPS + 1):  # no complete checkpoint left: one line, exit 2
        (out / "checkpoints" / f"step-{step}" / "complete").unlink()
    result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
    line = _one_line(result, 2, "holds no complete checkpoint")
    assert ("before it" in line) == (latest == "step-99")
    assert f"`gkd run {out / 'plan.json'} --out NEW_FOLDER`" in line


def test_no_complete_checkpoint_says_how_to_start_again(tmp_path: Path) -> None:
    """The run cannot start again in OUT (a new run needs an empty --out): the message names a command that
    works, and says "before it" only where `latest` names a checkpoint."""
    folder = tmp_path / "out" / "checkpoints"
    (folder / "step-2").mkdir(parents=True)  # interrupted: no marker
    (folder / "latest").write_text("../../elsewhere")
    with pytest.raises(InputError) as caught:
        resumable(folder, 2)
    message = str(caught.value)
    assert "names no checkpoint" in message and "before it" not in message
    assert message.endswith(f"`gkd run {tmp_path / 'out' / 'plan.json'} --out NEW_FOLDER`")


def test_a_run_without_run_json_is_named_as_such(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-2")
    result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
    _one_line(result, 2, f"{out / 'run.json'} is missing")


def test_a_resume_from_an_incomplete_latest_uses_the_one_before(reference: Path, tmp_path: Path) -> None:
    """A worker killed while rank 1 wrote checkpoint 6 (and `latest` already on it, as DeepSpeed's own pointer
    left it): the resume says so in one line, continues from step 5, and ends as the uninterrupted run."""
    out = _copy_at(reference, tmp_path, 6)
    _damage(out, 6, "cut short")
    (out / "checkpoints" / "step-6" / "complete").unlink()
    said: list[str] = []
    run_job(None, out=str(out), resume=True, echo=said.append)
    assert [s for s in said if s.startswith("Note: ")] == [
        "Note: checkpoint step-6 cannot be resumed from: its writing was interrupted (no `complete` marker); "
        "resuming from step-5, the newest complete checkpoint before it"
    ]
    assert _rows(out) == _rows(reference)
    again, weights = _weights(out), _weights(reference)
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert (out / "checkpoints" / "step-6" / "complete").is_file()  # written again, whole


# ----------------------------------------------------------------------------------------------------------
# Only data is loaded from a checkpoint


class _Payload:
    """What a hostile checkpoint holds: unpickling it runs `touch CANARY`."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rng-rank0.pt"])
def test_a_checkpoint_that_would_run_code_is_refused(reference: Path, tmp_path: Path, name: str) -> None:
    out = _copy_at(reference, tmp_path, 3)
    where = out / "checkpoints" / "step-3"
    canary = tmp_path / "pwned"
    state = torch.load(where / name, weights_only=False)
    state["extra"] = _Payload(canary)
    torch.save(state, where / name)
    marker = json.loads((where / "complete").read_text())  # a hostile folder has a matching marker
    marker["files"][name] = (where / name).stat().st_size
    (where / "complete").write_text(json.dumps(marker))
    result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
    line = _one_line(result, 2, str(where / name))
    assert "could run code" in line
    assert not canary.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_hostile_file_is_refused_for_what_it_holds(tmp_path: Path, fmt: str) -> None:
    """The message names what the weights-only unpickler refused (a global such as posix.system, or the
    opcode of a legacy pickle), not torch's general paragraph (which advises weights_only=False) nor its
    refusal to memory-map a legacy file."""
    from gkd.runtime.checkpoints import check_loadable

    canary = tmp_path / "pwned"
    path = tmp_path / "rng-rank0.pt"
    if fmt == "zip":
        torch.save({"cpu": _Payload(canary)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"cpu": _Payload(canary)}, f)
    with pytest.raises(InputError, match="could run code") as caught:
        check_loadable(tmp_path)
    line = str(caught.value)
    assert "mmap" not in line and "weights_only" not in line and "Weights only load failed" not in line
    assert ("GLOBAL posix.system" if fmt == "zip" else "Unsupported operand") in line
    assert not canary.exists()


# ----------------------------------------------------------------------------------------------------------
# A finished run ends with its student; resume finishes one that does not


def test_a_done_run_is_not_resumed_but_can_be_extended(reference: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--resume", "--out", str(reference)])
    _one_line(result, 2, "is done (12 steps")
    # Stopped after its last checkpoint, before the student was saved: --steps 13 trains one step more.
    out = _copy_at(reference, tmp_path, STEPS)
    run_job(None, out=str(out), resume=True, steps=STEPS + 1, echo=lambda _: None)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 2)) and rows[:STEPS] == _rows(reference)
    assert json.loads((out / "run.json").read_text())["completed_steps"] == STEPS + 1
    assert (out / "student" / "config.json").stat().st_size > 0


def test_the_log_keeps_its_rows_when_the_last_one_was_cut(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    log.write_text("\n".join(rows) + '\n{"step": 4, "lo')
    assert _kept_log_rows(log, 2) == rows[:2] and _kept_log_rows(log, 3) == rows
    log.write_text(rows[0] + "\n{garbage\n" + rows[2] + "\n")
    with pytest.raises(InputError, match="log.jsonl line 2 is damaged"):
        _kept_log_rows(log, 3)


def test_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """torch.save on a full device reports "unexpected pos N vs M"; a checkpoint's write says what
    happened."""
    full = pytest.raises(CheckpointWriteError, match="most often because the disk is full")
    with full as caught, write_errors("checkpoint step-3", tmp_path):
        torch.save({"w": torch.zeros(4096)}, "/dev/full")
    assert "\n" not in str(caught.value)
    nospace = pytest.raises(CheckpointWriteError, match="no space left on the device while writing x")
    with nospace, write_errors("x", tmp_path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------------------------------------
# Interrupted runs are found, not lost; one run at a time per OUT


def _stray(reference: Path, tmp_path: Path, step: int, name: str) -> Path:
    """The temporary folder a SIGKILLed parent leaves: the run stopped after its checkpoint at `step`."""
    root = tmp_path / "runs"
    root.mkdir(exist_ok=True)
    return Path(shutil.move(_copy_at(reference, tmp_path, step), root / name))


def test_a_killed_parents_folder_is_resumed_and_never_started_over(reference: Path, tmp_path: Path) -> None:
    # The name a run of this very process would have had before (the PID alone): it is not removed.
    stray = _stray(reference, tmp_path, 9, f".run.partial-{os.getpid()}")
    out = stray.parent / "run"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--steps", str(STEPS), "--out", str(out)]
    line = _one_line(CliRunner().invoke(main, args), 2, str(stray))
    assert "--resume --out" in line and "--discard-partial" in line
    assert (stray / "checkpoints" / "step-9" / "complete").is_file() and not out.exists()
    said: list[str] = []
    run_job(None, out=str(out), resume=True, echo=said.append)
    assert f"Found the interrupted run of {out} in {stray}; moved it to {out}" in said
    assert not stray.exists() and _rows(out) == _rows(reference)
    again, weights = _weights(out), _weights(reference)
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_temporary_folders_are_unique_and_names_fit(tmp_path: Path) -> None:
    assert publishing.partial_name(tmp_path / "o") != publishing.partial_name(tmp_path / "o")
    name = "x" * 245  # a legal folder name, but not with a suffix
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path / name)]
    _one_line(CliRunner().invoke(main, args), 2, "must fit the 255-byte limit of a file name")
    assert not any(tmp_path.iterdir())


def test_discard_partial_starts_over(reference: Path, tmp_path: Path, monkeypatch: Any) -> None:
    stray = _stray(reference, tmp_path, 2, ".run.partial-1-00000000")
    started: list[Any] = []

    def launch(fn: Any, args: Any, *, processes: int, cpu_ops: Any = ()) -> None:
        started.append(args[1])
        (Path(args[1].out) / "student").mkdir()

    monkeypatch.setattr(executor, "launch", launch)
    out = stray.parent / "run"
    run_job(str(ROOT / "configs" / "tiny.yaml"), out=str(out), discard_partial=True, echo=lambda _: None)
    assert started and not stray.exists() and (out / "student").is_dir()
    assert not list(stray.parent.glob(".run.*"))  # no lock file left either


def test_two_resumes_of_one_out_the_second_exits_at_once(reference: Path, tmp_path: Path) -> None:
    out = _copy_at(reference, tmp_path, 9)
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    first = subprocess.Popen(
        [sys.executable, "-c", code, "run", "--resume", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = tmp_path / ".at-9.lock"
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), first.communicate()[1][-2000:]
        start = time.monotonic()
        result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
        assert time.monotonic() - start < 10
        _one_line(result, 2, f"another gkd run is using {out} (it holds the lock {lock})")
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _rows(out) == _rows(reference) and not lock.exists()


def test_a_run_killed_during_its_save_publishes_no_student(
    reference: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """A worker killed while the student was written (after the last checkpoint): OUT is published for the
    resume, without the cut-short student folder; the resume saves it."""
    from gkd.runtime.launch import WorkerFailedError

    def launch(fn: Any, args: Any, *, processes: int, cpu_ops: Any = ()) -> None:
        folder = Path(args[1].out)
        shutil.copytree(reference / "checkpoints", folder / "checkpoints")
        (folder / "student").mkdir()
        (folder / "student" / "config.json").write_text("")  # what a kill in save_pretrained left
        raise WorkerFailedError("a worker died without reporting an error (rank 0 exit code -9)")

    monkeypatch.setattr(executor, "launch", launch)
    out = tmp_path / "run"
    with pytest.raises(WorkerFailedError, match="resume from its last checkpoint"):
        run_job(str(ROOT / "configs" / "tiny.yaml"), steps=STEPS, out=str(out), save_every=1, echo=print)
    assert (out / "checkpoints" / "latest").is_file() and not (out / "student").exists()
    assert not list(tmp_path.glob(".run.*"))


def test_a_sigkilled_parent_leaves_a_run_that_resume_finds(reference: Path, tmp_path: Path) -> None:
    """The parent of a real run killed with SIGKILL once its first checkpoint is complete: its workers die
    with it, and `--resume --out OUT` finds the temporary folder and ends as the uninterrupted run."""
    out = tmp_path / "run"
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--steps", str(STEPS), "--save-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any((p / "checkpoints" / "latest").is_file() for p in tmp_path.glob(".run.partial-*")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before its first checkpoint was seen"
        workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat") if _ppid(p) == proc.pid]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers and not any(Path(f"/proc/{w}").exists() for w in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    [stray] = tmp_path.glob(".run.partial-*")
    assert not out.exists()
    said: list[str] = []
    run_job(None, out=str(out), resume=True, echo=said.append)
    assert any(line.startswith(f"Found the interrupted run of {out} in {stray}") for line in said)
    assert _rows(out) == _rows(reference)
    again, weights = _weights(out), _weights(reference)
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def _ppid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_new_run_of_an_out_in_use_names_the_lock(reference: Path, tmp_path: Path) -> None:
    """A live run's folder holds checkpoints too: a second run of its OUT is told that OUT is in use, not
    offered to discard the live run's folder."""
    stray = _stray(reference, tmp_path, 2, ".run.partial-1-00000000")
    out = stray.parent / "run"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--discard-partial"]
    with publishing.out_lock(out):  # as the live run holds it
        _one_line(CliRunner().invoke(main, args), 2, f"another gkd run is using {out}")
    assert (stray / "checkpoints" / "latest").is_file()
