"""Architectures no table names: tiny Qwen3, Gemma3, Phi-3, Mistral and Mixtral configs are mapped from the
built model (gkd.architecture), and the planner's saved-for-backward bytes match a real CPU forward/backward
as they do for the historical families (tests/planner/test_taps.py)."""

from __future__ import annotations

from typing import Any

import pytest
from test_taps import B, T, measured_layer_bytes

from gkd.architecture import ModelLayout
from gkd.errors import InputError
from gkd.models import build_model, count_parameters, spec_from_config
from gkd.planner.taps import build_catalogue

_BASE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 256,  # the built-in byte tokenizer's, so the run test can train them
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Tiny configs of architectures gkd has no entry for (the shapes of the real models, scaled down).
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3": {**_BASE, "model_type": "qwen3", "head_dim": 32},  # head_dim x heads != hidden, as in Qwen3
    "gemma3_text": {**_BASE, "model_type": "gemma3_text", "head_dim": 16, "sliding_window": 64},
    "phi3": {**_BASE, "model_type": "phi3"},
    "mistral": {**_BASE, "model_type": "mistral", "sliding_window": 64},
}
MIXTRAL = {**_BASE, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}


def tiny(model_type: str) -> Any:
    return spec_from_config(dict(CONFIGS[model_type]), name=f"tiny-{model_type}", dtype="float32")


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_layout_is_found_from_the_model(model_type: str) -> None:
    spec = tiny(model_type)
    layout = ModelLayout.from_dict(spec.layout)
    assert (layout.layers, layout.attention, layout.out_proj, layout.mlp) == (
        "model.layers",
        "self_attn",
        "self_attn.o_proj",
        "mlp",
    )
    assert (layout.embed, layout.final_norm, layout.head) == ("model.embed_tokens", "model.norm", "lm_head")
    assert layout.gated and layout.ffn == 96 and not layout.learned_positions and layout.moe is None
    assert not spec.is_encoder and spec.family == model_type
    # The paths name real modules of the model transformers builds.
    model = build_model(spec, device="meta")
    modules = dict(model.named_modules())
    for path in (layout.embed, layout.final_norm, layout.head, layout.layers):
        assert path in modules
    for inner in (layout.attention, layout.out_proj, layout.mlp):
        assert f"{layout.layers}.1.{inner}" in modules
    assert count_parameters(spec) == sum(p.numel() for p in model.parameters())


def test_mixture_of_experts_block_is_declared() -> None:
    spec = spec_from_config(dict(MIXTRAL), name="tiny-mixtral", dtype="float32")
    layout = ModelLayout.from_dict(spec.layout)
    assert layout.mlp == "mlp" and layout.moe is not None
    assert (layout.moe.block, layout.moe.experts, layout.moe.router) == ("mlp", "mlp.experts", "mlp.gate")
    assert spec.ffn == 96


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_layer_saved_bytes_match_real_cpu_run(model_type: str) -> None:
    spec = tiny(model_type)
    catalogue = build_catalogue(spec, micro_batch=B, seq_len=T)
    for attention in ("sdpa", "eager"):
        predicted = catalogue.layer_activations[0].saved(attention)
        measured = measured_layer_bytes(spec, attention)
        assert abs(predicted - measured) <= 0.02 * measured, (model_type, attention, predicted, measured)
    assert catalogue.get("probs[1]").shape == (B, spec.heads, T, T)
    assert catalogue.get("q[0]").shape == (B, spec.heads, T, spec.head_dim)
    assert catalogue.get("k[0]").shape == (B, spec.kv_heads, T, spec.head_dim)
    assert catalogue.get("context[0]").shape == (B, T, spec.heads * spec.head_dim)


def test_an_unmappable_architecture_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose blocks hold no attention module is refused, naming what is missing."""
    import gkd.architecture as architecture

    config = {**CONFIGS["mistral"], "hidden_size": 48}  # a config not mapped yet in this process
    original = architecture.map_layout

    def no_attention(model: Any, **kwargs: Any) -> Any:
        for block in model.model.layers:
            del block.self_attn
        return original(model, **kwargs)

    monkeypatch.setattr(architecture, "map_layout", no_attention)
    with pytest.raises(InputError) as info:
        spec_from_config(config, name="odd", dtype="float32")
    message = str(info.value)
    assert "no attention module" in message and "MistralDecoderLayer" in message and "\n" not in message


def test_tap_capture_finds_the_blocks_of_an_unlisted_layout() -> None:
    """Run-time tap capture falls back to the same structural search when the blocks sit where no list of
    paths looks (here one level down, under `backbone`)."""
    import torch

    from gkd.runtime.capture import transformer_layers

    model = build_model(tiny("qwen3"), device="meta")

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model.model

    assert transformer_layers(Wrapped()) is model.model.layers
