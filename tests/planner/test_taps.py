"""The tap catalogue against reality: per-layer saved-for-backward bytes equal a real CPU forward of
random-init models (storage accounting with saved_tensors_hooks), for every family and both attention paths;
taps have the contract's names, shapes and capture methods."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gkd.errors import InputError
from gkd.models import ModelSpec, build_model, spec_from_config
from gkd.planner.taps import ATTENTION_KINDS, CAPTURE_METHODS, build_catalogue

B, T = 2, 24

# Small configs of every family (the GLM entry is the GLM-130B mapping at small size).
FAMILY_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "llama": (
        {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "vocab_size": 128,
        },
        "bfloat16",
    ),
    "qwen2": (
        {
            "model_type": "qwen2",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 96,
            "vocab_size": 128,
        },
        "float32",
    ),
    "mistral": (
        {
            "model_type": "mistral",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "vocab_size": 128,
            "sliding_window": 64,
        },
        "bfloat16",
    ),
    "gpt2": (
        {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 48,
            "n_head": 4,
            "vocab_size": 128,
            "n_positions": 64,
            "bos_token_id": None,
            "eos_token_id": None,
        },
        "float32",
    ),
    "opt": (
        {
            "model_type": "opt",
            "num_hidden_layers": 2,
            "hidden_size": 48,
            "num_attention_heads": 4,
            "ffn_dim": 80,
            "vocab_size": 128,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 48,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
        },
        "bfloat16",
    ),
    "bloom": (
        {
            "model_type": "bloom",
            "n_layer": 2,
            "hidden_size": 64,
            "n_head": 4,
            "vocab_size": 128,
            "pad_token_id": 3,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "float32",
    ),
    "glm": (
        {
            "model_type": "glm",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 16,
            "intermediate_size": 96,
            "vocab_size": 128,
            "hidden_act": "gelu",
            "attention_bias": True,
            "tie_word_embeddings": True,
            "pad_token_id": None,
            "eos_token_id": None,
        },
        "bfloat16",
    ),
    "bert": (
        {
            "model_type": "bert",
            "num_hidden_layers": 2,
            "hidden_size": 48,
            "num_attention_heads": 4,
            "intermediate_size": 80,
            "vocab_size": 128,
            "max_position_embeddings": 64,
        },
        "float32",
    ),
}


def family_spec(family: str) -> ModelSpec:
    config, dtype = FAMILY_CONFIGS[family]
    return spec_from_config(dict(config), name=f"small-{family}", dtype=dtype, family=family)


def packed_row_inputs(model: torch.nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """What a run gives `model` for packed rows (gkd.runtime.data): two documents of unequal length per row,
    position ids from 0 in each, through gkd.runtime.packing.packed_inputs."""
    from gkd.runtime.packing import packed_inputs

    ids = torch.randint(0, spec.vocab, (B, T))
    positions = torch.cat([torch.arange(T // 3), torch.arange(T - T // 3)]).expand(B, T).contiguous()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
    inputs = packed_inputs(model, batch)
    return inputs if spec.is_encoder else {**inputs, "use_cache": False}


def measured_saved_bytes(spec: ModelSpec, layers: int, attention: str, checkpointing: bool) -> int:
    """Bytes of every storage autograd saves in a real CPU training forward (parameters excluded)."""
    torch.manual_seed(0)
    model = build_model(spec, device="cpu", num_layers=layers, attn_implementation=attention)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**packed_row_inputs(model, spec)).logits
    out.float().sum().backward()  # the saved tensors really were enough for a backward
    return sum(storages.values())


def measured_layer_bytes(spec: ModelSpec, attention: str, checkpointing: bool = False) -> int:
    """One layer's saved bytes: a two-layer model minus a one-layer model."""
    two = measured_saved_bytes(spec, 2, attention, checkpointing)
    one = measured_saved_bytes(spec, 1, attention, checkpointing)
    return two - one


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_layer_saved_bytes_match_real_cpu_run(family: str) -> None:
    spec = family_spec(family)
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    for attention in ("sdpa", "eager"):
        predicted = catalogue.layer_activations[0].saved(attention)
        measured = measured_layer_bytes(spec, attention)
        assert abs(predicted - measured) <= 0.02 * measured, (family, attention, predicted, measured)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_full_recompute_bytes_match_real_checkpointed_run(family: str) -> None:
    spec = family_spec(family)
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    predicted = catalogue.layer_activations[0].saved("sdpa", recompute=True)
    measured = measured_layer_bytes(spec, "sdpa", checkpointing=True)
    assert abs(predicted - measured) <= 0.02 * measured, (family, predicted, measured)
    # A checkpointed layer keeps its input hidden state only.
    assert predicted == catalogue.get("hidden[0]").nbytes


