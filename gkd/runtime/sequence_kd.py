"""Sequence-level distillation (`generation.mode: sequence_kd`, Kim & Rush 2016): before training, the first
teacher generates one completion for each prompt of the data, and the run trains on prompt + completion.

Usage (every rank of `gkd run`, gkd.runtime.worker, with the teacher placed as the plan has it):
    work = SequencePass.open(config, source, tokenizer, seed=seed, micro_batch=mb, device_type="cpu")
    stored = work.run(teacher, rank=r, world=w, device=device)   # a TokenFile
    batches(source, tokenizer, ..., stored=stored)    # training reads the generated sequences

What is generated: the prompts are the data's own (a document's context up to its first trained token, as
on_policy reads them from a batch) or, with `generation.prompt_field`, that field of every record (read as
text). Each prompt keeps its last `seq_len - max_new_tokens` tokens. The teacher samples up to
`max_new_tokens` tokens at `temperature` and `top_p` (gkd.runtime.generation.sample, with a key/value
cache). The result is a token store entry (gkd.runtime.tokens) of documents prompt + completion, the prompt
untrained and the completion (and the eos after it) trained: training packs and reads it like any
prompt/completion data, and its loss mask applies to the hard and the distillation terms alike.

Design choices:
- The prompts are cut into chunks of `micro_batch` prompts, chunk c sampled with a generator seeded from
  (seed, c): what is generated depends on the teacher, the prompts, the generation settings, the seed and
  the chunk size, never on the number of ranks or which rank ran a chunk. Chunk c runs on rank
  c mod world; every rank runs as many chunks (a rank short of one samples a chunk it throws away), so a
  ZeRO-3 teacher's forwards, collectives, stay in step.
- Resumable: each finished chunk is written beside the entry it will become, in the token store's
  `<key>.chunks/` folder, under a temporary name and renamed, so a killed pass leaves whole chunks only,
  and the next run with the same key (a resume, or a new run) generates only the missing ones. On several
  nodes that folder must be one all nodes see (GKD_CACHE_DIR on a shared file system): a rank that finds
  another's chunk missing stops with one line saying so.
- Reusable like the token cache: the entry's key hashes the teacher (its reference and files), the prompts
  (the source's identity, the tokenizer's, the prompt field), the generation settings, the seed, the chunk
  size, the dtype and the device type. A later run with the same key reads the stored entry and generates
  nothing; the chunks are removed once the entry is stored.
- Each eos that ends a completion is the store's own (every document is followed by eos, trained when its
  completion is): a completion cut at `max_new_tokens` is followed by eos too.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gkd.config import GenerationConfig
from gkd.errors import InputError
from gkd.runtime.tokens import (
    TokenFile,
    _partial_suffix,
    file_identity,
    remove_stale_partials,
    stored_tokens,
    token_dir,
)

# Bump when what a key stands for changes: entries of an older pass are never read.
_LAYOUT = "sequence_kd 1"

NO_PROMPTS = (
    "generation.mode sequence_kd needs prompts: chat or prompt/completion records (data.loss_mask auto or "
    "completion), or generation.prompt_field naming the field of the records that holds the prompt"
)


def prompt_options(options: Any, prompt_field: str) -> Any:
    """The data options that read every record's `prompt_field` as a text record."""
    return replace(options, format="text", text_field=prompt_field, loss_mask="all")


def prompt_ids(
    source: str | None, options: Any, tokenizer: Any, prompt_field: str | None, keep: int
) -> tuple[list[list[int]], str]:
    """Each record's prompt ids (its last `keep`) in the source's order, and what identifies them."""
    from gkd.runtime.data import _source

    if prompt_field is not None:
        # Every record's field, read as text records of that field.
        found = _source(source, prompt_options(options, prompt_field), tokenizer)
        texts = [[doc] if isinstance(doc, str) else [t for t, _ in doc] for doc, _ in found.documents()]
    else:
        found = _source(source, options, tokenizer)
        if not found.masked:
            raise InputError(NO_PROMPTS)
        texts = []
        for doc, _ in found.documents():
            head = []
            for text, trained in doc:  # the context up to the first trained segment
                if trained:
                    break
                head.append(text)
            texts.append(head)
    flat = [t for parts in texts for t in parts]
    encoded = iter(tokenizer.encode_batch(flat) if flat else [])
    out = []
    for parts in texts:
        ids = [i for _ in parts for i in next(encoded)]  # segments encoded one by one, as the store does
        if ids:
            out.append(ids[-keep:])
    if not out:
        raise InputError(f"{NO_PROMPTS}; this source has no prompt text")
    return out, f"{found.identity} prompt_field={prompt_field} keep={keep} tokenizer={tokenizer.identity()}"


def teacher_identity(ref: str) -> str:
    """What changes when the teacher does: its reference, and its files' sizes and times (a folder)."""
    path = Path(ref)
    if path.is_dir():
        return f"{ref} {file_identity(sorted(p for p in path.rglob('*') if p.is_file()))}"
    return ref


