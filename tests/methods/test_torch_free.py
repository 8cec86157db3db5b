"""Resolving methods is plain data work: it must not import torch, transformers or triton.

A cold `gkd plan` whose model facts are cached never builds a model, so importing `gkd.methods` and calling
`resolve` must stay cheap (importing torch alone takes about 2 s). The check runs in a fresh interpreter: the
parent (this process, where torch may already be loaded) builds the ModelSpecs and picks, for every
registered method, the first tiny teacher/student setup it resolves for; the child rebuilds the specs from
plain JSON (`ModelSpec(**d)`, no transformers), resolves every case, and reports which of the forbidden
packages it loaded. The child's results must equal the parent's, so the torch-free path is the same code
path, not a shortcut.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from method_checks import FAMILIES, moe_specs, second_teacher, truncated_teacher_specs

from gkd.config import load_config
from gkd.errors import InputError
from gkd.lazy import LoadedModule, lazy_import
from gkd.methods import get, names, resolve
from gkd.models import ModelSpec, resolve_model

REFERENCE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "reference"
FORBIDDEN = ("torch", "transformers", "triton")

# Options a method cannot resolve without. TAKD's assistants are given as specs (sent to the child by name),
# since a model reference string would be resolved through transformers.
ASSISTANTS = {"takd": ["tiny-llama-teacher-b"]}

CHILD = r"""
import json, sys

from gkd.methods import get, names, resolve
from gkd.models import ModelSpec

data = json.load(sys.stdin)
specs = {n: ModelSpec(**d) for n, d in data["specs"].items()}
results = {}
for case in data["cases"]:
    entries = case["methods"]
    for entry in entries:
        if "assistants" in entry.get("options", {}):
            entry["options"]["assistants"] = [specs[n] for n in entry["options"]["assistants"]]
    resolved = resolve(entries, [specs[n] for n in case["teachers"]], specs[case["student"]])
    results[case["label"]] = json.dumps(resolved.to_dict(), sort_keys=True, default=repr)
every = [get(n).name for n in names()]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in data["forbidden"])

# The executable loss is still exported, imported on first use.
from gkd.methods import DistillLoss

print(json.dumps({
    "results": results,
    "names": every,
    "loaded": loaded,
    "distill_loss": DistillLoss.__name__,
    "torch_after": "torch" in sys.modules,
}))
"""


def _setups() -> dict[str, list[tuple[list[ModelSpec], ModelSpec]]]:
    """Candidate (teachers, student) setups per family, tried in this order: one teacher with the smaller
    student, one teacher with a truncated copy of itself (equal widths), and two teachers of different
    sizes."""
    out = {}
    for family in FAMILIES:
        teacher = resolve_model(f"tiny-{family}-teacher")
        student = resolve_model(f"tiny-{family}-student")
        _, truncated = truncated_teacher_specs(family)
        pair = [teacher, second_teacher(family)]
        out[family] = [([teacher], student), ([teacher], truncated), (pair, student)]
    # Methods that read a mixture-of-experts router (router_kl): a tiny Mixtral pair.
    out["mixtral"] = [moe_specs()]
    return out


def _entries(name: str, specs: dict[str, ModelSpec]) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {"name": name, "weight": 1.0, "options": {}}
    if name in ASSISTANTS:
        entry["options"]["assistants"] = [specs[n] for n in ASSISTANTS[name]]
    return [entry]


def _teacher_count(name: str) -> int:
    """Single-teacher and chained methods (TAKD: one teacher, the assistants as options) get one teacher;
    multi-teacher and assistant-ensemble methods get two."""
    spec = get(name)
    return 1 if spec.teachers == "single" or spec.chain else 2


def _cases() -> tuple[list[dict[str, Any]], dict[str, ModelSpec], dict[str, str]]:
    """The child's cases, the specs they name, and the parent's result per case label."""
    specs: dict[str, ModelSpec] = {"tiny-llama-teacher-b": second_teacher("llama")}
    cases: list[dict[str, Any]] = []
    expected: dict[str, str] = {}

    def add(label: str, entries: list[dict[str, Any]], teachers: list[ModelSpec], student: ModelSpec) -> None:
        resolved = resolve(entries, teachers, student)
        for spec in (*teachers, student):
            specs[spec.name] = spec
        cases.append(
            {
                "label": label,
                "methods": json.loads(json.dumps(entries, default=lambda s: s.name)),  # assistants by name
                "teachers": [t.name for t in teachers],
                "student": student.name,
            }
        )
        expected[label] = json.dumps(resolved.to_dict(), sort_keys=True, default=repr)

    # Every method in every family where some setup resolves it (decoders and encoders take different
    # paths: hard-loss kind, fused-linear logits), and in at least one family.
    setups = _setups()
    unresolved = {}
    for name in names():
        errors = []
        for family, candidates in setups.items():
            for teachers, student in candidates:
                if len(teachers) != _teacher_count(name):
                    continue
                try:
                    label = f"{name} {family}: {len(teachers)} teacher(s) -> {student.name}"
                    add(label, _entries(name, specs), teachers, student)
                    break
                except InputError as err:
                    errors.append(str(err))
        if not any(c["methods"][0]["name"] == name for c in cases):
            unresolved[name] = errors
    assert not unresolved, f"methods with no setup that resolves (add one to _setups): {unresolved}"

    for path in sorted(REFERENCE_CONFIGS.glob("*.yaml")):
        config = load_config(path)
        teachers = [resolve_model(config.model_path(t)) for t in config.teachers]
        student = resolve_model(config.model_path(config.student))
        add(f"reference {path.stem}", [m.to_entry() for m in config.methods], teachers, student)
    return cases, specs, expected


def test_resolving_every_method_imports_no_torch() -> None:
    cases, specs, expected = _cases()
    payload = {
        "specs": {n: dataclasses.asdict(s) for n, s in specs.items()},
        "cases": cases,
        "forbidden": list(FORBIDDEN),
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    assert report["loaded"] == [], f"resolving methods imported {report['loaded'][:10]}"
    assert report["names"] == names()
    covered = {c["methods"][0]["name"] for c in cases if not c["label"].startswith("reference")}
    assert covered == set(names())
    assert len([c for c in cases if c["label"].startswith("reference")]) >= 6
    assert report["results"] == expected
    # DistillLoss is still exported from gkd.methods, and importing it is what brings torch in.
    assert report["distill_loss"] == "DistillLoss" and report["torch_after"]


def test_lazy_import_loads_on_first_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gkd_lazy_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gkd_lazy_probe", raising=False)
    stand_in = lazy_import("gkd_lazy_probe")
    assert "gkd_lazy_probe" not in sys.modules and "not loaded" in repr(stand_in)
    try:
        assert stand_in.VALUE == 1
        real = sys.modules["gkd_lazy_probe"]
        # Now a plain module mirroring the real one: reads no longer go through a forwarding call.
        assert type(stand_in) is LoadedModule and "VALUE" in vars(stand_in)
        real.LATER = 2  # a name the real module gains after the first read is still found
        assert stand_in.LATER == 2
        with pytest.raises(AttributeError, match="set 'VALUE' on the real module"):
            stand_in.VALUE = 3
        assert real.VALUE == 1
        with pytest.raises(AttributeError):
            _ = stand_in.MISSING
    finally:
        sys.modules.pop("gkd_lazy_probe", None)
