"""The student's DeepSpeed optimizer config that the pipeline's emit step writes: the type DeepSpeed builds
for `training.optimizer`, with `training.lr` and `training.weight_decay`, carried through the plan's JSON."""

from __future__ import annotations

import pytest
from _planner_synth import facts, kd_minilm

from gkd.config import TRAINING_OPTIMIZERS, Config, HardwareConfig, TrainingConfig
from gkd.planner.pipeline import emit
from gkd.planner.plan import Plan
from gkd.planner.search import search

TEACHER = facts("t", layers=4, hidden=128, saved=40_000, checkpoint=8_192, workspace=20_000)
STUDENT = facts("s", layers=2, hidden=64, saved=30_000, checkpoint=4_096, workspace=8_000)


def _plan(training: TrainingConfig) -> tuple[Config, Plan]:
    cfg = Config(
        teachers=("t",),
        student="s",
        hardware=HardwareConfig(
            gpus=2, gpus_per_node=2, gpu_memory_bytes=10**9, cuda_context_bytes=0, fragmentation=0.0
        ),
        training=training,
    )
    result = search(cfg, STUDENT, (TEACHER,), kd_minilm())
    return cfg, emit(cfg, (TEACHER,), STUDENT, kd_minilm(), result, ())


@pytest.mark.parametrize(
    "optimizer,expected",
    [
        ("adamw", {"type": "AdamW", "params": {"lr": 3e-5, "weight_decay": 0.01, "torch_adam": True}}),
        # DeepSpeed runs its "Adam" type as AdamW unless adam_w_mode is false.
        (
            "adam",
            {
                "type": "Adam",
                "params": {"lr": 3e-5, "weight_decay": 0.01, "adam_w_mode": False, "torch_adam": True},
            },
        ),
    ],
)
def test_optimizer_lr_and_weight_decay_reach_the_deepspeed_config(optimizer, expected):
    cfg, plan = _plan(
        TrainingConfig(seq_len=32, global_batch=8, optimizer=optimizer, lr=3e-5, weight_decay=0.01)
    )
    assert plan.deepspeed["student"]["optimizer"] == expected
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert Config.from_dict(again.inputs["config"]).training == cfg.training


def test_default_optimizer_config_is_unchanged():
    _, plan = _plan(TrainingConfig(seq_len=32, global_batch=8))
    assert plan.deepspeed["student"]["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True},
    }


def test_an_offloaded_optimizer_keeps_deepspeeds_cpu_adam():
    """torch's Adam (no op to compile, exact on resume) unless the optimizer is offloaded, where DeepSpeed's
    CPU Adam kernel is the point of the offload."""
    from gkd.planner.pipeline import _optimizer_config

    tr = TrainingConfig(seq_len=32, global_batch=8)
    assert _optimizer_config(tr, offloaded=False)["params"]["torch_adam"] is True
    assert "torch_adam" not in _optimizer_config(tr, offloaded=True)["params"]


def test_every_accepted_optimizer_is_one_deepspeed_builds():
    """`training.optimizer` accepts only names whose DeepSpeed type DeepSpeed builds itself ("Sgd" is neither
    one of them nor a torch.optim class, so an sgd run failed in every worker)."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    for ds_type in TRAINING_OPTIMIZERS.values():
        assert ds_type.lower() in ds_config.DEEPSPEED_OPTIMIZERS, ds_type
