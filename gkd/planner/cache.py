"""The planner's disk cache: JSON results of the passes that need torch, so later runs import none.

An entry lives at `cache_dir()/KIND/[NAME-]KEY.json`. KEY hashes the inputs with a fingerprint of the gkd
sources that compute the value (`source_fingerprint`), so a change to that code makes a new entry instead of
reading a stale one. Entries are written to a temporary file and renamed, so a reader never sees half of one.
A corrupt, partial or unreadable entry is computed again, and an unwritable folder only costs speed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """`GKD_CACHE_DIR`, or ~/.cache/gkd."""
    return Path(os.environ.get("GKD_CACHE_DIR") or Path.home() / ".cache" / "gkd")


@functools.cache
def source_fingerprint(patterns: tuple[str, ...]) -> str:
    """A hash of the gkd sources matching `patterns` (globs relative to the package): size and mtime of each.

    Computed once per process: sources do not change under a running planner, and a plan looks the
    fingerprint up for every entry it reads, re-plans included."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(_PACKAGE.glob(pattern)):
            stat = path.stat()
            h.update(f"{path.relative_to(_PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached(
    kind: str,
    key_data: Any,
    sources: tuple[str, ...],
    compute: Callable[[], dict[str, Any]],
    *,
    name: str = "",
    valid: Callable[[dict[str, Any]], bool] = lambda _: True,
    use_cache: bool = True,
) -> dict[str, Any]:
    """The JSON-able result for `key_data` from the cache, or `compute()`d and stored.

    name: a readable prefix for the file (e.g. the model's name); valid: whether a read entry is complete
    (one that is not is computed again); use_cache=False computes without reading or writing."""
    if not use_cache:
        return compute()
    payload = json.dumps({"data": key_data, "src": source_fingerprint(sources)}, sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    prefix = f"{name.replace('/', '_')}-" if name else ""
    path = cache_dir() / kind / f"{prefix}{key}.json"
    try:
        value = json.loads(path.read_text())
        if isinstance(value, dict) and valid(value):
            return value
    except (OSError, ValueError):
        pass  # absent, unreadable or truncated: compute it
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, default=str))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache folder costs only speed, never correctness
    return value
