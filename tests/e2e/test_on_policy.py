"""On-policy distillation in real 2-process CPU runs of the tiny Llama presets on prompt/completion records:
`lambda: 0` trains exactly as the run without generation, `lambda: 1` trains every micro-batch on the
student's own samples, `lambda: 0.5` samples the micro-batches drawn from the seed and step (a ZeRO-3
student), and a resumed on-policy run repeats the uninterrupted one (the same samples, so the same losses
and the same final weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gkd.runtime.executor import run_job
from gkd.runtime.generation import is_sampled

pytestmark = pytest.mark.slow

# What a run must repeat exactly; seconds, tokens/s and memory are measurements, not results.
MEASURED = ("seconds", "tokens_per_s", "peak_memory_bytes", "memory", "memory_source")
SEQ_LEN, GLOBAL_BATCH = 64, 8


def _config(folder: Path, generation: dict[str, Any] | None, overrides: dict[str, Any] | None) -> str:
    lines = [
        "teacher: tiny-llama-teacher",
        "student: tiny-llama-student",
        "methods: [{name: jsd, options: {beta: 0.5, hard_rate: 0.5}}]",
        f"training: {{seq_len: {SEQ_LEN}, global_batch: {GLOBAL_BATCH}, micro_batch: [2], steps: 3}}",
    ]
    if generation is not None:
        lines.append(f"generation: {json.dumps(generation)}")
    if overrides is not None:
        lines.append(f"overrides: {json.dumps(overrides)}")
    path = folder / f"job-{len(list(folder.glob('job-*')))}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("on-policy")
    records = [
        {"prompt": f"Q{i}: what is {i} plus {i % 7}?", "completion": f" {i + i % 7}."} for i in range(120)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _run(
    folder: Path,
    name: str,
    generation: dict[str, Any] | None,
    steps: int,
    overrides: dict[str, Any] | None = None,
    **kw: Any,
) -> Path:
    out = folder / name
    run_job(
        _config(folder, generation, overrides),
        data=str(folder / "pairs.jsonl"),
        steps=steps,
        out=str(out),
        processes=2,
        echo=lambda _: None,
        **kw,
    )
    return out


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    [file] = (out / "student").glob("*.safetensors")
    return load_file(str(file))


ON_POLICY = {"mode": "on_policy", "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95}


def test_lambda_zero_trains_as_the_supervised_run(pairs: Path) -> None:
    supervised = _rows(_run(pairs, "supervised", None, 2))
    never = _rows(_run(pairs, "lambda-0", {**ON_POLICY, "lambda": 0.0}, 2))
    print("supervised:", [r["loss"] for r in supervised], " lambda 0:", [r["loss"] for r in never])
    assert never == supervised
    assert all(r["tokens"] == GLOBAL_BATCH * SEQ_LEN for r in never)  # the data's full packed rows


def test_lambda_one_trains_every_micro_batch_on_samples(pairs: Path) -> None:
    rows = _rows(_run(pairs, "lambda-1", {**ON_POLICY, "lambda": 1.0}, 2))
    print("lambda 1:", [(r["loss"], r["tokens"]) for r in rows])
    # Every micro-batch is prompt + sample, right-padded: fewer real tokens than the data's full rows.
    assert all(0 < r["tokens"] < GLOBAL_BATCH * SEQ_LEN for r in rows)
    assert all(r["loss"] > 0 for r in rows)


def test_lambda_half_samples_the_drawn_micro_batches_and_resumes_with_the_same_samples(
    pairs: Path, tmp_path: Path
) -> None:
    seed, steps, accum = 2, 3, GLOBAL_BATCH // (2 * 2)  # 2 processes, micro-batches of 2
    drawn = [[is_sampled(0.5, seed=seed, step=s, micro=m) for m in range(accum)] for s in range(steps)]
    assert any(map(any, drawn)) and not all(map(any, drawn)), drawn  # steps of both kinds
    # A ZeRO-3 student: its sampling forwards gather each layer's parameters on every rank, in step.
    half = {**ON_POLICY, "lambda": 0.5}
    reference = _run(pairs, "lambda-half", half, steps, {"student_zero_stage": 3}, save_every=1, seed=seed)
    assert json.loads((reference / "plan.json").read_text())["strategy"]["student_zero_stage"] == 3
    rows = _rows(reference)
    print("lambda 0.5:", drawn, [(r["loss"], r["tokens"]) for r in rows])
    # A step whose micro-batches all come from the data has full rows; one with a sample has padding.
    assert [r["tokens"] < GLOBAL_BATCH * SEQ_LEN for r in rows] == [any(d) for d in drawn]
    # Resumed after step 1: the same samples, so the same rows and the same final student.
    out = tmp_path / "resumed"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("student"))
    (out / "checkpoints" / "latest").write_text("step-1")
    run = json.loads((out / "run.json").read_text())
    run["completed_steps"] = 1
    (out / "run.json").write_text(json.dumps(run))
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text(lines[0] + "\n")
    run_job(None, out=str(out), resume=True, echo=lambda _: None)
    assert _rows(out) == rows
    mine, theirs = _weights(out), _weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
