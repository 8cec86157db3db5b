"""The final student in Hugging Face format (OUT/student), with the teacher's tokenizer files beside it."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any


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
