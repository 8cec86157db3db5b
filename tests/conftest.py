"""Test-session setup: the planner's disk cache goes to a fresh folder, never the user's ~/.cache/gkd, so
tests neither read stale entries nor leave files behind (a test that needs its own folder sets it)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_CACHE = None if "GKD_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="gkd-test-cache-")
if _CACHE is not None:
    os.environ["GKD_CACHE_DIR"] = _CACHE


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, dict[str, Any]], Path]:
    """A Hugging Face cache in tmp_path (HF_HOME, offline): `save(repo_id, config)` saves a random-init model
    of that transformers config under the id, in the cache's layout, and returns its snapshot folder."""
    from gkd.models import build_model, spec_from_config

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def save(repo_id: str, config: dict[str, Any]) -> Path:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = tmp_path / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        spec = spec_from_config(dict(config), name=repo_id, dtype="float32")
        build_model(spec, device="cpu").save_pretrained(repo / "snapshots" / commit)
        return repo / "snapshots" / commit

    return save
