"""Models by Hugging Face Hub id (gkd.hub): a tiny model saved into a Hugging Face cache in tmp (the
`hub_cache` fixture; HF_HOME points there, HF_HUB_OFFLINE=1, nothing downloads) is planned and inspected by
its id; an id that is not in the cache exits 2 naming the id and HF_HUB_OFFLINE. (`gkd run` by hub id:
tests/e2e/test_architectures_run.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from click.testing import CliRunner

from gkd.cli import main
from gkd.hub import hub_name, is_hub_id
from gkd.models import resolve_model
from gkd.planner.specs import load_spec

QWEN3 = {
    "model_type": "qwen3",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 96,
    "vocab_size": 256,
}


def test_hub_ids_are_told_from_paths(tmp_path: Path) -> None:
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("org/name@v1.0") and not is_hub_id("gpt2")
    assert not is_hub_id("configs/models/x.json") and not is_hub_id(str(tmp_path))
    assert hub_name("/c/hub/models--Qwen--Qwen3-0.6B/snapshots/abc") == "Qwen/Qwen3-0.6B"


def test_a_cached_hub_id_resolves_offline(hub_cache) -> None:
    folder = hub_cache("org/tiny-qwen3", QWEN3)
    spec = resolve_model("org/tiny-qwen3")
    assert dataclasses.replace(spec, name="x") == dataclasses.replace(resolve_model(str(folder)), name="x")
    assert spec.model_type == "qwen3" and spec.layers == 2
    assert load_spec("org/tiny-qwen3").name == "org/tiny-qwen3"
    assert load_spec(str(folder)).name == "org/tiny-qwen3"  # a plan records the folder; reports say the id


def test_plan_and_inspect_take_a_hub_id(hub_cache, tmp_path: Path) -> None:
    folder = hub_cache("org/tiny-qwen3", QWEN3)
    runner = CliRunner()
    inspected = runner.invoke(main, ["inspect", "org/tiny-qwen3", "--seq-len", "64", "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["model"]["model_type"] == "qwen3"
    student = tmp_path / "student.json"
    student.write_text(json.dumps({**QWEN3, "num_hidden_layers": 1}))
    args = ["plan", "--teacher", "org/tiny-qwen3", "--student", str(student), "--methods", "kd"]
    planned = runner.invoke(main, [*args, "--gpus", "1", "--gpu-memory", "8GiB", "--seq-len", "64", "--json"])
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.output)
    assert plan["inputs"]["config"]["teachers"] == [str(folder)]  # the run loads the cached snapshot


def test_an_id_missing_from_the_cache_exits_2_naming_it(hub_cache, tmp_path: Path) -> None:
    hub_cache("org/tiny-qwen3", QWEN3)
    runner = CliRunner()
    job = tmp_path / "job.json"
    config = {"teacher": "org/not-cached", "student": "tiny-llama-student", "methods": ["kd"]}
    job.write_text(json.dumps(config))
    for args in (
        ["inspect", "org/not-cached"],
        ["plan", "--teacher", "org/not-cached", "--student", "tiny-llama-student", "--methods", "kd"],
        ["run", str(job), "--out", str(tmp_path / "out")],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "org/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines
    assert not (tmp_path / "out").exists()  # the run stopped before writing anything
