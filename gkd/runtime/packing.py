"""Packed rows as each model must take them, so that packed documents never attend to each other:
`packed_inputs(model, inputs) -> inputs`.

gkd packs documents into full rows (gkd.runtime.data) and marks each document by its position ids, which count
from 0 at its start. How a model is kept from attending across documents depends on how its family builds its
attention mask in transformers:

- The families whose transformers code passes the position ids to its mask builders (POSITION_ID_FAMILIES:
  Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, BERT, ...; each checked by the tests) have the documents found
  in them (`masking_utils.find_packed_sequence_indices`) and kept apart, with sliding windows and the like
  as the family has them. Such a model gets the position ids, no attention mask while that mask is all True
  (packed rows are full: a 2D mask would hide the documents) and no key/value cache. So does a family
  outside that list whose attention is windowed (a sliding window, chunks, local layers): a 4D mask would
  replace the window masks transformers builds for it.
- Every other model gets a block mask: those whose mask ignores the position ids (OPT, BioGPT, XGLM, MPT,
  DistilBERT, DeBERTa-v2, RoBERTa, ...), those whose forward takes none (BLOOM: ALiBi), and any family the
  tests have not seen. It is a 4D attention mask (B, 1, T, T), True where query and key are in the same
  document, the key is a real token and, for a causal model, not after the query (a masked-LM encoder:
  both ways within the document). transformers hands a 4D mask to the attention unchanged. Its dtype is
  what transformers' own mask builders give each attention implementation: bool (True = may attend) for
  sdpa, the model's float dtype with 0 where allowed and the dtype's minimum elsewhere (added to the scores)
  for eager. It holds B x T x T elements, one byte each under sdpa (the same mask transformers materialises
  for a packed row of the families above), two or four under eager. The position ids go with it.
- Two kinds are not kept apart: DeBERTa (UNSEPARATED_FAMILIES: it takes no 4D mask and its mask ignores
  the position ids) and windowed families whose mask ignores them (ModernBERT's local layers); they get the
  position ids as the first kind does, and their documents attend to each other.
- RoBERTa-like embeddings count positions from padding_idx + 1 (their position embedding has a padding
  index): their position ids are shifted by that much, as the model's own would be.
- BLOOM computes its ALiBi bias from a 2D mask; the bias depends only on the key's position (a constant
  shift per query row, which softmax ignores), so its base model is given an ALiBi builder that reads a 4D
  mask as a row of real tokens (`_alibi_from_rows`, installed once per model).

Which families keep documents apart, and that each packed document's logits equal its own unpacked
forward, is checked for every family the tests cover by tests/runtime/test_packing.py, so a transformers
release that changes a family's mask building fails there.

The planner traces its models through `packed_inputs` too (gkd.planner.trace), so that plans count the masks
made here: this module is one of the sources of the planner's facts (gkd.planner.facts.FACTS_SOURCES), and a
change to it needs `make pack`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

# Families whose transformers code finds packed documents in the position ids (it passes them to its mask
# builders): tests/runtime/test_packing.py checks each. Any other family gets the block mask, which keeps
# documents apart whatever its mask builder reads, unless its attention is windowed (`_windowed`).
POSITION_ID_FAMILIES = frozenset(
    {"bert", "gemma2", "glm", "gpt2", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3", "qwen3_moe"}
)


def packed_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` (with "position_ids" counting from 0 at each packed document's start) as `model` must take
    them to keep its documents apart (see the module docstring); inputs without position ids are returned
    as given."""
    positions = inputs.get("position_ids")
    if positions is None:
        return inputs
    if uses_block_mask(model):
        return _with_block_mask(model, inputs, positions)
    mask = inputs.get("attention_mask")
    if mask is not None and bool(mask.all()):
        inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    if _takes(model, "use_cache"):
        # transformers reads packed documents from the position ids only when no key/value cache is made.
        inputs = {**inputs, "use_cache": False}
    return inputs


# Families that cannot take a 4D mask (DeBERTa multiplies its embeddings by the 2D mask) and whose mask
# builder ignores the position ids: their packed documents still see each other.
# tests/runtime/test_packing.py checks that they do, so a release that changes this is noticed.
UNSEPARATED_FAMILIES = frozenset({"deberta", "deberta-v2"})


