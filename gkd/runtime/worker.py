"""One rank of `gkd run` (`train_worker`): builds and places the models, runs the teacher's generation pass
(generation.mode sequence_kd) and the offline teacher pass when the plan has them, then the training loop
(see gkd.runtime.executor), evaluation, checkpoints and the final save."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from gkd.planner.plan import Plan, human_bytes
from gkd.runtime.checkpoints import (
    CHECKPOINTS,
    maybe_die,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from gkd.runtime.memory import MemoryRecord, StepMemory, host_memory, predicted_device_bytes
from gkd.runtime.reporting import Reporters, check_reporters, perplexity
from gkd.runtime.save import save_student
from gkd.runtime.settings import RunSettings, write_run_json

# GKD_RECORD_ROWS=1: each log row also holds "rows", the numbers of the rows (in the stored ids) that the step
# trained on, over all ranks; for the tests that check what a resumed run trains on.
RECORD_ROWS_ENV = "GKD_RECORD_ROWS"


def gather_ints(values: list[int], device: Any) -> list[list[int]]:
    """Each rank's `values` (as many on every rank) on every rank: [rank 0's, rank 1's, ...]."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [[int(v) for v in part.cpu().tolist()] for part in parts]


def term_names(resolved: Any) -> list[str]:
    """The names of the loss terms a resolved method set reports, in order."""
    return [f"{t.method}.{t.name}" for t in resolved.loss_terms]


