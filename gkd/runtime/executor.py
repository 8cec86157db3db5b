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
(OUT/checkpoints/step-N) and its random-number state and data position; the `latest` pointer moves only when
every rank's part is on disk (gkd.runtime.checkpoints). `--resume --out OUT` continues from the latest
complete one with the run's own plan, data and seed: the data stream is deterministic, so it skips the
micro-batches already done, and log rows after the checkpoint are written again. A run whose steps are all
done but whose student was not saved (stopped in between) is finished by `--resume`: it loads the last
checkpoint and saves. When a worker fails after a checkpoint was written, OUT is published anyway so that it
can be resumed; bad input never leaves an OUT.

Three ways in (`run_job`): gkd's own workers on this node (the parent above, `gkd.runtime.launch`); one
rank of a job that torchrun, the deepspeed launcher or srun started; or this node's workers of a job of
`--nnodes` nodes (both in gkd.runtime.nodes: global rank 0 does the parent's part above, `run_checked`, in
its own process, and trains as a rank too). docs/run.md, "Clusters", says what each node writes.

One run at a time per OUT: the parent holds a lock (`.OUT.lock`, fcntl.flock) next to OUT for the whole run.
The temporary folder is `.OUT.partial-PID-RANDOM`; one left by a parent that was killed (SIGKILL: no clean-up
runs) and holds checkpoints is found by `--resume --out OUT`, and a new run over it is refused unless
`--discard-partial` is given. Naming, locking, publishing and settling OUT: gkd.runtime.publishing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from gkd.errors import DoesNotFitError, InputError
from gkd.files import write_atomically
from gkd.planner.plan import Plan
from gkd.runtime.checkpoints import (
    CHECKPOINTS,
    check_loadable,
    partitioned,
    resumable,
    step_of,
    to_universal,
    written_by,
)
from gkd.runtime.checks import (
    check_data,
    check_offline_disk,
    check_out,
    check_out_outside_data,
    check_weight_files,
    cross_document_notes,
    eval_batches_in_one_pass,
    load_or_plan,
    tokenizer_note,
)
from gkd.runtime.cluster import (
    DEFAULT_TIMEOUT_S,
    from_environment,
)
from gkd.runtime.launch import (
    default_processes,
    launch,
)
from gkd.runtime.nodes import run_as_rank, run_nodes
from gkd.runtime.publishing import (
    check_out_name,
    has_checkpoint,
    is_done,
    out_lock,
    partial_name,
    run_in,
    strays,
    worth_keeping,
)
from gkd.runtime.records import check_exists, source_ref
from gkd.runtime.settings import RunSettings, write_run_json
from gkd.runtime.signals import Terminated, sigterm_raises, stop, stops_on_sigterm
from gkd.runtime.worker import train_worker


def _starting(world: int) -> str:
    import torch

    where = "one per CUDA device" if torch.cuda.is_available() else "on the CPU with gloo"
    return f"Starting {world} worker processes ({where})"


def _starting_line(world: int, start: Any) -> str:
    return _starting(world) if start is _launch_workers else f"Starting as rank 0 of the job's {world} ranks"


