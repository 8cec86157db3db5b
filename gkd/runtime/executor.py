"""`gkd run`: execute a plan, from a config or a plan file, on DeepSpeed, and write the run's outputs.

The parent process (`run_job`) validates everything first: the plan (planned here for the number of processes
when given a config), what this runtime supports, the data source and tokenizer, the output folder. Only then
does it start the workers (`gkd.runtime.launch`), which write into a temporary sibling folder that is renamed
to OUT when every worker has finished; bad input or a run that fails or is stopped (Ctrl-C, SIGTERM) before
its first checkpoint leaves no OUT behind, and a finished run whose OUT cannot take it (written to meanwhile)
is kept in the temporary folder, which the error names.

Each worker (`train_worker`) runs the training loop:

    for each optimizer step s:
        for each of the plan's grad_accum micro-batches:
            resolved = methods resolved at step s (re-resolved only where stages or layer rules change)
            loss, terms = engine(batch)        # DistillModule.forward: gkd.runtime.step.distill_step
            engine.backward(loss)              # DeepSpeed scales by 1 / grad_accum
            engine.step()                      # the optimizer steps at the accumulation boundary

and rank 0 logs one row per optimizer step to OUT/log.jsonl: the loss and each term (averaged over the step's
micro-batches and all ranks), tokens, tokens/s and peak memory (CUDA: max_memory_allocated; CPU: the
process's peak resident set size), the largest over the ranks. At the end the student is saved in Hugging
Face format in OUT/student (ZeRO-3 partitions gathered first), next to OUT/plan.json and OUT/run.json.

What the plan decides is what runs: the teacher placement (replicated, ZeRO-3, ZeRO-3 offloaded, tensor
parallel, or an offline top-k pass run before the student engine exists), the student's ZeRO stage and
offload, the recompute layers, where tap losses run (layerwise or at the end), the logit-loss path, the
micro-batch and the accumulation. Not done (docs/run.md): the schedule's order of operations is not replayed
op by op; inside a step the order is `distill_step`'s.

Checkpoints: with `--save-every N`, every N steps each rank writes its part of a DeepSpeed checkpoint
(OUT/checkpoints/step-N, with the `latest` pointer) and its random-number state. `--resume --out OUT`
continues from the latest one with the run's own plan, data and seed: the data stream is deterministic, so it
skips the micro-batches already done, and log rows after the checkpoint are written again. When a worker
fails after a checkpoint was written, OUT is published anyway so that it can be resumed; bad input never
leaves an OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from gkd.errors import GkdError, InputError
from gkd.planner.plan import Plan
from gkd.runtime.checkpoints import CHECKPOINTS
from gkd.runtime.checks import (
    check_data,
    check_offline_disk,
    check_out,
    check_weight_files,
    eval_batches_in_one_pass,
    load_or_plan,
    tokenizer_note,
)
from gkd.runtime.launch import WorkerFailedError, default_processes, launch
from gkd.runtime.settings import RunSettings, write_run_json
from gkd.runtime.signals import TERMINATED_EXIT, Terminated, interruption, sigterm_raises, stops_on_sigterm
from gkd.runtime.worker import train_worker


def _starting(world: int) -> str:
    import torch

    where = "one per CUDA device" if torch.cuda.is_available() else "on the CPU with gloo"
    return f"Starting {world} worker processes ({where})"


def cpu_ops(plan: Plan) -> tuple[str, ...]:
    """The DeepSpeed CPU ops a run's workers load: the shared-memory collectives, and the optimizer's kernel
    (CPU Adam where the optimizer is offloaded, else fused Adam); loaded once before the workers fork."""
    adam = plan.inputs.get("config", {}).get("training", {}).get("optimizer", "adamw") in ("adam", "adamw")
    optimizer = "CPUAdamBuilder" if plan.strategy.student_offload != "none" else "FusedAdamBuilder"
    return ("ShareMemCommBuilder", *((optimizer,) if adam else ()))


class OutputKeptError(GkdError):
    """A run's output could not be moved to OUT: it is kept in the temporary folder (exit code 1)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # why OUT could not take it


