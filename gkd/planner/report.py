"""What `gkd plan` prints: the verdict, the per-GPU breakdown, the strategy, taps, schedule, estimates and the
runners-up; and, when nothing fits, the smallest changes that would, each found by re-planning.

Everything here reads a Plan (plain data) and formats it; `suggest` is the one function that plans again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gkd.config import Config, apply_flags, gpu_label
from gkd.errors import InputError
from gkd.planner.plan import CATEGORIES, Plan, human_bytes

GiB = 1 << 30
RUNNERS_UP_SHOWN = 8

PLACEMENT_WORDS = {
    "replicated": "replicated on every GPU",
    "zero3": "ZeRO-3 sharded inference (weights partitioned over the GPUs, gathered layer by layer)",
    "zero3_offload": "ZeRO-3 with host offload (weights in pinned host memory, streamed layer by layer with "
    "prefetch)",
    "tensor_parallel": "tensor parallel",
    "offline": "offline: a teacher pass first stores top-k log-probs on disk; the student trains against "
    "them",
}


size = human_bytes


def param_count(n: int, digits: int = 1) -> str:
    """A parameter count the way model names give it: 128.7B, 125.0M, 35.0K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


def model_size(summary: dict[str, Any], digits: int = 1) -> str:
    """A model's parameter count; for a mixture-of-experts model its total (what memory holds) and active
    parameters (what a token's forward runs through, what compute counts) with its routing."""
    total = param_count(summary.get("params", 0), digits=digits)
    experts = summary.get("experts", 0)
    if not experts:
        return total
    active = param_count(summary.get("active_params", 0), digits=digits)
    return (
        f"{total} total, {active} active: {summary.get('experts_per_token')} of {experts} experts per token"
    )


