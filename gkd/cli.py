"""The `gkd` command line: plan, run, export, eval, check, inspect, methods.

Each command is a thin wrapper: it parses flags, calls the library, and prints. Errors the user can fix
(`gkd.errors.InputError`) become one line on stderr and exit code 2; a job that does not fit exits with 1.
New knobs belong in the config file, not in new flags.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from gkd.errors import InputError, shown


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn InputError (and unreadable files) into one line on stderr and exit code 2, and Ctrl-C into one
    line and exit code 130."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            click.echo(f"gkd: error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            # Ctrl-C: one line and the shell's status for SIGINT (click would print a blank line, "Aborted!"
            # and exit with 1); `gkd run` says more itself (gkd.runtime.signals.stop).
            click.echo("gkd: interrupted", err=True)
            sys.exit(128 + signal.SIGINT)
        except OSError as err:
            # A path given on the command line that no file system takes: bad input, whichever check met it.
            if err.errno != errno.ENAMETOOLONG:
                raise
            click.echo(f"gkd: error: {shown(err.filename)} is too long a path; give a shorter one", err=True)
            sys.exit(2)

    return wrapper


class _OneLineErrors(click.Group):
    """A click group whose usage errors (bad flags, missing arguments) are one line on stderr, exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.exceptions.NoArgsIsHelpError as err:
            # `gkd` alone asks for the overview, which is help, not an error.
            click.echo(err.ctx.get_help() if err.ctx else self.get_help(click.Context(self)))
            sys.exit(0)
        except click.Abort:
            click.echo("gkd: aborted", err=True)
            sys.exit(1)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx else "gkd"
            click.echo(f"gkd: error: {err.format_message()} (see `{where} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"gkd: error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gkd")
def main() -> None:
    """gkd: knowledge distillation for large language models, planned to fit your GPUs."""


@main.command()
@click.argument("model")
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    help="Sequence length (default: 2048, or the model's maximum positions when it has fewer).",
)
@click.option(
    "--micro-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batch size."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let MODEL's own code (auto_map in its config.json) run: its configuration and modeling files.",
)
@_user_errors
def inspect(
    model: str, seq_len: int | None, micro_batch: int, as_json: bool, trust_remote_code: bool
) -> None:
    """Describe MODEL (preset, config.json, checkpoint folder or hub id): parameters, activations, taps."""
    from gkd.planner.inspect import run_inspect

    if trust_remote_code:
        _trust(model)
    run_inspect(model, seq_len=seq_len, micro_batch=micro_batch, as_json=as_json)


def _trust(ref: str) -> None:
    """Allow the custom code (auto_map) of model `ref` to run in this process, as a config's per-model
    `trust_remote_code: true` does for gkd plan and gkd run: the folder it is read from (a hub id's snapshot
    folder in the local cache, a config.json's folder) is trusted, no other."""
    from pathlib import Path

    from gkd.hub import is_hub_id, snapshot_folder
    from gkd.models import trust_remote_code

    path = Path(ref).expanduser()
    if not path.exists() and is_hub_id(ref):
        path = snapshot_folder(ref)
    trust_remote_code(path.parent if path.is_file() else path)


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_user_errors
def methods(name: str | None, as_json: bool) -> None:
    """List the distillation methods, or show method NAME in detail with an example config."""
    from gkd.methods.report import run_methods

    run_methods(name, as_json=as_json)


@main.command()
@click.argument("config", required=False)
# The numeric flags are read as text and converted by `gkd.config.apply_flags`, so a bad value gets the same
# message as in a config file (e.g. "hardware.gpus must be at least 1"); the metavars say what they take.
@click.option(
    "--teacher",
    metavar="MODEL[,MODEL...]",
    help="Teacher model(s): preset name, config.json or checkpoint folder; comma-separated.",
)
@click.option(
    "--student", metavar="MODEL", help="Student model: preset name, config.json or checkpoint folder."
)
@click.option(
    "--methods",
    "methods_",
    metavar="NAME[,NAME...]",
    help="Distillation methods, comma-separated (e.g. kd,minilmv2).",
)
@click.option(
    "--gpus",
    metavar="N",
    help="Number of GPUs, on nodes of hardware.gpus_per_node (8 by default): --gpus 16 plans 2 nodes.",
)
@click.option("--gpu-memory", metavar="SIZE", help="Memory per GPU, e.g. 40GiB.")
@click.option("--host-memory", metavar="SIZE", help="Host memory per node, e.g. 1TiB.")
@click.option("--seq-len", metavar="N", help="Sequence length.")
@click.option("--global-batch", metavar="N", help="Global batch size (sequences per step).")
@click.option(
    "--micro-batch", metavar="N|N,N,...|auto", help="Micro-batch size per GPU, a list (1,2,4) or auto."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the plan JSON to this file.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Write predicted memory over the schedule as .png, .svg or .pdf.",
)
@click.option("--explain", is_flag=True, help="Print the resolved config as JSON and each planner pass.")
@_user_errors
def plan(
    config: str | None,
    methods_: str | None,
    as_json: bool,
    output: str | None,
    plot: str | None,
    explain: bool,
    **flags: Any,
) -> None:
    """Plan a distillation job (CONFIG: YAML or JSON; flags override it): does it fit, how, and how fast.

    With no CONFIG and no flags, plans the headline job (configs/default.yaml).
    Exit code 1 when it does not fit.
    """
    from gkd.planner.cli import run_plan

    sys.exit(
        run_plan(
            config, methods=methods_, as_json=as_json, output=output, plot=plot, explain=explain, **flags
        )
    )


