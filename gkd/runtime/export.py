"""`gkd export RUN_OR_CHECKPOINT --out DIR`: a checkpoint that `gkd run --save-every` wrote, as a Hugging Face
folder that `from_pretrained` loads.

RUN_OR_CHECKPOINT is a run folder (its newest complete checkpoint: the one `checkpoints/latest` names, else
the newest with a complete marker), its `checkpoints` folder (the same) or one of its `checkpoints/step-N`
folders. The run's plan.json says which student it trained (the model reference in its config) and in which
dtype.

Design choices:
- The weights come from DeepSpeed's own conversion (`deepspeed.utils.zero_to_fp32`), which merges the ZeRO
  partitions of every rank (stages 1, 2 and 3) into the fp32 master weights; a ZeRO-0 checkpoint holds the
  whole module in its model-states file and is read from there. The entries of the student (`student.` in
  the engine's module) are kept, the loss extras dropped, and each floating tensor is cast to the training
  dtype, which is how the run rounds its master weights into the weights it trains with: the export of the
  checkpoint of step N equals the student a run stopped at step N saves, bit for bit (tested).
- Memory: for ZeRO-3 the converter reads one parameter at a time from the memory-mapped partitions; for ZeRO
  1 and 2 it concatenates the partitions, so the export holds the student in fp32 (4 bytes a parameter) on
  the host. The writer is the final save's (`gkd.runtime.save.HFWriter`): same files, shards and names.
- Safety: every file the converter loads is read with torch's weights-only unpickler and an allow-list of
  the few DeepSpeed classes its checkpoints hold (`gkd.runtime.checkpoints.safe_globals`); DeepSpeed itself
  would load them with `weights_only=False`, where a pickle can run any code. Anything else is refused.
- Nothing half-written: the folder is written next to DIR (`.DIR.partial-PID-RANDOM`: a name of its own, so
  that a folder of the user's called `DIR.partial` is never taken for a stale one and removed) and renamed to
  DIR once complete (such folders left by exports that were killed are removed by the next export to DIR);
  DIR must not exist or be empty. Bad input (not a checkpoint, an incomplete or damaged
  one, a run without checkpoints) is an InputError: one line, exit code 2; a write that fails (a full disk)
  is one line, exit code 1, and leaves nothing either.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gkd.errors import GkdError, InputError
from gkd.files import process_alive
from gkd.runtime.checkpoints import (
    CHECKPOINTS,
    COMPLETE,
    LATEST,
    incomplete_reason,
    refusal,
    safe_globals,
    step_of,
)

STUDENT = "student."  # the student's entries in the engine's module (DistillModule.student)


class ExportWriteError(GkdError):
    """The folder could not be written (a full disk, a failed write): one line, exit code 1."""


def run_export(source: str, out: str, *, echo: Callable[[str], None] = print) -> Path:
    """Write the student of the checkpoint `source` (see the module docstring) to `out`; returns `out`."""
    where, run = locate_checkpoint(Path(source).expanduser(), echo=echo)
    target = _usable_out(Path(out).expanduser())
    student_ref, teacher_ref, dtype, attention, trusted = _read_plan(run)

    import torch

    from gkd.models import trust_remote_code
    from gkd.planner.specs import load_spec

    for folder in trusted:  # the custom model code the run's config allowed (trust_remote_code: true)
        trust_remote_code(folder)
    from gkd.runtime.loading import build_skeleton
    from gkd.runtime.save import HFWriter, saved_tensors

    skeleton = build_skeleton(load_spec(student_ref), attention=attention, dtype=dtype)
    names = saved_tensors(skeleton)
    state = read_student_state(where)
    for name, expected in names.items():
        found = state.get(name)
        if found is None or tuple(found.shape) != tuple(expected.shape):
            what = "holds no" if found is None else f"holds a {list(found.shape)} tensor for"
            raise InputError(
                f"checkpoint {where} {what} {name} of the student {student_ref} "
                f"({list(expected.shape)}): it is not a checkpoint of this run's student"
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        with HFWriter(target, skeleton, dtype=dtype, tokenizer_from=teacher_ref, partial=partial) as writer:
            for name in names:
                tensor = state[name].contiguous()
                writer.add(name, tensor.to(dtype) if torch.is_floating_point(tensor) else tensor)
    except OSError as err:  # the writer has removed what it wrote
        raise ExportWriteError(f"cannot write {target}: {err.strerror or err}") from None
    echo(f"Exported {where.name} of {run} to {target}")
    return target


def _remove_stale_partials(target: Path) -> None:
    """Remove the `.DIR.partial-PID-RANDOM` folders that exports killed before their clean-up (SIGKILL,
    SIGTERM) left beside DIR: those whose process is gone. A live export's folder is left alone."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        pid = stale.name.removeprefix(f".{target.name}.partial-").split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def locate_checkpoint(path: Path, *, echo: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(checkpoint folder step-N, run folder) for a run folder or one of its checkpoint folders."""
    usage = "give a run folder (`gkd run --out`) or one of its checkpoints/step-N folders"
    if not path.exists():
        raise InputError(f"{path} does not exist; {usage}")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a checkpoint; {usage}")
    if step_of(path.name) is not None and path.parent.name == CHECKPOINTS:
        reason = _incomplete(path)
        if reason:
            raise InputError(f"checkpoint {path} cannot be exported: {reason}; export another checkpoint")
        return path, path.parent.parent
    if path.name == CHECKPOINTS and (path.parent / "plan.json").is_file():  # the run's checkpoints folder
        return _newest_complete(path, echo), path.parent
    folder = path / CHECKPOINTS
    if not folder.is_dir():
        if (path / "plan.json").is_file():
            raise InputError(
                f"the run in {path} has no checkpoints (it ran without --save-every); its final student, "
                f"when it finished, is in {path / 'student'}"
            )
        raise InputError(f"{path} is neither a run folder nor a checkpoint; {usage}")
    return _newest_complete(folder, echo), path


