"""Search: the strategy with the lowest estimated step time whose predicted peak fits every GPU.

The space: student ZeRO stage 0-3 with optimizer / parameter offload; teacher placement (replicated, ZeRO-3
sharded inference, ZeRO-3 with host offload, tensor parallel of each degree that divides a node and the head
count, offline top-k when every teacher tap is logits); micro-batch (and so gradient accumulation); where
intermediate-tap losses run (layerwise or end); the logit-loss path (fused-linear or plain logits); and,
inside
each candidate, which student layers to recompute (a knapsack solved by `gkd.planner.recompute`, not
all-or-nothing). User overrides pin any of these.

How: every candidate's resident bytes and host bytes are checked first (cheap); the rest are ordered by their
step time without recompute, a lower bound on their time with recompute, and replayed in that order
(`build_schedule` + `simulate`), solving recompute where the peak exceeds the budget. The search stops once
the next lower bound cannot beat the best plan found (branch and bound). Runners-up are the best candidate of
every other teacher placement and student sharding, each with the reason it lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from gkd.config import Config
from gkd.planner.analysis import WorkloadInfo, build_workload, resident_tensors
from gkd.planner.cost import (
    Generation,
    ModelShape,
    StepCost,
    bottleneck,
    layer_forward_flops,
    step_cost,
)
from gkd.planner.facts import ModelFacts
from gkd.planner.memory import reserve_bytes
from gkd.planner.plan import Schedule, Strategy, TensorAlloc, human_bytes
from gkd.planner.recompute import solve
from gkd.planner.schedule import Timeline, Workload, build_schedule, simulate

STUDENT_CHOICES = (
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (1, "optimizer"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
    (3, "optimizer+parameters"),
)
GiB = 1 << 30
NOTHING_FITS_REPLAYS = 40  # when nothing fits, how many of the least-resident candidates are replayed
TIE = 0.005  # step times within 0.5% are a tie, broken by the simpler strategy (see _simplicity)
PLACEMENT_RANK = {"replicated": 0, "tensor_parallel": 1, "offline": 2, "zero3": 3, "zero3_offload": 4}


def _simplicity(e: Evaluated) -> tuple[int, ...]:
    """Lower is simpler: less host memory in use while training (offload; not the brief staging of loading
    and saving, which is smaller for sharded models), a less sharded teacher, a lower ZeRO stage, no
    offload, fewer recomputed layers, then the lower peak."""
    s = e.strategy
    return (
        e.info.host.steady if e.info is not None else e.host_bytes,
        PLACEMENT_RANK[s.teacher_placement],
        s.tensor_parallel,
        s.student_zero_stage,
        STUDENT_CHOICES.index((s.student_zero_stage, s.student_offload)),
        len(s.recompute_layers),
        e.peak_bytes,
    )


def _better(a: Evaluated, b: Evaluated) -> bool:
    """Whether fitting candidate `a` beats fitting candidate `b`."""
    ta, tb = a.cost.step_time_s, b.cost.step_time_s
    if abs(ta - tb) > TIE * min(ta, tb):
        return ta < tb
    return _simplicity(a) < _simplicity(b)


gib = human_bytes


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """One candidate after replay: its final strategy (with recompute), schedule, timeline and cost."""

    strategy: Strategy
    schedule: Schedule | None
    timeline: Timeline | None
    peak_bytes: int
    fits_gpu: bool
    host_bytes: int
    disk_bytes: int
    fits_host: bool
    cost: StepCost
    info: WorkloadInfo | None
    why: str = ""  # set when it does not fit

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    best: Evaluated
    runners_up: tuple[tuple[Evaluated, str], ...]
    evaluated: int
    considered: int


def generation_work(config: Config, s: Strategy) -> Generation | None:
    """The sampling work the cost model counts for a generating config (gkd.planner.cost.Generation)."""
    g = config.generation
    if g.mode == "off":
        return None
    share = float(g.fraction or 0)
    placement = None
    if g.mode == "sequence_kd":
        offline = s.teacher_placement == "offline"
        placement = (s.offline_teacher_placement or "replicated") if offline else s.teacher_placement
    return Generation(student_share=share, teacher_placement=placement, new=g.max_new_tokens)


def model_shape(f: ModelFacts) -> ModelShape:
    """What the cost model needs of a model's facts (its active parameters too, for compute)."""
    return ModelShape(
        params=f.params,
        layers=f.layers,
        hidden=f.hidden,
        layer_params=f.layer_params,
        active_params=f.active_params,
        active_layer_params=f.active_layer_params,
    )


