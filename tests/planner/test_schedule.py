"""The schedule and its replay, on tiny hand-written workloads with exact expected bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.planner.plan import Strategy, TensorAlloc
from gkd.planner.schedule import LossTerm, ModelActivity, Workload, build_schedule, simulate


def act(
    name, layers, *, saved=100, checkpoint=10, fws=5, bws=7, embed=3, hidden=4, layer_taps=None, head_taps=()
):
    return ModelActivity(
        name=name,
        layers=layers,
        saved=saved,
        checkpoint=checkpoint,
        forward_workspace=fws,
        backward_workspace=bws,
        embed_saved=embed,
        hidden_bytes=hidden,
        layer_taps=tuple(tuple(x) for x in (layer_taps or [[] for _ in range(layers)])),
        head_taps=tuple(head_taps),
    )


def strategy(**kw):
    base = dict(student_zero_stage=2, student_offload="none", teacher_placement="zero3")
    base.update(kw)
    return Strategy(**base)


def workload(student, teacher, terms=(), static=1000, **kw):
    return Workload(
        student=student,
        teachers=(teacher,),
        terms=tuple(terms),
        static=(TensorAlloc(name="p", bytes=static, category="parameters"),),
        logit_loss_retained=kw.get("retained", 0),
        logit_loss_transient=kw.get("transient", 0),
        logit_backward_transient=kw.get("backward", 0),
        offline_allocs=kw.get("offline", ()),
    )


def test_exact_peak_without_and_with_recompute():
    w = workload(act("student", 2), act("teacher0", 1, fws=20))
    tl = simulate(build_schedule(w, strategy()))
    # static 1000 + embed 3 + two layers' saved 200 + backward workspace 7
    assert (tl.peak_bytes, tl.peak_op) == (1210, "s.backward.1")
    assert tl.by_category["parameters"] == 1000 and tl.by_category["activations"] == 210
    tl = simulate(build_schedule(w, strategy(recompute_layers=(0,))))
    # layer 0 keeps its checkpoint (10): 1000 + 3 + 10 + 100 + 7
    assert (tl.peak_bytes, tl.peak_op) == (1120, "s.backward.1")
    tl = simulate(build_schedule(w, strategy(recompute_layers=(0, 1))))
    # backward of layer 1: 1000 + 3 + 10 + 10 + 90 (recomputed) + 7
    assert tl.peak_bytes == 1120


def test_teacher_forward_can_be_the_peak():
    w = workload(act("student", 1, saved=1), act("teacher0", 2, fws=500, hidden=40))
    tl = simulate(build_schedule(w, strategy()))
    assert tl.peak_bytes == 1000 + 40 + 500
    assert tl.peak_op == "t0.forward.0"


def test_empty_and_zero_byte_workload():
    zero = act("student", 0, saved=0, checkpoint=0, fws=0, bws=0, embed=0, hidden=0)
    w = workload(zero, act("teacher0", 0, saved=0, checkpoint=0, fws=0, bws=0, embed=0, hidden=0), static=0)
    tl = simulate(build_schedule(w, strategy()))
    assert tl.peak_bytes == 0
    assert sum(tl.by_category.values()) == 0


def _hidden_workload():
    # Teacher taps hidden[2] (after teacher layer 1) and hidden[4]; student taps hidden[1], hidden[2].
    teacher = act(
        "teacher0", 4, fws=1, layer_taps=[[], [("hidden[2]", 50, True)], [], [("hidden[4]", 50, True)]]
    )
    student = act("student", 2, layer_taps=[[("hidden[1]", 8, True)], [("hidden[2]", 8, True)]])
    terms = [
        LossTerm(name="h.l1", taps=("s:hidden[1]", "t0:hidden[2]"), logits=False),
        LossTerm(name="h.l2", taps=("s:hidden[2]", "t0:hidden[4]"), logits=False),
    ]
    return workload(student, teacher, terms)


def test_layerwise_frees_teacher_taps_early():
    w = _hidden_workload()
    layerwise = build_schedule(w, strategy(tap_loss="layerwise"))
    ops = {op.name: op for op in layerwise.ops}
    assert ops["loss.h.l1@0"].frees == ("t0:hidden[2]",)
    assert ops["loss.h.l1@0"].allocs[0].bytes == 8  # the gradient of the student tap is kept instead
    assert "grad:h.l1@0" in ops["s.backward.0"].frees
    end = build_schedule(w, strategy(tap_loss="end"))
    assert "t0:hidden[2]" in {op.name: op for op in end.ops}["s.backward.head"].frees
    lw, e = simulate(layerwise), simulate(end)
    # end: 1000 + embed 3 + saved 200 + workspace 5 + both teacher taps 100, during the last student layer
    assert (e.peak_bytes, e.peak_op) == (1308, "s.forward.1")
    # layerwise: the first teacher tap is already gone; 3 + 200 + 50 + two kept gradients of 8
    assert (lw.peak_bytes, lw.peak_op) == (1269, "loss.h.l2@1")


def test_every_allocation_is_freed_in_the_micro_step():
    sched = build_schedule(_hidden_workload(), strategy(tap_loss="end", recompute_layers=(1,)))
    live: set[str] = set()
    for op in sched.ops:
        live |= {a.name for a in op.allocs}
        live -= set(op.frees)
    assert live == set()


def test_offline_pass_is_replayed_without_training_static():
    offline = (
        TensorAlloc(name="off.params", bytes=5000, category="parameters"),
        TensorAlloc(name="off.ws", bytes=100, category="activations"),
    )
    w = workload(act("student", 1), act("teacher0", 1), offline=offline)
    sched = build_schedule(w, strategy(teacher_placement="offline", offline_teacher_placement="zero3"))
    tl = simulate(sched)
    assert (tl.peak_bytes, tl.peak_op) == (5100, "offline.teacher_pass")
    assert tl.by_category["parameters"] == 5000  # the training static is not resident during the pass


@settings(max_examples=100, deadline=None)
@given(
    layers=st.integers(1, 8),
    checkpoint=st.integers(0, 100),
    extra=st.integers(0, 1000),
    fws=st.integers(0, 500),
    bws=st.integers(0, 500),
    tap=st.integers(0, 200),
    teacher_tap=st.integers(0, 500),
    tap_loss=st.sampled_from(["layerwise", "end"]),
    data=st.data(),
)
def test_recomputing_more_layers_never_raises_the_peak(
    layers, checkpoint, extra, fws, bws, tap, teacher_tap, tap_loss, data
):
    saved = checkpoint + extra
    layer_taps = [[] for _ in range(layers)]
    layer_taps[-1] = [(f"q[{layers - 1}]", tap, True), (f"mlp_out[{layers - 1}]", tap, False)]
    student = act(
        "student", layers, saved=saved, checkpoint=checkpoint, fws=fws, bws=bws, layer_taps=layer_taps
    )
    teacher = act("teacher0", 2, fws=fws, layer_taps=[[], [("q[1]", teacher_tap, True)]])
    terms = [
        LossTerm(
            name="m.r", taps=(f"s:q[{layers - 1}]", "t0:q[1]", f"s:mlp_out[{layers - 1}]"), logits=False
        ),
        LossTerm(name="kd.soft", taps=("s:logits", "t0:logits"), logits=True),
    ]
    w = workload(
        student,
        teacher,
        terms,
        retained=data.draw(st.integers(0, 300)),
        transient=data.draw(st.integers(0, 300)),
        backward=data.draw(st.integers(0, 300)),
    )
    small = data.draw(st.sets(st.integers(0, layers - 1)))
    more = small | data.draw(st.sets(st.integers(0, layers - 1)))
    a = simulate(build_schedule(w, strategy(tap_loss=tap_loss, recompute_layers=tuple(sorted(small)))))
    b = simulate(build_schedule(w, strategy(tap_loss=tap_loss, recompute_layers=tuple(sorted(more)))))
    assert b.peak_bytes <= a.peak_bytes
    assert sum(b.by_category.values()) == b.peak_bytes


@pytest.mark.parametrize("tap_loss", ["layerwise", "end"])
def test_breakdown_sums_to_peak(tap_loss):
    tl = simulate(build_schedule(_hidden_workload(), strategy(tap_loss=tap_loss)))
    assert sum(tl.by_category.values()) == tl.peak_bytes