class _Phases:
    """One line per phase of a worker's start (rank 0 only), each saying how long the previous one took: a
    large teacher can take minutes to load, and the run must not look stuck meanwhile."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.since = time.perf_counter()

    def start(self, what: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            print(f"[{now - self.since:5.1f} s] {what}", flush=True)


class _Progress:
    """A rich progress bar on a terminal, else one line every `every` steps (rank 0 only)."""

    def __init__(self, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.bar = total, every, None
        self.enabled = enabled
        self.last_eval = ""  # the latest evaluation, kept on the bar
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("run", total=total, info="")

    def skip(self, steps: int) -> None:
        """Count steps done before a resume."""
        if self.bar is not None and steps:
            self.bar.update(self.task, advance=steps)

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
        if "eval_loss" in row:
            self.last_eval = f"  eval {row['eval_loss']:.4f}"
            info += self.last_eval
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info + ("" if "eval_loss" in row else self.last_eval))
        elif row["step"] % self.every == 0 or row["step"] == self.total or "eval_loss" in row:
            print(
                f"step {row['step']}/{self.total}  {info}  peak {human_bytes(row['peak_memory_bytes'])}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_worker(rank: int, world: int, plan_json: str, settings: RunSettings) -> None:
    """One rank of the run (see the module docstring)."""
    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from gkd.runtime.data import batches, data_options, load_tokenizer
    from gkd.runtime.engines import build_models, make_engines
    from gkd.runtime.generation import policy_for
    from gkd.runtime.offline import TOPK_DIR, OfflineTeacher, stored_taps

    hf_logging.disable_progress_bar()  # the save's shard bar; the run prints its own progress
    plan = Plan.from_json(plan_json)
    config = plan.inputs["config"]
    report_to = list(config["training"].get("report_to") or [])
    check_reporters(report_to)  # before any model is loaded
    # The launcher set this process's device (its local rank: `rank` is global on several nodes).
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    host_start = host_memory()  # the process before any model: the footprint the plan's host bytes add to
    meter = StepMemory(device, every=settings.log_every)  # measured memory against the plan, per step
    phase = _Phases(enabled=rank == 0)
    phase.start(f"loading the models ({', '.join(config['teachers'])} -> {config['student']})")
    models = build_models(plan, seed=settings.seed, total_steps=settings.steps)
    tokenizer = load_tokenizer(config["teachers"][0], models.teacher_specs[0])
    record_rows = os.environ.get(RECORD_ROWS_ENV, "") == "1"
    # generation.mode sequence_kd: the teacher's completions of the data's prompts (a TokenFile), which the
    # training stream and the offline pass read instead of the data (gkd.runtime.sequence_kd).
    generated: list[Any] = []
    sequence_pass = _sequence_pass(config, settings, tokenizer, plan, device)

    def data_stream(
        source: str | None = settings.data, start: int = 0, rows: bool = False, train: bool = True
    ) -> Any:
        return batches(
            source,
            tokenizer,
            seq_len=int(config["training"]["seq_len"]),
            micro_batch=plan.strategy.micro_batch,
            objective="mlm" if models.student_spec.is_encoder else "causal",
            rank=rank,
            world=world,
            seed=settings.seed,
            options=data_options(config),
            start=start,
            row_ids=rows,
            stored=generated[0] if train and generated else None,
        )

    out = Path(settings.out)
    accum = plan.strategy.grad_accum
    readers: list[Any] = []
    if plan.strategy.teacher_placement == "offline" and settings.start_step < settings.steps:
        # Before the student engine exists: the pass and training never hold both (as the plan has it).
        phase.start("the offline teacher pass")
        readers = _offline_pass(
            models,
            plan,
            settings,
            data_stream,
            rank=rank,
            world=world,
            device=device,
            sequence_pass=sequence_pass,
            generated=generated,
        )
    elif plan.strategy.teacher_placement == "offline":
        # A resume that only saves the student (every step done): no step reads the teacher.
        models.teachers = [OfflineTeacher() for _ in models.teachers]
    phase.start("setting up the DeepSpeed engines")
    if settings.resume_universal:  # a checkpoint of another world size, converted (gkd.runtime.checkpoints)
        plan.deepspeed["student"] = {**plan.deepspeed["student"], "checkpoint": {"load_universal": True}}
    engines = make_engines(models, plan, device=device)
    engine, module = engines.student, engines.module
    if sequence_pass is not None and not generated and settings.start_step < settings.steps:
        # A live teacher generates as the plan placed it for training (gkd.runtime.sequence_kd).
        generated.append(_generate(sequence_pass, engines.teachers[0], settings, rank, world, device))
    module.tap_loss = plan.strategy.tap_loss  # layerwise: tap terms run (and free teacher taps) mid-forward
    served = stored_taps(models.resolver.at(0)) if readers else []
    # generation.mode on_policy: the student samples some micro-batches' completions (gkd.runtime.generation).
    policy = policy_for(
        config,
        placement=plan.strategy.teacher_placement,
        encoder=models.student_spec.is_encoder,
        seed=settings.seed,
        rank=rank,
        tokenizer=tokenizer,
    )
    # Every step reads global_batch rows of the one stream of rows (gkd.runtime.data), whatever the world
    # size: a resumed run starts after those of the steps done.
    stream = data_stream(
        start=settings.start_step * int(config["training"]["global_batch"]), rows=record_rows
    )
    if settings.resume_tag:
        restore_checkpoint(
            engine, out / CHECKPOINTS, settings.resume_tag, rank=rank, universal=settings.resume_universal
        )
    apply_schedule(engine)
    _schedule_note(plan, settings.steps, rank)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    reporters = Reporters(report_to, out, config) if rank == 0 and report_to else None
    meter.start(engine, engines.teachers, engines.teacher_engines)  # gkd.runtime.memory: per step and rank
    host_load = host_memory()  # the models built, placed (and restored)
    pss = gather_ints([host_start.pss if host_start else 0, host_load.pss if host_load else 0], device)
    memory_record = MemoryRecord(
        plan,
        start_pss=[r[0] for r in pss],
        load_pss=[r[1] for r in pss],
        cpu=device.type == "cpu",
        source=meter.source,
    )
    phase.start("training")
    progress = _Progress(settings.steps, settings.log_every, enabled=rank == 0)
    progress.skip(settings.start_step)
    engine.train()
    try:
        for step in range(settings.start_step, settings.steps):
            resolved = models.resolver.at(step)
            names = term_names(resolved)
            start = time.perf_counter()
            # Sums over this rank's micro-batches: total loss, each term, tokens.
            sums = torch.zeros(2 + len(names), dtype=torch.float64)
            rows: list[int] = []  # this step's row numbers (RECORD_ROWS_ENV)
            meter.begin(step, last=step + 1 == settings.steps)
            lr = float(engine.get_lr()[0])  # the rate this step's optimizer update uses
            for micro in range(accum):
                batch = next(stream)
                if record_rows:
                    rows.extend(batch.pop("row_ids").tolist())
                batch = {k: v.to(device) for k, v in batch.items()}
                if policy is not None:
                    batch = policy.batch(module.student, batch, step=step, micro=micro)
                module.resolved, module.step, module.total_steps = resolved, step, settings.steps
                if readers:  # this micro-batch's record of the offline teacher pass
                    record = step * accum + micro
                    module.stored = [
                        dict.fromkeys(s.names, r.read(record)) for s, r in zip(served, readers, strict=True)
                    ]
                total, terms = engine(batch)
                engine.backward(total)
                engine.step()
                sums[0] += float(total.detach().float())
                for j, name in enumerate(names):
                    if name in terms:
                        sums[1 + j] += float(terms[name].detach().float())
                sums[-1] += float(batch["attention_mask"].sum())
            meter.end()
            sums = sums.to(device)  # nccl reduces device tensors only
            dist.all_reduce(sums)
            sums = sums.cpu()
            seconds = time.perf_counter() - start
            host = host_memory()
            figures = meter.row()
            per_rank = gather_ints(
                [*figures.values(), host.pss if host else 0, host.uss if host else 0, meter.live()], device
            )
            memory = {"predicted_device_bytes": predicted_device_bytes(plan)}
            for i, key in enumerate([*figures, "host_pss_bytes", "host_uss_bytes"]):
                memory[key] = [r[i] for r in per_rank]
            memory_record.add(
                memory["device_peak_bytes"], memory["host_pss_bytes"], [r[-1] for r in per_rank]
            )
            n = world * accum
            row = {
                "step": step + 1,
                "loss": sums[0].item() / n,
                "terms": {name: sums[1 + j].item() / n for j, name in enumerate(names)},
                "tokens": int(sums[-1].item()),
                "lr": lr,
                "grad_norm": _grad_norm(engine),
                "seconds": round(seconds, 4),
                "tokens_per_s": round(sums[-1].item() / seconds, 1),
                "peak_memory_bytes": max(memory["device_peak_bytes"]),
                "memory_source": meter.source,
                "memory": memory,
            }
            if record_rows:
                row["rows"] = sorted(r for part in gather_ints(rows, device) for r in part)
            if not math.isfinite(row["loss"]):
                raise RuntimeError(f"the loss is {row['loss']} at step {step + 1}")
            last = step + 1 == settings.steps
            due = settings.eval_every and (step + 1) % settings.eval_every == 0
            if settings.eval_data is not None and (last or due):
                held_out = data_stream(settings.eval_data, train=False)  # the same rows each time
                row["eval_loss"] = evaluate(engine, module.student, held_out, settings.eval_batches, device)
                row["eval_perplexity"] = perplexity(row["eval_loss"])
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if reporters is not None:
                reporters.log(row)
            progress.update(row)
            if settings.save_every and (step + 1) % settings.save_every == 0:
                # Complete or absent, whatever moment a rank dies at (gkd.runtime.checkpoints); every rank
                # has passed its last barrier when it returns.
                save_checkpoint(
                    engine,
                    out / CHECKPOINTS,
                    step + 1,
                    rank=rank,
                    world=world,
                    micro_batches=(step + 1) * accum,
                )
                if settings.keep_last and rank == 0:
                    prune_checkpoints(out / CHECKPOINTS, settings.keep_last)
                if rank == 0 and step + 1 < settings.steps:  # completed_steps = steps: the student is saved
                    write_run_json(
                        out, settings, plan, world, completed=step + 1, memory=memory_record.summary()
                    )
    finally:
        progress.close()
        if log is not None:
            log.close()
        if reporters is not None:
            reporters.close()
    # The end of a run, in an order that no kill can turn into a done run without its student: the student
    # (and its tokenizer), then run.json's completed_steps, which is what makes the run done (a resume of a
    # run that is not done loads its last checkpoint and saves again), then what only a resume needed.
    maybe_die("student", settings.steps, rank)
    save_student(
        engines,
        out / "student",
        rank=rank,
        zero_stage=plan.strategy.student_zero_stage,
        tokenizer_from=config["teachers"][0],  # copied in before the folder appears
    )
    maybe_die("student-written", settings.steps, rank)
    readers.clear()  # closes the memory maps before the folder goes
    dist.barrier()  # every rank's part of the save is done
    if rank == 0:
        # (A resume that only saves the student ran no step to measure.)
        summary = memory_record.summary() if memory_record.steps else None
        write_run_json(out, settings, plan, world, completed=settings.steps, memory=summary)
    if rank == 0 and plan.strategy.teacher_placement == "offline":
        # The stored top-k is only needed to resume, and this run is done.
        shutil.rmtree(out / TOPK_DIR, ignore_errors=True)


def apply_schedule(engine: Any) -> None:
    """Set the optimizer's rate to the scheduler's for the step about to run. DeepSpeed advances its
    scheduler after each optimizer step, so left alone the first step would run at the scheduler's
    not-started value (0 for WarmupCosineLR, min_lr for the others) and step s at iteration s-2; applying
    iteration 0 before the first step gives step s iteration s-1 (docs/config.md). A restored checkpoint
    holds the scheduler's iteration, which is applied again, so a resumed run's rates are the uninterrupted
    run's."""
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.step(max(0, scheduler.last_batch_iteration))