def test_eager_saves_the_attention_matrix_and_sdpa_does_not() -> None:
    spec = family_spec("llama")
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    layer = catalogue.layer_activations[0]
    # eager keeps the softmax output (B, heads, T, T) and more; the fused kernel keeps a (B, heads, T) fp32
    # LSE.
    assert layer.saved("eager") - layer.saved("sdpa") >= catalogue.get("probs[0]").nbytes


def expected_shape(spec: ModelSpec, kind: str) -> tuple[int, ...]:
    return {
        "emb": (B, T, spec.hidden),
        "hidden": (B, T, spec.hidden),
        "final": (B, T, spec.hidden),
        "context": (B, T, spec.hidden),
        "mlp_out": (B, T, spec.hidden),
        "q": (B, spec.heads, T, spec.head_dim),
        "k": (B, spec.kv_heads, T, spec.head_dim),
        "v": (B, spec.kv_heads, T, spec.head_dim),
        "scores": (B, spec.heads, T, T),
        "probs": (B, spec.heads, T, T),
        "logits": (B, T, spec.vocab),
    }[kind]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_catalogue_names_shapes_and_capture(family: str) -> None:
    spec = family_spec(family)
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    names = set(catalogue.names())
    expected = {"emb", "final", "logits"} | {f"hidden[{i}]" for i in range(spec.layers + 1)}
    kinds = ["context", "mlp_out", *ATTENTION_KINDS]
    expected |= {f"{kind}[{i}]" for kind in kinds for i in range(spec.layers)}
    assert names == expected
    for tap in catalogue.taps:
        assert tap.shape == expected_shape(spec, tap.kind), tap
        assert tap.capture in CAPTURE_METHODS
        assert tap.nbytes == tap.bytes_at(B, T) > 0
    assert catalogue.get("logits").capture == "lm_head_input"
    assert catalogue.get("hidden[0]").capture == "module_input"
    assert catalogue.get(f"hidden[{spec.layers}]").module_path.endswith(f".{spec.layers - 1}")
    # BLOOM computes attention in its own module: its attention taps come from hooks on that module.
    expected_capture = "attention_module" if family == "bloom" else "attention_fn"
    assert catalogue.get("q[1]").capture == expected_capture
    assert ".1." in catalogue.get("k[1]").module_path
    assert catalogue.unavailable == {}


def test_probs_are_in_the_activation_dtype() -> None:
    # Llama's softmax runs in float32 and is cast back: the tap is the tensor the attention uses next.
    catalogue = build_catalogue(family_spec("llama"), micro_batch=B, seq_len=T)
    assert catalogue.get("probs[0]").dtype == "bfloat16"
    assert catalogue.get("scores[0]").dtype == "bfloat16"


def test_taps_rescale_exactly() -> None:
    spec = family_spec("llama")
    small = build_catalogue(spec, micro_batch=B, seq_len=T)
    big = build_catalogue(spec, micro_batch=3, seq_len=40)
    for name in ("scores[0]", "q[1]", "k[0]", "hidden[2]", "logits"):
        assert small.get(name).bytes_at(3, 40) == big.get(name).nbytes


def test_unknown_tap_is_input_error() -> None:
    catalogue = build_catalogue(family_spec("gpt2"), micro_batch=B, seq_len=T)
    with pytest.raises(InputError, match="unknown tap"):
        catalogue.get("hidden[99]")
