"""The declarative method spec: what one distillation method needs, as plain frozen data.

A `MethodSpec` says, without running anything, which tensors (taps) a method reads from the teacher(s) and the
student, how their layers are paired (`LayerRule`), which loss terms it computes (`LossTermSpec`, each naming
a
loss function registered in `gkd.methods.losses` and the `gkd.kernels` function it uses), which trainable
extras
it adds (`ExtraSpec`, shapes as expressions over the teacher/student `ModelSpec`), which constraints must
hold,
its stage recipe, its in-flight tensor operations (`HookOpSpec`) and how several teachers are aggregated.

Design choices:
- Everything is data so that the planner can size taps and extras from the spec alone; the only code a method
  contributes is its loss functions (registered by name) and, for hook ops, a named implementation.
- A layer rule is resolved to concrete (student, teacher) pairs by `gkd.methods.mapping.pairs`, given the two
  layer counts and the step, so random and progressive choices are expressed here and evaluated per step.
- Dimensions of extras are small expressions ("student.hidden", "teacher.hidden", "opt:u", an int) rather than
  callables: they stay printable and JSON-friendly, and `dim_value` evaluates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gkd.errors import InputError

# Tap kinds of the shared catalogue. Layered kinds take an index; the others do not.
LAYERED_KINDS = ("hidden", "q", "k", "v", "scores", "probs", "context", "mlp_out", "router_logits")
GLOBAL_KINDS = ("emb", "final", "logits")
# Stored teacher outputs that replace a live teacher forward (offline distillation): `topk` is a teacher's
# top-k (indices, log-probs) per token, written by an offline teacher pass (`gkd.methods.divergence.TopK`).
STORED_KINDS = ("topk",)
TAP_KINDS = LAYERED_KINDS + GLOBAL_KINDS + STORED_KINDS
ATTENTION_KINDS = ("q", "k", "v", "scores", "probs", "context")

RULE_KINDS = ("uniform", "last", "skip", "explicit", "random", "progressive", "all")
SIDES = ("teacher", "student")
KERNELS = (
    "kd_loss",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "relation_kl_loss",
    "scores_mse_loss",
    "hidden_loss",
    "torch",  # plain torch in the method library (hard losses, relation losses without a fused kernel)
)
CONSTRAINTS = ("equal_hidden", "equal_heads", "equal_vocab", "equal_kv_heads", "equal_experts")
AGGREGATIONS = ("single", "sum", "mean", "weighted", "custom")
TEACHER_MODES = ("single", "multi", "assistants")
HARD_LOSSES = ("auto", "mlm", "causal_lm", "classification", "none")
CLS_CHOICES = ("auto", "first", "last", "mean")


@dataclass(frozen=True, kw_only=True)
class LayerRule:
    """How student layers are paired with teacher layers.

    Positions are depths d = 1..L (the output of layer d-1). A layered tap of kind `hidden` at depth d is
    `hidden[d]`; an attention / MLP tap at depth d is `<kind>[d-1]`. With `include_emb`, the pair (0, 0) is
    added
    (only meaningful for `hidden`, where `hidden[0]` is the embedding output entering layer 0).

    kind:
      uniform      student depth j <- teacher depth j * Lt // Ls, j = 1..Ls (TinyBERT, PKD with k = Lt/Ls)
      last         (Ls, Lt) only (MiniLM)
      skip         student depth j <- teacher depth j * k, j = 1..Ls (PKD "skip"; k from `k`)
      explicit     `layers` gives the teacher depth for student depths 1..Ls (or `pairs` gives (s, t) depths)
      random       for each student depth 1..Ls-1 a teacher depth drawn from 1..Lt-1 without replacement,
      sorted,
                   re-drawn every `every` steps from `seed` and the step (RAIL-KD); the last pair is (Ls, Lt)
                   unless `random_last` is set
      progressive  the uniform pairs, unlocked one at a time: pair n is active from step n * total // (Ls + 1)
                   (SID); `keep_unlocked` keeps earlier pairs active (MobileBERT) instead of only the newest
      all          every teacher depth 1..Lt against the student depth Ls (ALP-KD, Universal-KD)

    drop_last removes the pair (Ls, Lt) from any rule (methods that read the top layer from `final`, or use
    intermediate layers only: CKD, MGSKD, Universal-KD, RAIL-KD); for `random`: only the Ls - 1 drawn pairs.
    """

    kind: str
    k: int = 0
    layers: tuple[int, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()
    include_emb: bool = False
    seed: int = 0
    every: int = 1
    random_last: bool = False
    keep_unlocked: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise InputError(f"layer rule {self.kind!r} is not one of {', '.join(RULE_KINDS)}")
        if self.kind == "skip" and self.k < 1:
            raise InputError("layer rule 'skip' needs k >= 1, e.g. skip-2")
        if self.kind == "explicit" and not (self.layers or self.pairs):
            raise InputError("layer rule 'explicit' needs a list of teacher layers, e.g. explicit:2,4")
        if self.every < 1:
            raise InputError("layer rule 'random' needs every >= 1 (steps between re-draws)")

    @property
    def varies_with_step(self) -> bool:
        return self.kind in ("random", "progressive")

    def describe(self) -> str:
        extra = ("+emb" if self.include_emb else "") + ("-last" if self.drop_last else "")
        if self.kind == "skip":
            return f"skip-{self.k}{extra}"
        if self.kind == "explicit":
            body = ",".join(map(str, self.layers)) or ",".join(f"{s}:{t}" for s, t in self.pairs)
            return f"explicit:{body}{extra}"
        if self.kind == "random":
            return f"random(seed={self.seed},every={self.every}){extra}"
        return f"{self.kind}{extra}"


def parse_rule(value: Any) -> LayerRule:
    """A rule from config: a LayerRule, a string ("uniform", "last", "skip-2", "explicit:2,4", "random",
    "progressive", "all", any with a "+emb" suffix, then optionally "-last" for drop_last) or a dict of
    LayerRule fields."""
    if isinstance(value, LayerRule):
        return value
    if isinstance(value, dict):
        fields = dict(value)
        for key in ("layers", "pairs"):
            if key in fields:
                fields[key] = tuple(tuple(x) if isinstance(x, list) else x for x in fields[key])
        try:
            return LayerRule(**fields)
        except TypeError as err:
            raise InputError(f"bad layer rule {value!r}: {err}") from None
    if not isinstance(value, str):
        raise InputError(f"layer rule must be a string or a mapping, got {value!r}")
    text = value.strip()
    drop_last = text.endswith("-last")
    text = text.removesuffix("-last")
    include_emb = text.endswith("+emb")
    text = text.removesuffix("+emb")
    if drop_last:
        return replace(parse_rule(text + ("+emb" if include_emb else "")), drop_last=True)
    if text.startswith("skip-"):
        try:
            return LayerRule(kind="skip", k=int(text[5:]), include_emb=include_emb)
        except ValueError:
            raise InputError(
                f"bad layer rule {value!r}: write skip-K with an integer K, e.g. skip-2"
            ) from None
    if text.startswith("explicit:"):
        try:
            layers = tuple(int(x) for x in text[9:].split(",") if x.strip())
        except ValueError:
            raise InputError(f"bad layer rule {value!r}: write explicit:T1,T2,... (teacher depths)") from None
        return LayerRule(kind="explicit", layers=layers, include_emb=include_emb)
    return LayerRule(kind=text, include_emb=include_emb)


@dataclass(frozen=True, kw_only=True)
class TapSpec:
    """One kind of tensor a method reads. `layers` is required for layered kinds and must be None otherwise.

    side: "both" (teacher and student at paired layers), "teacher" or "student" only.
    teachers: "all" or the index of one teacher (e.g. RL-KD's semantic teacher).
    `name` lets loss functions refer to this request (defaults to the kind).
    """

    kind: str
    layers: LayerRule | None = None
    side: str = "both"
    teachers: str | int = "all"
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TAP_KINDS:
            raise InputError(f"tap kind {self.kind!r} is not one of {', '.join(TAP_KINDS)}")
        if self.kind in LAYERED_KINDS and self.layers is None:
            raise ValueError(f"tap {self.kind!r} needs a layer rule")
        if self.kind in GLOBAL_KINDS + STORED_KINDS and self.layers is not None:
            raise ValueError(f"tap {self.kind!r} takes no layer rule")
        if self.kind in STORED_KINDS and self.side != "teacher":
            raise ValueError(f"tap {self.kind!r} is a stored teacher output: side must be 'teacher'")
        if self.side not in ("both", "teacher", "student"):
            raise ValueError(f"tap side {self.side!r} is not both, teacher or student")
        if not self.name:
            object.__setattr__(self, "name", self.kind)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A multiplier over training progress p = step / total_steps in [0, 1].

    constant: `value`. linear: from `start` at p <= `begin` to `end` at p >= `finish`.
    after_progressive: `value` once every student layer is unlocked by a progressive rule (SID's prediction
    loss: from step Ls * (total // (Ls + 1))), else 0; needs the student layer count.
    piecewise: `points` ((p0, v0), (p1, v1), ...) sorted by p; the value of the last point with p_i <= p (a
    step
    function; Annealing-KD's phi). window: `value` while `begin` <= p < `finish`, else 0.
    """

    kind: str = "constant"
    value: float = 1.0
    start: float = 0.0
    end: float = 1.0
    begin: float = 0.0
    finish: float = 1.0
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "piecewise", "window", "after_progressive"):
            raise InputError(
                f"schedule {self.kind!r} is not constant, linear, piecewise, window or after_progressive"
            )
        if self.kind == "piecewise" and not self.points:
            raise InputError("a piecewise schedule needs points ((progress, value), ...)")

    def at(self, step: int, total_steps: int, *, student_layers: int = 0) -> float:
        p = 0.0 if total_steps <= 0 else min(max(step / total_steps, 0.0), 1.0)
        if self.kind == "constant":
            return self.value
        if self.kind == "after_progressive":
            if student_layers < 1:
                raise ValueError("an after_progressive schedule needs the student layer count")
            span = max(total_steps // (student_layers + 1), 1)
            return self.value if total_steps > 0 and step >= span * student_layers else 0.0
        if self.kind == "linear":
            if p <= self.begin:
                return self.start
            if p >= self.finish:
                return self.end
            return self.start + (self.end - self.start) * (p - self.begin) / (self.finish - self.begin)
        if self.kind == "window":
            return self.value if self.begin <= p < self.finish else 0.0
        value = self.points[0][1]
        for point, v in self.points:
            if p >= point:
                value = v
        return value


@dataclass(frozen=True, kw_only=True)
class LossTermSpec:
    """One loss term of a method.

    fn: name of a loss function registered with `gkd.methods.losses.register_loss`.
    kernel: the `gkd.kernels` function it calls (one of KERNELS; "torch" for plain torch).
    taps: names of the method's `TapSpec`s this term reads (the planner charges their lifetimes to this term).
    weight_option: if set, the option whose value replaces `weight` (e.g. "soft_rate", "hard_rate");
        "1-<name>" takes its complement (PKD's (1 - alpha) * hard).
    temperature: default temperature (the "temperature" option overrides it for every term that has one).
    schedule: multiplier on the weight over training progress.
    fused_linear: the term can take final hidden + LM-head weight instead of logits.
    hard: this term is the task / LM loss on labels (it reads student logits and the labels only).
    when: ((option, value), ...): the term is active only when each option has that value (alternative
        implementations of one loss that read different taps, e.g. attention from q/k or from scores taps).
    """

    name: str
    fn: str
    kernel: str = "torch"
    taps: tuple[str, ...] = ()
    weight: float = 1.0
    weight_option: str = ""
    temperature: float | None = None
    schedule: Schedule = field(default_factory=Schedule)
    fused_linear: bool = False
    hard: bool = False
    when: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"loss term {self.name!r}: kernel {self.kernel!r} is not one of {KERNELS}")


