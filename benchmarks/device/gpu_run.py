"""`gkd run` on one GPU: the plan's predicted peak against the run's measured peak, per strategy.

For each job below (a ~0.6B Llama-shaped teacher and a ~0.2B student, bf16, seq 1024), `gkd run JOB
--processes 1 --steps 3` runs in a subprocess; the prediction is the plan's peak minus its reserve (CUDA
context and fragmentation allowance, which `torch.cuda.max_memory_allocated` does not see), the measurement
the largest `peak_memory_bytes` of the run's log (max_memory_allocated). The jobs pin one strategy each, so
the table compares the strategies the runtime executes: a replicated or ZeRO-3 teacher, tap losses
layerwise or at the end, the plain or fused-linear logit loss, an offline teacher.

Usage (on a GPU machine with DeepSpeed installed, from the repository root):
    python benchmarks/device/gpu_run.py [--dry-run] [--only NAME] [--tiny]
The last job is capped: its GPU memory (the plan's budget, and the run's allocator through
GKD_CUDA_MEMORY_CAP) lies below what it needs without offload or recompute, so it runs only because the plan
offloads or recomputes.
A tensor-parallel teacher needs two GPUs and is not here.
--dry-run plans the jobs on this machine and prints the predictions only; --tiny runs tiny models instead
(a smoke test of the script on the CPU, where `gkd run` plans a CPU run and "measured" is the run's CPU tensor
storage, gkd.runtime.memory; benchmarks/plan_accuracy.py is the CPU comparison).
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
    "z0 / replicated / end / logits": {
        "methods": [{"name": "kd"}, MINILM],
        "overrides": {"student_zero_stage": 0, "teacher_placement": "replicated", "tap_loss": "end"},
    },
    "z1 + optimizer offload / replicated": {
        "methods": [{"name": "kd"}, MINILM],
        "overrides": {
            "student_zero_stage": 1,
            "student_offload": "optimizer",
            "teacher_placement": "replicated",
        },
    },
    "z3 + optimizer offload / zero3_offload": {
        "methods": [{"name": "kd"}, MINILM],
        "overrides": {
            "student_zero_stage": 3,
            "student_offload": "optimizer",
            "teacher_placement": "zero3_offload",
        },
    },
    "z3 + parameter offload / zero3 / fused (fkl)": {
        "methods": [{"name": "fkl"}, MINILM],
        "overrides": {
            "student_zero_stage": 3,
            "student_offload": "optimizer+parameters",
            "teacher_placement": "zero3",
            "loss_path": "fused_linear",
        },
    },
    "z2 / replicated / recompute 2 layers": {
        "methods": [{"name": "kd"}, MINILM],
        "overrides": {"teacher_placement": "replicated", "recompute_layers": [0, 1]},
    },
}
# Not here: a tensor-parallel teacher (it needs two GPUs or more).

# A job whose replicated need (no offload, no recompute, replicated teacher) exceeds the GPU memory it is
# given, so that it fits only because the plan offloads or recomputes: its budget is set between the two (see
# `capped_job`), and the run's CUDA allocator is capped at that budget (GKD_CUDA_MEMORY_CAP).
CAPPED = "capped: fits only by offload or recompute"
CAPPED_JOB: dict[str, Any] = {"methods": [{"name": "kd"}, MINILM], "overrides": {}}
REPLICATED_NEED = {"student_offload": "none", "recompute_layers": [], "teacher_placement": "replicated"}


def capped_job(folder: Path, *, tiny: bool) -> tuple[dict[str, Any], int]:
    """The capped job's config and budget: the budget lies halfway between the smallest peak the search finds
    with the whole GPU and the job's replicated need, rounded down to a MiB, so the need does not fit it."""
    from gkd.config import load_config
    from gkd.planner.pipeline import plan as make_plan

    def peak(job: dict[str, Any], budget: str | None = None) -> tuple[int, Any]:
        config = job_config(folder, job, tiny=tiny)
        if budget:
            config["hardware"]["gpu_memory"] = budget
        (folder / "probe.json").write_text(json.dumps(config))
        result = make_plan(load_config(str(folder / "probe.json")))
        return int(result.peak_bytes), result

    need, _ = peak({**CAPPED_JOB, "overrides": REPLICATED_NEED})
    layers = list(range(2 if tiny else 4))  # every student layer
    smallest, _ = peak(
        {**CAPPED_JOB, "overrides": {"student_offload": "optimizer", "recompute_layers": layers}}
    )
    budget = (smallest + need) // 2 // MIB * MIB
    config = job_config(folder, CAPPED_JOB, tiny=tiny)
    config["hardware"]["gpu_memory"] = f"{budget // MIB}MiB"
    return config, budget


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
        for name, job in [*JOBS.items(), (CAPPED, CAPPED_JOB)]:
            if args.only and name != args.only:
                continue
            folder = Path(tmp) / f"job{len(LINES)}"
            folder.mkdir()
            config = folder / "job.json"
            env = dict(os.environ)
            if name == CAPPED:
                capped, budget = capped_job(folder, tiny=args.tiny)
                config.write_text(json.dumps(capped))
                env["GKD_CUDA_MEMORY_CAP"] = str(budget)  # the worker's allocator gets only the plan's budget
            else:
                config.write_text(json.dumps(job_config(folder, job, tiny=args.tiny)))
            if args.dry_run:
                from gkd.config import load_config
                from gkd.planner.pipeline import plan as make_plan

                result = make_plan(load_config(str(config)))
                plan = result.to_dict()
                note = ""
                if name == CAPPED:
                    s = result.strategy
                    how = f"{s.student_offload} offload, recompute {len(s.recompute_layers)}"
                    note = f" (budget {budget / MIB:.0f} MiB: {how})"
                say(f"| {name}{note} | {predicted(plan) / MIB:.1f} | - | - | - |")
                continue
            out = folder / "out"
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "gkd.cli", "run", str(config), "--processes", "1", "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
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
