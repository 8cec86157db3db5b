"""Model specs for the planner, through the disk cache: building a ModelSpec imports transformers (about
2 s), reading a cached one imports nothing.

An entry is keyed by the preset's name or the content of the config.json (`spec_key`) and by the content of
transformers' code for its architecture (`modeling_fingerprint`), never by a path, and
holds no path (`spec_entry`), so the same file in another folder (a fresh clone, another user's copy) finds
the same entry, including the one shipped in the pack (gkd.planner.pack). `load_spec` names the spec as the
caller gave it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from gkd.planner.cache import cached, modeling_fingerprint

# The sources whose code builds a ModelSpec: a change to them invalidates cached specs.
SPEC_SOURCES = ("models.py", "architecture.py", "planner/specs.py")


def spec_key(ref: str) -> Any:
    """A cache key for a model reference: the preset name, or the content of its config.json (never the
    path, so the same file anywhere, e.g. in a fresh clone, finds the same entry)."""
    p = Path(ref).expanduser()
    target = p / "config.json" if p.is_dir() else p
    if target.is_file():
        text = target.read_bytes()
        return {
            "config": hashlib.sha256(text).hexdigest(),
            "modeling": modeling_fingerprint(_model_type(text)),
        }
    return {"ref": ref, "modeling": modeling_fingerprint(_model_type(ref))}


def _model_type(source: bytes | str) -> str:
    """The model_type of a config file's bytes or of a preset name ("" when there is none to read): what
    the spec's transformers code is keyed by (gkd.planner.cache.modeling_fingerprint)."""
    if isinstance(source, str):
        from gkd.models import preset_config

        config = preset_config(source)
        return str(config.get("model_type", "")) if config else ""
    try:
        value = json.loads(source)
    except ValueError:
        return ""
    return str(value.get("model_type", "")) if isinstance(value, dict) else ""


def spec_entry(ref: str) -> dict[str, Any]:
    """The cache entry of a model reference: its ModelSpec as plain data, without the path it was read from
    (an entry is keyed by content, so the same file elsewhere finds it; `load_spec` names it as given)."""
    from gkd.models import resolve_model

    data = dataclasses.asdict(resolve_model(ref))
    if Path(ref).expanduser().exists():
        data["name"], data["description"] = "", ""
    return data


def load_spec(ref: str) -> Any:
    """A ModelSpec for `ref`, through the disk cache (building one imports transformers). A Hugging Face Hub
    id is read from its snapshot folder in the local cache (gkd.hub), keyed like any folder by content."""
    from gkd.hub import hub_name, is_hub_id, snapshot_folder
    from gkd.models import ModelSpec

    if is_hub_id(ref):
        ref = str(snapshot_folder(ref))
    _prepare_remote_code(ref)

    def compute() -> dict[str, Any]:
        from gkd.status import status

        with status(f"reading {ref}"):
            return spec_entry(ref)

    data = cached("specs", spec_key(ref), SPEC_SOURCES, compute)
    p = Path(ref).expanduser()
    if not p.exists():
        return ModelSpec(**{**data, "name": ref})
    # A file or folder: named by its file (or folder) name rather than a long path; says where it was read.
    config = p / "config.json" if p.is_dir() else p
    name = hub_name(p) or (p.name if p.is_dir() else p.stem)
    return ModelSpec(**{**data, "name": name, "description": f"from {config}"})


def _prepare_remote_code(ref: str) -> None:
    """Register (if trusted) or refuse a folder's custom model code before the cache is asked, so that a
    spec cached by a trusted job neither skips the refusal nor leaves its classes unknown to transformers."""
    from gkd.models import prepare_remote_code, read_config_json

    p = Path(ref).expanduser()
    config_path = p / "config.json" if p.is_dir() else p
    if config_path.is_file() and b"auto_map" in config_path.read_bytes():
        prepare_remote_code(read_config_json(config_path), config_path.parent, name=ref)
