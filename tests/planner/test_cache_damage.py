"""A damaged entry in the user's cache (valid JSON with wrong types, edited by hand) is computed again, not
trusted: `gkd plan` with one plans as before instead of failing with a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.planner import cache
from gkd.planner.cache import cached

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_an_edited_entry_is_computed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path))
    calls: list[int] = []

    def compute() -> dict[str, object]:
        calls.append(1)
        return {"params": {"params": 10, "layers": [1, 2]}}

    assert cached("k", 1, (), compute)["params"]["params"] == 10
    assert cached("k", 1, (), compute)["params"]["params"] == 10 and len(calls) == 1  # a hit
    (entry,) = (tmp_path / "k").glob("*.json")
    text = entry.read_text()
    entry.write_text(text.replace('"params": 10', '"params": "ten"'))  # valid JSON, wrong type
    assert cached("k", 1, (), compute)["params"]["params"] == 10 and len(calls) == 2
    entry.write_text(json.dumps({"params": {"params": "ten"}}))  # no checksum at all
    assert cached("k", 1, (), compute)["params"]["params"] == 10 and len(calls) == 3


@pytest.mark.parametrize(
    "damaged",
    [
        {"params": {"params": "many"}, "polys": 5},
        {"params": None, "polys": {"regime": []}},
        {"params": {}, "activations": "x"},
    ],
)
def test_plan_with_a_damaged_facts_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damaged: dict
) -> None:
    from gkd.planner.facts import FACTS_SOURCES, facts_key
    from gkd.planner.probe import probe_lengths
    from gkd.planner.specs import load_spec

    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path))
    args = ["plan", str(TINY), "--gpus", "2", "--json"]
    before = CliRunner().invoke(main, args)
    assert before.exit_code == 0, before.output
    for ref in ("tiny-llama-teacher", "tiny-llama-student"):
        spec = load_spec(ref)
        regime = probe_lengths(spec, 64)
        assert regime is not None
        key = facts_key(spec, regime[0], 100_000)
        path = tmp_path / cache.entry_path("facts", key, FACTS_SOURCES, name=spec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(damaged))
    after = CliRunner().invoke(main, args)
    assert after.exit_code == 0, after.output[-2000:]
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "provenance"}  # noqa: E731
    assert strip(after.output) == strip(before.output)
