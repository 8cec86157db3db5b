"""gkd.runtime.reporting: a log row's numbers reach each reporter at the row's step (W&B through a stand-in
module: the package is an optional install), and a reporter whose package is missing is one line."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gkd.errors import InputError
from gkd.runtime import reporting
from gkd.runtime.reporting import Reporters, check_reporters, perplexity, scalars

ROW = {
    "step": 3,
    "loss": 2.5,
    "terms": {"kd.kl": 2.0, "minilmv2.relation": 0.5},
    "lr": 1e-4,
    "grad_norm": 0.75,
    "tokens": 64,
    "tokens_per_s": 100.0,
    "peak_memory_bytes": 1024,
    "memory": {"device_peak_bytes": [1024, 1000]},
    "eval_loss": 3.0,
    "eval_perplexity": perplexity(3.0),
}


def test_scalars_are_the_rows_numbers() -> None:
    assert scalars(ROW) == {
        "train/loss": 2.5,
        "train/lr": 1e-4,
        "train/grad_norm": 0.75,
        "train/tokens_per_s": 100.0,
        "train/peak_memory_bytes": 1024.0,
        "eval/loss": 3.0,
        "eval/perplexity": math.exp(3.0),
        "train/terms/kd.kl": 2.0,
        "train/terms/minilmv2.relation": 0.5,
    }
    assert "train/grad_norm" not in scalars({**ROW, "grad_norm": None})
    assert perplexity(800.0) == math.inf


def test_wandb_gets_the_rows_at_their_steps(tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[tuple[str, Any]] = []

    class Run:
        def log(self, values: dict[str, float], step: int) -> None:
            calls.append(("log", (values, step)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> Run:
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_PROJECT", "distil")
    for _ in range(2):  # a run, then its resume
        reporters = Reporters(["wandb"], tmp_path, {"student": "s"})
        reporters.log(ROW)
        reporters.close()
    run_id = (tmp_path / "wandb-run-id").read_text().strip()
    start = {
        "project": "distil",
        "dir": str(tmp_path),
        "config": {"student": "s"},
        "id": run_id,
        "resume": "allow",
    }
    # The resume continues the same W&B run.
    assert calls == [("init", start), ("log", (scalars(ROW), 3)), ("finish", None)] * 2


def test_a_missing_package_is_one_line(monkeypatch: Any) -> None:
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"names wandb, but the wandb package is not installed; pip install"):
        check_reporters(["wandb"])
    check_reporters([])
