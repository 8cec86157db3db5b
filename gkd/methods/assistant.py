"""Teacher-assistant methods: TAKD (a chain of runs) and DGKD (the teacher and all assistants at once).

TAKD (Mirzadeh et al., AAAI 2020): a large teacher-student gap is bridged by intermediate-size assistants,
each distilled from the previous model: teacher -> assistant 1 -> ... -> assistant k -> student, every link a
complete run of any single-teacher method (`link_methods`, default plain KD). The chain is data: resolving
`takd` expands its `assistants` option (model references, largest first) into an ordered tuple of
`ChainLink`s, each with its teacher and student `ModelSpec` and its own `ResolvedMethods`, and `resolve`
returns the first link's requirements with the whole chain attached (`ResolvedMethods.chain`). A planner or
runtime executes the links one after another; link i's trained student is link i + 1's teacher.

DGKD (Son et al., ICCV 2021): the student learns from the teacher and every assistant in the same step (the
teachers list: the teacher first, then the assistants), summing their soft losses (KL * T^2 by default), plus
the hard loss. Each teacher or assistant is dropped at random per step (it survives with probability
`survival`, 0.75 in the paper; at least one is always kept), which regularises the student. The draw is a
pure function of (seed, step, number of teachers) (`surviving_teachers`), so a run is reproducible and a
runtime can skip the forward of a dropped teacher.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError
from gkd.methods.losses import LossContext, register_loss, soft
from gkd.methods.registry import get, register
from gkd.methods.spec import LossTermSpec, MethodSpec, OptionSpec, TapSpec

if TYPE_CHECKING:
    from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# TAKD


@dataclass(frozen=True, kw_only=True)
class ChainLink:
    """One run of a TAKD chain: distil `student` from `teacher` with `methods` (config entries)."""

    index: int  # 0-based position in the chain (execution order)
    teacher: Any  # ModelSpec: the original teacher for link 0, else the previous link's student
    student: Any  # ModelSpec: an assistant, or the final student for the last link
    methods: tuple[dict[str, Any], ...]
    resolved: Any  # ResolvedMethods of this link

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "teacher": self.teacher.name,
            "student": self.student.name,
            "methods": [dict(m) for m in self.methods],
            "resolved": self.resolved.to_dict(),
        }


def _model(ref: Any) -> Any:
    from gkd.models import ModelSpec, resolve_model

    if isinstance(ref, ModelSpec):
        return ref
    if not isinstance(ref, str):
        raise InputError(f"takd: each assistant must be a model name or path, got {ref!r}")
    return resolve_model(ref)


def _link_entries(raw: Any) -> tuple[dict[str, Any], ...]:
    if isinstance(raw, str | Mapping):
        raw = [raw]
    if not isinstance(raw, Sequence) or not raw:
        raise InputError("takd: link_methods must be a non-empty list of methods, e.g. [{name: kd}]")
    entries = []
    for entry in raw:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = entry.get("name")
        if isinstance(name, str) and get(name).teachers == "assistants":
            raise InputError(
                f"takd: link method {name!r} is itself an assistant method; use a single-teacher method per "
                "link, e.g. kd"
            )
        entries.append(entry)
    return tuple(entries)


def expand_chain(
    options: Mapping[str, Any],
    teacher: Any,
    student: Any,
    *,
    step: int = 0,
    total_steps: int = 0,
    fused_linear: bool = True,
) -> tuple[ChainLink, ...]:
    """The ordered link runs of a TAKD chain: teacher -> assistants (in the listed order) -> student."""
    from gkd.methods.combine import resolve

    raw = options.get("assistants") or []
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise InputError(
            "method 'takd' needs at least one assistant: set options.assistants to a list of models between "
            "the teacher's and the student's size, largest first"
        )
    models = [teacher, *(_model(r) for r in raw), student]
    methods = _link_entries(options.get("link_methods", ("kd",)))
    links = []
    for i, (t, s) in enumerate(zip(models[:-1], models[1:], strict=True)):
        try:
            resolved = resolve(
                list(methods), [t], s, step=step, total_steps=total_steps, fused_linear=fused_linear
            )
        except InputError as err:
            raise InputError(f"takd link {i} ({t.name} -> {s.name}): {err}") from None
        links.append(ChainLink(index=i, teacher=t, student=s, methods=methods, resolved=resolved))
    return tuple(links)


def resolve_chain(
    entries: Sequence[tuple[str, float, dict[str, Any]]],
    teachers: Sequence[Any],
    student: Any,
    *,
    step: int = 0,
    total_steps: int = 0,
    fused_linear: bool = True,
) -> Any:
    """`resolve` for a chained method: the first link's `ResolvedMethods` with `chain` set to every link.

    `entries` are the normalised (name, weight, options) of the config's methods list. A chain is the only
    method of its runs, so its weight has nothing to scale; each link's weights come from `link_methods`."""
    from gkd.methods.combine import _check_options

    chained = [name for name, _, _ in entries if get(name).chain]
    if len(entries) != 1:
        raise InputError(
            f"method {chained[0]!r} runs a chain of whole distillations and cannot be combined with other "
            "methods; put them in its link_methods option"
        )
    name, _, raw_options = entries[0]
    spec = get(name)
    if len(teachers) != 1:
        raise InputError(
            f"method {name!r} takes one teacher (got {len(teachers)}); list the assistants in its assistants "
            "option"
        )
    options = _check_options(spec, raw_options, teachers, student)
    links = expand_chain(
        options, teachers[0], student, step=step, total_steps=total_steps, fused_linear=fused_linear
    )
    return replace(links[0].resolved, chain=links)