def _grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the last optimizer step, before clipping (None where DeepSpeed does not
    compute it)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _schedule_note(plan: Plan, steps: int, rank: int) -> None:
    """Say once when the run's length is not the one its schedule spans (`gkd run --steps`)."""
    training = plan.inputs["config"]["training"]
    planned = int(training.get("steps", steps))
    if rank == 0 and training.get("lr_schedule", "constant") != "constant" and planned != steps:
        print(
            f"Note: the {training['lr_schedule']} learning-rate schedule spans training.steps ({planned}), "
            f"not this run's {steps} steps; set training.steps to change it",
            flush=True,
        )


def evaluate(engine: Any, student: Any, stream: Any, n: int, device: Any) -> float:
    """The student's own loss (its LM or MLM cross-entropy on the batch's labels) on the next `n`
    micro-batches of `stream`, averaged over them and all ranks; in eval mode and without gradients."""
    import torch
    import torch.distributed as dist

    from gkd.runtime.evaluate import model_inputs  # as `gkd eval` feeds a saved student

    engine.eval()
    total = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            total += float(student(**model_inputs(student, next(stream), device)).loss.float())
    engine.train()
    total = total.to(device)
    dist.all_reduce(total)
    return total.item() / (n * dist.get_world_size())


def _sequence_pass(
    config: dict[str, Any], settings: RunSettings, tokenizer: Any, plan: Plan, device: Any
) -> Any:
    """The teacher's generation pass of a sequence_kd run (gkd.runtime.sequence_kd), else None."""
    if (config.get("generation") or {}).get("mode") != "sequence_kd":
        return None
    from gkd.runtime.sequence_kd import SequencePass

    return SequencePass.open(
        config,
        settings.data,
        tokenizer,
        seed=settings.seed,
        micro_batch=plan.strategy.micro_batch,
        device_type=device.type,
    )


