"""Model frontend: a `ModelSpec` from a preset name, a Hugging Face config.json, or a checkpoint folder,
and the model itself built through transformers on the meta device (no weights allocated) or, for tests and
small runs, with real random-initialised weights.

Design choices:
- The transformers config dict (`ModelSpec.hf_config`) is the single source of truth for construction.
  Presets are written as such dicts and go through exactly the same reader as a user's config.json, so a
  preset and the equivalent config.json give equal specs.
- A config.json must state the shape keys explicitly (layers, hidden, heads, FFN where the architecture has a
  free FFN size, vocab): transformers would silently fill a missing key with some model's default size, and a
  plan for the wrong model is worse than an error.
- Parameters are counted exactly on meta models of one and two layers: every supported family has identical
  layers, so total = P(1) + (L - 1) * (P(2) - P(1)). This equals the full meta model's count (tested) and
  costs milliseconds even for 176B models.
- Architectures that transformers does not implement are mapped to the closest one with the same tensor shapes
  and (nearly) the same parameter count; the preset description says what differs. GLM-130B ->
  transformers `glm` (GeGLU, RoPE, QKV bias); GLM-10B -> `gpt2` (learned positions, pre-LN, GELU 4h MLP,
  biases, tied head). Qwen-72B / Qwen-7B (Qwen 1) -> `qwen2` (same QKV-bias SwiGLU RMSNorm layer).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.errors import InputError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the planner needs to know about one model's shape. Plain data; JSON-friendly."""

    name: str  # preset name, or the folder / file it came from
    family: str  # the model's lineage (its model_type unless mapped; `model_type` names what builds it)
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
    # Attention head size when the config sets it explicitly (0: hidden // heads).
    attn_head_dim: int = 0
    # An encoder with a masked-LM head (BERT-like) rather than a decoder with a causal-LM head.
    encoder: bool = False
    # Positions are a learned embedding table (GPT-2, OPT, BERT): sequences cannot exceed max_positions.
    learned_positions: bool = False
    # Where the blocks, attention, MLP, norms and head are (`gkd.architecture.ModelLayout.to_dict()`); found
    # from the built model, never from a per-architecture table.
    layout: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.family or not isinstance(self.family, str):
            raise InputError(f"model {self.name}: family must be a non-empty string, got {self.family!r}")
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_positions"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"model {self.name}: {key} must be a positive integer, got {value!r}")
        if self.attn_head_dim == 0 and self.hidden % self.heads != 0:
            raise InputError(
                f"model {self.name}: {self.heads} attention heads do not divide hidden size {self.hidden}; "
                "fix num_attention_heads or hidden_size"
            )
        if self.heads % self.kv_heads != 0:
            raise InputError(
                f"model {self.name}: {self.kv_heads} key/value heads do not divide "
                f"{self.heads} attention heads; "
                "fix num_key_value_heads"
            )
        if self.dtype not in _DTYPES:
            raise InputError(f"model {self.name}: dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden // self.heads

    @property
    def is_encoder(self) -> bool:
        return self.encoder

    @property
    def model_type(self) -> str:
        """The transformers architecture that builds this model (differs from `family` for mapped models)."""
        return str(self.hf_config["model_type"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "model_type": self.model_type,
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "ffn": self.ffn,
            "activation": self.activation,
            "vocab": self.vocab,
            "tied_embeddings": self.tied_embeddings,
            "max_positions": self.max_positions,
            "dtype": self.dtype,
            "description": self.description,
        }


# ----------------------------------------------------------------------------------------------------------
# Presets: transformers config dicts. Shapes of the 100B-class models from shared/reference/anchors.md;
# the others from the models' published config.json files.
# ----------------------------------------------------------------------------------------------------------


def _llama(
    layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, max_pos: int
) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def _qwen(layers: int, hidden: int, heads: int, ffn: int, vocab: int, max_pos: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def _gpt2(layers: int, hidden: int, heads: int, vocab: int = 50257, max_pos: int = 1024) -> dict[str, Any]:
    # GPT-2's special token id 50256 exists only in its own vocabulary.
    special = 50256 if vocab > 50256 else None
    return {
        "model_type": "gpt2",
        "n_layer": layers,
        "n_embd": hidden,
        "n_head": heads,
        "vocab_size": vocab,
        "n_positions": max_pos,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "bos_token_id": special,
        "eos_token_id": special,
    }


def _opt(layers: int, hidden: int, heads: int, ffn: int) -> dict[str, Any]:
    return {
        "model_type": "opt",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_dim": ffn,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": hidden,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "tie_word_embeddings": True,
    }


def _bloom(layers: int, hidden: int, heads: int) -> dict[str, Any]:
    return {
        "model_type": "bloom",
        "n_layer": layers,
        "hidden_size": hidden,
        "n_head": heads,
        "vocab_size": 250880,
        "seq_length": 2048,
        "tie_word_embeddings": True,
    }


def _bert(
    layers: int, hidden: int, heads: int, ffn: int, vocab: int = 30522, max_pos: int = 512
) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "hidden_act": "gelu",
        "type_vocab_size": 2,
        "tie_word_embeddings": True,
    }


_GLM_130B_NOTE = (
    "GLM-130B (THUDM) is not in transformers; built as transformers' `glm` architecture with identical "
    "tensor shapes (70 layers, hidden 12288, 96 heads, GeGLU FFN 32768, RoPE, QKV bias, tied 150528-token "
    "embedding). Differences: pre-RMSNorm instead of GLM-130B's post-LN DeepNorm, and no bias on the "
    "attention output and MLP projections, so 8.0M (0.006%) fewer parameters than the original 128.7B"
)
_GLM_10B_NOTE = (
    "GLM-10B (THUDM) is not in transformers; built as the `gpt2` architecture with identical tensor shapes "
    "(48 layers, hidden 4096, 64 heads, GELU FFN 16384, learned positions, biases, tied 50048-token "
    "embedding). "
    "Difference: GLM's second (block) position embedding, 4.2M parameters (0.04%), is absent"
)

# name -> (description, dtype, transformers config dict)
_PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "glm-130b": (
        _GLM_130B_NOTE,
        "bfloat16",
        {
            "model_type": "glm",
            "num_hidden_layers": 70,
            "hidden_size": 12288,
            "num_attention_heads": 96,
            "num_key_value_heads": 96,
            "head_dim": 128,
            "intermediate_size": 32768,
            "vocab_size": 150528,
            "hidden_act": "gelu",
            "max_position_embeddings": 2048,
            "attention_bias": True,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
            "pad_token_id": None,
            "eos_token_id": None,
        },
    ),
    "glm-10b": (
        _GLM_10B_NOTE,
        "bfloat16",
        {**_gpt2(48, 4096, 64, vocab=50048), "n_inner": 16384, "activation_function": "gelu"},
    ),
    "glm-10b-icetk": (
        "GLM-10B's shape with GLM-130B's 150528-token icetk vocabulary, the student of the headline job: "
        "logit losses compare distributions over one vocabulary, so the student adopts the teacher's "
        "tokenizer (GLM-10B itself has 50048 tokens). Built like glm-10b (the `gpt2` architecture)",
        "bfloat16",
        {**_gpt2(48, 4096, 64, vocab=150528), "n_inner": 16384, "activation_function": "gelu"},
    ),
    "opt-175b": (
        "OPT-175B (Meta): 96 layers, hidden 12288, 96 heads, ReLU FFN 49152",
        "bfloat16",
        _opt(96, 12288, 96, 49152),
    ),
    "opt-13b": ("OPT-13B (Meta)", "bfloat16", _opt(40, 5120, 40, 20480)),
    "opt-6.7b": ("OPT-6.7B (Meta)", "bfloat16", _opt(32, 4096, 32, 16384)),
    "bloom-176b": (
        "BLOOM-176B (BigScience): 70 layers, hidden 14336, 112 heads, ALiBi",
        "bfloat16",
        _bloom(70, 14336, 112),
    ),
    "bloom-7b1": ("BLOOM-7B1 (BigScience)", "bfloat16", _bloom(30, 4096, 32)),
    "llama-2-70b": (
        "LLaMA-2-70B (Meta): 80 layers, hidden 8192, 64 heads, 8 KV heads (GQA), SwiGLU 28672",
        "bfloat16",
        _llama(80, 8192, 64, 8, 28672, 32000, 4096),
    ),
    "llama-2-13b": ("LLaMA-2-13B (Meta)", "bfloat16", _llama(40, 5120, 40, 40, 13824, 32000, 4096)),
    "llama-2-7b": ("LLaMA-2-7B (Meta)", "bfloat16", _llama(32, 4096, 32, 32, 11008, 32000, 4096)),
    "mistral-7b": (
        "Mistral-7B-v0.1: 32 layers, hidden 4096, 32 heads, 8 KV heads, sliding window 4096",
        "bfloat16",
        {
            "model_type": "mistral",
            "num_hidden_layers": 32,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 32000,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "sliding_window": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    ),
    "qwen-72b": (
        "Qwen-72B (Alibaba, Qwen 1) as transformers' `qwen2` architecture (same QKV-bias SwiGLU layer)",
        "bfloat16",
        _qwen(80, 8192, 64, 24576, 152064, 32768),
    ),
    "qwen-7b": (
        "Qwen-7B (Alibaba, Qwen 1) as transformers' `qwen2` architecture (same QKV-bias SwiGLU layer)",
        "bfloat16",
        _qwen(32, 4096, 32, 11008, 151936, 8192),
    ),
    "gpt2": ("GPT-2 small (124M, OpenAI)", "bfloat16", _gpt2(12, 768, 12)),
    "gpt2-medium": ("GPT-2 medium (355M, OpenAI)", "bfloat16", _gpt2(24, 1024, 16)),
    "gpt2-large": ("GPT-2 large (774M, OpenAI)", "bfloat16", _gpt2(36, 1280, 20)),
    "gpt2-xl": ("GPT-2 XL (1.5B, OpenAI)", "bfloat16", _gpt2(48, 1600, 25)),
    "bert-base": (
        "BERT-base uncased (110M, Google), encoder with masked-LM head",
        "bfloat16",
        _bert(12, 768, 12, 3072),
    ),
    "bert-large": (
        "BERT-large uncased (340M, Google), encoder with masked-LM head",
        "bfloat16",
        _bert(24, 1024, 16, 4096),
    ),
    # Tiny pairs for tests and the demo: float32 because they run on CPUs.
    "tiny-llama-teacher": (
        "tiny Llama teacher for tests and the demo",
        "float32",
        _llama(4, 64, 4, 2, 128, 256, 512),
    ),
    "tiny-llama-student": (
        "tiny Llama student for tests and the demo",
        "float32",
        _llama(2, 32, 4, 2, 64, 256, 512),
    ),
    "tiny-gpt2-teacher": (
        "tiny GPT-2 teacher for tests and the demo",
        "float32",
        {**_gpt2(4, 64, 4, vocab=256, max_pos=512), "n_inner": 128},
    ),
    "tiny-gpt2-student": (
        "tiny GPT-2 student for tests and the demo",
        "float32",
        {**_gpt2(2, 32, 4, vocab=256, max_pos=512), "n_inner": 64},
    ),
    "tiny-bert-teacher": (
        "tiny BERT teacher for tests and the demo",
        "float32",
        _bert(4, 64, 4, 128, vocab=256),
    ),
    "tiny-bert-student": (
        "tiny BERT student for tests and the demo",
        "float32",
        _bert(2, 32, 4, 64, vocab=256),
    ),
}

# Presets whose lineage differs from the transformers architecture that builds them.
_PRESET_FAMILY = {"glm-10b": "glm", "glm-10b-icetk": "glm"}


def preset_config(name: str) -> dict[str, Any] | None:
    """The transformers config dict of preset `name` (a copy), or None for any other name."""
    return copy.deepcopy(_PRESETS[name][2]) if name in _PRESETS else None


def preset_names() -> list[str]:
    """Names of the built-in presets, in catalogue order."""
    return list(_PRESETS)


def resolve_model(ref: str) -> ModelSpec:
    """A ModelSpec from a preset name, a path to a config.json, a checkpoint folder holding config.json, or a
    Hugging Face Hub id (`org/name[@revision]`, read from the local cache, see gkd.hub).

    Weights are never read. Raises InputError for anything unusable, with a message saying how to fix it.
    """
    if ref in _PRESETS:
        description, dtype, config = _PRESETS[ref]
        return spec_from_config(
            copy.deepcopy(config),
            name=ref,
            description=description,
            dtype=dtype,
            family=_PRESET_FAMILY.get(ref),
        )
    path = Path(ref).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError(
                f"checkpoint folder {ref} has no config.json; point to a Hugging Face model folder"
            )
        return _spec_from_file(config_path, name=ref)
    if path.is_file():
        return _spec_from_file(path, name=ref)
    from gkd.hub import is_hub_id, snapshot_folder

    if is_hub_id(ref):
        return _spec_from_file(snapshot_folder(ref) / "config.json", name=ref)
    if "/" in ref or ref.endswith(".json"):
        raise InputError(f"no such file or folder: {ref}")
    close = difflib.get_close_matches(ref, preset_names(), n=3, cutoff=0.5)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "run `gkd inspect` with one of " + ", ".join(preset_names())
    )
    raise InputError(
        f"unknown model {ref!r}: not a preset, config.json, checkpoint folder or hub id (org/name); {hint}"
    )


def _spec_from_file(path: Path, *, name: str) -> ModelSpec:
    config = read_config_json(path)
    prepare_remote_code(config, path.parent, name=name)
    return spec_from_config(config, name=name, description=f"from {path}")


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object of a config.json, or an InputError saying why it is unusable."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err.__class__.__name__}") from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(config, dict):
        raise InputError(
            f"{path} must hold a JSON object (a Hugging Face config), not {type(config).__name__}"
        )
    return config


