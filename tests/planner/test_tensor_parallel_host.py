"""The plan's host memory for loading a tensor-parallel teacher: each rank builds it on the meta device and
fills only its slices on its GPU (gkd.runtime.tensor_parallel.build_tensor_parallel), so the host holds one
tensor being read per rank, not the whole teacher per rank."""

from __future__ import annotations

from dataclasses import replace

from gkd.config import Config, Overrides


def test_a_tensor_parallel_teacher_loads_with_one_tensor_per_rank_on_the_host() -> None:
    from gkd.planner.pipeline import plan as make_plan

    config = Config()  # the headline job: one node of 8 GPUs
    pinned = replace(config, overrides=Overrides(teacher_placement="tensor_parallel", tensor_parallel=8))
    plan = make_plan(pinned)
    assert plan.strategy.teacher_placement == "tensor_parallel"
    t, s = plan.inputs["models"]["teachers"][0], plan.inputs["models"]["student"]
    parts = plan.estimates["host_parts_bytes"]
    student = 8 * (
        -(-s["largest_module"] // 8) if plan.strategy.student_zero_stage == 3 else s["largest_module"]
    )
    teacher = 8 * t["largest_module"]  # one whole tensor per rank, staged on the host
    # Neither model keeps host bytes once loaded (the student's offloaded states are the steady state).
    assert parts["load"] == max(2 * student, 2 * teacher)
    assert parts["load"] < 8 * 2 * t["params"] // 10  # before: the whole teacher on each of the 8 ranks