def micro_batch_choices(config: Config) -> list[int]:
    per_gpu = config.training.per_gpu_batch(config.hardware.gpus)
    if config.overrides.micro_batch is not None:
        return [config.overrides.micro_batch]
    if config.training.micro_batch:
        return sorted(set(config.training.micro_batch))
    out = {per_gpu}
    mb = 1
    while mb < per_gpu:
        if per_gpu % mb == 0:
            out.add(mb)
        mb *= 2
    return sorted(out)


def tensor_parallel_degrees(local_gpus: int, heads: Sequence[int]) -> list[int]:
    """The tensor-parallel degrees the search considers: above 1, dividing the GPUs of a node and every
    teacher's head count."""
    return [tp for tp in range(2, local_gpus + 1) if local_gpus % tp == 0 and all(h % tp == 0 for h in heads)]


def _offline_refusal(resolved: Any) -> str:
    """Why these methods cannot run against an offline teacher's stored top-k, and what would."""
    # "final" stands for the logits where a fused-linear loss takes the final hidden state instead.
    if not all(t and t <= {"logits", "topk", "final"} for t in resolved.teacher_taps):
        return (
            "the offline teacher stores only logits, and these methods read the teacher's intermediate "
            "tensors; drop those methods or choose another teacher_placement"
        )
    return (
        "the offline teacher stores the top-k of the teacher's log-probs, and not every loss here can be "
        "computed from a top-k at one temperature (kd with soft kl or soft_ce, fkl and topk_kl can); use "
        "those or choose another teacher_placement"
    )


def candidates(
    config: Config, student: ModelFacts, teachers: tuple[ModelFacts, ...], resolved: Any
) -> list[Strategy]:
    """Every strategy the overrides allow (recompute is decided per candidate)."""
    ov = config.overrides
    per_gpu = config.training.per_gpu_batch(config.hardware.gpus)
    local = config.hardware.local_gpus
    placements: list[tuple[str, int]] = [("replicated", 1), ("zero3", 1), ("zero3_offload", 1)]
    # A mixture-of-experts teacher is not split: DeepSpeed's automatic tensor parallelism splits linear
    # layers, not the 3-D tensors that hold a layer's experts (gkd.planner.moe).
    splittable = not any(t.experts for t in teachers)
    if not splittable and ov.teacher_placement == "tensor_parallel":
        from gkd.errors import InputError

        raise InputError(
            "a mixture-of-experts teacher cannot be tensor parallel (its experts are 3-D tensors "
            "that DeepSpeed's automatic tensor parallelism does not split); use another teacher_placement"
        )
    for tp in tensor_parallel_degrees(local, [t.heads for t in teachers]) if splittable else []:
        placements.append(("tensor_parallel", tp))
    from gkd.errors import InputError

    if resolved.offline_ok:
        placements.append(("offline", 1))
        if not resolved.needs_teacher_forward:
            placements = [("offline", 1)]  # the teacher output is read from storage (e.g. topk_kl)
    if ov.teacher_placement is not None:
        placements = [p for p in placements if p[0] == ov.teacher_placement]
        if ov.teacher_placement == "offline" and not placements:
            raise InputError(f"overrides.teacher_placement offline: {_offline_refusal(resolved)}")
    if ov.loss_path is not None:
        # The offline teacher's loss path is the stored top-k: a pinned logits or fused_linear path rules it
        # out.
        if placements == [("offline", 1)]:
            raise InputError(
                f"overrides.loss_path {ov.loss_path} needs a live teacher, but these methods read the "
                "teacher's stored top-k (offline); remove overrides.loss_path"
            )
        placements = [p for p in placements if p[0] != "offline"]
        if ov.loss_path == "fused_linear" and not resolved.fused_linear:
            readers = [t for t in resolved.loss_terms if any(x.endswith(":logits") for x in t.taps)]
            names = ", ".join(sorted({f"{t.method}.{t.name}" for t in readers}))
            why = (
                f"not every logit term ({names}) can take the final hidden state"
                if names
                else "no loss term reads the logits"
            )
            raise InputError(
                f"overrides.loss_path fused_linear: {why}; remove overrides.loss_path or set it to logits"
            )
    if ov.tensor_parallel is not None:
        placements = [p for p in placements if p[0] != "tensor_parallel" or p[1] == ov.tensor_parallel]
    choices = [
        c
        for c in STUDENT_CHOICES
        if (ov.student_zero_stage is None or c[0] == ov.student_zero_stage)
        and (ov.student_offload is None or c[1] == ov.student_offload)
    ]
    has_tap_terms = any(
        not any(x.endswith((":logits", ":topk")) for x in t.taps) for t in resolved.loss_terms
    )
    # Hook ops (Theseus, DIITO, LRC-BERT) run extra student forwards whose losses read taps at the end.
    layerwise_ok = has_tap_terms and not resolved.hook_ops
    if ov.tap_loss == "layerwise" and resolved.hook_ops:
        ops = ", ".join(resolved.hook_ops)
        raise InputError(
            f"overrides.tap_loss layerwise cannot be used with the hook ops {ops}: their extra forwards need "
            "the tap losses at the end of the step; remove overrides.tap_loss or set it to end"
        )
    tap_places = [ov.tap_loss] if ov.tap_loss else (["layerwise", "end"] if layerwise_ok else ["end"])
    attention = "eager" if resolved.eager_attention else "sdpa"
    out: list[Strategy] = []
    for mb in micro_batch_choices(config):
        if per_gpu % mb:
            continue
        for placement, tp in placements:
            paths = (
                ["topk"]
                if placement == "offline"
                else (["fused_linear", "logits"] if resolved.fused_linear else ["logits"])
            )
            if ov.loss_path is not None:
                paths = [p for p in paths if p == ov.loss_path]
            for stage, offload in choices:
                for tap_loss in tap_places:
                    for path in paths:
                        out.append(
                            Strategy(
                                student_zero_stage=stage,
                                student_offload=offload,
                                teacher_placement=placement,
                                tensor_parallel=tp,
                                micro_batch=mb,
                                grad_accum=per_gpu // mb,
                                tap_loss=tap_loss,
                                loss_path=path,
                                attention=attention,
                                recompute_layers=tuple(ov.recompute_layers or ()),
                            )
                        )
    return out