# ----------------------------------------------------------------------------------------------------------
# Custom model code (auto_map): run only for the folders a config trusts (`trust_remote_code: true`)
# ----------------------------------------------------------------------------------------------------------

_TRUSTED: set[str] = set()  # resolved folders whose model code the job's config allows to run
_REGISTERED: set[str] = set()  # custom model types registered with transformers in this process


def trust_remote_code(folder: str | Path) -> None:
    """Allow the custom code of the model in `folder` to run in this process (a config's per-model
    `trust_remote_code: true`; gkd.config.Config records them)."""
    _TRUSTED.add(str(Path(folder).expanduser().resolve()))


def is_trusted(folder: str | Path) -> bool:
    """Whether the config of this process's job allows the code of the model in `folder` to run."""
    return str(Path(folder).expanduser().resolve()) in _TRUSTED


def prepare_remote_code(config: dict[str, Any], folder: Path, *, name: str) -> None:
    """For a config with custom code (auto_map) whose model_type transformers lacks: register its classes
    with transformers' Auto classes when the folder is trusted, so that everything after builds it like a
    built-in architecture; refuse it otherwise. Nothing for any other config. A folder of a model type that
    another, trusted folder registered is refused too unless trusted itself: its config would otherwise
    build as the other folder's classes without anyone having allowed it."""
    model_type = config.get("model_type")
    if "auto_map" not in config or not model_type:
        return
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING and model_type not in _REGISTERED:
        return  # built into transformers: its own code builds it, not the folder's
    if not is_trusted(folder):
        raise InputError(
            f"model {name}: architecture {model_type!r} is custom code shipped with the model (auto_map); "
            f"to run it, write the model as {{model: {name}, trust_remote_code: true}} in the config "
            "(gkd plan, gkd run) or pass --trust-remote-code (gkd inspect, gkd eval)"
        )
    if model_type not in _REGISTERED:
        _register(model_type, config["auto_map"], folder, name)


