"""Contrastive and causal (interchange) methods with their hook ops: LRC-BERT (Fu et al., AAAI 2021) and
DIITO (Wu et al., NAACL 2022).

LRC-BERT. Mapped intermediate layers (uniform over student depths 1..Ls-1) and the final hidden states are
compared by the COS-NCE contrastive loss, the other samples of the batch being the K = B - 1 negatives. For
one layer pair, with the student states projected to the teacher width (S_i = W h^S_i, a bias-free
Linear(Ds -> Dt) per pair) and T_j the teacher's states of sample j:

    g(S_i, T_j) = 1 - mean_p cos(S_i[p], T_j[p])      angular distance in [0, 2], p over the positions real
                                                       in both samples
    L_CN(i) = g(S_i, T_i) + (2K - sum_{j != i} [g(S_i, T_j) - g(S_i, T_i)]) / (2K)

which is the paper's equation (1) with the teacher's representations of the other samples as the negatives
n_j: the distance to the teacher's representation of the same sample is pulled to 0, and each negative's
distance is pushed above the positive's (the bracket lies in [-2, 2], so the second term in [0, 2]). The
layer loss is the mean of L_CN(i) over the batch; the COS-NCE loss is the sum over the layer pairs
(intermediate pairs plus `final`). A batch needs at least 2 samples.

Provenance. The paper's own text (arXiv 2012.07335) was not available here. Equation (1) as written above is
what two independent implementations compute: the reference system (aitsc/GLMKD, distill/distill_model.py,
class `LRC_BERT`: `1 - (st_g.sum(-1) - st_g_diag * B) / (B - 1) / 2 + st_g_diag`, whose row sum includes
the positive once, so the bracket subtracts the positive once per negative), and a public reimplementation
that follows the paper's notation and labels the line "formula (1)" (`(2K - (sum_k g(n_k, z^S) - K g(z^T,
z^S))) / (2K) + g(z^T, z^S)`, with [CLS] vectors and a memory bank of K negatives). gkd follows the reference
system in what is pooled and where negatives come from: g = 1 - cos averaged over positions, the other
samples of the batch as negatives, a bias-free Linear(Ds -> Dt) on the student side, the student's layers
1..Ls-1 against the uniformly mapped teacher layers plus the final states. Two choices differ from its code:
(1) it concatenates the layers and averages the cosine over layers and positions at once, then multiplies the
loss by the number of layers; because L_CN is linear in g this equals the sum of the per-layer losses used
here whenever the masks are full; (2) it averages over padding positions too, which here never count. Its
`--lrc_bert_gather_dp` (negatives gathered across data-parallel ranks) has no counterpart: the negatives are
the other samples of the micro-batch, so small micro-batches, gradient accumulation and data parallelism all
mean fewer negatives.

Gradient perturbation (hook op `lrc_gradient_perturbation`): each step first runs a clean student forward and
takes the gradient g = dL/de of its full loss L with respect to the embedding output e (the input of layer 0);
no parameter receives that gradient. The main forward then runs on e' = e + g / ||g||_2, the norm taken over
the hidden dimension of each token (zero-gradient positions such as padding stay unchanged); its loss is the
step's loss. This is the reference system's recipe (`--lrc_bert_gard_perturb --ignore_first_backward_gard
--forward_repeat_num=1`: the clean pass's parameter gradients are discarded; F.normalize(grad, p=2, dim=-1) of
the embedding output is added in the second pass, skipped when the gradient has an inf or NaN). Stages: plain
pretraining without the teacher (selected with `stage: pretrain`; no perturbation), contrastive finetuning
(COS-NCE only), then COS-NCE + soft KL(T=1.1) x T^2 + 3 x hard.

DIITO. Pass 1: soft KL x T^2 at T = 2, the MLM / causal-LM loss, and the cosine embedding loss between final
hidden states of real tokens (0.25 each; DistilBERT's triple). Pass 2, an interchange intervention (hook op
`diito_interchange`): each step draws one student depth d in 1..Ls; its aligned teacher depths are the block
(d-1)*Lt//Ls + 1 .. d*Lt//Ls. For each example b the source is example (b + 1) mod B (the batch rolled by
one), and a span of int(0.3 * min(len_b, len_src)) consecutive real tokens of b, at a random start, receives
the states of an equally long span of the source at its own random start. The source states are those recorded
at the same layers in pass 1 (the student's keep their gradients). Teacher and student both run pass 2 with
their interventions, and the causal loss is KL(teacher || student) x T^2 at T = 2 on the counterfactual
logits over real tokens, weighted 0.25.

DIITO and activation checkpointing: the interventions are forward hooks on whole transformer layers, which
run outside the checkpointed `forward` (transformers checkpoints `forward`, not `__call__`), and the recorded
source states are layer outputs, ordinary autograd tensors outside any checkpointed region. The recompute in
the backward pass replays each checkpointed layer on its (already intervened) input, so the gradients equal
those without checkpointing (tested with `gradient_checkpointing_enable()`, reentrant or not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.hooks import HookOpBase, layer_output, register_hook_op, replace_layer_output
from gkd.methods.losses import LossContext, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import (
    ExtraSpec,
    HookOpSpec,
    LayerRule,
    LossTermSpec,
    MethodSpec,
    OptionSpec,
    StageSpec,
    TapSpec,
)

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
else:
    torch = lazy_import("torch")
    F = lazy_import("torch.nn.functional")

# LRC-BERT ----------------------------------------------------------------------------------------------


def cos_nce(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """COS-NCE of one layer pair: student (B, T, D) already projected, teacher (B, T, D); mask (B, T) bool."""
    b = student.shape[0]
    if b < 2:
        raise InputError(
            "lrc_bert's COS-NCE loss uses the other samples of the batch as negatives: "
            "use a micro-batch of at least 2"
        )
    if mask is None:
        mask = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.to(student.dtype), dim=-1)
    cos = torch.einsum("ipd,jpd->ijp", s, t)  # (B, B, T): sample i of the student vs sample j of the teacher
    both = (mask[:, None, :] & mask[None, :, :]).to(cos.dtype)
    g = 1 - (cos * both).sum(-1) / both.sum(-1).clamp(min=1)  # (B, B) angular distances
    positive = g.diagonal()
    k = b - 1
    margins = g.sum(-1) - positive - k * positive  # sum over the K negatives of g(S_i, T_j) - g(S_i, T_i)
    return (positive + (2 * k - margins) / (2 * k)).mean()


@register_loss("lrc_bert.cos_nce")
def lrc_bert_cos_nce(ctx: LossContext) -> Tensor:
    total = cos_nce(ctx.extra("proj_final")(ctx.s("final")), ctx.t("final"), ctx.mask)
    for n, (s_depth, t_depth) in enumerate(ctx.layer_pairs("hidden")):
        proj = ctx.extra("proj", ctx.pair_index("hidden", n))
        total = total + cos_nce(proj(ctx.s("hidden", s_depth)), ctx.t("hidden", t_depth), ctx.mask)
    return total


@register_hook_op("lrc_gradient_perturbation")
class GradientPerturbation(HookOpBase):
    """LRC-BERT's gradient perturbation (see the module docstring): a clean forward whose normalised
    embedding gradient is added to the embedding output of the main forward."""

    def __init__(self, *, perturb: bool = True, **options: Any) -> None:
        super().__init__(**options)
        # Off in stages without the teacher (plain pretraining).
        self.enabled = bool(perturb) and (self.method is None or self.method.teacher)
        self.recorded: Tensor | None = None
        self.delta: Tensor | None = None
        self.recording = False

    def install(
        self, student: nn.Module, teachers: list[nn.Module], *, step: int, total_steps: int
    ) -> AbstractContextManager[None]:
        if not self.enabled:
            return self._nothing()
        from gkd.runtime.capture import transformer_layers

        return self._hooked(transformer_layers(student)[0])

    @contextmanager
    def _hooked(self, first_layer: nn.Module) -> Iterator[None]:
        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            if self.recording:
                self.recorded = x
                return None
            if self.delta is None:
                return None
            x = x + self.delta.to(x.dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        handle = first_layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.recorded = self.delta = None

    def before_forward(self, runner: Any) -> None:
        if not self.enabled:
            return
        self.recording = True
        try:
            taps = runner.run_student(runner.resolved.student_taps)
        finally:
            self.recording = False
        emb = self.recorded
        self.recorded = None
        if emb is None or not emb.requires_grad:
            return
        loss = runner.loss(taps).total
        if not loss.requires_grad:
            return
        (grad,) = torch.autograd.grad(loss, emb, allow_unused=True)
        if grad is None or not torch.isfinite(grad).all():
            return  # e.g. an fp16 overflow: run the main forward unperturbed
        self.delta = F.normalize(grad.detach(), p=2, dim=-1)


_INTERMEDIATE = LayerRule(kind="uniform", drop_last=True)

LRC_BERT = register(
    MethodSpec(
        name="lrc_bert",
        title="LRC-BERT: latent-representation contrastive distillation",
        paper="Fu et al. LRC-BERT: Latent-representation Contrastive Knowledge Distillation for Natural "
        "Language Understanding. AAAI",
        year=2021,
        taps=(
            TapSpec(kind="hidden", layers=_INTERMEDIATE),
            TapSpec(kind="final"),
            TapSpec(kind="logits"),
        ),
        terms=(
            LossTermSpec(
                name="cos_nce",
                fn="lrc_bert.cos_nce",
                taps=("hidden", "final"),
                weight_option="alpha",
            ),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.1,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        extras=(
            ExtraSpec(
                name="proj",
                in_dim="student.hidden",
                out_dim="teacher.hidden",
                bias=False,
                per="pair",
                pair_tap="hidden",
            ),
            ExtraSpec(name="proj_final", in_dim="student.hidden", out_dim="teacher.hidden", bias=False),
        ),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.0,
                terms=("hard",),
                teacher=False,
                train="student",
                description="plain pretraining of the student, no teacher (a separate run: stage: pretrain)",
            ),
            StageSpec(
                name="contrastive",
                fraction=0.5,
                terms=("cos_nce",),
                description="COS-NCE on the intermediate layers only, with gradient perturbation",
            ),
            StageSpec(
                name="full",
                fraction=0.5,
                terms=("cos_nce", "soft", "hard"),
                description="COS-NCE + soft KL (T=1.1) + 3 x hard, with gradient perturbation",
            ),
        ),
        hook_ops=(HookOpSpec(op="lrc_gradient_perturbation", extra_forwards=1),),
        options=(
            OptionSpec(name="alpha", default=1.0, doc="weight of the COS-NCE loss"),
            OptionSpec(name="soft", default="kl", doc="soft loss: kl (x T^2), soft_ce or mse"),
            OptionSpec(name="soft_rate", default=1.0, doc="weight of the soft loss (full stage)"),
            OptionSpec(name="hard_rate", default=3.0, doc="weight of the hard loss"),
            OptionSpec(name="perturb", default=True, doc="gradient perturbation (a second forward per step)"),
        ),
        description="COS-NCE contrastive loss with in-batch negatives on mapped layers and final hidden "
        "states, through Linear(Ds -> Dt); gradient perturbation of the embeddings.",
    )
)

# DIITO -------------------------------------------------------------------------------------------------


@register_loss("diito.cosine")
def diito_cosine(ctx: LossContext) -> Tensor:
    """Cosine embedding loss 1 - cos(h_s, h_t) on the final hidden states, averaged over real tokens."""
    from gkd.kernels import hidden_loss

    return hidden_loss(ctx.s("final"), ctx.t("final"), kind="cosine", mask=ctx.mask)


@register_loss("diito.causal")
def diito_causal(ctx: LossContext) -> Tensor:
    """KL(teacher || student) x T^2 on the logits of the interchange pass (pass 2), over real tokens."""
    from gkd.kernels import kd_loss

    passes = ctx.aux.get("diito_interchange")
    if passes is None:
        raise RuntimeError(
            "diito's causal loss needs the interchange pass; "
            "run the step through gkd.runtime.step.distill_step"
        )
    s, t = passes["student"]["logits"], passes["teachers"][ctx.teacher]["logits"]
    temp = ctx.temperature
    return kd_loss(s, t, divergence="fkl", temperature=temp, mask=ctx.mask) * temp**2


def interchange_positions(mask: Tensor, prop: float, rng: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where pass 2 swaps states: (base rows, base positions, source rows, source positions), flat, aligned.

    For each example b the source is (b + 1) mod B; count = int(prop * min(real tokens of b, of the source));
    a random start within b's real tokens and another within the source's give the two spans (real tokens are
    taken in order, so left and right padding both work).
    """
    b_size = mask.shape[0]
    rows, pos, src_rows, src_pos = [], [], [], []
    for b in range(b_size):
        src = (b + 1) % b_size
        real_b = mask[b].nonzero().flatten().tolist()
        real_s = mask[src].nonzero().flatten().tolist()
        count = int(prop * min(len(real_b), len(real_s)))
        if count == 0:
            continue
        start = rng.randint(0, len(real_b) - count)
        src_start = rng.randint(0, len(real_s) - count)
        rows += [b] * count
        pos += real_b[start : start + count]
        src_rows += [src] * count
        src_pos += real_s[src_start : src_start + count]
    as_t = [torch.tensor(x, dtype=torch.long, device=mask.device) for x in (rows, pos, src_rows, src_pos)]
    return as_t[0], as_t[1], as_t[2], as_t[3]


