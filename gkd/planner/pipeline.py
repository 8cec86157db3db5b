"""The planner pipeline: config -> frontend -> facts (trace, taps) -> methods -> search -> emit, with
provenance.

Each pass is a function from the previous values to a new value; `PassRunner.run` times it, records a
one-line summary, and names the pass in any error it raises, so `gkd plan --explain` shows where time went
and a failure says which stage rejected the input.

The passes that need torch (building ModelSpecs through transformers, meta-model parameter counts, the traced
tap catalogue) produce plain data that is cached on disk (`gkd.planner.cache`; model facts once per model for
every sequence length, `gkd.planner.facts`), keyed by their inputs, a fingerprint of gkd's sources and the
torch and transformers releases; presets and reference models come precomputed in the shipped pack
(`gkd.planner.pack`). Resolving methods, search and emit are pure Python. With the facts cached or packed a
plan imports no torch and takes well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gkd.config import DEFAULT_BETAS, TRAINING_OPTIMIZERS, Config, TrainingConfig
from gkd.errors import GkdError, InputError
from gkd.planner.facts import ModelFacts, model_facts
from gkd.planner.plan import PLAN_VERSION, Alternative, PassRecord, Plan
from gkd.planner.search import Evaluated, SearchResult, search
from gkd.planner.specs import load_spec

T = TypeVar("T")


class PassRunner:
    """Runs passes in order and records each one's name, time and summary."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def run(self, name: str, fn: Callable[[], T], summary: Callable[[T], str] = lambda _: "") -> T:
        start = time.perf_counter()
        try:
            value = fn()
        except InputError as err:
            raise InputError(f"{name}: {err}") from None
        except GkdError:
            raise
        self.records.append(
            PassRecord(name=name, seconds=round(time.perf_counter() - start, 4), summary=summary(value))
        )
        return value


# ----------------------------------------------------------------------------------------------------------
# Plain-data views of what the planner reads of the resolved methods.


@dataclass(frozen=True, kw_only=True)
class TermView:
    method: str
    name: str
    kernel: str
    weight: float
    taps: tuple[str, ...]
    hard: bool
    relation_heads: int = 0  # MiniLMv2's resolved relation heads (a CPU plan's relation tiles)
    relation_causal: bool = True  # whether its relations are causal (keys j <= i)