def _register(model_type: str, auto_map: Any, folder: Path, name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    if not isinstance(auto_map, dict) or not {"AutoConfig", "AutoModelForCausalLM"} <= set(auto_map):
        raise InputError(
            f"model {name}: its auto_map must name AutoConfig and AutoModelForCausalLM classes; "
            "gkd distils causal language models from custom code"
        )
    try:
        config_class = get_class_from_dynamic_module(auto_map["AutoConfig"], str(folder))
        model_class = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(folder))
    except Exception as err:  # the model's own code failed to import: report it in one line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise InputError(f"model {name}: its custom code does not load: {first_line}") from None
    if getattr(config_class, "model_type", None) != model_type:
        raise InputError(
            f"model {name}: its config class {config_class.__name__} has model_type "
            f"{getattr(config_class, 'model_type', None)!r}, not {model_type!r} as config.json says"
        )
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    # A saved student then carries the code files it needs (gkd.runtime.save, as save_pretrained does).
    model_class.register_for_auto_class("AutoModelForCausalLM")
    _REGISTERED.add(model_type)
    if "RANK" not in os.environ:  # said once, by the process that starts the job, not by each worker
        print(f"gkd: running the custom model code of {name} (trust_remote_code: true)", file=sys.stderr)


def spec_from_config(
    config: dict[str, Any],
    *,
    name: str,
    description: str = "",
    dtype: str | None = None,
    family: str | None = None,
) -> ModelSpec:
    """A ModelSpec from a transformers config dict (as in config.json), for any architecture transformers
    implements whose parts `gkd.architecture.map_layout` finds. The dict is validated, then completed with
    transformers' defaults for the keys it does not set (dropout, eps, ...), never for shape keys."""
    model_type = config.get("model_type")
    if not model_type:
        raise InputError(f'model {name}: config has no "model_type"; add the transformers model type')
    config_class = _config_class(model_type, config, name)
    missing = _missing_shape_keys(config, config_class)
    if missing:
        raise InputError(f"model {name}: config.json is incomplete, missing {', '.join(missing)}")
    _check_raw_dims(config, name)
    hf = _hf_config(config, name)
    if getattr(hf, "final_logit_softcapping", None):
        raise InputError(
            f"model {name}: final_logit_softcapping is set; the fused logit losses take the LM head's input "
            "and weight and would skip the cap, so set it to null to distil the uncapped logits"
        )
    encoder = _is_encoder(model_type, name)
    fields = _shape_fields(hf)
    layout = _map(model_type, hf, name, fields, encoder)
    ffn = layout.ffn or _config_ffn(hf)
    if dtype is None:
        dtype = _dtype_name(config.get("torch_dtype") or config.get("dtype"))
    hf_dict = hf.to_dict()
    hf_dict["model_type"] = model_type
    # The release that wrote the dict says nothing about the model, and would key every cache on it.
    hf_dict.pop("transformers_version", None)
    return ModelSpec(
        name=name,
        family=family or model_type,
        dtype=dtype,
        description=description,
        hf_config=hf_dict,
        ffn=ffn,
        activation=_activation(_activation_name(hf), gated=layout.gated),
        encoder=encoder,
        learned_positions=layout.learned_positions,
        layout=layout.to_dict(),
        **fields,
    )


