"""SIGTERM in `gkd run`'s parent: it raises `Terminated` (a BaseException, like KeyboardInterrupt) so that the
run's clean-up runs as on Ctrl-C, and the command exits with 143 after one line; forked workers keep the
default action (they must die at once when the launcher stops them). Ctrl-C ends the same way: one line, exit
130 (the shell's status for SIGINT), not click's blank line and "Aborted"."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

TERMINATED_EXIT = 128 + signal.SIGTERM  # the shell's exit status for a process ended by SIGTERM
INTERRUPTED_EXIT = 128 + signal.SIGINT  # ... and by SIGINT (Ctrl-C)


_sigterm_pid: int | None = None  # the process whose SIGTERM handler `sigterm_raises` installed


class Terminated(BaseException):
    """SIGTERM arrived in the parent (`sigterm_raises`); a BaseException, like KeyboardInterrupt, so that no
    `except Exception` stops it before the run's clean-up."""


def _reset_sigterm_in_child() -> None:
    # A forked worker must die of SIGTERM at once, as the launcher's clean-up of its peers expects (a Python
    # handler runs only between bytecodes, not in a collective); see gkd.runtime.launch.
    if _sigterm_pid is not None and os.getpid() != _sigterm_pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


with contextlib.suppress(AttributeError):  # os.register_at_fork: POSIX only
    os.register_at_fork(after_in_child=_reset_sigterm_in_child)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the run's temporary folder exists: SIGTERM (`timeout`, `kill`, a scheduler) raises Terminated in
    the parent, so the run's clean-up runs as on Ctrl-C; forked workers keep the default action."""
    global _sigterm_pid
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != _sigterm_pid:  # a child forked before the reset: die as SIGTERM would kill it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous, previous_pid = signal.signal(signal.SIGTERM, handler), _sigterm_pid
    _sigterm_pid = os.getpid()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm_pid = previous_pid  # an enclosing sigterm_raises (run_job's) stays in force


def stops_on_sigterm(fn: Callable[..., Path]) -> Callable[..., Path]:
    """SIGTERM or Ctrl-C at any point of `fn` (while the data is tokenized, too) runs the same clean-up and
    exits with 143 or 130 after one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        try:
            with sigterm_raises():
                return fn(*args, **kwargs)
        except (Terminated, KeyboardInterrupt) as err:
            stop(err)

    return wrapper


def stop(err: Terminated | KeyboardInterrupt, what: str = "") -> NoReturn:
    """Exit as the signal behind `err` asks (143 or 130), after one line on stderr: "gkd: stopped by SIGTERM"
    or "gkd: interrupted", then `what` (e.g. "; resume ...")."""
    click.echo(f"gkd: {interruption(err)}{what}", err=True)
    sys.exit(TERMINATED_EXIT if isinstance(err, Terminated) else INTERRUPTED_EXIT)


def interruption(err: BaseException) -> str:
    return "stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted"
