"""Host memory while loading a teacher checkpoint, per rank, on 2 CPU processes (gkd.runtime.loading).

    .venv/bin/python benchmarks/bench_load_memory.py            # ~2.2 GB teacher; a few minutes
    .venv/bin/python benchmarks/bench_load_memory.py --no-job   # the loads only
    .venv/bin/python benchmarks/bench_load_memory.py --job-only # the headline-shaped job only
    .venv/bin/python benchmarks/bench_load_memory.py --tensor-parallel-only  # the tensor-parallel rows only

1. Writes a Llama-style teacher checkpoint (TinyLlama's shape, 1.1B parameters, bf16, two or more safetensors
   shards, written tensor by tensor so the writer never holds the model) into a temporary folder, removed at
   the end.
2. Loads it in 2 CPU processes as the plan places a `zero3` and a `zero3_offload` teacher (under zero.Init
   with the plan's DeepSpeed config for the teacher, each rank filling its own partition), as a `replicated`
   teacher (whole on each rank: on the CPU the device is the host, so the plan's world x size), and the old
   way (`from_pretrained` whole on every rank, then cast: what `build_models` did before). A thread samples
   each rank's private memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup) every 10 ms during
   the load; the rank's fixed overhead is its private memory just before loading. Acceptance for the
   partitioned loads: peak - overhead <= 0.6 x the checkpoint's size. Then as a `tensor_parallel` teacher
   split 2 ways: built on the meta device, each rank filling only its slices from the files, against the
   path before (whole on each rank's host, then split by AutoTP); each rank's peak against its slices.
3. Unless --no-job: a scaled-down job shaped like the headline (ZeRO-3 student, ZeRO-3-offload teacher,
   kd + minilmv2) run by `gkd run`'s own code (`run_job`) for 2 steps on 2 processes, the parent sampling the
   workers' private memory and PSS; their per-node sum (peak over the run) is set against the plan's host
   memory (`gkd plan`'s per-node figure) and against what `gkd run` checks on the CPU (that figure plus each
   worker's device peak, since there the device is the host), and, as benchmarks/plan_accuracy.py compares
   a node's host memory, against that plus the runtime's fixed per-worker overhead (run.json's footprint),
   and, stricter, plus only the workers' PSS before any model (run.json's start PSS). The loading peak is
   set against the plan's loading staging plus the weights the ranks keep, which a CPU plan counts in its
   device peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = {  # TinyLlama-1.1B's shape
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
STUDENT = {
    **TEACHER,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
}
GB = 1e9
MiB = 1 << 20


def private_bytes(pid: str = "self") -> tuple[int, int]:
    """(private = Private_Clean + Private_Dirty, PSS) of a process, in bytes, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


