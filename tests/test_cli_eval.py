"""`gkd eval` on tiny saved models: the table and JSON, a teacher's figures, and bad input (exit 2, one line).
The match with a run's own `eval_loss` is tests/e2e/test_eval.py."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.runtime.launch import in_fresh_thread

LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def _save(folder: Path, config: dict[str, object]) -> Path:
    """A random tiny model saved as `save_pretrained` does (float32, so the figures are exact)."""
    from gkd.models import build_model, spec_from_config

    spec = spec_from_config(dict(config), name=str(folder), dtype="float32")
    build_model(spec, device="cpu").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    _save(root / "student", LLAMA)
    (root / "held.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 12)
    return root


@dataclass(frozen=True)
class _Result:
    exit_code: int
    output: str


def _send(write: int, args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, ["eval", *args])
    os.write(write, json.dumps([result.exit_code, result.output]).encode())


def _eval(*args: str) -> _Result:
    """`gkd eval ARGS` through click, in a forked child: the evaluation's state stays out of this process,
    which may fork a later test's `gkd run` workers (one hung after an in-process evaluation)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the command, send (exit code, output), leave at once
        try:
            # In a fresh thread: a forked process cannot use its parent's OpenMP pool (see in_fresh_thread).
            in_fresh_thread(_send, write, args)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        sent = pipe.read()
    os.waitpid(pid, 0)
    code, output = json.loads(sent)
    return _Result(code, output)


def test_a_student_against_itself_as_teacher(saved: Path) -> None:
    student, data = str(saved / "student"), str(saved / "held.txt")
    result = _eval(
        student, "--data", data, "--teacher", student, "--seq-len", "16", "--batch-size", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    # 12 lines of 44 bytes + eos = 540 tokens: 33 rows of 16, 16 full micro-batches of 2, 15 targets a row.
    assert figures["batches"] == 16 and figures["tokens"] == 16 * 2 * 15
    # A random model over 512 ids: near log(512) nats.
    assert abs(figures["loss"] - math.log(512)) < 0.5
    assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]), rel=1e-12)
    assert figures["teacher_loss"] == figures["loss"] and figures["top1_agreement"] == 1.0

    table = _eval(student, "--data", data, "--seq-len", "16", "--max-batches", "3")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert "3 micro-batch(es) of 8 x 16" in lines[0]
    assert lines[1].split() == ["model", "path", "loss", "perplexity"]
    assert lines[2].split()[:2] == ["student", student] and "agreement" not in table.output


def test_bad_input_exits_2_with_one_line(saved: Path, tmp_path: Path) -> None:
    data = str(saved / "held.txt")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(LLAMA))
    other_vocab = tmp_path / "other.json"
    other_vocab.write_text(json.dumps({**LLAMA, "vocab_size": 600}))
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n{"text": \n')
    student = str(saved / "student")
    cases = [
        ([str(no_weights), "--data", data], "holds no weights file"),
        ([student, "--data", str(bad_data)], str(bad_data)),
        ([student, "--data", data, "--teacher", str(other_vocab)], "vocabulary of 600"),
        ([student, "--data", data, "--seq-len", "65"], "is more than the 64 positions"),
    ]
    for args, expected in cases:
        result = _eval(*args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert expected in result.output and result.output.startswith("gkd: error:"), result.output


def test_a_hub_id_from_the_local_cache(saved: Path, hub_cache: Any) -> None:
    # The same weights under a hub id (the offline cache): the same figures as the folder.
    from safetensors.torch import load_file, save_file

    snapshot = hub_cache("org/tiny-student", LLAMA)
    save_file(load_file(str(saved / "student" / "model.safetensors")), str(snapshot / "model.safetensors"))
    data = str(saved / "held.txt")
    by_id = _eval("org/tiny-student", "--data", data, "--seq-len", "16", "--json")
    by_folder = _eval(str(saved / "student"), "--data", data, "--seq-len", "16", "--json")
    assert by_id.exit_code == 0 and by_folder.exit_code == 0, by_id.output + by_folder.output
    assert json.loads(by_id.output)["loss"] == json.loads(by_folder.output)["loss"]


def test_an_encoder_is_scored_on_its_masked_positions(saved: Path, tmp_path: Path) -> None:
    bert = {
        "model_type": "bert",
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
    }
    encoder = str(_save(tmp_path / "encoder", bert))
    args = [encoder, "--data", str(saved / "held.txt"), "--teacher", encoder, "--seq-len", "16", "--json"]
    result = _eval(*args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    # BERT masking chooses about 15% of the 33 x 16 tokens (eos never): far fewer than a decoder's targets.
    assert figures["objective"] == "mlm" and 0 < figures["tokens"] < 0.3 * figures["batches"] * 8 * 16
    assert figures["top1_agreement"] == 1.0 and figures["teacher_loss"] == figures["loss"]
    again = json.loads(_eval(*args).output)
    assert again["loss"] == figures["loss"] and again["tokens"] == figures["tokens"]  # seeded masking
