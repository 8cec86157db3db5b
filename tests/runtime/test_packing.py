"""Packed documents do not attend to each other: for each family, a row holding two documents (position ids
restarting at the second, as gkd.runtime.data makes them) gives each document the logits of its own
unpacked forward, through `gkd.runtime.step.packed_inputs`, with sdpa and eager attention.

The families whose attention cannot be kept apart this way in the installed transformers are listed in
LEAKS, and the test checks that they really do leak: a release that changes either side fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gkd.runtime.step import packed_inputs

VOCAB = 128
SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {**SHAPE, "num_key_value_heads": 2},
    "qwen2": {**SHAPE, "num_key_value_heads": 2},
    "qwen3": {**SHAPE, "num_key_value_heads": 2, "head_dim": 8},
    "mistral": {**SHAPE, "num_key_value_heads": 2},
    "mixtral": {**SHAPE, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {**SHAPE, "num_key_value_heads": 2, "head_dim": 8},
    "phi3": {**SHAPE, "num_key_value_heads": 2, "pad_token_id": 0},
    "glm": {**SHAPE, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4},
    "bert": SHAPE,
    "opt": {**SHAPE, "ffn_dim": 64, "word_embed_proj_dim": 32},
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4},
}
# Families whose documents still attend to each other: OPT builds its causal mask without the position ids,
# BLOOM's forward takes none (ALiBi).
LEAKS = {"opt", "bloom"}
FIRST, SECOND = 9, 15  # two documents of odd lengths in one row of 24


def _model(family: str, attention: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family])
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    torch.manual_seed(0)
    try:
        return auto.from_config(config, attn_implementation=attention).eval()
    except ValueError as err:  # "does not support an attention implementation through sdpa"
        pytest.skip(f"{family} has no {attention} attention in this transformers: {str(err)[:80]}")


def _max_error(family: str, attention: str) -> tuple[float, float]:
    """(largest |packed - alone| logit difference of the first document, of the second)."""
    model = _model(family, attention)
    ids = torch.randint(4, VOCAB, (2, FIRST + SECOND), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(FIRST), torch.arange(SECOND)]).expand(2, -1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
    with torch.no_grad():
        packed = model(**packed_inputs(model, batch)).logits
        first = model(input_ids=ids[:, :FIRST], use_cache=False).logits
        second = model(input_ids=ids[:, FIRST:], use_cache=False).logits
    return (
        float((packed[:, :FIRST] - first).abs().max()),
        float((packed[:, FIRST:] - second).abs().max()),
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_documents_see_only_themselves(family: str, attention: str) -> None:
    first, second = _max_error(family, attention)
    print(f"{family} {attention}: max |packed - alone| = {first:.2e}, {second:.2e}")
    if family in LEAKS:
        # The second document sees the first: its logits differ from its own forward.
        assert second > 1e-3
    else:
        assert first < 1e-5 and second < 1e-5


def test_inputs_without_position_ids_are_unchanged() -> None:
    model = _model("llama", "sdpa")
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    assert packed_inputs(model, batch) is batch
    # A padded row keeps its attention mask: only an all-ones mask is dropped.
    padded = {**batch, "attention_mask": torch.tensor([[1, 1, 1, 0]]), "position_ids": torch.arange(4)[None]}
    assert "attention_mask" in packed_inputs(model, padded)
    # BLOOM takes no position ids: they are dropped, the mask kept.
    bloom = packed_inputs(_model("bloom", "eager"), {**batch, "position_ids": torch.arange(4)[None]})
    assert set(bloom) == {"input_ids", "attention_mask"}
