"""Where a transformers model keeps the parts gkd needs, found from the built model itself.

gkd needs, for any architecture: the stack of blocks (decoder or encoder layers), inside one block the
attention module, its out-projection and the MLP (or mixture-of-experts block), and at model level the token
embedding, the final norm and the LM head. `map_layout` finds them on a shallow meta-device model (two
blocks, no storage) by structure, not from a per-architecture table, so a new transformers architecture is
mapped the day transformers ships it:

- blocks: the outermost `ModuleList` holding one block per layer, all of one class. Two such stacks
  (an encoder and a decoder) are refused: encoder-decoder models are not distilled here.
- embedding and head: `get_input_embeddings()` and `get_output_embeddings()`, transformers' own answer.
- final norm: the last norm (a module whose class name contains "Norm") outside the blocks and the head
  that runs after the last block in a meta-device forward; none when there is none (BERT's encoder).
- attention: the deepest module of the block whose class name contains "Attention" (BERT's `attention.self`
  rather than `attention`, which also holds the out-projection and a residual norm).
- out-projection: the last linear layer (`nn.Linear` or transformers' `Conv1D`) from heads x head_dim to
  hidden, inside the attention module or, failing that, in its parent after it (BERT's `attention.output`).
- MLP: the block holding the down projection (the last linear layer to hidden outside the attention), when
  that block holds no norm (a norm there means it also adds the residual and normalises: BERT's `output`);
  else the down projection itself (OPT's `fc2`). Its output is the `mlp_out` tap. A block with an `experts`
  child is a mixture-of-experts block: it is the MLP, and `MoELayout` records the experts and the router.
- the FFN width is the down projection's input width; the MLP is gated (SwiGLU, GeGLU) when the layers
  that read the hidden state produce twice that width (separate gate and up projections, or a fused one).
- attention functions: the model class says whether its attention goes through transformers' attention
  functions (`_supports_attention_backend`); BLOOM's does not.
- learned positions: an embedding table other than the token embedding with at least max_positions rows
  (GPT-2, OPT, BERT): such a model cannot run longer sequences.

Anything that cannot be found is refused with one line naming what is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gkd.errors import InputError


@dataclass(frozen=True, kw_only=True)
class MoELayout:
    """A mixture-of-experts block, paths relative to a block (layer)."""

    block: str  # the sparse MLP block; its output is mlp_out
    experts: str  # the experts container
    router: str | None  # the module whose output are the router logits (None: not found as a module)


@dataclass(frozen=True, kw_only=True)
class ModelLayout:
    """Module paths of one architecture. Model-level paths are from the model's root; `attention`,
    `out_proj`, `mlp` and `moe` are relative to one block (`layers.<i>`)."""

    layers: str
    embed: str
    final_norm: str | None
    head: str
    attention: str
    out_proj: str
    mlp: str
    ffn: int  # FFN width (0 for a mixture-of-experts block: the experts' width comes from the config)
    gated: bool
    learned_positions: bool
    # Attention goes through transformers' attention functions (sdpa, eager or a registered one), so taps
    # can be captured by an attention function; False for BLOOM, which computes attention in its own code.
    attention_interface: bool = True
    moe: MoELayout | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelLayout:
        data = dict(data)
        moe = data.pop("moe", None)
        return cls(**data, moe=MoELayout(**moe) if moe else None)


def _linear_dims(module: Any) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: torch's Linear or transformers' Conv1D (weight is (in, out))."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


def _is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def _inside(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".") or ancestor == ""


def block_stacks(model: Any, blocks: int | None = None) -> list[str]:
    """Paths of the outermost ModuleLists holding `blocks` (any number when None) blocks of one class with
    parameters: the model's stack of layers (two for an encoder-decoder model)."""
    import torch

    stacks = [
        path
        for path, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList)
        and len(m) > 0
        and (blocks is None or len(m) == blocks)
        and len({type(b) for b in m}) == 1
        and any(True for _ in m[0].parameters())
    ]
    return [p for p in stacks if not any(q != p and _inside(p, q) for q in stacks)]


