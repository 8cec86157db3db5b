"""How many parameters a ZeRO-3 model holds gathered during an inference forward, by DeepSpeed setting.

The plan counts a ZeRO-3 teacher's gathered working set as the largest module plus the prefetch bucket
(`gkd.planner.memory.teacher_residency`). This probe measures what DeepSpeed holds: the tiny Llama teacher
preset is built partitioned (as `gkd run` builds it) on 2 CPU processes, placed in a ZeRO-3 inference engine
(no optimizer), and run forward 4 times under no_grad; after each module's forward, the number of elements
whose parameters are gathered (ds_status not NOT_AVAILABLE) is read, after DeepSpeed's own release for that
module, and the largest is printed per forward. The first forward records DeepSpeed's trace and releases each
module's parameters at once (0); later ones prefetch from the trace and hold up to the max-live setting plus
about one module, whatever the prefetch bucket: more than the plan counts when max-live exceeds the bucket.

Usage: python benchmarks/bench_zero3_gathered.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (prefetch bucket, max live parameters, max reuse distance or None for DeepSpeed's default)
SETTINGS = [
    (20_000, 1_000_000_000, None),
    (20_000, 1_000_000_000, 0),
    (20_000, 60_000, None),
    (20_000, 20_000, None),
]


def _worker(rank: int, world: int, results: str) -> None:
    import json

    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from gkd.models import resolve_model
    from gkd.runtime.loading import build_partitioned

    spec = resolve_model("tiny-llama-teacher")
    rows = []
    for prefetch, live, reuse in SETTINGS:
        zero: dict[str, Any] = {
            "stage": 3,
            "stage3_prefetch_bucket_size": prefetch,
            "stage3_max_live_parameters": live,
            "stage3_param_persistence_threshold": 0,
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

        def after(*_: Any, params: list[Any] = params, peak: list[int] = peak) -> None:
            gathered = sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
            peak[0] = max(peak[0], gathered)

        for module in engine.module.modules():
            module.register_forward_hook(after)
        largest = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in engine.module.modules())
        per_forward = []
        for _ in range(4):
            peak[0] = 0
            with torch.no_grad():
                engine.module(input_ids=torch.zeros(1, 16, dtype=torch.long), use_cache=False)
            per_forward.append(peak[0])
        total = sum(p.ds_numel for p in params)
        rows.append([prefetch, live, reuse, total, largest, per_forward])
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
    print("ZeRO-3 inference forward of tiny-llama-teacher on 2 CPU processes: elements gathered at most")
    print("| prefetch bucket | max live | max reuse distance | model | largest module | forwards 1-4 |")
    print("|---|---|---|---|---|---|")
    for prefetch, live, reuse, total, largest, per_forward in rows:
        reuse_text = "default" if reuse is None else str(reuse)
        forwards = " / ".join(f"{n:,}" for n in per_forward)
        print(f"| {prefetch:,} | {live:,} | {reuse_text} | {total:,} | {largest:,} | {forwards} |")


if __name__ == "__main__":
    main()
