"""Shared helpers for method tests (`from method_checks import ...`; fixtures in conftest.py).

Every method is tested the same two ways:

(a) `run_formula(methods, ...)`: resolve the methods for tiny teacher/student specs, fill every requested tap
    with small random float64 tensors of the contract's shapes, run `DistillLoss` (in float64) and return a
    `FormulaCase`; the test recomputes the paper's formula from `case.student` / `case.teachers` with its own
    straightforward code and compares with `assert_rel` (1e-6 relative).
(b) `check_backward(methods, ...)`: build the tiny real models (gkd.models.build_model), capture exactly the
    resolved taps with `gkd.runtime.capture.capture_taps` (teacher under no_grad), run the loss and backward,
    and check that the student and every extra get gradients and the teacher none.

Both accept the same `methods` list as a config (`[{"name": ..., "weight": ..., "options": {...}}]` or names),
a `family` ("llama", "gpt2", "bert") and `teachers` (1 or 2; the second teacher differs in depth and width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gkd.methods import DistillLoss, ResolvedMethods, resolve
from gkd.methods.combine import LossOutput
from gkd.models import ModelSpec, build_model, resolve_model, spec_from_config
from gkd.runtime.capture import capture_taps, parse_tap

FAMILIES = ("llama", "gpt2", "bert")


def second_teacher(family: str) -> ModelSpec:
    """A teacher of a different size from tiny-<family>-teacher: 3 layers, hidden 48, ffn 96."""
    base = resolve_model(f"tiny-{family}-teacher")
    cfg = dict(base.hf_config)
    if cfg["model_type"] == "gpt2":
        cfg.update(n_layer=3, n_embd=48, n_inner=96)
    else:
        cfg.update(num_hidden_layers=3, hidden_size=48, intermediate_size=96)
        if "head_dim" in cfg:
            cfg["head_dim"] = 12
    return spec_from_config(cfg, name=f"tiny-{family}-teacher-b", dtype="float32")


def model_specs(family: str = "llama", teachers: int = 1) -> tuple[list[ModelSpec], ModelSpec]:
    """Tiny teacher spec(s) and the student spec of a family."""
    t = [resolve_model(f"tiny-{family}-teacher")]
    if teachers >= 2:
        t.append(second_teacher(family))
    return t, resolve_model(f"tiny-{family}-student")


MOE_CONFIG: dict[str, Any] = {
    "model_type": "mixtral",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def moe_spec(layers: int, hidden: int, experts: int = 4) -> ModelSpec:
    """A tiny Mixtral-shaped mixture-of-experts model (FFN 2 x hidden per expert)."""
    config = MOE_CONFIG | {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
    }
    config["num_local_experts"] = experts
    return spec_from_config(config, name=f"tiny-moe-{layers}x{hidden}-{experts}", dtype="float32")


def moe_specs() -> tuple[list[ModelSpec], ModelSpec]:
    """A tiny mixture-of-experts teacher (4 layers, hidden 64) and student (2 layers, hidden 32), 4 experts
    each, for methods that read routers (router_kl)."""
    return [moe_spec(4, 64)], moe_spec(2, 32)


def truncated_teacher_specs(family: str = "llama", layers: int = 2) -> tuple[list[ModelSpec], ModelSpec]:
    """tiny-<family>-teacher and a student of the same width with `layers` layers (a truncated teacher), for
    methods that need equal hidden sizes and head counts (Theseus, DIITO, PKD, ...)."""
    base = resolve_model(f"tiny-{family}-teacher")
    cfg = dict(base.hf_config)
    cfg["n_layer" if cfg["model_type"] == "gpt2" else "num_hidden_layers"] = layers
    return [base], spec_from_config(cfg, name=f"tiny-{family}-truncated", dtype="float32")


def tap_shape(name: str, spec: ModelSpec, batch: int, seq: int) -> tuple[int, ...]:
    """The contract's shape of tap `name` for a model."""
    kind, _ = parse_tap(name)
    if kind == "logits":
        return (batch, seq, spec.vocab)
    if kind == "q":
        return (batch, spec.heads, seq, spec.head_dim)
    if kind in ("k", "v"):
        return (batch, spec.kv_heads, seq, spec.head_dim)
    if kind in ("scores", "probs"):
        return (batch, spec.heads, seq, seq)
    if kind == "context":
        return (batch, seq, spec.heads * spec.head_dim)
    if kind == "router_logits":
        from gkd.planner.moe import config_experts

        return (batch, seq, config_experts(spec))
    return (batch, seq, spec.hidden)