def interchange(states: Tensor, source: Tensor, where: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """`states` with the positions `where` selects replaced by the source states (out of place, differentiable
    with respect to both)."""
    rows, pos, src_rows, src_pos = where
    if rows.numel() == 0:
        return states
    return states.index_put((rows, pos), source[src_rows, src_pos].to(states.dtype))


@register_hook_op("diito_interchange")
class DiitoInterchange(HookOpBase):
    """DIITO's interchange intervention (see the module docstring)."""

    def __init__(self, *, interchange_prop: float = 0.3, **options: Any) -> None:
        super().__init__(**options)
        if not 0.0 <= interchange_prop <= 1.0:
            raise InputError(f"diito interchange_prop must be in [0, 1], got {interchange_prop}")
        self.prop = float(interchange_prop)
        self.enabled = self.method is None or "causal" in self.method.terms
        self.phase = "off"  # "record" during pass 1, "intervene" during pass 2
        # (model: 0 = student, i = teacher i - 1; depth) -> the states recorded in pass 1
        self.clean: dict[tuple[int, int], Tensor] = {}
        self.where: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.step = 0
        self.student_depth = 0
        self.teacher_depths: list[list[int]] = []

    def install(
        self, student: nn.Module, teachers: list[nn.Module], *, step: int, total_steps: int
    ) -> AbstractContextManager[None]:
        if not self.enabled:
            return self._nothing()
        from gkd.runtime.capture import transformer_layers

        self.step = step
        s_layers = transformer_layers(student)
        ls = len(s_layers)
        d = self.rng(step).randint(1, ls)
        self.student_depth = d
        sites: list[tuple[int, int, nn.Module]] = [(0, d, s_layers[d - 1])]
        self.teacher_depths = []
        for i, teacher in enumerate(teachers, start=1):
            t_layers = transformer_layers(teacher)
            lt = len(t_layers)
            # the teacher block aligned with student depth d; a shallower teacher gets its nearest depth
            depths = list(range((d - 1) * lt // ls + 1, d * lt // ls + 1)) or [max(d * lt // ls, 1)]
            self.teacher_depths.append(depths)
            sites += [(i, t, t_layers[t - 1]) for t in depths]
        return self._hooked(sites)

    @contextmanager
    def _hooked(self, sites: list[tuple[int, int, nn.Module]]) -> Iterator[None]:
        handles = [layer.register_forward_hook(self._hook(m, d)) for m, d, layer in sites]
        self.phase = "record"
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.phase = "off"
            self.clean = {}
            self.where = None

    def _hook(self, model: int, depth: int) -> Callable[..., Any]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
            if self.phase == "record":
                self.clean[(model, depth)] = layer_output(output)
                return None
            if self.phase == "intervene" and self.where is not None:
                states = layer_output(output)
                return replace_layer_output(
                    output, interchange(states, self.clean[(model, depth)], self.where)
                )
            return None

        return hook

    def extra_forward(self, runner: Any) -> Mapping[str, Any] | None:
        if not self.enabled:
            return None
        missing = [k for k in [(0, self.student_depth)] if k not in self.clean]
        if missing:
            raise RuntimeError("diito: pass 1 did not record the states to interchange")
        self.where = interchange_positions(runner.mask, self.prop, self.rng(self.step, salt=1))
        self.phase = "intervene"
        try:
            teachers = [runner.run_teacher(i, {"logits"}) for i in range(len(runner.teachers))]
            student = runner.run_student({"logits"})
        finally:
            self.phase = "off"
        return {"student": student, "teachers": teachers, "depth": self.student_depth}


DIITO = register(
    MethodSpec(
        name="diito",
        title="DIITO: causal distillation by interchange intervention training",
        paper="Wu, Geiger, Rozner, Kreiss, Lu, Icard, Potts, Goodman. "
        "Causal Distillation for Language Models. NAACL",
        year=2022,
        taps=(TapSpec(kind="logits"), TapSpec(kind="final")),
        terms=(
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=2.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
            LossTermSpec(
                name="cosine",
                fn="diito.cosine",
                kernel="hidden_loss",
                taps=("final",),
                weight_option="cos_rate",
            ),
            LossTermSpec(
                name="causal",
                fn="diito.causal",
                kernel="kd_loss",
                taps=(),
                weight_option="causal_rate",
                temperature=2.0,
            ),
        ),
        constraints=("equal_hidden", "equal_vocab"),
        stages=(
            StageSpec(
                name="pretrain_kd",
                fraction=1.0,
                terms=("soft", "hard", "cosine", "causal"),
                description="KD + LM + cosine, and the interchange pass with its causal KL",
            ),
            StageSpec(
                name="finetune",
                fraction=0.0,
                terms=("hard",),
                teacher=False,
                train="student",
                description="plain finetuning without the teacher (a separate run: stage: finetune)",
            ),
        ),
        hook_ops=(HookOpSpec(op="diito_interchange", extra_forwards=1),),
        options=(
            OptionSpec(name="soft", default="kl", doc="soft loss: kl (x T^2), soft_ce or mse"),
            OptionSpec(name="soft_rate", default=0.25, doc="weight of the soft KL (pass 1)"),
            OptionSpec(name="hard_rate", default=0.25, doc="weight of the MLM / causal-LM loss (pass 1)"),
            OptionSpec(name="cos_rate", default=0.25, doc="weight of the final-hidden cosine loss (pass 1)"),
            OptionSpec(name="causal_rate", default=0.25, doc="weight of the interchange KL (pass 2)"),
            OptionSpec(name="interchange_prop", default=0.3, doc="share of real tokens swapped per example"),
            OptionSpec(name="seed", default=0, doc="seed of the per-step layer and span draws"),
        ),
        description="Distillation plus interchange-intervention training: swapped token spans at an aligned "
        "layer in teacher and student, KL on the counterfactual outputs.",
    )
)
