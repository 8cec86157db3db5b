"""The planner's disk cache: a hit skips the computation, a corrupt or incomplete entry is recomputed, and
use_cache=False neither reads nor writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkd.planner.cache import cached


def test_hit_miss_corrupt_and_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path))
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"value": len(calls)}

    assert cached("k", {"a": 1}, ("planner/cache.py",), compute, name="m/x") == {"value": 1}
    assert cached("k", {"a": 1}, ("planner/cache.py",), compute, name="m/x") == {"value": 1}  # a hit
    (entry,) = (tmp_path / "k").glob("m_x-*.json")
    assert cached("k", {"a": 2}, ("planner/cache.py",), compute, name="m/x") == {"value": 2}  # other key
    entry.write_text('{"val')  # truncated
    assert cached("k", {"a": 1}, ("planner/cache.py",), compute, name="m/x") == {"value": 3}
    assert cached("k", {"a": 1}, ("planner/cache.py",), compute, name="m/x", valid=lambda d: "x" in d) == {
        "value": 4
    }
    assert not list((tmp_path / "k").glob(".*.tmp*"))  # no temporary file left behind


def test_without_cache_nothing_is_read_or_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path))
    assert cached("k", 1, (), lambda: {"v": 1}, use_cache=False) == {"v": 1}
    assert not (tmp_path / "k").exists()
