"""The offline teacher pass (`"teacher_placement": "offline"`): the teachers' top-k log-probs for every
micro-batch of the run, written once before training and read back per micro-batch instead of running them.

Usage (one rank of `gkd.runtime.worker.train_worker`):
    served = stored_taps(resolved)                    # per teacher: tap names, temperature
    write_pass(teacher, served[0], stream, records=steps * accum, k=64, folder=OUT/topk, rank=r, index=0)
    reader = TopKReader(OUT/topk, rank=r, index=0)
    stored = [dict.fromkeys(served[0].names, reader.read(record))]  # distill_step(stored_teacher_taps=...)

What is stored, per token: the top-k of log_softmax(teacher logits / T)
(`gkd.methods.divergence.topk_targets`) as k int32 indices and k bfloat16 log-probs (6k bytes; the planner
sizes the disk the same way). T is the temperature of the loss terms that read the teacher; resolve() offers
the offline placement only when those terms compute exactly from a top-k with its tail bucket (forward KL,
soft cross-entropy) at one temperature.
The terms read the stored `TopK` where they would read the teacher's `logits` (or, on the fused-linear path,
its `final`); `stored_teacher` in `gkd.methods.divergence` is where a loss sees it.

Design choices:
- One pair of `.npy` files per teacher and rank, memory-mapped: a record is one micro-batch, read by index, so
  a resumed run reads exactly its remaining micro-batches and nothing is held in memory between steps.
- The pass iterates the rank's own data stream (`gkd.runtime.data.batches` with the run's arguments), which
  is deterministic: record i is the i-th micro-batch training will see.
- A `done-<rank>-<teacher>.json` marker is written last; a pass without it, or made for fewer records or
  another k or temperature, is redone. A finished run deletes the folder (it is only needed to resume).
- The teacher is placed before the student exists and freed before the student is built, so the pass and
  training never hold both, as the plan's schedule has it (the offline pass is replayed on its own).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gkd.errors import InputError
from gkd.methods.divergence import TopK, topk_targets
from gkd.runtime.capture import capture_taps

TOPK_DIR = "topk"
ENTRY_BYTES = 4 + 2  # one stored top-k entry: an int32 index and a bfloat16 log-prob


@dataclass(frozen=True)
class ServedTaps:
    """What one teacher's stored top-k stands in for: the tap names terms read, at one temperature."""

    names: tuple[str, ...]
    temperature: float


def stored_taps(resolved: Any) -> list[ServedTaps]:
    """Per teacher, the taps the stored top-k serves and the temperature it is stored at."""
    out = []
    for i, names in enumerate(resolved.teacher_taps):
        prefix = f"t{i}:"
        temps = {
            float(t.temperature if t.temperature is not None else 1.0)
            for t in resolved.loss_terms
            if any(x.startswith(prefix) for x in t.taps)
        }
        if len(temps) > 1:
            raise InputError(
                f"teacher {i} is read at the temperatures {sorted(temps)}, but an offline pass stores one "
                "top-k per teacher; use one temperature or a live teacher placement"
            )
        out.append(ServedTaps(names=tuple(sorted(names)), temperature=temps.pop() if temps else 1.0))
    return out


class OfflineTeacher(nn.Module):
    """Stands in for a teacher whose outputs come from the offline pass: it must never run."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this teacher ran in the offline pass; its outputs are read from storage")


def _paths(folder: Path, rank: int, index: int) -> tuple[Path, Path, Path]:
    stem = f"rank{rank}-teacher{index}"
    return (
        folder / f"{stem}-indices.npy",
        folder / f"{stem}-logprobs.npy",
        folder / f"done-{rank}-{index}.json",
    )


def pass_is_done(folder: Path, *, rank: int, index: int, records: int, k: int, temperature: float) -> bool:
    """Whether a finished pass for at least `records` micro-batches with this k and temperature is there."""
    marker = _paths(folder, rank, index)[2]
    if not marker.is_file():
        return False
    meta = json.loads(marker.read_text())
    return meta["records"] >= records and meta["k"] == k and meta["temperature"] == temperature


def write_pass(
    teacher: nn.Module,
    served: ServedTaps,
    stream: Iterator[Mapping[str, Tensor]],
    *,
    records: int,
    k: int,
    folder: Path,
    rank: int,
    index: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run `teacher` on the next `records` micro-batches of `stream` and store their top-k; returns bytes.
    `progress(done)` is called after each micro-batch."""
    from gkd.runtime.packing import packed_inputs

    folder.mkdir(parents=True, exist_ok=True)
    idx_path, lp_path, marker = _paths(folder, rank, index)
    marker.unlink(missing_ok=True)
    indices = logprobs = None
    for r in range(records):
        batch = next(stream)
        inputs: dict[str, Any] = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].long().to(device),
        }
        if "position_ids" in batch:  # packed documents kept apart (gkd.runtime.packing.packed_inputs)
            inputs = packed_inputs(teacher, {**inputs, "position_ids": batch["position_ids"].to(device)})
        if getattr(getattr(teacher, "config", None), "use_cache", False):
            inputs["use_cache"] = False
        with torch.no_grad(), capture_taps(teacher, {"logits"}) as taps:
            teacher(**inputs)
        logits = taps["logits"]
        if not 1 <= k <= logits.shape[-1]:
            raise InputError(
                f"training.offline_topk {k} must be between 1 and the vocabulary {logits.shape[-1]}"
            )
        target = topk_targets(logits, k, temperature=served.temperature)
        if indices is None:
            shape = (records, *target.indices.shape)
            indices = np.lib.format.open_memmap(idx_path, mode="w+", dtype=np.int32, shape=shape)
            logprobs = np.lib.format.open_memmap(lp_path, mode="w+", dtype=np.int16, shape=shape)
        indices[r] = target.indices.to(torch.int32).cpu().numpy()
        # bfloat16 has no numpy dtype: its bits are stored as int16 and viewed back on reading.
        logprobs[r] = target.logprobs.to(torch.bfloat16).view(torch.int16).cpu().numpy()
        del logits, taps, target
        if progress is not None:
            progress(r + 1)
    if indices is None or logprobs is None:
        raise InputError("the offline teacher pass has no micro-batches to run (steps must be at least 1)")
    indices.flush()
    logprobs.flush()
    size = indices.nbytes + logprobs.nbytes
    del indices, logprobs
    marker.write_text(json.dumps({"records": records, "k": k, "temperature": served.temperature}))
    return size


class TopKReader:
    """Reads one teacher's stored top-k of one rank, a micro-batch (record) at a time."""

    def __init__(self, folder: Path, *, rank: int, index: int, device: torch.device) -> None:
        idx_path, lp_path, _ = _paths(folder, rank, index)
        self.indices = np.load(idx_path, mmap_mode="r")
        self.logprobs = np.load(lp_path, mmap_mode="r")
        self.device = device

    def read(self, record: int) -> TopK:
        indices = torch.from_numpy(np.array(self.indices[record])).to(self.device, torch.int64)
        bits = torch.from_numpy(np.array(self.logprobs[record]))
        return TopK(indices=indices, logprobs=bits.view(torch.bfloat16).to(self.device))
