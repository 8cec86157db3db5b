"""How close the plan's memory is to what `gkd run` measures, on 2 CPU processes, per strategy.

Each case is a small distillation job (tiny Llama, OPT and BERT pairs built from config.json, vocabulary 512,
so the built-in byte tokenizer fits) whose `overrides:` pin one strategy; together they cover what the
runtime executes: student ZeRO 0/1/2/3 with and without optimizer and parameter offload, the teacher
replicated, zero3, zero3_offload, tensor-parallel and offline, recompute of none or some layers, tap losses
layerwise or at the end, the plain or fused-linear logit loss, and on-policy generation (a case with a
`generation` section trains on prompt/completion records, every step sampling first). Each runs
`gkd run CONFIG --processes 2 --steps S` (in this process, as the CLI does) and reads OUT/run.json's
`memory` (gkd.runtime.memory):
- device: the plan's peak without its reserve against the largest measured peak of tensor storage over the
  steps and ranks (the CPU's "device"); error = |predicted - measured| / measured;
- host, per node: the peak of the workers' summed PSS (/proc/PID/smaps_rollup, sampled every 20 ms over
  the whole run: loading, training, saving) against the plan's host memory plus each rank's device peak
  (on the CPU the device is the host) plus the runtime's fixed per-process overhead, which the plan does
  not predict: each worker's footprint at its first step (`node_host`), measured, summed and printed as
  its own column;
- the category that differs most: the plan's resident categories (parameters, gradients, optimizer,
  buffers) against the bytes alive at the step's start, and its per-step ones (activations, taps, loss
  workspace) against the rise above that during the step.

Usage: python benchmarks/plan_accuracy.py [--only NAME[,NAME]] [--steps N] [--overhead]
--overhead times one case's steps with the CPU storage accounting on and off (GKD_MEASURE=0).
Exit code 1 when a case fails to run. `check_bounds` (used by tests/memory) says which cases miss the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
DEVICE_GOAL = 0.05  # |predicted - measured| / measured of the device peak
HOST_GOAL = 0.10  # the same for the node's host memory (see node_host)

_LLAMA = {
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
_OPT = {
    "model_type": "opt",
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "word_embed_proj_dim": None,  # = hidden
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
_BERT = {
    "model_type": "bert",
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
FAMILIES = {"llama": _LLAMA, "opt": _OPT, "bert": _BERT}
SIZES = {"teacher": (4, 128, 256), "student": (2, 64, 128)}  # layers, hidden, ffn

MINILM = {"name": "minilmv2", "options": {"relation_heads": 8}}
KD_MINILM = [{"name": "kd"}, MINILM]
FKL_MINILM = [{"name": "fkl"}, MINILM]  # every logit term takes the fused-linear path


@dataclass(frozen=True)
class Case:
    family: str
    methods: list[dict[str, Any]]
    overrides: dict[str, Any]
    # A `generation` config section: the case trains on prompt/completion records (PAIRS) instead of the
    # built-in corpus, and its measured steps include the sampling (gkd.runtime.generation).
    generation: dict[str, Any] | None = None


# Prompt/completion records for the generating cases: enough rows of 64 tokens for 2 ranks x micro-batch 4.
PAIRS = [{"prompt": f"Q{i}: what is {i} plus {i % 7}?", "completion": f" {i + i % 7}."} for i in range(200)]


def _ov(zero: int, teacher: str, tap: str = "end", loss: str = "logits", **more: Any) -> dict[str, Any]:
    return {
        "student_zero_stage": zero,
        "teacher_placement": teacher,
        "tap_loss": tap,
        "loss_path": loss,
        **more,
    }


CASES: dict[str, Case] = {
    "llama z0 replicated end logits": Case("llama", KD_MINILM, _ov(0, "replicated", recompute_layers=[])),
    "llama z1 replicated layerwise logits": Case(
        "llama", KD_MINILM, _ov(1, "replicated", "layerwise", recompute_layers=[])
    ),
    "llama z2 replicated layerwise fused": Case(
        "llama", FKL_MINILM, _ov(2, "replicated", "layerwise", "fused_linear", recompute_layers=[])
    ),
    "llama z2+opt-offload replicated end": Case(
        "llama", KD_MINILM, _ov(2, "replicated", student_offload="optimizer", recompute_layers=[])
    ),
    "llama z3 zero3 layerwise logits": Case(
        "llama", KD_MINILM, _ov(3, "zero3", "layerwise", recompute_layers=[])
    ),
    "llama z3+opt-offload zero3_offload end": Case(
        "llama", KD_MINILM, _ov(3, "zero3_offload", student_offload="optimizer", recompute_layers=[])
    ),
    "llama z3+param-offload zero3 end fused": Case(
        "llama",
        FKL_MINILM,
        _ov(3, "zero3", loss="fused_linear", student_offload="optimizer+parameters", recompute_layers=[]),
    ),
    "llama z2 tensor-parallel end logits": Case(
        "llama", KD_MINILM, _ov(2, "tensor_parallel", tensor_parallel=2, recompute_layers=[])
    ),
    "llama z2 offline top-k": Case(
        "llama",
        [{"name": "kd"}],
        {"student_zero_stage": 2, "teacher_placement": "offline", "recompute_layers": []},
    ),
    "llama z2 replicated recompute layer 0": Case(
        "llama", KD_MINILM, _ov(2, "replicated", "layerwise", recompute_layers=[0])
    ),
    "opt z1 replicated end logits": Case("opt", KD_MINILM, _ov(1, "replicated", recompute_layers=[])),
    "opt z2 zero3 layerwise fused recompute layer 1": Case(
        "opt", FKL_MINILM, _ov(2, "zero3", "layerwise", "fused_linear", recompute_layers=[1])
    ),
    "bert z2 replicated layerwise logits": Case(
        "bert", KD_MINILM, _ov(2, "replicated", "layerwise", recompute_layers=[])
    ),
    "bert z3 zero3 end recompute layers 0-1": Case(
        "bert", KD_MINILM, _ov(3, "zero3", recompute_layers=[0, 1])
    ),
    # Every micro-batch sampled by the student (lambda 1): each measured step includes the generate op.
    "llama z2 replicated on-policy lambda 1": Case(
        "llama",
        [{"name": "kd"}],
        _ov(2, "replicated", recompute_layers=[]),
        generation={"mode": "on_policy", "lambda": 1.0, "max_new_tokens": 16},
    ),
}


def write_case(folder: Path, case: Case, *, seq_len: int = 64, micro_batch: int = 4) -> Path:
    """The case's models and config in `folder`; returns the config's path."""
    refs = {}
    for role, (layers, hidden, ffn) in SIZES.items():
        cfg = {**FAMILIES[case.family], "num_hidden_layers": layers, "hidden_size": hidden}
        if case.family == "opt":
            cfg.update(ffn_dim=ffn, word_embed_proj_dim=hidden)
        else:
            cfg["intermediate_size"] = ffn
        path = folder / f"{case.family}-{role}.json"
        path.write_text(json.dumps(cfg))
        refs[role] = str(path)
    config = {
        "teacher": refs["teacher"],
        "student": refs["student"],
        "methods": case.methods,
        "hardware": {"gpus": 2, "gpu_memory": "8GiB", "host_memory": "16GiB"},
        "training": {"seq_len": seq_len, "global_batch": 2 * micro_batch, "micro_batch": [micro_batch]},
        "overrides": case.overrides,
    }
    if case.generation is not None:
        config["generation"] = case.generation
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    path = folder / "job.json"
    path.write_text(json.dumps(config))
    return path


class NodeSampler(threading.Thread):
    """The node's host memory while a run goes on: every `interval` seconds the sum of the PSS
    (/proc/PID/smaps_rollup) of the workers of the `gkd run` process `pid` started with `command` (its
    descendants forked from it, which share that command line: not a compiler that builds a DeepSpeed op);
    `peak` is the largest sum. The command is given, not read from the process: read at once after it is
    started, it can still be the command of the process that forked it, before its exec."""

    def __init__(self, pid: int, command: list[str], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.command = pid, command
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        from gkd.runtime.memory import host_memory

        try:
            parent = psutil.Process(self.pid)
        except psutil.Error:  # the run ended before the first sample
            return
        while not self._done.is_set():
            total = 0
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                break
            for child in children:
                try:
                    if child.cmdline() != self.command:
                        continue
                except psutil.Error:  # gone meanwhile
                    continue
                m = host_memory(Path(f"/proc/{child.pid}/smaps_rollup"))
                total += m.pss if m is not None else 0
            self.peak = max(self.peak, total)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def run_case(case: Case, folder: Path, *, steps: int) -> dict[str, Any]:
    """Run the case with `gkd run` on 2 processes; its plan, run.json, log rows and the node's sampled peak
    of the workers' summed PSS (`NodeSampler`)."""

    config = write_case(folder, case)
    out = folder / "out"
    # `gkd run` in a process of its own, as a user starts it: its workers share pages with a small, idle
    # parent. Forked from a long-lived process (a test runner) that keeps touching its own memory, the
    # workers' PSS shares of the inherited pages would move during the run, which is not the run's memory.
    command = [sys.executable, "-m", "gkd.cli", "run", str(config), "--steps", str(steps), "--out", str(out)]
    command += ["--processes", "2"]
    if case.generation is not None:
        command += ["--data", str(folder / "pairs.jsonl")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        sampler = NodeSampler(run.pid, command)
        sampler.start()
        try:
            stdout, stderr = run.communicate(timeout=900)
        finally:
            node_peak = sampler.stop()
    if run.returncode != 0:
        raise RuntimeError(f"gkd run of {case.name!r} exited {run.returncode}: {(stderr or stdout)[-2000:]}")
    if not node_peak:
        raise RuntimeError(f"no worker of the gkd run of {case.name!r} was sampled")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {
        "plan": json.loads((out / "plan.json").read_text()),
        "run": json.loads((out / "run.json").read_text()),
        "rows": rows,
        "node_peak_pss": node_peak,
    }


def node_host(result: dict[str, Any]) -> tuple[int, int, int, int]:
    """The node's host memory, predicted against measured: (the plan's host bytes per node, the ranks'
    device peaks (host memory on the CPU: the plan's peak, an offline teacher pass included, once per rank),
    the runtime's fixed overhead, the measured peak of the workers' summed PSS over the whole run).

    The overhead is what no plan predicts, measured: each worker's footprint in run.json (its PSS at the end
    of its first step less the tensor storage alive then: Python, torch, the libraries and the model code,
    the parent's pages the forked worker has written to, DeepSpeed's engine, the allocator's free lists),
    summed over the workers. It is taken from the same run (a separate calibration run varied by +-40 MiB
    per worker with what the parent had imported before forking, more than these tiny plans' terms), so
    for these cases the comparison tests the plan's terms and that nothing else grows over the run, loading
    and saving included; the headline-shaped job of benchmarks/bench_load_memory.py, whose plan terms are
    GiBs, tests the terms themselves."""
    from gkd.planner.plan import Plan

    plan = Plan.from_dict(result["plan"])
    footprint = result["run"]["memory"]["host"]["footprint_bytes_per_rank"]
    device = sum(plan.memory.values()) - plan.memory.get("reserve", 0)
    return int(plan.host_bytes), device * len(footprint), sum(footprint), int(result["node_peak_pss"])


STATIC = ("parameters", "gradients", "optimizer", "buffers")
DYNAMIC = ("activations", "taps", "loss_workspace")


def most_different(plan: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The part of the plan that differs most from the measurement: resident (the categories STATIC against
    the bytes alive at a step's start) or per-step (DYNAMIC against the rise during the step)."""
    from gkd.planner.plan import Plan
    from gkd.runtime.memory import training_memory

    memory = training_memory(Plan.from_dict(plan))  # without an offline teacher's pass, which is not measured
    measured = [r["memory"] for r in rows if min(r["memory"]["device_peak_bytes"]) >= 0]
    at_start = max(max(m["device_live_at_start_bytes"]) for m in measured)
    rise = max(
        max(p - s for p, s in zip(m["device_peak_bytes"], m["device_live_at_start_bytes"], strict=True))
        for m in measured
    )
    static = sum(memory.get(k, 0) for k in STATIC)
    dynamic = sum(memory.get(k, 0) for k in DYNAMIC)
    parts = {
        f"resident {static / MIB:.2f} vs {at_start / MIB:.2f}": abs(static - at_start),
        f"per-step {dynamic / MIB:.2f} vs {rise / MIB:.2f}": abs(dynamic - rise),
    }
    return max(parts, key=lambda k: parts[k])


def table_row(name: str, result: dict[str, Any]) -> tuple[str, float, float]:
    dev = result["run"]["memory"]["device"]
    plan_host, device, overhead, measured = node_host(result)
    predicted = plan_host + device + overhead
    host_error = abs(predicted - measured) / measured
    cells = [
        name,
        f"{dev['predicted_peak_bytes'] / MIB:.2f}",
        " / ".join(f"{b / MIB:.2f}" for b in dev["measured_peak_bytes_per_rank"]),
        f"{dev['error']:.1%}",
        f"{plan_host / MIB:.1f}",
        f"{device / MIB:.1f}",
        f"{overhead / MIB:.0f}",
        f"{predicted / MIB:.0f}",
        f"{measured / MIB:.0f}",
        f"{host_error:.1%}",
        most_different(result["plan"], result["rows"]),
    ]
    return "| " + " | ".join(cells) + " |", dev["error"], host_error


HEADER = (
    "| case | device predicted MiB | device measured MiB (rank 0 / 1) | device error | plan host MiB | "
    "+ device x 2 MiB | + overhead MiB | = host predicted MiB | host measured MiB (node peak) | host error | "
    "differs most (predicted vs measured MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def check_bounds(names: list[str], *, steps: int = 2) -> list[str]:
    """Run the cases `names`; the lines of those whose device or host error misses its goal."""
    misses = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            folder = Path(tmp, f"case{i}")
            folder.mkdir()
            line, dev, host = table_row(name, run_case(CASES[name], folder, steps=steps))
            if dev > DEVICE_GOAL or host > HOST_GOAL:
                misses.append(line)
    return misses


def overhead(name: str, steps: int) -> None:
    """Median step seconds of one case with the storage accounting on and off."""
    print(
        f"\ntracker overhead on {name!r}, {steps} steps (median step seconds; a run of fewer than 20 steps "
        "measures every step):"
    )
    for setting in ("1", "0", "1", "0"):
        os.environ["GKD_MEASURE"] = setting
        with tempfile.TemporaryDirectory() as tmp:
            result = run_case(CASES[name], Path(tmp), steps=steps)
        seconds = statistics.median(r["seconds"] for r in result["rows"][1:])
        print(f"  GKD_MEASURE={setting}: {seconds * 1e3:.1f} ms")
    os.environ["GKD_MEASURE"] = "1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument(
        "--sites", metavar="DIR", help="write each case's bytes alive at its peak by creation site into DIR"
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CASES)
    only = f" --only '{args.only}'" if args.only else ""
    print(f"# python benchmarks/plan_accuracy.py{only} --steps {args.steps}")
    print(HEADER)
    failed = 0
    devs, hosts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            folder = Path(tmp, f"case{i}")
            folder.mkdir()
            start = time.perf_counter()
            if args.sites:  # gkd.runtime.memory's diagnosis (slower: a Python stack walk per allocation)
                os.environ["GKD_MEASURE"] = "sites"
                os.environ["GKD_MEASURE_DIR"] = str(Path(args.sites, f"case{i}"))
                Path(args.sites, f"case{i}").mkdir(parents=True, exist_ok=True)
                Path(args.sites, f"case{i}", "name").write_text(name)
            try:
                result = run_case(CASES[name], folder, steps=args.steps)
            except Exception as err:  # a failed case is a row, and the exit code
                failed += 1
                print(
                    f"| {name} | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:150]} |", flush=True
                )
                continue
            line, dev, host = table_row(name, result)
            devs.append(dev)
            hosts.append(host)
            print(line + f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)
    if devs:
        print(
            f"\ndevice error: median {statistics.median(devs):.1%}, max {max(devs):.1%}; "
            f"within {DEVICE_GOAL:.0%}: {sum(d <= DEVICE_GOAL for d in devs)}/{len(devs)}"
        )
        print(
            f"host error: median {statistics.median(hosts):.1%}, max {max(hosts):.1%}; "
            f"within {HOST_GOAL:.0%}: {sum(h <= HOST_GOAL for h in hosts)}/{len(hosts)}"
        )
    if args.overhead:
        overhead(names[0], max(args.steps, 6))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
