"""The planner's disk cache: JSON results of the passes that need torch, so later runs import none.

An entry lives at `cache_dir()/KIND/[NAME-]KEY.json`. KEY hashes the inputs with a fingerprint of the gkd
sources that compute the value (`source_fingerprint`, from their content) and the installed torch release.
transformers is keyed by content, never by its release number: callers put `modeling_fingerprint(model_type)`
in the key data, a hash of the architecture's own transformers code (the modeling and configuration files of
its folder, e.g. models/llama/). That is where a release changes what a model is (its layers, parameters, the
tensors its forward keeps), and releases change some architectures and leave most alone: 5.24.0 to 5.25.0
changed bert, gemma3, mixtral and phi3 and kept llama, gpt2, opt, bloom, glm, qwen2, qwen3 and mistral byte
for byte. The shared modules every architecture calls (masks, RoPE, SDPA, modeling_utils) are left out of the
key: they change in most releases, often in ways no traced value sees (5.25.0 changed the mask functions'
deprecation decorators, packed-sequence masks of bidirectional models and YaRN's scale helper), and the value
the pack holds is what decides: tests/planner/test_pack.py recomputes every pack entry on whatever
transformers is installed and never skips, so a release that changes a packed value through them fails it
until the pack is rebuilt. torch stays keyed by release: the exported graphs and the tensors autograd saves
come from its decompositions and kernels, spread over too much code to hash.

Entries are written to a temporary file and renamed, so a reader never sees half of one. Each entry of the
user's cache carries a checksum of its value (`{"sum": ..., "value": ...}`): an entry that is corrupt,
partial, unreadable, edited by hand or written without one (older versions) is computed again rather than
trusted, since the planner would otherwise fail on whatever it holds; an unwritable folder only costs speed.

Behind the user's cache sits the pack (`PACK_DIR`, shipped inside the package; see gkd.planner.pack): the same
entries, precomputed for every preset and reference model by `python -m gkd.planner.pack`. Because keys hash
content and versions, never paths or times, a pack entry is found exactly when this install's gkd sources,
torch release and architecture code are the ones it was built with; otherwise the pack is simply not
consulted, and the value is computed. `GKD_NO_PACK=1` ignores the pack (to time or test the computation
itself).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gkd.files import write_atomically

_PACKAGE = Path(__file__).resolve().parent.parent
PACK_DIR = _PACKAGE / "data" / "pack"
# The libraries whose release keys every entry (torch: see the module docstring) and, for the record only
# (MANIFEST.json), the ones keyed by content.
_VERSIONED = ("torch",)
_RECORDED = ("torch", "transformers")


def cache_dir() -> Path:
    """`GKD_CACHE_DIR`, or ~/.cache/gkd."""
    return Path(os.environ.get("GKD_CACHE_DIR") or Path.home() / ".cache" / "gkd")


@functools.cache
def source_fingerprint(patterns: tuple[str, ...]) -> str:
    """A hash of the content of the gkd sources matching `patterns` (globs relative to the package).

    Content, not modification times: a fresh clone or an installed wheel of the same code gives the same
    fingerprint, so the shipped pack stays valid. Computed once per process (a few files, about a
    millisecond): sources do not change under a running planner, and a plan looks the fingerprint up for
    every entry it reads, re-plans included."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(_PACKAGE.glob(pattern)):
            h.update(str(path.relative_to(_PACKAGE)).encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


@functools.cache
def tool_versions(dists: tuple[str, ...] = _VERSIONED) -> dict[str, str]:
    """Installed versions of `dists` (default: the ones keyed by release), read from package metadata (no
    import). The local build tag is dropped (torch 2.13.0+cpu and 2.13.0+cu126 are one release): values are
    traced on the meta device, in the release's Python code, never through a device backend."""
    versions = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "none"
    return versions


def recorded_versions() -> dict[str, str]:
    """The torch and transformers releases, as MANIFEST.json records them (for people: keys use content)."""
    return tool_versions(_RECORDED)


@functools.cache
def transformers_dir() -> Path | None:
    """The installed transformers package folder, found without importing it."""
    found = importlib.util.find_spec("transformers")
    return Path(found.origin).parent if found is not None and found.origin else None


@functools.cache
def _architecture_folder(model_type: str) -> Path | None:
    """transformers' folder for `model_type`: models/<model_type>, else the one whose configuration file
    declares it (gemma3_text lives in models/gemma3)."""
    root = transformers_dir()
    if root is None or not model_type:
        return None
    direct = root / "models" / model_type.replace("-", "_")
    if direct.is_dir():
        return direct
    needles = (f'model_type = "{model_type}"', f"model_type = '{model_type}'")
    for config in sorted((root / "models").glob("*/configuration_*.py")):
        text = config.read_text(errors="replace")
        if any(n in text for n in needles):
            return config.parent
    return None


@functools.cache
def modeling_fingerprint(model_type: str) -> str:
    """A hash of the architecture's own transformers code: its folder's modeling and configuration files, by
    content (the module docstring says what it leaves out, and why). An architecture transformers does not
    ship (or no transformers) falls back to the release number, so nothing stale is ever matched."""
    root = transformers_dir()
    folder = _architecture_folder(model_type)
    if root is None or folder is None:
        return "release-" + tool_versions(("transformers",))["transformers"]
    files = sorted(folder.glob("modeling_*.py")) + sorted(folder.glob("configuration_*.py"))
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"absent")
    return h.hexdigest()[:16]


