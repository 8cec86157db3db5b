"""BERT-of-Theseus (Xu et al., EMNLP 2020): progressive module replacing.

The teacher's layers are split into Ls consecutive blocks ("predecessor modules"; student layer j, 0-based,
<- teacher layers j * Lt // Ls .. (j + 1) * Lt // Ls - 1), one per student layer ("successor module"). At each
training step every successor module is kept with probability p and otherwise replaced, for that step, by
its predecessor block; the replacement is drawn independently per module (Bernoulli(p)), from a generator
seeded by the `seed` option and the step. The keep probability follows the paper's linear curriculum
p(t) = min(1, p0 + (1 - p0) * t / (f * total_steps)) with p0 = `keep_rate_start` (0.3) and f =
`keep_rate_finish` (0.66): from 66% of the steps on, only the student runs. The loss is the hard (task / LM)
loss of the hybrid model only; there is no separate teacher forward and no soft loss.

The predecessor blocks are frozen: their parameters get no gradient (they are marked requires_grad=False
while the op is installed, so the autograd graph never asks for them), but gradients flow through them to
the student layers before them and to the embeddings.

Replacement is done by giving the student layer instance a `forward` that runs the teacher block (the layer's
own forward hooks, e.g. tap capture, still fire around it), so the model's layer list, its length and its
per-layer bookkeeping are never touched. Hidden sizes and head counts must match (the block receives the
student's hidden states, attention mask and rotary embeddings), and both models must be the same
architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError
from gkd.methods.hooks import HookOpBase, layer_output, register_hook_op
from gkd.methods.registry import register
from gkd.methods.spec import HookOpSpec, LossTermSpec, MethodSpec, OptionSpec, Schedule, TapSpec

if TYPE_CHECKING:
    from torch import nn


def keep_schedule(start: float, finish: float) -> Schedule:
    """The probability of keeping a student module over training progress: linear from `start` at progress 0
    to 1 at progress `finish`, then 1."""
    return Schedule(kind="linear", start=start, end=1.0, begin=0.0, finish=finish)


def teacher_blocks(student_layers: int, teacher_layers: int) -> list[range]:
    """Teacher layer indices (0-based) replacing each student layer: consecutive blocks of Lt // Ls."""
    if teacher_layers < student_layers:
        raise InputError(
            "theseus replaces each student layer by a block of teacher layers, so the teacher needs "
            f"at least as many layers as the student ({teacher_layers} < {student_layers})"
        )
    return [
        range(j * teacher_layers // student_layers, (j + 1) * teacher_layers // student_layers)
        for j in range(student_layers)
    ]


@register_hook_op("theseus_replace")
class TheseusReplace(HookOpBase):
    """Swap student layers for their teacher blocks at random (see the module docstring)."""

    def __init__(self, *, keep_rate_start: float = 0.3, keep_rate_finish: float = 0.66, **options: Any):
        super().__init__(**options)
        if not 0.0 <= keep_rate_start <= 1.0:
            raise InputError(f"theseus keep_rate_start must be in [0, 1], got {keep_rate_start}")
        if not 0.0 < keep_rate_finish <= 1.0:
            raise InputError(f"theseus keep_rate_finish must be in (0, 1], got {keep_rate_finish}")
        self.schedule = keep_schedule(keep_rate_start, keep_rate_finish)
        self.replaced: list[int] = []  # student layers replaced in the current step (for inspection)

    def keep_probability(self, step: int, total_steps: int) -> float:
        return self.schedule.at(step, total_steps)

    def draw(self, num_layers: int, step: int, total_steps: int) -> list[int]:
        """The student layers (0-based) replaced at `step`: each independently with probability 1 - p."""
        p = self.keep_probability(step, total_steps)
        rng = self.rng(step)
        return [j for j in range(num_layers) if rng.random() >= p]

    def install(
        self, student: nn.Module, teachers: list[nn.Module], *, step: int, total_steps: int
    ) -> AbstractContextManager[None]:
        from gkd.runtime.capture import transformer_layers

        if len(teachers) != 1:
            raise InputError("theseus module replacement takes exactly one teacher")
        s_layers, t_layers = transformer_layers(student), transformer_layers(teachers[0])
        if type(s_layers[0]) is not type(t_layers[0]):
            raise InputError(
                f"theseus needs teacher and student of the same architecture, got "
                f"{type(t_layers[0]).__name__} and {type(s_layers[0]).__name__}"
            )
        blocks = teacher_blocks(len(s_layers), len(t_layers))
        self.replaced = self.draw(len(s_layers), step, total_steps) if student.training else []
        return self._swap(s_layers, t_layers, blocks)

    @contextmanager
    def _swap(self, s_layers: nn.ModuleList, t_layers: nn.ModuleList, blocks: list[range]) -> Iterator[None]:
        frozen = [p for j in self.replaced for i in blocks[j] for p in t_layers[i].parameters()]
        flags = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        for j in self.replaced:
            s_layers[j].forward = _block_forward([t_layers[i] for i in blocks[j]])
        try:
            yield
        finally:
            for j in self.replaced:
                del s_layers[j].forward  # back to the class's forward
            for p, flag in zip(frozen, flags, strict=True):
                p.requires_grad_(flag)


def _block_forward(block: list[nn.Module]) -> Any:
    """A layer forward that runs a teacher block on the student layer's inputs (hidden states first, then the
    same mask / position arguments for every layer of the block) and returns the last layer's output."""

    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        out: Any = hidden_states
        for layer in block:
            out = layer(layer_output(out), *args, **kwargs)
        return out

    return forward


THESEUS = register(
    MethodSpec(
        name="theseus",
        title="BERT-of-Theseus: progressive module replacing",
        paper="Xu, Zhou, Ge, Wei, Zhou. BERT-of-Theseus: Compressing BERT by Progressive Module Replacing. "
        "EMNLP",
        year=2020,
        taps=(TapSpec(kind="logits", side="student"),),
        terms=(LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),),
        constraints=("equal_hidden", "equal_heads"),
        hook_ops=(HookOpSpec(op="theseus_replace", needs_teacher_modules=True),),
        options=(
            OptionSpec(name="hard_rate", default=1.0, doc="weight of the hard (task / LM) loss"),
            OptionSpec(
                name="keep_rate_start", default=0.3, doc="probability of keeping a student module at step 0"
            ),
            OptionSpec(
                name="keep_rate_finish",
                default=0.66,
                doc="fraction of the steps after which every student module is kept (probability 1)",
            ),
            OptionSpec(name="seed", default=0, doc="seed of the per-step replacement draws"),
        ),
        description="Student layers replaced at random by the mapped (frozen) teacher blocks; hard loss "
        "only; the student is usually a truncated teacher.",
    )
)
