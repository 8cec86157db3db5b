"""Search on synthetic model facts (no torch): the choice fits the budget, overrides pin choices, recompute is
partial, runners-up carry reasons; and the full pipeline's emit step on the same inputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _planner_synth import facts, hidden_uniform, kd_minilm, kd_only
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.config import Config, DeepSpeedSettings, HardwareConfig, Overrides, TrainingConfig
from gkd.errors import InputError
from gkd.planner.pipeline import emit
from gkd.planner.plan import Plan
from gkd.planner.search import candidates, search

SMALL_DS = DeepSpeedSettings(
    reduce_bucket_size=1000,
    allgather_bucket_size=1000,
    stage3_prefetch_bucket_size=1000,
    stage3_max_live_parameters=100_000,
)


def config(*, gpus=4, memory=3_000_000, host=10**9, seq=32, batch=8, overrides=None, micro=()):
    return Config(
        teachers=("t",),
        student="s",
        hardware=HardwareConfig(
            gpus=gpus,
            gpus_per_node=gpus,
            gpu_memory_bytes=memory,
            host_memory_bytes=host,
            cuda_context_bytes=0,
            fragmentation=0.0,
        ),
        training=TrainingConfig(seq_len=seq, global_batch=batch, micro_batch=micro),
        deepspeed=SMALL_DS,
        overrides=overrides or Overrides(),
    )


TEACHER = facts("t", layers=4, hidden=128, saved=40_000, checkpoint=8_192, workspace=20_000)
STUDENT = facts("s", layers=2, hidden=64, saved=30_000, checkpoint=4_096, workspace=8_000)


def test_fits_and_breakdown_sums():
    r = search(config(), STUDENT, (TEACHER,), kd_minilm())
    assert r.best.fits
    assert r.best.peak_bytes <= 3_000_000
    assert sum(r.best.timeline.by_category.values()) == r.best.peak_bytes
    assert r.runners_up and all(reason for _, reason in r.runners_up)


def test_replicated_teacher_too_big_picks_a_sharded_one():
    big = replace(TEACHER, params=2_000_000)  # 4 MB of bf16 weights > 3 MB per GPU
    r = search(config(), STUDENT, (big,), kd_minilm())
    assert r.best.fits
    assert r.best.strategy.teacher_placement in ("zero3", "zero3_offload", "tensor_parallel")
    lost = {e.strategy.teacher_placement: reason for e, reason in r.runners_up}
    assert "replicated" in lost and "budget" in lost["replicated"]


def test_host_memory_decides_whether_offload_is_possible():
    # One GPU, a teacher of 10 MB bf16 weights, 4 MB per GPU: only streaming the teacher from the host fits.
    big = replace(TEACHER, params=5_000_000)
    roomy = search(config(gpus=1, memory=4_000_000), STUDENT, (big,), kd_minilm())
    assert roomy.best.fits and roomy.best.strategy.teacher_placement == "zero3_offload"
    assert roomy.best.host_bytes >= 10_000_000
    tight = search(config(gpus=1, memory=4_000_000, host=1_000_000), STUDENT, (big,), kd_minilm())
    assert not tight.best.fits
    assert any("host memory" in reason for _, reason in tight.runners_up) or "host memory" in tight.best.why


def test_tight_budget_recomputes_some_layers_not_all():
    loose = search(config(memory=10**9), STUDENT, (TEACHER,), kd_minilm())
    assert loose.best.strategy.recompute_layers == ()
    student = replace(STUDENT, layers=8, saved={"sdpa": 200_000, "eager": 400_000}, checkpoint=2_000)
    r0 = search(
        config(
            memory=10**9, overrides=Overrides(student_zero_stage=3, teacher_placement="zero3", micro_batch=2)
        ),
        student,
        (TEACHER,),
        kd_minilm(),
    )
    peak = r0.best.peak_bytes
    r = search(
        config(
            memory=peak - 500_000,
            overrides=Overrides(student_zero_stage=3, teacher_placement="zero3", micro_batch=2),
        ),
        student,
        (TEACHER,),
        kd_minilm(),
    )
    assert r.best.fits
    assert 0 < len(r.best.strategy.recompute_layers) < 8


def test_overrides_pin_choices():
    ov = Overrides(
        student_zero_stage=1,
        student_offload="optimizer",
        teacher_placement="zero3",
        micro_batch=1,
        tap_loss="end",
        recompute_layers=(1,),
    )
    r = search(config(memory=10**9, overrides=ov), STUDENT, (TEACHER,), kd_minilm())
    s = r.best.strategy
    assert (
        s.student_zero_stage,
        s.student_offload,
        s.teacher_placement,
        s.micro_batch,
        s.tap_loss,
        s.recompute_layers,
    ) == (1, "optimizer", "zero3", 1, "end", (1,))


def test_offline_teacher_when_only_logits_are_read():
    cfg = config(memory=10**9, overrides=Overrides(teacher_placement="offline"))
    r = search(cfg, STUDENT, (TEACHER,), kd_only())
    s = r.best.strategy
    assert s.teacher_placement == "offline" and s.loss_path == "topk"
    assert s.offline_teacher_placement in ("zero3", "zero3_offload")
    tr = cfg.training
    assert r.best.disk_bytes == tr.steps * tr.global_batch * tr.seq_len * (tr.offline_topk * 6 + 4)
    assert any(op.kind == "offline_teacher_pass" for op in r.best.schedule.ops)
    assert not any(
        c.teacher_placement == "offline" for c in candidates(config(), STUDENT, (TEACHER,), kd_minilm())
    )


def test_layerwise_tap_losses_lower_the_peak_of_many_taps():
    teacher = replace(TEACHER, tap_bytes={**TEACHER.tap_bytes, "hidden": 400_000})
    ov = dict(student_zero_stage=3, teacher_placement="zero3", micro_batch=1, recompute_layers=())
    lw = search(
        config(memory=10**9, overrides=Overrides(tap_loss="layerwise", **ov)),
        STUDENT,
        (teacher,),
        hidden_uniform(),
    )
    end = search(
        config(memory=10**9, overrides=Overrides(tap_loss="end", **ov)), STUDENT, (teacher,), hidden_uniform()
    )
    assert lw.best.peak_bytes < end.best.peak_bytes


@settings(max_examples=30, deadline=None)
@given(
    memory=st.integers(200_000, 20_000_000),
    gpus=st.sampled_from([1, 2, 4, 8]),
    teacher_params=st.integers(10_000, 10_000_000),
    student_layers=st.integers(1, 6),
    methods=st.sampled_from(["kd_minilm", "kd_only", "hidden"]),
    host=st.sampled_from([0, 10**6, 10**9]),
)
def test_no_chosen_plan_exceeds_the_budget(memory, gpus, teacher_params, student_layers, methods, host):
    view = {
        "kd_minilm": kd_minilm(4, student_layers),
        "kd_only": kd_only(),
        "hidden": hidden_uniform(4, student_layers),
    }[methods]
    cfg = config(gpus=gpus, memory=memory, host=host)
    student = replace(STUDENT, layers=student_layers)
    r = search(cfg, student, (replace(TEACHER, params=teacher_params),), view)
    if r.best.fits:
        assert r.best.peak_bytes <= memory
        assert r.best.host_bytes <= host
    for e, _ in r.runners_up:
        if e.fits:
            assert e.peak_bytes <= memory


def test_emit_makes_a_round_trippable_plan():
    cfg = config()
    r = search(cfg, STUDENT, (TEACHER,), kd_minilm())
    plan = emit(cfg, (TEACHER,), STUDENT, kd_minilm(), r, ())
    assert plan.fits and plan.peak_bytes == sum(plan.memory.values())
    assert Plan.from_json(plan.to_json()) == plan
    ds = plan.deepspeed["student"]
    assert (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * cfg.hardware.gpus
        == cfg.training.global_batch
    )
    assert ds["zero_optimization"]["stage"] == plan.strategy.student_zero_stage


@pytest.mark.parametrize("micro", [(3,), (16,)])
def test_micro_batch_that_does_not_divide_is_an_input_error(micro):
    from gkd.errors import InputError

    with pytest.raises(InputError):
        search(config(micro=micro), STUDENT, (TEACHER,), kd_minilm())


def test_two_teachers_each_run_and_free_their_taps():
    from gkd.planner.pipeline import MethodsView, TermView
    from gkd.planner.schedule import simulate

    view = MethodsView(
        teacher_taps=(frozenset({"logits"}), frozenset({"logits"})),
        student_taps=frozenset({"logits"}),
        loss_terms=(
            TermView(
                method="tmkd",
                name="soft",
                kernel="kd_loss",
                weight=1.0,
                taps=("s:logits", "t0:logits", "t1:logits"),
                hard=False,
            ),
        ),
        extras=(),
        fused_linear=False,
        offline_ok=False,
        needs_teacher_forward=True,
        eager_attention=False,
    )
    second = replace(TEACHER, name="t2", layers=3)
    r = search(config(memory=10**9), STUDENT, (TEACHER, second), view)
    ops = r.best.schedule.ops
    assert sum(op.kind == "teacher_forward" and op.model == "teacher1" for op in ops) == 3 + 2
    loss = next(op for op in ops if op.kind == "logit_loss")
    assert set(loss.frees) >= {"t0:logits", "t1:logits"}
    single = search(
        config(
            memory=10**9,
            overrides=Overrides(
                **{
                    k: getattr(r.best.strategy, k)
                    for k in ("student_zero_stage", "student_offload", "teacher_placement", "micro_batch")
                }
            ),
        ),
        STUDENT,
        (TEACHER,),
        kd_only(),
    )
    assert simulate(r.best.schedule).peak_bytes >= simulate(single.best.schedule).peak_bytes


def test_hook_ops_keep_tap_losses_at_the_end():
    # Their extra forwards (LRC-BERT, DIITO, Theseus) read taps at the end of the step, which the runtime
    # cannot do once a layerwise term has consumed them.
    methods = replace(hidden_uniform(), hook_ops=("lrc_gradient_perturbation",))
    places = {s.tap_loss for s in candidates(config(memory=10**9), STUDENT, (TEACHER,), methods)}
    assert places == {"end"}
    assert {s.tap_loss for s in candidates(config(memory=10**9), STUDENT, (TEACHER,), hidden_uniform())} == {
        "end",
        "layerwise",
    }
    with pytest.raises(InputError, match="lrc_gradient_perturbation"):
        pinned = config(memory=10**9, overrides=Overrides(tap_loss="layerwise"))
        candidates(pinned, STUDENT, (TEACHER,), methods)


def test_a_pinned_loss_path_rules_out_the_offline_teacher():
    """The offline teacher's loss path is the stored top-k: pinning logits keeps a live teacher (the search
    chose offline for these methods without the pin)."""
    cfg = config(memory=10**9, overrides=Overrides(loss_path="logits"))
    cands = candidates(cfg, STUDENT, (TEACHER,), kd_only())
    assert cands and all(c.teacher_placement != "offline" and c.loss_path == "logits" for c in cands)
    assert any(c.teacher_placement == "offline" for c in candidates(config(), STUDENT, (TEACHER,), kd_only()))


def test_contradictory_loss_pins_name_the_reason():
    only_stored = replace(kd_only(), needs_teacher_forward=False)  # e.g. topk_kl alone
    with pytest.raises(InputError, match="loss_path logits needs a live teacher"):
        candidates(config(overrides=Overrides(loss_path="logits")), STUDENT, (TEACHER,), only_stored)
    with pytest.raises(InputError, match=r"not every logit term \(kd.soft\) can take the final hidden state"):
        candidates(config(overrides=Overrides(loss_path="fused_linear")), STUDENT, (TEACHER,), kd_only())
    with pytest.raises(InputError, match="these methods read the teacher's intermediate tensors"):
        candidates(config(overrides=Overrides(teacher_placement="offline")), STUDENT, (TEACHER,), kd_minilm())
    no_topk = replace(kd_only(), offline_ok=False)  # e.g. jsd: logits only, but not computable from a top-k
    with pytest.raises(InputError, match="not every loss here can be computed from a top-k"):
        candidates(config(overrides=Overrides(teacher_placement="offline")), STUDENT, (TEACHER,), no_topk)


def test_a_micro_batch_that_does_not_divide_names_the_sizes_that_do():
    with pytest.raises(
        InputError, match=r"training.micro_batch 3 does not divide the per-GPU batch 2 .* 1, 2$"
    ):
        search(config(micro=(3,)), STUDENT, (TEACHER,), kd_only())
    with pytest.raises(InputError, match=r"overrides.micro_batch 3 does not divide the per-GPU batch 2"):
        search(config(overrides=Overrides(micro_batch=3)), STUDENT, (TEACHER,), kd_only())