# Spellings of the shape keys besides the standard name and the config class's own attribute_map.
_SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("n_embd", "n_embed", "d_model"),
    "num_hidden_layers": ("n_layer", "num_layers"),
    "num_attention_heads": ("n_head", "num_heads"),
    "vocab_size": (),
}
# FFN widths: required when the config class takes one (GPT-2's n_inner and BLOOM's 4 x hidden are optional).
_FFN_KEYS = ("intermediate_size", "ffn_dim", "d_ff")


def _config_class(model_type: str, config: dict[str, Any], name: str) -> Any:
    from transformers import CONFIG_MAPPING, __version__

    if model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type]
    if "auto_map" in config:
        raise InputError(
            f"model {name}: architecture {model_type!r} is custom code shipped with the model (auto_map); "
            "give its folder or hub id with trust_remote_code: true to run it"
        )
    close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; check model_type or upgrade transformers"
    raise InputError(
        f"model {name}: unsupported architecture {model_type!r}: transformers {__version__} "
        f"does not implement it{hint}"
    )


def _missing_shape_keys(config: dict[str, Any], config_class: Any) -> list[str]:
    """Shape keys the config must state (a default would silently plan some other model's size)."""
    import inspect

    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    missing = []
    for key, spellings in _SHAPE_KEYS.items():
        names = {key, *spellings, aliases.get(key, key)}
        if not any(n in config for n in names):
            missing.append(key)
    parameters = inspect.signature(config_class.__init__).parameters
    ffn_keys = [k for k in _FFN_KEYS if k in parameters]
    if ffn_keys and not any(k in config or aliases.get(k, k) in config for k in ffn_keys):
        missing.append(ffn_keys[0])
    return missing