def _incomplete(where: Path) -> str:
    """Why `where` is not a complete checkpoint ("" when it is), by the `complete` marker its writer left."""
    try:
        world = int(json.loads((where / COMPLETE).read_text())["world"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        world = 0  # incomplete_reason names what is wrong with the marker
    return incomplete_reason(where, world)


def _newest_complete(folder: Path, echo: Callable[[str], None]) -> Path:
    """The checkpoint `latest` names when it is complete, else the newest complete one (with a note)."""
    try:
        pointed = (folder / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        pointed = ""
    if step_of(pointed) is not None and not _incomplete(folder / pointed):
        return folder / pointed
    tags = sorted(
        (d for d in folder.iterdir() if d.is_dir() and step_of(d.name) is not None),
        key=lambda d: step_of(d.name) or 0,
        reverse=True,
    )
    for where in tags:
        if not _incomplete(where):
            echo(f"Note: {folder / LATEST} names no complete checkpoint; exporting {where.name}, the newest")
            return where
    raise InputError(f"{folder} holds no complete checkpoint; run with --save-every to write one")


def _usable_out(target: Path) -> Path:
    if target.exists() and not target.is_dir():
        raise InputError(f"--out {target} is a file; name a new folder")
    if target.is_dir() and any(target.iterdir()):
        raise InputError(f"--out {target} exists and is not empty; name a new or empty folder")
    return target


def _read_plan(run: Path) -> tuple[str, str, Any, str, list[str]]:
    """(student reference, first teacher reference, training dtype, attention implementation, the folders
    whose custom model code the run's config trusted) from the run's plan.json."""
    import torch

    path = run / "plan.json"
    try:
        data = json.loads(path.read_text())
        config = data["inputs"]["config"]
        student, teacher = str(config["student"]), str(config["teachers"][0])
        dtype_name = config.get("training", {}).get("dtype", "bfloat16")
        attention = str(data["strategy"].get("attention", "sdpa"))
        trusted = [str(folder) for folder in config.get("trust_remote_code") or []]
    except FileNotFoundError:
        raise InputError(
            f"{run} has no plan.json, which says which student the checkpoint holds; export a checkpoint "
            "inside its run folder"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise InputError(f"{path} is damaged: it names no student and dtype") from None
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype_name not in dtypes:
        raise InputError(
            f"{path} names the training dtype {str(dtype_name)[:40]!r}, which is not one gkd trains in"
        )
    return student, teacher, dtypes[dtype_name], attention, trusted


def read_student_state(where: Path) -> dict[str, Any]:
    """{name: tensor or DeepSpeed's lazy tensor (`.contiguous()` gives it)} of the student in the checkpoint
    folder `where`, in fp32 from the ZeRO partitions (or as stored, for ZeRO-0)."""
    import torch

    # The conversion runs on the CPU wherever it runs; naming the accelerator spares DeepSpeed its detection.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        with _weights_only(), _quiet():
            if not any(where.glob("*_optim_states.pt")):  # ZeRO-0: no partitions, the module itself
                files = sorted(where.glob("*model_states.pt"))
                if not files:
                    raise InputError(f"{where} holds no DeepSpeed model states; it is not a checkpoint")
                state = torch.load(files[0], map_location="cpu", mmap=True)["module"]
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(where.parent), tag=where.name, lazy_mode=True
                )
    except InputError:
        raise
    except Exception as err:  # DeepSpeed's converter, torch and zipfile raise many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"cannot read checkpoint {where}: {first[:160]}; it is damaged: export another checkpoint"
        ) from None
    return {name.removeprefix(STUDENT): t for name, t in state.items() if name.startswith(STUDENT)}


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Every `torch.load` inside reads with the weights-only unpickler and DeepSpeed's allow-list; a file
    holding anything else is an InputError naming it."""
    import pickle
    from unittest import mock

    import torch

    real = torch.load
    allowed = safe_globals()

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise InputError(
                f"{f} holds more than tensors and DeepSpeed's checkpoint data ({refusal(err)}); loading it "
                "could run code, so gkd does not: export only checkpoints gkd wrote"
            ) from None

    with mock.patch.object(torch, "load", load):
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DeepSpeed's converter prints its progress (and tqdm bars); the command prints its own line."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
