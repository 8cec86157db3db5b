"""The final save (gkd.runtime.save): what `save_pretrained` writes, written within the plan and atomically.

- Under ZeRO-3 (2 CPU processes) no rank ever holds more than one gathered parameter beyond the persistent
  ones, counted from every parameter's gather status after each gather of any route; the folder loads with
  `from_pretrained` without missing or unexpected keys and equals the whole gathered student bit for bit.
- Tied and untied models of each family: the same files, names, tensors, index and config as
  `save_pretrained`, in one file or in shards.
- A save that fails leaves no folder (and an earlier one intact); a stale `.partial` is cleared.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import gkd.runtime.save as save
from gkd.models import build_model
from gkd.planner.specs import load_spec

CLEAN = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}


def _engines(model: Any) -> Any:
    """What save_student reads of the engines: `engines.module.student`."""
    return types.SimpleNamespace(module=types.SimpleNamespace(student=model))


def _model(name: str, **config: Any) -> Any:
    spec = load_spec(name)
    if config:
        spec = dataclasses.replace(spec, hf_config={**spec.hf_config, **config})
    torch.manual_seed(0)
    return build_model(spec, device="cpu", dtype=torch.bfloat16)


def _auto(model: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if model.config.model_type == "bert" else AutoModelForCausalLM


# ----------------------------------------------------------------------------------------------------------
# ZeRO-3: one parameter at a time


def _zero3_worker(rank: int, world: int, plan_json: str, out: str) -> None:
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from gkd.planner.plan import Plan
    from gkd.runtime.engines import build_models, make_engines

    plan = Plan.from_json(plan_json)
    engines = make_engines(build_models(plan, seed=0, total_steps=1), plan, device=torch.device("cpu"))
    student = engines.module.student
    params = list(student.parameters())

    def gathered() -> int:
        return sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)

    # Every gather of a ZeRO-3 parameter (GatheredParameters, a forward's fetch) goes through one of these
    # two methods of some parameter; after each, count what this rank holds gathered.
    peak = [0]

    def counting(fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            peak[0] = max(peak[0], gathered())
            return result

        return counted

    for p in params:
        for attr in ("all_gather", "all_gather_coalesced"):
            setattr(p, attr, counting(getattr(p, attr)))
    before = gathered()
    save.save_student(engines, Path(out) / "student", rank=rank, zero_stage=3)
    during = peak[0]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # the reference: all at once
        whole = {name: t.detach().clone() for name, t in student.state_dict().items()}
    sizes = [p.ds_numel for p in params]
    torch.save(
        {"before": before, "peak": during, "largest": max(sizes), "total": sum(sizes), "whole": whole},
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_zero3_save_gathers_one_parameter_at_a_time_and_equals_the_whole_student(tmp_path: Path) -> None:
    from gkd.config import Config
    from gkd.planner.pipeline import plan as make_plan
    from gkd.runtime.launch import launch

    # A tied student: embedding and head are one ZeRO-3 parameter, saved once under transformers' name.
    student = tmp_path / "student.json"
    student.write_text(json.dumps({**load_spec("tiny-llama-student").hf_config, "tie_word_embeddings": True}))
    config = {
        "teacher": "tiny-llama-teacher",
        "student": str(student),
        "methods": [{"name": "kd"}],
        "hardware": {"gpus": 2, "gpu_memory": "8GiB", "host_memory": "16GiB", "cuda_context": "64MiB"},
        "training": {"seq_len": 16, "global_batch": 4, "micro_batch": [2], "steps": 1},
        # Threshold 0: every parameter is partitioned, however small.
        "deepspeed": {"stage3_param_persistence_threshold": 0},
        "overrides": {"student_zero_stage": 3, "teacher_placement": "replicated"},
    }
    plan = make_plan(Config.from_dict(config))
    launch(_zero3_worker, (plan.to_json(), str(tmp_path)), processes=2, timeout_s=300)

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["before"] == 0
        # The whole student gathered at once would be got["total"]; the save holds one parameter at most.
        assert 0 < got["peak"] <= got["largest"] < got["total"], got
    whole = torch.load(tmp_path / "rank0.pt")["whole"]
    model, info = _auto(build_model(load_spec(str(student)), device="meta")).from_pretrained(
        tmp_path / "student", output_loading_info=True
    )
    assert info == CLEAN
    assert model.dtype == torch.bfloat16
    loaded = model.state_dict()
    assert set(loaded) == set(whole)
    for name, tensor in whole.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not (tmp_path / "student.partial").exists()


# ----------------------------------------------------------------------------------------------------------
# What save_pretrained writes


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("tiny-llama-student", {"tie_word_embeddings": True}),
        ("tiny-llama-student", {"tie_word_embeddings": False}),
        ("tiny-gpt2-student", {}),  # tied head
        ("tiny-bert-student", {}),  # tied decoder weight and bias
    ],
)
@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_the_files_are_those_of_save_pretrained(
    name: str, config: dict[str, Any], shard_bytes: int | None, tmp_path: Path, monkeypatch: Any
) -> None:
    from safetensors import safe_open

    model = _model(name, **config)
    if shard_bytes is None:
        model.save_pretrained(tmp_path / "ref")
    else:
        model.save_pretrained(tmp_path / "ref", max_shard_size=shard_bytes)
        monkeypatch.setattr(save, "SAVE_SHARD_BYTES", shard_bytes)
    save.save_student(_engines(model), tmp_path / "mine", rank=0, zero_stage=0)

    ref, mine = tmp_path / "ref", tmp_path / "mine"
    files = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in mine.iterdir()) == files
    assert (save.INDEX in files) == (shard_bytes is not None)
    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(ref / file, "pt") as a, safe_open(mine / file, "pt") as b:
                assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
                for key in a.keys():  # noqa: SIM118
                    assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
            assert (mine / file).stat().st_size <= max(shard_bytes or 0, (ref / file).stat().st_size)
        else:
            assert json.loads((mine / file).read_text()) == json.loads((ref / file).read_text()), file
    loaded, info = _auto(model).from_pretrained(mine, output_loading_info=True)
    assert info == CLEAN
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_shards_stay_within_the_shard_size(tmp_path: Path, monkeypatch: Any) -> None:
    model = _model("tiny-llama-student")
    sizes = [t.numel() * t.element_size() for t in save.saved_tensors(model).values()]
    limit = 2 * max(sizes)
    monkeypatch.setattr(save, "SAVE_SHARD_BYTES", limit)
    save.save_student(_engines(model), tmp_path / "student", rank=0, zero_stage=0)
    index = json.loads((tmp_path / "student" / save.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    payload = {f: 0 for f in shards}
    for key, file in index["weight_map"].items():
        tensor = save.saved_tensors(model)[key]
        payload[file] += tensor.numel() * tensor.element_size()
    assert max(payload.values()) <= limit and sum(payload.values()) == sum(sizes)


# ----------------------------------------------------------------------------------------------------------
# Atomic


def _fail_on_shard(monkeypatch: Any, n: int) -> None:
    from safetensors import torch as st

    real, calls = st.save_file, [0]

    def save_file(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise OSError(28, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(st, "save_file", save_file)


def test_a_failed_save_leaves_no_folder_and_keeps_an_earlier_one(tmp_path: Path, monkeypatch: Any) -> None:
    model = _model("tiny-llama-student")
    path = tmp_path / "student"
    monkeypatch.setattr(save, "SAVE_SHARD_BYTES", 20_000)
    _fail_on_shard(monkeypatch, 2)
    with pytest.raises(OSError, match="No space"):
        save.save_student(_engines(model), path, rank=0, zero_stage=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    monkeypatch.undo()
    save.save_student(_engines(model), path, rank=0, zero_stage=0)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(save, "SAVE_SHARD_BYTES", 20_000)
    _fail_on_shard(monkeypatch, 3)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with pytest.raises(OSError, match="No space"):
        save.save_student(_engines(model), path, rank=0, zero_stage=0)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]

    # A later save replaces it, and clears a partial folder a killed save left.
    monkeypatch.undo()
    (tmp_path / "student.partial").mkdir()
    (tmp_path / "student.partial" / "model.safetensors").write_bytes(b"cut short")
    save.save_student(_engines(model), path, rank=0, zero_stage=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    loaded = _auto(model).from_pretrained(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
