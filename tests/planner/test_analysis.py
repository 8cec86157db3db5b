"""Analysis: graph liveness on a tiny hand-built graph, parameter facts against DeepSpeed's own counter, the
fused-linear chunk constant against the kernel's, and the workload's loss workspace per logit-loss path."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _planner_synth import facts, kd_minilm

from gkd.config import Config, HardwareConfig, Overrides, TrainingConfig
from gkd.planner.analysis import CHUNK_ELEMENTS, build_workload
from gkd.planner.plan import Strategy
from gkd.planner.probe import peak, workspace_polys
from gkd.planner.trace import TracedGraph, TracedNode


def node(name, target, shape, inputs=(), path="model.layers.0", op="call_function", dtype="bfloat16"):
    return TracedNode(
        name=name, op=op, target=target, shape=shape, dtype=dtype, module_path=path, inputs=tuple(inputs)
    )


def layer_workspace(g, layer=0):
    return peak(workspace_polys(g, layer), g.seq_len)


def graph(nodes):
    return TracedGraph(
        model="g",
        micro_batch=1,
        seq_len=4,
        attn_implementation="eager",
        traced_layers=1,
        total_layers=1,
        layer_container="model.layers",
        nodes=tuple(nodes),
    )


def test_liveness_table():
    # x (outside) -> a = mm(x) [8x4] -> v = view(a) -> b = relu(v) [8x4] -> c = add(b, a) [8x4] -> out
    nodes = [
        node("x", "", (8, 4), op="placeholder", path=""),
        node("a", "aten.mm.default", (8, 4), ["x"]),
        node("v", "aten.view.default", (32,), ["a"]),
        node("b", "aten.relu.default", (32,), ["v"]),
        node("c", "aten.add.Tensor", (8, 4), ["b", "a"]),
        node("out", "", None, ["c"], op="output", path=""),
    ]
    # a (64 B) lives until c; b (64 B) until c; c (64 B) is allocated while a and b are alive: 192 B.
    assert layer_workspace(graph(nodes)) == 192


def test_liveness_empty_and_other_layer():
    assert layer_workspace(graph([])) == 0
    nodes = [node("a", "aten.mm.default", (1024,), path="model.layers.1")]
    assert layer_workspace(graph(nodes), 0) == 0
    assert layer_workspace(graph(nodes), 1) == 2048


def test_chunk_matches_the_kernel():
    from gkd.kernels.fused_linear import CHUNK_ELEMENTS as kernel_chunk

    assert kernel_chunk == CHUNK_ELEMENTS


def test_parameter_facts_match_deepspeed_model_to_params():
    from deepspeed.runtime.zero.stage3 import model_to_params

    from gkd.models import build_model, resolve_model
    from gkd.planner.facts import parameter_facts

    for name in ("tiny-llama-teacher", "tiny-gpt2-student"):
        spec = resolve_model(name)
        ours = parameter_facts(spec)
        total, largest = model_to_params(build_model(spec, device="cpu"))
        assert ours["params"] == total
        assert ours["largest_module"] == largest


def _config(**ov):
    return Config(
        teachers=("t",),
        student="s",
        hardware=HardwareConfig(gpus=2, gpus_per_node=2, gpu_memory_bytes=10**9, cuda_context_bytes=0),
        training=TrainingConfig(seq_len=32, global_batch=4),
        overrides=Overrides(**ov),
    )


@pytest.mark.parametrize("path", ["logits", "fused_linear"])
def test_loss_workspace_per_path(path):
    student, teacher = facts("s", vocab=50_000), facts("t", vocab=50_000, hidden=128)
    s = Strategy(
        student_zero_stage=2, student_offload="none", teacher_placement="zero3", micro_batch=2, loss_path=path
    )
    w, _ = build_workload(
        config=_config(), student=student, teachers=(teacher,), resolved=kd_minilm(fused=True), strategy=s
    )
    tokens = 2 * 32
    if path == "logits":
        assert w.logit_loss_retained == tokens * 50_000 * 2  # dL/dlogits kept until backward
        assert dict((n, b) for n, b, _ in w.teachers[0].head_taps)["logits"] == tokens * 50_000 * 2
    else:
        assert w.logit_loss_retained == tokens * 64 * 2 + 50_000 * 64 * 2  # d hidden + d head weight
        # two chunk buffers and the teacher's gathered head weight (ZeRO-3 teacher)
        chunk_rows = min(tokens, CHUNK_ELEMENTS // 50_000)
        assert w.logit_loss_transient == 2 * chunk_rows * 50_000 * 4 + teacher.head_params * 2
        assert dict((n, b) for n, b, _ in w.teachers[0].head_taps)["logits"] == tokens * 128 * 2


def test_activity_scales_with_micro_batch():
    student, teacher = facts("s"), facts("t")
    out = []
    for mb in (1, 4):
        s = Strategy(student_zero_stage=3, student_offload="none", teacher_placement="zero3", micro_batch=mb)
        w, _ = build_workload(
            config=_config(), student=student, teachers=(teacher,), resolved=kd_minilm(), strategy=s
        )
        out.append(w)
    assert out[1].student.saved == 4 * out[0].student.saved
    assert out[1].teachers[0].forward_workspace == 4 * out[0].teachers[0].forward_workspace
    assert out[1].static == out[0].static  # resident bytes do not depend on the micro-batch


def test_extras_are_trained_like_student_parameters():
    student, teacher = facts("s"), facts("t")
    view = replace(kd_minilm(), extras=(("proj", 10_000),))
    s = Strategy(student_zero_stage=0, student_offload="none", teacher_placement="replicated")
    w, _ = build_workload(config=_config(), student=student, teachers=(teacher,), resolved=view, strategy=s)
    w0, _ = build_workload(
        config=_config(), student=student, teachers=(teacher,), resolved=kd_minilm(), strategy=s
    )
    opt = {a.name: a.bytes for a in w.static}["student.optimizer"]
    opt0 = {a.name: a.bytes for a in w0.static}["student.optimizer"]
    assert opt - opt0 == 12 * 10_000
