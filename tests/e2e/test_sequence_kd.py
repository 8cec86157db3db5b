"""Sequence-level distillation in a real 2-process CPU run of the tiny Llama presets on prompt/completion
records: a run killed in the teacher's generation pass leaves whole chunks for the next one; the pass writes
prompt + completion documents to the token store (the loss mask on the completion only), training reads
them, and a resumed run whose stored generations are gone generates the same ones again, so it repeats the
uninterrupted run's losses and final weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gkd.errors import GkdError
from gkd.runtime.checkpoints import FAULT_ENV
from gkd.runtime.executor import run_job
from gkd.runtime.tokens import _lookup, token_dir

pytestmark = pytest.mark.slow

MEASURED = ("seconds", "tokens_per_s", "peak_memory_bytes", "memory", "memory_source")
SEQ_LEN, GLOBAL_BATCH = 64, 8
PAIRS = [{"prompt": f"Q{i}: what is {i} plus {i % 7}?", "completion": f" {i + i % 7}."} for i in range(40)]
SEQUENCE_KD = {"mode": "sequence_kd", "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95}


def _run(folder: Path, name: str, steps: int, **kw: Any) -> Path:
    config = folder / "job.yaml"
    config.write_text(
        "teacher: tiny-llama-teacher\n"
        "student: tiny-llama-student\n"
        "methods: [{name: kd, options: {hard_rate: 0.5}}]\n"
        f"training: {{seq_len: {SEQ_LEN}, global_batch: {GLOBAL_BATCH}, micro_batch: [2], steps: 3}}\n"
        f"generation: {json.dumps(SEQUENCE_KD)}\n"
    )
    out = folder / name
    run_job(
        str(config),
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


def _entries() -> list[Path]:
    return sorted(token_dir().glob("seqkd-*.json"))


def test_sequence_kd_survives_a_kill_trains_on_the_teachers_generations_and_resumes_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    for old in _entries():  # another test's generations (the same key) would be read, not made
        old.unlink()
    # A run killed in its generation pass (rank 0 after its third chunk) leaves whole chunks only; the next
    # run with the same key generates the rest (the resumed run below checks it generates the same).
    with monkeypatch.context() as env:
        env.setenv(FAULT_ENV, "0:3:generated")
        with pytest.raises(GkdError):
            _run(tmp_path, "killed", 3, seed=2)
    [chunks] = token_dir().glob("seqkd-*.chunks")
    assert len(list(chunks.glob("chunk-*.npz"))) >= 3 and not _entries()
    reference = _run(tmp_path, "reference", 3, save_every=1, seed=2)
    rows = _rows(reference)
    print("sequence_kd:", [(r["loss"], r["tokens"]) for r in rows])
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    [meta] = _entries()
    entry = _lookup(meta.stem)
    assert entry is not None and entry.masked and entry.documents == len(PAIRS)
    assert not list(token_dir().glob("*.chunks"))  # the chunks go once the entry is stored
    # Each document is its record's prompt (bytes, untrained), then the teacher's completion and eos
    # (trained); the data's own completion is gone.
    ids, trained, starts = entry.ids(), entry.trained(), entry.starts()
    assert trained is not None
    ends = [*starts[1:], entry.tokens]
    for record, start, end in zip(PAIRS, starts, ends, strict=True):
        prompt = list(record["prompt"].encode())
        assert ids[start : start + len(prompt)].tolist() == prompt
        flags = trained[start:end].tolist()
        assert flags == [0] * len(prompt) + [1] * (end - start - len(prompt))
        assert 1 <= end - start - len(prompt) <= SEQUENCE_KD["max_new_tokens"] + 1
    stored = {s: np.array(f(), copy=True) for s, f in (("ids", entry.ids), ("mask", entry.trained))}

    # Resumed after step 1, with the stored generations removed: the pass runs again and makes the same.
    out = tmp_path / "resumed"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("student"))
    (out / "checkpoints" / "latest").write_text("step-1")
    run = json.loads((out / "run.json").read_text())
    run["completed_steps"] = 1
    (out / "run.json").write_text(json.dumps(run))
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text(lines[0] + "\n")
    for path in token_dir().glob(f"{meta.stem}.*"):
        path.unlink()
    run_job(None, out=str(out), resume=True, echo=lambda _: None)
    again = _lookup(meta.stem)
    assert again is not None
    assert np.array_equal(again.ids(), stored["ids"]) and np.array_equal(again.trained(), stored["mask"])
    assert _rows(out) == rows
    mine, theirs = _weights(out), _weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
