"""OUT and the run's temporary folder: how `gkd run` names, locks, publishes and cleans up the folder it
writes (gkd.runtime.executor runs the job; this is where its output goes).

A run writes into `.OUT.partial-PID-RANDOM` beside OUT (`partial_name`) while holding `.OUT.lock`
(`out_lock`: one run at a time per OUT), and renames it to OUT when every rank is done (`publish`, within
`run_in`). A run that fails or is interrupted before its first checkpoint leaves nothing; after one, OUT is
published so that it can be resumed (`settle`). Temporary folders left by a killed parent (`strays`) are
kept when they hold checkpoints or a finished run (`worth_keeping`), for `--resume` to adopt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from gkd.errors import GkdError, InputError
from gkd.runtime.checkpoints import CHECKPOINTS, LATEST
from gkd.runtime.launch import WorkerFailedError
from gkd.runtime.signals import Terminated, interruption, stop

# The bytes `.NAME.partial-PID-RANDOM` adds to OUT's name (a PID has at most 7 digits), and the limit of a
# file name on Linux file systems.
_PARTIAL_EXTRA = len(".") + len(".partial-") + 7 + 1 + 8


_NAME_MAX = 255


def partial_name(out_path: Path) -> Path:
    """The temporary folder of a new run: unique even where a PID repeats (a later run after a killed one)."""
    return out_path.parent / f".{out_path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def check_out_name(out_path: Path) -> None:
    size = len(os.fsencode(out_path.name))
    if size + _PARTIAL_EXTRA > _NAME_MAX:
        raise InputError(
            f"--out's folder name is {size} bytes long; the run's temporary folder beside it "
            f"(.NAME.partial-PID-RANDOM) must fit the {_NAME_MAX}-byte limit of a file name, so use a name "
            f"of at most {_NAME_MAX - _PARTIAL_EXTRA} bytes"
        )


def strays(out_path: Path) -> list[Path]:
    """Temporary folders of earlier runs of OUT: `.OUT.partial-*` beside it."""
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if not parent.is_dir():
        return []
    prefix = f".{out_path.name}.partial-"
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def has_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINTS / LATEST).is_file()


def worth_keeping(stray: Path) -> bool:
    """A leftover temporary folder holds a run to continue (checkpoints) or a finished one (its workers went
    on after their parent was killed, and saved the student)."""
    return has_checkpoint(stray) or is_done(stray)


def all_steps_done(run: dict[str, Any]) -> bool:
    """Whether run.json says that every step is done and the student saved (the last thing a run writes)."""
    try:
        return int(run.get("completed_steps", 0)) >= int(run["steps"])
    except (KeyError, TypeError, ValueError):
        return False


def is_done(out_path: Path) -> bool:
    try:
        run = json.loads((out_path / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(run, dict) and all_steps_done(run) and (out_path / "student").is_dir()


@contextlib.contextmanager
def out_lock(out_path: Path) -> Iterator[None]:
    """Hold `.OUT.lock` (fcntl.flock) beside OUT: one run at a time per OUT. Refused at once, in one line,
    while another run holds it. The file is removed on release; a lock file whose name was removed or
    replaced meanwhile is not the lock, so it is taken again (another run removed it on its release)."""
    lock = (out_path.parent if str(out_path.parent) else Path(".")) / f".{out_path.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise InputError(
                f"cannot create the lock file {lock} that keeps other runs out of {out_path} "
                f"({err.strerror or err}); {out_path}'s folder must exist and be writable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"another gkd run is using {out_path} (it holds the lock {lock}); wait for it to finish or "
                "stop it, or use another --out"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


class OutputKeptError(GkdError):
    """A run's output could not be moved to OUT: it is kept in the temporary folder (exit code 1)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # why OUT could not take it


def run_in(tmp: Path, out_path: Path, run: Callable[[], None]) -> None:
    """`run()` writes the run into `tmp`; then `tmp` becomes OUT (gkd.runtime.executor's
    `_run_and_publish` says what a failure or an interruption leaves)."""
    kept = False
    try:
        run()
        try:
            publish(tmp, out_path)
        except OutputKeptError:
            kept = True
            raise
    except (WorkerFailedError, KeyboardInterrupt, Terminated) as err:
        try:
            settle(tmp, out_path, err)
        except OutputKeptError:
            kept = True
            raise
    finally:
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)


def settle(tmp: Path, out_path: Path, err: BaseException) -> NoReturn:
    """After a failure or an interruption of the run in `tmp`: publish it when it has a checkpoint (to
    resume), else remove it; then raise `err`'s error or stop as its signal asks."""
    if not is_done(tmp):
        # Not done: a student folder there is cut short (or not yet renamed); OUT gets none.
        for partial in (tmp / "student", tmp / "student.partial"):
            shutil.rmtree(partial, ignore_errors=True)
    if not has_checkpoint(tmp) and not is_done(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise err
        stop(err, "; the unfinished run was removed")
    # The checkpoints are worth keeping: publish what there is, so that the run can be resumed.
    what = str(err) if isinstance(err, Exception) else interruption(err)
    try:
        publish(tmp, out_path)
    except OutputKeptError as failed:
        raise OutputKeptError(
            f"{what}; {failed.reason}, so its checkpoints are kept in {tmp}: resume with "
            f"`gkd run --resume --out {tmp}`"
        ) from None
    resume = f"resume from its last checkpoint with `gkd run --resume --out {out_path}`"
    if isinstance(err, Exception):
        raise WorkerFailedError(f"{err}; {resume}") from None
    stop(err, f"; {resume}")


def publish(tmp: Path, out_path: Path) -> None:
    """Rename the run's folder to OUT, which was checked empty (or absent) before the run: rename(2) replaces
    an empty folder in one step. Raises OutputKeptError, `tmp` untouched, when OUT cannot take it: something
    was written into OUT during the run, or OUT cannot be replaced."""
    try:
        tmp.rename(out_path)
    except OSError as err:
        if out_path.is_dir() and any(out_path.iterdir()):
            reason = f"{out_path} was written to during the run and is not empty"
        else:
            reason = f"{out_path} cannot be replaced ({err.strerror or err})"
        raise OutputKeptError(
            f"the run finished, but {reason}; its output is kept in {tmp}: move it where you want it "
            f"(e.g. `mv {tmp} {out_path}` once {out_path} is out of the way)",
            reason=reason,
        ) from None