def uses_block_mask(model: nn.Module) -> bool:
    """Whether `model` is given a 4D block mask for packed rows (rather than position ids alone): every model
    whose forward takes no position ids, and every family outside POSITION_ID_FAMILIES whose attention is
    not windowed. A windowed one (sliding windows, chunks, local layers) keeps the position ids: a 4D mask
    replaces the masks transformers builds for its windows."""
    if not _takes(model, "position_ids"):
        return True
    family = _family(model)
    if family in POSITION_ID_FAMILIES or family in UNSEPARATED_FAMILIES:
        return False
    return not _windowed(getattr(model, "config", None))


_WINDOW_KEYS = ("sliding_window", "attention_chunk_size", "local_attention")


def _windowed(config: Any) -> bool:
    if any(getattr(config, key, None) for key in _WINDOW_KEYS):
        return True
    return any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ())


def block_mask(
    positions: Tensor, real: Tensor | None, *, causal: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """The (B, 1, T, T) mask of rows whose documents start where `positions` (B, T) does not count on by 1:
    True where query and key are in one document, the key is real (`real` (B, T), True or 1 = a real token;
    None: all are) and, if `causal`, the key is not after the query. With `dtype` (a float type) it is
    additive instead: 0 where allowed, the dtype's minimum elsewhere."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    document = starts.cumsum(-1)
    allowed = document[:, :, None] == document[:, None, :]
    if causal:
        length = positions.shape[-1]
        allowed &= torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    if real is not None:
        allowed &= real.bool()[:, None, :]
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _with_block_mask(model: nn.Module, inputs: dict[str, Any], positions: Tensor) -> dict[str, Any]:
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    implementation = str(implementation).removeprefix("gkd_capture_")
    # transformers' own masks: bool for sdpa, additive in the model's dtype for eager (and BLOOM's own code).
    dtype = None if implementation == "sdpa" else _float_dtype(model)
    mask = block_mask(positions, inputs.get("attention_mask"), causal=not _is_masked_lm(model), dtype=dtype)
    # A forward that takes no position ids (BLOOM) gets none: it has no positions beside its ALiBi bias.
    out = {k: v for k, v in inputs.items() if k != "position_ids" or _takes(model, "position_ids")}
    if "position_ids" in out:
        out["position_ids"] = out["position_ids"] + _position_offset(model)
    out["attention_mask"] = mask
    if _takes(model, "use_cache"):
        out["use_cache"] = False
    base = getattr(model, "base_model", model)
    if hasattr(base, "build_alibi_tensor") and not getattr(base, "_gkd_alibi_from_rows", False):
        _alibi_from_rows(base)
    return out


def _alibi_from_rows(base: nn.Module) -> None:
    """Give `base` (BLOOM's base model) an ALiBi builder that reads a 4D mask as a row of real tokens: the
    bias then counts key positions from the row's start, which differs from counting them from each
    document's start by a constant per query row, and softmax ignores such a constant."""
    build_2d = base.build_alibi_tensor

    def build(attention_mask: Tensor, num_heads: int, dtype: torch.dtype) -> Tensor:
        if attention_mask.dim() == 4:
            rows, length = attention_mask.shape[0], attention_mask.shape[-1]
            attention_mask = torch.ones(rows, length, dtype=torch.long, device=attention_mask.device)
        return build_2d(attention_mask, num_heads, dtype)

    base.build_alibi_tensor = build
    base._gkd_alibi_from_rows = True


def _position_offset(model: nn.Module) -> int:
    """Where the model's own position ids start: padding_idx + 1 for an embedding whose position table has a
    padding index (RoBERTa and its kind), else 0."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    padding = getattr(table, "padding_idx", None) if isinstance(table, nn.Embedding) else None
    return 0 if padding is None else padding + 1


def _float_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _family(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _is_masked_lm(model: nn.Module) -> bool:
    """Whether `model` is an encoder's masked-LM model (bidirectional attention within a document)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def _takes(model: nn.Module, name: str) -> bool:
    """Whether the model's forward takes the keyword `name`."""
    # Named, not merely accepted through **kwargs: a forward that only passes them on may drop them.
    return name in inspect.signature(model.forward).parameters