@main.command()
@click.argument("configs", nargs=-1)
@click.option(
    "--baseline",
    metavar="FILE",
    default="gkd-baseline.json",
    show_default=True,
    help="The baseline file: what each config's plan predicted.",
)
@click.option(
    "--update",
    is_flag=True,
    help="Plan the configs and write their records (all recorded ones when none is named).",
)
@click.option(
    "--tolerance",
    metavar="N%|FRACTION",
    default="1%",
    show_default=True,
    help="Memory growth allowed before it counts as a regression (e.g. 1% or 0.01).",
)
@click.option(
    "--measure",
    is_flag=True,
    help="Also run each config for a few steps (small configs only) and gate the memory it measured.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Steps each config runs with --measure.",
)
@_user_errors
def check(
    configs: tuple[str, ...], baseline: str, update: bool, tolerance: str, measure: bool, steps: int
) -> None:
    """Memory-regression gate: plan the configs recorded in the baseline again and compare.

    Exit code 1 when a job no longer fits or its peak or host memory grew beyond the tolerance; with
    --measure also when a run's measured device peak exceeds its prediction, or the recorded measurement, by
    more than the tolerance. CONFIG is a config file, or `default` for the headline job.
    """
    from gkd.planner.check import run_check

    sys.exit(
        run_check(
            baseline, configs, update=update, tolerance=tolerance, measure_steps=steps if measure else 0
        )
    )


