"""Runtime tap capture: `capture_taps(model, names)` fills a dict with the requested tensors during a forward.

Usage:
    with capture_taps(student, {"hidden[1]", "scores[0]", "logits"}) as taps:
        out = student(input_ids, attention_mask=mask)
    taps["scores[0]"]  # (B, heads, T, T)

Where each tensor comes from (tap names are the shared catalogue, layer indices 0-based):
- `emb` / `hidden[0]`: the input of layer 0 (a forward pre-hook on it); `hidden[i]` (i >= 1): the output of
  layer i-1 (forward hook); `mlp_out[i]`: the output of layer i's MLP block before the residual add (llama /
  qwen2 / mistral / gpt2 `mlp`, OPT `fc2` (reshaped back to (B, T, hidden)), BERT `output.dense`; BLOOM's
  `mlp` adds the residual inside, so there it includes it); `final`: the final norm's output, or
  `hidden[L]` for models without one (BERT); `logits`: the model output's `.logits`; `router_logits[i]`
  (mixture-of-experts models): the first output of layer i's router (the module the model records as its
  `router_logits`, see gkd.planner.moe), reshaped from (B*T, experts) to (B, T, experts).
- `q`, `k`, `v`, `scores`, `probs`, `context`: from a registered attention function
  (transformers `AttentionInterface`) that the model is switched to for the duration of the context. q is
  (B, heads, T, d) and k / v are (B, kv_heads, T, d) as the attention function receives them (after RoPE);
  OPT folds 1/sqrt(d) into its query before the call (and passes scaling 1), which the capture undoes, so
  q is the projected query on every family. When scores or probs are
  requested
  for a layer, that layer's attention is computed explicitly (eager: QK^T * scaling + mask, softmax in
  float32,
  @ V) so the matrices exist; otherwise the original implementation (sdpa or eager) runs. `context` is the
  attention output before the out-projection, reshaped to (B, T, heads * d).

Design choices:
- Tensors are stored as produced, never detached or copied: student taps carry gradients. Running the teacher
  under `torch.no_grad()` is the caller's job.
- Two registered names, `gkd_capture_sdpa` and `gkd_capture_eager`, each paired with the matching mask
function
  (`AttentionMaskInterface`), so the model builds the mask its original implementation expects.
- BLOOM does not route attention through `AttentionInterface` (ALiBi + baddbmm in its own code), so its
  attention taps come from module hooks instead: a pre-hook on the layer's `self_attention` keeps the ALiBi
  bias and the mask it is called with, a hook on its fused `query_key_value` projection splits the output
  into q, k, v per head exactly as BLOOM does (`_reshape`: (B, T, H, 3, d) -> three (B, H, T, d)), and when
  scores or probs are requested they are computed explicitly as BLOOM computes them: scores = ALiBi + QK^T /
  sqrt(d) (`baddbmm` with BLOOM's beta and inv_norm_factor) + the additive mask, probs = softmax in float32
  (before attention dropout). BLOOM's own attention still runs (its softmax is computed twice for tapped
  layers); `context` is the input of its out-projection `dense`. Without a KV cache only (training).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gkd.errors import InputError

_NAME = re.compile(
    r"^(emb|final|logits)$|^(hidden|q|k|v|scores|probs|context|mlp_out|router_logits)\[(\d+)\]$"
)
_ATTN_KINDS = frozenset({"q", "k", "v", "scores", "probs", "context"})
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "bert.encoder.layer",
    "model.decoder.layers",
    "encoder.layer",
    "transformer.layers",
    "transformer.encoder.layers",
    "model.encoder.layer",
)
_FINAL_NORM_PATHS = (
    "model.norm",
    "transformer.ln_f",
    "model.decoder.final_layer_norm",
    "transformer.final_layernorm",
    "transformer.encoder.final_layernorm",
    "model.final_layernorm",
)
_MLP_PATHS = ("mlp", "fc2", "output.dense")

# id(attention module) -> (state, layer index, original implementation name) while a capture is active.
_ACTIVE: dict[int, tuple[_State, int, str]] = {}
_REGISTERED = False


def parse_tap(name: str) -> tuple[str, int | None]:
    """("hidden", 3) for "hidden[3]", ("logits", None) for "logits"; InputError for anything else."""
    m = _NAME.match(name)
    if m is None:
        raise InputError(
            f"unknown tap {name!r}; taps are emb, final, logits, or "
            "hidden/q/k/v/scores/probs/context/mlp_out/router_logits[i]"
        )
    if m.group(1):
        return m.group(1), None
    return m.group(2), int(m.group(3))


@dataclass
class _State:
    taps: dict[str, Tensor]
    wanted: dict[int, set[str]]  # layer -> attention kinds wanted there


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers (the modules whose outputs are hidden[1..L])."""
    for path in _LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    from gkd.architecture import block_stacks

    stacks = block_stacks(model)  # any other architecture: its one stack of identical blocks
    if len(stacks) == 1:
        return _get_path(model, stacks[0])
    raise InputError(
        f"cannot find the transformer layers of {type(model).__name__}: it has {len(stacks)} stacks of "
        "identical blocks, not one"
    )


