"""student_init: a 2-layer student built from every other layer of a 4-layer teacher checkpoint holds the
teacher's embeddings, blocks 0 and 2, final norm and head, exactly (in the training dtype), whether the
student is whole (ZeRO-2) or partitioned (ZeRO-3, each rank filling its own slice); shapes that do not allow
the copy, or a teacher without weights, are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import gkd
from gkd.cli import main
from gkd.errors import InputError
from gkd.planner.plan import Plan

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
TEACHER_LAYERS = {0: 0, 1: 2}  # student block -> teacher block, for every: 2


def _models(root: Path) -> tuple[Path, Path]:
    """A float32 4-layer teacher checkpoint and the config.json of its 2-layer student."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(7)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA, "num_hidden_layers": 4}))
    teacher.save_pretrained(str(root / "teacher"))
    student = root / "student.json"
    student.write_text(json.dumps({**LLAMA, "num_hidden_layers": 2}))
    return root / "teacher", student


def _config(teacher: Path, student: Path, stage: int, **extra: Any) -> dict[str, Any]:
    return {
        "teacher": str(teacher),
        "student": str(student),
        "methods": ["kd"],
        "hardware": {"gpus": 2, "gpu_memory": "8GiB", "device": "cpu"},
        "training": {"seq_len": 16, "global_batch": 4, "steps": 2},
        "overrides": {"student_zero_stage": stage, "teacher_placement": "replicated"},
        "student_init": {"from": "teacher", "every": 2},
        **extra,
    }


def _expected(name: str, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher tensor a student parameter starts from, in the training dtype."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        parts[2] = str(TEACHER_LAYERS[int(parts[2])])
    return teacher[".".join(parts)].to(torch.bfloat16)


def _worker(rank: int, world: int, plans: list[str], teacher_path: str) -> None:
    from deepspeed import zero

    from gkd.runtime.engines import build_models

    teacher = torch.load(teacher_path)
    for text in plans:
        plan = Plan.from_json(text)
        student = build_models(plan, seed=0, total_steps=2).student
        stage3 = plan.strategy.student_zero_stage == 3
        names = [n for n, _ in student.named_parameters()]
        assert any(n.startswith("model.layers.1.") for n in names) and "lm_head.weight" in names
        for name, p in student.named_parameters():
            assert hasattr(p, "ds_tensor") == stage3, name
            with zero.GatheredParameters([p], enabled=stage3):
                assert torch.equal(p.data.cpu(), _expected(name, teacher)), (
                    plan.strategy.student_zero_stage,
                    name,
                )
        # Block 1 is the teacher's block 2, not its block 1.
        with zero.GatheredParameters(list(student.parameters()), enabled=stage3):
            q = dict(student.named_parameters())["model.layers.1.self_attn.q_proj.weight"].data
            assert not torch.equal(q, teacher["model.layers.1.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_every_other_layer_is_copied_exactly_zero3_and_whole(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from gkd.runtime.launch import launch

    teacher, student = _models(tmp_path)
    plans = []
    for stage in (3, 2):
        plan = gkd.plan(_config(teacher, student, stage))
        assert plan.strategy.student_zero_stage == stage
        plans.append(plan.to_json())
    torch.save(load_file(str(teacher / "model.safetensors")), tmp_path / "teacher.pt")
    launch(_worker, (plans, str(tmp_path / "teacher.pt")), processes=2)


def test_shapes_that_do_not_allow_the_copy_exit_2_with_one_line(tmp_path: Path) -> None:
    teacher, _ = _models(tmp_path)
    narrow = tmp_path / "narrow.json"
    narrow.write_text(
        json.dumps({**LLAMA, "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32})
    )
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps({**LLAMA, "num_hidden_layers": 3}))
    for student, expected in (
        (narrow, "student_init: the student's hidden size is 16 and the teacher's 32"),
        (deep, "student_init: every: 2 picks 2 of the teacher's 4 layers, but the student has 3"),
    ):
        path = tmp_path / "job.json"
        path.write_text(json.dumps(_config(teacher, student, 2)))
        result = CliRunner().invoke(main, ["plan", str(path)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.output, lines


def test_a_tensor_the_specs_cannot_see_is_refused_at_load(tmp_path: Path) -> None:
    """A student whose attention has biases the teacher's lacks passes the spec check; loading refuses it."""
    from gkd.models import build_model
    from gkd.planner.specs import load_spec
    from gkd.runtime.student_init import InPlace, copy_from_teacher

    teacher, _ = _models(tmp_path)
    biased = tmp_path / "biased.json"
    biased.write_text(json.dumps({**LLAMA, "num_hidden_layers": 2, "attention_bias": True}))
    model = build_model(load_spec(str(biased)), device="cpu", dtype=torch.bfloat16)
    with pytest.raises(
        InputError, match=r"have nothing for the student's model\.layers\.0\.self_attn\.q_proj\.bias"
    ):
        copy_from_teacher(model, teacher, (0, 2), InPlace())


def test_a_teacher_without_weights_is_refused_before_any_worker(tmp_path: Path) -> None:
    from gkd.runtime.executor import run_job

    _, student = _models(tmp_path)
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({**LLAMA, "num_hidden_layers": 4}))
    path = tmp_path / "job.json"
    path.write_text(json.dumps(_config(teacher, student, 2)))
    with pytest.raises(
        InputError, match="student_init copies the teacher's weights, but teacher .* has none"
    ):
        run_job(str(path), out=str(tmp_path / "out"), processes=2, echo=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_plan_file_is_checked_as_planning_checks_it(tmp_path: Path) -> None:
    from gkd.runtime.checks import check_plan

    teacher, student = _models(tmp_path)
    data = json.loads(gkd.plan(_config(teacher, student, 2)).to_json())
    check_plan(Plan.from_json(json.dumps(data)))
    data["inputs"]["config"]["student_init"] = {"from": "teacher", "layers": [0, 1, 2]}
    with pytest.raises(InputError, match=r"inputs.config.student_init: layers lists 3 of the teacher's 4"):
        check_plan(Plan.from_json(json.dumps(data)))