class _Evaluator:
    def __init__(self, config: Config, student: ModelFacts, teachers: tuple[ModelFacts, ...], resolved: Any):
        self.config, self.student, self.teachers, self.resolved = config, student, teachers, resolved
        self.budget = config.hardware.gpu_memory_bytes
        self.s_shape = model_shape(student)
        self.t_shapes = tuple(model_shape(t) for t in teachers)
        self.trainable = student.params + resolved.num_extra_parameters

    def cost(self, s: Strategy, topk: int = 0) -> StepCost:
        c, tr = self.config, self.config.training
        return step_cost(
            hw=c.hardware,
            student=self.s_shape,
            student_trainable=self.trainable,
            teachers=self.t_shapes,
            stage=s.student_zero_stage,
            offload=s.student_offload,
            placement=s.teacher_placement,
            tensor_parallel=s.tensor_parallel,
            micro_batch=s.micro_batch,
            grad_accum=s.grad_accum,
            seq=tr.seq_len,
            recomputed_layers=len(s.recompute_layers),
            global_batch=tr.global_batch,
            topk_bytes_per_micro=topk,
            reduce_bucket=min(c.deepspeed.reduce_bucket_size, max(self.trainable, 1)),
            generation=generation_work(c, s),
        )

    def workload(self, s: Strategy) -> tuple[Workload, WorkloadInfo]:
        return build_workload(
            config=self.config,
            student=self.student,
            teachers=self.teachers,
            resolved=self.resolved,
            strategy=s,
        )

    def replay(self, w: Workload, s: Strategy) -> tuple[Schedule, Timeline]:
        sched = build_schedule(w, s)
        tl = simulate(sched)
        reserve = reserve_bytes(tl.peak_bytes, self.config.hardware)
        sched = Schedule(
            grad_accum=sched.grad_accum,
            ops=sched.ops,
            static=(*sched.static, TensorAlloc(name="reserve", bytes=reserve, category="reserve")),
        )
        return sched, simulate(sched)

    def evaluate(self, s: Strategy) -> Evaluated:
        hw = self.config.hardware
        if s.teacher_placement == "offline":
            s = self._offline_placement(s)
        w, info = self.workload(s)
        fits_host = info.host_bytes <= hw.host_memory_bytes and info.disk_bytes <= hw.disk_bytes
        pinned = self.config.overrides.recompute_layers is not None
        sched, tl = self.replay(w, s)
        if tl.peak_bytes > self.budget and not pinned:
            s, sched, tl = self._recompute(w, s, sched, tl)
        cost = self.cost(s, info.topk_bytes)
        why = ""
        if tl.peak_bytes > self.budget:
            top = max((k for k in tl.by_category if k != "reserve"), key=lambda k: tl.by_category[k])
            why = (
                f"peak {gib(tl.peak_bytes)} > budget {gib(self.budget)} at {tl.peak_op} "
                f"({top} {gib(tl.by_category[top])})"
            )
        elif info.host_bytes > hw.host_memory_bytes:
            why = f"needs {gib(info.host_bytes)} host memory per node > {gib(hw.host_memory_bytes)}"
        elif info.disk_bytes > hw.disk_bytes:
            why = f"needs {info.disk_bytes / 1e12:.1f} TB disk > {hw.disk_bytes / 1e12:.1f} TB"
        return Evaluated(
            strategy=s,
            schedule=sched,
            timeline=tl,
            peak_bytes=tl.peak_bytes,
            fits_gpu=tl.peak_bytes <= self.budget,
            host_bytes=info.host_bytes,
            disk_bytes=info.disk_bytes,
            fits_host=fits_host,
            cost=cost,
            info=info,
            why=why,
        )

    def _offline_placement(self, s: Strategy) -> Strategy:
        """The offline teacher pass runs alone: ZeRO-3 sharded when that fits, else streamed from the host."""
        if s.offline_teacher_placement:
            return s
        for placement in ("zero3", "zero3_offload"):
            trial = replace(s, offline_teacher_placement=placement)
            w, _ = self.workload(trial)
            offline = sum(a.bytes for a in w.offline_allocs)
            if offline + reserve_bytes(offline, self.config.hardware) <= self.budget:
                return trial
        return replace(s, offline_teacher_placement="zero3_offload")

    def _recompute(
        self, w: Workload, s: Strategy, sched: Schedule, tl: Timeline
    ) -> tuple[Strategy, Schedule, Timeline]:
        st = w.student
        layers = list(range(st.layers))
        every = replace(s, recompute_layers=tuple(layers))
        sched_all, tl_all = self.replay(w, every)
        if tl_all.peak_bytes > self.budget:
            return every, sched_all, tl_all
        sizes = []
        for i in layers:
            tapped = sum(b for n, b, saved in st.layer_taps[i] if saved and not n.startswith("hidden["))
            sizes.append(max(st.saved - st.checkpoint - tapped, 0))
        flops = self.config.hardware.peak_flops * self.config.hardware.flops_efficiency
        one = layer_forward_flops(self.s_shape, s.micro_batch, self.config.training.seq_len) / flops
        costs = [one] * len(layers)
        needed = tl.peak_bytes - self.budget
        for _ in range(6):
            chosen = solve(sizes, costs, sum(sizes) - needed)
            trial = replace(s, recompute_layers=tuple(sorted(chosen)))
            sched_t, tl_t = self.replay(w, trial)
            if tl_t.peak_bytes <= self.budget:
                return trial, sched_t, tl_t
            if len(chosen) == len(layers):
                break
            needed += tl_t.peak_bytes - self.budget
        return every, sched_all, tl_all


