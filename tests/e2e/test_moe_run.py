"""Mixture-of-experts models end to end: a tiny Mixtral-shaped teacher and student plan and train for 3 steps
in 2 CPU processes (gloo, DeepSpeed), in the 100B+ MoE reference plan's shape (ZeRO-3 student, ZeRO-3
teacher with its weights, every expert, offloaded to the host), with kd and router_kl (the routers' logits
captured on both sides, the router loss computed layer by layer); the first loss equals the single-process
step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gkd.config import Config
from gkd.planner.pipeline import plan as make_plan
from gkd.planner.plan import Plan
from gkd.runtime.executor import run_job

pytestmark = pytest.mark.slow

STEPS = 3
SEED = 3
MIXTRAL = {
    "model_type": "mixtral",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "torch_dtype": "bfloat16",
}


def test_moe_teacher_and_student_train_in_two_processes(tmp_path: Path, models_dir: Path) -> None:
    import torch

    from gkd.runtime.engines import build_models
    from gkd.runtime.step import distill_step

    paths = {}
    for name, layers, hidden, ffn in (("teacher", 4, 64, 96), ("student", 2, 32, 48)):
        config = {**MIXTRAL, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn}
        paths[name] = tmp_path / f"moe-{name}.json"
        paths[name].write_text(json.dumps(config))
    config: dict[str, Any] = {
        "teacher": str(paths["teacher"]),
        "student": str(paths["student"]),
        "methods": [{"name": "kd"}, {"name": "router_kl"}],
        "hardware": {"gpus": 2, "gpu_memory": "8GiB", "host_memory": "16GiB", "cuda_context": "64MiB"},
        "training": {"seq_len": 32, "global_batch": 4, "micro_batch": [2], "steps": STEPS, "lr": 3e-3},
        "deepspeed": {"stage3_param_persistence_threshold": 0},
        "overrides": {"student_zero_stage": 3, "teacher_placement": "zero3_offload", "tap_loss": "layerwise"},
    }
    plan = make_plan(Config.from_dict(config))
    assert plan.fits
    teacher = plan.inputs["models"]["teachers"][0]
    assert (teacher["experts"], teacher["experts_per_token"]) == (4, 2)
    assert teacher["active_params"] < teacher["params"]
    routers = {t.tap for t in plan.strategy.taps if t.method == "router_kl"}
    assert routers == {"router_logits[0]", "router_logits[1]", "router_logits[3]"}
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())

    corpus = str(models_dir / "corpus.txt")
    out = run_job(
        str(path),
        data=corpus,
        steps=STEPS,
        out=str(tmp_path / "out"),
        processes=2,
        seed=SEED,
        echo=lambda _: None,
    )
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["terms"]["router_kl.loss"] > 0 for r in rows)

    # The first step's loss equals the same step in one process without DeepSpeed (both ranks' micro-batch).
    from gkd.runtime.data import batches, load_tokenizer

    plan = Plan.from_json(path.read_text())
    models = build_models(plan, seed=SEED, total_steps=STEPS)
    models.student.train()
    tokenizer = load_tokenizer(plan.inputs["config"]["teachers"][0], models.teacher_specs[0])
    losses = []
    for rank in range(2):
        stream = batches(
            corpus, tokenizer, seq_len=32, micro_batch=2, objective="causal", rank=rank, world=2, seed=SEED
        )
        out_ = distill_step(
            models.student,
            models.teachers,
            models.loss,
            next(stream),
            models.resolver.at(0),
            step=0,
            total_steps=STEPS,
        )
        losses.append(float(out_.total.detach().float()))
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
