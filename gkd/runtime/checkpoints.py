"""Checkpoints of a run (OUT/checkpoints/step-N with gkd's `latest` pointer): written every `--save-every`
steps, read by `--resume`.

A checkpoint is complete or it is not used. Every rank writes its part (DeepSpeed's model, optimizer and
ZeRO partition files, and gkd's `rng-rankR.pt`: the rank's random-number state and data position) and
flushes it to disk; after a barrier, rank 0 writes `step-N/complete` (every file of the checkpoint with its
size) and only then moves `latest` to step-N, atomically (a temporary file, fsync, os.replace). DeepSpeed's
own `latest` is not written (save_latest=False): it would point at step-N before the other ranks' files
exist. A worker killed at any moment therefore leaves `latest` on a complete checkpoint (or no `latest`), and
`resumable` checks that anyway: a checkpoint whose marker or files are missing or cut short is passed over
for the newest complete one, with a note.

`check_loadable` reads every .pt file of the checkpoint a resume will load with torch's weights-only
unpickler (tensors, containers and an allow-list of the few DeepSpeed classes its checkpoints hold), in the
parent, before any worker starts: DeepSpeed itself loads them with `weights_only=False`, and a pickle can
run any code, so a checkpoint folder from elsewhere must never reach it unchecked.

Another world size: DeepSpeed's ZeRO files are partitioned by rank, so a resume with another number of
processes first converts the checkpoint into DeepSpeed's universal form (`to_universal`: one folder per
parameter with its fp32 weights and Adam moments, which any number of ranks loads; DeepSpeed's
`ds_to_universal`), written into a temporary folder and renamed to checkpoints/universal/step-N when whole;
the workers then load it with DeepSpeed's `load_universal` setting (`restore_checkpoint`). It is made anew
by each such resume (never reused: only files made from a checked checkpoint reach DeepSpeed's loader) and
pruned with its source.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gkd.errors import GkdError, InputError
from gkd.files import fsync_path, write_atomically

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete"  # the marker of a complete checkpoint, written last
UNIVERSAL = "universal"  # checkpoints/universal/step-N: step-N converted for any number of processes
_TAG = re.compile(r"step-([0-9]{1,12})")

# Fault injection for tests and benchmarks/fault_injection.py: "RANK:STEP:POINT" makes rank RANK leave with
# os._exit(9) (as a SIGKILL would) at POINT of the checkpoint of step STEP (see `maybe_die`).
FAULT_ENV = "GKD_TEST_KILL_AT"
FAULT_POINTS = (
    "start",  # before anything of step-N is written
    "deepspeed-file",  # after DeepSpeed wrote its first file of step-N (the others not yet)
    "deepspeed",  # after DeepSpeed's save (every rank's DeepSpeed files)
    "rng",  # after this rank's rng-rankR.pt
    "flushed",  # after the barrier that follows every rank's flush
    "marker",  # after `complete`, before `latest` moves
    "latest",  # after `latest` moved
    "student",  # the final save: before the student is written (STEP is the run's last step)
    "student-written",  # the final save: the student written, run.json not yet updated
    "generated",  # sequence_kd's teacher pass: after this rank's STEP-th chunk is written
)


class CheckpointWriteError(GkdError):
    """A checkpoint could not be written (the disk is full, a write failed): one line, exit code 1."""


def tag_of(step: int) -> str:
    return f"step-{step}"


def step_of(tag: str) -> int | None:
    """The step of a tag "step-N", or None for anything else."""
    match = _TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def maybe_die(point: str, step: int, rank: int) -> None:
    """The fault-injection hook (FAULT_ENV): leave as a SIGKILL would when it names this rank, step and point
    (those of `save_checkpoint` and of the final save)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{rank}:{step}:{point}":
        os._exit(9)


