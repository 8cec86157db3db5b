"""`gkd run` on architectures no table names: Qwen3, Gemma3, Phi-3 and Mistral, 3 steps in 2 gloo processes.

Claim checked: tiny configs of these architectures (gkd.architecture maps them from the built model) plan and
train, each from a teacher read by Hugging Face Hub id out of an offline cache (HF_HUB_OFFLINE=1, HF_HOME in a
temporary folder, nothing downloads) to a one-layer student of the same architecture, with kd + MiniLMv2 (so
logits and attention taps are captured). The test suite runs two of them
(tests/e2e/test_architectures_run.py); this runs all four with the same job and prints each run's losses and
wall time.

    python benchmarks/bench_architectures.py
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from test_architectures_run import CONFIGS, STEPS, run_architecture  # noqa: E402

from gkd.models import build_model, spec_from_config  # noqa: E402


def save_to_hub_cache(hf_home: Path, repo_id: str, config: dict) -> None:
    """A random-init model of `config` saved under `repo_id` in the Hugging Face cache layout."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    spec = spec_from_config(dict(config), name=repo_id, dtype="float32")
    build_model(spec, device="cpu").save_pretrained(repo / "snapshots" / commit)


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"# gkd run, {STEPS} steps x 2 processes per architecture  machine={platform.node()} "
        f"cpus={os.cpu_count()} commit={commit.stdout.strip() or '?'} "
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'architecture':<14} {'teacher':<22} {'wall s':>7}  losses")
    for model_type, config in CONFIGS.items():
        work = Path(tempfile.mkdtemp(prefix="gkd-bench-arch-"))
        repo_id = f"org/tiny-{model_type}"
        save_to_hub_cache(work / "hf", repo_id, config)
        env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1"}
        env.pop("HF_HUB_CACHE", None)
        start = time.perf_counter()
        result = run_architecture(model_type, repo_id, work, env)
        wall = time.perf_counter() - start
        losses = ", ".join(f"{r['loss']:.4f}" for r in result["rows"])
        print(f"{model_type:<14} {repo_id:<22} {wall:>7.1f}  {losses}")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
