"""`gkd run` on architectures no table names, 3 steps in 2 gloo processes: a teacher read from a Hugging Face
cache by hub id (HF_HUB_OFFLINE=1) or from a checkpoint folder, and a one-layer student of the same
architecture. Two of them here; benchmarks/bench_architectures.py runs all four (Qwen3, Gemma3, Phi-3,
Mistral)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

_BASE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 256,  # the built-in byte tokenizer's
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3": {**_BASE, "model_type": "qwen3", "head_dim": 32},
    "gemma3_text": {**_BASE, "model_type": "gemma3_text", "head_dim": 16, "sliding_window": 16},
    "phi3": {**_BASE, "model_type": "phi3"},
    "mistral": {**_BASE, "model_type": "mistral", "sliding_window": 16},
}
STEPS = 3


def run_architecture(model_type: str, teacher: str, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """`gkd run` of a kd + MiniLMv2 job from `teacher` to a one-layer student of `model_type`."""
    student = tmp_path / "student.json"
    student.write_text(json.dumps({**CONFIGS[model_type], "num_hidden_layers": 1}))
    config = {
        "teacher": teacher,
        "student": str(student),
        "methods": [{"name": "kd", "weight": 1.0}, {"name": "minilmv2", "weight": 1.0}],
        "training": {"seq_len": 32, "global_batch": 4, "micro_batch": "auto", "steps": STEPS},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", str(path), "--out", str(out), "--processes", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all(r["loss"] > 0 for r in rows)
    saved = json.loads((out / "student" / "config.json").read_text())
    assert saved["model_type"] == model_type
    return {"rows": rows, "stdout": proc.stdout}


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_new_architecture_trains(model_type: str, hub_cache: Any, tmp_path: Path) -> None:
    if model_type == "qwen3":  # by hub id, from the Hugging Face cache, offline
        hub_cache(f"org/tiny-{model_type}", CONFIGS[model_type])
        teacher = f"org/tiny-{model_type}"
    else:  # a checkpoint folder
        from gkd.models import build_model, spec_from_config

        spec = spec_from_config(dict(CONFIGS[model_type]), name="teacher", dtype="float32")
        build_model(spec, device="cpu").save_pretrained(tmp_path / "teacher")
        teacher = str(tmp_path / "teacher")
    run_architecture(model_type, teacher, tmp_path, dict(os.environ))
