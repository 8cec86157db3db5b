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

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from gkd.errors import DoesNotFitError, GkdError, InputError
from gkd.planner.plan import Plan, human_bytes
from gkd.runtime.launch import WorkerFailedError, default_processes, launch


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


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What a worker needs besides the plan: everything is resolved and validated by the parent."""

    data: str | None
    steps: int
    seed: int
    out: str  # the folder the workers write into (a temporary one, renamed to OUT at the end of a new run)
    log_every: int
    notes: tuple[str, ...] = ()
    save_every: int = 0  # a DeepSpeed checkpoint every this many steps (0: none)
    keep_last: int = 0  # keep only this many of the newest checkpoints (0: all)
    start_step: int = 0  # steps already done (resume from the checkpoint `resume_tag`)
    resume_tag: str = ""
    eval_data: str | None = None  # held-out text: the student's own loss on it (None: no evaluation)
    eval_every: int = 0  # evaluate every this many steps (0: at the end only)
    eval_batches: int = 8  # micro-batches per rank in one evaluation
    data_tokens: str = ""  # the stored ids' file name: it changes when the data or its tokenizer does


# ----------------------------------------------------------------------------------------------------------
# The parent: validation, planning, launching, publishing OUT


def _is_plan_file(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    # Any key only a plan has makes it one (a damaged plan then gets the plan reader's message, not the
    # config reader's list of unknown keys).
    return isinstance(data, dict) and bool(_PLAN_ONLY_KEYS & set(data))


_PLAN_ONLY_KEYS = frozenset({"strategy", "schedule", "inputs", "alternatives", "provenance", "peak_bytes"})


def load_or_plan(target: str | None, *, processes: int, echo: Any = click.echo) -> Plan:
    """The plan to run: read from a plan file (its GPU count must be the world size), or planned from a config
    (or the headline job when `target` is None) for `processes` GPUs."""
    from gkd.config import apply_flags, default_config

    if target is not None:
        path = Path(target)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise InputError(f"{target} {what}; give a config (YAML or JSON) or a plan from `gkd plan -o`")
        if _is_plan_file(path):
            plan = Plan.from_json(path.read_text())
            gpus = int(plan.inputs.get("config", {}).get("hardware", {}).get("gpus", 0))
            if gpus != processes:
                raise InputError(
                    f"the plan {target} was made for {gpus} GPUs but this run has {processes} processes; "
                    f"re-plan with `gkd plan CONFIG --gpus {processes} -o plan.json` or run with "
                    f"--processes {gpus}"
                )
            if not plan.fits:
                raise DoesNotFitError(
                    f"the plan {target} does not fit: peak {human_bytes(plan.peak_bytes)} per GPU exceeds "
                    f"{human_bytes(plan.budget_bytes)}; `gkd plan` lists the smallest changes that fit"
                )
            return plan
    from gkd.planner.pipeline import plan as make_plan

    config = _load_run_config(target, processes) if target is not None else default_config()
    _check_global_batch(config.training.global_batch, processes, target)
    config = apply_flags(config, gpus=processes)
    ov = config.overrides
    note = ""
    reason = _tensor_parallel_blocker(config)
    if reason and ov.tensor_parallel is None and ov.teacher_placement != "tensor_parallel":
        # Plan among the placements this runtime can run for these teachers, so a config always gets the
        # best plan `gkd run` executes (a pinned tensor-parallel teacher is refused with the fix).
        config = dataclasses.replace(config, overrides=dataclasses.replace(ov, tensor_parallel=1))
        note = f"; tensor-parallel teachers left out: {reason}"
    echo(f"Planning for this run's {processes} processes (hardware.gpus = world size = {processes}{note}).")
    plan = make_plan(config)
    if not plan.fits:
        command = " ".join(["gkd plan", *([target] if target else []), f"--gpus {processes}"])
        raise DoesNotFitError(
            f"the job does not fit: peak {human_bytes(plan.peak_bytes)} per GPU exceeds "
            f"{human_bytes(plan.budget_bytes)}; `{command}` lists the smallest changes that fit"
        )
    return plan


def _load_run_config(target: str, processes: int) -> Any:
    """The config at `target`, for a run whose GPU count is its number of processes (the file's own
    hardware.gpus need not divide its global batch); the fix for a global batch the processes do not divide
    names the config key, as `gkd run` has no --global-batch flag."""
    from gkd.config import GlobalBatchError, load_config

    try:
        return load_config(target, gpus=processes)
    except GlobalBatchError as err:
        _check_global_batch(err.batch, processes, target)
        raise


def _check_global_batch(batch: int, processes: int, target: str | None) -> None:
    """The run's processes must divide the global batch; the fix names the config key, as `gkd run` has no
    --global-batch flag."""
    if batch % processes:
        fewer = max(n for n in range(1, processes) if batch % n == 0)
        raise InputError(
            f"training.global_batch ({batch}) of {target or 'the headline job'} must be divisible by this "
            f"run's {processes} processes; set training.global_batch in the config to a multiple of "
            f"{processes} (e.g. {batch + processes - batch % processes}) or run with --processes {fewer}"
        )


def _tensor_parallel_blocker(config: Any) -> str | None:
    """Why none of the tensor-parallel degrees the planner may pick can run these teachers, or None."""
    from gkd.planner.search import tensor_parallel_degrees
    from gkd.planner.specs import load_spec
    from gkd.runtime.tensor_parallel import unsupported_reason

    specs = [load_spec(config.model_path(ref)) for ref in config.teachers]
    for tp in tensor_parallel_degrees(config.hardware.local_gpus, [s.heads for s in specs]):
        for spec in specs:
            reason = unsupported_reason(spec.model_type, spec.kv_heads, tp)
            if reason:
                return f"{spec.name}: {reason}"
    return None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; name a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not empty; choose another --out or remove it")
    # The folders above OUT are created as needed: the nearest one that exists must be writable.
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot write in {parent}; choose a writable --out")


def _check_data(plan: Plan, data: str | None, processes: int, seed: int, echo: Any = click.echo) -> Any:
    """Open the data source and tokenizer as the workers will, so bad data fails before any process starts;
    a source not seen before is tokenised here, once, for all of them (see gkd.runtime.tokens). Returns the
    source's stored ids (a TokenFile)."""
    from gkd.planner.specs import load_spec
    from gkd.runtime.data import batches, load_tokenizer, prepare_tokens

    config = plan.inputs["config"]
    t_ref, s_ref = config["teachers"][0], config["student"]
    t_spec, s_spec = load_spec(t_ref), load_spec(s_ref)
    tokenizer = load_tokenizer(t_ref, t_spec)
    for spec in (s_spec, *(load_spec(r) for r in config["teachers"])):
        if tokenizer.vocab_size > spec.vocab:
            raise InputError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {spec.name} has a vocabulary of "
                f"{spec.vocab}; distil models that share the teacher's tokenizer"
            )
    stored, built = prepare_tokens(data, tokenizer, show_progress=True)
    if built and data is not None:
        echo(
            f"Tokenized {data}: {stored.documents:,} documents, {stored.tokens:,} tokens "
            f"(stored in {stored.path})"
        )
    batches(
        data,
        tokenizer,
        seq_len=int(config["training"]["seq_len"]),
        micro_batch=plan.strategy.micro_batch,
        objective="mlm" if s_spec.is_encoder else "causal",
        rank=0,
        world=processes,
        seed=seed,
    )
    return stored


