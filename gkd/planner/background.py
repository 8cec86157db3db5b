"""Run an independent piece of the tracing work in a forked child, so two traces use two cores.

Tracing a model (`gkd.planner.trace`) is single-threaded Python: the exported graph and the fake-tensor
saved-tensor traces of one model do not depend on each other, so `in_background(fn)` forks, runs `fn` in the
child and hands back a function that returns its (pickled) result. The parent keeps working meanwhile.

Design choices:
- fork, not spawn: the child inherits the imported torch and transformers (several seconds to import again).
  Callers import what `fn` needs before forking, or both processes would pay for it.
- The result is identical either way: if forking is unavailable or disabled (`GKD_NO_FORK=1`, one CPU), or
  the child fails, crashes or does not answer within TIMEOUT_S, `fn` simply runs in the calling process (so an
  error is raised there, as without the child). Only plain, picklable data crosses the pipe.
- The child leaves with `os._exit`, so no atexit handlers, buffered output or temporary files of the parent
  run twice; the parent waits for it, so its CPU time counts in the parent's children usage.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_S = 300.0


def forking_enabled() -> bool:
    disabled = os.environ.get("GKD_NO_FORK", "") not in ("", "0")
    return hasattr(os, "fork") and not disabled and (os.cpu_count() or 1) > 1


def in_background(fn: Callable[[], T]) -> Callable[[], T]:
    """Start `fn` in a forked child; the returned function waits for and returns its result."""
    if not forking_enabled():
        return fn
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
    except OSError:
        return fn
    if pid == 0:  # the child: compute, send, leave without running the parent's exit handlers
        code = 1
        try:
            os.close(read_fd)
            payload = pickle.dumps(fn(), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
            code = 0
        except BaseException:  # noqa: BLE001 - any failure: the parent recomputes and raises it
            pass
        finally:
            os._exit(code)
    os.close(write_fd)
    done: list[T] = []

    def result() -> T:
        if done:
            return done[0]
        done.append(_collect(pid, read_fd, fn))
        return done[0]

    return result


def _collect(pid: int, read_fd: int, fn: Callable[[], T]) -> T:
    """Read the child's answer, reap it, and fall back to running `fn` here when there is none."""
    chunks: list[bytes] = []
    ok = True
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], TIMEOUT_S)
            if not ready:  # a stuck child: give up on it
                ok = False
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if ok and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and chunks:
        return pickle.loads(b"".join(chunks))
    return fn()