def cpu_ops(plan: Plan) -> tuple[str, ...]:
    """The DeepSpeed CPU ops a run's workers load, once before they fork (each a JIT build the first time):
    CPU Adam where the student's optimizer is offloaded and DeepSpeed runs its own kernel; none otherwise,
    since the plan has DeepSpeed run torch's AdamW (`torch_adam`, gkd.planner.pipeline._optimizer_config)
    and the workers use gloo's collectives without DeepSpeed's shared-memory op (gkd.runtime.launch)."""
    optimizer = plan.deepspeed.get("student", {}).get("optimizer", {})
    name = str(optimizer.get("type", "")).lower()
    torch_adam = bool(optimizer.get("params", {}).get("torch_adam", False))
    if name in ("adam", "adamw") and not torch_adam and plan.strategy.student_offload != "none":
        return ("CPUAdamBuilder",)
    if name in ("adam", "adamw") and not torch_adam:
        return ("FusedAdamBuilder",)  # a plan written before torch_adam
    return ()


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
    discard_partial: bool = False,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rendezvous_timeout: float = DEFAULT_TIMEOUT_S,
    echo: Any = click.echo,
) -> Path | None:
    """The body of `gkd run` (see the module docstring); returns OUT (None on a rank other than 0 of a job
    that a launcher started). Three ways in: gkd's own workers on this node (no launcher); one rank of a job
    that torchrun, the deepspeed launcher or srun started (`gkd.runtime.cluster`); or this node's workers of
    a job of `nnodes` nodes (`--nnodes`), each of them such a rank."""
    job: dict[str, Any] = {
        "target": target,
        "data": data,
        "steps": steps,
        "out": out,
        "seed": seed,
        "resume": resume,
        "save_every": save_every,
        "keep_last": keep_last,
        "eval_data": eval_data,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
        "discard_partial": discard_partial,
    }
    if rendezvous_timeout <= 0:
        raise InputError(f"--rendezvous-timeout must be more than 0 seconds, got {rendezvous_timeout:g}")
    launched = from_environment()
    node_flags = [
        flag
        for flag, value in (
            ("--nnodes", nnodes),
            ("--node-rank", node_rank),
            ("--master-addr", master_addr),
            ("--master-port", master_port),
        )
        if value is not None
    ]
    if launched is not None and node_flags:
        raise InputError(
            f"this gkd run was started by {launched.source} (RANK {launched.rank} of WORLD_SIZE "
            f"{launched.world}), which places the ranks; drop {', '.join(node_flags)}"
        )
    if launched is None and node_flags:
        return run_nodes(
            job,
            processes=processes,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            timeout_s=rendezvous_timeout,
            echo=echo,
        )
    if launched is None:
        return run_checked(**job, processes=processes, start=_launch_workers, echo=echo)
    if processes is not None and processes != launched.world:
        raise InputError(
            f"--processes {processes} contradicts {launched.source}, which started {launched.world} ranks "
            f"(WORLD_SIZE); drop --processes, or start {processes} ranks"
        )
    return run_as_rank(launched, job, timeout_s=rendezvous_timeout, echo=echo)