def _free_bytes(where: Path) -> int | None:
    for folder in (where, *where.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return None


@contextlib.contextmanager
def write_errors(what: str, where: Path) -> Iterator[None]:
    """One line for a failed write of `what` (in the folder `where`) instead of torch's or DeepSpeed's
    traceback: a full disk makes torch.save report "unexpected pos 128 vs 0", which names neither the disk
    nor the file."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointWriteError(f"no space left on the device while writing {what}") from None
        raise CheckpointWriteError(f"cannot write {what}: {err.strerror or err}") from None
    except RuntimeError as err:
        text = str(err)
        if "unexpected pos" in text or "PytorchStreamWriter failed" in text or "file write failed" in text:
            free = _free_bytes(where)
            room = f"{free / 2**20:.0f} MiB free there now" if free is not None else "free space unknown"
            raise CheckpointWriteError(
                f"cannot write {what}: the write failed part-way, most often because the disk is full "
                f"({room}); free some space first"
            ) from None
        raise


def save_checkpoint(
    engine: Any, folder: Path, step: int, *, rank: int, world: int, micro_batches: int
) -> None:
    """Checkpoint `step-N` of every rank (see the module docstring); a collective: every rank calls it.
    `micro_batches`: how many micro-batches of the data stream this rank has read (its data position)."""
    import torch
    import torch.distributed as dist

    tag = tag_of(step)
    where = folder / tag
    maybe_die("start", step, rank)
    if rank == 0 and (where / COMPLETE).exists():
        # A re-save of this step (a resume from an earlier checkpoint): the old files are overwritten, so the
        # marker goes first. DeepSpeed's save starts with a barrier: no rank writes before this is done.
        (where / COMPLETE).unlink()
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{rank}:{step}:deepspeed-file":
        save = engine.checkpoint_engine.save

        def save_then_die(state_dict: Any, path: str) -> None:
            save(state_dict, path)
            os.truncate(path, os.path.getsize(path) // 2)  # as if killed while the file was written
            os._exit(9)

        engine.checkpoint_engine.save = save_then_die
    with write_errors(f"checkpoint {where}", folder):
        engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step}, save_latest=False)
        maybe_die("deepspeed", step, rank)
        state = {"cpu": torch.get_rng_state(), "step": step, "micro_batches": micro_batches}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        torch.save(state, where / f"rng-rank{rank}.pt")
        maybe_die("rng", step, rank)
        # Each rank flushes its share of the files (any rank's: fsync works on any file), so that a crash
        # of the machine after `latest` moved cannot leave it on files still in the page cache.
        dist.barrier()
        files = sorted(p for p in where.iterdir() if p.is_file() and p.name != COMPLETE)
        for path in files[rank::world]:
            fsync_path(path)
        dist.barrier()
        maybe_die("flushed", step, rank)
        if rank == 0:
            sizes = {p.name: p.stat().st_size for p in files}
            write_atomically(where / COMPLETE, json.dumps({"step": step, "world": world, "files": sizes}))
            maybe_die("marker", step, rank)
            write_atomically(folder / LATEST, tag)
            maybe_die("latest", step, rank)
    dist.barrier()  # no rank goes on (and prunes, or saves the student) before `latest` moved


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Remove all but the `keep` newest complete checkpoints (the newest is the one `latest` names), and
    every incomplete one older than those."""
    tags = sorted(
        (d for d in folder.iterdir() if d.is_dir() and step_of(d.name) is not None),
        key=lambda d: step_of(d.name) or 0,
    )
    complete = [d for d in tags if (d / COMPLETE).is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = step_of(complete[-keep].name) or 0
    for old in tags:
        if (step_of(old.name) or 0) < oldest_kept:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(folder / UNIVERSAL / old.name, ignore_errors=True)


def incomplete_reason(where: Path, world: int | None = None) -> str:
    """Why the checkpoint folder `where` cannot be resumed from ("" when it is complete): its marker or one
    of the files the marker lists is missing or has another size, or (given `world`) it was made by another
    world size."""
    if not where.is_dir():
        return "it does not exist"
    try:
        marker = json.loads((where / COMPLETE).read_text())
        files = marker["files"]
        made_with = int(marker["world"])
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return "its writing was interrupted (no `complete` marker)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "its `complete` marker is damaged"
    if world is not None and made_with != world:
        return f"it was written by {made_with} processes, not {world}"
    for name, size in sorted(files.items()):
        path = where / str(name)
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} written"
    missing = [f"rng-rank{r}.pt" for r in range(made_with) if f"rng-rank{r}.pt" not in files]
    if missing:
        return f"{missing[0]} is missing"
    return ""


def resumable(folder: Path, world: int | None = None) -> tuple[str, str]:
    """(tag, note): the checkpoint a resume reads, `latest` when it is complete, else the complete one before
    it (the newest complete one when `latest` names none), with a one-line note saying why; InputError when
    there is none. `world`: only checkpoints made by that many processes (None: any; `written_by` says)."""
    latest = folder / LATEST
    try:
        pointed = latest.read_text().strip() if latest.exists() else ""
    except (OSError, UnicodeDecodeError):
        pointed = "?"
    before = step_of(pointed)
    if latest.exists() and before is None:
        shown = pointed if len(pointed) <= 40 else pointed[:37] + "..."
        problem = f"{latest} names no checkpoint ({shown!r}, not step-N)"
    elif latest.exists():
        reason = incomplete_reason(folder / pointed, world)
        if not reason:
            return pointed, ""
        problem = f"checkpoint {pointed} cannot be resumed from: {reason}"
    else:
        problem = f"{latest} is missing"
    steps = sorted(
        (n for d in (folder.iterdir() if folder.is_dir() else ()) if d.is_dir() and (n := step_of(d.name))),
        reverse=True,
    )
    for step in steps:
        if (before is None or step < before) and not incomplete_reason(folder / tag_of(step), world):
            newest = "the newest complete checkpoint" + ("" if before is None else " before it")
            return tag_of(step), f"{problem}; resuming from {tag_of(step)}, {newest}"
    before_it = "" if before is None else " before it"
    raise InputError(
        f"{problem}, and {folder} holds no complete checkpoint{before_it}; start the run again from its plan "
        f"into a new folder: `gkd run {folder.parent / 'plan.json'} --out NEW_FOLDER`"
    )


def safe_globals() -> list[Any]:
    """The classes DeepSpeed's checkpoints hold besides tensors and containers (found by saving checkpoints
    of every ZeRO stage): loss scalers, the ZeRO stage enum, the fragment addresses of ZeRO partitions."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_loadable(where: Path) -> None:
    """Read every .pt file in `where` with the weights-only unpickler; InputError naming the first file that
    holds anything else (a pickle that would run code when DeepSpeed loads it), before any worker starts."""
    import pickle
    import zipfile

    import torch

    allowed = safe_globals()
    for path in sorted(where.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                # A memory map only for torch's zip format: on a legacy pickle torch's refusal of the map
                # would be the message, and not the weights-only unpickler's, which names what is inside.
                torch.load(path, weights_only=True, map_location="cpu", mmap=zipfile.is_zipfile(path))
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as err:
            raise InputError(
                f"{path} is not a checkpoint file gkd loads: it holds more than tensors and DeepSpeed's "
                f"checkpoint data ({refusal(err)}); loading it could run code, so the resume stops. Resume "
                "only from checkpoints gkd wrote"
            ) from None


# The paragraphs of torch's weights-only refusal that are the same for every file (one advises
# weights_only=False, which gkd never does); the line between them names what the file holds.
_GENERIC = ("Weights only load failed", "Please file an issue", "Check the documentation")


def refusal(err: BaseException) -> str:
    """What torch's weights-only unpickler refused in a file (e.g. "Trying to load unsupported GLOBAL
    posix.system ..."), cut to 120 characters; the error's first line for any other error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_GENERIC)]
    text = (specific or lines or [type(err).__name__])[0]
    return text if len(text) <= 120 else text[:117] + "..."


def written_by(where: Path) -> int:
    """How many processes wrote the complete checkpoint `where` (its marker says)."""
    return int(json.loads((where / COMPLETE).read_text())["world"])


def partitioned(where: Path) -> bool:
    """Whether the checkpoint `where` holds optimizer states partitioned by rank (ZeRO-1, 2 or 3, and
    DeepSpeed's bf16 optimizer), which only DeepSpeed's universal form carries to another world size; a ZeRO-0
    checkpoint holds the whole state in mp_rank_00_model_states.pt."""
    return any(where.glob("*optim_states.pt"))


def to_universal(folder: Path, tag: str) -> Path:
    """Checkpoint `tag` of `folder` in DeepSpeed's universal form, in folder/universal/tag (see the module
    docstring). Only checkpoints `check_loadable` passed may come here (the conversion unpickles them).
    InputError, nothing left behind, when DeepSpeed cannot convert it; CheckpointWriteError when the disk
    cannot take it."""
    target = folder / UNIVERSAL / tag
    # Made anew each time, never reused: DeepSpeed loads it with pickle's full power, and only files made
    # here from a checked checkpoint may reach it. Folders of conversions that were killed go too (the
    # caller holds OUT's lock: no other conversion runs).
    if (folder / UNIVERSAL).is_dir():
        for old in (folder / UNIVERSAL).iterdir():
            if old.name == tag or old.name.startswith(f".{tag}.partial-"):
                shutil.rmtree(old, ignore_errors=True)
    # A folder of its own: DeepSpeed also writes a `latest_universal` pointer beside its output folder.
    work = folder / UNIVERSAL / f".{tag}.partial-{os.getpid()}"
    try:
        with write_errors(f"the universal checkpoint {target}", folder):
            work.mkdir(parents=True)
            _convert(folder / tag, work / tag)
            converted = work / tag
            files = sorted(p for p in converted.rglob("*") if p.is_file())
            for path in files:
                fsync_path(path)
            sizes = {str(p.relative_to(converted)): p.stat().st_size for p in files}
            step = step_of(tag)
            write_atomically(
                converted / COMPLETE,
                json.dumps({"step": step, "from_world": written_by(folder / tag), "files": sizes}),
            )
            converted.rename(target)
            fsync_path(target.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            (folder / UNIVERSAL).rmdir()  # only when empty: a conversion that failed leaves nothing
    return target


def _convert(source: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint folder, in a process of its own: its torch ops would
    start OpenMP's threads in this one, which the forked workers could then hang on; and its printing stays
    out of the run's output."""
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(out),
        "--num_extract_workers",  # 1: no process pool
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",  # gkd's checkpoints do not carry DeepSpeed's universal_checkpoint_info
    ]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False)
    if done.returncode == 0:
        return
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit code {done.returncode}"  # the exception, last in its traceback
    if "No space left on device" in done.stderr or "Disk quota exceeded" in done.stderr:
        raise CheckpointWriteError(f"no space left on the device while writing {out}")
    raise InputError(
        f"checkpoint {source} cannot be converted for another number of processes ({detail[:160]}); resume "
        f"it with the number of processes that wrote it ({written_by(source)})"
    )


def restore_checkpoint(engine: Any, folder: Path, tag: str, *, rank: int, universal: bool = False) -> None:
    """Load what `save_checkpoint` wrote (after the models were built, which reseeds the generators); from
    folder/universal/tag where `universal` (a resume on another world size: the engine was made with
    DeepSpeed's `load_universal` setting). A rank the checkpoint has no random-number state for (more ranks
    than wrote it) takes rank 0's."""
    import torch

    where = folder / UNIVERSAL if universal else folder
    path, _ = engine.load_checkpoint(str(where), tag=tag)
    if path is None:
        raise InputError(f"cannot load checkpoint {tag} from {folder}; it is incomplete or from another run")
    own = folder / tag / f"rng-rank{rank}.pt"
    state = torch.load(own if own.is_file() else folder / tag / "rng-rank0.pt", weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