@stops_on_sigterm
def run_job(
    target: str | None,
    *,
    data: str | None = None,
    steps: int | None = None,
    out: str | None = None,
    processes: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    save_every: int = 0,
    keep_last: int = 0,
    eval_data: str | None = None,
    eval_every: int = 0,
    eval_batches: int = 8,
    echo: Any = click.echo,
) -> Path:
    """The body of `gkd run` (see the module docstring); returns OUT."""
    import torch

    from gkd.runtime.engines import available_host_memory, check_host_memory, check_supported, has_weights

    world = processes if processes is not None else default_processes()
    if world < 1:
        raise InputError(f"--processes must be at least 1, got {world}")
    if save_every < 0:
        raise InputError(f"--save-every must be 0 (no checkpoints) or more, got {save_every}")
    if keep_last < 0:
        raise InputError(f"--keep-last must be 0 (keep every checkpoint) or more, got {keep_last}")
    if keep_last and not save_every and not resume:
        raise InputError("--keep-last limits the checkpoints of --save-every N; give --save-every too")
    if eval_every < 0 or eval_batches < 1:
        raise InputError("--eval-every must be 0 or more and --eval-batches at least 1")
    if eval_every and eval_data is None:
        raise InputError("--eval-every needs held-out text to evaluate on: give --eval-data PATH")
    if eval_data is not None and not Path(eval_data).exists():
        raise InputError(
            f"eval data {eval_data} does not exist; give a .txt or .jsonl file or a dataset folder"
        )
    if resume and (eval_data is not None or eval_every):
        raise InputError("a resumed run keeps its own evaluation settings; drop --eval-data / --eval-every")
    # Stored absolute in run.json, so that a resume from another folder reads the same files.
    data = str(Path(data).resolve()) if data is not None and not resume else data
    eval_data = str(Path(eval_data).resolve()) if eval_data is not None else None
    if resume:
        return _resume_job(
            target,
            data=data,
            steps=steps,
            out=out,
            processes=processes,
            seed=seed,
            save_every=save_every,
            keep_last=keep_last,
            echo=echo,
        )
    seed = 0 if seed is None else seed
    if out is not None and not out.strip():
        raise InputError("--out is empty; name the output folder, or leave --out out for runs/run-<time>")
    out_path = Path(out) if out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    check_out(out_path)
    if data is not None and not Path(data).exists():
        raise InputError(f"data source {data} does not exist; give a .txt or .jsonl file or a dataset folder")
    plan = load_or_plan(target, processes=world, echo=echo)
    check_supported(plan, cuda=torch.cuda.is_available())
    # On GPUs too: the plan's host memory (load, steady state and save) against what this machine has.
    check_host_memory(plan, world=world, available=available_host_memory(), cuda=torch.cuda.is_available())
    total = steps if steps is not None else int(plan.inputs["config"]["training"]["steps"])
    if total < 1:
        raise InputError(f"--steps must be at least 1, got {total}")
    check_weight_files(plan)
    data_tokens = check_data(plan, data, world, seed, echo).path.name
    notes = []
    if eval_data is not None and data is not None and Path(eval_data).resolve() == Path(data).resolve():
        notes.append(f"--eval-data is the training data ({data}): eval_loss then measures training text")
    if eval_data is not None:
        one_pass = eval_batches_in_one_pass(plan, check_data(plan, eval_data, world, seed, echo), world)
        if eval_batches > one_pass:
            # More would evaluate the same rows again: no new information, only time.
            notes.append(
                f"--eval-batches {eval_batches} is more than the {one_pass} micro-batches per process that "
                f"{eval_data} holds; each evaluation reads those {one_pass}"
            )
            eval_batches = one_pass
    check_offline_disk(plan, out_path, steps=total, world=world)

    for ref in plan.inputs["config"]["teachers"]:
        if not has_weights(ref):
            notes.append(
                f"teacher {ref} has no weights (a preset or config.json): it is randomly initialised"
            )
    teacher_tokens = tokenizer_note(plan.inputs["config"]["teachers"][0])
    if teacher_tokens:
        notes.append(teacher_tokens)
    echo(f"Running: {plan.strategy.describe()}")
    for note in notes:
        echo(f"Note: {note}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    settings = RunSettings(
        data=data,
        steps=total,
        seed=seed,
        out=str(tmp),
        log_every=max(1, total // 10),
        notes=tuple(notes),
        save_every=save_every,
        keep_last=keep_last,
        eval_data=eval_data,
        eval_every=eval_every,
        eval_batches=eval_batches,
        data_tokens=data_tokens,
    )
    echo(_starting(world))
    try:
        with sigterm_raises():
            _run_and_publish(tmp, out_path, plan, settings, world)
    except Terminated:
        sys.exit(TERMINATED_EXIT)
    echo(
        f"Done: {total} steps; the student is in {out_path / 'student'}, the log in {out_path / 'log.jsonl'}"
    )
    return out_path


def _run_and_publish(tmp: Path, out_path: Path, plan: Plan, settings: RunSettings, world: int) -> None:
    """Run the workers in the temporary folder `tmp` and rename it to OUT. A run that fails or is interrupted
    (Ctrl-C, SIGTERM) before its first checkpoint leaves nothing; after one, OUT is published so that the run
    can be resumed. When OUT cannot take the folder (something appeared in it meanwhile), `tmp` is kept and
    OutputKeptError names it: a finished run's result is never removed."""
    kept = False
    try:
        tmp.mkdir()
        (tmp / "plan.json").write_text(plan.to_json())
        write_run_json(tmp, settings, plan, world, completed=0)
        launch(train_worker, (plan.to_json(), settings), processes=world, cpu_ops=cpu_ops(plan))
        try:
            _publish(tmp, out_path)
        except OutputKeptError:
            kept = True
            raise
    except (WorkerFailedError, KeyboardInterrupt, Terminated) as err:
        if not (tmp / CHECKPOINTS / "latest").is_file():
            if isinstance(err, Terminated):  # Ctrl-C prints its own line ("gkd: aborted")
                click.echo(f"gkd: {interruption(err)}; the unfinished run was removed", err=True)
            raise
        # The checkpoints are worth keeping: publish what there is, so that the run can be resumed.
        what = str(err) if isinstance(err, WorkerFailedError) else interruption(err)
        try:
            _publish(tmp, out_path)
        except OutputKeptError as failed:
            kept = True
            raise OutputKeptError(
                f"{what}; {failed.reason}, so its checkpoints are kept in {tmp}: resume with "
                f"`gkd run --resume --out {tmp}`"
            ) from None
        resume = f"resume from its last checkpoint with `gkd run --resume --out {out_path}`"
        if isinstance(err, WorkerFailedError):
            raise WorkerFailedError(f"{err}; {resume}") from None
        click.echo(f"gkd: {what}; {resume}", err=True)
        raise
    finally:
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out_path: Path) -> None:
    """Rename the run's folder to OUT, which was checked empty (or absent) before the run: rename(2) replaces
    an empty folder in one step. Raises OutputKeptError, `tmp` untouched, when OUT cannot take it: something
    was written into OUT during the run, or OUT cannot be replaced."""
    try:
        tmp.rename(out_path)
    except OSError as err:
        if out_path.is_dir() and any(out_path.iterdir()):
            reason = f"{out_path} was written to during the run and is not empty"
        else:
            reason = f"{out_path} cannot be replaced ({err.strerror or err})"
        raise OutputKeptError(
            f"the run finished, but {reason}; its output is kept in {tmp}: move it where you want it "
            f"(e.g. `mv {tmp} {out_path}` once {out_path} is out of the way)",
            reason=reason,
        ) from None