def _layers(ids: tuple[int, ...]) -> str:
    if not ids:
        return "none"
    runs: list[str] = []
    start = prev = ids[0]
    for i in (*ids[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs)


def render(plan: Plan, *, explain: bool = False) -> str:
    """The human-readable report of a plan."""
    cfg = plan.inputs.get("config", {})
    models = plan.inputs.get("models", {})
    hw = cfg.get("hardware", {})
    tr = cfg.get("training", {})
    s = plan.strategy
    st = models.get("student", {})
    teachers = models.get("teachers", [])
    lines: list[str] = []
    methods = " + ".join(m["name"] for m in cfg.get("methods", []))
    tnames = ", ".join(f"{t['name']} ({model_size(t)})" for t in teachers)
    student = f"{st.get('name')} ({model_size(st, digits=2)})"
    lines.append(f"gkd plan: {tnames} -> {student} with {methods}")
    gpu = gpu_label(hw.get("gpu_name", ""), plan.budget_bytes)
    lines.append(
        f"  sequence {tr.get('seq_len')}, global batch {tr.get('global_batch')}, {hw.get('gpus')} x "
        f"{gpu} ({size(plan.budget_bytes)} each), host {size(hw.get('host_memory_bytes', 0))}"
    )
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append("")
    lines.append(
        f"{verdict}: peak {size(plan.peak_bytes)} of {size(plan.budget_bytes)} per GPU "
        f"(at {plan.estimates.get('peak_op')}); host memory {size(plan.host_bytes)} per node; "
        f"disk {size(plan.estimates.get('disk_bytes', 0))}"
    )
    parts = plan.estimates.get("host_parts_bytes")
    if parts:  # what host_bytes is the largest of (gkd.planner.memory.host_memory)
        lines.append(
            f"  host memory per node: {size(parts['load'])} loading the models, {size(parts['steady'])} "
            f"training, {size(parts['save'])} saving the student"
        )
    lines.append("")
    lines.append("Memory on the most loaded GPU at its peak (all GPUs are symmetric):")
    lines.append(f"  {'category':<16}{'bytes':>12}{'share':>8}")
    for c in CATEGORIES:
        v = plan.memory[c]
        lines.append(f"  {c:<16}{size(v):>12}{v / plan.peak_bytes if plan.peak_bytes else 0:>8.1%}")
    lines.append(f"  {'total':<16}{size(plan.peak_bytes):>12}")
    lines.append("")
    lines.append("Strategy:")
    offload = {
        "none": "",
        "optimizer": ", optimizer states offloaded to the host",
        "optimizer+parameters": ", optimizer states and weights offloaded to the host",
    }[s.student_offload]
    lines.append(f"  student: ZeRO-{s.student_zero_stage}{offload}")
    words = PLACEMENT_WORDS[s.teacher_placement]
    if s.teacher_placement == "tensor_parallel":
        words += f" over {s.tensor_parallel} GPUs"
    if s.teacher_placement == "offline":
        words += f" (teacher pass: {s.offline_teacher_placement})"
    lines.append(f"  teacher: {words}")
    lines.append(
        f"  micro-batch {s.micro_batch} x {s.grad_accum} accumulation steps per GPU; attention {s.attention}"
    )
    student_layers = st.get("layers", 0)
    lines.append(
        f"  recompute: {len(s.recompute_layers)} of {student_layers} student layers "
        f"({_layers(s.recompute_layers)})"
    )
    lines.append(f"  intermediate-tap losses: {s.tap_loss}; logit loss: {s.loss_path}")
    if s.taps:
        lines.append("")
        lines.append("Taps per micro-batch:")
        lines.append(f"  {'method':<12}{'model':<10}{'tap':<12}{'bytes':>12}  freed")
        for t in s.taps:
            lines.append(f"  {t.method:<12}{t.model:<10}{t.tap:<12}{size(t.bytes):>12}  {t.freed}")
    lines.append("")
    lines.append(f"Schedule (one micro-step, run {plan.schedule.grad_accum}x per optimizer step):")
    lines.extend("  " + x for x in schedule_brief(plan))
    lines.append("")
    e = plan.estimates
    parts = ", ".join(
        f"{k.replace('_', ' ')} {v:.2f} s" for k, v in e.get("step_parts_s", {}).items() if v > 0
    )
    lines.append(
        f"Estimates: step {e.get('step_time_s', 0):.2f} s, {e.get('tokens_per_s', 0):,.0f} tokens/s ({parts})"
    )
    if "inter_node_bytes_per_gpu" in e:
        lines.append(
            f"  between nodes: {hw.get('gpus')} GPUs on {hw['gpus'] // hw['gpus_per_node']} nodes of "
            f"{hw['gpus_per_node']}; {size(e['inter_node_bytes_per_gpu'])} per GPU per step cross them at "
            f"{hw.get('inter_node_bandwidth', 0) / 1e9:g} GB/s, {e['inter_node_s']:.2f} s of the step's "
            "collectives (in the transfer parts above)"
        )
    if "offline_teacher_pass_s" in e:
        lines.append(
            f"  offline teacher pass: {e['offline_teacher_pass_s'] / 3600:.1f} h for "
            f"{e['offline_tokens']:,} tokens ({tr.get('steps')} steps), disk {size(e.get('disk_bytes', 0))}"
        )
    if plan.alternatives:
        lines.append("")
        shown = plan.alternatives[:RUNNERS_UP_SHOWN]
        more = len(plan.alternatives) - len(shown)
        lines.append("Runners-up" + (f" (best {len(shown)}; {more} more in the plan JSON):" if more else ":"))
        for a in shown:
            lines.append(f"  - {a.strategy.describe()}")
            lines.append(f"      {a.reason}")
    if explain:
        lines.append("")
        lines.append("Passes:")
        for p in plan.provenance:
            lines.append(f"  {p.name:<10}{p.seconds * 1000:>9.1f} ms  {p.summary}")
    return "\n".join(lines)


SECTIONS = {
    "offline_teacher_pass": "offline teacher pass",
    "load_topk": "load stored top-k",
    "teacher_forward": "forward",
    "student_forward": "forward",
    "tap_loss": "losses",
    "logit_loss": "losses",
    "student_recompute": "backward",
    "student_backward": "backward",
    "optimizer_step": "optimizer step",
    "generate": "generation",
}


def schedule_brief(plan: Plan) -> list[str]:
    """The schedule in sections (teacher forward, student forward, losses, backward, step), in order."""
    out: list[str] = []
    groups: list[tuple[str, list[Any]]] = []
    for op in plan.schedule.ops:
        section = SECTIONS.get(op.kind, op.kind)
        label = f"{op.model} {section}" if section in ("forward", "backward", "generation") else section
        if groups and groups[-1][0] == label:
            groups[-1][1].append(op)
        else:
            groups.append((label, [op]))
    for label, ops in groups:
        taps = sorted({t for op in ops for t in op.taps if op.kind != "tap_loss"})
        losses = [f"{x} (after layer {op.layer})" if op.layer >= 0 else x for op in ops for x in op.losses]
        recomputed = sum(1 for op in ops if op.kind == "student_recompute")
        allocated = max(sum(a.bytes for a in op.allocs) for op in ops)
        parts = [f"{len(ops)} op" + ("s" if len(ops) != 1 else ""), f"largest allocation {size(allocated)}"]
        if recomputed:
            parts.append(f"{recomputed} layers recomputed")
        cache = sum(a.bytes for op in ops for a in op.allocs if a.name.endswith(".kv_cache"))
        if cache:
            parts.append(f"key/value cache {size(cache)}")
        if taps:
            parts.append("captures " + ", ".join(taps[:8]) + (" ..." if len(taps) > 8 else ""))
        if losses:
            parts.append("computes " + ", ".join(losses))
        phase = {
            "offline": " [before training]",
            "before": " [once, before training]",
            "step": " [once per optimizer step]",
        }.get(ops[0].phase, "")
        out.append(f"{label}{phase}: " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------------------
# Suggestions when nothing fits


def _try(config: Config, **flags: Any) -> Plan | None:
    from gkd.planner.pipeline import plan as make_plan

    try:
        candidate = apply_flags(config, **flags)
        result = make_plan(candidate)
    except InputError:
        return None
    return result if result.fits else None


def suggest(config: Config, plan: Plan) -> list[str]:
    """The smallest changes that make the job fit, each verified by planning again."""
    out: list[str] = []
    hw, tr = config.hardware, config.training
    # Host memory: the least host memory among strategies that fit the GPUs.
    host_needs = [a for a in plan.alternatives if "host memory" in a.reason]
    if plan.host_bytes > hw.host_memory_bytes or host_needs:
        need = plan.host_bytes
        step = 64 * GiB
        target = -(-max(need, hw.host_memory_bytes + step) // step) * step
        for _ in range(6):
            p = _try(config, host_memory=f"{target // GiB}GiB")
            if p is not None:
                out.append(
                    f"host memory {size(target)} per node (--host-memory {target // GiB}GiB): "
                    f"peak {size(p.peak_bytes)}, host {size(p.host_bytes)}"
                )
                break
            target *= 2
    # Sequence length: halve up to three times (one trace per model serves every length; gkd.planner.probe).
    seq = tr.seq_len // 2
    while seq >= max(8, tr.seq_len // 8):
        p = _try(config, seq_len=seq)
        if p is not None:
            out.append(f"sequence length {seq} (--seq-len {seq}): peak {size(p.peak_bytes)}")
            break
        seq //= 2
    # Micro-batch 1 when the user pinned a larger one.
    pinned = config.overrides.micro_batch or (min(tr.micro_batch) if tr.micro_batch else None)
    if pinned and pinned > 1:
        p = _try(config, micro_batch="1")
        if p is not None:
            out.append(f"micro-batch 1 (--micro-batch 1): peak {size(p.peak_bytes)}")
    # More GPUs (whole nodes beyond one).
    gpus = hw.gpus * 2
    while gpus <= 64:
        batch = tr.global_batch if tr.global_batch % gpus == 0 else gpus * -(-tr.global_batch // gpus)
        p = _try(config, gpus=gpus, global_batch=batch)
        if p is not None:
            extra = f" and --global-batch {batch}" if batch != tr.global_batch else ""
            out.append(f"{gpus} GPUs (--gpus {gpus}{extra}): peak {size(p.peak_bytes)}")
            break
        gpus *= 2
    # A lighter method: drop one method at a time.
    if len(config.methods) > 1:
        for m in config.methods:
            rest = ",".join(x.name for x in config.methods if x.name != m.name)
            lighter = dataclasses.replace(
                config, methods=tuple(x for x in config.methods if x.name != m.name)
            )
            p = _try(lighter)
            if p is not None:
                out.append(f"without {m.name} (--methods {rest}): peak {size(p.peak_bytes)}")
    elif config.methods[0].name != "kd":
        p = _try(config, methods="kd")
        if p is not None:
            out.append(f"logit distillation only (--methods kd): peak {size(p.peak_bytes)}")
    return out