def random_taps(
    names: frozenset[str],
    spec: ModelSpec,
    batch: int,
    seq: int,
    gen: torch.Generator,
    *,
    requires_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Random float64 tensors for `names`; probs rows are softmax-normalised; a stored `topk` tap gets the
    top-TOPK_WIDTH entries of random teacher logits (what the offline teacher pass writes)."""
    out: dict[str, Any] = {}
    for name in sorted(names):
        if name == "topk":
            logits = torch.randn((batch, seq, spec.vocab), generator=gen, dtype=torch.float64)
            out[name] = stored_topk(logits)
            continue
        x = torch.randn(tap_shape(name, spec, batch, seq), generator=gen, dtype=torch.float64)
        if name.startswith("probs"):
            x = x.softmax(-1)
        out[name] = x.requires_grad_(requires_grad)
    return out


TOPK_WIDTH = 8  # k of the stored top-k teacher entries in tests


def stored_topk(teacher_logits: torch.Tensor, k: int = TOPK_WIDTH) -> Any:
    """The stored top-k of teacher logits at T = 1, as the offline teacher pass writes it."""
    from gkd.methods.divergence import topk_targets

    target = topk_targets(teacher_logits, k)
    return type(target)(target.indices, target.logprobs.to(teacher_logits.dtype))


def make_batch(
    student: ModelSpec, batch: int, seq: int, gen: torch.Generator, *, pad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, mask (bool, True = real token), labels): the last row has 2 padding tokens when `pad`.

    Labels: causal LM -> the input ids (-100 at padding); MLM -> ids at every other real position, -100
    elsewhere.
    """
    ids = torch.randint(0, student.vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if pad:
        mask[-1, seq - 2 :] = False
    labels = ids.masked_fill(~mask, -100)
    if student.is_encoder:
        labels[:, 1::2] = -100
    return ids, mask, labels


@dataclass
class FormulaCase:
    resolved: ResolvedMethods
    student: dict[str, torch.Tensor]
    teachers: list[dict[str, torch.Tensor]]
    mask: torch.Tensor
    labels: torch.Tensor
    loss: DistillLoss
    out: LossOutput
    student_spec: ModelSpec
    teacher_specs: list[ModelSpec]

    def term(self, key: str) -> torch.Tensor:
        """The weighted value of term "<method>.<term>" as DistillLoss computed it."""
        return self.out.terms[key]


def run_formula(
    methods: list[Any],
    *,
    family: str = "llama",
    teachers: int = 1,
    batch: int = 2,
    seq: int = 5,
    step: int = 0,
    total_steps: int = 0,
    seed: int = 0,
    pad: bool = True,
    specs: tuple[list[ModelSpec], ModelSpec] | None = None,
    aux: dict[str, Any] | None = None,
) -> FormulaCase:
    """Resolve `methods`, fill the taps with random float64 tensors, evaluate the loss (see module doc).

    `specs` replaces the family's tiny (teachers, student) pair, as in `check_backward`; `aux` is passed to
    the loss as is (e.g. {"batch": {"phrase_spans": ...}})."""
    t_specs, s_spec = specs if specs is not None else model_specs(family, teachers)
    resolved = resolve(methods, t_specs, s_spec, step=step, total_steps=total_steps, fused_linear=False)
    gen = torch.Generator().manual_seed(seed)
    student = random_taps(resolved.student_taps, s_spec, batch, seq, gen)
    teacher = [
        random_taps(n, spec, batch, seq, gen) for n, spec in zip(resolved.teacher_taps, t_specs, strict=True)
    ]
    _, mask, labels = make_batch(s_spec, batch, seq, gen, pad=pad)
    torch.manual_seed(seed)
    loss = DistillLoss(resolved, t_specs, s_spec).double()
    out = loss(student, teacher, labels=labels, mask=mask, step=step, total_steps=total_steps, aux=aux)
    return FormulaCase(
        resolved=resolved,
        student=student,
        teachers=teacher,
        mask=mask,
        labels=labels,
        loss=loss,
        out=out,
        student_spec=s_spec,
        teacher_specs=t_specs,
    )


def assert_rel(actual: torch.Tensor | float, expected: torch.Tensor | float, rtol: float = 1e-6) -> None:
    """|actual - expected| <= rtol * |expected| (plus 1e-12 absolute for values at zero), reporting both."""
    a = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    e = float(expected.detach()) if isinstance(expected, torch.Tensor) else float(expected)
    assert abs(a - e) <= rtol * abs(e) + 1e-12, (
        f"got {a!r}, expected {e!r} (relative error {abs(a - e) / max(abs(e), 1e-300):.3g})"
    )


def check_backward(
    methods: list[Any],
    *,
    family: str = "llama",
    teachers: int = 1,
    batch: int = 2,
    seq: int = 6,
    step: int = 0,
    total_steps: int = 0,
    seed: int = 0,
    fused_linear: bool = False,
    specs: tuple[list[ModelSpec], ModelSpec] | None = None,
    gradient_checkpointing: bool = False,
    batch_extras: dict[str, Any] | None = None,
) -> LossOutput:
    """Forward + backward on tiny random models through the real tap capture (see the module docstring).

    The step runs through `gkd.runtime.step.distill_step`, so hook ops (Theseus, DIITO, LRC-BERT) are
    honoured. `specs` replaces the family's tiny (teachers, student) pair (e.g. equal widths for Theseus);
    `gradient_checkpointing` enables activation checkpointing on the student; `batch_extras` adds fields to
    the batch (e.g. "phrase_spans").
    """
    from gkd.runtime.step import distill_step

    t_specs, s_spec = specs if specs is not None else model_specs(family, teachers)
    resolved = resolve(
        methods, t_specs, s_spec, step=step, total_steps=total_steps, fused_linear=fused_linear
    )
    torch.manual_seed(seed)
    student = build_model(s_spec, device="cpu").train()
    if gradient_checkpointing:
        student.gradient_checkpointing_enable()
    teacher_models = [build_model(spec, device="cpu").eval() for spec in t_specs]
    gen = torch.Generator().manual_seed(seed)
    ids, mask, labels = make_batch(s_spec, batch, seq, gen)
    # A stored `topk` tap is written by an offline teacher pass: emulate it from the teacher's logits.
    stored: list[dict[str, Any]] = []
    for model, names in zip(teacher_models, resolved.teacher_taps, strict=True):
        entry: dict[str, Any] = {}
        if "topk" in names:
            with torch.no_grad(), capture_taps(model, {"logits"}) as taps:
                model(input_ids=ids, attention_mask=mask.long())
            entry["topk"] = stored_topk(taps["logits"])
        stored.append(entry)
    loss = DistillLoss(resolved, t_specs, s_spec)
    out = distill_step(
        student,
        teacher_models,
        loss,
        {"input_ids": ids, "attention_mask": mask, "labels": labels, **(batch_extras or {})},
        resolved,
        step=step,
        total_steps=total_steps,
        stored_teacher_taps=stored,
    )
    assert torch.isfinite(out.total), out.terms
    out.total.backward()
    embed = student.get_input_embeddings().weight
    assert embed.grad is not None and embed.grad.abs().sum() > 0, "no gradient reached the student embeddings"
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached extra {name}"
    for model in teacher_models:
        for name, p in model.named_parameters():
            assert p.grad is None, f"teacher parameter {name} got a gradient"
    return out


def check_combination(
    methods: list[Any],
    *,
    family: str = "llama",
    teachers: int = 1,
    batch: int = 2,
    seq: int = 5,
    seed: int = 0,
) -> FormulaCase:
    """Combined methods capture the union of their taps once and their loss is the weighted sum of each alone.

    Each method is resolved alone, evaluated on the same random tap tensors with the same extras (copied from
    the combined DistillLoss); every term must equal its value alone (1e-12 relative: the same operations) and
    the total must equal the sum of the terms alone. Kernels return float32 scalars, so totals are compared as
    float64 sums of the terms (1e-12), and the combined total, which adds float32 terms in its own order, at
    1e-6.
    """
    case = run_formula(methods, family=family, teachers=teachers, batch=batch, seq=seq, seed=seed)
    total = torch.zeros((), dtype=torch.float64)
    terms_alone: dict[str, torch.Tensor] = {}
    union_s: set[str] = set()
    union_t: list[set[str]] = [set() for _ in case.teacher_specs]
    for entry in methods:
        alone = resolve([entry], case.teacher_specs, case.student_spec, fused_linear=False)
        union_s |= alone.student_taps
        for i, names in enumerate(alone.teacher_taps):
            union_t[i] |= names
        loss = DistillLoss(alone, case.teacher_specs, case.student_spec).double()
        name = entry if isinstance(entry, str) else entry["name"]
        if name in case.loss.extras:
            loss.extras[name].load_state_dict(case.loss.extras[name].state_dict())
        student = {k: case.student[k] for k in alone.student_taps}
        teachers_ = [
            {k: t[k] for k in names} for t, names in zip(case.teachers, alone.teacher_taps, strict=True)
        ]
        out = loss(student, teachers_, labels=case.labels, mask=case.mask)
        terms_alone.update(out.terms)
        total = total + sum((v.double() for v in out.terms.values()), torch.zeros((), dtype=torch.float64))
    assert case.resolved.student_taps == union_s
    assert [set(t) for t in case.resolved.teacher_taps] == union_t
    assert set(case.out.terms) == set(terms_alone)
    for key, value in case.out.terms.items():
        assert_rel(value, terms_alone[key], rtol=1e-12)
    combined = sum((v.double() for v in case.out.terms.values()), torch.zeros((), dtype=torch.float64))
    assert_rel(combined, total, rtol=1e-12)
    assert_rel(case.out.total, total, rtol=1e-6)
    return case
