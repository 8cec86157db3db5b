"""The facts pack: model specs and traced model facts shipped with gkd, so a first plan traces nothing.

Tracing a model costs seconds (importing torch, torch.export and transformers alone takes about 6 s on a
2-core machine), which would make the first plan of every preset slow. The pack holds the planner's cache
entries (`gkd.planner.cache`, kinds "specs" and "facts") for every preset and every model of the reference
configs, at every probe regime a plan can ask for. They are ordinary cache entries: the same keys, which hash
the inputs, the content of the gkd sources that compute them, the content of transformers' code for each
architecture (`gkd.planner.cache.modeling_fingerprint`) and the torch release. So the pack is used exactly
when it holds what this install would compute, and is ignored otherwise (edited sources, an architecture whose
transformers code changed, another torch: the planner traces as before and caches the result in the user's
cache). A transformers release that does not touch an architecture's code keeps its entries.

Rebuild it after changing the sources that compute specs or facts (gkd/models.py, gkd/architecture.py,
gkd/planner/trace.py, taps.py, probe.py, facts.py, moe.py), after a transformers upgrade that changes a
packed architecture's code, or after a torch upgrade; `tests/planner/test_pack.py` fails until then, on any
installed release (it never skips):

    python -m gkd.planner.pack            # or: make pack

MANIFEST.json records the torch and transformers releases the pack was built with (for people; keys do not
use the transformers release) and each entry's model and regime.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gkd.planner.cache import PACK_DIR, entry_path, recorded_versions, stored_value

_ROOT = Path(__file__).resolve().parent.parent.parent
REFERENCE_CONFIGS = _ROOT / "configs" / "reference"
PACK_KINDS = ("specs", "facts")
# Lengths whose probe regimes cover every plan: any length up to a model's window (or its positions) shares
# the "full" regime; one past a sliding window takes the windowed regime.
_LENGTHS = (512,)


def pack_models() -> list[str]:
    """Every preset, then the models the reference configs name that are not presets (as absolute paths)."""
    from gkd.config import load_config
    from gkd.models import preset_names

    refs = preset_names()
    for path in sorted(REFERENCE_CONFIGS.glob("*.yaml")):
        config = load_config(path)
        for ref in [*(config.model_path(t) for t in config.teachers), config.model_path(config.student)]:
            ref = os.path.abspath(ref) if Path(ref).exists() else ref
            if ref not in refs:
                refs.append(ref)
    return refs


def pack_regimes(spec: Any) -> list[tuple[str, int, int]]:
    """The probe regimes (see gkd.planner.probe) a plan of `spec` can ask for."""
    from gkd.planner.probe import probe_lengths, sliding_window

    lengths = list(_LENGTHS)
    window = sliding_window(spec)
    if window is not None:
        lengths.append(window + 1)
    regimes = [probe_lengths(spec, n) for n in lengths]
    return list(dict.fromkeys(r for r in regimes if r is not None))


def expected_entries(persistence_threshold: int = 100_000) -> dict[str, str]:
    """Pack-relative path -> "model regime" for every entry the pack must hold with this install's sources and
    versions. Reads specs through the cache (so through the pack itself when it is current)."""
    from gkd.planner.facts import FACTS_SOURCES, facts_key
    from gkd.planner.specs import SPEC_SOURCES, load_spec, spec_key

    entries: dict[str, str] = {}
    for ref in pack_models():
        spec = load_spec(ref)
        label = os.path.relpath(ref, _ROOT) if Path(ref).is_absolute() else ref
        entries[str(entry_path("specs", spec_key(ref), SPEC_SOURCES))] = f"{label} spec"
        for regime in pack_regimes(spec):
            key = facts_key(spec, regime[0], persistence_threshold)
            entries[str(entry_path("facts", key, FACTS_SOURCES, name=spec.name))] = f"{label} {regime[0]}"
    return entries


def build(out: Path = PACK_DIR) -> dict[str, Any]:
    """Compute every pack entry in a scratch cache, then replace `out` with them and write the manifest."""
    from gkd.config import DeepSpeedSettings
    from gkd.planner.facts import model_facts
    from gkd.planner.specs import load_spec

    threshold = DeepSpeedSettings().stage3_param_persistence_threshold
    scratch = Path(tempfile.mkdtemp(prefix="gkd-pack-"))
    os.environ["GKD_CACHE_DIR"] = str(scratch)
    os.environ["GKD_NO_PACK"] = "1"  # compute everything, never copy an old pack entry
    try:
        for n, ref in enumerate(pack_models(), 1):
            start = time.perf_counter()
            spec = load_spec(ref)
            for regime in pack_regimes(spec):
                # A length inside the regime: the probe entry is keyed by the regime, not the length.
                model_facts(spec, seq_len=regime[2], persistence_threshold=threshold)
            print(f"[{n:2d}] {ref}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        entries = expected_entries(threshold)
        missing = [p for p in entries if not (scratch / p).is_file()]
        if missing:
            raise RuntimeError(f"pack build did not produce {len(missing)} entries, e.g. {missing[0]}")
        if out.exists():
            shutil.rmtree(out)
        for relative in entries:
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            # The pack holds plain values: the checksum guards the user's cache, the pack ships read-only.
            (out / relative).write_text(json.dumps(stored_value(scratch / relative)))
        manifest = {"versions": recorded_versions(), "entries": dict(sorted(entries.items()))}
        (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild gkd's facts pack (specs and traced model facts).")
    parser.add_argument("--out", type=Path, default=PACK_DIR, help=f"pack folder (default {PACK_DIR})")
    args = parser.parse_args()
    start = time.perf_counter()
    manifest = build(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*.json"))
    print(
        f"wrote {len(manifest['entries'])} entries ({size / 2**20:.1f} MiB) to {args.out} in "
        f"{time.perf_counter() - start:.0f} s for torch {manifest['versions']['torch']}, "
        f"transformers {manifest['versions']['transformers']}"
    )


if __name__ == "__main__":
    main()
