"""Packed documents do not attend to each other: for each family, a row holding two documents (position ids
restarting at the second, as gkd.runtime.data makes them) gives each document the logits of its own
unpacked forward, through `gkd.runtime.packing.packed_inputs`, with sdpa and eager attention (a family
without sdpa in transformers is skipped for it). Families kept apart by their position ids and families
given a 4D block mask (OPT, BioGPT, XGLM, MPT: position-blind mask builders; BLOOM: ALiBi, no position
ids) are both here, so a transformers release that changes how a family builds its mask fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gkd.runtime.packing import (
    POSITION_ID_FAMILIES,
    UNSEPARATED_FAMILIES,
    block_mask,
    packed_inputs,
    uses_block_mask,
)

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
    "biogpt": SHAPE,
    "xglm": {"d_model": 32, "num_layers": 2, "attention_heads": 4, "ffn_dim": 64},
    "mpt": {"d_model": 32, "n_layers": 2, "n_heads": 4},
    "qwen3_moe": {
        **{**SHAPE, "num_key_value_heads": 2, "head_dim": 8},
        **{"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    },
    "roberta": {**SHAPE, "pad_token_id": 1},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
    "deberta-v2": SHAPE,
    "modernbert": {**SHAPE, "pad_token_id": 0},
}
ENCODERS = {"bert", "roberta", "distilbert", "deberta-v2", "modernbert"}
# Not kept apart: DeBERTa takes no 4D mask and its mask ignores the position ids (UNSEPARATED_FAMILIES);
# ModernBERT's mask ignores them and its local layers keep the position-id path (a 4D mask would drop them).
LEAKS = {"deberta-v2", "modernbert"}
FIRST, SECOND = 9, 15  # two documents of odd lengths in one row of 24


def _model(family: str, attention: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family])
    auto = AutoModelForMaskedLM if family in ENCODERS else AutoModelForCausalLM
    torch.manual_seed(0)
    try:
        return auto.from_config(config, attn_implementation=attention).eval()
    except ValueError as err:  # "does not support an attention implementation through sdpa"
        pytest.skip(f"{family} has no {attention} attention in this transformers: {str(err)[:80]}")


def _max_error(family: str, attention: str, padding: int = 0) -> tuple[float, float]:
    """(largest |packed - alone| logit difference of the first document, of the second); with `padding`,
    the packed rows end in that many pad tokens (attention mask 0), which neither document may see."""
    model = _model(family, attention)
    ids = torch.randint(4, VOCAB, (2, FIRST + SECOND + padding), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(FIRST), torch.arange(SECOND + padding)]).expand(2, -1)
    real = torch.ones_like(ids)
    real[:, FIRST + SECOND :] = 0
    batch = {"input_ids": ids, "attention_mask": real, "position_ids": positions}
    with torch.no_grad():
        packed = model(**packed_inputs(model, batch)).logits
        first = model(input_ids=ids[:, :FIRST], use_cache=False).logits
        second = model(input_ids=ids[:, FIRST : FIRST + SECOND], use_cache=False).logits
    return (
        float((packed[:, :FIRST] - first).abs().max()),
        float((packed[:, FIRST : FIRST + SECOND] - second).abs().max()),
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_documents_see_only_themselves(family: str, attention: str) -> None:
    first, second = _max_error(family, attention)
    print(f"{family} {attention}: max |packed - alone| = {first:.2e}, {second:.2e}")
    if family in LEAKS:  # each document sees the other (an encoder's both ways): 4e-4 or more here
        assert max(first, second) > 1e-4
        return
    # A document that saw the other differs by 1e-3 or more (OPT's second document: 2e-1 through position
    # ids alone); the same computation differs by float rounding only.
    assert first < 1e-5 and second < 1e-5


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_a_block_mask_also_hides_padding(family: str) -> None:
    first, second = _max_error(family, "eager", padding=3)
    assert first < 1e-5 and second < 1e-5


def test_every_listed_family_is_checked_here() -> None:
    """The families kept on the position-id path by name, and those left unseparated, are all checked above;
    the block mask goes to every other family here (BLOOM, OPT, BioGPT, XGLM, MPT, RoBERTa, DistilBERT)."""
    assert set(FAMILIES) >= POSITION_ID_FAMILIES
    assert {"deberta-v2"} <= UNSEPARATED_FAMILIES <= {"deberta", "deberta-v2"}
    chosen = {f for f in FAMILIES if uses_block_mask(_model(f, "eager"))}
    assert chosen == {"bloom", "opt", "biogpt", "xglm", "mpt", "roberta", "distilbert"}


def test_block_mask_values() -> None:
    """Two documents (3 and 2 tokens) and a pad: causal within each document, nothing from the pad."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    real = torch.tensor([[1, 1, 1, 1, 1, 0]])
    mask = block_mask(positions, real, causal=True)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)
    both_ways = block_mask(positions, None, causal=False)[0, 0]
    assert both_ways[0, 2] and both_ways[3, 5] and not both_ways[0, 3]
    additive = block_mask(positions, real, causal=True, dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[0, 0] == 0, expected)
    assert float(additive[0, 0, 0, 1]) == torch.finfo(torch.bfloat16).min


def test_inputs_without_position_ids_are_unchanged() -> None:
    model = _model("llama", "sdpa")
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    assert packed_inputs(model, batch) is batch
    # A padded row keeps its attention mask: only an all-ones mask is dropped.
    padded = {**batch, "attention_mask": torch.tensor([[1, 1, 1, 0]]), "position_ids": torch.arange(4)[None]}
    assert "attention_mask" in packed_inputs(model, padded)
    # BLOOM takes no position ids: they are dropped, and its mask is the 4D block mask, additive under its
    # own (eager) attention; OPT under sdpa keeps its position ids and gets a bool block mask.
    bloom = packed_inputs(_model("bloom", "eager"), {**batch, "position_ids": torch.arange(4)[None]})
    assert set(bloom) == {"input_ids", "attention_mask", "use_cache"}
    assert bloom["attention_mask"].shape == (1, 1, 4, 4) and bloom["attention_mask"].dtype == torch.float32
    opt = packed_inputs(_model("opt", "sdpa"), {**batch, "position_ids": torch.arange(4)[None]})
    assert "position_ids" in opt and opt["attention_mask"].dtype == torch.bool


def test_gkd_run_notes_the_families_whose_documents_leak(tmp_path: Any) -> None:
    """`gkd run` says, before training, which of its models lets packed documents see each other: exactly
    the families the logits test above finds leaking (LEAKS), none of the others."""
    from transformers import AutoConfig

    from gkd.errors import InputError
    from gkd.runtime.checks import cross_document_notes

    def folder(family: str) -> str:
        path = tmp_path / family
        path.mkdir()
        AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family]).save_pretrained(path)
        return str(path)

    refs = {family: folder(family) for family in FAMILIES}
    noted = set()
    for family, ref in refs.items():
        try:
            notes = cross_document_notes({"student": ref, "teachers": [refs["llama"]]})
        except InputError:  # a family gkd refuses as it is configured here (Gemma 2's logit soft-capping)
            continue
        assert len(notes) <= 1 and all(n.startswith(f"student {ref} is a {family} model") for n in notes)
        noted |= {family} if notes else set()
    assert noted == LEAKS
    both = cross_document_notes({"student": refs["modernbert"], "teachers": [refs["deberta-v2"]]})
    print(*both, sep="\n")
    assert [n.split()[0] for n in both] == ["student", "teacher"]
