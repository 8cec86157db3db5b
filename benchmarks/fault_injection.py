"""Fault injection: a rank killed at a seeded random moment of checkpointing or the final save, then resumed.

Claim (issue 16): wherever a rank dies (os._exit(9), as a SIGKILL would leave it) inside `--save-every 1`
checkpointing or the final save of the student, `gkd run --resume --out OUT` succeeds (or, when the kill
came before the first checkpoint was complete and no OUT was published, a new run does), and the final
student and log rows are bit-identical to an uninterrupted run's.

Each case: configs/tiny.yaml for STEPS steps on 2 CPU processes with --save-every 1, GKD_TEST_KILL_AT set to
RANK:STEP:POINT (gkd.runtime.checkpoints.FAULT_POINTS; the student points at the last step), so that the
run fails; then the resume without it, and the comparison with the reference run. The cases are drawn by a
seeded RNG over ranks, steps and points.

Usage: python benchmarks/fault_injection.py [--cases 24] [--seed 0] [--record results.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
STEPS = 4
# What a resume must repeat exactly; seconds, tokens/s and memory are measurements, not results.
MEASURED = ("seconds", "tokens_per_s", "peak_memory_bytes", "memory", "memory_source")
STUDENT_POINTS = ("student", "student-written")
RANK0_POINTS = ("marker", "latest")  # what rank 0 alone writes


@dataclass(frozen=True)
class Case:
    rank: int
    step: int
    point: str

    @property
    def spec(self) -> str:
        return f"{self.rank}:{self.step}:{self.point}"


def draw_cases(n: int, seed: int) -> list[Case]:
    """`n` distinct kill moments, drawn by a seeded RNG over ranks, steps and points."""
    from gkd.runtime.checkpoints import FAULT_POINTS

    every = [
        Case(rank, STEPS if point in STUDENT_POINTS else step, point)
        for rank in (0, 1)
        for point in FAULT_POINTS
        for step in ((STEPS,) if point in STUDENT_POINTS else range(1, STEPS + 1))
        if rank == 0 or point not in RANK0_POINTS
    ]
    return random.Random(seed).sample(every, min(n, len(every)))


def rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED} for line in lines]


def weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    [file] = (out / "student").glob("*.safetensors")
    return load_file(str(file))


def reference_run(root: Path) -> Path:
    from gkd.runtime.executor import run_job

    out = root / "reference"
    run_job(CONFIG, steps=STEPS, out=str(out), processes=2, save_every=1, echo=lambda _: None)
    return out


def run_case(case: Case, reference: Path, root: Path) -> dict[str, Any]:
    """Kill, resume (or run again when nothing was published), compare; the case's row of the table."""
    import torch

    from gkd.runtime.checkpoints import FAULT_ENV
    from gkd.runtime.executor import run_job
    from gkd.runtime.launch import WorkerFailedError

    out = root / f"case-{case.rank}-{case.step}-{case.point}"
    start = time.perf_counter()
    os.environ[FAULT_ENV] = case.spec
    try:
        run_job(CONFIG, steps=STEPS, out=str(out), processes=2, save_every=1, echo=lambda _: None)
        killed = ""
    except WorkerFailedError as err:
        killed = str(err)
    finally:
        del os.environ[FAULT_ENV]
    published = out.is_dir()
    then = "resume" if published else "new run"
    error = ""
    try:
        if published:
            run_job(None, out=str(out), resume=True, echo=lambda _: None)
        else:
            run_job(CONFIG, steps=STEPS, out=str(out), processes=2, save_every=1, echo=lambda _: None)
    except Exception as err:  # reported in the table
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    same = False
    if not error:
        a, b = weights(out), weights(reference)
        same = (
            rows(out) == rows(reference) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        )
    shutil.rmtree(out, ignore_errors=True)
    return {
        "case": case.spec,
        "killed": bool(killed) and "exit code 9" in killed,
        "then": then,
        "ok": not error,
        "identical": same,
        "error": error,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    root = Path(tempfile.mkdtemp(prefix="gkd-faults-"))
    try:
        reference = reference_run(root)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        lines = [
            f"fault injection: {args.cases} cases, seed {args.seed}, configs/tiny.yaml, {STEPS} steps, "
            f"2 CPU processes, --save-every 1 (gkd at {commit or 'unknown commit'})",
            f"{'kill at (rank:step:point)':<30} {'killed':>6} {'then':>8} {'ok':>4} {'identical':>9} "
            f"{'seconds':>7}  error",
        ]
        print("\n".join(lines), flush=True)
        results = []
        for case in draw_cases(args.cases, args.seed):
            r = run_case(case, reference, root)
            results.append(r)
            line = (
                f"{r['case']:<30} {str(r['killed']):>6} {r['then']:>8} {str(r['ok']):>4} "
                f"{str(r['identical']):>9} {r['seconds']:>7}  {r['error']}"
            )
            lines.append(line)
            print(line, flush=True)
        good = sum(r["killed"] and r["ok"] and r["identical"] for r in results)
        lines.append(
            f"{good}/{len(results)} cases: killed, then finished, bit-identical to the uninterrupted run"
        )
        print(lines[-1])
        if args.record:
            args.record.write_text("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