def _eval_batches_in_one_pass(plan: Plan, stored: Any, world: int) -> int:
    """The micro-batches per rank that the held-out source holds without repeating a row (the rows of one
    shuffled pass, split over the ranks; see gkd.runtime.data)."""
    rows = stored.tokens // int(plan.inputs["config"]["training"]["seq_len"])
    return max(1, rows // (world * plan.strategy.micro_batch))


def _check_weights(plan: Plan) -> None:
    """The weight files of every model given as a checkpoint folder, checked against its config.json before
    any worker loads them (headers only; `gkd.runtime.engines.check_weights`)."""
    from gkd.planner.specs import load_spec
    from gkd.runtime.engines import check_weights, has_weights

    config = plan.inputs["config"]
    for ref in dict.fromkeys([*config["teachers"], config["student"]]):
        if has_weights(ref):
            check_weights(ref, load_spec(ref))


def _tokenizer_note(ref: str) -> str | None:
    """A note when the teacher whose tokenizer the run reads has weights but no tokenizer files: the data is
    then encoded with the built-in byte tokenizer, which is not what the teacher was trained with."""
    from gkd.runtime.data import _TOKENIZER_FILES, _tokenizer_folder
    from gkd.runtime.engines import has_weights

    if not has_weights(ref) or _tokenizer_folder(ref) is not None:
        return None
    return (
        f"teacher {ref} has weights but no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...): the "
        "data is encoded with the built-in byte tokenizer, not the teacher's own; copy its tokenizer files "
        "into that folder"
    )


class OutputKeptError(GkdError):
    """A run's output could not be moved to OUT: it is kept in the temporary folder (exit code 1)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # why OUT could not take it


_TERMINATED = 128 + signal.SIGTERM  # the shell's exit status for a process ended by SIGTERM
_sigterm_pid: int | None = None  # the process whose SIGTERM handler `_sigterm_raises` installed


class _Terminated(BaseException):
    """SIGTERM arrived in the parent (`_sigterm_raises`); a BaseException, like KeyboardInterrupt, so that no
    `except Exception` stops it before the run's clean-up."""


def _reset_sigterm_in_child() -> None:
    # A forked worker must die of SIGTERM at once, as the launcher's clean-up of its peers expects (a Python
    # handler runs only between bytecodes, not in a collective); see gkd.runtime.launch.
    if _sigterm_pid is not None and os.getpid() != _sigterm_pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


with contextlib.suppress(AttributeError):  # os.register_at_fork: POSIX only
    os.register_at_fork(after_in_child=_reset_sigterm_in_child)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the run's temporary folder exists: SIGTERM (`timeout`, `kill`, a scheduler) raises _Terminated in
    the parent, so the run's clean-up runs as on Ctrl-C; forked workers keep the default action."""
    global _sigterm_pid
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != _sigterm_pid:  # a child forked before the reset: die as SIGTERM would kill it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise _Terminated()

    previous, previous_pid = signal.signal(signal.SIGTERM, handler), _sigterm_pid
    _sigterm_pid = os.getpid()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm_pid = previous_pid  # an enclosing _sigterm_raises (run_job's) stays in force


def _stops_on_sigterm(fn: Callable[..., Path]) -> Callable[..., Path]:
    """SIGTERM at any point of `fn` (while the data is tokenized, too) runs the same clean-up as Ctrl-C and
    exits with 143 after one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        try:
            with _sigterm_raises():
                return fn(*args, **kwargs)
        except _Terminated:
            click.echo("gkd: stopped by SIGTERM", err=True)
            sys.exit(_TERMINATED)

    return wrapper


@_stops_on_sigterm
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
    _check_out(out_path)
    if data is not None and not Path(data).exists():
        raise InputError(f"data source {data} does not exist; give a .txt or .jsonl file or a dataset folder")
    plan = load_or_plan(target, processes=world, echo=echo)
    check_supported(plan, cuda=torch.cuda.is_available())
    if not torch.cuda.is_available():
        check_host_memory(plan, world=world, available=available_host_memory())
    total = steps if steps is not None else int(plan.inputs["config"]["training"]["steps"])
    if total < 1:
        raise InputError(f"--steps must be at least 1, got {total}")
    _check_weights(plan)
    data_tokens = _check_data(plan, data, world, seed, echo).path.name
    notes = []
    if eval_data is not None and data is not None and Path(eval_data).resolve() == Path(data).resolve():
        notes.append(f"--eval-data is the training data ({data}): eval_loss then measures training text")
    if eval_data is not None:
        one_pass = _eval_batches_in_one_pass(plan, _check_data(plan, eval_data, world, seed, echo), world)
        if eval_batches > one_pass:
            # More would evaluate the same rows again: no new information, only time.
            notes.append(
                f"--eval-batches {eval_batches} is more than the {one_pass} micro-batches per process that "
                f"{eval_data} holds; each evaluation reads those {one_pass}"
            )
            eval_batches = one_pass
    _check_offline_disk(plan, out_path, steps=total, world=world)

    for ref in plan.inputs["config"]["teachers"]:
        if not has_weights(ref):
            notes.append(
                f"teacher {ref} has no weights (a preset or config.json): it is randomly initialised"
            )
    tokenizer_note = _tokenizer_note(plan.inputs["config"]["teachers"][0])
    if tokenizer_note:
        notes.append(tokenizer_note)
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
        with _sigterm_raises():
            _run_and_publish(tmp, out_path, plan, settings, world)
    except _Terminated:
        sys.exit(_TERMINATED)
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
        _write_run_json(tmp, settings, plan, world, completed=0)
        launch(train_worker, (plan.to_json(), settings), processes=world, cpu_ops=cpu_ops(plan))
        try:
            _publish(tmp, out_path)
        except OutputKeptError:
            kept = True
            raise
    except (WorkerFailedError, KeyboardInterrupt, _Terminated) as err:
        if not (tmp / CHECKPOINTS / "latest").is_file():
            if isinstance(err, _Terminated):  # Ctrl-C prints its own line ("gkd: aborted")
                click.echo(f"gkd: {_interruption(err)}; the unfinished run was removed", err=True)
            raise
        # The checkpoints are worth keeping: publish what there is, so that the run can be resumed.
        what = str(err) if isinstance(err, WorkerFailedError) else _interruption(err)
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


def _interruption(err: BaseException) -> str:
    return "stopped by SIGTERM" if isinstance(err, _Terminated) else "interrupted"


CHECKPOINTS = "checkpoints"


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


def _write_run_json(folder: Path, settings: RunSettings, plan: Plan, world: int, *, completed: int) -> None:
    """OUT/run.json: how the run was started (what a resume reuses) and how far it got."""
    summary = {
        "steps": settings.steps,
        "completed_steps": completed,
        "processes": world,
        "seed": settings.seed,
        "data": settings.data,
        "save_every": settings.save_every,
        "keep_last": settings.keep_last,
        "eval_data": settings.eval_data,
        "eval_every": settings.eval_every,
        "eval_batches": settings.eval_batches,
        "data_tokens": settings.data_tokens,
        "strategy": plan.strategy.describe(),
        "recomputed_layers": list(plan.strategy.recompute_layers),
        "tap_loss_executed": plan.strategy.tap_loss,
        "notes": list(settings.notes),
    }
    (folder / "run.json").write_text(json.dumps(summary, indent=2))


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
    _check_weights(plan)
    tag = latest.read_text().strip()
    start = int(tag.removeprefix("step-"))
    total = steps if steps is not None else int(previous["steps"])
    if total <= start:
        raise InputError(f"the run in {out} is at step {start} already; give --steps larger than {start}")
    # The sources may have moved or changed since; and their stored ids may have been removed.
    stored = _check_data(plan, previous["data"], processes, int(previous["seed"]), echo)
    if previous.get("data_tokens") and previous["data_tokens"] != stored.path.name:
        # The resume replays the data stream to skip what was trained on: other data would make that wrong.
        raise InputError(
            f"the data {previous['data'] or 'the built-in corpus'} changed since the run started (its size, "
            "modification time or tokenizer); restore it, or start a new run from the student saved so far"
        )
    if previous.get("eval_data") is not None:
        _check_data(plan, previous["eval_data"], processes, int(previous["seed"]), echo)
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
    _write_run_json(out_path, settings, plan, processes, completed=start)
    echo(_starting(processes))
    try:
        with _sigterm_raises():  # the workers are stopped with the parent; OUT stays as it is, to resume
            launch(train_worker, (plan.to_json(), settings), processes=processes, cpu_ops=cpu_ops(plan))
    except _Terminated:
        click.echo(f"gkd: stopped by SIGTERM; resume again with `gkd run --resume --out {out}`", err=True)
        sys.exit(_TERMINATED)
    echo(f"Done: {total} steps; the student is in {out_path / 'student'}, the log in {log}")
    return out_path


# ----------------------------------------------------------------------------------------------------------
# The worker: the training loop


def peak_memory_bytes(device: Any) -> tuple[int, str]:
    """This process's peak memory and what it measures: CUDA max_memory_allocated, or the peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_rss"


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
        info = f"loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s"
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

    from gkd.runtime.data import batches, load_tokenizer
    from gkd.runtime.engines import build_models, make_engines
    from gkd.runtime.offline import TOPK_DIR, stored_taps

    hf_logging.disable_progress_bar()  # the save's shard bar; the run prints its own progress
    plan = Plan.from_json(plan_json)
    config = plan.inputs["config"]
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    phase = _Phases(enabled=rank == 0)
    phase.start(f"loading the models ({', '.join(config['teachers'])} -> {config['student']})")
    models = build_models(plan, seed=settings.seed, total_steps=settings.steps)
    tokenizer = load_tokenizer(config["teachers"][0], models.teacher_specs[0])

    def data_stream(source: str | None = settings.data) -> Any:
        return batches(
            source,
            tokenizer,
            seq_len=int(config["training"]["seq_len"]),
            micro_batch=plan.strategy.micro_batch,
            objective="mlm" if models.student_spec.is_encoder else "causal",
            rank=rank,
            world=world,
            seed=settings.seed,
        )

    out = Path(settings.out)
    accum = plan.strategy.grad_accum
    readers: list[Any] = []
    if plan.strategy.teacher_placement == "offline":
        # Before the student engine exists: the pass and training never hold both (as the plan has it).
        phase.start("the offline teacher pass")
        readers = _offline_pass(models, plan, settings, data_stream, rank=rank, world=world, device=device)
    phase.start("setting up the DeepSpeed engines")
    engines = make_engines(models, plan, device=device)
    engine, module = engines.student, engines.module
    module.tap_loss = plan.strategy.tap_loss  # layerwise: tap terms run (and free teacher taps) mid-forward
    served = stored_taps(models.resolver.at(0)) if readers else []
    stream = data_stream()
    if settings.resume_tag:
        restore_checkpoint(engine, out / CHECKPOINTS, settings.resume_tag, rank=rank)
        for _ in range(settings.start_step * accum):  # the data stream is deterministic: skip what was done
            next(stream)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
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
            for micro in range(accum):
                batch = {k: v.to(device) for k, v in next(stream).items()}
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
            sums = sums.to(device)  # nccl reduces device tensors only
            dist.all_reduce(sums)
            sums = sums.cpu()
            seconds = time.perf_counter() - start
            peak, source = peak_memory_bytes(device)
            peak_t = torch.tensor([peak], dtype=torch.int64, device=device)
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
            n = world * accum
            row = {
                "step": step + 1,
                "loss": sums[0].item() / n,
                "terms": {name: sums[1 + j].item() / n for j, name in enumerate(names)},
                "tokens": int(sums[-1].item()),
                "seconds": round(seconds, 4),
                "tokens_per_s": round(sums[-1].item() / seconds, 1),
                "peak_memory_bytes": int(peak_t.item()),
                "memory_source": source,
            }
            if not math.isfinite(row["loss"]):
                raise RuntimeError(f"the loss is {row['loss']} at step {step + 1}")
            last = step + 1 == settings.steps
            due = settings.eval_every and (step + 1) % settings.eval_every == 0
            if settings.eval_data is not None and (last or due):
                held_out = data_stream(settings.eval_data)  # the same micro-batches at every evaluation
                row["eval_loss"] = evaluate(engine, module.student, held_out, settings.eval_batches, device)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            progress.update(row)
            if settings.save_every and (step + 1) % settings.save_every == 0:
                save_checkpoint(engine, out / CHECKPOINTS, step + 1, rank=rank)
                if settings.keep_last:
                    dist.barrier()  # every rank has written its part before any is removed
                    if rank == 0:
                        prune_checkpoints(out / CHECKPOINTS, settings.keep_last)
                if rank == 0:
                    _write_run_json(out, settings, plan, world, completed=step + 1)
    finally:
        progress.close()
        if log is not None:
            log.close()
    save_student(engines, out / "student", rank=rank, zero_stage=plan.strategy.student_zero_stage)
    if rank == 0:
        copy_tokenizer(config["teachers"][0], out / "student")
    if readers:
        readers.clear()  # closes the memory maps before the folder goes
        dist.barrier()
        if rank == 0:  # the stored top-k is only needed to resume, and this run is done
            shutil.rmtree(out / TOPK_DIR, ignore_errors=True)
    if rank == 0:
        _write_run_json(out, settings, plan, world, completed=settings.steps)


def evaluate(engine: Any, student: Any, stream: Any, n: int, device: Any) -> float:
    """The student's own loss (its LM or MLM cross-entropy on the batch's labels) on the next `n`
    micro-batches of `stream`, averaged over them and all ranks; in eval mode and without gradients."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            batch = next(stream)
            inputs = {
                "input_ids": batch["input_ids"].to(device),
                "attention_mask": batch["attention_mask"].long().to(device),
                "labels": batch["labels"].to(device),
            }
            if getattr(student.config, "use_cache", False):
                inputs["use_cache"] = False
            total += float(student(**inputs).loss.float())
    engine.train()
    total = total.to(device)
    dist.all_reduce(total)
    return total.item() / (n * dist.get_world_size())


def _check_offline_disk(plan: Plan, out: Path, *, steps: int, world: int) -> None:
    """An offline teacher pass stores k int32 indices and k bfloat16 log-probs per token of every micro-batch
    of every rank (`gkd.runtime.offline`): refuse a run whose disk next to OUT cannot hold them."""
    if plan.strategy.teacher_placement != "offline":
        return
    from gkd.runtime.offline import ENTRY_BYTES

    training = plan.inputs["config"]["training"]
    k = int(training.get("offline_topk", 64))
    tokens = steps * plan.strategy.grad_accum * plan.strategy.micro_batch * int(training["seq_len"])
    need = tokens * k * ENTRY_BYTES * world * len(plan.inputs["config"]["teachers"])
    where = out.resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise InputError(
            f"the offline teacher pass stores {human_bytes(need)} of top-k log-probs under OUT, but {where} "
            f"has {human_bytes(free)} free; free some disk, lower training.offline_topk or --steps, or "
            "choose a live teacher placement"
        )


def _offline_pass(
    models: Any, plan: Plan, settings: RunSettings, data_stream: Any, *, rank: int, world: int, device: Any
) -> list[Any]:
    """Run the offline teacher pass of this rank (or find it done, for a resumed run), free the teachers and
    return one top-k reader per teacher (see `gkd.runtime.offline`)."""
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
    )
    # Every rank redoes the pass unless all are done: a ZeRO-3 teacher's forward is a collective.
    flag = torch.tensor([1 if done else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
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


def save_checkpoint(engine: Any, folder: Path, step: int, *, rank: int) -> None:
    """A DeepSpeed checkpoint tagged "step-N" (model, optimizer and ZeRO partitions of every rank, and the
    `latest` pointer), plus each rank's random-number state, which DeepSpeed does not keep."""
    import torch

    tag = f"step-{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / tag / f"rng-rank{rank}.pt")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Remove all but the `keep` newest `step-N` checkpoints (the newest is the one `latest` names)."""
    tags = sorted(
        (d for d in folder.iterdir() if d.is_dir() and d.name.startswith("step-")),
        key=lambda d: int(d.name.removeprefix("step-")),
    )
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(engine: Any, folder: Path, tag: str, *, rank: int) -> None:
    """Load what `save_checkpoint` wrote (after the models were built, which reseeds the generators)."""
    import torch

    path, _ = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise InputError(f"cannot load checkpoint {tag} from {folder}; it is incomplete or from another run")
    rng = torch.load(folder / tag / f"rng-rank{rank}.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def save_student(engines: Any, path: Path, *, rank: int, zero_stage: int) -> None:
    """The student in Hugging Face format, written by rank 0 (ZeRO-3 partitions gathered on every rank first:
    the gather is a collective)."""
    import contextlib

    import deepspeed

    student = engines.module.student
    params = list(student.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
            student.save_pretrained(str(path), state_dict=state)
            _usual_modes(path)


def copy_tokenizer(teacher: str, student_dir: Path) -> None:
    """Copy the tokenizer files of the teacher's folder (the tokenizer the run encoded its data with) next to
    the saved student, so that `AutoTokenizer.from_pretrained(OUT/student)` works; nothing for the built-in
    byte tokenizer."""
    from gkd.runtime.data import _TOKENIZER_FILES, _tokenizer_folder

    folder = _tokenizer_folder(teacher)
    if folder is None:
        return
    names = {*_TOKENIZER_FILES, *TOKENIZER_EXTRA_FILES}
    for name in sorted(names):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, student_dir / name)
    _usual_modes(student_dir)


# Tokenizer files besides those that mark a tokenizer folder (gkd.runtime.data._TOKENIZER_FILES).
TOKENIZER_EXTRA_FILES = (
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _usual_modes(folder: Path) -> None:
    """Give the files in `folder` the mode a plain `open` gives under this process's umask: safetensors writes
    through a private temporary file (mode 0600), which would leave the saved model readable by its owner
    only."""
    mask = _umask()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _umask() -> int:
    """This process's umask: read from /proc (Linux), else set and restored at once (which is racy with
    threads that create files, so only the fallback)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
