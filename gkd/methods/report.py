"""`gkd methods [NAME] [--json]`: the method catalogue as a table, one method in detail, or JSON.

Reads only the registered specs (nothing is built). The JSON form lists every method with its taps, terms,
extras, constraints, stages, hook ops and options, so tools can discover methods without importing gkd.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click
import yaml

from gkd.methods.combine import COMMON_OPTIONS
from gkd.methods.registry import get, names
from gkd.methods.spec import STORED_KINDS, MethodSpec, TapSpec

# Tap kinds read position by position: on a generated sequence the loss mask confines them to the sampled
# tokens (gkd.runtime.generation), as it confines them to a completion in prompt/completion data.
TOKENWISE_KINDS = ("logits", "final", "hidden")


def _tap_text(tap: TapSpec) -> str:
    rule = f"@{tap.layers.describe()}" if tap.layers is not None else ""
    side = "" if tap.side == "both" else f" ({tap.side})"
    return f"{tap.kind}{rule}{side}"


# How the methods combine with generation (the `generation` section, docs/config.md): printed under the table
# of `gkd methods`, and what gkd.runtime.generation refuses.
GENERATION_RULES = (
    "Generated sequences (generation.mode; docs/config.md): the loss mask covers the generated tokens only, "
    "for the hard and the distillation terms alike.",
    "  on_policy, and sequence_kd with lambda > 0 (the student samples): only methods with samples = yes; "
    "the teacher must be live (not offline).",
    "  sequence_kd with lambda 0 (the teacher's generations, stored before training): every method that "
    "trains on prompt/completion data; any teacher placement, offline included.",
    "  Both need a decoder student and chat or prompt/completion data (or, for sequence_kd, "
    "generation.prompt_field); sequence_kd generates with the first teacher.",
)


def on_generated(spec: MethodSpec) -> str:
    """Whether the method applies to sequences the student samples (generation.mode on_policy, or
    sequence_kd with lambda > 0): "yes" or "no: why"; see GENERATION_RULES."""
    kinds = {t.kind for t in spec.taps}
    if not kinds:
        return "no: it reads no taps of the sampled sequences"
    if kinds & set(STORED_KINDS):
        return "no: it reads an offline teacher pass, and samples need a live teacher to score them"
    if spec.hook_ops:
        return "no: its in-flight operations are not run on samples"
    other = sorted(kinds - set(TOKENWISE_KINDS))
    if other:
        return f"no: its {', '.join(other)} taps relate positions, which the loss mask does not confine"
    return "yes"


def method_dict(spec: MethodSpec) -> dict[str, Any]:
    """A JSON-friendly description of one method."""
    out = asdict(spec)
    out["taps"] = [
        {
            "name": t.name,
            "kind": t.kind,
            "layers": t.layers.describe() if t.layers else None,
            "side": t.side,
            "teachers": t.teachers,
        }
        for t in spec.taps
    ]
    out["options"] = {o.name: {"default": o.default, "doc": o.doc} for o in spec.options}
    out["generated_sequences"] = on_generated(spec)
    return out


def example_config(spec: MethodSpec) -> str:
    options = spec.option_defaults()
    if "assistants" in options and not options["assistants"]:
        options["assistants"] = ["path/to/assistant"]  # required: an empty default would not run
    entry: dict[str, Any] = {"name": spec.name, "weight": 1.0}
    if options:
        entry["options"] = options
    return yaml.safe_dump({"methods": [entry]}, sort_keys=False, default_flow_style=False).rstrip()


def _short_paper(spec: MethodSpec) -> str:
    """'First et al YEAR' for the table; the full citation is in `gkd methods NAME`."""
    authors = spec.paper.split(".")[0]
    names = [a.strip() for a in authors.replace(" et al", "").split(",")]
    first = names[0].split(" (")[0]
    many = len(names) > 2 or " et al" in authors
    shown = f"{first} et al" if many else " & ".join(names)
    return f"{shown} {spec.year}"


def _row(spec: MethodSpec) -> list[str]:
    return [
        spec.name,
        _short_paper(spec),
        ", ".join(_tap_text(t) for t in spec.taps) or "-",
        ", ".join(t.name for t in spec.terms) or "-",
        str(len(spec.stages) or 1),
        ", ".join(spec.constraints) or "-",
        spec.teachers,
        on_generated(spec).split(":")[0],
    ]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def detail(spec: MethodSpec) -> str:
    lines = [f"{spec.name}: {spec.title}", f"  paper: {spec.paper} ({spec.year})"]
    if spec.description:
        lines.append(f"  {spec.description}")
    lines.append(f"  teachers: {spec.teachers} (aggregation: {spec.aggregation})")
    lines.append("  taps:")
    lines += [
        f"    {t.name}: {_tap_text(t)}" + ("" if t.teachers == "all" else f" teacher {t.teachers}")
        for t in spec.taps
    ] or ["    none"]
    lines.append("  loss terms:")
    for t in spec.terms:
        weight = f"option {t.weight_option}" if t.weight_option else f"{t.weight:g}"
        temp = "" if t.temperature is None else f", T={t.temperature:g}"
        sched = (
            ""
            if t.schedule.kind == "constant" and t.schedule.value == 1.0
            else f", schedule {t.schedule.kind}"
        )
        when = "".join(f", when {opt}={value}" for opt, value in t.when)
        lines.append(f"    {t.name}: {t.fn} via {t.kernel}, weight {weight}{temp}{sched}{when}")
    if spec.extras:
        lines.append("  trainable extras:")
        lines += [f"    {e.name}: {e.kind} {e.in_dim} -> {e.out_dim} (per {e.per})" for e in spec.extras]
    lines.append(f"  constraints: {', '.join(spec.constraints) or 'none'}")
    lines.append(f"  the student's samples (on_policy, sequence_kd with lambda > 0): {on_generated(spec)}")
    lines.append("  the teacher's generations (sequence_kd with lambda 0): yes, as prompt/completion data")
    if spec.stages:
        lines.append("  stages:")
        lines += [
            f"    {s.name} ({s.fraction:g} of steps): terms {', '.join(s.terms) or 'none'}; trains {s.train}"
            f"{'' if s.teacher else '; no teacher'}" + (f" - {s.description}" if s.description else "")
            for s in spec.stages
        ]
    if spec.hook_ops:
        lines.append("  in-flight operations:")
        lines += [f"    {h.op} (+{h.extra_forwards} forwards)" for h in spec.hook_ops]
    lines.append("  options:")
    lines += [f"    {o.name} = {o.default!r}: {o.doc}" for o in spec.options]
    lines += [f"    {k}: {v}" for k, v in COMMON_OPTIONS.items()]
    lines.append("  example config:")
    lines += ["    " + line for line in example_config(spec).splitlines()]
    return "\n".join(lines)


def run_methods(name: str | None, *, as_json: bool) -> None:
    if name is not None:
        spec = get(name)
        click.echo(json.dumps(method_dict(spec), indent=2, default=str) if as_json else detail(spec))
        return
    specs = [get(n) for n in names()]
    if as_json:
        click.echo(json.dumps([method_dict(s) for s in specs], indent=2, default=str))
        return
    # samples: whether the method applies to the student's samples (`gkd methods NAME` says why not).
    header = ["name", "paper", "taps", "loss terms", "stages", "constraints", "teachers", "samples"]
    click.echo(_table([_row(s) for s in specs], header))
    click.echo("")
    click.echo("\n".join(GENERATION_RULES))
