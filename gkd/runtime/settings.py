"""How a run was started: `RunSettings` (what a worker needs besides the plan, resolved and validated by the
parent) and OUT/run.json (those settings and how far the run got; what a resume reuses)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.planner.plan import Plan


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What a worker needs besides the plan: everything is resolved and validated by the parent."""

    data: str | None
    steps: int
    seed: int
    out: str  # the folder the workers write into (a temporary one, renamed to OUT at the end of a new run)
    log_every: int
    notes: tuple[str, ...] = ()
    save_every: int = 0  # a DeepSpeed checkpoint every this many steps (0: none)
    keep_last: int = 0  # keep only this many of the newest checkpoints (0: all)
    start_step: int = 0  # steps already done (resume from the checkpoint `resume_tag`)
    resume_tag: str = ""
    resume_universal: bool = False  # resume_tag was written by another world size: load its universal form
    eval_data: str | None = None  # held-out text: the student's own loss on it (None: no evaluation)
    eval_every: int = 0  # evaluate every this many steps (0: at the end only)
    eval_batches: int = 8  # micro-batches per rank in one evaluation
    data_tokens: str = ""  # the stored ids' file name: it changes when the data or its tokenizer does


def write_run_json(
    folder: Path,
    settings: RunSettings,
    plan: Plan,
    world: int,
    *,
    completed: int,
    memory: dict[str, Any] | None = None,
) -> None:
    """OUT/run.json: how the run was started (what a resume reuses), how far it got and, once steps ran, its
    memory: the plan's predicted device and host peaks against the measured ones, with the error |predicted -
    measured| / measured (`gkd.runtime.memory.MemoryRecord.summary`)."""
    summary = {
        "steps": settings.steps,
        "completed_steps": completed,
        "processes": world,
        "seed": settings.seed,
        "data": settings.data,
        "save_every": settings.save_every,
        "keep_last": settings.keep_last,
        "eval_data": settings.eval_data,
        "eval_every": settings.eval_every,
        "eval_batches": settings.eval_batches,
        "data_tokens": settings.data_tokens,
        "strategy": plan.strategy.describe(),
        "recomputed_layers": list(plan.strategy.recompute_layers),
        "tap_loss_executed": plan.strategy.tap_loss,
        "notes": list(settings.notes),
    }
    if memory is not None:
        summary["memory"] = memory
    # Whole or as before, whatever moment the process dies at: a resume reads it.
    from gkd.files import write_atomically

    write_atomically(folder / "run.json", json.dumps(summary, indent=2))