@dataclass(frozen=True, kw_only=True)
class MethodsView:
    """What the planner reads of `gkd.methods.ResolvedMethods`."""

    teacher_taps: tuple[frozenset[str], ...]
    student_taps: frozenset[str]
    loss_terms: tuple[TermView, ...]
    extras: tuple[tuple[str, int], ...]  # (name, parameters)
    fused_linear: bool
    offline_ok: bool
    needs_teacher_forward: bool
    eager_attention: bool
    hook_ops: tuple[str, ...] = ()  # in-flight tensor operations (Theseus, DIITO, LRC-BERT), by op name

    @property
    def num_extra_parameters(self) -> int:
        return sum(n for _, n in self.extras)

    @classmethod
    def from_resolved(cls, r: Any, *, student_is_encoder: bool = False) -> MethodsView:
        options = {m.name: m.options for m in r.methods}
        return cls(
            teacher_taps=tuple(frozenset(t) for t in r.teacher_taps),
            student_taps=frozenset(r.student_taps),
            loss_terms=tuple(
                TermView(
                    method=t.method,
                    name=t.name,
                    kernel=t.kernel,
                    weight=float(t.weight),
                    taps=tuple(t.taps),
                    hard=bool(getattr(t, "hard", False)),
                    relation_heads=int(options.get(t.method, {}).get("relation_heads", 0)),
                    relation_causal=_causal(options.get(t.method, {}), student_is_encoder),
                )
                for t in r.loss_terms
            ),
            extras=tuple((e.name, int(e.num_parameters)) for e in r.extras),
            fused_linear=bool(r.fused_linear),
            offline_ok=bool(r.offline_ok),
            needs_teacher_forward=bool(r.needs_teacher_forward),
            eager_attention=bool(r.eager_attention),
            hook_ops=tuple(sorted({h.op for h in r.hook_ops})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_taps": [sorted(t) for t in self.teacher_taps],
            "student_taps": sorted(self.student_taps),
            "loss_terms": [{**dataclasses.asdict(t), "taps": list(t.taps)} for t in self.loss_terms],
            "extras": [list(e) for e in self.extras],
            "fused_linear": self.fused_linear,
            "offline_ok": self.offline_ok,
            "needs_teacher_forward": self.needs_teacher_forward,
            "eager_attention": self.eager_attention,
            "hook_ops": list(self.hook_ops),
        }


def _chain_message(chain: tuple[Any, ...]) -> str:
    """A chained method (TAKD) is several training runs, one after another: one plan each."""
    runs = [
        f"`gkd plan --teacher {link.teacher.name} --student {link.student.name} "
        f"--methods {','.join(m['name'] for m in link.methods)}`"
        for link in chain
    ]
    return f"takd is a chain of {len(chain)} separate runs, each planned on its own: " + ", then ".join(runs)


def load_methods(config: Config, teachers: list[Any], student: Any) -> MethodsView:
    """The planner's view of the resolved methods. Resolving is plain data work and imports no torch
    (gkd.methods loads torch only when a loss runs), so it is not cached."""
    from gkd.methods import resolve

    resolved = resolve([m.to_entry() for m in config.methods], teachers, student)
    if resolved.chain:
        raise InputError(_chain_message(resolved.chain))
    return MethodsView.from_resolved(resolved, student_is_encoder=bool(student.is_encoder))


def _causal(options: dict[str, Any], student_is_encoder: bool) -> bool:
    """A relation method's `causal` option as its loss reads it (auto: the student is a decoder)."""
    causal = options.get("causal", "auto")
    return (not student_is_encoder) if causal == "auto" else bool(causal)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def plan(config: Config) -> Plan:
    """Plan one distillation job (see the module docstring)."""
    if config.unset:
        raise InputError(
            f"the config does not name its {', '.join(config.unset)}; add them (e.g. teacher: "
            "tiny-llama-teacher, student: tiny-llama-student, methods: [kd])"
        )
    runner = PassRunner()
    specs = runner.run(
        "frontend",
        lambda: (
            [load_spec(config.model_path(t)) for t in config.teachers],
            load_spec(config.model_path(config.student)),
        ),
        lambda v: f"{', '.join(t.name for t in v[0])} -> {v[1].name}",
    )
    teachers, student = specs
    if config.student_init is not None:
        from gkd.runtime.student_init import check_student_init

        runner.run(
            "student_init",
            lambda: check_student_init(config.student_init, teachers[0], student),
            lambda layers: f"student blocks from teacher blocks {list(layers)}",
        )
    threshold = config.deepspeed.stage3_param_persistence_threshold
    seq = config.training.seq_len
    topk, smallest = config.training.offline_topk, min(t.vocab for t in teachers)
    if topk > smallest:
        raise InputError(
            f"frontend: training.offline_topk {topk} exceeds the teacher's vocabulary of {smallest}; use "
            f"{smallest} or less"
        )
    for spec in [*teachers, student]:
        if spec.max_positions and seq > spec.max_positions:
            raise InputError(
                f"frontend: sequence length {seq} exceeds {spec.name}'s {spec.max_positions} positions; "
                f"use --seq-len {spec.max_positions} or less"
            )
    # A plan for CPU processes traces the activations with the CPU's dropout and attention kernels.
    kernels = {"kernels": "cpu"} if config.hardware.device == "cpu" else {}
    facts = runner.run(
        "facts",
        lambda: (
            tuple(model_facts(t, seq_len=seq, persistence_threshold=threshold, **kernels) for t in teachers),
            model_facts(student, seq_len=seq, persistence_threshold=threshold, **kernels),
        ),
        lambda v: "; ".join(
            f"{f.name} {f.params / 1e9:.2f}B params, layer saves {f.saved['sdpa'] / 2**20:.1f} MiB/sequence"
            for f in (*v[0], v[1])
        ),
    )
    t_facts, s_facts = facts
    methods = runner.run(
        "methods",
        lambda: load_methods(config, teachers, student),
        lambda m: (
            f"{len(m.loss_terms)} loss terms; teacher taps {sum(len(t) for t in m.teacher_taps)}, "
            f"student taps {len(m.student_taps)}"
        ),
    )
    result = runner.run(
        "search",
        lambda: search(config, s_facts, t_facts, methods),
        lambda r: (
            f"{r.considered} candidates, {r.evaluated} replayed; "
            f"{'fits' if r.best.fits else 'does not fit'}: {r.best.strategy.describe()}"
        ),
    )
    out = runner.run(
        "emit",
        lambda: emit(config, t_facts, s_facts, methods, result, ()),
        lambda p: f"{len(p.schedule.ops)} ops",
    )
    return dataclasses.replace(out, provenance=tuple(runner.records))


def _facts_summary(f: ModelFacts) -> dict[str, Any]:
    return {
        "name": f.name,
        "params": f.params,
        "active_params": f.active_params,
        "experts": f.experts,
        "experts_per_token": f.experts_per_token,
        "layers": f.layers,
        "hidden": f.hidden,
        "heads": f.heads,
        "vocab": f.vocab,
        "largest_module": f.largest_module,
        "activation_source": f.source,
    }


def _optimizer_config(tr: TrainingConfig, *, offloaded: bool) -> dict[str, Any]:
    """The student's DeepSpeed optimizer: the type DeepSpeed builds for `training.optimizer` (the config
    accepts only those), with the learning rate and weight decay. DeepSpeed runs its "Adam" type as AdamW
    unless adam_w_mode is false, so "adam" sets it: weight decay is then Adam's L2 term, as the name says.

    Adam and AdamW run as torch's own optimizer (`torch_adam`) unless the optimizer is offloaded, where
    DeepSpeed's CPU Adam kernel is what makes the offloaded step fast. torch's needs no op to be compiled
    (DeepSpeed's fused Adam is a JIT build on a machine's first run), and a resumed run
    repeats it exactly: DeepSpeed's fused Adam on the CPU did not (its state after some steps differs once
    reloaded)."""
    params: dict[str, Any] = {"lr": tr.lr, "weight_decay": tr.weight_decay}
    if tuple(tr.adam_betas) != DEFAULT_BETAS:  # left out at the default: plans made before it stay valid
        params["betas"] = list(tr.adam_betas)
    if tr.optimizer == "adam":
        params["adam_w_mode"] = False
    if tr.optimizer in ("adam", "adamw") and not offloaded:
        params["torch_adam"] = True
    return {"type": TRAINING_OPTIMIZERS[tr.optimizer], "params": params}


def _scheduler_config(tr: TrainingConfig) -> dict[str, Any] | None:
    """The student's DeepSpeed learning-rate scheduler (deepspeed/runtime/lr_schedules.py), or None for a
    constant rate without warmup (plans made before schedules stay valid). All three warm up linearly from
    min_lr to lr over `tr.warmup` steps (DeepSpeed counts at least 2); then WarmupLR holds lr, WarmupDecayLR
    falls linearly and WarmupCosineLR along a half cosine to min_lr at `tr.steps`. WarmupDecayLR's
    warmup_min_lr is both where its warmup starts and where its decay ends; WarmupCosineLR takes both ends as
    ratios of the optimizer's lr. docs/config.md gives the formula step by step."""
    if tr.lr_schedule == "constant" and tr.warmup == 0:
        return None
    warmup = {"warmup_num_steps": max(1, tr.warmup), "warmup_type": "linear"}
    if tr.lr_schedule == "constant":
        params = {"warmup_min_lr": tr.min_lr, "warmup_max_lr": tr.lr, **warmup}
        return {"type": "WarmupLR", "params": params}
    if tr.lr_schedule == "linear":
        params = {"total_num_steps": tr.steps, "warmup_min_lr": tr.min_lr, "warmup_max_lr": tr.lr, **warmup}
        return {"type": "WarmupDecayLR", "params": params}
    ratio = tr.min_lr / tr.lr
    params = {"total_num_steps": tr.steps, "warmup_min_ratio": ratio, "cos_min_ratio": ratio, **warmup}
    return {"type": "WarmupCosineLR", "params": params}


def deepspeed_configs(
    config: Config, result: Evaluated, t_facts: tuple[ModelFacts, ...], trainable: int
) -> dict[str, Any]:
    """The DeepSpeed configs the runtime passes to deepspeed.initialize (student) and to the teacher engines;
    bucket sizes capped at each model's size and max-live at the prefetch bucket (see
    gkd.planner.memory.effective_deepspeed)."""
    from gkd.planner.memory import effective_deepspeed

    s = result.strategy
    ds, tr = effective_deepspeed(config.deepspeed, trainable), config.training
    zero: dict[str, Any] = {
        "stage": s.student_zero_stage,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if s.student_zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if s.student_zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
                "stage3_max_live_parameters": ds.stage3_max_live_parameters,
                "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
            }
        )
    if s.student_offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.student_offload == "optimizer+parameters":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    dtype_key = "bf16" if tr.dtype == "bfloat16" else "fp16"
    student = {
        "train_batch_size": tr.global_batch,
        "train_micro_batch_size_per_gpu": s.micro_batch,
        "gradient_accumulation_steps": s.grad_accum,
        dtype_key: {"enabled": True},
        "zero_optimization": zero,
        "optimizer": _optimizer_config(tr, offloaded=s.student_offload != "none"),
        "gradient_clipping": tr.clip_grad,
    }
    scheduler = _scheduler_config(tr)
    if scheduler is not None:
        student["scheduler"] = scheduler
    placement = s.offline_teacher_placement if s.teacher_placement == "offline" else s.teacher_placement
    teacher_configs: list[dict[str, Any] | None] = []
    for t in t_facts:
        tds = effective_deepspeed(config.deepspeed, t.params)
        if placement in ("zero3", "zero3_offload"):
            tz: dict[str, Any] = {
                "stage": 3,
                "stage3_prefetch_bucket_size": tds.stage3_prefetch_bucket_size,
                "stage3_max_live_parameters": tds.stage3_max_live_parameters,
                "stage3_param_persistence_threshold": tds.stage3_param_persistence_threshold,
            }
            if placement == "zero3_offload":
                tz["offload_param"] = {"device": "cpu", "pin_memory": True}
            teacher_configs.append(
                {
                    "train_micro_batch_size_per_gpu": s.micro_batch,
                    dtype_key: {"enabled": True},
                    "zero_optimization": tz,
                }
            )
        elif placement == "tensor_parallel":
            teacher_configs.append(
                {
                    "tensor_parallel": {"tp_size": s.tensor_parallel},
                    "dtype": tr.dtype,
                    "replace_with_kernel_inject": False,
                }
            )
        else:
            teacher_configs.append(None)
    return {
        "student": student,
        "teachers": teacher_configs,
        "teacher_pass": "offline" if s.teacher_placement == "offline" else "online",
    }


