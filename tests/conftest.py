"""Test-session setup: the planner's disk cache goes to a fresh folder, never the user's ~/.cache/gkd, so
tests neither read stale entries nor leave files behind (a test that needs its own folder sets it)."""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE = None if "GKD_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="gkd-test-cache-")
if _CACHE is not None:
    os.environ["GKD_CACHE_DIR"] = _CACHE


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
