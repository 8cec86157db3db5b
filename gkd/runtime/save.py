"""The final student in Hugging Face format (OUT/student), with the teacher's tokenizer files beside it,
and the writer that `gkd export` shares.

Design choices:
- Within the plan: the save never holds the whole student at once. Under ZeRO-3 each parameter is gathered
  on its own (`GatheredParameters` on that one parameter: every rank holds it for a moment, as in a
  forward), rank 0 copies it to host memory and the others drop it; otherwise rank 0 copies its own
  parameters one by one.
  The host copies go into the current safetensors shard, written (and fsynced) once the next tensor would
  take it past `SAVE_SHARD_BYTES`, the size the planner counts (a tensor larger than that is a shard of its
  own, as in `save_pretrained`). So a save holds, beyond the training state, one gathered parameter per rank
  and, on rank 0's host, at most one shard's worth of copies (plus that tensor, when one alone is larger).
- The files are what `save_pretrained` writes: the same tensor names (tied weights saved once, under the name
  transformers keeps: `saved_tensors`), `model.safetensors` or `model-0000i-of-0000n.safetensors` shards with
  `model.safetensors.index.json`, `config.json` with the dtype and architecture, and `generation_config.json`
  for models that generate. None of the supported families renames weights on saving (transformers' weight
  conversions), which is what lets the names be taken from the module as they are.
- Atomic: everything is written into `<path>.partial` (a stale one from a killed save is removed first),
  each file fsynced, then the folder is renamed to `<path>`: a kill at any moment leaves either no `<path>`
  or a complete one (a `<path>` already there, from an earlier save, is replaced only once the new one is
  complete). The tokenizer files go in before the rename.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from gkd.files import fsync_path
from gkd.planner.memory import SAVE_SHARD_BYTES

INDEX = "model.safetensors.index.json"


def save_student(
    engines: Any, path: Path, *, rank: int, zero_stage: int, tokenizer_from: str | None = None
) -> None:
    """The student in Hugging Face format at `path`, written by rank 0 (see the module docstring); a
    collective under ZeRO-3 (every rank calls it). `tokenizer_from`: the model reference whose tokenizer
    files are copied in before the folder appears (`copy_tokenizer`)."""
    import deepspeed

    student = engines.module.student
    tensors = saved_tensors(student)
    with contextlib.ExitStack() as stack:
        writer = None
        if rank == 0:
            writer = stack.enter_context(HFWriter(path, student, tokenizer_from=tokenizer_from))
        for name, tensor in tensors.items():
            if zero_stage == 3 and hasattr(tensor, "ds_id"):
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    if writer is not None:
                        writer.add(name, tensor.data.detach().to("cpu", copy=True))
            elif writer is not None:
                # A copy even on the CPU: under ZeRO-1/2 the parameters are views of DeepSpeed's flat buffers,
                # and safetensors refuses tensors that share memory.
                writer.add(name, tensor.detach().to("cpu", copy=True))


def saved_tensors(model: Any) -> dict[str, Any]:
    """{name: parameter or buffer} of what `model.save_pretrained` writes, in its order: the state dict's
    entries (persistent buffers included) with each tied weight once, under the name transformers keeps (its
    own rule, `remove_tied_weights_from_state_dict`, applied to stand-ins that share storage exactly where
    the model's tensors are one and the same object)."""
    import torch
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict(keep_vars=True)
    stand_ins: dict[int, Any] = {}
    fake = {name: stand_ins.setdefault(id(t), torch.empty(1)) for name, t in state.items()}
    kept = remove_tied_weights_from_state_dict(fake, model)
    return {name: t for name, t in state.items() if name in kept}


class HFWriter:
    """Writes a Hugging Face model folder at `path` atomically (see the module docstring): use as a context
    manager, `add` each tensor of `saved_tensors(model)` in order (host tensors); on leaving without an error
    the last shard, the index, the configs and the tokenizer files are written and the folder renamed into
    place; on an error the partial folder is removed. `model` gives the config and the generation config (a
    model on the meta device will do); `dtype`: the dtype config.json names (default: the model's);
    `partial`: the folder written before the rename (default `<path>.partial`, which is removed first when a
    killed save left it: give a name of this writer's own where `<path>.partial` may be someone else's)."""

    def __init__(
        self,
        path: Path,
        model: Any,
        *,
        dtype: Any = None,
        tokenizer_from: str | None = None,
        shard_bytes: int | None = None,
        partial: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial = partial if partial is not None else self.path.with_name(self.path.name + ".partial")
        self.model = model
        self.dtype = dtype if dtype is not None else model.dtype
        self.tokenizer_from = tokenizer_from
        self.shard_bytes = SAVE_SHARD_BYTES if shard_bytes is None else shard_bytes
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._parameters = 0
        self._parameter_ids = {id(p) for p in model.parameters()}
        self._state = model.state_dict(keep_vars=True)

    def __enter__(self) -> HFWriter:
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self

    def add(self, name: str, tensor: Any) -> None:
        """One tensor (on the host) under `name`. As `save_pretrained` shards: a tensor larger than the shard
        size is a shard of its own, written at once; otherwise the pending shard is written first when this
        tensor would take it past the shard size."""
        nbytes = tensor.numel() * tensor.element_size()
        self._total_bytes += nbytes
        if id(self._state.get(name)) in self._parameter_ids:
            self._parameters += tensor.numel()
        if nbytes > self.shard_bytes:
            self._write({name: tensor.contiguous()})
            return
        if self._pending and self._pending_bytes + nbytes > self.shard_bytes:
            self._write(self._pending)
            self._pending, self._pending_bytes = {}, 0
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes

    def _write(self, tensors: dict[str, Any]) -> None:
        shard = self.partial / f"shard-{len(self._shards) + 1:05d}.safetensors"
        _save_file(tensors, shard)
        fsync_path(shard)
        self._shards.append((shard, list(tensors)))

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise

    def _finish(self) -> None:
        if self._pending or not self._shards:
            self._write(self._pending)
            self._pending, self._pending_bytes = {}, 0
        count = len(self._shards)
        if count == 1:
            os.replace(self._shards[0][0], self.partial / "model.safetensors")
        else:
            weight_map = {}
            for i, (shard, names) in enumerate(self._shards, start=1):
                final = f"model-{i:05d}-of-{count:05d}.safetensors"
                os.replace(shard, self.partial / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {
                "metadata": {"total_parameters": self._parameters, "total_size": self._total_bytes},
                "weight_map": weight_map,
            }
            _write_text(self.partial / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = copy.deepcopy(self.model.config)
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(str(self.partial))
        if getattr(type(self.model), "_auto_class", None):  # custom code (trust_remote_code): its files too
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(self.model, str(self.partial))
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(str(self.partial))
        if self.tokenizer_from is not None:
            copy_tokenizer(self.tokenizer_from, self.partial)
        _usual_modes(self.partial)
        for file in self.partial.iterdir():
            fsync_path(file)
        fsync_path(self.partial)
        publish(self.partial, self.path)


def _save_file(tensors: dict[str, Any], path: Path) -> None:
    """safetensors' save_file, with a failed write (a full disk) raised as the OSError it is: safetensors
    raises its own SafetensorError with the OS's error only in its text ("... (os error 28)"), which callers
    that handle failed writes as OSErrors (gkd export: one line, exit 1) would let through as a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        found = re.search(r"\(os error ([0-9]+)\)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def publish(partial: Path, path: Path) -> None:
    """Rename the complete folder `partial` to `path`. An empty folder at `path` is replaced; a folder with
    files (an earlier save) is moved aside to `<path>.old` first and removed once the new one is in place."""
    old = None
    if path.is_dir() and any(path.iterdir()):
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(partial, path)  # replaces an empty folder
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


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