def run_checked(
    target: str | None,
    *,
    data: str | None,
    steps: int | None,
    out: str | None,
    processes: int | None,
    seed: int | None,
    resume: bool,
    save_every: int,
    keep_last: int,
    eval_data: str | None,
    eval_every: int,
    eval_batches: int,
    discard_partial: bool,
    start: Start,
    echo: Any,
    per_node: int | None = None,
) -> Path:
    """A run of `processes` ranks (all of this node's, or those of a launched job: `start`), checked and
    published by this process."""
    from gkd.runtime.engines import has_weights

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
    if eval_data is not None:
        check_exists(eval_data, "eval data")
    if resume and (eval_data is not None or eval_every):
        raise InputError("a resumed run keeps its own evaluation settings; drop --eval-data / --eval-every")
    # Stored absolute in run.json, so that a resume from another folder reads the same files.
    data = source_ref(data) if data is not None and not resume else data
    eval_data = source_ref(eval_data) if eval_data is not None else None
    if resume and discard_partial:
        raise InputError(
            "--discard-partial starts a run over; it cannot go with --resume, which continues one"
        )
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
            start_ranks=start,
            per_node=per_node,
        )
    seed = 0 if seed is None else seed
    if out is not None and not out.strip():
        raise InputError("--out is empty; name the output folder, or leave --out out for runs/run-<time>")
    out_path = Path(out) if out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    check_out_name(out_path)
    if out_path.parent.is_dir():
        with out_lock(out_path):  # another run of OUT is refused here already, before its folder is judged
            pass
    kept = [p for p in strays(out_path) if worth_keeping(p)]
    if kept and not discard_partial:
        raise InputError(
            f"{kept[0]} holds an interrupted run of {out_path} (checkpoints or a student): continue it with "
            f"`gkd run --resume --out {out_path}`, or start over with --discard-partial (which removes it)"
        )
    check_out(out_path)
    if data is not None:
        check_exists(data, "data source")
    check_out_outside_data(out_path, [data, eval_data])
    plan = load_or_plan(target, processes=world, echo=echo, per_node=per_node)
    _check_runnable(plan, world)
    total = steps if steps is not None else int(plan.inputs["config"]["training"]["steps"])
    if total < 1:
        raise InputError(f"--steps must be at least 1, got {total}")
    check_weight_files(plan)
    stored = check_data(plan, data, world, seed, echo)
    from gkd.runtime.generation import check_generation  # imports torch: not at the CLI's start

    check_generation(plan, stored, data)  # generation: prompts in the data, methods that apply
    data_tokens = stored.path.name
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
    notes.extend(cross_document_notes(plan.inputs["config"]))
    echo(f"Running: {plan.strategy.describe()}")
    for note in notes:
        echo(f"Note: {note}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(out_path)
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
    with out_lock(out_path):
        # Under the lock no other run of OUT is alive: what is left of earlier ones is removed (those with
        # checkpoints only when --discard-partial said so, above), and OUT is checked again.
        for stray in strays(out_path):
            if not worth_keeping(stray) or discard_partial:
                echo(f"Note: removing {stray}, left by an interrupted run of {out_path}")
                shutil.rmtree(stray, ignore_errors=True)
        check_out(out_path)
        echo(_starting_line(world, start))
        _run_and_publish(tmp, out_path, plan, settings, world, start)
    echo(
        f"Done: {total} steps; the student is in {out_path / 'student'}, the log in {out_path / 'log.jsonl'}"
    )
    return out_path


def _check_runnable(plan: Plan, world: int) -> None:
    """Before any worker starts, of a new run or a resumed one: what this runtime supports here (e.g. float16
    only on CUDA), and, on GPUs too, the plan's host memory (load, steady state and save) against what this
    machine has (gkd.runtime.engines)."""
    import torch

    from gkd.runtime.engines import available_host_memory, check_host_memory, check_supported

    cuda = torch.cuda.is_available()
    check_supported(plan, cuda=cuda)
    check_host_memory(plan, world=world, available=available_host_memory(), cuda=cuda)


# How the ranks of a checked run are started: `start(plan, settings, world, tmp, out_path)` returns when every
# rank is done (gkd's own workers: `_launch_workers`; a launched job: gkd.runtime.nodes, on rank 0).
Start = Callable[[Plan, RunSettings, int, Path, Path], None]


def _launch_workers(plan: Plan, settings: RunSettings, world: int, tmp: Path, out_path: Path) -> None:
    launch(train_worker, (plan.to_json(), settings), processes=world, cpu_ops=cpu_ops(plan))


def _run_and_publish(
    tmp: Path, out_path: Path, plan: Plan, settings: RunSettings, world: int, start: Start
) -> None:
    """Run the workers in the temporary folder `tmp` and rename it to OUT. A run that fails or is interrupted
    (Ctrl-C, SIGTERM: one line and exit 130 or 143, `signals.stop`) before its first checkpoint leaves
    nothing; after one, OUT is published so that the run can be resumed. When OUT cannot take the folder
    (something appeared in it meanwhile), `tmp` is kept and OutputKeptError names it: a finished run's result
    is never removed."""

    def run() -> None:
        tmp.mkdir()
        (tmp / "plan.json").write_text(plan.to_json())
        write_run_json(tmp, settings, plan, world, completed=0)
        start(plan, settings, world, tmp, out_path)

    run_in(tmp, out_path, run)


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
    start_ranks: Start,
    per_node: int | None = None,
) -> Path:
    """Continue the run in OUT from its latest complete checkpoint, with its own plan, data and seed; or
    finish a run whose steps are done but whose student was not saved. `per_node`: ranks per node of a
    launched job that spans nodes (for a plan made again for another world size)."""
    if out is None:
        raise InputError("--resume continues the run in --out; name that folder with --out")
    if target is not None:
        raise InputError(f"--resume continues the plan saved in {out}; drop {target} from the command")
    out_path = Path(out)
    if not (out_path.parent if str(out_path.parent) else Path(".")).is_dir():
        raise InputError(f"{out} holds no checkpoint to resume from; runs write them with --save-every N")
    with out_lock(out_path):
        if not has_checkpoint(out_path) and not is_done(out_path):
            _adopt_stray(out_path, echo)
        return _resume_locked(
            out_path,
            data=data,
            steps=steps,
            processes=processes,
            seed=seed,
            save_every=save_every,
            keep_last=keep_last,
            echo=echo,
            start_ranks=start_ranks,
            per_node=per_node,
        )


def _adopt_stray(out_path: Path, echo: Any) -> None:
    """OUT holds no checkpoint: the run may be in a temporary folder its parent left when it was killed
    (SIGKILL runs no clean-up). Move that folder to OUT, where the resume continues it."""
    found = [p for p in strays(out_path) if worth_keeping(p)]
    if not found:
        return  # the caller says that there is nothing to resume
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise InputError(
            f"{out_path} holds no checkpoint, and several interrupted runs of it do ({names}); resume one "
            f"with `gkd run --resume --out FOLDER`, or remove the others"
        )
    [stray] = found
    if out_path.is_dir() and any(out_path.iterdir()):
        raise InputError(
            f"{out_path} holds no checkpoint but the interrupted run in {stray} does, and {out_path} is not "
            f"empty; resume that one with `gkd run --resume --out {stray}`"
        )
    try:
        stray.rename(out_path)
    except OSError as err:
        raise InputError(
            f"cannot move {stray} to {out_path} ({err.strerror or err}); resume it where it is "
            f"with `gkd run --resume --out {stray}`"
        ) from None
    echo(f"Found the interrupted run of {out_path} in {stray}; moved it to {out_path}")


