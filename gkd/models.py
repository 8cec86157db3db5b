"""Model frontend: a `ModelSpec` from a preset name, a Hugging Face config.json, or a checkpoint folder,
and the model itself built through transformers on the meta device (no weights allocated) or, for tests and
small runs, with real random-initialised weights.

(Being filled in: presets, loading, builders.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bloom", "glm", "bert")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the planner needs to know about one model's shape. Plain data; JSON-friendly."""

    name: str  # preset name, or the folder / file it came from
    family: str  # one of FAMILIES
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    activation: str  # "swiglu", "geglu", "gelu", "relu", ...
    vocab: int
    tied_embeddings: bool
    max_positions: int
    dtype: str = "bfloat16"  # dtype of weights and activations in training / inference
    description: str = ""
    # The transformers config (as a dict with "model_type") that builds this model; the single source of truth
    # for construction. Shape fields above are derived from it and checked against it.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_encoder(self) -> bool:
        return self.family == "bert"