def _is_encoder(model_type: str, name: str) -> bool:
    """Encoders have a masked-LM head in transformers (and possibly a causal one too, as BERT does, which
    gkd does not use); decoders a causal-LM head only."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return True
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in _REGISTERED:
        return False
    raise InputError(
        f"model {name}: transformers has no causal or masked language-model head for {model_type!r}; "
        "gkd distils language models only"
    )


_LAYOUTS: dict[str, Any] = {}


def _map(model_type: str, hf: Any, name: str, fields: dict[str, Any], encoder: bool) -> Any:
    """The architecture's layout, found on a two-block meta model (cached per config within the process)."""
    import torch

    from gkd.architecture import map_layout

    key = json.dumps([model_type, hf.to_dict()], sort_keys=True, default=str)
    if key not in _LAYOUTS:
        config = _with_layers(copy.deepcopy(hf), 2)
        auto = _auto_class(encoder)
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
        except Exception as err:  # any failure to build from a valid config is a problem with the config
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise InputError(f"model {name}: transformers cannot build it: {first_line}") from None
        head_dim = fields["attn_head_dim"] or fields["hidden"] // fields["heads"]
        _LAYOUTS[key] = map_layout(
            model, name=name, hidden=fields["hidden"], heads=fields["heads"], head_dim=head_dim, blocks=2
        )
    return _LAYOUTS[key]