def _kept_log_rows(log: Path, start: int) -> list[str]:
    """The rows of log.jsonl up to step `start` (those after it are done again). A last row cut short (the
    run was killed while writing it) is dropped; a damaged row before it is an InputError."""
    try:
        lines = log.read_text().splitlines() if log.is_file() else []
    except (OSError, UnicodeDecodeError):
        raise InputError(f"{log} cannot be read as text; restore it or remove it to resume") from None
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if i == len(lines) - 1:
                break  # written when the run was stopped
            raise InputError(
                f"{log} line {i + 1} is damaged (not a log row); restore it or remove the line to resume"
            ) from None
        if step <= start:
            kept.append(line)
    return kept


def _stage_for(other_world: bool, universal: bool) -> int | None:
    """The student ZeRO stage a resume's plan must have to load its checkpoint (None: any): on another world
    size, ZeRO-1, 2 or 3 for a universal checkpoint (DeepSpeed loads none into ZeRO-0's optimizer) and ZeRO-0
    for a ZeRO-0 checkpoint (whole, not partitioned)."""
    if not other_world:
        return None
    return 1 if universal else 0


def _replan(
    out_path: Path, processes: int, echo: Any, *, stage: int | None, per_node: int | None = None
) -> Plan:
    """The plan of the run in OUT made again for `processes` processes from its own config: the same job,
    global batch and seed, so each step trains on the same rows (gkd.runtime.data). `stage`: 0 pins the
    student's ZeRO stage to 0; 1 keeps it at 1 or more (see `_stage_for`). `per_node`: ranks per node of a
    launched job over several nodes (None: one node). InputError, in one line, where the job cannot run on
    that many."""
    from gkd.config import Config

    saved = load_or_plan(str(out_path / "plan.json"), processes=_planned_gpus(out_path), echo=lambda _: None)
    config = Config.from_dict(saved.inputs["config"])
    made_for = config.hardware.gpus
    batch = config.training.global_batch
    if batch % processes:
        raise InputError(
            f"the run in {out_path} has a global batch of {batch}, which {processes} processes do not "
            "divide; a resumed run keeps its global batch, so resume with a number of processes that divides "
            f"it (it was made with {made_for})"
        )
    if per_node is None and config.hardware.gpus_per_node < processes:
        # gkd's own workers on this node: all on one node (a multi-node run's config holds its ranks per node)
        per_node = processes
    try:
        plan = load_or_plan(None, processes=processes, echo=echo, config=config, per_node=per_node)
        chosen = plan.strategy.student_zero_stage
        if stage is not None and (chosen == 0) != (stage == 0):
            loads = "ZeRO-0 only" if stage == 0 else "ZeRO-1, 2 or 3 only"
            echo(
                f"Note: the checkpoint loads into the student's {loads}, not the ZeRO-{chosen} planned for "
                f"{processes} processes; planning again with ZeRO-{stage}"
            )
            pinned = dataclasses.replace(config.overrides, student_zero_stage=stage)
            plan = load_or_plan(
                None,
                processes=processes,
                echo=lambda _: None,
                config=dataclasses.replace(config, overrides=pinned),
                per_node=per_node,
            )
        return plan
    except DoesNotFitError as err:
        why = str(err).split("; ")[0]  # without the fix for a new job, which names a `gkd plan` command
        raise InputError(
            f"the run in {out_path} cannot continue on {processes} processes ({why}); resume with "
            f"--processes {made_for} (as it was made) or more"
        ) from None


