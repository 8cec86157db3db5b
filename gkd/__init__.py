"""gkd: knowledge distillation for large language models, built as a memory-planning compiler.

`gkd.plan(config)` plans a job (a `gkd.config.Config`, a path to a YAML/JSON config, a mapping, or None for
the headline job) and returns a `gkd.planner.plan.Plan`. Imports are lazy so that `import gkd` stays cheap.
"""

from __future__ import annotations

from typing import Any


def plan(config: Any = None) -> Any:
    """Plan a distillation job; see gkd.planner.pipeline."""
    from gkd.planner.cli import as_config
    from gkd.planner.pipeline import plan as _plan

    return _plan(as_config(config))


__all__ = ["plan"]