def _resume_job(
    target: str | None,
    *,
    data: str | None,
    steps: int | None,
    out: str | None,
    processes: int | None,
    seed: int | None,
    save_every: int,
    keep_last: int,
    echo: Any,
) -> Path:
    """Continue the run in OUT from its latest checkpoint, with its own plan, data and seed."""
    if out is None:
        raise InputError("--resume continues the run in --out; name that folder with --out")
    if target is not None:
        raise InputError(f"--resume continues the plan saved in {out}; drop {target} from the command")
    out_path = Path(out)
    latest = out_path / CHECKPOINTS / "latest"
    if not (out_path / "run.json").is_file() or not latest.is_file():
        raise InputError(f"{out} holds no checkpoint to resume from; runs write them with --save-every N")
    try:
        previous = json.loads((out_path / "run.json").read_text())
        previous["data"], previous["seed"], previous["steps"]  # noqa: B018 (the keys a resume needs)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise InputError(
            f"{out_path / 'run.json'} is damaged (it records how the run started); a resume needs it whole"
        ) from None
    if data is not None and data != previous["data"]:
        raise InputError(
            f"a resumed run reads its own data ({previous['data'] or 'the built-in corpus'}); drop --data"
        )
    if seed is not None and seed != previous["seed"]:
        raise InputError(f"a resumed run keeps its seed ({previous['seed']}); drop --seed")
    # DeepSpeed's ZeRO checkpoints are partitioned by rank: a resumed run keeps its number of processes.
    made_with = int(previous["processes"])
    if processes is None:
        processes = made_with
    elif processes != made_with:
        raise InputError(
            f"the run in {out} was made with {made_with} processes and a resumed run cannot change that (its "
            f"checkpoints are partitioned by rank); run with --processes {made_with} or drop --processes"
        )
    plan = load_or_plan(str(out_path / "plan.json"), processes=processes, echo=echo)
    check_weight_files(plan)
    tag = latest.read_text().strip()
    start = int(tag.removeprefix("step-"))
    total = steps if steps is not None else int(previous["steps"])
    if total <= start:
        raise InputError(f"the run in {out} is at step {start} already; give --steps larger than {start}")
    # The sources may have moved or changed since; and their stored ids may have been removed.
    stored = check_data(plan, previous["data"], processes, int(previous["seed"]), echo)
    if previous.get("data_tokens") and previous["data_tokens"] != stored.path.name:
        # The resume replays the data stream to skip what was trained on: other data would make that wrong.
        raise InputError(
            f"the data {previous['data'] or 'the built-in corpus'} changed since the run started (its size, "
            "modification time or tokenizer); restore it, or start a new run from the student saved so far"
        )
    if previous.get("eval_data") is not None:
        check_data(plan, previous["eval_data"], processes, int(previous["seed"]), echo)
    # Rows logged after the checkpoint are done again.
    log = out_path / "log.jsonl"
    rows = log.read_text().splitlines() if log.is_file() else []
    log.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= start))
    settings = RunSettings(
        data=previous["data"],
        steps=total,
        seed=previous["seed"],
        out=str(out_path),
        log_every=max(1, total // 10),
        notes=tuple(previous.get("notes", ())),
        save_every=save_every or int(previous["save_every"]),
        keep_last=keep_last or int(previous.get("keep_last", 0)),
        start_step=start,
        resume_tag=tag,
        eval_data=previous.get("eval_data"),
        eval_every=int(previous.get("eval_every", 0)),
        eval_batches=int(previous.get("eval_batches", 8)),
        data_tokens=stored.path.name,
    )
    echo(f"Resuming at step {start} of {total}: {plan.strategy.describe()}")
    write_run_json(out_path, settings, plan, processes, completed=start)
    echo(_starting(processes))
    try:
        with sigterm_raises():  # the workers are stopped with the parent; OUT stays as it is, to resume
            launch(train_worker, (plan.to_json(), settings), processes=processes, cpu_ops=cpu_ops(plan))
    except Terminated:
        click.echo(f"gkd: stopped by SIGTERM; resume again with `gkd run --resume --out {out}`", err=True)
        sys.exit(TERMINATED_EXIT)
    echo(f"Done: {total} steps; the student is in {out_path / 'student'}, the log in {log}")
    return out_path
