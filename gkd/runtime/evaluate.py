"""A model's own loss on held-out data: `gkd eval` (`run_eval`) and the inputs `gkd run`'s periodic
evaluation (gkd.runtime.worker.evaluate) feeds the student, so that both compute the same figure.

Design choices:
- The data is read exactly as `gkd run` reads it (gkd.runtime.data.batches: the same tokenizer, packing,
  completion-only labels and seeded BERT masking), one process, rank 0 of 1, and one pass over the rows: the
  rows // batch-size full micro-batches of the first epoch, so every row but the remainder counts once.
- The loss is the mean cross-entropy over every target token of the pass (token-weighted), the model's own
  causal-LM loss (labels shifted) or masked-LM loss (chosen positions only); the perplexity is its exp. When
  every micro-batch holds the same number of targets (plain text for a decoder) this is also the mean of the
  per-batch losses that `gkd run --eval-data` logs as `eval_loss`.
- Top-1 agreement with a teacher: over the same target positions, the fraction where the student's and the
  teacher's most likely next (or masked) token are the same. The teacher must share the student's vocabulary.
- A run folder's student (OUT/student) takes its defaults from the run: the sequence length, micro-batch,
  data settings and seed of OUT/plan.json and OUT/run.json, so that `gkd eval OUT/student --data D` reads D
  as the run's evaluation did.
- Models run in their own dtype (the config's torch_dtype: a run saves its student in its training dtype),
  in eval mode, without gradients, on the GPU when there is one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.config import DataConfig
from gkd.errors import InputError, shown

DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 8


def model_inputs(model: Any, batch: dict[str, Any], device: Any, *, labels: bool = True) -> dict[str, Any]:
    """The keyword arguments that give `model` a micro-batch as gkd trains it: packed documents kept apart by
    position ids or a block mask (gkd.runtime.packing.packed_inputs), no key/value cache."""
    from gkd.runtime.packing import packed_inputs

    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].long().to(device),
    }
    if labels:
        inputs["labels"] = batch["labels"].to(device)
    if "position_ids" in batch:
        inputs = packed_inputs(model, {**inputs, "position_ids": batch["position_ids"].to(device)})
    if getattr(model.config, "use_cache", False):
        inputs["use_cache"] = False
    return inputs


@dataclass(frozen=True)
class _Model:
    ref: str
    spec: Any
    weights: str | None  # the checkpoint folder, None for a seeded random initialisation


def _open_model(ref: str, role: str) -> _Model:
    """A model reference as `gkd run` takes it: a Hugging Face folder with weights, a hub id from the local
    cache, a preset or a config.json (these two: seeded random weights)."""
    from gkd.hub import is_hub_id, snapshot_folder
    from gkd.models import preset_names, resolve_model
    from gkd.runtime.engines import check_weights, has_weights

    spec = resolve_model(ref)
    path = Path(ref).expanduser()
    if ref not in preset_names() and not path.exists() and is_hub_id(ref):
        ref = str(snapshot_folder(ref, weights=True))
        path = Path(ref)
    if path.is_dir():
        if not has_weights(ref):
            raise InputError(
                f"{role} folder {shown(str(path))} holds no weights file (model.safetensors or "
                "pytorch_model.bin): point to a saved model, such as a run's OUT/student"
            )
        check_weights(ref, spec)
        return _Model(ref, spec, ref)
    return _Model(ref, spec, None)


def _run_defaults(student: str) -> dict[str, Any]:
    """seq_len, batch, seed and data options of the run whose OUT/student `student` is (empty otherwise)."""
    folder = Path(student).expanduser().resolve().parent
    plan_file, run_file = folder / "plan.json", folder / "run.json"
    if Path(student).expanduser().name != "student" or not plan_file.is_file():
        return {}
    try:
        plan = json.loads(plan_file.read_text())
        config = plan["inputs"]["config"]
        out: dict[str, Any] = {
            "seq_len": int(config["training"]["seq_len"]),
            "batch": int(plan["strategy"]["micro_batch"]),
            "data": dict(config.get("data") or {}),
        }
        if run_file.is_file():
            out["seed"] = int(json.loads(run_file.read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"cannot read the run settings in {folder} ({type(err).__name__}: {err}); give --seq-len and "
            "--batch-size, or evaluate a copy of the student outside its run folder"
        ) from None
    return out


def _build(model: _Model, device: Any, seed: int) -> Any:
    from gkd.models import torch_dtype
    from gkd.runtime.loading import build_whole

    attention = "eager" if model.spec.family == "bloom" else "sdpa"
    built = build_whole(
        model.spec,
        weights=model.weights,
        seed=seed,
        attention=attention,
        dtype=torch_dtype(model.spec),
        device=device,
    )
    return built.eval().requires_grad_(False)


def evaluate_models(
    student: str,
    data: str,
    *,
    teacher: str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    max_batches: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The figures `gkd eval` prints (see the module docstring), as a dict."""
    import torch

    from gkd.runtime.data import batches, load_tokenizer, prepare_tokens
    from gkd.runtime.reporting import perplexity

    stud = _open_model(student, "student")
    teach = _open_model(teacher, "teacher") if teacher is not None else None
    if teach is not None and teach.spec.vocab != stud.spec.vocab:
        raise InputError(
            f"teacher {teacher} has a vocabulary of {teach.spec.vocab} but student {student} has "
            f"{stud.spec.vocab}; top-1 agreement needs a teacher with the student's vocabulary"
        )
    defaults = _run_defaults(student)
    seq_len = seq_len or defaults.get("seq_len") or min(DEFAULT_SEQ_LEN, stud.spec.max_positions)
    if seq_len > stud.spec.max_positions:
        raise InputError(
            f"--seq-len {seq_len} is more than the {stud.spec.max_positions} positions student {student} "
            "takes; give a smaller one"
        )
    batch_size = batch_size or defaults.get("batch") or DEFAULT_BATCH
    seed = seed if seed is not None else defaults.get("seed", 0)
    options = DataConfig(**defaults.get("data", {}))
    tokenizer = load_tokenizer(stud.ref, stud.spec)
    objective = "mlm" if stud.spec.is_encoder else "causal"
    stored, _ = prepare_tokens(data, tokenizer, options=options)
    stream = batches(
        data,
        tokenizer,
        seq_len=seq_len,
        micro_batch=batch_size,
        objective=objective,
        seed=seed,
        options=options,
    )
    total = (stored.tokens // seq_len) // batch_size  # one pass: every full micro-batch of the first epoch
    if max_batches is not None:
        total = min(total, max_batches)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    models = {"student": _build(stud, device, seed)}
    if teach is not None:
        models["teacher"] = _build(teach, device, seed)
    sums = dict.fromkeys(models, 0.0)
    agree, targets = 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for index in range(total):
            batch = next(stream)
            labels = batch["labels"].to(device)
            # A causal model's output at position t predicts token t + 1.
            chosen = labels[:, 1:] != -100 if objective == "causal" else labels != -100
            count = int(chosen.sum())
            top1 = {}
            for name, model in models.items():
                out = model(**model_inputs(model, batch, device))
                logits = out.logits[:, :-1] if objective == "causal" else out.logits  # aligned with `chosen`
                # The model's own loss is the mean over this batch's targets: weigh it by their number.
                sums[name] += float(out.loss.float()) * count
                if teach is not None:
                    top1[name] = logits[chosen].argmax(-1)
            if teach is not None:
                agree += int((top1["student"] == top1["teacher"]).sum())
            targets += count
            if progress is not None:
                progress(index + 1, total)
    if targets == 0:
        raise InputError(
            f"data {data} holds no target token in {total} micro-batch(es) of {batch_size} x {seq_len}: "
            "give more data (or data with completions)"
        )
    figures: dict[str, Any] = {
        "student": student,
        "data": data,
        "objective": objective,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "batches": total,
        "tokens": targets,
        "seconds": round(time.perf_counter() - start, 3),
        "loss": sums["student"] / targets,
    }
    figures["perplexity"] = perplexity(figures["loss"])
    if teach is not None:
        figures["teacher"] = teacher
        figures["teacher_loss"] = sums["teacher"] / targets
        figures["teacher_perplexity"] = perplexity(figures["teacher_loss"])
        figures["top1_agreement"] = agree / targets
    return figures


def run_eval(
    student: str,
    data: str,
    *,
    teacher: str | None,
    seq_len: int | None,
    batch_size: int | None,
    seed: int | None,
    max_batches: int | None,
    as_json: bool,
) -> None:
    """`gkd eval`: print the figures as a table (or JSON), a progress line on stderr while it runs."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if sys.stderr.isatty() and (now - last[0] > 0.5 or done == total):
            last[0] = now
            end = "\n" if done == total else ""
            print(f"\revaluating: micro-batch {done}/{total}", end=end, file=sys.stderr, flush=True)

    figures = evaluate_models(
        student,
        data,
        teacher=teacher,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        max_batches=max_batches,
        progress=progress,
    )
    if as_json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"{figures['objective']} loss on {figures['data']}: {figures['batches']} micro-batch(es) of "
        f"{figures['batch_size']} x {figures['seq_len']}, {figures['tokens']} target tokens, seed "
        f"{figures['seed']}"
    )
    rows = [("student", figures["student"], figures["loss"], figures["perplexity"])]
    if "teacher" in figures:
        rows.append(("teacher", figures["teacher"], figures["teacher_loss"], figures["teacher_perplexity"]))
    width = max(len(r[1]) for r in rows)
    print(f"{'model':<8} {'path':<{width}} {'loss':>10} {'perplexity':>12}")
    for role, name, loss, ppl in rows:
        shown_ppl = f"{ppl:12.4f}" if math.isfinite(ppl) else f"{'inf':>12}"
        print(f"{role:<8} {name:<{width}} {loss:10.6f} {shown_ppl}")
    if "top1_agreement" in figures:
        print(f"top-1 agreement (student vs teacher): {figures['top1_agreement']:.4f}")