def _generate(
    sequence_pass: Any, teacher: Any, settings: RunSettings, rank: int, world: int, device: Any
) -> Any:
    """Run (or find stored) the teacher's generation pass with the placed `teacher`; its TokenFile."""
    start = time.perf_counter()
    if rank == 0 and sequence_pass.stored() is None:
        print(
            f"Teacher generation pass (sequence_kd): {len(sequence_pass.prompts)} prompts in "
            f"{sequence_pass.chunks} chunks",
            flush=True,
        )
    entry = sequence_pass.run(teacher, rank=rank, world=world, device=device)
    if rank == 0:
        seconds = time.perf_counter() - start
        print(
            f"Teacher generations: {entry.documents} sequences, {entry.tokens} tokens ({seconds:.1f} s)",
            flush=True,
        )
    return entry


def _offline_pass(
    models: Any,
    plan: Plan,
    settings: RunSettings,
    data_stream: Any,
    *,
    rank: int,
    world: int,
    device: Any,
    sequence_pass: Any = None,
    generated: list[Any] | None = None,
) -> list[Any]:
    """Run the offline teacher pass of this rank (or find it done, for a resumed run), free the teachers and
    return one top-k reader per teacher (see `gkd.runtime.offline`). A sequence_kd run's teacher generation
    pass runs first, with the pass's placement of teacher 0, and its TokenFile goes to `generated`."""
    import gc

    import torch
    import torch.distributed as dist

    from gkd.runtime.engines import place_teacher
    from gkd.runtime.offline import (
        TOPK_DIR,
        OfflineTeacher,
        TopKReader,
        pass_is_done,
        stored_taps,
        write_pass,
    )

    folder = Path(settings.out) / TOPK_DIR
    served = stored_taps(models.resolver.at(0))
    k = int(plan.inputs["config"]["training"].get("offline_topk", 64))
    records = settings.steps * plan.strategy.grad_accum
    done = all(
        pass_is_done(folder, rank=rank, index=i, records=records, k=k, temperature=s.temperature)
        for i, s in enumerate(served)
    ) and (sequence_pass is None or sequence_pass.stored() is not None)
    # Every rank redoes the pass unless all are done: a ZeRO-3 teacher's forward is a collective.
    flag = torch.tensor([1 if done else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag.item()) and sequence_pass is not None and generated is not None:
        generated.append(sequence_pass.stored())  # a done pass: its generations are stored
    if not int(flag.item()):
        start = time.perf_counter()
        if rank == 0:
            print(f"Offline teacher pass: top-{k} log-probs of {records} micro-batches per rank", flush=True)
        placement = plan.strategy.offline_teacher_placement or "replicated"
        size = 0
        every = max(1, records // 10)

        def progress(done: int, teacher: int) -> None:
            # A teacher pass over the whole run can take long: rank 0 reports every tenth of it.
            if rank == 0 and (done % every == 0 or done == records):
                seconds = time.perf_counter() - start
                print(f"  teacher {teacher}: {done}/{records} micro-batches, {seconds:.0f} s", flush=True)

        for i, (teacher, s) in enumerate(zip(models.teachers, served, strict=True)):
            module, t_engine = place_teacher(teacher, plan.deepspeed["teachers"][i], placement, device=device)
            if i == 0 and sequence_pass is not None and generated is not None:
                # The prompts' completions, before the top-k pass reads them.
                generated.append(_generate(sequence_pass, module, settings, rank, world, device))
            size += write_pass(
                module,
                s,
                data_stream(),
                records=records,
                k=k,
                folder=folder,
                rank=rank,
                index=i,
                device=device,
                progress=lambda done, i=i: progress(done, i),
            )
            if t_engine is not None:
                t_engine.destroy()
            del module, t_engine
        dist.barrier()
        if rank == 0:
            seconds = time.perf_counter() - start
            print(f"Offline teacher pass done: {human_bytes(size)} per rank in {seconds:.1f} s", flush=True)
    models.teachers = [OfflineTeacher() for _ in models.teachers]
    gc.collect()
    return [TopKReader(folder, rank=rank, index=i, device=device) for i in range(len(served))]