def _planned_gpus(out_path: Path) -> int:
    """The GPU count OUT/plan.json was made for (the world size of the run's latest start)."""
    try:
        data = json.loads((out_path / "plan.json").read_text())
        return int(data["inputs"]["config"]["hardware"]["gpus"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise InputError(
            f"{out_path / 'plan.json'} is damaged (the run's plan); a resume needs it whole: restore it"
        ) from None


def _resume_locked(
    out_path: Path,
    *,
    data: str | None,
    steps: int | None,
    processes: int | None,
    seed: int | None,
    save_every: int,
    keep_last: int,
    echo: Any,
    start_ranks: Start,
    per_node: int | None = None,
) -> Path:
    out = str(out_path)
    folder = out_path / CHECKPOINTS
    if not (has_checkpoint(out_path) or is_done(out_path)):
        raise InputError(f"{out} holds no checkpoint to resume from; runs write them with --save-every N")
    if not (out_path / "run.json").is_file():
        raise InputError(
            f"{out_path / 'run.json'} is missing (it records how the run started: data, seed, steps); a "
            "resume needs it: restore it"
        )
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
    total = steps if steps is not None else int(previous["steps"])
    if is_done(out_path) and total <= int(previous["steps"]):
        raise InputError(
            f"the run in {out} is done ({previous['steps']} steps; the student is in "
            f"{out_path / 'student'}); give --steps larger than {previous['steps']} to train it further"
        )
    if not has_checkpoint(out_path):
        raise InputError(f"{out} holds no checkpoint to resume from; runs write them with --save-every N")
    made_with = int(previous["processes"])  # the world size of the run's latest start: OUT/plan.json's
    processes = made_with if processes is None else processes
    tag, note = resumable(folder)
    written = written_by(folder / tag)
    # DeepSpeed's ZeRO files are partitioned by rank: a checkpoint of another world size is converted into
    # DeepSpeed's universal form, which it loads into ZeRO-1, 2 or 3. A ZeRO-0 checkpoint holds the whole
    # state in one file, which any number of processes loads as ZeRO-0.
    universal = written != processes and partitioned(folder / tag)
    replanned = processes != made_with or written != processes
    if replanned:
        stage = _stage_for(written != processes, universal)
        plan = _replan(out_path, processes, echo, stage=stage, per_node=per_node)
    else:
        plan = load_or_plan(str(out_path / "plan.json"), processes=processes, echo=echo)
    _check_runnable(plan, processes)  # this machine may not be the one the run started on
    check_weight_files(plan)
    if note:
        echo(f"Note: {note}")
    start = step_of(tag) or 0
    if total < start:
        raise InputError(f"the run in {out} is at step {start} already; give --steps of at least {start}")
    # DeepSpeed loads its files with pickle's full power: only data may reach it.
    check_loadable(folder / tag)
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
    if universal:
        echo(
            f"Converting checkpoint {tag} of {written} processes for {processes} (DeepSpeed's universal form)"
        )
        to_universal(folder, tag)
    # Rows logged after the checkpoint are done again.
    log = out_path / "log.jsonl"
    rows = _kept_log_rows(log, start)
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
        resume_universal=universal,
        eval_data=previous.get("eval_data"),
        eval_every=int(previous.get("eval_every", 0)),
        eval_batches=int(previous.get("eval_batches", 8)),
        data_tokens=stored.path.name,
    )
    if start == total:
        echo(
            f"Resuming at step {start} of {total}: every step is done; loading step {start} to save the "
            "student"
        )
    else:
        echo(f"Resuming at step {start} of {total}: {plan.strategy.describe()}")
    log.write_text("".join(r + "\n" for r in rows))
    if replanned:
        from gkd.runtime.offline import TOPK_DIR

        # The run goes on with this plan (a later resume reads it); an offline teacher pass stored for
        # another plan holds other ranks' micro-batches, so it is done again.
        write_atomically(out_path / "plan.json", plan.to_json())
        shutil.rmtree(out_path / TOPK_DIR, ignore_errors=True)
    # The run is not done: a student folder is from fewer steps (or cut short), and is saved again.
    for old in (out_path / "student", out_path / "student.partial"):
        if old.is_dir():
            shutil.rmtree(old)
    # completed_steps reaches `steps` only once the student is saved (what makes a run done).
    write_run_json(out_path, settings, plan, processes, completed=min(start, total - 1))
    echo(_starting_line(processes, start_ranks))
    try:
        with sigterm_raises():  # the workers are stopped with the parent; OUT stays as it is, to resume
            start_ranks(plan, settings, processes, out_path, out_path)
    except (Terminated, KeyboardInterrupt) as err:
        stop(err, f"; resume again with `gkd run --resume --out {out}`")
    echo(f"Done: {total} steps; the student is in {out_path / 'student'}, the log in {log}")
    return out_path
