"""Models named by Hugging Face Hub id (`org/name`, or `org/name@revision`), resolved to a folder of the local
Hugging Face cache.

Design choices:
- A model reference that is neither a preset nor an existing path, and reads `org/name[@revision]`, is a hub
  id. It becomes the cache's snapshot folder (`$HF_HOME/hub/models--org--name/snapshots/<commit>`), and from
  there on gkd treats it as any checkpoint folder: a plan records that folder, the runtime loads from it.
- What each command needs, and no more: planning and inspecting read `config.json` (and the tokenizer files,
  a few kB); `gkd run` also needs the weights (`fetch_weights`), fetched in its pre-flight, before any
  worker starts.
- The cache first: with `HF_HUB_OFFLINE=1` nothing is downloaded, and an id missing from the cache is refused
  with one line naming the id and HF_HUB_OFFLINE. Otherwise `huggingface_hub` downloads what is missing.
- The environment is read at each call (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE), not when huggingface_hub was
  imported, so a process that sets them late (tests, notebooks) gets what it set.
- Model code (`auto_map`) runs only for a model whose config entry says `trust_remote_code: true`; any other
  such model is refused (gkd.models.prepare_remote_code).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gkd.errors import InputError

# org/name with an optional @revision (a branch, tag or commit), as the Hub spells repository ids.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[^/]+)/?$")

# The model's own code files come too: they run only for a model trusted by its config (gkd.models).
CONFIG_PATTERNS = ["config.json", "*.py"]
TOKENIZER_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "generation_config.json",
]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_hub_id(ref: str) -> bool:
    """Whether `ref` names a Hub repository rather than a local file (existing paths always win)."""
    if not _HUB_ID.match(ref) or ref.endswith(".json"):
        return False
    try:
        return not Path(ref).expanduser().exists()
    except OSError:
        return False


def hub_name(path: str | Path) -> str | None:
    """`org/name` when `path` is a snapshot folder of the Hugging Face cache, else None."""
    found = _SNAPSHOT.search(str(path))
    return f"{found['org']}/{found['name']}" if found else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def snapshot_folder(ref: str, *, weights: bool = False) -> Path:
    """The local snapshot folder of hub id `ref` holding its config.json and tokenizer files (and, with
    `weights`, its weight files), downloaded first when missing and HF_HUB_OFFLINE allows it."""
    match = _HUB_ID.match(ref)
    if match is None:
        raise InputError(f"{ref!r} is not a Hugging Face Hub id; write it as org/name or org/name@revision")
    repo, revision = match["repo"], match["rev"]
    patterns = CONFIG_PATTERNS + TOKENIZER_PATTERNS + (WEIGHT_PATTERNS if weights else [])
    offline = _offline()
    where = cache_dir()
    missing = (
        f"model {ref} is neither a local file or folder nor in the Hugging Face cache ({where})"
        if not weights
        else f"the weights of model {ref} are not in the Hugging Face cache ({where})"
    )
    if offline:
        hint = (
            f"and HF_HUB_OFFLINE=1 forbids downloading; download it once with `hf download {repo}` "
            "(or unset HF_HUB_OFFLINE)"
        )
    else:
        hint = "and it could not be downloaded from the Hugging Face Hub (no connection?)"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=where,
                allow_patterns=patterns,
                local_files_only=offline,
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise InputError(f"{missing}, {hint}") from None
    except HfHubHTTPError as err:  # no such repository, a gated one, no such revision, the Hub refusing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"model {ref}: the Hugging Face Hub refused it: {first}") from None
    except OSError as err:  # no network: huggingface_hub found nothing in the cache either
        raise InputError(f"{missing}, {hint}: {type(err).__name__}") from None
    if not (folder / "config.json").is_file():
        raise InputError(
            f"model {ref}: its snapshot in {folder} has no config.json; is it a model repository?"
        )
    if weights and not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise InputError(f"{missing}, {hint}")
    return folder


def fetch_weights(ref: str) -> None:
    """Make sure the weights of a model given by hub id (or as its snapshot folder) are in the cache, for
    `gkd run`; a local folder or preset is left alone."""
    name = hub_name(ref)
    if name is not None:
        revision = _SNAPSHOT.search(str(ref))["rev"]  # type: ignore[index]
        snapshot_folder(f"{name}@{revision}", weights=True)
    elif is_hub_id(ref):
        snapshot_folder(ref, weights=True)
