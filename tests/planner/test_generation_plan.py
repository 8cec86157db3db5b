"""Generation in the plan (the `generation` config section): the schedule's generate op with its key/value
cache, where it runs (on_policy's student in every micro-step, sequence_kd's teacher before training, an
offline teacher's in the offline phase), its share of the step time, and that a placement which gathers
its weights for every sampled token costs more than one that does not."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.config import Config
from gkd.models import resolve_model
from gkd.planner.cost import Generation, ModelShape, step_cost
from gkd.planner.pipeline import plan
from gkd.planner.probe import dtype_bytes
from gkd.planner.schedule import simulate
from gkd.runtime.memory import training_memory

SEQ, NEW, MICRO = 64, 12, 2


def _config(generation: dict[str, Any] | None, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "teacher": "tiny-llama-teacher",
        "student": "tiny-llama-student",
        "methods": ["kd"],
        "hardware": {"gpus": 2},
        "training": {"seq_len": SEQ, "global_batch": 8, "micro_batch": [MICRO]},
        "overrides": overrides,
    }
    if generation is not None:
        data["generation"] = {"max_new_tokens": NEW, **generation}
    return Config.from_dict(data)


def _kv_cache(preset: str) -> int:
    """Every layer's k and v for MICRO rows of SEQ positions, from the model's own shape."""
    spec = resolve_model(preset)
    head_dim = spec.attn_head_dim or spec.hidden // spec.heads
    return 2 * spec.layers * spec.kv_heads * head_dim * SEQ * MICRO * dtype_bytes(spec.dtype)


def test_an_on_policy_plan_samples_with_the_student_at_the_start_of_each_micro_step() -> None:
    p = plan(_config({"mode": "on_policy"}))
    assert p.strategy.micro_batch == MICRO
    first = p.schedule.ops[0]
    assert (first.name, first.kind, first.model, first.phase) == (
        "generate.student",
        "generate",
        "student",
        "micro",
    )
    allocs = {a.name: a.bytes for a in first.allocs}
    assert allocs["generate.student.kv_cache"] == _kv_cache("tiny-llama-student")
    # The prompt forward's logits: every prompt position of every row.
    assert allocs["generate.student.prompt_logits"] == MICRO * (SEQ - NEW) * 256 * 2
    assert set(first.frees) == set(allocs)  # nothing outlives the sampling
    assert p.schedule.ops[1].kind == "teacher_forward"  # then the teacher scores prompt + sample
    assert "generation" in p.estimates["step_parts_s"]  # its share of the step (tiny here: 0.0 s)
    # Without generation: no op and no share, the plan of a config without the section.
    off = plan(_config(None))
    assert all(op.kind != "generate" for op in off.schedule.ops)
    assert "generation" not in off.estimates["step_parts_s"]


def test_gkd_plan_shows_the_generation_op_and_its_cache(tmp_path: Any) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [jsd]\nhardware: {gpus: 2}\n"
        f"training: {{seq_len: {SEQ}, global_batch: 8, micro_batch: [{MICRO}]}}\n"
        f"generation: {{mode: on_policy, max_new_tokens: {NEW}}}\n"
    )
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.output.splitlines() if "student generation" in x]
    print(line)
    assert f"key/value cache {_kv_cache('tiny-llama-student') // 1024}.0 KiB" in line


def test_the_generation_op_can_be_the_peak() -> None:
    # A vocabulary-sized prompt logits tensor larger than anything the step holds makes sampling the peak.
    p = plan(_config({"mode": "on_policy", "max_new_tokens": 1}))
    gen = p.schedule.ops[0]
    big = replace(gen, allocs=tuple(replace(a, bytes=a.bytes * 1000) for a in gen.allocs))
    timeline = simulate(replace(p.schedule, ops=(big, *p.schedule.ops[1:])))
    assert timeline.peak_op == "generate.student"
    static = sum(a.bytes for a in p.schedule.static)
    assert timeline.peak_bytes == static + sum(a.bytes for a in big.allocs)


@pytest.mark.parametrize("placement", ["replicated", "offline"])
def test_sequence_kd_plans_the_teachers_generation_before_training(placement: str) -> None:
    p = plan(_config({"mode": "sequence_kd"}, teacher_placement=placement))
    [gen] = [op for op in p.schedule.ops if op.kind == "generate"]
    assert gen.model == "teacher0" and p.schedule.ops[0] is gen  # before the offline pass and training
    allocs = {a.name: a.bytes for a in gen.allocs}
    assert allocs["generate.teacher0.kv_cache"] == _kv_cache("tiny-llama-teacher")
    if placement == "offline":
        # Beside the teacher as the offline pass holds it, without the training's resident tensors.
        assert gen.phase == "offline" and "offline.teacher0.parameters" in allocs
    else:
        assert gen.phase == "before"  # with the training's resident tensors, measured apart from the steps
        assert training_memory(p) == dict(simulate(replace(p.schedule, ops=p.schedule.ops[1:])).by_category)
    # lambda > 0: the student samples too, in every micro-step.
    mixed = plan(_config({"mode": "sequence_kd", "lambda": 0.5}, teacher_placement="replicated"))
    assert [op.model for op in mixed.schedule.ops if op.kind == "generate"] == ["teacher0", "student"]


def test_a_placement_that_gathers_per_token_pays_for_it_in_generation() -> None:
    from gkd.config import HardwareConfig

    hw = HardwareConfig(gpus=8)
    teacher = ModelShape(params=7_000_000_000, layers=32, hidden=4096, layer_params=200_000_000)
    student = ModelShape(params=1_000_000_000, layers=16, hidden=2048, layer_params=60_000_000)
    kw: dict[str, Any] = {
        "hw": hw,
        "student": student,
        "student_trainable": student.params,
        "teachers": (teacher,),
        "stage": 2,
        "offload": "none",
        "tensor_parallel": 1,
        "micro_batch": 4,
        "grad_accum": 2,
        "seq": 1024,
        "recomputed_layers": 0,
        "global_batch": 64,
    }

    def generation(placement: str, teacher_generates: bool) -> float:
        work = Generation(
            student_share=0.0, teacher_placement=placement if teacher_generates else None, new=128
        )
        return step_cost(placement=placement, generation=work, **kw).parts["generation"]

    replicated, sharded = generation("replicated", True), generation("zero3", True)
    print(f"teacher generation per step: replicated {replicated:.3f} s, zero3 {sharded:.3f} s")
    assert sharded > 2 * replicated > 0  # 128 gathers of 14 GB against 128 reads of its weights
    assert generation("zero3", False) == 0.0  # on_policy with lambda 0: nothing sampled
    # The student's samples under ZeRO-3 gather its weights per token too.
    work = Generation(student_share=1.0, teacher_placement=None, new=128)
    z2 = step_cost(placement="replicated", generation=work, **kw).parts["generation"]
    z3 = step_cost(placement="replicated", generation=work, **{**kw, "stage": 3}).parts["generation"]
    assert z3 > z2 > 0


def test_the_generate_ops_bytes_are_what_sampling_allocates_on_the_cpu(tmp_path: Any) -> None:
    """The op's tensors against the storage a CPU sample of the accuracy suite's Llama student allocates
    (gkd.runtime.memory's accounting, the one `gkd run` measures with), within the suite's 5%."""
    import json

    import torch

    from gkd.models import build_model
    from gkd.planner.analysis import generation_allocs
    from gkd.planner.facts import model_facts
    from gkd.runtime.generation import sample, seeded
    from gkd.runtime.memory import _storage_tracker_class

    config = {
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
    }
    (tmp_path / "student.json").write_text(json.dumps(config))
    spec = resolve_model(str(tmp_path / "student.json"))
    rows, new = 4, 16
    facts = model_facts(spec, seq_len=SEQ)
    allocs = generation_allocs(facts, "g", micro_batch=rows, seq=SEQ, new=new, attention="sdpa")
    predicted = sum(a.bytes for a in allocs)
    torch.manual_seed(0)
    model = build_model(spec, device="cpu", dtype=torch.bfloat16).eval()
    prompts = [torch.randint(3, 500, (SEQ - new,)) for _ in range(rows)]
    tracker = _storage_tracker_class()()
    with tracker:  # counts only what sampling creates: the weights exist before
        sample(
            model,
            prompts,
            max_new_tokens=new,
            temperature=1.0,
            top_p=0.9,
            vocab=512,
            eos_id=None,
            pad_id=0,
            generator=seeded(0),
        )
    print(f"generate op {predicted} bytes, sampling allocated at most {tracker.peak} bytes")
    assert abs(predicted - tracker.peak) / tracker.peak <= 0.05
