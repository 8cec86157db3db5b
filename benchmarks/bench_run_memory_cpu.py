"""`gkd run`'s memory on the CPU, by tensor-storage accounting, against the plan (a probe, see below).

For a job config (2 CPU processes, gloo, DeepSpeed), each rank builds and places the models as `gkd run` does,
trains one warm-up step (so the optimizer states exist), and then measures on the next micro-step:
- static: the bytes of every live CPU tensor storage at the start of the micro-step (found through the garbage
  collector): weights, gradients' partitions, optimizer states, DeepSpeed's buffers, the teacher;
- forward+backward: the peak of the storages created during the engine's forward and backward (a
  TorchDispatchMode that counts each new storage until it is freed);
- optimizer step: the same for `engine.step()`.
The plan's prediction is its peak minus the reserve (CUDA context and fragmentation, not tensors), split
into the static categories (parameters, gradients, optimizer, buffers) and the dynamic ones (activations,
taps, loss workspace).

A second table splits the loss: for each loss term, in one process on the same models and micro-batch, the
peak of the storages its computation creates and what it leaves alive (its saved tensors for the backward),
against the plan's loss workspace.

This is a probe, not a gate: the plan predicts GPU memory, where the losses run as fused kernels (Triton:
chunked logits, streamed relation matrices). On the CPU the losses run their torch paths, which materialise
float32 copies of the (tokens x vocabulary) logits and the (heads x T x T) relation matrices, so the
forward+backward peak here is well above the plan's dynamic categories, and the second table shows where.
The GPU check is `benchmarks/device/gpu_run.py`.

Usage: python benchmarks/bench_run_memory_cpu.py [CONFIG ...]
(each CONFIG is planned for 2 GPUs = the 2 CPU processes; default: benchmarks/configs/run_memory/*.yaml, a
4-layer h512 Llama teacher and a 2-layer h256 student, seq 256, micro-batch 4, kd + minilmv2).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

MIB = 1 << 20
STATIC = ("parameters", "gradients", "optimizer", "buffers")
DYNAMIC = ("activations", "taps", "loss_workspace")


class StorageTracker(TorchDispatchMode):
    """Live bytes of the CPU tensor storages created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.sizes:
            return
        self.sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._gone, key)

    def _gone(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: not an allocation (and the input may
        # predate the tracker, whose storage must not be counted as new).
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._add(t)
        return out


def live_cpu_storage_bytes() -> int:
    sizes: dict[int, int] = {}
    for obj in gc.get_objects():
        is_tensor = type(obj) is torch.Tensor or isinstance(obj, torch.nn.Parameter)
        if is_tensor and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def worker(rank: int, world: int, plan_json: str, out: str) -> None:
    from gkd.planner.plan import Plan
    from gkd.runtime.data import batches, load_tokenizer
    from gkd.runtime.engines import build_models, make_engines

    plan = Plan.from_json(plan_json)
    config = plan.inputs["config"]
    models = build_models(plan, seed=0, total_steps=4)
    engines = make_engines(models, plan, device=torch.device("cpu"))
    engine, module = engines.student, engines.module
    module.tap_loss = plan.strategy.tap_loss
    tokenizer = load_tokenizer(config["teachers"][0], models.teacher_specs[0])
    stream = batches(
        None,
        tokenizer,
        seq_len=int(config["training"]["seq_len"]),
        micro_batch=plan.strategy.micro_batch,
        objective="mlm" if models.student_spec.is_encoder else "causal",
        rank=rank,
        world=world,
        seed=0,
    )
    module.resolved, module.total_steps = models.resolver.at(0), 4
    for _ in range(plan.strategy.grad_accum):  # warm-up step: optimizer states and buckets exist after it
        total, _ = engine(next(stream))
        engine.backward(total)
        engine.step()
    del models
    gc.collect()
    static = live_cpu_storage_bytes()
    batch = next(stream)
    with StorageTracker() as fwd_bwd:
        total, _ = engine(batch)
        engine.backward(total)
    with StorageTracker() as opt:
        engine.step()
    result = {"static": static, "forward_backward": fwd_bwd.peak, "optimizer_step": opt.peak}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def main() -> int:
    from gkd.config import load_config
    from gkd.planner.pipeline import plan as make_plan
    from gkd.runtime.launch import launch

    header = ["config", "static predicted", "static measured", "dynamic predicted", "fwd+bwd measured"]
    print(
        "| " + " | ".join(f"{h} MiB" for h in header[1:]).join(["config | ", ""]) + " | optimizer step MiB |"
    )
    print("|---|---|---|---|---|---|")
    default = sorted(str(p) for p in (Path(__file__).parent / "configs" / "run_memory").glob("*.yaml"))
    for path in sys.argv[1:] or default:
        config = load_config(path)
        config = dataclasses.replace(config, hardware=dataclasses.replace(config.hardware, gpus=2))
        plan = make_plan(config)
        memory = plan.to_dict()["memory"]
        with tempfile.TemporaryDirectory() as out:
            launch(worker, (plan.to_json(), out), processes=2, timeout_s=600)
            got = max(
                (json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)),
                key=lambda g: g["static"] + g["forward_backward"],
            )
        static = sum(memory.get(k, 0) for k in STATIC)
        dynamic = sum(memory.get(k, 0) for k in DYNAMIC)
        cells = [
            Path(path).name,
            f"{static / MIB:.1f}",
            f"{got['static'] / MIB:.1f}",
            f"{dynamic / MIB:.1f}",
            f"{got['forward_backward'] / MIB:.1f}",
            f"{got['optimizer_step'] / MIB:.1f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    for path in sys.argv[1:] or default:
        print()
        print(f"{Path(path).name}: loss terms (one process), plan's loss workspace ", end="")
        config = load_config(path)
        plan = make_plan(dataclasses.replace(config, hardware=dataclasses.replace(config.hardware, gpus=2)))
        print(f"{plan.to_dict()['memory'].get('loss_workspace', 0) / MIB:.1f} MiB")
        print("| term | peak MiB | kept for backward MiB |")
        print("|---|---|---|")
        for name, peak, kept in term_peaks(plan):
            print(f"| {name} | {peak / MIB:.1f} | {kept / MIB:.1f} |", flush=True)
    return 0


def term_peaks(plan: Any) -> list[tuple[str, int, int]]:
    """(term, peak of the storages its computation creates, bytes it leaves alive) on one micro-batch."""
    from gkd.runtime.data import batches, load_tokenizer
    from gkd.runtime.engines import build_models
    from gkd.runtime.step import StepRunner

    config = plan.inputs["config"]
    models = build_models(plan, seed=0, total_steps=4)
    resolved = models.resolver.at(0)
    tokenizer = load_tokenizer(config["teachers"][0], models.teacher_specs[0])
    batch = next(
        batches(
            None,
            tokenizer,
            seq_len=int(config["training"]["seq_len"]),
            micro_batch=plan.strategy.micro_batch,
            objective="mlm" if models.student_spec.is_encoder else "causal",
        )
    )
    runner = StepRunner(
        student=models.student,
        teachers=models.teachers,
        loss_module=models.loss,
        resolved=resolved,
        batch=batch,
        total_steps=4,
    )
    runner.teacher_taps = [runner.run_teacher(i, names) for i, names in enumerate(resolved.teacher_taps)]
    taps = runner.run_student(resolved.student_taps)
    out = []
    for term in resolved.loss_terms:
        with StorageTracker() as tracker:
            value = runner.term(term, taps)
        out.append((f"{term.method}.{term.name}", tracker.peak, tracker.live))
        del value
    return out


if __name__ == "__main__":
    sys.exit(main())