@dataclass
class SequencePass:
    """One rank's teacher generation pass (see the module docstring)."""

    settings: GenerationConfig
    prompts: list[list[int]]
    key: str
    seed: int
    micro_batch: int
    vocab: int
    eos_id: int | None
    pad_id: int

    @classmethod
    def open(
        cls,
        config: Mapping[str, Any],
        source: str | None,
        tokenizer: Any,
        *,
        seed: int,
        micro_batch: int,
        device_type: str,
    ) -> SequencePass:
        from gkd.runtime.data import data_options
        from gkd.runtime.generation import _settings

        settings = _settings(config)
        assert settings is not None and settings.mode == "sequence_kd"
        keep = int(config["training"]["seq_len"]) - settings.max_new_tokens
        found, identity = prompt_ids(source, data_options(config), tokenizer, settings.prompt_field, keep)
        how = {k: v for k, v in settings.to_entry().items() if k not in ("lambda", "refresh_every")}
        parts = [
            _LAYOUT,
            teacher_identity(config["teachers"][0]),
            identity,
            json.dumps(how, sort_keys=True),
            f"seed={seed} chunk={micro_batch} device={device_type}",
            f"dtype={config['training'].get('dtype', 'bfloat16')}",
        ]
        key = "seqkd-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        return cls(
            settings=settings,
            prompts=found,
            key=key,
            seed=seed,
            micro_batch=micro_batch,
            vocab=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )

    @property
    def chunks(self) -> int:
        return math.ceil(len(self.prompts) / self.micro_batch)

    def stored(self) -> TokenFile | None:
        """The finished entry of this pass in the token store, or None."""
        from gkd.runtime.tokens import _lookup

        return _lookup(self.key)

    def run(
        self,
        teacher: nn.Module,
        *,
        rank: int,
        world: int,
        device: torch.device,
        progress: Callable[[int, int], None] | None = None,
    ) -> TokenFile:
        """Generate this rank's missing chunks, then (rank 0) store the entry; every rank returns it. A
        collective: every rank calls it (one process without a process group may too). `progress(done,
        total)`: after each of this rank's chunks."""
        from gkd.runtime.checkpoints import maybe_die
        from gkd.runtime.generation import sample, seeded

        found = self.stored()
        if _reduced(0 if found is None else 1, "min", device):
            assert found is not None
            return found
        work = token_dir() / f"{self.key}.chunks"
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(
                f"cannot write the teacher's generations to {work}: {err.strerror or type(err).__name__}; "
                "set GKD_CACHE_DIR to a writable folder with room"
            ) from None
        remove_stale_partials(work)  # chunks half-written by a run that was killed
        mine = [c for c in range(rank, self.chunks, world) if not self._chunk(work, c).is_file()]
        rounds = _reduced(len(mine), "max", device)
        g = self.settings
        was_training = teacher.training
        teacher.eval()
        try:
            for i in range(rounds):
                chunk = mine[i] if i < len(mine) else None
                rows = self._rows(chunk if chunk is not None else 0)
                completions = sample(
                    teacher,
                    [torch.tensor(p, dtype=torch.long, device=device) for p in rows],
                    max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature,
                    top_p=g.top_p,
                    vocab=self.vocab,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                    generator=seeded(self.seed, "sequence_kd", chunk or 0, device=device),
                )
                if chunk is not None:  # else: only to keep a ZeRO-3 teacher's forwards in step
                    self._write(work, chunk, [c.cpu().numpy() for c in completions])
                    maybe_die("generated", i + 1, rank)
                if progress is not None:
                    progress(i + 1, rounds)
        finally:
            teacher.train(was_training)
        _barrier()
        missing = [c for c in range(self.chunks) if not self._chunk(work, c).is_file()]
        if missing:
            raise InputError(
                f"the teacher's generations of chunk {missing[0]} are not in {work}, which another rank "
                "wrote: on several nodes set GKD_CACHE_DIR to a folder that every node shares"
            )
        if rank == 0:
            self._store(work)
        _barrier()
        entry = self.stored()
        if entry is None:  # another node's token store: this rank builds its own from the shared chunks
            entry = self._store(work)
        _barrier()
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        return entry

    def _rows(self, chunk: int) -> list[list[int]]:
        return self.prompts[chunk * self.micro_batch : (chunk + 1) * self.micro_batch]

    @staticmethod
    def _chunk(work: Path, chunk: int) -> Path:
        return work / f"chunk-{chunk:07d}.npz"

    def _write(self, work: Path, chunk: int, completions: list[np.ndarray]) -> None:
        """One chunk's completions, whole or not at all (a temporary file renamed)."""
        path = self._chunk(work, chunk)
        partial = path.with_name(path.name + _partial_suffix())
        lengths = np.array([len(c) for c in completions], dtype=np.int64)
        flat = np.concatenate(completions).astype(np.int64) if completions else np.zeros(0, np.int64)
        with open(partial, "wb") as f:
            np.savez(f, lengths=lengths, ids=flat)
        partial.replace(path)

    def _completions(self, work: Path) -> Iterator[list[int]]:
        for chunk in range(self.chunks):
            with np.load(self._chunk(work, chunk)) as data:
                lengths, flat = data["lengths"], data["ids"]
            for piece in np.split(flat, np.cumsum(lengths)[:-1]):
                ids = piece.tolist()
                if ids and ids[-1] == self.eos_id:
                    ids.pop()  # the store follows every document with eos
                yield ids

    def _store(self, work: Path) -> TokenFile:
        """The token store entry of prompt + completion documents (gkd.runtime.tokens, written atomically)."""
        # The store encodes texts; here every segment's ids are known, so each segment is named by its
        # place and the "encoding" looks the ids up.
        ids: dict[str, list[int]] = {}

        def documents() -> Iterator[tuple[list[tuple[str, bool]], int]]:
            for i, completion in enumerate(self._completions(work)):
                ids[f"p{i}"], ids[f"c{i}"] = self.prompts[i], completion
                yield [(f"p{i}", False), (f"c{i}", True)], 1

        def lookup(names: list[str]) -> list[list[int]]:
            return [ids.pop(name) for name in names]

        entry, _ = stored_tokens(
            self.key, documents, lookup, eos_id=self.eos_id, vocab_size=self.vocab, masked=True
        )
        return entry


def _reduced(value: int, op: str, device: torch.device) -> int:
    """`value` reduced over the ranks (min or max); itself without a process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(tensor.item())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
