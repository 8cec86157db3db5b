"""gkd.files.write_atomically, the one atomic write (plans, run.json, checkpoint markers, the planner cache):
a failed or interrupted write keeps the old file and leaves no temporary file beside it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import gkd.files
from gkd.planner import cache
from gkd.runtime import checkpoints


def _full_disk(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_checkpoint_marker_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    latest = tmp_path / "latest"
    latest.write_text("step-2")
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.write_atomically(latest, "step-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert latest.read_text() == "step-2"


def test_an_interrupted_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gkd.files.write_atomically(tmp_path / "run.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_cache_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GKD_NO_PACK", "1")
    monkeypatch.setattr(os, "replace", _full_disk)
    assert cache.cached("k", {"a": 1}, (), lambda: {"b": 2}) == {
        "b": 2
    }  # computed; the cache costs only time
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_every_atomic_write_is_the_one_in_gkd_files() -> None:
    assert checkpoints.write_atomically is gkd.files.write_atomically
    assert cache.write_atomically is gkd.files.write_atomically


def test_the_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("x" * 1000)
    gkd.files.write_atomically(path, "ok")
    assert path.read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
