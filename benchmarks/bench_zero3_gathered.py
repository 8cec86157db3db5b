"""How many parameters a ZeRO-3 model holds gathered during an inference forward, by DeepSpeed setting.

The tiny Llama teacher preset is built partitioned (as `gkd run` builds it) on 2 CPU processes, placed in a
ZeRO-3 inference engine (no optimizer), and run forward 4 times under no_grad. Before each module's forward
(after DeepSpeed's fetch and prefetch) and after it (after DeepSpeed's release), the number of elements whose
parameters are gathered (ds_status not NOT_AVAILABLE) is read, and the largest is printed per forward; a
storage tracker (gkd.runtime.memory's) gives the peak bytes of tensor storage created during each forward.
The first forward records DeepSpeed's trace and gathers one module at a time; later ones prefetch from the
trace and hold up to the max-live setting plus about one module, whatever the prefetch bucket, plus one
prefetch group's all-gather buffer. The "gkd" rows use the max-live gkd emits (capped at the prefetch
bucket, gkd.planner.memory.effective_deepspeed); "planned" is what the plan's rule counts for the row's
settings (zero3_gathered_bytes, and with zero3_gather_buffer_bytes in KiB).

Usage: python benchmarks/bench_zero3_gathered.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFETCH = 20_000
# (label, prefetch bucket, max live parameters, max reuse distance or None for DeepSpeed's default); the
# persistence threshold is 0 (every tensor partitioned). The "gkd" rows' bucket and max-live are what gkd
# emits for this model (`gkd_settings`) from a config that leaves both at their defaults, or sets the bucket
# to PREFETCH.
SETTINGS: list[tuple[str, int | None, int | None, int | None]] = [
    ("DeepSpeed's max-live", PREFETCH, 1_000_000_000, None),
    ("DeepSpeed's max-live", PREFETCH, 1_000_000_000, 0),
    ("", PREFETCH, 60_000, None),
    ("gkd, bucket 20,000", PREFETCH, None, None),
    ("gkd, defaults", None, None, None),
]


def gkd_settings(prefetch: int | None, params: int) -> tuple[int, int]:
    """The prefetch bucket and max-live gkd emits (gkd.planner.memory.effective_deepspeed) for a model of
    `params` parameters from a config with this bucket (None: the default) and the default max-live."""
    from gkd.config import DeepSpeedSettings
    from gkd.planner.memory import effective_deepspeed

    ds = DeepSpeedSettings(stage3_param_persistence_threshold=0)
    if prefetch is not None:
        ds = DeepSpeedSettings(stage3_prefetch_bucket_size=prefetch, stage3_param_persistence_threshold=0)
    emitted = effective_deepspeed(ds, params)
    return emitted.stage3_prefetch_bucket_size, emitted.stage3_max_live_parameters


def _worker(rank: int, world: int, results: str) -> None:
    import json

    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from gkd.models import resolve_model
    from gkd.runtime.loading import build_partitioned, build_skeleton
    from gkd.runtime.memory import _storage_tracker_class

    spec = resolve_model("tiny-llama-teacher")
    rows = []
    model_params = sum(
        p.numel() for p in build_skeleton(spec, attention="sdpa", dtype=torch.bfloat16).parameters()
    )
    for label, bucket, max_live, reuse in SETTINGS:
        prefetch, live = (bucket or 0, max_live or 0) if max_live else gkd_settings(bucket, model_params)
        threshold = 0
        zero: dict[str, Any] = {
            "stage": 3,
            "stage3_prefetch_bucket_size": prefetch,
            "stage3_max_live_parameters": live,
            "stage3_param_persistence_threshold": threshold,
            "offload_param": {"device": "cpu"},
        }
        if reuse is not None:
            zero["stage3_max_reuse_distance"] = reuse
        config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": zero}
        model = build_partitioned(spec, config, weights=None, seed=0, attention="sdpa", dtype=torch.bfloat16)
        model.eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        params = list(engine.module.parameters())
        peak = [0]

        def count(*_: Any, params: list[Any] = params, peak: list[int] = peak) -> None:
            gathered = sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
            peak[0] = max(peak[0], gathered)

        # Registered after DeepSpeed's own hooks: read after its fetch (and prefetch) before each module's
        # forward, and after its release after it.
        for module in engine.module.modules():
            module.register_forward_pre_hook(count)
            module.register_forward_hook(count)
        largest = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in engine.module.modules())
        per_forward, storage = [], []
        for _ in range(4):
            peak[0] = 0
            tracker = _storage_tracker_class()()  # the bytes of tensor storage created and alive
            with torch.no_grad(), tracker:
                engine.module(input_ids=torch.zeros(1, 16, dtype=torch.long), use_cache=False)
            per_forward.append(peak[0])
            storage.append(tracker.peak)
        total = sum(p.ds_numel for p in params)
        persistent = sum(p.ds_numel for p in params if p.ds_persist)
        rows.append([label, prefetch, live, reuse, total, largest, persistent, per_forward, storage])
        engine.destroy()
    if rank == 0:
        Path(results).write_text(json.dumps(rows))


def main() -> None:
    import json
    import tempfile

    from gkd.runtime.launch import launch

    with tempfile.TemporaryDirectory() as folder:
        results = str(Path(folder) / "rows.json")
        launch(_worker, (results,), processes=2)
        rows = json.loads(Path(results).read_text())
    from gkd.config import DeepSpeedSettings
    from gkd.planner.memory import BYTES_BF16, zero3_gather_buffer_bytes, zero3_gathered_bytes

    print(
        "ZeRO-3 inference forward of tiny-llama-teacher on 2 CPU processes, per forward 1-4: elements\n"
        "gathered at most (read before and after each module), and the peak of tensor storage created\n"
        "during the forward (KiB: gathered weights, all-gather buffers, activations). planned: the elements\n"
        "gkd's rule counts gathered (gkd.planner.memory.zero3_gathered_bytes) with the row's settings, and\n"
        "with the all-gather buffer (zero3_gather_buffer_bytes) in KiB"
    )
    print(
        "| settings | prefetch bucket | max live | max reuse distance | model | largest module "
        "| gathered, forwards 1-4 | planned | storage KiB, forwards 1-4 | planned KiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, prefetch, live, reuse, total, largest, persistent, per_forward, storage in rows:
        reuse_text = "default" if reuse is None else str(reuse)
        forwards = " / ".join(f"{n:,}" for n in per_forward)
        kib = " / ".join(f"{b / 1024:,.0f}" for b in storage)
        ds = DeepSpeedSettings(stage3_prefetch_bucket_size=prefetch, stage3_max_live_parameters=live)
        gathered = zero3_gathered_bytes(total, largest, persistent, ds)
        buffer = zero3_gather_buffer_bytes(total, persistent, ds)
        print(
            f"| {label} | {prefetch:,} | {live:,} | {reuse_text} | {total:,} | {largest:,} | {forwards} "
            f"| {gathered // BYTES_BF16:,} | {kib} | {(gathered + buffer) / 1024:,.0f} |"
        )


if __name__ == "__main__":
    main()
