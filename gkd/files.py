"""Durable, atomic file writes: the one home of gkd's "write to a temporary file, fsync, rename" (plan files,
run.json, checkpoint markers, the planner cache), of fsync by path (the saved student's files) and of telling
a killed writer's leftovers from a live one's (`process_alive`).

A reader, or a later run after a crash at any moment, sees the old file or the whole new one, never a
truncated one. The temporary file is `.NAME.tmp-PID-RANDOM` in the same folder (a rename is atomic only
within one file system; the random part keeps two threads or a reused PID apart), and it is removed when the
write fails or is interrupted, so that a full disk or Ctrl-C leaves nothing behind but the old file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts), for telling the temporary files
    of a killed writer from those of a live one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def fsync_path(path: Path) -> None:
    """Flush the file or folder `path` to disk (a folder: the names in it, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, *, durable: bool = True) -> None:
    """`path` holds `text` (UTF-8) or what it held before, whatever moment the process dies at. Raises the
    OSError of a failed write (the caller says what it was writing), with the temporary file removed.
    `durable=False` skips the fsyncs, for files whose loss in a crash of the machine costs only time (the
    planner cache, whose entries carry a checksum)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for open()
        try:
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a failed write, or Ctrl-C / SIGTERM (Terminated) in the middle of one
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)  # the rename itself survives a crash of the machine