@main.command()
@click.argument("target", metavar="[CONFIG|PLAN]", required=False)
@click.option(
    "--data",
    type=click.Path(),
    help="Training data: a .txt/.jsonl/.json/.parquet/.csv/.arrow file, a dataset folder or a cached hub "
    "dataset id; text, chat or prompt/completion records (see the config's data section; default: the "
    "built-in corpus).",
)
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: training.steps).")
@click.option(
    "--out",
    type=click.Path(),
    help="Output folder (default: runs/run-<time>); must not exist, except with --resume.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Worker processes, per node with --nnodes (default: one per CUDA device, else 2 on the CPU).",
)
@click.option(
    "--seed",
    # torch.manual_seed takes a 64-bit seed; the runtime also seeds with seed + 1000.
    type=click.IntRange(min=0, max=2**63 - 1),
    help="Seed of weights and data order, 0 to 2**63-1 (default 0; a resumed run keeps its own).",
)
@click.option(
    "--save-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Write a DeepSpeed checkpoint every N steps (0: none).",
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Keep only the N newest checkpoints (0: all).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest complete checkpoint.")
@click.option(
    "--discard-partial",
    is_flag=True,
    help="Remove the checkpoints an interrupted run of --out left in .OUT.partial-* and start over.",
)
@click.option(
    "--eval-data",
    type=click.Path(),
    help="Held-out data (the forms of --data): the student's own loss on it, at the end.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also evaluate every N steps (needs --eval-data).",
)
@click.option(
    "--eval-batches",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Micro-batches per process in one evaluation.",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    help="Nodes of a multi-node run, each starting this command with its --node-rank (docs/run.md).",
)
@click.option(
    "--node-rank", type=click.IntRange(min=0), help="This node's rank, 0 to nnodes - 1 (0: the master)."
)
@click.option("--master-addr", metavar="HOST", help="Node 0's address, reachable from every node.")
@click.option(
    "--master-port",
    type=click.IntRange(min=1, max=65535),
    help="The port node 0 listens on for the rendezvous (default 29500).",
)
@click.option(
    "--rendezvous-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the ranks of a multi-node or launched run wait for each other to join.",
)
@_user_errors
def run(
    target: str | None,
    data: str | None,
    steps: int | None,
    out: str | None,
    processes: int | None,
    seed: int | None,
    save_every: int,
    keep_last: int,
    resume: bool,
    discard_partial: bool,
    eval_data: str | None,
    eval_every: int,
    eval_batches: int,
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    rendezvous_timeout: float,
) -> None:
    """Train: run a plan (or plan CONFIG for this machine first) on DeepSpeed and save the student.

    Exit code 1 when the job does not fit or a worker fails; 2 for bad input; 130 on Ctrl-C and 143 on
    SIGTERM (a run with a checkpoint is kept, to --resume). Under torchrun, the deepspeed launcher or srun
    (RANK and WORLD_SIZE, or SLURM_PROCID, set) each process is one rank of the job.
    """
    from gkd.errors import GkdError
    from gkd.runtime.executor import run_job

    try:
        run_job(
            target,
            data=data,
            steps=steps,
            out=out,
            processes=processes,
            seed=seed,
            resume=resume,
            discard_partial=discard_partial,
            save_every=save_every,
            keep_last=keep_last,
            eval_data=eval_data,
            eval_every=eval_every,
            eval_batches=eval_batches,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            rendezvous_timeout=rendezvous_timeout,
        )
    except InputError:
        raise
    except GkdError as err:  # does not fit, or a worker failed
        click.echo(f"gkd: error: {err}", err=True)
        sys.exit(1)


@main.command()
@click.argument("source", metavar="RUN_OR_CHECKPOINT")
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Folder for the Hugging Face student; must not exist, or be empty.",
)
@_user_errors
def export(source: str, out: str) -> None:
    """Turn a `gkd run --save-every` checkpoint into a Hugging Face folder that `from_pretrained` loads.

    RUN_OR_CHECKPOINT: a run folder (its newest complete checkpoint) or one of its checkpoints/step-N folders.
    Exit code 2 for anything that is not a complete checkpoint of a gkd run; 1 when writing fails.
    """
    from gkd.errors import GkdError
    from gkd.runtime.export import run_export

    try:
        run_export(source, out, echo=click.echo)
    except InputError:
        raise
    except GkdError as err:  # the folder could not be written
        click.echo(f"gkd: error: {err}", err=True)
        sys.exit(1)


@main.command(name="eval")
@click.argument("student")
@click.option("--data", required=True, help="Held-out data, in any form `gkd run --data` reads.")
@click.option("--teacher", help="A teacher with the student's vocabulary: its loss and the top-1 agreement.")
@click.option(
    "--seq-len", type=click.IntRange(min=1), help="Row length (default: the run's, else 512 or less)."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Rows per micro-batch (default: the run's, else 8)."
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="Seed of the row order and MLM masking (default: the run's, else 0).",
)
@click.option("--max-batches", type=click.IntRange(min=1), help="Evaluate at most this many micro-batches.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--trust-remote-code",
    "trusted",
    type=click.Choice(["student", "teacher"]),
    multiple=True,
    help="Let that model's own code (auto_map in its config.json) run; repeat for both.",
)
@_user_errors
def eval_(
    student: str,
    data: str,
    teacher: str | None,
    seq_len: int | None,
    batch_size: int | None,
    seed: int | None,
    max_batches: int | None,
    as_json: bool,
    trusted: tuple[str, ...],
) -> None:
    """The held-out loss and perplexity of STUDENT on --data (and a teacher's, with their top-1 agreement).

    STUDENT: a Hugging Face folder (a run's OUT/student: the run's settings are the defaults), a hub id in the
    local cache, a preset or a config.json (these two: seeded random weights). See docs/eval.md.
    """
    from gkd.runtime.evaluate import run_eval

    if "teacher" in trusted and teacher is None:
        raise InputError("--trust-remote-code teacher needs --teacher")
    for role in dict.fromkeys(trusted):
        _trust(student if role == "student" else str(teacher))
    run_eval(
        student,
        data,
        teacher=teacher,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        max_batches=max_batches,
        as_json=as_json,
    )


def entry() -> None:
    """The console entry point: run `main`, flush, and leave without the interpreter's teardown.

    Tearing down torch, transformers and sympy (clearing modules, collecting their objects) takes about
    1.5 s on a 2-core machine after the command has finished; nothing of gkd's needs it (files are closed
    where they are written), so the process exits directly once stdout and stderr are flushed."""
    code = 0
    try:
        main()
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away (`gkd inspect ... | head`) leaves nothing to deliver.
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
