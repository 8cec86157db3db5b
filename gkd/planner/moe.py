"""Mixture-of-experts models: what the planner reads from them beyond a dense model's facts.

An MoE layer replaces the dense MLP by a router (a linear map from the hidden state to one logit per expert)
and E experts, of which each token runs through the top k. So a model's memory is its total parameters (every
expert is stored, gathered or streamed) and its compute is its active ones (a token's forward touches the
shared weights and k of the E experts of each layer).

Design choices:
- Found structurally, not from a list of architectures: transformers' experts modules (those wrapped by
  `use_experts_implementation`, which keep all experts of a layer as 3-D tensors with the experts first)
  carry `num_experts`; the router is the module the model declares as the source of its `router_logits`
  output (`_can_record_outputs["router_logits"]`, index 0 of its output), with `top_k`. A shared expert
  (Qwen2-MoE) is an ordinary MLP and counts as always active.
- Expert parameters are counted like every parameter fact, on meta models of one and two layers (see
  gkd.planner.facts.parameter_facts): layers repeat, so one layer's experts stand for all. Configs whose
  layers are not all alike (dense layers between MoE layers) are refused: extrapolating from layer 0 would
  count them wrongly.
- Tracing: transformers runs the experts with `grouped_mm` by default (the top-k routed tokens, sorted by
  expert, through one grouped matrix product: fixed shapes whatever the routing, which is what makes the
  saved bytes traceable on fake tensors). torch's meta kernel for it checks the CUDA kernel's bfloat16-only
  rule, which CPU runs (float32 tiny models) do not have; `grouped_mm_any_dtype` lifts that check while
  tracing, with the same output shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from gkd.errors import InputError

# Config keys that make some layers dense in an MoE model (Qwen-MoE, DeepSeek): unlike layers.
_MIXED_LAYER_KEYS = (("mlp_only_layers", []), ("decoder_sparse_step", 1), ("first_k_dense_replace", 0))


# Config keys for the experts per layer, in the spellings of transformers' MoE configs (Mixtral and Phi-MoE,
# Qwen-MoE and OLMoE, DeepSeek); read only where no model is built (resolving methods imports no torch).
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def config_experts(spec: Any) -> int:
    """Experts per layer of `spec` from its config (0 for a dense model), without building it."""
    if not (spec.layout or {}).get("moe"):
        return 0
    return next((int(spec.hf_config[k]) for k in _EXPERT_KEYS if spec.hf_config.get(k)), 0)


def experts_modules(module: Any) -> list[Any]:
    """The experts modules under `module`: those with `num_experts` holding 3-D tensors, experts first."""
    found = []
    for m in module.modules():
        count = getattr(m, "num_experts", None)
        if not isinstance(count, int) or count <= 0:
            continue
        if any(p.dim() == 3 and p.shape[0] == count for p in m.parameters(recurse=False)):
            found.append(m)
    return found


def router_class(model: Any) -> type | None:
    """The module class whose output (index 0) the model records as its router logits, if any."""
    for m in model.modules():
        records = getattr(m, "_can_record_outputs", None)
        if isinstance(records, dict) and "router_logits" in records:
            rec = records["router_logits"]
            cls = getattr(rec, "target_class", rec)
            return cls if isinstance(cls, type) else None
    return None


def router_path(model: Any, layer: Any) -> str | None:
    """The router's module path inside `layer` (e.g. "mlp.gate"), or None for a dense layer."""
    cls = router_class(model)
    if cls is None:
        return None
    for name, m in layer.named_modules():
        if name and isinstance(m, cls):
            return name
    return None


def _routing(model: Any, name: str) -> tuple[int, int]:
    """(experts per layer, experts per token) of an MoE model (0, 0 for a dense one)."""
    experts = experts_modules(model)
    if not experts:
        return 0, 0
    count = int(experts[0].num_experts)
    cls = router_class(model)
    routers = [m for m in model.modules() if cls is not None and isinstance(m, cls)]
    top_k = getattr(routers[0], "top_k", None) if routers else None
    if top_k is None:
        top_k = getattr(model.config, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or not 0 < top_k <= count:
        raise InputError(
            f"model {name}: cannot tell how many of its {count} experts a token is routed to; set "
            "num_experts_per_tok in its config"
        )
    return count, top_k


def _expert_numel(model: Any) -> int:
    return sum(p.numel() for m in experts_modules(model) for p in m.parameters(recurse=False))


def check_uniform_layers(spec: Any) -> None:
    """Refuse an MoE config whose layers are not all alike (some dense), which the planner cannot count."""
    config = spec.hf_config
    for key, uniform in _MIXED_LAYER_KEYS:
        value = config.get(key, uniform)
        if value not in (uniform, None):
            raise InputError(
                f"model {spec.name}: {key} = {value!r} makes some layers dense and others "
                f"mixture-of-experts; gkd plans models whose layers are alike, so set {key} to {uniform!r}"
            )


def moe_parameter_facts(spec: Any, one: Any, two: Any | None) -> dict[str, int]:
    """Expert counts of `spec` from its one- and two-layer meta models (`two` is None for a one-layer
    model): experts per layer, experts per token and the parameters of every routed expert in the model.
    All zero for a dense model."""
    experts, top_k = _routing(one, spec.name)
    if not experts:
        return {"experts": 0, "experts_per_token": 0, "expert_params": 0}
    check_uniform_layers(spec)
    e1 = _expert_numel(one)
    per_layer = e1 if two is None else _expert_numel(two) - e1
    return {"experts": experts, "experts_per_token": top_k, "expert_params": per_layer * spec.layers}


def active_params(total: int, expert_params: int, experts: int, experts_per_token: int) -> int:
    """Parameters one token's forward runs through: all but the experts it is not routed to."""
    if not experts:
        return total
    return total - expert_params * (experts - experts_per_token) // experts


@contextlib.contextmanager
def grouped_mm_any_dtype() -> Iterator[None]:
    """While tracing on meta or fake tensors, let `aten._grouped_mm` take any floating dtype (its meta kernel
    checks the CUDA kernel's bfloat16-only rule; CPU runs take float32 too). Output shape as torch's."""
    import torch
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    def meta(mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> Any:
        return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)

    library = torch.library.Library("aten", "IMPL")
    library.impl("_grouped_mm", meta, "Meta")
    try:
        yield
    finally:
        library._destroy()


_ROUTERS: dict[tuple[str, str], tuple[str, int] | None] = {}


def layer_router(spec: Any, layer_path: str) -> tuple[str, int] | None:
    """(the router's module path inside the layer at `layer_path`, experts per layer), or None for a dense
    model; read from a one-layer meta model (no storage)."""
    import json

    from gkd.models import build_model

    key = (json.dumps(spec.hf_config, sort_keys=True, default=str), layer_path)
    if key not in _ROUTERS:
        model = build_model(spec, device="meta", num_layers=1)
        experts = experts_modules(model)
        path = router_path(model, model.get_submodule(layer_path)) if experts else None
        _ROUTERS[key] = (path, int(experts[0].num_experts)) if path else None
    return _ROUTERS[key]
