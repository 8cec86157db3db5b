"""A config file that leaves out its teacher, student or methods is refused at planning (the defaults are the
headline GLM-130B job's, which a user's file almost never means), unless a flag gives them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.config import Config, load_config
from gkd.errors import InputError

BODY = "hardware: {gpus: 2}\ntraining: {seq_len: 64, global_batch: 8}\n"


def _plan(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plan", *args])
    return result.exit_code, result.output


def test_an_empty_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    code, out = _plan(str(tmp_path / "empty.yaml"))
    assert code == 2 and "does not name its teacher, student, methods" in out
    assert len(out.strip().splitlines()) == 1


def test_flags_give_what_the_file_left_out(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("student: tiny-llama-student\n" + BODY)
    code, out = _plan(str(path))
    assert code == 2 and "does not name its teacher, methods" in out
    code, out = _plan(str(path), "--teacher", "tiny-llama-teacher", "--methods", "kd")
    assert code == 0, out
    assert "tiny-llama-teacher" in out.splitlines()[0]


def test_a_complete_file_has_nothing_unset(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text("teachers: [tiny-llama-teacher]\nstudent: tiny-llama-student\nmethods: [kd]\n" + BODY)
    assert load_config(path).unset == ()
    assert Config().unset == ()  # a Config built in Python means its defaults


def test_teacher_and_teachers_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("teacher: a\nteachers: [b]\nstudent: s\nmethods: [kd]\n")
    with pytest.raises(InputError, match="both teacher and teachers; keep one"):
        load_config(path)


def test_gpus_flag_applies_before_the_files_batch_is_checked(tmp_path: Path) -> None:
    """The file leaves hardware.gpus at 8, which does not divide its global batch of 4; --gpus 2 does."""
    path = tmp_path / "small.yaml"
    path.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"
        "training: {seq_len: 64, global_batch: 4}\n"
    )
    code, out = _plan(str(path), "--gpus", "2")
    assert code == 0, out
    code, out = _plan(str(path), "--gpus", "3")
    assert code == 2 and "must be divisible by the number of GPUs (3)" in out
    code, out = _plan(str(path), "--gpus", "3", "--global-batch", "6")
    assert code == 0, out


def test_offline_topk_beyond_the_vocabulary_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "topk.yaml"
    path.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"
        "hardware: {gpus: 2}\ntraining: {seq_len: 64, global_batch: 8, offline_topk: 100000}\n"
    )
    code, out = _plan(str(path))
    assert code == 2 and "training.offline_topk 100000 exceeds the teacher's vocabulary of 256" in out
