"""Acceptance: tinybert + minilmv2 + kd in one config capture each tensor once and their loss is the weighted
sum of the three computed alone; a violated constraint (pkd across hidden sizes) and a vocabulary mismatch for
a logit method are one-line input errors (exit code 2 from the CLI)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from method_checks import check_backward, check_combination, model_specs

from gkd.cli import main
from gkd.errors import InputError
from gkd.methods import resolve
from gkd.models import spec_from_config

COMBINED = [
    {"name": "tinybert", "weight": 0.5},
    {"name": "minilmv2", "weight": 2.0, "options": {"relation_heads": 8}},
    {"name": "kd", "options": {"temperature": 3.0, "hard_rate": 0.2}},
]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_tinybert_minilmv2_kd_equals_weighted_sum_alone(family):
    case = check_combination(COMBINED, family=family)
    assert {t.method for t in case.resolved.loss_terms} == {"tinybert", "minilmv2", "kd"}
    # minilmv2's last-layer q / k are tinybert's last mapped q / k: requested (and captured) once.
    assert {"q[1]", "k[1]"} <= case.resolved.student_taps
    assert {"q[3]", "k[3]"} <= case.resolved.teacher_taps[0]
    alone = [resolve([m], case.teacher_specs, case.student_spec, fused_linear=False) for m in COMBINED]
    assert sum(len(r.student_taps) for r in alone) > len(case.resolved.student_taps)
    assert case.resolved.eager_attention is False  # q/k kernels: no (T x T) scores taps


def test_combination_backward_through_real_capture():
    out = check_backward(COMBINED, family="llama")
    assert set(out.terms) == {
        "tinybert.attention",
        "tinybert.hidden",
        "minilmv2.relations",
        "kd.soft",
        "kd.hard",
    }
    assert torch.isfinite(out.total)


def test_pkd_across_hidden_sizes_names_both_sizes_and_alternatives():
    teachers, student = model_specs("llama")  # hidden 64 vs 32
    with pytest.raises(InputError) as err:
        resolve(["kd", "pkd"], teachers, student)
    message = str(err.value)
    assert "\n" not in message
    assert "pkd" in message and "64" in message and "32" in message
    alternatives = message.split("methods that work across hidden sizes:")[1]
    names = {n.strip() for n in alternatives.split(",")}
    assert {"kd", "tinybert", "minilmv2", "hidden_mse"} <= names
    assert not {"pkd", "distilbert", "alp_kd", "sid", "mobilebert"} & names


def test_pkd_across_hidden_sizes_cli_exit_2_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(
        main,
        [
            "plan",
            "--teacher",
            "tiny-llama-teacher",
            "--student",
            "tiny-llama-student",
            "--methods",
            "pkd",
            "--gpus",
            "1",
            "--gpu-memory",
            "1GiB",
            "--seq-len",
            "32",
            "--global-batch",
            "2",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "pkd" in lines[0] and "64" in lines[0] and "32" in lines[0] and "tinybert" in lines[0]


@pytest.mark.parametrize("name", ["kd", "pd", "fkl", "tinybert"])
def test_vocabulary_mismatch_for_a_logit_method(name):
    teachers, student = model_specs("llama")
    other = spec_from_config(
        {**student.hf_config, "vocab_size": 300}, name="tiny-llama-v300", dtype="float32"
    )
    with pytest.raises(InputError) as err:
        resolve([name], teachers, other)
    message = str(err.value)
    assert "\n" not in message and "vocabulary" in message and "300" in message and "256" in message
