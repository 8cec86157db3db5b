"""The facts pack (gkd.planner.pack): it holds exactly the entries this install's sources and versions need,
each equal to a fresh computation, and the cache reads it only when the keys match."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gkd.planner import cache
from gkd.planner.cache import PACK_DIR, tool_versions
from gkd.planner.facts import FACTS_SOURCES, facts_key, probe_entry
from gkd.planner.pack import expected_entries, pack_models, pack_regimes
from gkd.planner.specs import SPEC_SOURCES, load_spec, spec_entry, spec_key

MANIFEST = json.loads((PACK_DIR / "MANIFEST.json").read_text())
REBUILD = "the pack is stale: rebuild it with `make pack` and commit gkd/data/pack"
same_versions = pytest.mark.skipif(
    MANIFEST["versions"] != tool_versions(),
    reason=f"pack built for {MANIFEST['versions']}, this install has {tool_versions()}",
)


@same_versions
def test_pack_holds_exactly_the_entries_of_these_sources_and_versions():
    expected = expected_entries()
    assert set(MANIFEST["entries"]) == set(expected), REBUILD
    on_disk = {str(p.relative_to(PACK_DIR)) for p in PACK_DIR.glob("*/*.json")}
    assert on_disk == set(expected), REBUILD
    labels = set(MANIFEST["entries"].values())
    must = {"glm-130b spec", "glm-130b full", "mistral-7b windowed-4096", "configs/tinybert-4.json spec"}
    assert must <= labels


@same_versions
@pytest.mark.parametrize("ref", pack_models(), ids=lambda r: os.path.basename(r))
def test_pack_entries_equal_a_fresh_trace(ref, monkeypatch):
    monkeypatch.setenv("GKD_NO_PACK", "1")  # nothing below may come from the pack
    spec = load_spec(ref)
    packed_spec = json.loads((PACK_DIR / cache.entry_path("specs", spec_key(ref), SPEC_SOURCES)).read_text())
    assert packed_spec == json.loads(json.dumps(spec_entry(ref)))
    for regime in pack_regimes(spec):
        key = facts_key(spec, regime[0], 100_000)
        relative = cache.entry_path("facts", key, FACTS_SOURCES, name=spec.name)
        packed = json.loads((PACK_DIR / relative).read_text())
        fresh = json.loads(json.dumps(probe_entry(spec, regime, 100_000)))
        assert "polys" in fresh and packed == fresh


def test_a_pack_entry_is_read_only_when_every_key_part_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "PACK_DIR", tmp_path / "pack")
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path / "user"))
    relative = cache.entry_path("facts", {"model": "m"}, FACTS_SOURCES, name="m")
    (tmp_path / "pack" / relative).parent.mkdir(parents=True)
    (tmp_path / "pack" / relative).write_text(json.dumps({"params": "from the pack"}))
    calls = []

    def compute():
        calls.append(1)
        return {"params": "computed"}

    def lookup():
        return cache.cached("facts", {"model": "m"}, FACTS_SOURCES, compute, name="m")["params"]

    assert lookup() == "from the pack" and not calls
    monkeypatch.setenv("GKD_NO_PACK", "1")
    assert lookup() == "computed" and len(calls) == 1
    monkeypatch.delenv("GKD_NO_PACK")
    # Another torch release: another key, so the pack entry is not this install's value.
    monkeypatch.setattr(cache, "tool_versions", lambda: {"torch": "0.0.1", "transformers": "0.0.1"})
    assert lookup() == "computed" and len(calls) == 2


def test_fingerprint_follows_content_not_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_PACKAGE", tmp_path)
    source = tmp_path / "models.py"
    source.write_text("x = 1\n")
    before = cache.source_fingerprint.__wrapped__(("models.py",))
    os.utime(source, (1, 1))
    assert cache.source_fingerprint.__wrapped__(("models.py",)) == before
    source.write_text("x = 2\n")
    assert cache.source_fingerprint.__wrapped__(("models.py",)) != before


@same_versions
def test_first_plan_of_a_reference_config_traces_nothing(tmp_path):
    """With an empty user cache, the pack provides every spec and fact, and methods resolve without torch:
    the planning process imports neither torch nor transformers."""
    code = (
        "import sys; from gkd.config import load_config; from gkd.planner.pipeline import plan; "
        "p = plan(load_config('configs/reference/llama-2-70b-to-llama-2-7b.yaml')); "
        "print(p.fits, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    env = {**os.environ, "GKD_CACHE_DIR": str(tmp_path)}
    env.pop("GKD_NO_PACK", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "False", "False"]
    assert not (tmp_path / "facts").exists() and not (tmp_path / "specs").exists()
