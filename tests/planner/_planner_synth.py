"""Synthetic, torch-free inputs for planner tests: model facts and resolved methods written as numbers."""

from __future__ import annotations

from gkd.planner.facts import ModelFacts
from gkd.planner.pipeline import MethodsView, TermView


def facts(
    name: str = "m",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 256,
    seq: int = 32,
    params: int | None = None,
    saved: int = 10_000,
    checkpoint: int = 1_000,
    workspace: int = 3_000,
) -> ModelFacts:
    """Per-sequence activation bytes given directly; parameters from a simple transformer count."""
    layer_params = 12 * hidden * hidden
    total = params if params is not None else layers * layer_params + vocab * hidden
    tap = seq * hidden * 2
    return ModelFacts(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=vocab,
        tied_embeddings=True,
        params=total,
        layer_params=layer_params,
        largest_module=max(vocab * hidden, 4 * hidden * hidden),
        persistent_params=layers * 4 * hidden,
        head_params=vocab * hidden,
        seq_len=seq,
        saved={"sdpa": saved, "eager": saved * 2},
        checkpoint=checkpoint,
        forward_workspace={"sdpa": workspace, "eager": workspace * 2},
        backward_workspace={"sdpa": workspace + tap, "eager": 2 * workspace + tap},
        embed_saved=tap,
        saved_kinds={"sdpa": ("q", "k", "v", "context"), "eager": ("context", "probs")},
        tap_bytes={
            "emb": tap,
            "hidden": tap,
            "final": tap,
            "context": tap,
            "mlp_out": tap,
            "q": tap,
            "k": tap,
            "v": tap,
            "scores": heads * seq * seq * 2,
            "probs": heads * seq * seq * 2,
            "logits": seq * vocab * 2,
        },
        source="synthetic",
    )


def kd_minilm(teacher_layers: int = 4, student_layers: int = 2, *, fused: bool = False) -> MethodsView:
    """kd (soft + hard) on logits and a minilmv2-like relation term on the last layers' q/k/v."""
    t, s = teacher_layers - 1, student_layers - 1
    rel = (f"s:q[{s}]", f"t0:q[{t}]", f"s:k[{s}]", f"t0:k[{t}]", f"s:v[{s}]", f"t0:v[{t}]")
    return MethodsView(
        teacher_taps=(frozenset({"logits", f"q[{t}]", f"k[{t}]", f"v[{t}]"}),),
        student_taps=frozenset({"logits", f"q[{s}]", f"k[{s}]", f"v[{s}]"}),
        loss_terms=(
            TermView(
                method="kd",
                name="soft",
                kernel="fused_linear_kd_loss" if fused else "kd_loss",
                weight=1.0,
                taps=("s:logits", "t0:logits"),
                hard=False,
            ),
            TermView(
                method="minilmv2",
                name="relations",
                kernel="relation_kl_loss",
                weight=1.0,
                taps=rel,
                hard=False,
            ),
        ),
        extras=(),
        fused_linear=fused,
        offline_ok=False,
        needs_teacher_forward=True,
        eager_attention=False,
    )


def kd_only() -> MethodsView:
    return MethodsView(
        teacher_taps=(frozenset({"logits"}),),
        student_taps=frozenset({"logits"}),
        loss_terms=(
            TermView(
                method="kd",
                name="soft",
                kernel="kd_loss",
                weight=1.0,
                taps=("s:logits", "t0:logits"),
                hard=False,
            ),
        ),
        extras=(),
        fused_linear=False,
        offline_ok=True,
        needs_teacher_forward=True,
        eager_attention=False,
    )


def hidden_uniform(teacher_layers: int = 4, student_layers: int = 2) -> MethodsView:
    """A hidden-state term per student layer (uniform mapping), with projections as extras."""
    terms = []
    t_taps, s_taps = set(), set()
    for j in range(1, student_layers + 1):
        tj = j * teacher_layers // student_layers
        t_taps.add(f"hidden[{tj}]")
        s_taps.add(f"hidden[{j}]")
        terms.append(
            TermView(
                method="hidden_mse",
                name=f"loss{j}",
                kernel="hidden_loss",
                weight=1.0,
                taps=(f"s:hidden[{j}]", f"t0:hidden[{tj}]"),
                hard=False,
            )
        )
    return MethodsView(
        teacher_taps=(frozenset(t_taps),),
        student_taps=frozenset(s_taps),
        loss_terms=tuple(terms),
        extras=(("hidden_mse.proj", 1000),),
        fused_linear=False,
        offline_ok=False,
        needs_teacher_forward=True,
        eager_attention=False,
    )
