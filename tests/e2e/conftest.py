"""Shared pieces of the end-to-end tests: tiny config.json models (vocabulary 512, so the built-in byte
tokenizer fits), a small repeated corpus, and plans for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

LLAMA = {
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
BERT = {
    "model_type": "bert",
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    # No dropout: a run's first step must equal a single-process reference step.
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "torch_dtype": "bfloat16",
}


def _write(path: Path, data: dict[str, Any]) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, base, layers, hidden, ffn in (
        ("llama-teacher", LLAMA, 4, 64, 128),
        ("llama-student", LLAMA, 2, 32, 64),
        ("bert-teacher", BERT, 4, 64, 128),
        ("bert-student", BERT, 2, 32, 64),
    ):
        cfg = {**base, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn}
        _write(root / f"{name}.json", cfg)
    # A small corpus of repeated sentences: a few steps are enough for the student to learn from it.
    lines = ["the quick brown fox jumps over the lazy dog.", "a small student learns from a large teacher."]
    (root / "corpus.txt").write_text("\n".join(lines * 60) + "\n")
    return root


def _job_config(models_dir: Path, family: str, overrides: dict[str, Any], **deepspeed: Any) -> dict[str, Any]:
    """A config dict for the tiny pair of `family` on 2 GPUs with kd + minilmv2."""
    return {
        "teacher": str(models_dir / f"{family}-teacher.json"),
        "student": str(models_dir / f"{family}-student.json"),
        "methods": [{"name": "kd"}, {"name": "minilmv2", "options": {"relation_heads": 8}}],
        "hardware": {"gpus": 2, "gpu_memory": "8GiB", "host_memory": "16GiB", "cuda_context": "64MiB"},
        "training": {"seq_len": 32, "global_batch": 8, "micro_batch": [2], "steps": 8},
        "deepspeed": deepspeed,
        "overrides": overrides,
    }


@pytest.fixture(scope="session")
def job_config() -> Any:
    """`job_config(models_dir, family, overrides, **deepspeed)`: a config dict for the tiny pair of `family`
    ("llama" or "bert") on 2 GPUs with kd + minilmv2."""
    return _job_config
