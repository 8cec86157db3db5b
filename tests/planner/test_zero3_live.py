"""The ZeRO-3 working set: gkd emits stage3_max_live_parameters no larger than the prefetch bucket (with
DeepSpeed's default 1e9 a model under 1e9 parameters is gathered whole; benchmarks/bench_zero3_gathered.py),
and the memory rules count what DeepSpeed then holds: max-live plus the largest module plus the persistent
tensors gathered, and one prefetch group's all-gather buffer, for a ZeRO-3 student and a ZeRO-3 teacher."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _planner_synth import facts, kd_minilm

from gkd.config import Config, DeepSpeedSettings, HardwareConfig, Overrides, TrainingConfig
from gkd.planner.analysis import resident_tensors
from gkd.planner.memory import BYTES_BF16, zero3_gather_buffer_bytes, zero3_gathered_bytes
from gkd.planner.pipeline import emit
from gkd.planner.search import search

TEACHER = facts("t", layers=4, hidden=128, saved=40_000, checkpoint=8_192, workspace=20_000)
STUDENT = facts("s", layers=2, hidden=64, saved=30_000, checkpoint=4_096, workspace=8_000)
BUCKET = 5_000


def _config(placement: str, max_live: int, device: str) -> Config:
    return Config(
        teachers=("t",),
        student="s",
        hardware=HardwareConfig(
            gpus=2,
            gpus_per_node=2,
            gpu_memory_bytes=10**9,
            cuda_context_bytes=0,
            fragmentation=0.0,
            device=device,
        ),
        training=TrainingConfig(seq_len=32, global_batch=8),
        deepspeed=DeepSpeedSettings(stage3_prefetch_bucket_size=BUCKET, stage3_max_live_parameters=max_live),
        overrides=Overrides(student_zero_stage=3, teacher_placement=placement),
    )


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("placement", ["zero3", "zero3_offload"])
@pytest.mark.parametrize("max_live", [1_000_000_000, 700])
def test_emitted_max_live_is_bounded_and_counted(placement: str, max_live: int, device: str) -> None:
    cfg = _config(placement, max_live, device)
    methods = kd_minilm()
    result = search(cfg, STUDENT, (TEACHER,), methods)
    plan = emit(cfg, (TEACHER,), STUDENT, methods, result, ())
    live = min(max_live, BUCKET)
    student_zero = plan.deepspeed["student"]["zero_optimization"]
    teacher_zero = plan.deepspeed["teachers"][0]["zero_optimization"]
    assert student_zero["stage3_max_live_parameters"] == live
    assert teacher_zero["stage3_max_live_parameters"] == live

    static, _ = resident_tensors(
        config=cfg, student=STUDENT, teachers=(TEACHER,), resolved=methods, strategy=plan.strategy
    )
    by_name = {t.name: t.bytes for t in static}
    # The teacher: its partition (zero3 on a GPU, or zero3_offload on the CPU, where the offloaded
    # partition is the process's own memory) plus max-live and the largest module gathered.
    gathered = (live + TEACHER.largest_module + TEACHER.persistent_params) * BYTES_BF16
    partition = TEACHER.params * BYTES_BF16 // 2 if placement == "zero3" or device == "cpu" else 0
    assert by_name["teacher0.parameters"] == partition + gathered
    assert by_name["teacher0.prefetch"] == live * BYTES_BF16
    # The student: DeepSpeed's estimator's gathered largest module (2L) becomes max-live + L + persistent.
    trainable = STUDENT.params + methods.num_extra_parameters
    student_gathered = (live + STUDENT.largest_module + STUDENT.persistent_params) * BYTES_BF16
    assert by_name["student.parameters"] == student_gathered
    reduce = min(500_000_000, trainable) * BYTES_BF16
    assert by_name["student.buckets"] + by_name.get("student.reduce_bucket", 0) == reduce + live * BYTES_BF16
    if device == "cpu":  # kept from engine setup, split off what a CPU plan moves to the backward
        assert by_name["student.reduce_bucket"] == reduce
        kept = 2 * trainable // 2 if plan.strategy.student_offload == "none" else 0
        assert by_name.get("student.gradient_partitions", 0) == kept


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_plan_keeps_zero3_engine_buffers_in_the_forward(stage: int) -> None:
    """A CPU plan counts the student's gradients and buckets from the backward to the step (DeepSpeed makes
    them there at ZeRO-1/2), except ZeRO-3's reduction bucket and bf16 gradient partitions, which its engine
    allocates at setup (stage3.py: the contiguous_gradients bucket, grad_partitions_flat_buffer): at the
    forward's peak they are the plan's only student gradients and buffers."""
    cfg = _config("replicated", 10**9, "cpu")
    cfg = replace(cfg, overrides=replace(cfg.overrides, student_zero_stage=stage, student_offload="none"))
    methods = kd_minilm()
    plan = emit(cfg, (TEACHER,), STUDENT, methods, search(cfg, STUDENT, (TEACHER,), methods), ())
    trainable = STUDENT.params + methods.num_extra_parameters
    reduce = min(500_000_000, trainable) * BYTES_BF16
    assert plan.memory["buffers"] == (reduce if stage == 3 else 0)
    assert plan.memory["gradients"] == (2 * trainable // 2 if stage == 3 else 0)


def test_rule_counts_max_live_up_to_the_model() -> None:
    """What DeepSpeed holds grows with max-live (bench_zero3_gathered: 60,000 -> about 70,000 gathered of a
    180,800-element model, 1e9 -> nearly all of it), whatever the prefetch bucket."""
    params, largest, persistent = 180_800, 16_384, 1_000
    counts = [
        zero3_gathered_bytes(
            params,
            largest,
            persistent,
            DeepSpeedSettings(stage3_prefetch_bucket_size=20_000, stage3_max_live_parameters=live),
        )
        // BYTES_BF16
        for live in (20_000, 60_000, 10**9)
    ]
    assert counts == [20_000 + largest + persistent, 60_000 + largest + persistent, params]
    ds = DeepSpeedSettings(stage3_prefetch_bucket_size=20_000, stage3_max_live_parameters=60_000)
    assert zero3_gather_buffer_bytes(params, persistent, ds) == 20_000 * BYTES_BF16