class Sampler:
    """The peak of `read()` (a tuple (private, PSS) compared by its first) sampled every `every` s, and the
    peak of its PSS on its own."""

    def __init__(self, read: Any, every: float = 0.01) -> None:
        self.read, self.every = read, every
        self.peak: tuple[int, ...] = read()
        self.peak_pss = self.peak[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = self.read()
            except (OSError, KeyError, ValueError):  # a process ending between listing and reading
                now = self.peak
            if now[0] > self.peak[0]:
                self.peak = now
            self.peak_pss = max(self.peak_pss, now[1])
            time.sleep(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------------------
# The checkpoint, written tensor by tensor


def write_checkpoint(folder: Path, config: dict[str, Any], *, shards: int = 2) -> int:
    """A safetensors checkpoint of the model `config` describes (random bf16 weights, norms 1) in `shards`
    files; returns its size in bytes. Each tensor is made, written and dropped in turn."""
    import torch

    from gkd.planner.specs import load_spec
    from gkd.runtime.loading import build_skeleton

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    skeleton = build_skeleton(load_spec(str(folder)), attention="sdpa", dtype=torch.bfloat16)
    params = [(n, tuple(p.shape), p.numel() * 2) for n, p in skeleton.named_parameters()]
    total = sum(b for _, _, b in params)
    groups: list[list[tuple[str, tuple[int, ...], int]]] = [[] for _ in range(shards)]
    done = 0
    for entry in params:
        groups[min(shards - 1, done * shards // total)].append(entry)
        done += entry[2]
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, nbytes in group:
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with (folder / name).open("wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for key, shape, _ in group:
                if key.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy().tobytes())
                del t
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# The loads, in 2 processes


def _plan(teacher: Path, student: Path, placement: str, device: str = "cuda") -> Any:
    from gkd.config import Config
    from gkd.planner.pipeline import plan as make_plan

    return make_plan(
        Config.from_dict(
            {
                "teacher": str(teacher),
                "student": str(student),
                "methods": [{"name": "kd"}, {"name": "minilmv2"}],
                "hardware": {"gpus": 2, "gpu_memory": "80GiB", "device": device},
                "training": {"seq_len": 64, "global_batch": 2, "micro_batch": [1], "steps": 2},
                "overrides": {"student_zero_stage": 3, "teacher_placement": placement},
            }
        )
    )


def _load_worker(rank: int, world: int, teacher: str, how: str, ds_config: dict[str, Any], out: str) -> None:
    import gc

    import torch

    from gkd.planner.specs import load_spec
    from gkd.runtime.loading import build_partitioned, build_whole

    spec = load_spec(teacher)
    gc.collect()
    before = private_bytes()
    start = time.perf_counter()
    with Sampler(private_bytes) as sampler:
        if how in ("zero3", "zero3_offload"):
            model = build_partitioned(
                spec, ds_config, weights=teacher, seed=0, attention="sdpa", dtype=torch.bfloat16
            )
            kept = sum(p.ds_tensor.numel() * 2 for p in model.parameters())
        elif how == "replicated":
            cpu, bf16 = torch.device("cpu"), torch.bfloat16
            model = build_whole(spec, weights=teacher, seed=0, attention="sdpa", dtype=bf16, device=cpu)
            kept = sum(p.numel() * 2 for p in model.parameters())
        elif how in ("old-checkpoint", "old-zero3"):  # from_pretrained whole, then cast (build_models before)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True).to(torch.bfloat16)
            kept = sum(p.numel() * 2 for p in model.parameters())
            if how == "old-zero3":  # then partitioned by DeepSpeed, as place_teacher did for a zero3 teacher
                import deepspeed

                engine, *_ = deepspeed.initialize(model=model, config=dict(ds_config))
                kept = sum(p.ds_tensor.numel() * 2 for p in engine.module.parameters())
        else:  # old-random: a preset/config built whole in float32, then cast (build_models before)
            from gkd.models import build_model

            model = build_model(spec, device="cpu", dtype=torch.float32).to(torch.bfloat16)
            kept = sum(p.numel() * 2 for p in model.parameters())
    seconds = time.perf_counter() - start
    result = {
        "before": before[0],
        "before_pss": before[1],
        "peak": sampler.peak[0],
        "peak_pss": sampler.peak_pss,
        "kept": kept,
        "seconds": seconds,
    }
    Path(out, f"{how}.{rank}.json").write_text(json.dumps(result))


def run_loads(teacher: Path, student: Path, size: int, work: Path) -> list[str]:
    from gkd.runtime.launch import launch

    lines = [
        f"Checkpoint: {teacher.name}, {size / GB:.2f} GB bf16 in "
        f"{len(list(teacher.glob('*.safetensors')))} safetensors shards; 2 CPU processes; MiB per rank",
        "overhead: private memory before loading; peak: largest sampled private memory (PSS: largest PSS);",
        "grown = peak - overhead; kept: the bytes of weights the rank holds after loading",
        "",
        f"{'placement':<18}{'overhead':>9}{'peak':>7}{'grown':>7}{'PSS':>7}{'kept':>7}{'bound':>7}"
        f"{'load s':>8}  verdict",
    ]
    for how in ("zero3", "zero3_offload", "replicated", "old-checkpoint", "old-zero3", "old-random"):
        placement = how.removeprefix("old-")
        ds = (
            _plan(teacher, student, placement).deepspeed["teachers"][0]
            if placement == "zero3" or placement == "zero3_offload"
            else {}
        )
        launch(_load_worker, (str(teacher), how, ds, str(work)), processes=2)
        for rank in range(2):
            r = json.loads((work / f"{how}.{rank}.json").read_text())
            grown = r["peak"] - r["before"]
            bound = ""
            if how.startswith("zero3"):
                bound = f"{0.6 * size / MiB:.0f}"
                ok = grown <= 0.6 * size
                verdict = "OK: grown <= 0.6 x checkpoint" if ok else "EXCEEDS 0.6 x checkpoint"
            elif how == "replicated":
                verdict = f"planned world x size: {2 * size / MiB:.0f} MiB per node"
            elif how == "old-checkpoint":
                verdict = "before: from_pretrained whole per rank, memory-mapped, pages not yet read"
            elif how == "old-zero3":
                verdict = "before: the same, then partitioned by deepspeed.initialize (old place_teacher)"
            else:
                verdict = "before this change: a preset built whole in float32 per rank"
            lines.append(
                f"{how + f'[{rank}]':<18}{r['before'] / MiB:>9.0f}{r['peak'] / MiB:>7.0f}{grown / MiB:>7.0f}"
                f"{r['peak_pss'] / MiB:>7.0f}{r['kept'] / MiB:>7.0f}{bound:>7}{r['seconds']:>8.1f}  {verdict}"
            )
    return lines


# ----------------------------------------------------------------------------------------------------------
# A tensor-parallel teacher, 2 ways (gkd.runtime.tensor_parallel)


def _tp_load_worker(rank: int, world: int, teacher: str, how: str, out: str) -> None:
    """Build the teacher split 2 ways as `gkd run` now does (`tensor_parallel`: on meta, each rank filling its
    slices from the files) or as it did before (`old-tensor_parallel`: whole on the host, then split by
    AutoTP), sampling this rank's private memory."""
    import gc

    import torch

    from gkd.planner.specs import load_spec
    from gkd.runtime.loading import build_whole
    from gkd.runtime.tensor_parallel import (
        TensorParallelSource,
        build_tensor_parallel,
        place_tensor_parallel,
    )

    spec, bf16 = load_spec(teacher), torch.bfloat16
    gc.collect()
    before = private_bytes()
    start = time.perf_counter()
    with Sampler(private_bytes) as sampler:
        if how == "tensor_parallel":
            source = TensorParallelSource(spec=spec, weights=teacher, seed=0, attention="sdpa", dtype=bf16)
            split, _ = build_tensor_parallel(source, tp=world)
        else:
            whole = build_whole(
                spec, weights=teacher, seed=0, attention="sdpa", dtype=bf16, device=torch.device("cpu")
            )
            split, _ = place_tensor_parallel(whole, tp=world, dtype=bf16)
            del whole
            gc.collect()
    seconds = time.perf_counter() - start
    result = {
        "before": before[0],
        "peak": sampler.peak[0],
        "peak_pss": sampler.peak_pss,
        "after": private_bytes()[0],
        "kept": sum(p.numel() * p.element_size() for p in split.module.parameters()),
        "seconds": seconds,
    }
    Path(out, f"{how}.{rank}.json").write_text(json.dumps(result))


def run_tensor_parallel(teacher: Path, size: int, work: Path) -> list[str]:
    """The tensor-parallel rows: per rank, grown = peak - overhead against kept (its slices)."""
    from gkd.runtime.launch import launch

    lines = [
        "",
        f"Tensor-parallel teacher, 2 ways (checkpoint {size / GB:.2f} GB); MiB per rank; "
        "kept: the rank's slices",
        f"{'placement':<24}{'overhead':>9}{'peak':>7}{'grown':>7}{'PSS':>7}{'kept':>7}{'load s':>8}  verdict",
    ]
    for how in ("tensor_parallel", "old-tensor_parallel"):
        launch(_tp_load_worker, (str(teacher), how, str(work)), processes=2)
        for rank in range(2):
            r = json.loads((work / f"{how}.{rank}.json").read_text())
            grown = r["peak"] - r["before"]
            if how == "tensor_parallel":
                verdict = f"grown = {grown / r['kept']:.2f} x its slices, {grown / size:.2f} x the checkpoint"
            else:
                verdict = f"before: whole per rank, then split: {grown / size:.2f} x the checkpoint"
            lines.append(
                f"{how + f'[{rank}]':<24}{r['before'] / MiB:>9.0f}{r['peak'] / MiB:>7.0f}{grown / MiB:>7.0f}"
                f"{r['peak_pss'] / MiB:>7.0f}{r['kept'] / MiB:>7.0f}{r['seconds']:>8.1f}  {verdict}"
            )
    return lines


# ----------------------------------------------------------------------------------------------------------
# The headline-shaped job


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_children(kid)]
    return out


def _job_load_worker(rank: int, world: int, plan_json: str, out: str) -> None:
    """build_models then make_engines of the job's plan, as a worker of `gkd run` does, sampling this rank's
    private memory: its overhead before, its peak while loading, and its peak while setting up the engines."""
    import gc

    import torch

    from gkd.planner.plan import Plan
    from gkd.runtime.engines import build_models, make_engines

    plan = Plan.from_json(plan_json)
    gc.collect()
    before = private_bytes()[0]
    with Sampler(private_bytes) as loading:
        models = build_models(plan, seed=0, total_steps=2)
    with Sampler(private_bytes) as setup:
        make_engines(models, plan, device=torch.device("cpu"))
    result = {"before": before, "load": loading.peak[0], "setup": setup.peak[0]}
    Path(out, f"job-load.{rank}.json").write_text(json.dumps(result))


def run_job(teacher: Path, student: Path, work: Path) -> list[str]:
    from gkd.planner.plan import human_bytes
    from gkd.runtime.engines import host_memory_needed
    from gkd.runtime.executor import run_job as gkd_run

    # Planned as `gkd run` plans a run on this machine's CPU processes (hardware.device: cpu).
    plan = _plan(teacher, student, "zero3_offload", device="cpu")
    plan_path = work / "plan.json"
    plan_path.write_text(plan.to_json())
    corpus = work / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    me = os.getpid()

    def workers() -> tuple[int, int]:
        priv = pss = 0
        for pid in _children(me):
            try:
                a, b = private_bytes(str(pid))
            except (OSError, KeyError, ValueError):
                continue
            priv, pss = priv + a, pss + b
        return priv, pss

    from gkd.runtime.launch import launch

    launch(_job_load_worker, (plan.to_json(), str(work)), processes=2)
    ranks = [json.loads((work / f"job-load.{r}.json").read_text()) for r in range(2)]
    overhead = sum(r["before"] for r in ranks)
    load = sum(r["load"] for r in ranks)
    setup = sum(r["setup"] for r in ranks)
    start = time.perf_counter()
    with Sampler(workers, every=0.05) as sampler:
        gkd_run(
            str(plan_path),
            data=str(corpus),
            steps=2,
            out=str(work / "out"),
            processes=2,
            echo=lambda *a: None,
        )
    seconds = time.perf_counter() - start
    peak_private, peak_pss = sampler.peak[0], sampler.peak_pss
    # The node's host memory as benchmarks/plan_accuracy.py compares it: the plan's host memory, plus each
    # worker's device peak (the plan's, without reserve: on the CPU the device is the host), plus the
    # runtime's fixed overhead per worker, which no plan predicts (measured: run.json's footprint, a
    # worker's PSS at the end of its first step less the tensor storage alive then), against the sampled
    # peak of the workers' summed PSS.
    run_memory = json.loads((work / "out" / "run.json").read_text())["memory"]
    host = run_memory["host"]
    footprint = sum(host["footprint_bytes_per_rank"])
    start_pss = sum(host["start_pss_bytes_per_rank"])
    device = 2 * (sum(plan.memory.values()) - plan.memory.get("reserve", 0))
    predicted = plan.host_bytes + device + footprint
    strict = plan.host_bytes + device + start_pss
    dev_peaks = run_memory["device"]["measured_peak_bytes_per_rank"]
    on_cpu, _ = host_memory_needed(plan, world=2, cuda=False)
    parts_bytes = plan.estimates["host_parts_bytes"]
    parts = {k: human_bytes(v) for k, v in parts_bytes.items()}
    # On the CPU the plan counts the models' partitions as device memory (there the device is the host):
    # what loading keeps is the bf16 weights each rank holds, 2P/N per model, summed over the node.
    models = plan.inputs["models"]
    kept = 2 * (models["student"]["params"] + sum(t["params"] for t in models["teachers"]))
    load_planned = parts_bytes["load"] + kept

    def verdict(pred: int) -> str:
        err = abs(pred - peak_pss) / peak_pss
        return f"error {err:.1%} ({'within' if err <= 0.10 else 'outside'} 10%)"

    hb = human_bytes
    return [
        "",
        "Headline-shaped job (ZeRO-3 student, ZeRO-3-offload teacher, kd + minilmv2; 2 processes, 2 steps, "
        f"`run_job` {seconds:.0f} s), planned as `gkd run` plans CPU processes (the device is the host):",
        f"  plan: host memory {hb(plan.host_bytes)} per node (loading {parts.get('load')}, training "
        f"{parts.get('steady')}, saving {parts.get('save')}); device peak {hb(plan.peak_bytes)} per process "
        "(the models' partitions, gathered weights, activations: host memory here too)",
        f"  gkd run's check on the CPU: host memory + 2 x device peak = {hb(on_cpu)}",
        f"  loading (build_models), sum over the 2 workers of their private-memory peaks: {hb(load)}, of "
        f"which runtime overhead (before loading) {hb(overhead)}: loading adds {hb(load - overhead)}; "
        f"planned: the loading staging {parts.get('load')} + the bf16 weights the ranks keep (2P over the "
        f"node, in the device peak) {hb(kept)} = {hb(load_planned)}: "
        f"{(load - overhead) / load_planned:.2f} x",
        f"  measured while setting up the engines (make_engines): {hb(setup)} "
        f"({hb(setup - overhead)} above the overhead)",
        "  measured over the whole run (`run_job`: loading, training, saving), sum over the 2 workers at "
        f"the sampled peak: private {hb(peak_private)}, PSS {hb(peak_pss)}",
        f"  node host memory as benchmarks/plan_accuracy.py compares it: plan host {hb(plan.host_bytes)} "
        f"+ 2 x device peak {hb(device)} + runtime overhead {hb(footprint)} (run.json's footprints: PSS "
        f"at the end of step 1 less the tensor storage alive then) = {hb(predicted)} predicted; measured "
        f"peak PSS {hb(peak_pss)}; {verdict(predicted)}",
        "  the same with only the workers' PSS before any model as overhead (run.json's start PSS, "
        f"{hb(start_pss)}): {hb(strict)} predicted; {verdict(strict)}; the footprint's other "
        f"{hb(footprint - start_pss)} is memory outside tensor storage that appears after the start "
        "(not attributed here) and that no plan term predicts",
        f"  device peak per rank (tensor storage): measured {', '.join(map(hb, dev_peaks))}, "
        f"predicted {hb(run_memory['device']['predicted_peak_bytes'])}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-job", action="store_true", help="only the loads, not the headline-shaped job")
    parser.add_argument("--job-only", action="store_true", help="only the headline-shaped job, not the loads")
    parser.add_argument(
        "--tensor-parallel-only", action="store_true", help="only the tensor-parallel teacher's loads"
    )
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-load-"))
    try:
        start = time.perf_counter()
        size = write_checkpoint(work / "teacher", TEACHER)
        student = work / "student.json"
        student.write_text(json.dumps(STUDENT))
        print(f"wrote {size / GB:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        if args.tensor_parallel_only:
            print("\n".join(run_tensor_parallel(work / "teacher", size, work)), flush=True)
            return
        if not args.job_only:
            lines = run_loads(work / "teacher", student, size, work)
            print("\n".join(lines), flush=True)
            print("\n".join(run_tensor_parallel(work / "teacher", size, work)), flush=True)
        if not args.no_job:
            job = run_job(work / "teacher", student, work)
            print("\n".join(job), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