def _auto_class(encoder: bool) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if encoder else AutoModelForCausalLM


def _with_layers(hf: Any, num_layers: int) -> Any:
    """`hf` set to `num_layers` blocks (through the config class's own spelling of the key), with its
    per-layer attention types (layer_types) fitted to match."""
    hf.num_hidden_layers = num_layers  # attribute_map routes it to n_layer etc.
    value = getattr(hf, "layer_types", None)
    if isinstance(value, list) and value:
        # Cut to the first blocks; a one-layer model mapped with two blocks repeats its pattern.
        hf.layer_types = [value[i % len(value)] for i in range(num_layers)]
    return hf


def _check_raw_dims(config: dict[str, Any], name: str) -> None:
    """Shape consistency, checked before transformers sees the dict so the message is ours."""

    def first(*keys: str) -> Any:
        return next((config[k] for k in keys if k in config), None)

    hidden = first("hidden_size", "n_embd", "n_embed")
    heads = first("num_attention_heads", "n_head")
    kv = config.get("num_key_value_heads")
    for key, value in (("hidden size", hidden), ("attention heads", heads), ("key/value heads", kv)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InputError(f"model {name}: {key} must be a positive integer, got {value!r}")
    if hidden and heads and not config.get("head_dim") and hidden % heads != 0:
        raise InputError(
            f"model {name}: {heads} attention heads do not divide hidden size {hidden}; "
            "fix num_attention_heads or hidden_size"
        )
    vocab, pad = config.get("vocab_size"), config.get("pad_token_id")
    if isinstance(vocab, int) and isinstance(pad, int) and not 0 <= pad < vocab:
        raise InputError(
            f"model {name}: pad_token_id {pad} is outside the vocabulary of {vocab}; fix pad_token_id"
        )
    if heads and kv and heads % kv != 0:
        raise InputError(
            f"model {name}: {kv} key/value heads do not divide {heads} attention heads; "
            "fix num_key_value_heads"
        )


def _hf_config(config: dict[str, Any], name: str) -> Any:
    from transformers import AutoConfig

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **kwargs)
    except Exception as err:  # any failure to build the config is a problem with the config
        cause = err.__cause__ or err  # huggingface_hub wraps validator errors; the cause says what is wrong
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else cause.__class__.__name__
        raise InputError(f"model {name}: invalid config: {first_line}") from None


def _dtype_name(value: Any) -> str:
    text = str(value or "bfloat16").replace("torch.", "")
    return text if text in _DTYPES else "bfloat16"


def _activation(name: str, gated: bool) -> str:
    name = name.lower()
    if gated:
        return (
            "swiglu" if name in ("silu", "swish") else "geglu" if name.startswith("gelu") else f"{name}-glu"
        )
    return "gelu" if name.startswith("gelu") else name


def _activation_name(hf: Any) -> str:
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        value = getattr(hf, key, None)
        if isinstance(value, str) and value:
            return value
    return "gelu"  # BLOOM's config names none; its MLP is GELU


