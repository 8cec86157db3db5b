"""The facts pack (gkd.planner.pack): it holds exactly the entries this install's sources and versions need,
each equal to a fresh computation, and the cache reads it only when the keys match. Nothing here skips: on a
transformers release whose code for a packed architecture differs, or on another torch, these tests fail
until the pack is rebuilt; on a release that changes none of it, the pack is used as is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gkd.planner import cache
from gkd.planner.cache import PACK_DIR, modeling_fingerprint
from gkd.planner.facts import FACTS_SOURCES, facts_key, probe_entry
from gkd.planner.pack import expected_entries, pack_models, pack_regimes
from gkd.planner.specs import SPEC_SOURCES, load_spec, spec_entry, spec_key

MANIFEST = json.loads((PACK_DIR / "MANIFEST.json").read_text())
REBUILD = "the pack is stale: rebuild it with `make pack` and commit gkd/data/pack"


def test_pack_holds_exactly_the_entries_of_these_sources_and_versions():
    expected = expected_entries()
    assert set(MANIFEST["entries"]) == set(expected), REBUILD
    on_disk = {str(p.relative_to(PACK_DIR)) for p in PACK_DIR.glob("*/*.json")}
    assert on_disk == set(expected), REBUILD
    labels = set(MANIFEST["entries"].values())
    must = {"glm-130b spec", "glm-130b full", "mistral-7b windowed-4096", "configs/tinybert-4.json spec"}
    assert must <= labels


@pytest.mark.parametrize("ref", pack_models(), ids=lambda r: os.path.basename(r))
def test_pack_entries_equal_a_fresh_trace(ref, monkeypatch):
    monkeypatch.setenv("GKD_NO_PACK", "1")  # nothing below may come from the pack
    spec_path = PACK_DIR / cache.entry_path("specs", spec_key(ref), SPEC_SOURCES)
    assert spec_path.is_file(), f"{REBUILD} (no spec entry for {ref}: gkd or its transformers code changed)"
    spec = load_spec(ref)
    packed_spec = json.loads(spec_path.read_text())
    assert packed_spec == json.loads(json.dumps(spec_entry(ref)))
    for regime in pack_regimes(spec):
        key = facts_key(spec, regime[0], 100_000)
        relative = cache.entry_path("facts", key, FACTS_SOURCES, name=spec.name)
        assert (PACK_DIR / relative).is_file(), f"{REBUILD} (no {regime[0]} facts entry for {ref})"
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
    monkeypatch.setattr(cache, "tool_versions", lambda *_: {"torch": "0.0.1"})
    assert lookup() == "computed" and len(calls) == 2


def _fake_transformers(root, modeling: str) -> None:
    (root / "models" / "llama").mkdir(parents=True, exist_ok=True)
    (root / "models" / "llama" / "modeling_llama.py").write_text(modeling)
    (root / "models" / "llama" / "configuration_llama.py").write_text('model_type = "llama"\n')
    (root / "models" / "gemma3").mkdir(exist_ok=True)
    (root / "models" / "gemma3" / "configuration_gemma3.py").write_text('    model_type = "gemma3_text"\n')
    (root / "models" / "gemma3" / "modeling_gemma3.py").write_text("y = 1\n")
    (root / "masking_utils.py").write_text("shared = 1\n")


def _fresh_fingerprint(model_type: str) -> str:
    for function in (cache.modeling_fingerprint, cache._architecture_folder):
        function.cache_clear()
    return cache.modeling_fingerprint(model_type)


def test_keys_follow_the_architectures_code_not_the_transformers_release(tmp_path, monkeypatch):
    """A release number alone changes no key, nor does an edit to a shared module (the pack's fresh-trace
    test judges those); an edit to the architecture's modeling file does, and only to its keys."""
    root = tmp_path / "transformers"
    _fake_transformers(root, "x = 1\n")
    monkeypatch.setattr(cache, "transformers_dir", lambda: root)
    llama, gemma = _fresh_fingerprint("llama"), _fresh_fingerprint("gemma3_text")
    monkeypatch.setattr(cache.importlib.metadata, "version", lambda dist: "99.0.0")
    cache.tool_versions.cache_clear()
    try:
        assert _fresh_fingerprint("llama") == llama  # a new release with the same code: same keys
        (root / "masking_utils.py").write_text("shared = 2\n")
        assert _fresh_fingerprint("llama") == llama
        (root / "models" / "llama" / "modeling_llama.py").write_text("x = 2\n")
        assert _fresh_fingerprint("llama") != llama
        assert _fresh_fingerprint("gemma3_text") == gemma  # found through its configuration file
        (root / "models" / "gemma3" / "modeling_gemma3.py").write_text("y = 2\n")
        assert _fresh_fingerprint("gemma3_text") != gemma
        assert _fresh_fingerprint("not-in-transformers") == "release-99.0.0"
    finally:
        cache.tool_versions.cache_clear()
        for function in (cache.modeling_fingerprint, cache._architecture_folder):
            function.cache_clear()


def test_the_installed_transformers_keys_by_content():
    """On the installed release: the fingerprint hashes real files (not the release fallback), differs
    between architectures, and is what the facts keys carry."""
    from gkd.planner.specs import load_spec

    assert not modeling_fingerprint("llama").startswith("release-")
    assert modeling_fingerprint("llama") != modeling_fingerprint("gpt2")
    assert not modeling_fingerprint("gemma3_text").startswith("release-")
    spec = load_spec("tiny-llama-teacher")
    assert facts_key(spec, "full", 100_000)["modeling"] == modeling_fingerprint("llama")


def test_fingerprint_follows_content_not_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_PACKAGE", tmp_path)
    source = tmp_path / "models.py"
    source.write_text("x = 1\n")
    before = cache.source_fingerprint.__wrapped__(("models.py",))
    os.utime(source, (1, 1))
    assert cache.source_fingerprint.__wrapped__(("models.py",)) == before
    source.write_text("x = 2\n")
    assert cache.source_fingerprint.__wrapped__(("models.py",)) != before


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
