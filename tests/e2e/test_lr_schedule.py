"""The learning-rate schedule, gradient norm and reporters in a real 2-process run of the tiny presets: a
cosine schedule with warmup gives, step by step in log.jsonl, the rates its formula gives (computed here
from docs/config.md, not by DeepSpeed), TensorBoard holds the same rows, and a run resumed from a checkpoint
has the uninterrupted run's rates."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from gkd.runtime.executor import run_job

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).resolve().parents[2] / "gkd" / "data" / "corpus.txt"

STEPS, WARMUP, LR, MIN_LR = 7, 3, 1e-3, 1e-4
CONFIG = {
    "teacher": "tiny-llama-teacher",
    "student": "tiny-llama-student",
    "methods": ["kd"],
    "training": {
        "seq_len": 32,
        "global_batch": 4,
        "steps": STEPS,
        "lr": LR,
        "min_lr": MIN_LR,
        "lr_schedule": "cosine",
        "warmup_steps": WARMUP,
        "clip_grad": 0.5,
        "adam_betas": [0.8, 0.95],
        "report_to": ["tensorboard"],
    },
}


def cosine_lr(step: int) -> float:
    """docs/config.md: step s runs at iteration i = s - 1; a linear warmup over W = max(2, warmup_steps)
    iterations from min_lr, then a half cosine over the remaining steps down to min_lr."""
    i, w = step - 1, max(2, WARMUP)
    if i < w:
        return MIN_LR + (LR - MIN_LR) * i / w
    progress = min(1.0, (i - w + 1) / max(1, STEPS - w))
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorboard", reason="training.report_to: [tensorboard] needs gkd[tensorboard]")
    root = tmp_path_factory.mktemp("schedule")
    (root / "job.yaml").write_text(yaml.safe_dump(CONFIG))
    out = root / "run"
    run_job(
        str(root / "job.yaml"),
        out=str(out),
        processes=2,
        save_every=3,
        eval_data=str(CORPUS),  # evaluated at the last step
        eval_batches=1,
        echo=lambda _: None,
    )
    return out


def test_cosine_with_warmup_follows_its_formula_step_by_step(run: Path) -> None:
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isclose(r["lr"], cosine_lr(r["step"]), rel_tol=1e-12), (r["step"], r["lr"])
        assert r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    # The rate rises through the warmup to its peak at the first decay step, falls, and ends at min_lr.
    lrs = [r["lr"] for r in rows]
    assert lrs[: WARMUP + 1] == sorted(lrs[: WARMUP + 1]) and lrs[WARMUP:] == sorted(
        lrs[WARMUP:], reverse=True
    )
    assert math.isclose(lrs[-1], MIN_LR, rel_tol=1e-12)
    student = json.loads((run / "plan.json").read_text())["deepspeed"]["student"]
    assert student["scheduler"]["type"] == "WarmupCosineLR"
    assert student["gradient_clipping"] == 0.5 and student["optimizer"]["params"]["betas"] == [0.8, 0.95]


def test_tensorboard_holds_the_log_rows(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = _rows(run)
    for tag, key in (
        ("train/lr", "lr"),
        ("train/loss", "loss"),
        ("train/grad_norm", "grad_norm"),
        ("eval/loss", "eval_loss"),
        ("eval/perplexity", "eval_perplexity"),
    ):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in rows if key in r], tag
        for s in scalars:  # TensorBoard stores float32
            value = rows[s.step - 1][key]
            assert math.isclose(s.value, value, rel_tol=1e-6), (tag, s.step, s.value, value)
    # Evaluated at the last step only, with its perplexity.
    assert [r["step"] for r in rows if "eval_loss" in r] == [STEPS]
    assert math.isclose(rows[-1]["eval_perplexity"], math.exp(rows[-1]["eval_loss"]), rel_tol=1e-12)


def test_a_resumed_run_keeps_the_schedule(run: Path, tmp_path: Path) -> None:
    """Resumed from the checkpoint after step 3, steps 4..7 run at the uninterrupted run's rates (the
    scheduler's iteration is in DeepSpeed's checkpoint) and with its gradient norms."""
    out = tmp_path / "resumed"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("student"))
    (out / "checkpoints" / "latest").write_text("step-3")
    state = json.loads((out / "run.json").read_text())
    state["completed_steps"] = 3
    (out / "run.json").write_text(json.dumps(state))
    run_job(None, out=str(out), resume=True, echo=lambda _: None)
    again = {r["step"]: r for r in _rows(out)}
    for r in _rows(run):
        assert again[r["step"]]["lr"] == r["lr"], r["step"]
        assert again[r["step"]]["grad_norm"] == r["grad_norm"], r["step"]
