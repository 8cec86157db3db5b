"""Student model states against DeepSpeed's own estimator functions (imported from the installed DeepSpeed),
teacher residency per placement, and the monotonicity of per-GPU model states in the GPU count."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.config import DeepSpeedSettings
from gkd.planner.memory import effective_deepspeed, student_model_states, teacher_residency

# (params, largest module): GPT-2-XL-like, LLaMA-7B, GLM-10B, OPT-13B, LLaMA-70B shapes
SIZES = [
    (1_557_611_200, 80_411_200),
    (6_738_415_616, 131_072_000),
    (9_879_000_000, 205_000_000),
    (12_853_000_000, 257_000_000),
    (68_976_648_192, 262_144_000),
]
GPUS = [(1, 1), (4, 4), (8, 8), (16, 8), (64, 8)]  # (total GPUs, GPUs per node)


def _ds():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def _close(ours: int, theirs: int) -> None:
    assert theirs > 0
    assert abs(ours - theirs) / theirs <= 0.01, f"gkd {ours} vs DeepSpeed {theirs}"


@pytest.mark.parametrize("params,largest", SIZES)
@pytest.mark.parametrize("gpus,per_node", GPUS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeed_estimator(params, largest, gpus, per_node, offload):
    z2, _ = _ds()
    cpu, gpu = z2(params, num_gpus_per_node=per_node, num_nodes=gpus // per_node, cpu_offload=offload)
    ours = student_model_states(
        params=params,
        largest_module=largest,
        gpus=gpus,
        gpus_per_node=per_node,
        stage=2,
        offload="optimizer" if offload else "none",
    )
    _close(ours.gpu_bytes, gpu)
    if offload:
        _close(ours.host_bytes, cpu)


@pytest.mark.parametrize("params,largest", SIZES)
@pytest.mark.parametrize("gpus,per_node", GPUS)
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+parameters"])
def test_zero3_matches_deepspeed_estimator(params, largest, gpus, per_node, offload):
    _, z3 = _ds()
    cpu, gpu, _ = z3(
        params,
        largest,
        num_gpus_per_node=per_node,
        num_nodes=gpus // per_node,
        cpu_offload=offload != "none",
        cpu_offload_params=offload == "optimizer+parameters",
    )
    ours = student_model_states(
        params=params, largest_module=largest, gpus=gpus, gpus_per_node=per_node, stage=3, offload=offload
    )
    _close(ours.gpu_bytes, gpu)
    if offload != "none":
        _close(ours.host_bytes, cpu)


def test_stage_table():
    # P = 1000, N = 4, Adam: exact bytes per category.
    s0 = student_model_states(
        params=1000, largest_module=100, gpus=4, gpus_per_node=4, stage=0, offload="none"
    )
    assert (s0.parameters, s0.gradients, s0.optimizer) == (2000, 6000, 12000)
    s1 = student_model_states(
        params=1000, largest_module=100, gpus=4, gpus_per_node=4, stage=1, offload="none"
    )
    assert (s1.parameters, s1.gradients, s1.optimizer) == (2000, 3000, 3000)
    s2 = student_model_states(
        params=1000, largest_module=100, gpus=4, gpus_per_node=4, stage=2, offload="none"
    )
    assert (s2.parameters, s2.gradients, s2.optimizer) == (2000, 1500, 3000)
    s3 = student_model_states(
        params=1000, largest_module=100, gpus=4, gpus_per_node=4, stage=3, offload="none"
    )
    assert s3.gpu_bytes == 4 * 100 + 18 * 1000 // 4
    sgd = student_model_states(
        params=1000, largest_module=100, gpus=4, gpus_per_node=4, stage=2, offload="none", optimizer="sgd"
    )
    assert sgd.optimizer == 8 * 1000 // 4


def test_invalid_combinations():
    with pytest.raises(ValueError):
        student_model_states(
            params=10, largest_module=1, gpus=2, gpus_per_node=2, stage=2, offload="optimizer+parameters"
        )
    with pytest.raises(ValueError):
        student_model_states(
            params=10, largest_module=1, gpus=2, gpus_per_node=2, stage=0, offload="optimizer"
        )


CHOICES = [
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (1, "optimizer"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
    (3, "optimizer+parameters"),
]


@settings(max_examples=200, deadline=None)
@given(
    params=st.integers(min_value=0, max_value=10**12),
    largest_frac=st.floats(min_value=0.0, max_value=1.0),
    n=st.integers(min_value=1, max_value=512),
    extra=st.integers(min_value=1, max_value=512),
    choice=st.sampled_from(CHOICES),
)
def test_more_gpus_never_raise_per_gpu_model_states(params, largest_frac, n, extra, choice):
    stage, offload = choice
    largest = int(params * largest_frac)
    a = student_model_states(
        params=params, largest_module=largest, gpus=n, gpus_per_node=n, stage=stage, offload=offload
    )
    b = student_model_states(
        params=params,
        largest_module=largest,
        gpus=n + extra,
        gpus_per_node=n + extra,
        stage=stage,
        offload=offload,
    )
    assert b.gpu_bytes <= a.gpu_bytes


@pytest.mark.parametrize(
    "placement,params_bytes,host",
    [
        ("replicated", 2 * 10**9, 0),
        ("tensor_parallel", 2 * 10**9 // 4, 0),
        ("offline", 0, 0),
        ("zero3", 2 * 10**9 // 8 + 2 * (10**7 + 1000) + 2 * 500, 0),
        ("zero3_offload", 2 * (10**7 + 1000) + 2 * 500, 2 * 10**9),
    ],
)
def test_teacher_residency(placement, params_bytes, host):
    # As gkd emits them: max-live capped at the 1000-element bucket, so the working set is that plus the
    # largest module, plus the persistent tensors, and the all-gather buffer is one bucket.
    ds = effective_deepspeed(DeepSpeedSettings(stage3_prefetch_bucket_size=1000), 10**9)
    r = teacher_residency(
        params=10**9,
        largest_module=10**7,
        persistent_params=500,
        placement=placement,
        gpus=8,
        gpus_per_node=8,
        tensor_parallel=4,
        ds=ds,
    )
    assert r.parameters == params_bytes
    assert r.host_bytes == host
    assert r.buffers == (2000 if placement.startswith("zero3") else 0)


def test_buffers_per_stage_and_cap():
    from gkd.planner.memory import deepspeed_buffers

    ds = DeepSpeedSettings()
    assert deepspeed_buffers(stage=0, offload="none", ds=ds) == 10**9
    assert deepspeed_buffers(stage=2, offload="none", ds=ds) == 2 * 10**9
    assert deepspeed_buffers(stage=3, offload="none", ds=ds, gather_buffer=10**8) == 10**9 + 10**8
    small = effective_deepspeed(ds, 1234)
    assert (small.reduce_bucket_size, small.stage3_prefetch_bucket_size) == (1234, 1234)
    assert small.stage3_max_live_parameters == 1234
    # Large models keep the buckets; max-live comes down to the prefetch bucket.
    assert effective_deepspeed(ds, 10**12) == replace(ds, stage3_max_live_parameters=50_000_000)