def search(
    config: Config, student: ModelFacts, teachers: tuple[ModelFacts, ...], resolved: Any
) -> SearchResult:
    """The best strategy (see the module docstring) and the runners-up with the reason each lost."""
    bad = [i for i in config.overrides.recompute_layers or () if i >= student.layers]
    if bad:
        from gkd.errors import InputError

        raise InputError(
            f"overrides.recompute_layers {bad} are beyond the student's {student.layers} layers "
            f"(0..{student.layers - 1}); remove them"
        )
    ev = _Evaluator(config, student, teachers, resolved)
    cands = candidates(config, student, teachers, resolved)
    if not cands:
        from gkd.errors import InputError

        per_gpu = config.training.per_gpu_batch(config.hardware.gpus)
        sizes = micro_batch_choices(config)
        if not any(per_gpu % mb == 0 for mb in sizes):
            where = (
                "overrides.micro_batch"
                if config.overrides.micro_batch is not None
                else "training.micro_batch"
            )
            fits = [mb for mb in range(1, per_gpu + 1) if per_gpu % mb == 0]
            raise InputError(
                f"{where} {', '.join(map(str, sizes))} does not divide the per-GPU batch {per_gpu} "
                f"(global batch {config.training.global_batch} / {config.hardware.gpus} GPUs); use one of "
                f"{', '.join(map(str, fits))}"
            )
        raise InputError("the overrides leave no strategy to plan; relax them")
    hw = config.hardware
    done: dict[tuple[Any, ...], Evaluated] = {}

    def run(s: Strategy) -> Evaluated:
        key = s.key()
        if key not in done:
            done[key] = ev.evaluate(s)
        return done[key]

    # Cheap screen: resident bytes and host bytes, before any replay.
    screened: list[tuple[float, Strategy]] = []
    resident_of: dict[tuple[Any, ...], int] = {}
    rejected: list[Evaluated] = []
    for s in cands:
        if s.teacher_placement == "offline":
            s = ev._offline_placement(s)
            w, info = ev.workload(s)
            static, host_bytes, disk_bytes, topk = w.static, info.host_bytes, info.disk_bytes, info.topk_bytes
        else:
            static, host_bytes = resident_tensors(
                config=config, student=student, teachers=teachers, resolved=resolved, strategy=s
            )
            disk_bytes = topk = 0
        resident = sum(a.bytes for a in static) + reserve_bytes(0, hw)  # the CUDA context
        lower = ev.cost(s, topk)
        if s.teacher_placement != "offline" and resident > ev.budget:
            top = max(static, key=lambda a: a.bytes)
            rejected.append(
                Evaluated(
                    strategy=s,
                    schedule=None,
                    timeline=None,
                    peak_bytes=resident,
                    fits_gpu=False,
                    host_bytes=host_bytes,
                    disk_bytes=disk_bytes,
                    fits_host=host_bytes <= hw.host_memory_bytes,
                    cost=lower,
                    info=None,
                    why=f"resident {gib(resident)} > budget {gib(ev.budget)} before activations "
                    f"({top.name} {gib(top.bytes)})",
                )
            )
            continue
        if host_bytes > hw.host_memory_bytes:
            rejected.append(
                Evaluated(
                    strategy=s,
                    schedule=None,
                    timeline=None,
                    peak_bytes=resident,
                    fits_gpu=resident <= ev.budget,
                    host_bytes=host_bytes,
                    disk_bytes=disk_bytes,
                    fits_host=False,
                    cost=lower,
                    info=None,
                    why=f"needs {gib(host_bytes)} host memory per node > {gib(hw.host_memory_bytes)}",
                )
            )
            continue
        screened.append((lower.step_time_s, s))
        resident_of[s.key()] = resident
    screened.sort(key=lambda x: x[0])

    best: Evaluated | None = None
    for lower_bound, s in screened:
        if best is not None and best.fits and lower_bound > best.cost.step_time_s * (1 + TIE):
            break
        e = run(s)
        if e.fits and (best is None or not best.fits or _better(e, best)):
            best = e
    if best is None or not best.fits:
        # Nothing fits: replay the candidates with the least resident memory and keep the lowest peak.
        for s in sorted((s for _, s in screened), key=lambda s: resident_of[s.key()])[:NOTHING_FITS_REPLAYS]:
            run(s)
        pool = list(done.values()) or rejected
        best = min(pool, key=lambda e: (not e.fits_host, e.peak_bytes))

    # Runners-up: the best of every other placement and every other student sharding.
    groups: dict[tuple[Any, ...], Evaluated] = {}
    for _, s in screened:
        for key in (
            ("placement", s.teacher_placement, s.tensor_parallel),
            ("student", s.student_zero_stage, s.student_offload),
        ):
            if key not in groups:
                groups[key] = run(s)
    for e in rejected:
        for key in (
            ("placement", e.strategy.teacher_placement, e.strategy.tensor_parallel),
            ("student", e.strategy.student_zero_stage, e.strategy.student_offload),
        ):
            groups.setdefault(key, e)
    end_variant = replace(
        best.strategy, tap_loss="end", recompute_layers=tuple(config.overrides.recompute_layers or ())
    )
    if best.strategy.tap_loss == "layerwise" and config.overrides.tap_loss is None:
        groups[("tap_loss", "end")] = run(end_variant)
    runners: list[tuple[Evaluated, str]] = []
    seen = {best.strategy.key()}
    for e in sorted(
        groups.values(), key=lambda e: (not e.fits, e.cost.step_time_s if e.fits else e.peak_bytes)
    ):
        if e.strategy.key() in seen:
            continue
        seen.add(e.strategy.key())
        runners.append((e, _reason(e, best)))
    return SearchResult(best=best, runners_up=tuple(runners), evaluated=len(done), considered=len(cands))


def _reason(e: Evaluated, best: Evaluated) -> str:
    if not e.fits:
        return e.why
    slower = e.cost.step_time_s / best.cost.step_time_s - 1 if best.cost.step_time_s else 0.0
    return (
        f"fits ({gib(e.peak_bytes)}) but step {e.cost.step_time_s:.2f} s vs {best.cost.step_time_s:.2f} s "
        f"(+{slower:.0%}; {bottleneck(e.cost.parts)})"
    )