def _config_ffn(hf: Any) -> int:
    """The expert FFN width of a mixture-of-experts config (the layout cannot read it off a linear layer)."""
    for key in ("moe_intermediate_size", "intermediate_size", "ffn_dim"):
        value = getattr(hf, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * int(hf.hidden_size)


def _shape_fields(hf: Any) -> dict[str, Any]:
    """ModelSpec shape fields read from a transformers config object (defaults already applied; the standard
    names reach every architecture's own spelling through its attribute_map)."""
    hidden = int(hf.hidden_size)
    heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    max_positions = getattr(hf, "max_position_embeddings", None) or getattr(hf, "seq_length", None) or 2048
    return {
        "layers": int(hf.num_hidden_layers),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(getattr(hf, "num_key_value_heads", None) or heads),
        "vocab": int(hf.vocab_size),
        "tied_embeddings": bool(getattr(hf, "tie_word_embeddings", True)),
        "max_positions": int(max_positions),
        "attn_head_dim": 0 if head_dim * heads == hidden else int(head_dim),
    }


# ----------------------------------------------------------------------------------------------------------
# Building models and counting parameters
# ----------------------------------------------------------------------------------------------------------


def torch_dtype(spec: ModelSpec) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]


def hf_config_object(spec: ModelSpec, *, num_layers: int | None = None) -> Any:
    """The transformers config object for `spec`, optionally with fewer layers (a shallow copy)."""
    from transformers import AutoConfig

    config = dict(spec.hf_config)
    model_type = config.pop("model_type")
    hf = AutoConfig.for_model(model_type, **config)
    if num_layers is not None:
        if num_layers < 1:
            raise InputError(f"num_layers must be at least 1, got {num_layers}")
        _with_layers(hf, num_layers)
    return hf


def supports_attention_interface(spec: ModelSpec) -> bool:
    """Whether the model's attention goes through transformers' attention functions (sdpa, eager, or one
    registered with `AttentionInterface`). BLOOM's does not: it always materialises the attention matrix and
    its q/k/v/scores/probs cannot be captured by an attention-function hook."""
    return bool(spec.layout.get("attention_interface", True))


def build_model(
    spec: ModelSpec,
    *,
    device: str = "meta",
    num_layers: int | None = None,
    attn_implementation: str = "sdpa",
    dtype: Any = None,
) -> Any:
    """A transformers model WITH its LM head (causal LM for decoders, masked LM for BERT).

    device "meta": no storage is allocated (shapes only); "cpu": random-initialised weights.
    num_layers: build a shallow copy with that many layers (same per-layer shapes).
    dtype: a torch dtype; None means the spec's dtype.
    """
    import torch

    config = hf_config_object(spec, num_layers=num_layers)
    auto = _auto_class(spec.is_encoder)
    if not supports_attention_interface(spec):
        # BLOOM computes attention in its own code (ALiBi + baddbmm); transformers refuses "sdpa" for it.
        attn_implementation = "eager"
    try:
        with torch.device(device):
            model = auto.from_config(
                config,
                attn_implementation=attn_implementation,
                dtype=dtype if dtype is not None else torch_dtype(spec),
            )
    except (ValueError, TypeError, AssertionError) as err:
        # The config passed transformers' validation but the model cannot be made from it (e.g. an id outside
        # the vocabulary, an attention implementation the architecture lacks).
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise InputError(f"model {spec.name}: transformers cannot build it: {first_line}") from None
    return model


def _unique_numel(model: Any) -> int:
    # model.parameters() yields each Parameter once, so tied embeddings count once.
    return sum(p.numel() for p in model.parameters())


_PARAM_CACHE: dict[tuple[str, str], int] = {}


def count_parameters(spec: ModelSpec) -> int:
    """Exact parameter count of the model `build_model(spec)` builds (tied weights counted once)."""
    key = (spec.name, json.dumps(spec.hf_config, sort_keys=True, default=str))
    if key not in _PARAM_CACHE:
        if spec.layers <= 2:
            _PARAM_CACHE[key] = _unique_numel(build_model(spec, num_layers=spec.layers))
        else:
            one = _unique_numel(build_model(spec, num_layers=1))
            two = _unique_numel(build_model(spec, num_layers=2))
            _PARAM_CACHE[key] = one + (spec.layers - 1) * (two - one)
    return _PARAM_CACHE[key]
