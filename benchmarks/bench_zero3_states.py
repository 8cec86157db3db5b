"""What a ZeRO-3 student without offload holds per rank in each phase of a training step, in units of P/N.

A Llama student of about 34M parameters (bf16, no teacher, micro-batch 1 of 8 tokens, so activations are
negligible) is built under zero.Init on 2 CPU processes and trained for 2 steps with the DeepSpeed settings
gkd emits (`effective_deepspeed`, torch's AdamW through `torch_adam`, DeepSpeed's sub_group_size left at its
default of 1e9 elements, as gkd leaves it). The reduce bucket and the prefetch bucket are set small
(REDUCE_BUCKET, PREFETCH elements) so that the buffers do not hide the model states. A storage tracker (gkd's
own, `gkd.runtime.memory`) is active from before the model is built, so every tensor storage is counted.
Step 2 is measured (step 1 allocates Adam's moments): the live bytes at its start, at the end of the
forward, the peak in the backward and at its end, and the peak inside the optimizer step, with what was
alive at the end of the forward and at the two peaks, grouped by where DeepSpeed or torch created it.

"plan" is what gkd.planner.memory counts for the same settings: the student's model states
(`student_model_states`, without the 4L of gathered weights and gradients, which the plan counts as the
gathered working set), the buffers (`deepspeed_buffers`: reduce bucket and all-gather buffer) and the
gathered weights (`zero3_gathered_bytes`), all resident for the whole step.

Usage: nice python benchmarks/bench_zero3_states.py [--max-reuse-distance N] [--foreach]
(N: DeepSpeed's stage3_max_reuse_distance, which gkd leaves at DeepSpeed's default of 1e9 elements.
--foreach: torch Adam's foreach path, its default on CUDA; on the CPU its default is the single-tensor path.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDUCE_BUCKET = 200_000
PREFETCH = 200_000
LAYERS, HIDDEN, INTERMEDIATE, VOCAB = 8, 512, 1408, 8192


def _zero_config(params: int, reuse: int | None, foreach: bool) -> dict[str, Any]:
    from gkd.config import DeepSpeedSettings
    from gkd.planner.memory import effective_deepspeed

    ds = effective_deepspeed(
        DeepSpeedSettings(reduce_bucket_size=REDUCE_BUCKET, stage3_prefetch_bucket_size=PREFETCH), params
    )
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}
            | ({"foreach": True} if foreach else {}),
        },
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
            "stage3_max_live_parameters": ds.stage3_max_live_parameters,
            "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
        }
        | ({} if reuse is None else {"stage3_max_reuse_distance": reuse}),
    }


def _group(at_peak: dict[str, int]) -> dict[str, int]:
    """Bytes alive at a peak by creating function (the site's file and function, without the line)."""
    out: dict[str, int] = {}
    for site, size in at_peak.items():
        parts = site.split(" ")
        key = " ".join(parts[1:]) if len(parts) > 1 else site
        if ":" in key:
            path, rest = key.rsplit(":", 1)
            key = f"{path} {rest.split(' ', 1)[-1]}"
        out[key] = out.get(key, 0) + size
    return out


def _live_by_site(tracker: Any) -> dict[str, int]:
    """Bytes alive now by creating site."""
    out: dict[str, int] = {}
    for key, site in tracker.sites.items():
        out[site] = out.get(site, 0) + tracker.sizes.get(key, 0)
    return out


def _worker(rank: int, world: int, results: str, reuse: int | None, foreach: bool) -> None:
    import json

    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gkd.runtime.memory import _storage_tracker_class

    cfg = LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        torch_dtype=torch.bfloat16,
    )
    tracker = _storage_tracker_class()()
    tracker.sites = {}
    with tracker:
        # The config needs the parameter count (buckets capped at it): a first pass on the meta device.
        with torch.device("meta"):
            params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        config = _zero_config(params, reuse, foreach)
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        largest = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in engine.module.modules())
        persistent = sum(p.ds_numel for p in engine.module.parameters() if p.ds_persist)
        ids = torch.arange(8).remainder(VOCAB).unsqueeze(0)
        rows: list[tuple[str, int]] = []
        groups: dict[str, dict[str, int]] = {}
        rows.append(("after deepspeed.initialize", tracker.live))
        for step in (1, 2):
            start = tracker.live
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            after_forward = tracker.live
            forward_sites = _group(_live_by_site(tracker))
            tracker.peak, tracker.at_peak = tracker.live, {}
            engine.backward(loss)
            backward_peak, after_backward = tracker.peak, tracker.live
            backward_sites = _group(tracker.at_peak)
            tracker.peak, tracker.at_peak = tracker.live, {}
            engine.step()
            step_peak, after_step = tracker.peak, tracker.live
            if step == 2:
                rows += [
                    ("step 2 start", start),
                    ("end of forward", after_forward),
                    ("peak in backward", backward_peak),
                    ("end of backward", after_backward),
                    ("peak in optimizer step", step_peak),
                    ("end of step", after_step),
                ]
                groups = {
                    "end of forward": forward_sites,
                    "peak in backward": backward_sites,
                    "peak in optimizer step": _group(tracker.at_peak),
                }
            del loss
    if rank == 0:
        Path(results).write_text(json.dumps([params, largest, persistent, config, rows, groups]))


