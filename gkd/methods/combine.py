"""Combining methods: `resolve`, which turns the configured methods into plain data for the planner.

`resolve(methods, teachers, student, step=0)` turns the config's `methods:` list (`{name, weight, options}`)
into one `ResolvedMethods`: the union of concrete tap names per teacher and for the student (each tensor
captured once, however many methods read it), the loss terms with their effective weights, the trainable
extras with their parameter counts, and the flags the planner needs. Nothing runs; only the specs and
ModelSpecs are read.

The executable side, `DistillLoss(resolved, teachers, student)`, lives in `gkd.methods.distill_loss`.

Design choices:
- Taps depend on the step for random / progressive layer rules, so `resolve` takes `step` and `total_steps`;
  `varies_with_step` tells the planner to re-resolve (the set's size is constant for random rules and largest
  at the last step for progressive ones).
- A term's effective weight is method weight x term weight (or its weight option); terms whose weight is 0 are
  dropped with their taps. Schedules multiply the weight per step inside `DistillLoss`.
- This module imports no torch (nor does anything `resolve` reaches): planning reads only specs and
  ModelSpecs, and importing torch alone costs about 2 s of a cold `gkd plan`.
- Constraint violations name both sizes and the registered methods that do not carry the constraint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from gkd.errors import InputError
from gkd.methods.mapping import Pair, pairs, tap_name
from gkd.methods.registry import get, names
from gkd.methods.spec import (
    CLS_CHOICES,
    HARD_LOSSES,
    ExtraSpec,
    HookOpSpec,
    LossTermSpec,
    MethodSpec,
    OptionSpec,
    StageSpec,
    dim_value,
    parse_rule,
)

# Options every method accepts, on top of its own.
COMMON_OPTIONS = {
    "layer_map": "override the layer rule of every layered tap (uniform, last, skip-K, explicit:T1,T2, ...)",
    "temperature": "temperature of every term that has one",
    "hard_loss": f"the hard loss: {', '.join(HARD_LOSSES)}",
    "cls": f"[CLS] pooling: {', '.join(CLS_CHOICES)} (last = last non-pad token)",
    "stage": "run only this stage of the method's recipe (name or 0-based index)",
    "teacher_weights": "per-teacher weights for methods with weighted aggregation (one number per teacher)",
}

# The kinds of the generic soft loss (the `soft` option), as `gkd.methods.losses.soft` and
# `gkd.methods.multi_teacher.sample_soft` compute them; resolve refuses any other, so a plan never holds a job
# whose loss fails at its first step.
SOFT_LOSSES = ("kl", "soft_ce", "mse")

# constraint -> (ModelSpec field, what it is, the plural for "methods that work across ...")
_CONSTRAINT_FIELD = {
    "equal_hidden": ("hidden", "hidden size", "hidden sizes"),
    "equal_heads": ("heads", "attention head count", "head counts"),
    "equal_kv_heads": ("kv_heads", "key/value head count", "key/value head counts"),
    "equal_vocab": ("vocab", "vocabulary", "vocabularies"),
    "equal_experts": ("experts", "expert count", "expert counts"),
}


def _constraint_value(model: Any, attr: str) -> Any:
    if attr == "experts":  # not a ModelSpec field: read from its config (gkd.planner.moe)
        from gkd.planner.moe import config_experts

        return config_experts(model)
    return getattr(model, attr)


@dataclass(frozen=True, kw_only=True)
class ResolvedExtra:
    name: str  # "<method>.<extra>" (with "[i]" for per-teacher / per-layer copies in `shapes`)
    method: str
    kind: str
    per: str  # "none" (one module) or how copies are laid out (see ExtraSpec.per): an nn.ModuleList
    shapes: tuple[tuple[int, int], ...]  # one (in, out) per copy
    bias: bool
    num_parameters: int


@dataclass(frozen=True, kw_only=True)
class ResolvedTerm:
    method: str
    name: str
    fn: str
    kernel: str
    weight: float  # method weight x term weight (before the schedule)
    temperature: float | None
    taps: tuple[str, ...]  # concrete tap names read, teacher taps prefixed "t<i>:" and student "s:"
    fused_linear: bool
    hard: bool
    schedule: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ResolvedMethod:
    """One method as resolved: its options and concrete layer pairs (read by `DistillLoss`)."""

    name: str
    weight: float
    options: dict[str, Any]
    stage: str  # active stage name ("" when the method has no recipe)
    train: str  # what trains in the active stage: "student+extras" (default), "student" or "extras"
    teacher: bool  # whether the active stage runs the teacher
    terms: tuple[str, ...]  # active term names
    pairs: dict[str, tuple[tuple[Pair, ...], ...]]  # tap name -> per-teacher pairs
    kinds: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class ResolvedMethods:
    """The combined requirements of the chosen methods, as plain data for the planner."""

    teacher_taps: tuple[frozenset[str], ...]
    student_taps: frozenset[str]
    extras: tuple[ResolvedExtra, ...]
    loss_terms: tuple[ResolvedTerm, ...]
    needs_teacher_logits: bool
    fused_linear: bool
    offline_ok: bool
    needs_teacher_forward: bool
    eager_attention: bool
    methods: tuple[ResolvedMethod, ...] = ()
    hook_ops: tuple[HookOpSpec, ...] = ()
    extra_student_forwards: int = 0
    varies_with_step: bool = False
    step: int = 0
    total_steps: int = 0
    # A chained method (TAKD): the ordered link runs (`gkd.methods.assistant.ChainLink`: teacher, student and
    # ResolvedMethods of each); the fields above are the first link's. Run the links one after another.
    chain: tuple[Any, ...] = ()

    @property
    def num_extra_parameters(self) -> int:
        return sum(e.num_parameters for e in self.extras)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, chain=()))
        out["teacher_taps"] = [sorted(t) for t in self.teacher_taps]
        out["student_taps"] = sorted(self.student_taps)
        out["chain"] = [link.to_dict() for link in self.chain]
        return out


def _norm_entry(entry: Any) -> tuple[str, float, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, 1.0, {}
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise InputError(f"each method entry needs a name, e.g. {{name: kd, weight: 1.0}}; got {entry!r}")
    unknown = set(entry) - {"name", "weight", "options"}
    if unknown:
        raise InputError(
            f"method entry {entry['name']!r} has unknown keys {sorted(unknown)}; use name/weight/options"
        )
    weight = entry.get("weight", 1.0)
    if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
        raise InputError(f"method {entry['name']!r}: weight must be a finite number >= 0, got {weight!r}")
    options = entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise InputError(f"method {entry['name']!r}: options must be a mapping, got {options!r}")
    return str(entry["name"]), float(weight), dict(options)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad_option(spec: MethodSpec, key: str, value: Any, expected: str) -> InputError:
    return InputError(
        f"method {spec.name!r}: option {key} must be {expected}, got {value!r} ({type(value).__name__})"
    )


def _check_option_types(spec: MethodSpec, options: Mapping[str, Any]) -> None:
    """Refuse option values of the wrong type or range, so that resolving (and so `gkd plan`) rejects what a
    run would fail on later. An option whose default is a bool, a whole number or a float takes a value of
    that type (a float option takes any finite number); `temperature` is a finite number > 0, `soft` one of
    SOFT_LOSSES, `teacher_weights` finite numbers >= 0. The other string and list options have their own rules
    (layer_map, stage, hard_loss, cls and the divisor options elsewhere in `_check_options`; takd's lists in
    `gkd.methods.assistant`; string modes such as `causal`, which also takes a bool, in their loss)."""
    defaults = {o.name: o for o in spec.options}
    for key, value in options.items():
        if key == "temperature":
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise _bad_option(spec, key, value, "a finite number > 0")
            continue
        if key == "teacher_weights":
            if isinstance(value, list | tuple) and not all(
                _is_number(w) and math.isfinite(w) and w >= 0 for w in value
            ):
                raise _bad_option(spec, key, value, "a list of finite numbers >= 0, one per teacher")
            continue
        if key == "soft":
            if value not in SOFT_LOSSES:
                raise _bad_option(spec, key, value, f"one of {', '.join(SOFT_LOSSES)}")
            continue
        option = defaults.get(key)
        if option is None or option.divides:
            continue
        default = option.default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise _bad_option(spec, key, value, "true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _bad_option(spec, key, value, "a whole number")
        elif isinstance(default, float) and (not _is_number(value) or not math.isfinite(value)):
            raise _bad_option(spec, key, value, "a finite number")


def _check_term_weights(spec: MethodSpec, options: dict[str, Any]) -> None:
    """Each term's weight (a fixed weight or one read from an option, e.g. soft_rate or 1 - alpha) must be a
    finite number >= 0: a negative weight would maximise the loss it weighs."""
    for term in spec.terms:
        if not term.weight_option:
            continue  # a fixed weight, set by the method's spec, not by the user
        weight = term_weight(term, options)
        if not math.isfinite(weight) or weight < 0:
            option = term.weight_option.removeprefix("1-")
            expected = "<= 1" if term.weight_option.startswith("1-") else ">= 0"
            raise InputError(
                f"method {spec.name!r}: option {option} = {options.get(option)!r} gives term {term.name!r} "
                f"the weight {weight}; set {option} {expected} so that the weight is finite and >= 0"
            )


def _methods_without(constraint: str) -> str:
    ok = [n for n in names() if constraint not in get(n).constraints]
    return ", ".join(ok) if ok else "none"


def _check_constraints(spec: MethodSpec, teachers: Sequence[Any], student: Any) -> None:
    for c in spec.constraints:
        attr, words, plural = _CONSTRAINT_FIELD[c]
        if attr == "experts" and not _constraint_value(student, attr):
            raise InputError(
                f"method {spec.name!r} reads the router of a mixture-of-experts model but the student "
                f"{student.name} is a dense model; use a mixture-of-experts student and teacher"
            )
        for teacher in teachers:
            s_val, t_val = _constraint_value(student, attr), _constraint_value(teacher, attr)
            if s_val != t_val:
                raise InputError(
                    f"method {spec.name!r} needs equal {words} but the student {student.name} has {s_val} "
                    f"and the teacher {teacher.name} has {t_val}; "
                    f"methods that work across {plural}: {_methods_without(c)}"
                )


def _check_teachers(spec: MethodSpec, n: int) -> None:
    if n < spec.min_teachers:
        raise InputError(f"method {spec.name!r} needs at least {spec.min_teachers} teachers, got {n}")
    if spec.teachers == "single" and n > 1:
        multi = ", ".join(m for m in names() if get(m).teachers != "single")
        raise InputError(
            f"method {spec.name!r} takes one teacher but {n} are given; use a multi-teacher method ({multi})"
        )


def _model_width(model: Any, kind: str) -> int:
    if kind == "hidden":
        return int(model.hidden)
    if kind == "q":
        return int(model.heads * model.head_dim)
    if kind == "kv":
        return int(model.kv_heads * model.head_dim)
    raise ValueError(f"unknown width kind {kind!r}")


def _divisor_option(
    spec: MethodSpec, option: OptionSpec, value: Any, teachers: Sequence[Any], student: Any
) -> int:
    """The value of an option that must divide model widths (see OptionSpec.divides): checked, or chosen."""
    widths = sorted(
        {_model_width(m, kind) for m in (*teachers, student) for kind in option.divides}, reverse=True
    )
    common = math.gcd(*widths)
    if value == "auto":
        for candidate in option.preferred:
            if common % candidate == 0:
                return candidate
        cap = max(option.preferred, default=common)
        return max(d for d in range(1, min(cap, common) + 1) if common % d == 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or common % value:
        fits = [d for d in range(2, min(common, 256) + 1) if common % d == 0]
        shown = ", ".join(str(d) for d in fits[-6:]) or "1"
        raise InputError(
            f"method {spec.name!r}: {option.name} {value!r} must divide the widths "
            f"{', '.join(str(w) for w in widths)} of the teacher(s) and the student; use one of {shown}, "
            "or auto"
        )
    return value


def _check_options(
    spec: MethodSpec, options: dict[str, Any], teachers: Sequence[Any], student: Any
) -> dict[str, Any]:
    n_teachers = len(teachers)
    known = spec.option_defaults()
    unknown = set(options) - set(known) - set(COMMON_OPTIONS)
    if unknown:
        allowed = sorted(set(known) | set(COMMON_OPTIONS))
        raise InputError(
            f"method {spec.name!r}: unknown options {sorted(unknown)}; allowed: {', '.join(allowed)}"
        )
    _check_option_types(spec, options)
    merged = {**known, **options}
    _check_term_weights(spec, merged)
    weights = merged.get("teacher_weights")
    if weights is not None and (
        not isinstance(weights, list | tuple) or len(weights) != n_teachers or spec.aggregation != "weighted"
    ):
        raise InputError(
            f"method {spec.name!r}: teacher_weights must list one weight per teacher ({n_teachers}) and the "
            f"method must aggregate teachers by weight (its aggregation is {spec.aggregation})"
        )
    if merged.get("hard_loss", "auto") not in HARD_LOSSES:
        raise InputError(f"method {spec.name!r}: hard_loss must be one of {', '.join(HARD_LOSSES)}")
    if merged.get("cls", "auto") not in CLS_CHOICES:
        raise InputError(f"method {spec.name!r}: cls must be one of {', '.join(CLS_CHOICES)}")
    for option in spec.options:
        if option.divides:
            merged[option.name] = _divisor_option(spec, option, merged[option.name], teachers, student)
    return merged


def _active_stage(spec: MethodSpec, options: dict[str, Any], step: int, total_steps: int) -> StageSpec | None:
    if not spec.stages:
        return None
    chosen = options.get("stage")
    if chosen is not None:
        for i, st in enumerate(spec.stages):
            if chosen == st.name or chosen == i:
                return st
        raise InputError(
            f"method {spec.name!r} has no stage {chosen!r}; stages: {', '.join(s.name for s in spec.stages)}"
        )
    p = 0.0 if total_steps <= 0 else step / total_steps
    edge = 0.0
    for st in spec.stages:
        edge += st.fraction
        if p < edge:
            return st
    return spec.stages[-1]


def stage_window(
    spec: MethodSpec, options: dict[str, Any], step: int, total_steps: int
) -> tuple[StageSpec | None, int, int]:
    """The active stage and (step, total steps) counted within it.

    Schedules and progressive layer rules run over the active stage, not the whole run (MobileBERT unlocks its
    layers during its first stage only). A stage chosen with the `stage` option spans the whole run.
    """
    stage = _active_stage(spec, options, step, total_steps)
    if stage is None or options.get("stage") is not None or total_steps <= 0:
        return stage, step, total_steps
    index = spec.stages.index(stage)
    # Stage i covers the steps with start_i <= step / total < end_i (as _active_stage selects them).
    start = math.ceil(sum(s.fraction for s in spec.stages[:index]) * total_steps - 1e-9)
    end = (
        total_steps
        if index == len(spec.stages) - 1
        else math.ceil(sum(s.fraction for s in spec.stages[: index + 1]) * total_steps - 1e-9)
    )
    return stage, step - start, max(end - start, 1)


def term_weight(spec_term: LossTermSpec, options: dict[str, Any]) -> float:
    if spec_term.weight_option.startswith("1-"):
        return 1.0 - float(options[spec_term.weight_option[2:]])
    if spec_term.weight_option:
        return float(options[spec_term.weight_option])
    return spec_term.weight


def _extra_copies(
    extra: ExtraSpec,
    spec_pairs: dict[str, tuple[tuple[Pair, ...], ...]],
    teachers: Sequence[Any],
    student: Any,
    options: dict[str, Any],
) -> list[tuple[int, int]]:
    def shape(teacher: Any) -> tuple[int, int]:
        kw = {"student": student, "teacher": teacher, "options": options, "teachers": len(teachers)}
        return dim_value(extra.in_dim, **kw), dim_value(extra.out_dim, **kw)

    if extra.per == "none":
        return [shape(teachers[0])]
    if extra.per == "teacher":
        return [shape(t) for t in teachers]
    if extra.per == "student_layer":
        return [shape(teachers[0])] * student.layers
    if extra.per == "teacher_layer":
        return [shape(t) for t in teachers for _ in range(t.layers)]
    # per mapped pair of a tap, for each teacher in turn (index with LossContext.pair_index)
    return [shape(t) for i, t in enumerate(teachers) for _ in spec_pairs[extra.pair_tap][i]]


# Loss functions that compute exactly from an offline teacher pass's top-k log-probs (with the tail bucket):
# forward KL and the soft cross-entropy. The others need the teacher's whole distribution or raw logits.
_TOPK_FNS = frozenset({"fkl.div", "topk_kl.div"})


def _reads_topk(term: ResolvedTerm, options: dict[str, Any]) -> bool:
    """Whether `term` can run against a stored top-k instead of live teacher logits."""
    if term.fn == "soft":
        return options.get("soft", "kl") in ("kl", "soft_ce")
    return term.fn in _TOPK_FNS


def resolve(
    methods: Sequence[Mapping[str, Any] | str],
    teachers: Sequence[Any],
    student: Any,
    *,
    step: int = 0,
    total_steps: int = 0,
    fused_linear: bool = True,
) -> ResolvedMethods:
    """Combine the configured methods into one set of requirements (see the module docstring).

    fused_linear=False keeps logit terms on materialised logits even where a fused-linear kernel could run.
    """
    if not methods:
        raise InputError("no distillation methods given; add at least one, e.g. methods: [{name: kd}]")
    if not teachers:
        raise InputError("no teacher given; distillation needs at least one teacher model")
    entries = [_norm_entry(e) for e in methods]
    seen: set[str] = set()
    for name, _, _ in entries:
        if name in seen:
            raise InputError(f"method {name!r} is listed twice; list it once and set its weight")
        seen.add(name)
    if any(get(name).chain for name, _, _ in entries):
        from gkd.methods.assistant import resolve_chain

        return resolve_chain(  # type: ignore[no-any-return]
            entries, teachers, student, step=step, total_steps=total_steps, fused_linear=fused_linear
        )

    teacher_taps: list[set[str]] = [set() for _ in teachers]
    student_taps: set[str] = set()
    extras: list[ResolvedExtra] = []
    terms: list[ResolvedTerm] = []
    resolved: list[ResolvedMethod] = []
    hook_ops: list[HookOpSpec] = []
    varies = False
    hard_kinds: dict[str, str] = {}
    encoder = student.is_encoder
    all_decoders = not encoder and not any(t.is_encoder for t in teachers)

    for name, weight, raw_options in entries:
        spec = get(name)
        _check_teachers(spec, len(teachers))
        _check_constraints(spec, teachers, student)
        options = _check_options(spec, raw_options, teachers, student)
        stage, stage_step, stage_total = stage_window(spec, options, step, total_steps)
        active = [
            t
            for t in spec.terms
            if all(options.get(opt) == value for opt, value in t.when)
            and (stage is None or t.name in stage.terms)
            and weight * term_weight(t, options) != 0
            and not (t.hard and options.get("hard_loss") == "none")
        ]
        if any(t.hard for t in active):
            hard_kinds[name] = options.get("hard_loss", "auto")

        # Concrete layer pairs per tap and teacher.
        override = None
        if options.get("layer_map") is not None:
            try:
                override = parse_rule(options["layer_map"])
            except InputError as err:
                raise InputError(f"method {name!r}: layer_map: {err}") from None
        spec_pairs: dict[str, tuple[tuple[Pair, ...], ...]] = {}
        kinds = {tap.name: tap.kind for tap in spec.taps}
        for tap in spec.taps:
            if tap.layers is None:
                continue
            rule = override or tap.layers
            varies = varies or rule.varies_with_step
            spec_pairs[tap.name] = tuple(
                pairs(rule, student.layers, t.layers, step=stage_step, total_steps=stage_total)
                for t in teachers
            )

        stage_teacher = stage is None or stage.teacher
        for term in active:
            concrete: list[str] = []
            for tap_n in term.taps:
                tap = spec.tap(tap_n)
                t_indices = range(len(teachers)) if tap.teachers == "all" else [int(tap.teachers)]
                if tap.layers is None:
                    if tap.side in ("both", "student"):
                        concrete.append(f"s:{tap.kind}")
                    if tap.side in ("both", "teacher") and stage_teacher and not term.hard:
                        concrete += [f"t{i}:{tap.kind}" for i in t_indices]
                    continue
                for i in t_indices:
                    for s_depth, t_depth in spec_pairs[tap_n][i]:
                        if tap.side in ("both", "student"):
                            concrete.append("s:" + tap_name(tap.kind, s_depth))
                        if tap.side in ("both", "teacher") and stage_teacher:
                            concrete.append(f"t{i}:" + tap_name(tap.kind, t_depth))
            concrete = list(dict.fromkeys(concrete))
            temperature = (
                options.get("temperature", term.temperature) if term.temperature is not None else None
            )
            terms.append(
                ResolvedTerm(
                    method=name,
                    name=term.name,
                    fn=term.fn,
                    kernel=term.kernel,
                    weight=weight * term_weight(term, options),
                    temperature=None if temperature is None else float(temperature),
                    taps=tuple(concrete),
                    fused_linear=term.fused_linear,
                    hard=term.hard,
                    schedule=asdict(term.schedule),
                )
            )
            for c in concrete:
                side, _, tname = c.partition(":")
                if side == "s":
                    student_taps.add(tname)
                else:
                    teacher_taps[int(side[1:])].add(tname)

        if active:
            for extra in spec.extras:
                if extra.terms and not set(extra.terms) & {t.name for t in active}:
                    continue  # only the terms that use it create it
                shapes = _extra_copies(extra, spec_pairs, teachers, student, options)
                per = sum(i * o + (o if extra.bias and extra.kind == "linear" else 0) for i, o in shapes)
                extras.append(
                    ResolvedExtra(
                        name=f"{name}.{extra.name}",
                        method=name,
                        kind=extra.kind,
                        per=extra.per,
                        shapes=tuple(shapes),
                        bias=extra.bias and extra.kind == "linear",
                        num_parameters=per,
                    )
                )
            hook_ops.extend(spec.hook_ops)
        resolved.append(
            ResolvedMethod(
                name=name,
                weight=weight,
                options=options,
                stage=stage.name if stage else "",
                train=stage.train if stage else "student+extras",
                teacher=stage_teacher,
                terms=tuple(t.name for t in active),
                pairs=spec_pairs,
                kinds=kinds,
            )
        )

    distinct_hard = {v for v in hard_kinds.values() if v != "auto"}
    if len(distinct_hard) > 1:
        detail = ", ".join(f"{m}: {k}" for m, k in hard_kinds.items())
        raise InputError(
            f"methods disagree on the hard loss ({detail}); set the same hard_loss option on each"
        )
    ops = [h.op for h in hook_ops]
    if len(set(ops)) != len(ops):
        raise InputError(f"two methods apply the same in-flight operation {sorted(ops)}; keep one of them")
    if any(h.needs_teacher_modules for h in hook_ops) and len(teachers) > 1:
        raise InputError("theseus module replacement takes exactly one teacher; remove the other teachers")

    # A stored top-k teacher pass can replace the live teacher when the teachers are only asked for logits (or
    # already for stored top-k entries, the `topk` kind, which never needs a live teacher forward) and every
    # loss on those logits computes exactly from a top-k, at one temperature (`_reads_topk`).
    teacher_logits_only = all(t and t <= {"logits", "topk"} for t in teacher_taps)
    options_of = {m.name: m.options for m in resolved}
    offline_terms = [t for t in terms if any(x.startswith("t") and x.endswith(":logits") for x in t.taps)]
    # One stored top-k per teacher serves both its logits and its `topk` readers: one temperature for all.
    stored_readers = [
        t for t in terms if any(x.startswith("t") and x.endswith((":logits", ":topk")) for x in t.taps)
    ]
    offline_ok = (
        teacher_logits_only
        and all(_reads_topk(t, options_of[t.method]) for t in offline_terms)
        and len({t.temperature for t in stored_readers}) <= 1
    )
    logit_terms = [t for t in terms if any(x.endswith(":logits") for x in t.taps)]
    fused = fused_linear and bool(logit_terms) and all_decoders and all(t.fused_linear for t in logit_terms)
    if fused:
        #  The logit terms take final hidden states and LM-head weights; (tokens x V) logits are never
        # captured.
        terms = [
            replace(t, taps=tuple(dict.fromkeys(x.replace(":logits", ":final") for x in t.taps)))
            for t in terms
        ]
        for taps in (*teacher_taps, student_taps):
            if "logits" in taps:
                taps.discard("logits")
                taps.add("final")
    teacher_needs_logits = any(
        x.startswith("t") and x.endswith(":logits") for t in logit_terms for x in t.taps
    )
    teacher_frozen = tuple(frozenset(t) for t in teacher_taps)
    all_teacher = set().union(*teacher_taps)
    all_taps = all_teacher | student_taps
    kinds_used = {n.split("[")[0] for n in all_taps}
    return ResolvedMethods(
        teacher_taps=teacher_frozen,
        student_taps=frozenset(student_taps),
        extras=tuple(extras),
        loss_terms=tuple(terms),
        needs_teacher_logits=teacher_needs_logits,
        fused_linear=fused,
        offline_ok=offline_ok,
        needs_teacher_forward=bool(all_teacher - {"topk"}),
        eager_attention=bool(kinds_used & {"scores", "probs"}),
        methods=tuple(resolved),
        hook_ops=tuple(hook_ops),
        extra_student_forwards=sum(h.extra_forwards for h in hook_ops),
        varies_with_step=varies,
        step=step,
        total_steps=total_steps,
    )


def __getattr__(name: str) -> Any:
    # `DistillLoss` and `LossOutput` were defined here before they moved to `gkd.methods.distill_loss`;
    # importing them from here still works, and only then imports torch.
    if name in ("DistillLoss", "LossOutput"):
        from gkd.methods import distill_loss

        return getattr(distill_loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
