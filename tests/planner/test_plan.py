"""The Plan: exact top-level keys, validation, and JSON round-trip identity (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.errors import InputError
from gkd.planner.plan import (
    CATEGORIES,
    PLAN_KEYS,
    Alternative,
    Op,
    PassRecord,
    Plan,
    Schedule,
    Strategy,
    TapCost,
    TensorAlloc,
)

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.:[]_", min_size=1, max_size=12)
sizes = st.integers(min_value=0, max_value=2**50)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
allocs = st.builds(TensorAlloc, name=names, bytes=sizes, category=st.sampled_from(CATEGORIES))
ops = st.builds(
    Op,
    name=names,
    kind=st.sampled_from(["teacher_forward", "student_forward", "tap_loss", "student_backward"]),
    model=st.sampled_from(["student", "teacher0"]),
    layer=st.integers(-1, 100),
    phase=st.sampled_from(["micro", "step", "offline"]),
    recompute=st.booleans(),
    taps=st.lists(names, max_size=3).map(tuple),
    losses=st.lists(names, max_size=2).map(tuple),
    allocs=st.lists(allocs, max_size=3).map(tuple),
    frees=st.lists(names, max_size=3).map(tuple),
)
tap_costs = st.builds(TapCost, method=names, model=names, tap=names, bytes=sizes, freed=names)
strategies_ = st.builds(
    Strategy,
    student_zero_stage=st.integers(0, 3),
    student_offload=st.sampled_from(["none", "optimizer", "optimizer+parameters"]),
    teacher_placement=st.sampled_from(["replicated", "zero3", "zero3_offload", "tensor_parallel", "offline"]),
    tensor_parallel=st.integers(1, 8),
    offline_teacher_placement=st.sampled_from(["", "zero3"]),
    micro_batch=st.integers(1, 64),
    grad_accum=st.integers(1, 64),
    recompute_layers=st.lists(st.integers(0, 100), max_size=5).map(tuple),
    tap_loss=st.sampled_from(["layerwise", "end"]),
    loss_path=st.sampled_from(["fused_linear", "logits", "topk"]),
    attention=st.sampled_from(["sdpa", "eager"]),
    taps=st.lists(tap_costs, max_size=3).map(tuple),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | floats | names,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(names, children, max_size=3),
    max_leaves=10,
)
json_dicts = st.dictionaries(names, json_values, max_size=4)


@st.composite
def plans(draw):
    memory = {c: draw(st.integers(0, 2**40)) for c in CATEGORIES}
    return Plan(
        inputs=draw(json_dicts),
        fits=draw(st.booleans()),
        budget_bytes=draw(sizes),
        peak_bytes=sum(memory.values()),
        memory=memory,
        host_bytes=draw(sizes),
        strategy=draw(strategies_),
        schedule=Schedule(
            grad_accum=draw(st.integers(1, 64)),
            ops=tuple(draw(st.lists(ops, max_size=5))),
            static=tuple(draw(st.lists(allocs, max_size=3))),
        ),
        deepspeed=draw(json_dicts),
        estimates=draw(json_dicts),
        alternatives=tuple(
            draw(
                st.lists(
                    st.builds(
                        Alternative,
                        strategy=strategies_,
                        peak_bytes=sizes,
                        fits=st.booleans(),
                        step_time_s=floats,
                        reason=names,
                    ),
                    max_size=3,
                )
            )
        ),
        provenance=tuple(
            draw(st.lists(st.builds(PassRecord, name=names, seconds=floats, summary=names), max_size=3))
        ),
    )


@settings(max_examples=50, deadline=None)
@given(plans())
def test_json_round_trip_is_identity(plan):
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text


@settings(max_examples=20, deadline=None)
@given(plans())
def test_top_level_keys_are_exactly_the_contract(plan):
    assert tuple(json.loads(plan.to_json())) == PLAN_KEYS
    assert set(json.loads(plan.to_json())["memory"]) == set(CATEGORIES)


def _minimal(**kw):
    memory = dict.fromkeys(CATEGORIES, 0)
    memory["parameters"] = 10
    base = dict(
        fits=True,
        budget_bytes=100,
        peak_bytes=10,
        memory=memory,
        host_bytes=0,
        strategy=Strategy(student_zero_stage=0, student_offload="none", teacher_placement="replicated"),
        schedule=Schedule(grad_accum=1, ops=()),
    )
    base.update(kw)
    return Plan(**base)


def test_memory_must_sum_to_peak():
    with pytest.raises(ValueError, match="sum"):
        _minimal(peak_bytes=11)
    with pytest.raises(ValueError, match="categories"):
        _minimal(memory={"parameters": 10})


def test_from_json_rejects_non_plans():
    with pytest.raises(InputError, match="missing"):
        Plan.from_json("{}")
    with pytest.raises(InputError, match="valid JSON"):
        Plan.from_json("{")
    data = json.loads(_minimal().to_json())
    data["version"] = 99
    with pytest.raises(InputError, match="version"):
        Plan.from_dict(data)


def test_unknown_category_rejected():
    with pytest.raises(ValueError):
        TensorAlloc(name="x", bytes=1, category="weights")
