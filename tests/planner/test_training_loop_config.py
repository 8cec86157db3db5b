"""training.lr_schedule / warmup / min_lr / clip_grad / adam_betas / report_to and student_init: validated
where they enter (one line, exit 2 from `gkd plan`), and carried into the student's DeepSpeed config as
DeepSpeed's schedulers; a constant rate without warmup adds nothing, so older plans stay valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.config import Config, TrainingConfig
from gkd.errors import InputError
from gkd.planner.pipeline import _scheduler_config

BASE = {
    "teacher": "tiny-llama-teacher",
    "student": "tiny-llama-student",
    "methods": ["kd"],
    "hardware": {"gpus": 2},
}


def _config(training: dict[str, Any], **extra: Any) -> Config:
    return Config.from_dict({**BASE, "training": {"global_batch": 4, **training}, **extra})


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({"lr_schedule": "step"}, "training.lr_schedule 'step' is not one of constant, linear, cosine"),
        ({"warmup_steps": 3, "warmup_ratio": 0.1}, "both warmup_steps and warmup_ratio"),
        ({"warmup_ratio": 1.5}, "training.warmup_ratio"),
        ({"warmup_steps": -1}, "training.warmup_steps must be at least 0"),
        ({"lr": 1e-4, "min_lr": 1e-3}, "training.min_lr (0.001) is above training.lr"),
        ({"clip_grad": -1}, "training.clip_grad must be >= 0"),
        ({"adam_betas": [0.9]}, "training.adam_betas must be two numbers"),
        ({"adam_betas": [0.9, 1.0]}, "training.adam_betas entries must be below 1"),
        ({"report_to": ["mlflow"]}, "training.report_to must list some of tensorboard, wandb"),
    ],
)
def test_bad_training_settings_are_one_line(training: dict[str, Any], expected: str) -> None:
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _config(training)


@pytest.mark.parametrize(
    ("student_init", "expected"),
    [
        ({"from": "student"}, "student_init.from 'student'"),
        ({"from": "teacher"}, "exactly one of layers"),
        ({"layers": [0, 2], "every": 2}, "exactly one of layers"),
        ({"layers": [0, 0]}, "names a layer twice"),
        ({"layers": [-1]}, "student_init.layers entry must be at least 0"),
        ({"every": 2, "skip": 1}, "student_init has unknown keys ['skip']"),
        ([0, 2], "student_init must be a mapping"),
    ],
)
def test_bad_student_init_is_one_line(student_init: Any, expected: str) -> None:
    with pytest.raises(InputError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        _config({}, student_init=student_init)


def test_settings_round_trip_through_the_resolved_config() -> None:
    config = _config(
        {"lr_schedule": "linear", "warmup_ratio": 0.1, "adam_betas": [0.8, 0.9], "report_to": "tensorboard"},
        student_init={"from": "teacher", "layers": [0, 1]},
    )
    again = Config.from_dict(config.to_dict())
    assert again == config
    assert again.training.report_to == ("tensorboard",) and again.student_init is not None
    assert again.to_dict()["student_init"] == {"from": "teacher", "layers": [0, 1]}


def test_schedules_become_deepspeeds() -> None:
    def scheduler(**kw: Any) -> Any:
        return _scheduler_config(TrainingConfig(global_batch=4, steps=100, lr=1e-3, **kw))

    assert scheduler() is None  # a constant rate without warmup: no scheduler, as before
    assert scheduler(warmup_steps=5) == {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 1e-3,
            "warmup_num_steps": 5,
            "warmup_type": "linear",
        },
    }
    # warmup_ratio rounds up to whole steps (7.5 -> 8); linear falls to min_lr at `steps`.
    assert scheduler(lr_schedule="linear", warmup_ratio=0.075, min_lr=1e-5)["params"] == {
        "total_num_steps": 100,
        "warmup_min_lr": 1e-5,
        "warmup_max_lr": 1e-3,
        "warmup_num_steps": 8,
        "warmup_type": "linear",
    }
    cosine = scheduler(lr_schedule="cosine", min_lr=2.5e-4)
    assert cosine["type"] == "WarmupCosineLR"
    assert cosine["params"]["cos_min_ratio"] == cosine["params"]["warmup_min_ratio"] == 0.25


def test_plan_file_carries_the_schedule(tmp_path: Path) -> None:
    import json

    path = tmp_path / "job.yaml"
    path.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"
        "training: {global_batch: 4, steps: 50, lr_schedule: cosine, warmup_steps: 5, clip_grad: 0}\n"
    )
    result = CliRunner().invoke(main, ["plan", str(path), "--gpus", "2", "--json"])
    assert result.exit_code == 0, result.output
    student = json.loads(result.stdout)["deepspeed"]["student"]
    assert student["scheduler"]["type"] == "WarmupCosineLR" and student["gradient_clipping"] == 0
    assert "betas" not in student["optimizer"]["params"]  # the default betas are DeepSpeed's own


def test_a_bad_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"
        "training: {global_batch: 4, lr_schedule: exponential}\n"
    )
    result = CliRunner().invoke(main, ["plan", str(path), "--gpus", "2"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.lr_schedule 'exponential'" in lines[0], lines