def main() -> None:
    import json
    import tempfile

    from gkd.runtime.launch import launch

    with tempfile.TemporaryDirectory() as folder:
        results = str(Path(folder) / "rows.json")
        flag = "--max-reuse-distance"
        reuse = int(sys.argv[sys.argv.index(flag) + 1]) if flag in sys.argv else None
        foreach = "--foreach" in sys.argv
        launch(_worker, (results, reuse, foreach), processes=2)
        params, largest, persistent, config, rows, groups = json.loads(Path(results).read_text())
    from gkd.config import DeepSpeedSettings
    from gkd.planner.memory import (
        deepspeed_buffers,
        student_model_states,
        zero3_gather_buffer_bytes,
        zero3_gathered_bytes,
    )

    n = 2
    unit = params / n * 1.0  # P/N elements: "x P/N" below is bytes per partition element
    zero = config["zero_optimization"]
    ds = DeepSpeedSettings(
        reduce_bucket_size=zero["reduce_bucket_size"],
        stage3_prefetch_bucket_size=zero["stage3_prefetch_bucket_size"],
        stage3_max_live_parameters=zero["stage3_max_live_parameters"],
    )
    states = student_model_states(
        params=params, largest_module=largest, gpus=n, gpus_per_node=n, stage=3, offload="none"
    )
    gathered = zero3_gathered_bytes(params, largest, persistent, ds)
    buffers = deepspeed_buffers(
        stage=3, offload="none", ds=ds, gather_buffer=zero3_gather_buffer_bytes(params, persistent, ds)
    )
    planned_states = states.gpu_bytes - 4 * largest  # the 4L is the gathered set, counted apart
    planned = planned_states + buffers + gathered
    adam_path = "foreach" if config["optimizer"]["params"].get("foreach") else "default (CPU: single-tensor)"
    print(
        f"ZeRO-3 student without offload, bf16, torch AdamW, 2 CPU processes: Llama {LAYERS} layers, hidden "
        f"{HIDDEN}, vocabulary {VOCAB},\nP = {params:,} parameters, P/N = {params // n:,} elements per rank, "
        f"largest module {largest:,}, reduce bucket {zero['reduce_bucket_size']:,}, prefetch bucket / max "
        f"live {zero['stage3_prefetch_bucket_size']:,}, max reuse distance "
        f"{zero.get('stage3_max_reuse_distance', 'DeepSpeed default (1e9)')}, "
        f"sub_group_size DeepSpeed's default (1e9 > P/N), "
        f"torch Adam's {adam_path} path.\n"
        f"Live tensor storage on rank 0, step 2 (micro-batch 1 x 8 tokens). plan: model states "
        f"{planned_states / unit:.2f} P/N + buffers {buffers / unit:.2f} P/N + gathered "
        f"{gathered / unit:.2f} P/N = {planned:,} bytes ({planned / unit:.2f} P/N), resident all step."
    )
    print("| phase | measured bytes | x P/N | plan bytes | plan x P/N |")
    print("|---|---|---|---|---|")
    for phase, live in rows:
        print(f"| {phase} | {live:,} | {live / unit:.2f} | {planned:,} | {planned / unit:.2f} |")
    for phase, by_site in groups.items():
        print(f"\nAlive at {phase}, by creating site (x P/N, those of at least 0.05):")
        print("| site | bytes | x P/N |")
        print("|---|---|---|")
        for site, size in sorted(by_site.items(), key=lambda kv: -kv[1]):
            if size / unit >= 0.05:
                print(f"| {site} | {size:,} | {size / unit:.2f} |")


if __name__ == "__main__":
    main()
