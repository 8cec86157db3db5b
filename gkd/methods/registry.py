"""The method registry: name -> `MethodSpec`.

Family files (`gkd/methods/<family>.py`, e.g. logit.py, relation.py) call `register(spec)` at import time. The
registry imports every module of this package that is not part of the framework (see `_FRAMEWORK`) the first
time a method is looked up, so adding a family file needs no edit anywhere else.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from gkd.errors import InputError
from gkd.methods.spec import MethodSpec

_FRAMEWORK = frozenset(
    {"spec", "mapping", "registry", "losses", "combine", "distill_loss", "hooks", "report"}
)
_METHODS: dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method. Registering a second, different spec under the same name is a programming error."""
    existing = _METHODS.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"method {spec.name!r} is registered twice with different specs")
    _METHODS[spec.name] = spec
    return spec


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import gkd.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _FRAMEWORK and not info.name.startswith("_"):
            importlib.import_module(f"gkd.methods.{info.name}")


def names() -> list[str]:
    """All registered method names, sorted."""
    _load_families()
    return sorted(_METHODS)


def get(name: str) -> MethodSpec:
    """The spec of method `name`; an unknown name raises InputError suggesting the nearest names."""
    _load_families()
    spec = _METHODS.get(name)
    if spec is None:
        near = difflib.get_close_matches(name.lower(), list(_METHODS), n=3, cutoff=0.5)  # "KD" -> kd
        hint = f"did you mean {', '.join(near)}?" if near else "run `gkd methods` for the list"
        raise InputError(f"unknown method {name!r}; {hint}")
    return spec
