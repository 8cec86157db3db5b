"""Mixture-of-experts models in the planner: a layer's saved-for-backward bytes equal a real CPU training
forward, parameters are counted in total (memory) and active (compute), the router logits are taps whose
module path captures what transformers reports as `router_logits`, FLOPs count the routed experts while
transfers count every expert, and the plan report shows both counts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_taps import measured_layer_bytes

from gkd.config import Config
from gkd.errors import InputError
from gkd.models import ModelSpec, build_model, spec_from_config
from gkd.planner.cost import ModelShape, forward_flops, step_cost
from gkd.planner.facts import compute_facts
from gkd.planner.moe import check_uniform_layers
from gkd.planner.taps import build_catalogue

B, T = 2, 24
LAYERS, HIDDEN, FFN, EXPERTS, TOP_K = 2, 64, 96, 4, 2
MIXTRAL: dict[str, Any] = {
    "model_type": "mixtral",
    "num_hidden_layers": LAYERS,
    "hidden_size": HIDDEN,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": FFN,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "vocab_size": 128,
    "tie_word_embeddings": False,
}


EXPERT_FFN = 48
# Qwen2-MoE: experts of their own width (moe_intermediate_size) and a shared expert that every token runs
# through, with a gate of its own: always active, so not among the routed experts.
QWEN2_MOE: dict[str, Any] = {
    **{k: v for k, v in MIXTRAL.items() if k != "num_local_experts"},
    "model_type": "qwen2_moe",
    "num_experts": EXPERTS,
    "moe_intermediate_size": EXPERT_FFN,
    "shared_expert_intermediate_size": 80,
}
MOE_CONFIGS = {"mixtral": (MIXTRAL, FFN), "qwen2_moe": (QWEN2_MOE, EXPERT_FFN)}


def moe_spec(dtype: str = "float32", layers: int = LAYERS, family: str = "mixtral") -> ModelSpec:
    config = MOE_CONFIGS[family][0]
    return spec_from_config({**config, "num_hidden_layers": layers}, name=f"small-{family}", dtype=dtype)


@pytest.mark.parametrize(
    ("family", "dtype"), [("mixtral", "float32"), ("mixtral", "bfloat16"), ("qwen2_moe", "float32")]
)
def test_layer_saved_bytes_match_real_cpu_run(family: str, dtype: str) -> None:
    spec = moe_spec(dtype, family=family)
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    for attention in ("sdpa", "eager"):
        predicted = catalogue.layer_activations[0].saved(attention)
        measured = measured_layer_bytes(spec, attention)
        assert abs(predicted - measured) <= 0.02 * measured, (dtype, attention, predicted, measured)


def test_full_recompute_bytes_match_real_checkpointed_run() -> None:
    spec = moe_spec()
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    predicted = catalogue.layer_activations[0].saved("sdpa", recompute=True)
    measured = measured_layer_bytes(spec, "sdpa", checkpointing=True)
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


@pytest.mark.parametrize(("family", "layers"), [("mixtral", 1), ("mixtral", 3), ("qwen2_moe", 3)])
def test_total_and_active_parameters(family: str, layers: int) -> None:
    spec = moe_spec(layers=layers, family=family)
    facts = compute_facts(spec, seq_len=T)
    whole = sum(p.numel() for p in build_model(spec, device="meta").parameters())
    # Each expert is a SwiGLU MLP: gate and up (hidden -> ffn) and down (ffn -> hidden), no biases.
    per_expert = 3 * HIDDEN * MOE_CONFIGS[family][1]
    assert facts.params == whole
    assert (facts.experts, facts.experts_per_token) == (EXPERTS, TOP_K)
    assert facts.expert_params == layers * EXPERTS * per_expert
    assert facts.active_params == whole - layers * (EXPERTS - TOP_K) * per_expert
    assert facts.active_layer_params == facts.layer_params - (EXPERTS - TOP_K) * per_expert


def test_dense_models_are_all_active() -> None:
    spec = spec_from_config(
        {k: v for k, v in MIXTRAL.items() if "expert" not in k} | {"model_type": "mistral"}, name="dense"
    )
    facts = compute_facts(spec, seq_len=T)
    assert (facts.experts, facts.expert_params) == (0, 0)
    assert facts.active_params == facts.params and facts.active_layer_params == facts.layer_params


def test_router_logits_taps_capture_what_transformers_reports() -> None:
    spec = moe_spec()
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    routers = [t for t in catalogue.taps if t.kind == "router_logits"]
    assert [t.name for t in routers] == [f"router_logits[{i}]" for i in range(LAYERS)]
    for i, tap in enumerate(routers):
        assert tap.capture == "module_output" and tap.module_path == f"model.layers.{i}.mlp.gate"
        assert tap.shape == (B, T, EXPERTS) and tap.tokens_flattened
        assert tap.nbytes == B * T * EXPERTS * 4 == tap.bytes_at(B, T)
    assert routers[0].bytes_at(3, 40) == 3 * 40 * EXPERTS * 4

    # A forward hook on each tap's module (first element of its output) sees transformers' router_logits.
    torch.manual_seed(0)
    model = build_model(spec, device="cpu")
    seen: dict[str, torch.Tensor] = {}
    for tap in routers:
        module = model.get_submodule(tap.module_path)
        module.register_forward_hook(lambda _m, _a, out, name=tap.name: seen.__setitem__(name, out[0]))
    out = model(input_ids=torch.randint(0, spec.vocab, (B, T)), output_router_logits=True, use_cache=False)
    for i, tap in enumerate(routers):
        assert torch.equal(seen[tap.name].view(tap.shape), out.router_logits[i].view(tap.shape))


def test_router_taps_of_a_dense_model_are_input_errors() -> None:
    spec = spec_from_config(
        {k: v for k, v in MIXTRAL.items() if "expert" not in k} | {"model_type": "mistral"}, name="dense"
    )
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    assert not any(t.kind == "router_logits" for t in catalogue.taps)
    with pytest.raises(InputError, match="dense model"):
        catalogue.get("router_logits[0]")


def test_flops_count_routed_experts_and_transfers_count_all() -> None:
    total, active = 140_000_000_000, 39_000_000_000
    dense = ModelShape(params=total, layers=56, hidden=6144, layer_params=total // 56)
    moe = ModelShape(
        params=total,
        layers=56,
        hidden=6144,
        layer_params=total // 56,
        active_params=active,
        active_layer_params=active // 56,
    )
    attention = 4.0 * 2 * 512 * 512 * 6144 * 56
    assert forward_flops(moe, 2, 512) == 2.0 * active * 2 * 512 + attention
    assert forward_flops(dense, 2, 512) == 2.0 * total * 2 * 512 + attention
    hw = Config.from_dict(
        {"teacher": "tiny-llama-teacher", "student": "tiny-llama-student", "methods": ["kd"]}
    ).hardware
    student = ModelShape(params=7_000_000_000, layers=32, hidden=4096, layer_params=200_000_000)

    def parts(teacher: ModelShape) -> dict[str, float]:
        return step_cost(
            hw=hw,
            student=student,
            student_trainable=student.params,
            teachers=(teacher,),
            stage=3,
            offload="none",
            placement="zero3_offload",
            tensor_parallel=1,
            micro_batch=2,
            grad_accum=4,
            seq=512,
            recomputed_layers=0,
            global_batch=64,
        ).parts

    moe_parts, dense_parts = parts(moe), parts(dense)
    # Streaming an offloaded teacher moves every expert; computing runs the routed ones only.
    assert moe_parts["teacher_transfer"] == dense_parts["teacher_transfer"] > 0
    assert moe_parts["teacher_compute"] < dense_parts["teacher_compute"]


@pytest.mark.parametrize(
    ("key", "value"), [("mlp_only_layers", [0]), ("decoder_sparse_step", 2), ("first_k_dense_replace", 1)]
)
def test_moe_layers_that_differ_are_refused(key: str, value: Any) -> None:
    with pytest.raises(InputError, match=key):
        check_uniform_layers(SimpleNamespace(name="m", hf_config={key: value}))
    check_uniform_layers(SimpleNamespace(name="m", hf_config={}))


def test_inspect_reports_experts_and_active_parameters() -> None:
    from gkd.planner.inspect import inspect_data

    spec = moe_spec()
    data = inspect_data(spec, seq_len=T, micro_batch=1)
    facts = compute_facts(spec, seq_len=T)
    assert data["experts"] == {
        "per_layer": EXPERTS,
        "per_token": TOP_K,
        "expert_parameters": facts.expert_params,
        "active_parameters": facts.active_params,
    }
    assert any(t["kind"] == "router_logits" for t in data["taps"])
    dense = spec_from_config(
        {k: v for k, v in MIXTRAL.items() if "expert" not in k} | {"model_type": "mistral"}, name="d"
    )
    assert "experts" not in inspect_data(dense, seq_len=T, micro_batch=1)


@pytest.fixture(scope="module")
def pair_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny MoE teacher (4 layers, hidden 64) and student (2 layers, hidden 32), 4 experts each, with kd and
    router_kl on 2 GPUs at micro-batch 2 and sequence 64."""
    import json

    root = tmp_path_factory.mktemp("moe")
    paths = []
    for name, layers, hidden in (("teacher", 4, 64), ("student", 2, 32)):
        config = {**MIXTRAL, "num_hidden_layers": layers, "hidden_size": hidden, "vocab_size": 256}
        paths.append(root / f"{name}.json")
        paths[-1].write_text(json.dumps(config | {"max_position_embeddings": 512}))
    return {
        "teacher": str(paths[0]),
        "student": str(paths[1]),
        "methods": ["kd", "router_kl"],
        "hardware": {"gpus": 2},
        "training": {"seq_len": 64, "global_batch": 4, "micro_batch": [2]},
    }