def map_layout(model: Any, *, name: str, hidden: int, heads: int, head_dim: int, blocks: int) -> ModelLayout:
    """The layout of `model` (built with `blocks` blocks). Raises InputError saying what cannot be found."""

    what = f"model {name}: cannot map {type(model).__name__}"
    modules = dict(model.named_modules())

    stacks = block_stacks(model, blocks)
    if not stacks:
        raise InputError(f"{what}: no stack of blocks (a ModuleList of {blocks} blocks of one class)")
    if len(stacks) > 1:
        raise InputError(
            f"{what}: it has {len(stacks)} stacks of blocks ({', '.join(stacks)}); encoder-decoder "
            "models are not supported, only decoders (causal LM) and encoders (masked LM)"
        )
    layers = stacks[0]
    block = modules[layers][0]
    inner = {path: m for path, m in block.named_modules() if path}

    embed_module = model.get_input_embeddings()
    head_module = model.get_output_embeddings()
    ids = {id(m): path for path, m in modules.items()}
    if head_module is None or id(head_module) not in ids:
        raise InputError(f"{what}: no LM head (transformers' get_output_embeddings() returns none)")
    if embed_module is None or id(embed_module) not in ids:
        raise InputError(f"{what}: no token embedding (get_input_embeddings() returns none)")
    embed, head = ids[id(embed_module)], ids[id(head_module)]

    final_norm = _final_norm(model, modules, layers, head)

    attentions = [p for p, m in inner.items() if "attention" in type(m).__name__.lower() and not _is_norm(m)]
    if not attentions:
        raise InputError(
            f"{what}: no attention module (a module whose class name contains 'Attention') in "
            f"{type(block).__name__}"
        )
    depth = max(p.count(".") for p in attentions)
    attention = next(p for p in attentions if p.count(".") == depth)

    interface = bool(getattr(type(model), "_supports_attention_backend", False))
    width = heads * head_dim
    linears = [(p, d) for p, m in inner.items() if (d := _linear_dims(m)) is not None]
    order = list(inner)
    parent = attention.rpartition(".")[0]
    if parent:  # the out-projection sits beside the attention module (BERT's attention.output.dense)
        outs = [
            p
            for p, d in linears
            if d == (width, hidden) and _inside(p, parent) and order.index(p) > order.index(attention)
        ]
    else:
        outs = [p for p, d in linears if d == (width, hidden) and _inside(p, attention)]
    if not outs:
        raise InputError(
            f"{what}: no attention out-projection (a linear layer {width} -> {hidden}) in or beside "
            f"{type(inner[attention]).__name__}"
        )
    out_proj = outs[-1]

    experts = [p for p in inner if p.rpartition(".")[2] == "experts" and not _inside(p, attention)]
    if experts:
        moe_block = experts[0].rpartition(".")[0]
        if not moe_block:
            raise InputError(
                f"{what}: its experts sit directly in the block, not in a mixture-of-experts block"
            )
        routers = [
            p
            for p, m in inner.items()
            if p.rpartition(".")[0] == moe_block
            and p != experts[0]
            and (_linear_dims(m) is not None or any(w.dim() == 2 for w in m.parameters(recurse=False)))
        ]
        moe = MoELayout(block=moe_block, experts=experts[0], router=routers[0] if routers else None)
        return ModelLayout(
            layers=layers,
            embed=embed,
            final_norm=final_norm,
            head=head,
            attention=attention,
            out_proj=out_proj,
            mlp=moe_block,
            ffn=0,
            gated=True,
            learned_positions=_learned_positions(modules, embed_module, ids, layers),
            attention_interface=interface,
            moe=moe,
        )

    outside = [(p, d) for p, d in linears if not _inside(p, attention) and p != out_proj]
    downs = [p for p, d in outside if d[1] == hidden]
    if not downs:
        raise InputError(
            f"{what}: no MLP down projection (a linear layer to {hidden} outside the attention) in "
            f"{type(block).__name__}"
        )
    down = downs[-1]
    ffn = dict(linears)[down][0]
    ups = sum(d[1] for p, d in outside if d[0] == hidden and p != down)
    mlp_parent = down.rpartition(".")[0]
    holds_norm = any(_is_norm(m) for p, m in inner.items() if mlp_parent and _inside(p, mlp_parent))
    mlp = mlp_parent if mlp_parent and not _inside(attention, mlp_parent) and not holds_norm else down
    return ModelLayout(
        layers=layers,
        embed=embed,
        final_norm=final_norm,
        head=head,
        attention=attention,
        out_proj=out_proj,
        mlp=mlp,
        ffn=ffn,
        gated=ups == 2 * ffn,
        learned_positions=_learned_positions(modules, embed_module, ids, layers),
        attention_interface=interface,
    )


def _final_norm(model: Any, modules: dict[str, Any], layers: str, head: str) -> str | None:
    """The last norm outside the blocks and the head that runs after the last block, in a forward of the
    meta model (registration order differs: OPT registers its final norm before its blocks, BLOOM registers
    the embedding norm there)."""
    import torch

    head_owner = head.rpartition(".")[0]  # BERT's cls.predictions: its transform norm is the head's own
    candidates = {
        path: m
        for path, m in modules.items()
        if path
        and _is_norm(m)
        and not _inside(path, layers)
        and not _inside(path, head)
        and not (head_owner and _inside(path, head_owner))
    }
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, p=p: order.append(p)) for p, m in candidates.items()]
    last = modules[layers][-1]
    handles.append(last.register_forward_hook(lambda *_: order.append("")))
    try:
        ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
        with torch.no_grad():
            model(input_ids=ids)
    except Exception:  # a model whose meta forward fails has its norms found by the trace's checks instead
        return None
    finally:
        for handle in handles:
            handle.remove()
    after = order[order.index("") + 1 :] if "" in order else []
    return after[-1] if after else None


def _learned_positions(modules: dict[str, Any], embed: Any, ids: dict[int, str], layers: str) -> bool:
    """Whether a position table sits beside the token embedding: an Embedding that is not the token
    embedding and not inside the blocks, with more rows than a token-type table (2 or a few)."""
    import torch

    return any(
        isinstance(m, torch.nn.Embedding)
        and m is not embed
        and not _inside(p, layers)
        and m.num_embeddings > 16
        for p, m in modules.items()
    )