def _final_norm(model: nn.Module) -> nn.Module | None:
    for path in _FINAL_NORM_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.Module):
            return found
    return None


def _mlp(layer: nn.Module) -> nn.Module:
    for path in _MLP_PATHS:
        found = _get_path(layer, path)
        if isinstance(found, nn.Module):
            return found
    raise InputError(f"cannot find the MLP block of {type(layer).__name__} for an mlp_out tap")


def _router(model: nn.Module, layer: nn.Module) -> nn.Module:
    from gkd.planner.moe import router_path

    path = router_path(model, layer)
    if path is None:
        raise InputError(
            f"{type(model).__name__} has no mixture-of-experts router in its layers for a router_logits tap"
        )
    return layer.get_submodule(path)


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _repeat_kv(x: Tensor, heads: int) -> Tensor:
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _explicit_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scaling: float | None,
    dropout: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eager attention with the scores and probabilities kept: (output (B, T, H, d), scores, probs)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    heads = query.shape[1]
    k = _repeat_kv(key, heads)
    v = _repeat_kv(value, heads)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    neg = torch.finfo(scores.dtype).min
    if mask is None:
        if getattr(module, "is_causal", False) and query.shape[2] > 1:
            t_q, t_k = query.shape[2], k.shape[2]
            causal = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)
            scores = scores.masked_fill(~causal, neg)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., : k.shape[2]], neg)
    else:
        scores = scores + mask[..., : k.shape[2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(dropped, v).transpose(1, 2).contiguous()
    return out, scores, probs


def _unscaled_query(module: nn.Module, query: Tensor, scaling: float | None) -> Tensor:
    """The query as projected, whatever the model folded into it before the attention call.

    OPT multiplies its query by the module's `scaling` (1/sqrt(d)) and then passes scaling 1.0; every other
    family passes its `scaling` along unchanged. Undoing the difference makes `q` mean the same thing on
    every family, so q/k relation and attention losses scale it once."""
    own = getattr(module, "scaling", None)
    if scaling is None or not isinstance(own, (int, float)) or own == 0 or abs(scaling - own) <= 1e-12:
        return query
    return query * (scaling / own)


def _make_attention(inner_name: str) -> Any:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        entry = _ACTIVE.get(id(module))
        wanted = entry[0].wanted.get(entry[1], set()) if entry else set()
        if entry is not None:
            taps, layer = entry[0].taps, entry[1]
            for kind, tensor in (("q", _unscaled_query(module, query, scaling)), ("k", key), ("v", value)):
                if kind in wanted:
                    taps[f"{kind}[{layer}]"] = tensor
        if inner_name == "eager" or wanted & {"scores", "probs"}:
            out, scores, probs = _explicit_attention(
                module, query, key, value, attention_mask, scaling, dropout
            )
            weights: Any = probs
            if entry is not None:
                if "scores" in wanted:
                    entry[0].taps[f"scores[{entry[1]}]"] = scores
                if "probs" in wanted:
                    entry[0].taps[f"probs[{entry[1]}]"] = probs
        else:
            out, weights = ALL_ATTENTION_FUNCTIONS[inner_name](
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if entry is not None and "context" in wanted:
            entry[0].taps[f"context[{entry[1]}]"] = out.reshape(*out.shape[:2], -1)
        return out, weights

    return attention


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for inner in ("sdpa", "eager"):
        AttentionInterface.register(f"gkd_capture_{inner}", _make_attention(inner))
        AttentionMaskInterface.register(f"gkd_capture_{inner}", ALL_MASK_ATTENTION_FUNCTIONS[inner])
    _REGISTERED = True


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object of the model's modules (sub-models may hold their own copy)."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _bloom_attention_hooks(
    layers: nn.ModuleList, wanted: dict[int, set[str]], taps: dict[str, Tensor]
) -> list[Any]:
    """Module hooks that capture BLOOM's attention taps (see the module docstring)."""
    handles: list[Any] = []
    for i, kinds in sorted(wanted.items()):
        attn = layers[i].self_attention
        call: dict[str, Any] = {}

        def attn_pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], call: dict = call) -> None:
            # BloomBlock calls self_attention(hidden, residual, alibi=..., attention_mask=..., ...)
            call["alibi"] = kwargs["alibi"] if "alibi" in kwargs else args[2]
            call["mask"] = kwargs["attention_mask"] if "attention_mask" in kwargs else args[3]

        def qkv_hook(
            _m: nn.Module,
            _args: Any,
            fused: Tensor,
            i: int = i,
            kinds: set = kinds,
            attn: Any = attn,
            call: dict = call,
        ) -> None:
            q, k, v = attn._reshape(fused)  # 3 x (B, H, T, d), as BLOOM splits its fused projection
            for kind, tensor in (("q", q), ("k", k), ("v", v)):
                if kind in kinds:
                    taps[f"{kind}[{i}]"] = tensor
            if not kinds & {"scores", "probs"} and not (
                "context" in kinds and attn.pretraining_tp > 1 and attn.slow_but_exact
            ):
                return
            b, h, t, d = q.shape
            scores = (
                call["alibi"]
                .baddbmm(
                    batch1=q.reshape(b * h, t, d),
                    batch2=k.reshape(b * h, -1, d).transpose(-1, -2),
                    beta=attn.beta,
                    alpha=attn.inv_norm_factor,
                )
                .view(b, h, t, -1)
            )
            mask = call["mask"]
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            if "scores" in kinds:
                taps[f"scores[{i}]"] = scores
            if "probs" in kinds:
                taps[f"probs[{i}]"] = probs
            if "context" in kinds and attn.pretraining_tp > 1 and attn.slow_but_exact:
                # this path never calls `dense`: rebuild its input from the explicit probabilities
                taps[f"context[{i}]"] = (probs @ v).transpose(1, 2).reshape(b, t, h * d)

        def dense_pre(_m: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            taps[f"context[{i}]"] = args[0]

        handles.append(attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        handles.append(attn.query_key_value.register_forward_hook(qkv_hook))
        if "context" in kinds and not (attn.pretraining_tp > 1 and attn.slow_but_exact):
            handles.append(attn.dense.register_forward_pre_hook(dense_pre))
    return handles


@contextmanager
def capture_taps(
    model: nn.Module,
    names: Iterable[str],
    *,
    after_layer: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Capture the named taps during forwards run inside the context. See the module docstring.

    after_layer(i, taps) is called once layer i's taps are in the dict: -1 before layer 0 runs (with `emb` and
    `hidden[0]`), then i after layer i's forward (with `hidden[i + 1]` and layer i's attention and MLP taps).
    It runs from module hooks, outside a recomputed layer's checkpoint, so what it computes is not recomputed.
    """
    requested = [parse_tap(n) for n in sorted(set(names))]
    taps: dict[str, Tensor] = {}
    layers = transformer_layers(model)
    n_layers = len(layers)
    wanted: dict[int, set[str]] = {}
    handles: list[Any] = []
    want_hidden: set[int] = set()
    want_mlp: set[int] = set()
    want_router: set[int] = set()
    want_emb = want_final = want_logits = False
    for kind, idx in requested:
        if idx is not None:
            limit = n_layers if kind == "hidden" else n_layers - 1
            if idx > limit:
                raise InputError(
                    f"tap {kind}[{idx}] is out of range: the model has {n_layers} layers "
                    f"({kind} indices 0..{limit})"
                )
        if kind in _ATTN_KINDS:
            wanted.setdefault(idx, set()).add(kind)  # type: ignore[arg-type]
        elif kind == "hidden":
            want_hidden.add(idx)  # type: ignore[arg-type]
        elif kind == "mlp_out":
            want_mlp.add(idx)  # type: ignore[arg-type]
        elif kind == "router_logits":
            want_router.add(idx)  # type: ignore[arg-type]
        elif kind == "emb":
            want_emb = True
        elif kind == "final":
            want_final = True
        else:
            want_logits = True

    final_norm = _final_norm(model) if want_final else None

    if want_emb or 0 in want_hidden:

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            if want_emb:
                taps["emb"] = x
            if 0 in want_hidden:
                taps["hidden[0]"] = x

        handles.append(layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))

    out_layers = {i - 1 for i in want_hidden if i >= 1}
    if want_final and final_norm is None:
        out_layers.add(n_layers - 1)
    for i in sorted(out_layers):

        def post_hook(_m: nn.Module, _args: Any, output: Any, i: int = i) -> None:
            x = _first(output)
            if i + 1 in want_hidden:
                taps[f"hidden[{i + 1}]"] = x
            if want_final and final_norm is None and i == n_layers - 1:
                taps["final"] = x

        handles.append(layers[i].register_forward_hook(post_hook))

    if final_norm is not None:

        def final_hook(_m: nn.Module, _args: Any, output: Any) -> None:
            taps["final"] = _first(output)

        handles.append(final_norm.register_forward_hook(final_hook))

    layer_shape: dict[int, torch.Size] = {}
    for i in sorted(want_mlp | want_router):
        # OPT runs its MLP on flattened tokens: restore (B, T, hidden) from the layer input's shape.
        def shape_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            layer_shape[i] = (args[0] if args else kwargs["hidden_states"]).shape

        def mlp_hook(_m: nn.Module, _args: Any, output: Any, i: int = i) -> None:
            x = _first(output)
            taps[f"mlp_out[{i}]"] = x.view(layer_shape[i]) if x.dim() == 2 else x

        handles.append(layers[i].register_forward_pre_hook(shape_hook, with_kwargs=True))
        if i in want_mlp:
            handles.append(_mlp(layers[i]).register_forward_hook(mlp_hook))
    for i in sorted(want_router):

        def router_hook(_m: nn.Module, _args: Any, output: Any, i: int = i) -> None:
            x = _first(output)
            taps[f"router_logits[{i}]"] = x.view(*layer_shape[i][:2], x.shape[-1])

        handles.append(_router(model, layers[i]).register_forward_hook(router_hook))

    if want_logits:

        def logits_hook(_m: nn.Module, _args: Any, output: Any) -> None:
            logits = getattr(output, "logits", None)
            taps["logits"] = logits if logits is not None else _first(output)

        handles.append(model.register_forward_hook(logits_hook))

    if after_layer is not None:
        # Registered after the capture hooks above, so each call sees that layer's taps already stored.
        def before_first(_m: nn.Module, _args: Any) -> None:
            after_layer(-1, taps)

        handles.append(layers[0].register_forward_pre_hook(before_first))
        for i, layer in enumerate(layers):

            def layer_done(_m: nn.Module, _args: Any, _output: Any, i: int = i) -> None:
                after_layer(i, taps)

            handles.append(layer.register_forward_hook(layer_done))

    configs: list[tuple[Any, str]] = []
    if wanted and type(model).__name__.startswith("Bloom"):
        handles += _bloom_attention_hooks(layers, wanted, taps)
        wanted = {}  # BLOOM's attention taps come from module hooks, not the AttentionInterface path below
    if wanted:
        _register()
        for cfg in _configs(model):
            current = cfg._attn_implementation or "eager"
            inner = current.removeprefix("gkd_capture_")
            if inner not in ("sdpa", "eager"):
                raise InputError(
                    f"attention taps need the sdpa or eager attention implementation, not {current!r}"
                )
            configs.append((cfg, current))
            cfg._attn_implementation = f"gkd_capture_{inner}"
        state = _State(taps=taps, wanted=wanted)
        for i, layer in enumerate(layers):
            for sub in layer.modules():
                if id(sub) in _ACTIVE:
                    raise RuntimeError(
                        "capture_taps is already active on this model; nesting is not supported"
                    )
                _ACTIVE[id(sub)] = (state, i, "")
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()
        for cfg, current in configs:
            cfg._attn_implementation = current
        if wanted:
            for layer in layers:
                for sub in layer.modules():
                    _ACTIVE.pop(id(sub), None)
