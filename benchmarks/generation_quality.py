"""Supervised kd, sequence-level KD and on-policy jsd at equal wall time on a real small checkpoint.

Usage:
    python benchmarks/generation_quality.py [--prepared DIR] [--seconds S] [--records N] [--out FILE]

The teacher is `DIR/smollm2-135m` and the text `DIR/text/{train,heldout}.jsonl`, as
`benchmarks/prepare_quality.py` writes them (DIR defaults to its `benchmarks/.cache/quality`). The student is
the teacher's architecture with `--student-blocks` of its 30 blocks (default 6), started from teacher blocks
0, 5, ..., 25 (`--init every`: `student_init: {from: teacher, every: 30 / blocks}`) or from its first and last
blocks (`--init ends`: 0-5 and 24-29 for 12 blocks). The text is cut into prompt/completion records
(`--records` of the training documents; 64 of the held-out ones): a prompt of about PROMPT_CHARS
characters, the next COMPLETION_CHARS characters its completion.

Three runs of `gkd run` on one CPU process (the machine is shared), each given the same wall-time budget
`--seconds` (default 600; with the default 128 records, the teacher's generation pass alone took 189 s on
this project's 2-core machine):
- `kd`: kd on the records' own completions (generation off);
- `sequence_kd`: kd on the teacher's completions of the same prompts (generation.mode sequence_kd); its
  teacher generation pass is paid out of its budget;
- `on_policy jsd`: jsd (beta 0.5) with the student sampling half the micro-batches (lambda 0.5).
Equal wall time: a calibration run of CALIBRATION_STEPS steps per method measures its mean step time and
(sequence_kd) its generation pass; each method then trains for floor((seconds - pass) / step time) steps.
After training, `gkd eval` gives each student's held-out loss on the held-out completions (and the
teacher's), and the student greedily completes SAMPLES held-out prompts. The table, the steps, the timings
and the samples go to `--out` (default benchmarks/results/generation_quality_cpu.md).

Cost: every run, calibration and evaluation loads the 135M-parameter teacher; on a CPU the teacher's
generation pass dominates sequence_kd's budget (each chunk of MICRO_BATCH prompts is a prompt forward and
MAX_NEW - 1 one-token forwards of the whole teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREPARED = ROOT / "benchmarks" / ".cache" / "quality"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "generation_quality_cpu.md"
PROMPT_CHARS, COMPLETION_CHARS = 240, 160
# Records a document gives at most (training, held-out): the prompts span the documents.
PER_DOCUMENT = (2, 4)
SEQ_LEN, MICRO_BATCH, MAX_NEW = 128, 4, 32
CALIBRATION_STEPS = 3
HELDOUT_RECORDS, EVAL_BATCHES, SAMPLES = 64, 8, 2
SEED = 0

METHODS: dict[str, dict[str, Any]] = {
    "kd": {"methods": [{"name": "kd"}]},
    "sequence_kd": {
        "methods": [{"name": "kd"}],
        "generation": {"mode": "sequence_kd", "max_new_tokens": MAX_NEW, "top_p": 0.9},
    },
    "on_policy jsd": {
        "methods": [{"name": "jsd", "options": {"beta": 0.5}}],
        "generation": {"mode": "on_policy", "lambda": 0.5, "max_new_tokens": MAX_NEW, "top_p": 0.9},
    },
}


def records(path: Path, limit: int, per_document: int) -> list[dict[str, str]]:
    """Prompt/completion records cut from the `text` records of `path`, in order, at most `limit`: each
    document gives up to `per_document` consecutive (prompt, completion) windows, cut at spaces."""
    out: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        text = " ".join(json.loads(line)["text"].split())
        start = 0
        taken = 0
        while (
            start + PROMPT_CHARS + COMPLETION_CHARS <= len(text) and len(out) < limit and taken < per_document
        ):
            taken += 1
            cut = text.rfind(" ", start + 1, start + PROMPT_CHARS)
            cut = cut if cut > start else start + PROMPT_CHARS
            end = text.rfind(" ", cut + 1, cut + 1 + COMPLETION_CHARS)
            end = end if end > cut else cut + COMPLETION_CHARS
            out.append({"prompt": text[start:cut], "completion": text[cut:end]})
            start = end + 1
    return out


def write_inputs(
    prepared: Path, folder: Path, n: int, blocks: int
) -> tuple[Path, Path, Path, list[dict[str, str]]]:
    """The student's config.json, the training and held-out records; returns their paths and the held-out
    records."""
    teacher = prepared / "smollm2-135m"
    config = json.loads((teacher / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    student = folder / "student.json"
    student.write_text(json.dumps(config))
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    train_records = records(prepared / "text" / "train.jsonl", n, PER_DOCUMENT[0])
    held = records(prepared / "text" / "heldout.jsonl", HELDOUT_RECORDS, PER_DOCUMENT[1])
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in held))
    return student, train, heldout, held


def layers(init: str, teacher_blocks: int, blocks: int) -> list[int]:
    """The teacher blocks the student starts from: every (teacher / student)-th, or the first ceil(n/2) and
    the last floor(n/2) (quality.py's `ends`)."""
    if init == "every":
        return list(range(0, teacher_blocks, teacher_blocks // blocks))[:blocks]
    from quality import ends  # this script's folder is on sys.path when it runs

    return ends(teacher_blocks, blocks)


def job(prepared: Path, student: Path, name: str, folder: Path, init: list[int]) -> Path:
    config = {
        "teacher": str(prepared / "smollm2-135m"),
        "student": str(student),
        "student_init": {"from": "teacher", "layers": init},
        **METHODS[name],
        "hardware": {"device": "cpu", "gpus": 1},
        "training": {"seq_len": SEQ_LEN, "global_batch": MICRO_BATCH, "micro_batch": [MICRO_BATCH]},
    }
    path = folder / f"{name.replace(' ', '-')}.json"
    path.write_text(json.dumps(config))
    return path


def run(config: Path, data: Path, out: Path, steps: int, env: dict[str, str]) -> tuple[float, str]:
    """`gkd run` on one process; its wall seconds and output."""
    command = [sys.executable, "-m", "gkd", "run", str(config), "--data", str(data), "--out", str(out)]
    command += ["--steps", str(steps), "--processes", "1", "--seed", str(SEED)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"gkd run {config.name} failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    return seconds, done.stdout


def step_seconds(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.mean(r["seconds"] for r in rows[1:] or rows)  # the first step warms up


def pass_seconds(output: str) -> float:
    """The teacher generation pass's seconds from a sequence_kd run's output (0 when it found it stored)."""
    found = re.search(r"Teacher generations: .* \(([0-9.]+) s\)", output)
    return float(found.group(1)) if found else 0.0


def evaluate(model: Path, heldout: Path, env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "gkd", "eval", str(model), "--data", str(heldout), "--json"]
    command += [
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        str(MICRO_BATCH),
        "--max-batches",
        str(EVAL_BATCHES),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"gkd eval {model} failed: {done.stderr.strip()[-1500:]}")
    return float(json.loads(done.stdout)["loss"])


def complete(model: Path, prompts: list[str]) -> list[str]:
    """Greedy completions of MAX_NEW tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            new = lm.generate(
                **ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        out.append(tokenizer.decode(new[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=DEFAULT_PREPARED)
    parser.add_argument("--seconds", type=float, default=600.0, help="wall-time budget per method")
    parser.add_argument("--records", type=int, default=128, help="training prompt/completion records")
    parser.add_argument("--student-blocks", type=int, default=6, help="the student's blocks (default 6)")
    parser.add_argument(
        "--init",
        choices=("every", "ends"),
        default="every",
        help="student_init from evenly spaced teacher blocks (default) or from its first and last blocks",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    teacher = args.prepared / "smollm2-135m"
    if not (teacher / "config.json").is_file():
        print(f"no prepared teacher in {teacher}; run benchmarks/prepare_quality.py first", file=sys.stderr)
        return 2
    lines = [
        f"# python benchmarks/generation_quality.py --seconds {args.seconds:g} --records {args.records}"
        f" --student-blocks {args.student_blocks} --init {args.init}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # A fresh token store: sequence_kd's calibration run generates (and times) its pass, which the
        # measured run then reads. No CPU memory accounting: this measures time and quality.
        env = {**os.environ, "GKD_CACHE_DIR": str(folder / "cache"), "GKD_MEASURE": "0"}
        student, train, heldout, held = write_inputs(args.prepared, folder, args.records, args.student_blocks)
        init = layers(
            args.init,
            json.loads((teacher / "config.json").read_text())["num_hidden_layers"],
            args.student_blocks,
        )
        print(f"{sum(1 for _ in train.open())} training records, {len(held)} held-out", flush=True)
        plans: dict[str, tuple[int, float, float]] = {}
        for name in METHODS:
            config = job(args.prepared, student, name, folder, init)
            # Calibration (its sequence_kd pass is stored: the run below reads it; the budget pays for it).
            _, output = run(config, train, folder / f"calibrate-{name}", CALIBRATION_STEPS, env)
            per_step = step_seconds(folder / f"calibrate-{name}")
            generation = pass_seconds(output)
            steps = max(1, int((args.seconds - generation) / per_step))
            plans[name] = (steps, per_step, generation)
            print(
                f"{name}: {per_step:.2f} s a step, generation pass {generation:.0f} s -> {steps} steps",
                flush=True,
            )
        results = {}
        for name, (steps, per_step, generation) in plans.items():
            out = folder / name.replace(" ", "-")
            seconds, _ = run(job(args.prepared, student, name, folder, init), train, out, steps, env)
            loss = evaluate(out / "student", heldout, env)
            results[name] = (steps, per_step, generation, seconds, loss, out)
            print(f"{name}: {steps} steps in {seconds:.0f} s, held-out loss {loss:.4f}", flush=True)
        teacher_loss = evaluate(teacher, heldout, env)
        lines += [
            f"Teacher {teacher.name}; student: its config with {args.student_blocks} blocks, started from "
            f"teacher blocks {init}; "
            f"{args.records} training prompt/completion records, {len(held)} held-out; seq_len {SEQ_LEN}, "
            f"micro-batch {MICRO_BATCH}, one CPU process; max_new_tokens {MAX_NEW}, top_p 0.9. Budget "
            f"{args.seconds:g} s per method (steps from a {CALIBRATION_STEPS}-step calibration run).",
            "",
            "| method | steps | s / step | generation pass s | training run wall s "
            "| held-out loss (completions) |",
            "|---|---|---|---|---|---|",
        ]
        for name, (steps, per_step, generation, seconds, loss, _) in results.items():
            lines.append(
                f"| {name} | {steps} | {per_step:.2f} | {generation:.0f} | {seconds:.0f} | {loss:.4f} |"
            )
        lines += [
            f"| teacher | - | - | - | - | {teacher_loss:.4f} |",
            "",
            "## Greedy completions of held-out prompts",
            "",
        ]
        prompts = [r["prompt"] for r in held[:SAMPLES]]
        completions = {name: complete(r[-1] / "student", prompts) for name, r in results.items()}
        completions["teacher"] = complete(teacher, prompts)
        for i, prompt in enumerate(prompts):
            lines += [f"**Prompt {i + 1}:** {prompt[-160:]!r}", ""]
            lines += [f"- {name}: {json.dumps(c[i])}" for name, c in completions.items()]
            lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
