"""`gkd eval OUT/student --data D` prints what the run's last `eval_loss` on D was, for a decoder (causal-LM
loss) and an encoder (masked-LM loss): a 2-step, 1-process `gkd run --eval-data D`, then `gkd eval`.

The held-out text is sized so that both read the same target tokens: 32-token lines (31 bytes and eos) make
rows of exactly one document, and the run's evaluation covers every row once (its --eval-batches is capped
at one pass). The decoder's 8 rows make 4 micro-batches of 62 targets each, so the run's mean of per-batch
losses is the token-weighted mean `gkd eval` prints; the encoder's 2 rows make one micro-batch (its masked
positions vary per batch). Both compute in the saved student's dtype (bfloat16, the training dtype) on the
same micro-batches, so only the float summation order differs: rel 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gkd.runtime.executor import run_job

pytestmark = pytest.mark.slow

LINE = "a small student learns from it."  # 31 bytes: with eos, one 32-token row


@pytest.mark.parametrize(("family", "rows"), [("llama", 8), ("bert", 2)])
def test_eval_prints_the_runs_last_eval_loss(
    family: str, rows: int, models_dir: Path, tmp_path: Path, job_config: Any
) -> None:
    assert len(LINE) == 31
    config = job_config(models_dir, family, {})
    config["hardware"]["gpus"] = 1
    config["training"]["steps"] = 2
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    held_out = tmp_path / "held.txt"
    held_out.write_text((LINE + "\n") * rows)
    out = run_job(
        str(path),
        data=str(models_dir / "corpus.txt"),
        steps=2,
        out=str(tmp_path / "out"),
        processes=1,
        seed=3,
        eval_data=str(held_out),
        eval_batches=100,
        echo=lambda _: None,
    )
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    # A command of its own, as after a run (and this process, which forks the next test's workers, runs
    # no model).
    command = [sys.executable, "-m", "gkd", "eval", str(out / "student"), "--data", str(held_out), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["objective"] == ("mlm" if family == "bert" else "causal")
    assert figures["seed"] == 3 and figures["batches"] * figures["batch_size"] == rows
    assert figures["loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)
    assert figures["perplexity"] == pytest.approx(logged["eval_perplexity"], rel=1e-5)
