"""A plan file is data from outside: `gkd run plan.json` checks every field's type and range, the strategy
against its inputs, and the DeepSpeed section against what gkd generates for them, before any worker starts
(exit code 2, one line naming the field)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.errors import InputError
from gkd.runtime.checks import load_or_plan

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def good_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = CliRunner().invoke(main, ["plan", str(TINY), "--gpus", "2", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def _load(tmp_path: Path, data: Any) -> Any:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return load_or_plan(str(path), processes=2, echo=lambda *_: None)


def _set(data: dict[str, Any], where: str, value: Any) -> None:
    """Set the value at a dotted path ("schedule.ops.0.layer"); the value DELETE drops the key."""
    *parents, last = where.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()


def test_the_plan_as_written_loads(tmp_path: Path, good_plan: dict[str, Any]) -> None:
    plan = _load(tmp_path, good_plan)
    assert plan.strategy.grad_accum == good_plan["strategy"]["grad_accum"]


@pytest.mark.parametrize(
    "where, value, named",
    [
        ("strategy.grad_accum", -3, "strategy.grad_accum"),
        ("strategy.grad_accum", 0, "strategy.grad_accum"),
        ("strategy.grad_accum", 2, "strategy.grad_accum"),  # micro-batch x accumulation x GPUs != batch
        ("strategy.grad_accum", "1", "strategy.grad_accum"),
        ("strategy.grad_accum", 1.0, "strategy.grad_accum"),
        ("strategy.teacher_placement", "bogus", "strategy.teacher_placement"),
        ("strategy.student_zero_stage", 7, "strategy.student_zero_stage"),
        ("strategy.student_offload", "disk", "strategy.student_offload"),
        ("strategy.micro_batch", 2, "strategy.micro_batch"),
        ("strategy.micro_batch", True, "strategy.micro_batch"),
        ("strategy.tensor_parallel", 2, "strategy.tensor_parallel"),
        ("strategy.loss_path", DELETE, "strategy.loss_path"),
        ("strategy.recompute_layers", "1", "strategy.recompute_layers"),
        ("strategy.recompute_layers", [-1], "strategy.recompute_layers"),
        ("strategy.recompute_layers", [99], "strategy.recompute_layers"),
        ("strategy.tap_loss", None, "strategy.tap_loss"),
        ("strategy.attention", "flash", "strategy.attention"),
        ("strategy.taps.0.bytes", None, "strategy.taps[0].bytes"),
        ("strategy", [], "strategy"),
        ("fits", "false", "fits"),
        ("fits", 0, "fits"),
        ("version", "1", "version"),
        ("peak_bytes", "big", "peak_bytes"),
        ("memory.parameters", "x", "memory.parameters"),
        ("memory", [], "memory"),
        ("schedule.grad_accum", 3, "schedule.grad_accum"),
        ("schedule.ops.0.layer", "a", "schedule.ops[0].layer"),
        ("schedule.ops.0.allocs.0.bytes", -5, "schedule.ops[0].allocs[0].bytes"),
        ("schedule.ops", {}, "schedule.ops"),
        ("alternatives", None, "alternatives"),
        ("provenance.0.seconds", "x", "provenance[0].seconds"),
        ("inputs", [], "inputs"),
        ("inputs.config.training.optimizer", "sgd", "training.optimizer"),
        ("inputs.config.training.global_batch", "8", "training.global_batch"),
        ("inputs.config.training.seq_len", 10**30, "training.seq_len"),
        ("inputs.config.training", 5, "training"),
        ("inputs.config.hardware.gpus", 4, "GPUs"),
        ("inputs.config.teachers", [], "teacher"),
        ("inputs.config.student", "no-such-model", "no-such-model"),
        ("inputs.config.methods.0.options", {"temperature": -1}, "temperature"),
        (
            "deepspeed.student.train_micro_batch_size_per_gpu",
            2,
            "deepspeed.student.train_micro_batch_size_per_gpu",
        ),
        ("deepspeed.student.optimizer.type", "SGD", "deepspeed.student.optimizer.type"),
        ("deepspeed.student.zero_optimization.stage", 7, "deepspeed.student.zero_optimization.stage"),
        (
            "deepspeed.student.gradient_accumulation_steps",
            -3,
            "deepspeed.student.gradient_accumulation_steps",
        ),
        ("deepspeed.student.flops_profiler", {"enabled": True, "output_file": "/tmp/x"}, "flops_profiler"),
        ("deepspeed.student", DELETE, "deepspeed.student"),
        ("deepspeed.teachers", [{"stage": 3}], "deepspeed.teachers"),
        ("deepspeed.teacher_pass", "offline", "deepspeed.teacher_pass"),
    ],
    ids=lambda value: None if not isinstance(value, str) else value,
)
def test_edited_plans_are_refused(
    tmp_path: Path, good_plan: dict[str, Any], where: str, value: Any, named: str
) -> None:
    data = copy.deepcopy(good_plan)
    _set(data, where, value)
    with pytest.raises(InputError) as err:
        _load(tmp_path, data)
    message = str(err.value)
    assert named in message and "\n" not in message and len(message) < 600, message


def test_cli_refuses_an_edited_plan_in_one_line(tmp_path: Path, good_plan: dict[str, Any]) -> None:
    data = copy.deepcopy(good_plan)
    data["strategy"]["grad_accum"] = -3
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "strategy.grad_accum" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_file_writing_deepspeed_key_writes_nothing(tmp_path: Path, good_plan: dict[str, Any]) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    data = copy.deepcopy(good_plan)
    data["deepspeed"]["student"]["flops_profiler"] = {"enabled": True, "output_file": str(victim)}
    data["deepspeed"]["student"]["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv")}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "deepspeed.student" in result.output
    assert victim.read_text() == "keep me" and not (tmp_path / "csv").exists()


@pytest.mark.parametrize(
    "text",
    ['{"strategy": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"strategy": 1, "x": ' + "9" * 5000 + "}"],
    ids=["deep", "digits"],
)
def test_unreadable_json_targets_are_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output[-1000:]
    assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 400


def test_a_fifo_or_device_is_not_a_regular_file(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    for target in (str(fifo), "/dev/zero"):
        for command in (["plan", target], ["run", target, "--out", str(tmp_path / "out")]):
            result = CliRunner().invoke(main, command)
            assert result.exit_code == 2 and "not a regular file" in result.output, (command, result.output)
