"""DeepSpeed checkpoints of a run (OUT/checkpoints/step-N with the `latest` pointer) and each rank's
random-number state: written every `--save-every` steps, read by `--resume`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gkd.errors import InputError

CHECKPOINTS = "checkpoints"


def save_checkpoint(engine: Any, folder: Path, step: int, *, rank: int) -> None:
    """A DeepSpeed checkpoint tagged "step-N" (model, optimizer and ZeRO partitions of every rank, and the
    `latest` pointer), plus each rank's random-number state, which DeepSpeed does not keep."""
    import torch

    tag = f"step-{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / tag / f"rng-rank{rank}.pt")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Remove all but the `keep` newest `step-N` checkpoints (the newest is the one `latest` names)."""
    tags = sorted(
        (d for d in folder.iterdir() if d.is_dir() and d.name.startswith("step-")),
        key=lambda d: int(d.name.removeprefix("step-")),
    )
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(engine: Any, folder: Path, tag: str, *, rank: int) -> None:
    """Load what `save_checkpoint` wrote (after the models were built, which reseeds the generators)."""
    import torch

    path, _ = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise InputError(f"cannot load checkpoint {tag} from {folder}; it is incomplete or from another run")
    rng = torch.load(folder / tag / f"rng-rank{rank}.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