def entry_path(kind: str, key_data: Any, sources: tuple[str, ...], *, name: str = "") -> Path:
    """Where the entry for `key_data` lives, relative to a cache folder (the user's or the pack)."""
    payload = json.dumps(
        {"data": key_data, "src": source_fingerprint(sources), "versions": tool_versions()},
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    prefix = f"{name.replace('/', '_')}-" if name else ""
    return Path(kind) / f"{prefix}{key}.json"


def _read(path: Path, valid: Callable[[dict[str, Any]], bool], *, signed: bool) -> dict[str, Any] | None:
    """The entry at `path`, or None when it is absent, unreadable, truncated, not `valid`, or (`signed`: the
    user's cache) not carrying the checksum of its value."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None  # absent, unreadable or truncated
    if signed:
        if not isinstance(entry, dict) or set(entry) != {"sum", "value"}:
            return None
        if entry["sum"] != _checksum(_canonical(entry["value"])):
            return None
        entry = entry["value"]
    return entry if isinstance(entry, dict) and valid(entry) else None


def stored_value(path: Path) -> dict[str, Any]:
    """The value of the user's cache entry at `path` (what `gkd.planner.pack` ships); ValueError when the
    entry is damaged."""
    found = _read(path, lambda _: True, signed=True)
    if found is None:
        raise ValueError(f"cache entry {path} is damaged")
    return found


def _canonical(value: Any) -> str:
    """The value as the JSON text its checksum is taken of (keys sorted: the same after a round trip)."""
    return json.dumps(value, sort_keys=True, default=str)


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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
    """The JSON-able result for `key_data` from the user's cache, else from the pack, else `compute()`d and
    stored in the user's cache.

    name: a readable prefix for the file (e.g. the model's name); valid: whether a read entry is complete
    (one that is not is computed again); use_cache=False computes without reading or writing."""
    if not use_cache:
        return compute()
    relative = entry_path(kind, key_data, sources, name=name)
    path = cache_dir() / relative
    found = _read(path, valid, signed=True)
    if found is None and not os.environ.get("GKD_NO_PACK"):
        found = _read(PACK_DIR / relative, valid, signed=False)  # shipped with gkd, read-only
    if found is not None:
        return found
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _canonical(value)
        write_atomically(path, f'{{"sum": "{_checksum(text)}", "value": {text}}}', durable=False)
    except OSError:
        pass  # an unwritable cache folder costs only speed, never correctness
    return value
