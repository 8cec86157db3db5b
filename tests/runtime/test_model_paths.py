"""Model paths in a config or on the command line mean the same to `gkd plan` and `gkd run`: relative to the
config's folder (else the current folder), stored absolute in the plan, so a plan file runs from anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkd.config import apply_flags, default_config, load_config
from gkd.models import resolve_model
from gkd.planner.pipeline import plan
from gkd.runtime.checks import tensor_parallel_blocker


def _model_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "student"):
        config = dict(resolve_model(f"tiny-llama-{name}").hf_config)
        (folder / f"{name}.json").write_text(json.dumps(config))


def test_config_relative_paths_run_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _model_files(tmp_path / "job")
    job = tmp_path / "job" / "job.yaml"
    job.write_text(
        "teacher: teacher.json\nstudent: student.json\nmethods: [{name: kd}]\n"
        "training: {seq_len: 64, global_batch: 8, micro_batch: auto, steps: 2}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = apply_flags(load_config(str(job)), gpus=2)
    assert tensor_parallel_blocker(config) is None  # opened the teacher through the config's folder
    stored = plan(config).inputs["config"]
    assert stored["teachers"] == [str(tmp_path / "job" / "teacher.json")]
    assert stored["student"] == str(tmp_path / "job" / "student.json")


def test_flag_paths_are_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model_files(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    config = apply_flags(
        default_config(),
        teacher="models/teacher.json",
        student="models/student.json",
        methods="kd",
        gpus=2,
        seq_len=64,
        global_batch=8,
    )
    assert config.model_path(config.teachers[0]) == str(tmp_path / "models" / "teacher.json")
    assert config.model_path("tiny-llama-teacher") == "tiny-llama-teacher"  # a preset stays a name
    stored = plan(config).inputs["config"]
    assert stored["teachers"] == [str(tmp_path / "models" / "teacher.json")]


def test_a_flag_path_is_relative_to_the_current_folder_not_the_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config's folder holding the same relative path must not capture a path given on the command line."""
    _model_files(tmp_path / "job" / "models")  # next to the config
    _model_files(tmp_path / "here" / "models")  # where the command runs
    job = tmp_path / "job" / "job.yaml"
    job.write_text("teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [{name: kd}]\n")
    monkeypatch.chdir(tmp_path / "here")
    config = apply_flags(load_config(str(job)), teacher="models/teacher.json", student="models/student.json")
    assert config.model_path(config.teachers[0]) == str(tmp_path / "here" / "models" / "teacher.json")
    assert config.model_path(config.student) == str(tmp_path / "here" / "models" / "student.json")
