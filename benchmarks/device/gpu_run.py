"""`gkd run` on one GPU: the plan's predicted peak against the run's measured peak, per strategy.

For each job below (a ~0.6B Llama-shaped teacher and a ~0.2B student, bf16, seq 1024), `gkd run JOB
--processes 1 --steps 3` runs in a subprocess; the prediction is the plan's peak minus its reserve (CUDA
context and fragmentation allowance, which `torch.cuda.max_memory_allocated` does not see), the measurement
the largest `peak_memory_bytes` of the run's log (max_memory_allocated). The jobs pin one strategy each, so
the table compares the strategies the runtime executes: a replicated or ZeRO-3 teacher, tap losses
layerwise or at the end, the plain or fused-linear logit loss, an offline teacher.

Usage (on a GPU machine with DeepSpeed installed, from the repository root):
    python benchmarks/device/gpu_run.py [--dry-run] [--only NAME] [--tiny]
--dry-run plans the jobs on this machine and prints the predictions only; --tiny runs tiny models instead
(a smoke test of the script on the CPU, where "measured" is a process's resident set, not comparable).
Writes a markdown copy to $OUT/gpu_run.md when OUT is set. Exit code 1 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_run.md").write_text("\n".join(LINES) + "\n")


def llama(layers: int, hidden: int, heads: int, kv: int, ffn: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


BASE = {"seq_len": 1024, "global_batch": 4, "micro_batch": [4], "steps": 3}
MINILM = {"name": "minilmv2", "options": {"relation_heads": 16}}
JOBS: dict[str, dict[str, Any]] = {
    "replicated / end / logits": {
        "methods": [{"name": "kd"}, MINILM],
        "overrides": {"teacher_placement": "replicated", "tap_loss": "end", "loss_path": "logits"},
    },
    "replicated / layerwise / logits": {
        "methods": [{"name": "kd"}, MINILM],
        "overrides": {"teacher_placement": "replicated", "tap_loss": "layerwise", "loss_path": "logits"},
    },
    "zero3 / layerwise / fused (jsd)": {
        "methods": [{"name": "jsd"}, MINILM],
        "overrides": {"teacher_placement": "zero3", "tap_loss": "layerwise", "loss_path": "fused_linear"},
    },
    "replicated / - / fused (fkl)": {
        "methods": [{"name": "fkl"}],
        "overrides": {"teacher_placement": "replicated", "loss_path": "fused_linear"},
    },
    "offline / - / top-k (kd)": {
        "methods": [{"name": "kd"}],
        "overrides": {"teacher_placement": "offline"},
    },
}


def job_config(folder: Path, job: dict[str, Any], *, tiny: bool) -> dict[str, Any]:
    teacher, student = (
        (llama(4, 64, 4, 2, 128), llama(2, 32, 4, 2, 64))
        if tiny
        else (
            llama(8, 2048, 16, 8, 5632),
            llama(4, 1024, 16, 8, 2816),
        )
    )
    (folder / "teacher.json").write_text(json.dumps(teacher))
    (folder / "student.json").write_text(json.dumps(student))
    training = {**BASE, "seq_len": 64} if tiny else BASE
    return {
        "teacher": str(folder / "teacher.json"),
        "student": str(folder / "student.json"),
        "methods": job["methods"],
        "hardware": {"gpus": 1, "gpu_memory": "70GiB"},
        "training": {**training, "offline_topk": 64},
        "overrides": {"student_zero_stage": 2, "micro_batch": 4, **job["overrides"]},
    }


def predicted(plan: dict[str, Any]) -> int:
    return int(plan["peak_bytes"]) - int(plan["memory"].get("reserve", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="plan only, on this machine")
    parser.add_argument("--only", help="run the job with this name only")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke test of this script (CPU)")
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    say(f"# gkd run on one GPU: predicted vs measured peak, bf16, on {card}")
    say(f"torch {torch.__version__}")
    say()
    say("| job | predicted MiB | measured MiB | error | step s (median) |")
    say("|---|---|---|---|---|")
    failed = 0
    errors: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gkd-gpu-run-") as tmp:
        for name, job in JOBS.items():
            if args.only and name != args.only:
                continue
            folder = Path(tmp) / f"job{len(LINES)}"
            folder.mkdir()
            config = folder / "job.json"
            config.write_text(json.dumps(job_config(folder, job, tiny=args.tiny)))
            if args.dry_run:
                from gkd.config import load_config
                from gkd.planner.pipeline import plan as make_plan

                plan = make_plan(load_config(str(config))).to_dict()
                say(f"| {name} | {predicted(plan) / MIB:.1f} | - | - | - |")
                continue
            out = folder / "out"
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "gkd.cli", "run", str(config), "--processes", "1", "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                failed += 1
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                say(f"| {name} | - | FAILED ({proc.returncode}): {tail[0][:120]} | - | - |")
                continue
            plan = json.loads((out / "plan.json").read_text())
            rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            measured = max(r["peak_memory_bytes"] for r in rows)
            seconds = sorted(r["seconds"] for r in rows)[len(rows) // 2]
            error = (measured - predicted(plan)) / measured
            errors.append(abs(error))
            cells = [name, f"{predicted(plan) / MIB:.1f}", f"{measured / MIB:.1f}", f"{error:+.1%}"]
            cells.append(f"{seconds:.2f}")
            say("| " + " | ".join(cells) + f" |  <!-- {time.perf_counter() - start:.0f} s -->")
    if errors:
        errors.sort()
        say()
        say(f"prediction error: median {errors[len(errors) // 2]:.1%}, max {errors[-1]:.1%}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