def emit(
    config: Config,
    t_facts: tuple[ModelFacts, ...],
    s_facts: ModelFacts,
    methods: MethodsView,
    result: SearchResult,
    provenance: tuple[PassRecord, ...],
) -> Plan:
    best = result.best
    if best.schedule is None or best.timeline is None:
        # Rejected before replay (resident bytes alone exceed the budget): replay it to report its breakdown.
        from gkd.planner.search import _Evaluator

        best = _Evaluator(config, s_facts, t_facts, methods).evaluate(best.strategy)
    assert best.schedule is not None and best.timeline is not None
    tr = config.training
    estimates: dict[str, Any] = {
        "step_time_s": round(best.cost.step_time_s, 4),
        "tokens_per_s": round(best.cost.tokens_per_s, 1),
        "step_parts_s": {k: round(v, 4) for k, v in best.cost.parts.items()},
        "peak_op": best.timeline.peak_op,
        "disk_bytes": best.disk_bytes,
        "recomputed_layers": len(best.strategy.recompute_layers),
        "candidates": result.considered,
        "replayed": result.evaluated,
    }
    if config.hardware.nodes > 1:  # the collectives' share between nodes (gkd.planner.cost.collective)
        estimates["inter_node_bytes_per_gpu"] = round(best.cost.inter_node_bytes)
        estimates["inter_node_s"] = round(best.cost.inter_node_s, 4)
    if best.info is not None:  # the host memory's parts; host_bytes is the largest (gkd.planner.memory)
        h = best.info.host
        estimates["host_parts_bytes"] = {"steady": h.steady, "load": h.load, "save": h.save}
    if best.strategy.teacher_placement == "offline":
        flops = config.hardware.peak_flops * config.hardware.flops_efficiency
        from gkd.planner.cost import forward_flops
        from gkd.planner.search import model_shape

        tokens_total = tr.steps * tr.global_batch * tr.seq_len
        per_gpu = tokens_total / config.hardware.gpus
        t_time = sum(
            forward_flops(
                model_shape(t),
                1,
                tr.seq_len,
            )
            / flops
            * per_gpu
            / tr.seq_len
            for t in t_facts
        )
        estimates["offline_teacher_pass_s"] = round(t_time, 1)
        estimates["offline_tokens"] = tokens_total
    resolved_config = config.to_dict()
    # Model references as the runtime must open them (paths resolved against the config's folder).
    resolved_config["teachers"] = [config.model_path(t) for t in config.teachers]
    resolved_config["student"] = config.model_path(config.student)
    if config.trust_remote_code:
        resolved_config["trust_remote_code"] = [config.model_path(r) for r in config.trust_remote_code]
    inputs = {
        "config": resolved_config,
        "models": {"teachers": [_facts_summary(f) for f in t_facts], "student": _facts_summary(s_facts)},
        "methods": methods.to_dict(),
    }
    alternatives = tuple(
        Alternative(
            strategy=e.strategy,
            peak_bytes=e.peak_bytes,
            fits=e.fits,
            step_time_s=round(e.cost.step_time_s, 4),
            reason=reason,
        )
        for e, reason in result.runners_up
    )
    return Plan(
        version=PLAN_VERSION,
        inputs=json.loads(json.dumps(inputs)),
        fits=best.fits,
        budget_bytes=config.hardware.gpu_memory_bytes,
        peak_bytes=best.timeline.peak_bytes,
        memory=dict(best.timeline.by_category),
        host_bytes=best.host_bytes,
        strategy=dataclasses.replace(best.strategy, taps=best.info.tap_costs) if best.info else best.strategy,
        schedule=best.schedule,
        deepspeed=json.loads(
            json.dumps(
                deepspeed_configs(config, best, t_facts, s_facts.params + methods.num_extra_parameters)
            )
        ),
        estimates=estimates,
        alternatives=alternatives,
        provenance=provenance,
    )
