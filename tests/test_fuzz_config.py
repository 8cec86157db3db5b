"""A seeded sample of the config fuzzer (benchmarks/fuzz_config.py, which runs 300+ cases): mutated configs
through `gkd plan` only ever exit 0, 1 or 2 (one line on stderr), without a traceback, each in seconds."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_config.py"


def _fuzzer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fuzz_config", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_config"] = module
    spec.loader.exec_module(module)
    return module


def test_forty_mutated_configs_end_in_0_1_or_2() -> None:
    fuzz = _fuzzer()
    # The small seed configs, and the test session's cache (other tests trace the same tiny models).
    seeds = [
        fuzz.ROOT / "configs" / "tiny.yaml",
        fuzz.ROOT / "configs" / "reference" / "bert-base-to-tinybert-4.yaml",
    ]
    outcomes = fuzz.fuzz(40, seed=16, limit=10.0, seeds=seeds, cache=Path(os.environ["GKD_CACHE_DIR"]))
    assert len(outcomes) == 40
    failures = [
        f"case {o.case.number} ({'; '.join(o.case.mutations)}): {o.problem}" for o in outcomes if o.problem
    ]
    assert not failures, "\n".join(failures)
    codes = {o.code for o in outcomes}
    assert 2 in codes and codes & {0, 1}  # the sample reaches the planner as well as the loader's refusals


def test_the_fuzzer_catches_a_traceback(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The harness itself: an exception escaping `gkd plan` is reported as a failure, not swallowed."""
    fuzz = _fuzzer()
    import gkd.planner.cli

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise TypeError("boom")

    monkeypatch.setattr(gkd.planner.cli, "run_plan", broken)
    case = fuzz.Case(
        0, "configs/tiny.yaml", [], (SCRIPT.parents[1] / "configs" / "tiny.yaml").read_bytes(), ".yaml"
    )
    folder = SCRIPT.parents[1] / ".pytest_cache" / "fuzz-harness"
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    outcome = fuzz.run_case(case, folder, 10.0)
    assert outcome.problem.startswith("exception TypeError: boom")