def test_plan_shows_total_and_active_parameters_and_counts_router_taps(pair_config: dict[str, Any]) -> None:
    from gkd.models import resolve_model
    from gkd.planner.facts import model_facts
    from gkd.planner.pipeline import plan
    from gkd.planner.report import render

    result = plan(Config.from_dict(pair_config))
    models = result.inputs["models"]
    first = render(result).splitlines()[0]
    for summary, path in (
        (models["teachers"][0], pair_config["teacher"]),
        (models["student"], pair_config["student"]),
    ):
        facts = model_facts(resolve_model(path), seq_len=64)  # the facts the plan used (cached)
        assert (summary["params"], summary["active_params"]) == (facts.params, facts.active_params)
        assert (summary["experts"], summary["experts_per_token"]) == (EXPERTS, TOP_K)
    teacher = models["teachers"][0]
    assert f"{teacher['params'] / 1e3:.1f}K total, {teacher['active_params'] / 1e3:.1f}K active" in first
    assert first.count("2 of 4 experts per token") == 2
    routers = {(t.model, t.tap): t.bytes for t in result.strategy.taps if t.method == "router_kl"}
    # Student depths 1, 2 map to teacher depths 2, 4 (uniform); bfloat16 logits (the configs name no dtype),
    # 4 experts, 2 x 64 tokens.
    expected = ("student", "router_logits[0]"), ("student", "router_logits[1]")
    expected += ("teacher0", "router_logits[1]"), ("teacher0", "router_logits[3]")
    assert routers == dict.fromkeys(expected, 2 * 64 * EXPERTS * 2)
    assert all(a.strategy.teacher_placement != "tensor_parallel" for a in result.alternatives)


def test_a_moe_teacher_is_never_tensor_parallel(pair_config: dict[str, Any]) -> None:
    from gkd.planner.pipeline import plan

    pinned = {**pair_config, "overrides": {"teacher_placement": "tensor_parallel"}}
    with pytest.raises(InputError, match="mixture-of-experts teacher cannot be tensor parallel"):
        plan(Config.from_dict(pinned))
