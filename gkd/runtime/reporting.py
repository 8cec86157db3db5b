"""Where a run's log rows go besides `log.jsonl`: TensorBoard and Weights & Biases (`training.report_to`).

Rank 0 hands every row it writes to log.jsonl to `Reporters.log`, which sends the row's numbers to each
reporter the config names, at the row's step: the loss and each loss term, the learning rate, the gradient
norm, throughput, the device peak, and at evaluations eval_loss with its perplexity. Nested values (the
per-rank memory figures) stay in log.jsonl only.

Design choices:
- Both are optional installs (`pip install 'gkd[tensorboard]'`, `'gkd[wandb]'`): `check_reporters` runs
  before any model is loaded and refuses, in one line, a config that names one this machine lacks, rather
  than training for hours without the log that was asked for.
- TensorBoard events are written with torch's own `SummaryWriter` into OUT/tensorboard, so they move with
  the run's folder; a resumed run appends a new event file there, and TensorBoard shows the rows a resume
  writes again at their steps.
- W&B is initialised with the resolved config and in OUT; its own environment variables (WANDB_PROJECT,
  WANDB_MODE=offline or disabled, ...) apply as usual. The project is "gkd" unless WANDB_PROJECT says
  otherwise. The W&B run's id is kept in OUT/wandb-run-id, so a resumed gkd run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
from pathlib import Path
from typing import Any

from gkd.errors import InputError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID = "wandb-run-id"  # in OUT: the W&B run a resume continues
# The package each reporter needs, and the extra that installs it.
_NEEDS = {"tensorboard": ("tensorboard", "gkd[tensorboard]"), "wandb": ("wandb", "gkd[wandb]")}


def check_reporters(names: list[str]) -> None:
    """Refuse reporters whose package is not installed (see the module docstring)."""
    for name in names:
        module, extra = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise InputError(
                f"training.report_to names {name}, but the {module} package is not installed; "
                f"pip install '{extra}' or drop {name} from training.report_to"
            )


def perplexity(loss: float) -> float:
    """exp(loss), the perplexity of a mean cross-entropy in nats (infinite past float range)."""
    return math.exp(loss) if loss < 709 else math.inf


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log row, by the names the reporters show them under."""
    out: dict[str, float] = {}
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "peak_memory_bytes",
        "eval_loss",
        "eval_perplexity",
    ):
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            section = "eval" if key.startswith("eval_") else "train"
            out[f"{section}/{key.removeprefix('eval_')}"] = float(value)
    for name, value in row.get("terms", {}).items():
        out[f"train/terms/{name}"] = float(value)
    return out


class Reporters:
    """The reporters of `training.report_to` for one run (rank 0 only)."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any]) -> None:
        self.writer: Any = None
        self.wandb: Any = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        if "wandb" in names:
            import wandb

            # One W&B run per gkd run: a resume continues the W&B run its first start made.
            id_file = out / WANDB_ID
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
            project = os.environ.get("WANDB_PROJECT", "gkd")
            self.wandb = wandb.init(project=project, dir=str(out), config=config, id=run_id, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        values, step = scalars(row), int(row["step"])
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
