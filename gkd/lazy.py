"""Modules imported on first use: `torch = lazy_import("torch")` in a module that must import cheaply.

Planning never runs a model, so the modules it reads (the method library: specs, registration, `resolve`)
must import without torch, which alone takes about 2 s to import. Their loss and hook-op functions still use
torch in their bodies; they name it through a `LazyModule` bound at module level, which imports the real
module the first time an attribute is read.

Design choices:
- A stand-in object, not `importlib.util.LazyLoader`: LazyLoader puts the (lazy) module into `sys.modules`
  at once, so `"torch" in sys.modules` would no longer say whether torch was imported, and code that checks
  it (to report whether torch is loaded, or to pick a path) would be misled.
- On first use the stand-in copies the real module's namespace and turns into a plain module (its class
  becomes `LoadedModule`, which has no `__getattr__`), so later reads are ordinary module attribute lookups:
  hot loss paths pay neither an import statement per call nor a forwarding call per attribute. A name the
  real module gains after that (a submodule imported later) is still found: a miss falls through to the
  module-level `__getattr__` (PEP 562) set on the stand-in, which reads it from the real module.
- Only reading is supported. Setting an attribute on the stand-in would not reach the real module, so it is
  refused rather than silently diverging.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any


class LoadedModule(ModuleType):
    """A stand-in after its first use: a plain module mirroring the real one (reads cost nothing extra)."""

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(f"{self.__name__} is imported lazily here; set {attr!r} on the real module")

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r} (loaded)>"


class LazyModule(LoadedModule):
    """Stands in for module `name` until an attribute is read."""

    def __getattr__(self, attr: str) -> Any:
        # Only called for names not in the stand-in's namespace, i.e. once, on first use.
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        # Names the real module gains later (or serves from its own __getattr__) are read from it.
        self.__dict__["__getattr__"] = functools.partial(getattr, module)
        ModuleType.__setattr__(self, "__class__", LoadedModule)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r} (not loaded yet)>"


def lazy_import(name: str) -> Any:
    """A stand-in for module `name` (e.g. "torch", "torch.nn.functional") that imports it on first use."""
    return LazyModule(name)