TAKD = register(
    MethodSpec(
        name="takd",
        title="TAKD: teacher-assistant knowledge distillation (a chain of runs)",
        paper="Mirzadeh et al. Improved Knowledge Distillation via Teacher Assistant. AAAI",
        year=2020,
        teachers="assistants",
        chain=True,
        options=(
            OptionSpec(
                name="assistants",
                default=(),
                doc="assistant models (names or paths), largest first; each is distilled from the previous",
            ),
            OptionSpec(
                name="link_methods",
                default=("kd",),
                doc="the single-teacher methods every link runs (a methods list)",
            ),
        ),
        description="Teacher -> assistant(s) -> student as consecutive runs, each link any single-teacher "
        "method; its taps and losses are those of link_methods.",
    )
)


# ---------------------------------------------------------------------------------------------------------
# DGKD


def surviving_teachers(teachers: int, step: int, *, survival: float, seed: int = 0) -> tuple[int, ...]:
    """The teacher indices kept at `step`: each survives with probability `survival`, independently; if none
    does, one drawn uniformly is kept. A pure function of its arguments."""
    if not 0.0 < survival <= 1.0:
        raise InputError(f"dgkd: survival must be in (0, 1], got {survival}")
    rng = random.Random(seed * 1_000_003 + step)
    kept = tuple(i for i in range(teachers) if rng.random() < survival)
    return kept or (rng.randrange(teachers),)


@register_loss("dgkd.soft")
def dgkd_soft(ctx: LossContext) -> Tensor:
    """Sum of the generic soft loss over the teachers and assistants that survive this step."""
    kept = surviving_teachers(
        ctx.num_teachers, ctx.step, survival=float(ctx.options["survival"]), seed=int(ctx.options["seed"])
    )
    total: Tensor | None = None
    for i in kept:
        ctx.teacher = i
        loss = soft(ctx)
        total = loss if total is None else total + loss
    ctx.teacher = 0
    assert total is not None
    return total


DGKD = register(
    MethodSpec(
        name="dgkd",
        title="DGKD: densely guided distillation with multiple teacher assistants",
        paper="Son et al. Densely Guided Knowledge Distillation using Multiple Teacher Assistants. ICCV",
        year=2021,
        taps=(TapSpec(kind="logits"),),
        terms=(
            LossTermSpec(
                name="soft",
                fn="dgkd.soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=2.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_vocab",),
        teachers="assistants",
        min_teachers=2,
        aggregation="custom",
        options=(
            OptionSpec(name="soft", default="kl", doc="soft loss: kl (x T^2), soft_ce (no T^2) or mse"),
            OptionSpec(name="soft_rate", default=1.0, doc="weight of the summed soft losses"),
            OptionSpec(name="hard_rate", default=1.0, doc="weight of the hard (task / LM) loss; 0 drops it"),
            OptionSpec(
                name="survival", default=0.75, doc="probability that each teacher / assistant is kept"
            ),
            OptionSpec(name="seed", default=0, doc="seed of the per-step drop (with the step)"),
        ),
        description="Teacher + every assistant (listed as teachers, teacher first) at once; each dropped at "
        "random per step (survival 0.75, at least one kept); summed soft losses + hard loss.",
    )
)
