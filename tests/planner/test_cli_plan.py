"""`gkd plan` end to end on tiny models: -o round-trips, --plot writes a PNG, --json, --explain, not fitting
exits 1 with re-planned suggestions, bad input exits 2 with one line and no traceback."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.planner.plan import PLAN_KEYS, Plan

TINY = """\
teacher: tiny-llama-teacher
student: tiny-llama-student
methods: [kd, minilmv2]
hardware: {gpus: 2, gpu_memory: 64MiB, host_memory: 1GiB, cuda_context: 0}
training: {seq_len: 64, global_batch: 4}
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    path = folder / "tiny.yaml"
    path.write_text(TINY)
    mp = pytest.MonkeyPatch()
    mp.setenv("GKD_CACHE_DIR", str(folder / "cache"))
    yield path
    mp.undo()


def run(*args):
    result = CliRunner().invoke(main, ["plan", *map(str, args)])
    return result


def test_output_file_reads_back_equal_and_plot_is_png(cfg, tmp_path):
    out, png = tmp_path / "plan.json", tmp_path / "timeline.png"
    r = run(cfg, "-o", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert "FITS" in r.output and "Runners-up" in r.output
    assert "2 x GPU (64.0 MiB each)" in r.output  # 64 MiB is no A100-40GB: the GPU is not named
    text = out.read_text()
    plan = Plan.from_json(text)
    assert plan.to_json() == text
    assert Plan.from_json(plan.to_json()) == plan
    assert tuple(json.loads(text)) == PLAN_KEYS
    assert plan.fits and plan.peak_bytes <= plan.budget_bytes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The library call plans the same thing (timings aside).
    import gkd
    from gkd.config import load_config

    again = gkd.plan(load_config(cfg))
    assert dataclasses.replace(again, provenance=()) == dataclasses.replace(plan, provenance=())


def test_json_and_explain(cfg):
    r = run(cfg, "--json")
    assert r.exit_code == 0
    assert tuple(json.loads(r.output)) == PLAN_KEYS
    r = run(cfg, "--explain", "--seq-len", "64")
    assert r.exit_code == 0
    assert "Resolved config:" in r.output and "Passes:" in r.output
    for name in ("frontend", "facts", "methods", "search", "emit"):
        assert f"  {name}" in r.output


def test_not_fitting_exits_1_with_replanned_suggestions(cfg, monkeypatch):
    # Synthetic facts whose activations scale with the sequence, so re-planning needs no new traces.
    from _planner_synth import facts

    import gkd.planner.pipeline as pipeline

    def synthetic(spec, *, seq_len, persistence_threshold):
        return facts(
            spec.name,
            layers=spec.layers,
            hidden=spec.hidden,
            heads=spec.heads,
            vocab=spec.vocab,
            seq=seq_len,
            saved=4_000 * seq_len,
            checkpoint=64 * seq_len,
            workspace=1_000 * seq_len,
        )

    monkeypatch.setattr(pipeline, "model_facts", synthetic)
    r = run(cfg, "--gpu-memory", "600KiB")
    assert r.exit_code == 1, r.output
    assert "DOES NOT FIT" in r.output
    assert "smallest changes that fit" in r.output
    assert "--seq-len 32" in r.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--gpu-memory", "lots"], "size"),
        (["--gpus", "0"], "hardware.gpus"),
        (["--gpus", "two"], "--gpus"),
        (["--global-batch", "3"], "divisible"),
        (["--methods", "nosuchmethod"], "unknown method"),
        (["--student", "no-such-model"], "unknown model"),
        (["--seq-len", "100000"], "sequence length"),
    ],
)
def test_bad_input_exits_2_with_one_line(cfg, args, fragment):
    r = run(cfg, *args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("gkd: error:") and fragment in lines[0]
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    "old,new,fragment",
    [
        (
            "methods: [kd, minilmv2]",
            "methods: [{name: kd, options: {temperature: hot}}]",
            "'kd': option temperature",
        ),
        (
            "methods: [kd, minilmv2]",
            "methods: [{name: kd, options: {temperature: -1}}]",
            "'kd': option temperature",
        ),
        ("methods: [kd, minilmv2]", "methods: [{name: kd, options: {soft: bogus}}]", "'kd': option soft"),
        ("methods: [kd, minilmv2]", "methods: [{name: kd, weight: .nan}]", "'kd' weight must be a finite"),
        ("teacher: tiny-llama-teacher", "teacher: 5", "teacher must be"),
        ("global_batch: 4}", "global_batch: 4, optimizer: {name: adamw, lr: -1}}", "training.optimizer"),
        ("global_batch: 4}", "global_batch: 4, optimizer: sgd}", "adamw, adam"),
        ("global_batch: 4}", "global_batch: 4, lr: -1}", "training.lr"),
        ("cuda_context: 0}", "cuda_context: 0, interconnect: carrier_pigeon}", "hardware.interconnect"),
    ],
)
def test_bad_config_values_exit_2_at_plan_time(cfg, tmp_path, old, new, fragment):
    """Values a run would fail on are refused by `gkd plan` (and `gkd check --update`) as one line, exit 2."""
    path = tmp_path / "bad.yaml"
    assert old in TINY
    path.write_text(TINY.replace(old, new))
    checked = CliRunner().invoke(
        main, ["check", str(path), "--update", "--baseline", str(tmp_path / "b.json")]
    )
    for r in (run(path), checked):
        assert r.exit_code == 2, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("gkd: error:")]
        assert len(errors) == 1 and fragment in errors[0], r.output
        assert "Traceback" not in r.output


def test_lr_and_weight_decay_reach_the_plan(cfg, tmp_path):
    path, out = tmp_path / "lr.yaml", tmp_path / "plan.json"
    path.write_text(TINY.replace("global_batch: 4}", "global_batch: 4, lr: 3.0e-5, weight_decay: 0.01}"))
    r = run(path, "-o", out)
    assert r.exit_code == 0, r.output
    plan = Plan.from_json(out.read_text())
    params = plan.deepspeed["student"]["optimizer"]["params"]
    assert params == {"lr": 3e-5, "weight_decay": 0.01, "torch_adam": True}
    assert plan.inputs["config"]["training"]["lr"] == 3e-5


def test_missing_config_file_exits_2(tmp_path):
    r = run(tmp_path / "nope.yaml")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_takd_chain_asks_for_one_plan_per_link(cfg, tmp_path):
    """A chained method is several runs; planning them as one job would describe the wrong models."""
    path = tmp_path / "takd.yaml"
    path.write_text(
        TINY.replace(
            "methods: [kd, minilmv2]",
            "methods: [{name: takd, options: {assistants: [tiny-gpt2-teacher], link_methods: [kd]}}]",
        )
    )
    r = run(path)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    assert "--teacher tiny-llama-teacher --student tiny-gpt2-teacher" in lines[0]
    assert "--teacher tiny-gpt2-teacher --student tiny-llama-student" in lines[0]
