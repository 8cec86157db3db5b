"""`gkd inspect`: every preset, a config.json and a checkpoint folder, JSON keys, and bad input (exit 2, one
line on stderr, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.models import build_model, count_parameters, preset_names, resolve_model

SEQ = 16  # small sizes keep the every-preset test fast; the byte figures scale exactly


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["inspect", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", preset_names())
def test_inspect_every_preset_json(name: str) -> None:
    code, out, err = invoke(name, "--seq-len", str(SEQ), "--json")
    assert code == 0, err
    data = json.loads(out)
    spec = resolve_model(name)
    assert data["parameters"] == count_parameters(spec)
    assert data["model"]["layers"] == spec.layers and data["seq_len"] == SEQ
    per_layer = data["activations"]["per_layer_saved_bytes"]
    assert set(per_layer) == {"sdpa", "eager", "sdpa_full_recompute", "eager_full_recompute"}
    # (at this short sequence the eager path may save less than sdpa: T x T probabilities < T x head_dim
    # output)
    assert min(per_layer["eager"], per_layer["sdpa"]) > per_layer["sdpa_full_recompute"] > 0
    total = data["activations"]["total_saved_bytes"]["sdpa"]
    assert total == spec.layers * per_layer["sdpa"] + data["activations"]["non_layer_saved_bytes"]["sdpa"]
    names = {t["name"] for t in data["taps"]}
    assert {"emb", "hidden[0]", f"hidden[{spec.layers}]", "final", "logits"} <= names
    logits = next(t for t in data["taps"] if t["name"] == "logits")
    assert logits["shape"] == [1, SEQ, spec.vocab]


def test_inspect_tables() -> None:
    code, out, _ = invoke("tiny-llama-teacher", "--seq-len", "32")
    assert code == 0
    assert "parameters: 180,800" in out
    assert "Tap catalogue" in out and "scores[i]" in out and "attention_fn" in out


def test_inspect_config_json_and_checkpoint_folder(tmp_path: Path) -> None:
    spec = resolve_model("tiny-llama-student")
    build_model(spec, device="cpu").save_pretrained(tmp_path / "ckpt")
    for ref in (str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / "config.json")):
        code, out, err = invoke(ref, "--seq-len", str(SEQ), "--json")
        assert code == 0, err
        data = json.loads(out)
        assert data["parameters"] == count_parameters(spec)
        assert data["model"]["kv_heads"] == 2


def _bad_inputs(tmp_path: Path) -> list[list[str]]:
    malformed = tmp_path / "malformed.json"
    malformed.write_text("{oops")
    incomplete = tmp_path / "incomplete" / "config.json"
    incomplete.parent.mkdir()
    incomplete.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    unsupported = tmp_path / "t5.json"
    unsupported.write_text(json.dumps({"model_type": "not-a-model", "d_model": 64}))
    heads = tmp_path / "heads.json"
    heads.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 5,
                "intermediate_size": 96,
                "vocab_size": 128,
            }
        )
    )
    return [
        ["llama-2-7"],
        [str(malformed)],
        [str(incomplete.parent)],
        [str(unsupported)],
        [str(heads)],
        ["gpt2", "--seq-len", "5000"],
    ]


def test_bad_input_exit_2_one_line_no_traceback(tmp_path: Path) -> None:
    expected = [
        "did you mean llama-2-7b",
        "not valid JSON",
        "incomplete",
        "unsupported architecture 'not-a-model'",
        "5 attention heads do not divide hidden size 64",
        "learned positions",
    ]
    for args, needle in zip(_bad_inputs(tmp_path), expected, strict=True):
        code, out, err = invoke(*args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, err)
        assert "Traceback" not in err + out


def test_bad_input_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gkd.cli", "inspect", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_inspect_comes_from_the_cache_without_torch(tmp_path: Path) -> None:
    env = {**os.environ, "GKD_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "gkd.cli", "inspect", "tiny-llama-teacher", "--seq-len", "16", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    probe = (
        "import sys; from gkd.planner.inspect import run_inspect; "
        "run_inspect('tiny-llama-teacher', seq_len=16, micro_batch=1, as_json=True); "
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    second = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env
    )
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip() == "False"  # answered from the cache: no torch import
    assert json.loads(second.stdout) == json.loads(first.stdout)


def test_default_sequence_fits_the_model() -> None:
    """Without --seq-len: 2048, or the model's positions when it has fewer (tiny-bert-student has 512);
    a model with 2048 or more positions keeps 2048."""
    from gkd.models import resolve_model

    for name in ("tiny-bert-student", "llama-2-7b"):
        code, out, err = invoke(name, "--json")
        assert code == 0, err
        assert json.loads(out)["seq_len"] == min(2048, resolve_model(name).max_positions)
    assert resolve_model("llama-2-7b").max_positions > 2048  # so that case checks the 2048 cap