@dataclass(frozen=True, kw_only=True)
class ExtraSpec:
    """A trainable module the method adds (a projection, an agent layer).

    kind: "linear" (in_dim -> out_dim, optional bias) or "parameter" (a tensor of shape (in_dim, out_dim)).
    Dims are expressions: an int, "student.<field>", "teacher.<field>" (field of ModelSpec or head_dim),
    "opt:<name>"
    (an integer option of the method), "teachers" (the number of teachers).
    per: "none" (one), "teacher" (one per teacher), "student_layer" (one per student depth 1..Ls),
    "teacher_layer" (one per depth 1..Lt of each teacher), "pair" (one per mapped layer pair of tap
    `pair_tap`).
    terms: the loss terms that use it; the extra exists only while one of them is active (TinyBERT's fit_dense
    is not built for its prediction stage). Empty: whenever the method has an active term.
    """

    name: str
    kind: str = "linear"
    in_dim: int | str = "student.hidden"
    out_dim: int | str = "teacher.hidden"
    bias: bool = True
    per: str = "none"
    pair_tap: str = ""
    terms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "parameter"):
            raise ValueError(f"extra {self.name!r}: kind {self.kind!r} is not linear or parameter")
        if self.per not in ("none", "teacher", "student_layer", "teacher_layer", "pair"):
            raise ValueError(f"extra {self.name!r}: per {self.per!r} is not recognised")


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage of a method's recipe.

    fraction: share of the total steps (the fractions of a recipe sum to 1; a config may set explicit steps).
    terms: names of the loss terms active in this stage (empty = only the hard loss / plain training).
    train: which parts train: "student", "student+extras", "extras".
    teacher: whether the teacher forward runs in this stage.
    """

    name: str
    fraction: float = 1.0
    terms: tuple[str, ...] = ()
    train: str = "student+extras"
    teacher: bool = True
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class HookOpSpec:
    """A named in-flight tensor operation, implemented in `gkd.methods.hooks` and looked up by `op`.

    op: "theseus_replace" (swap student blocks for mapped teacher blocks at random), "diito_interchange" (swap
    a
    span of token states with another example's at aligned layers), "lrc_gradient_perturbation" (second
    forward
    with the normalised embedding gradient added).
    extra_forwards: additional student forwards per step the op costs (the planner charges them).
    needs_teacher_modules: the op moves teacher modules into the student's forward (no separate teacher pass).
    """

    op: str
    extra_forwards: int = 0
    needs_teacher_modules: bool = False
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, kw_only=True)
class OptionSpec:
    """A user-settable option of a method, with its default and a one-line meaning.

    divides: model widths the option's value must divide, on every teacher and the student ("hidden": the
    hidden size; "q": heads x head_dim; "kv": kv_heads x head_dim), checked when methods are resolved, so a
    plan never holds a job whose loss cannot split its tensors. With `default="auto"` the value is then chosen
    at resolve time: the first of `preferred` that divides every width, else the largest common divisor of
    the widths not above max(preferred).
    """

    name: str
    default: Any
    doc: str = ""
    divides: tuple[str, ...] = ()
    preferred: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """Everything about one distillation method, as data. See the module docstring."""

    name: str
    title: str
    paper: str
    year: int
    taps: tuple[TapSpec, ...] = ()
    terms: tuple[LossTermSpec, ...] = ()
    extras: tuple[ExtraSpec, ...] = ()
    constraints: tuple[str, ...] = ()
    stages: tuple[StageSpec, ...] = ()
    hook_ops: tuple[HookOpSpec, ...] = ()
    teachers: str = "single"
    min_teachers: int = 1
    aggregation: str = "single"
    options: tuple[OptionSpec, ...] = ()
    description: str = ""
    # A chain of whole runs (TAKD): `resolve` expands it into link runs (`gkd.methods.assistant.expand_chain`)
    # instead of adding terms of its own.
    chain: bool = False

    def __post_init__(self) -> None:
        tap_names = [t.name for t in self.taps]
        if len(set(tap_names)) != len(tap_names):
            raise ValueError(f"method {self.name!r}: duplicate tap names {tap_names}")
        term_names = [t.name for t in self.terms]
        if len(set(term_names)) != len(term_names):
            raise ValueError(f"method {self.name!r}: duplicate loss term names {term_names}")
        for term in self.terms:
            unknown = set(term.taps) - set(tap_names)
            if unknown:
                raise ValueError(f"method {self.name!r}: term {term.name!r} reads undeclared taps {unknown}")
        for stage in self.stages:
            unknown = set(stage.terms) - set(term_names)
            if unknown:
                raise ValueError(f"method {self.name!r}: stage {stage.name!r} names unknown terms {unknown}")
        for c in self.constraints:
            if c not in CONSTRAINTS:
                raise ValueError(f"method {self.name!r}: constraint {c!r} is not one of {CONSTRAINTS}")
        if self.teachers not in TEACHER_MODES:
            raise ValueError(
                f"method {self.name!r}: teachers {self.teachers!r} is not one of {TEACHER_MODES}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"method {self.name!r}: aggregation {self.aggregation!r} not in {AGGREGATIONS}")
        for extra in self.extras:
            if set(extra.terms) - set(term_names):
                raise ValueError(
                    f"method {self.name!r}: extra {extra.name!r} names unknown terms {extra.terms}"
                )
        option_names = [o.name for o in self.options]
        for term in self.terms:
            if term.weight_option and term.weight_option.removeprefix("1-") not in option_names:
                raise ValueError(f"method {self.name!r}: term {term.name!r} weight option is not declared")
            if any(opt not in option_names for opt, _ in term.when):
                raise ValueError(
                    f"method {self.name!r}: term {term.name!r}: `when` names an undeclared option"
                )

    def option_defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def tap(self, name: str) -> TapSpec:
        for t in self.taps:
            if t.name == name:
                return t
        raise KeyError(name)


def dim_value(
    expr: int | str, *, student: Any, teacher: Any, options: dict[str, Any], teachers: int = 1
) -> int:
    """Evaluate an `ExtraSpec` dimension expression against the two ModelSpecs and the method's options
    ("teachers" is the number of teachers, e.g. RL-KD's agent has one output per teacher)."""
    if isinstance(expr, int):
        return expr
    if expr == "teachers":
        return teachers
    side, _, attr = expr.partition(".")
    if side == "student":
        return int(getattr(student, attr))
    if side == "teacher":
        return int(getattr(teacher, attr))
    if expr.startswith("opt:"):
        return int(options[expr[4:]])
    raise ValueError(f"bad dimension expression {expr!r}")
