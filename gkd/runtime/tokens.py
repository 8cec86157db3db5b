"""The tokenized form of a data source: written once to disk, then memory-mapped by every rank.

`stored_tokens(key, ...)` returns the `TokenFile` stored under `key` in `token_dir()` (the planner's cache
folder, `GKD_CACHE_DIR` or ~/.cache/gkd, below `tokens/`), building it first when it is not there: the
documents are encoded in batches (a transformers tokenizer encodes a batch on all cores) and their ids,
each document followed by eos, are appended to a flat file of uint16 ids (uint32 for vocabularies over
65,536). `TokenFile.ids()` maps that file read-only. Beside it, `.docs` holds where each document starts
(int64 token offsets: packed rows reset their position ids there, so that documents do not attend to each
other), and, for data with a loss mask (chat and prompt/completion records), `.mask` holds one byte a token:
1 where the token is a target of the loss (a completion token), 0 where it is only context (the prompt).

A document is a text, or a sequence of (text, trained) segments: each segment is encoded on its own and
the ids joined, so a segment's tokens are exactly the ones its flag covers (encoding the joined text could
merge tokens across a prompt/completion boundary). The eos after a document is trained when its last
segment is: the model learns to stop after a completion.

Why on disk rather than in memory: a distillation corpus is often billions of tokens. Held as Python ints
they take about 36 bytes each, and every rank would tokenize the whole source again at every start. Stored
once, they take 2 or 4 bytes each on disk and nothing in memory until a batch reads its rows, they are
shared by all ranks through the page cache, and a second run on the same source starts at once.

The key is the caller's (gkd.runtime.data hashes the source's path, size and modification time, and the
tokenizer's files), so an edited source or another tokenizer makes a new entry. An entry is written to a
temporary file and renamed, its metadata last, so a reader never sees half of one. A run that fails while
tokenizing removes its temporary file; one killed outright (SIGKILL, a lost machine) cannot, so each build
first removes the temporary files of runs that are gone: those of this machine whose process has ended, and
any not written to for a day (a shared cache folder's other machines). Entries are not evicted: remove the
`tokens` folder to reclaim the space.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Union

import numpy as np

from gkd.errors import InputError
from gkd.files import process_alive
from gkd.planner.cache import cache_dir

# Documents handed to the tokenizer at once: large enough for a batched (multi-threaded) encode, small enough
# that the batch's ids stay a few MiB. A batch also ends once it holds BATCH_CHARS characters, so that a
# source of long documents does not hold 1,024 of them (and their ids) at once.
BATCH_DOCUMENTS = 1024
BATCH_CHARS = 8 << 20
# A temporary file not written to for this long belongs to a run that is gone, whichever machine ran it.
STALE_PARTIAL_S = 24 * 3600

# A document: a text (all of it trained), or (text, trained) segments encoded one by one and joined.
Document = Union[str, Sequence[tuple[str, bool]]]  # noqa: UP007 (a runtime alias on Python 3.10)


@dataclass(frozen=True)
class TokenFile:
    """A stored token sequence: `tokens` ids of `dtype` in `path`, from `documents` documents; `masked`:
    a per-token loss mask is stored beside them."""

    path: Path
    tokens: int
    documents: int
    dtype: str
    masked: bool = False

    def ids(self) -> np.ndarray:
        """The ids, memory-mapped read-only (an empty array for an empty source)."""
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def starts(self) -> np.ndarray:
        """The token offset at which each document starts (int64, ascending), memory-mapped read-only."""
        if self.documents == 0:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.path.with_suffix(".docs"), dtype=np.int64, mode="r", shape=(self.documents,))

    def trained(self) -> np.ndarray | None:
        """Per token, 1 where it is a target of the loss and 0 where it is context only (uint8, memory-mapped
        read-only); None when every token is trained."""
        if not self.masked:
            return None
        if self.tokens == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.path.with_suffix(".mask"), dtype=np.uint8, mode="r", shape=(self.tokens,))


def token_dir() -> Path:
    return cache_dir() / "tokens"


def id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def stored_tokens(
    key: str,
    documents: Callable[[], Iterator[tuple[Document, int]]],
    encode_batch: Callable[[list[str]], list[list[int]]],
    *,
    eos_id: int | None,
    vocab_size: int,
    masked: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[TokenFile, bool]:
    """The token file stored under `key`, and whether it was built by this call.

    `documents()` yields (document, units of progress it stands for, e.g. the bytes read); `progress(units)`
    is called as the documents are consumed. `masked`: store each token's loss-mask flag too (documents
    given as segments). Raises InputError when the folder cannot be written.
    """
    found = _lookup(key)
    if found is not None:
        return found, False
    folder = token_dir()
    dtype = id_dtype(vocab_size)
    suffix = _partial_suffix()
    partials = {kind: folder / f"{key}.{kind}{suffix}" for kind in ("bin", "docs", "mask")}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(folder)
        tokens = count = 0
        with contextlib.ExitStack() as files:
            out = {kind: files.enter_context(open(path, "wb")) for kind, path in partials.items()}
            for batch in _batches(documents()):
                ids, flags, lengths = _encode(batch, encode_batch, eos_id)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
                    raise InputError(
                        f"the tokenizer produced id {bad}, outside its {vocab_size} tokens; check its files"
                    )
                ids.astype(dtype).tofile(out["bin"])
                (tokens + np.concatenate(([0], np.cumsum(lengths)[:-1]))).astype(np.int64).tofile(out["docs"])
                if masked:
                    flags.tofile(out["mask"])
                tokens += int(ids.size)
                count += len(batch)
                if progress is not None:
                    progress(sum(units for _, units in batch))
        entry = TokenFile(
            path=folder / f"{key}.bin", tokens=tokens, documents=count, dtype=dtype, masked=masked
        )
        partials["bin"].replace(entry.path)
        partials["docs"].replace(entry.path.with_suffix(".docs"))
        if masked:
            partials["mask"].replace(entry.path.with_suffix(".mask"))
        meta = folder / f"{key}.json{suffix}"
        meta.write_text(json.dumps({"tokens": tokens, "documents": count, "dtype": dtype, "masked": masked}))
        meta.replace(folder / f"{key}.json")
    except OSError as err:
        raise InputError(
            f"cannot store the tokenized data in {folder}: {err.strerror or err.__class__.__name__}; free "
            "space there or set GKD_CACHE_DIR to a writable folder with room"
        ) from None
    finally:
        for partial in partials.values():
            with contextlib.suppress(OSError):  # absent once renamed; unreachable when the folder is not one
                partial.unlink(missing_ok=True)
    return entry, True


def _encode(
    batch: list[tuple[Document, int]],
    encode_batch: Callable[[list[str]], list[list[int]]],
    eos_id: int | None,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A batch of documents as (ids int64, trained flags uint8, tokens per document), each document followed
    by eos. Every segment of the batch goes to one `encode_batch` call."""
    segments = [[(doc, True)] if isinstance(doc, str) else list(doc) for doc, _ in batch]
    encoded = iter(encode_batch([text for doc in segments for text, _ in doc]))
    tail = [] if eos_id is None else [eos_id]
    pieces: list[list[int]] = []
    flags: list[np.ndarray] = []
    lengths: list[int] = []
    for doc in segments:
        length = 0
        for _, trained in doc:
            ids = next(encoded)
            pieces.append(ids)
            flags.append(np.full(len(ids), trained, dtype=np.uint8))
            length += len(ids)
        pieces.append(tail)
        flags.append(np.full(len(tail), bool(doc and doc[-1][1]), dtype=np.uint8))
        lengths.append(length + len(tail))
    # chain, not concatenation of lists: a long document's list of ids is not copied.
    ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int64)
    return ids, np.concatenate(flags) if flags else np.zeros(0, dtype=np.uint8), lengths


def _batches(stream: Iterator[tuple[Document, int]]) -> Iterator[list[tuple[Document, int]]]:
    """The documents in batches of at most BATCH_DOCUMENTS documents and (past the first) BATCH_CHARS
    characters."""
    batch: list[tuple[Document, int]] = []
    chars = 0
    for item in stream:
        size = _chars(item[0])
        if batch and (len(batch) == BATCH_DOCUMENTS or chars + size > BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += size
    if batch:
        yield batch


def _chars(document: Document) -> int:
    return len(document) if isinstance(document, str) else sum(len(text) for text, _ in document)


def _partial_suffix() -> str:
    """The suffix of this process's temporary files: its machine and process id, so that a later run can tell
    whether the process that wrote one is gone."""
    return f".partial-{socket.gethostname()}-{os.getpid()}"


def remove_stale_partials(folder: Path) -> None:
    """Remove the temporary files of runs that are gone: this machine's whose process has ended (and files
    named by process id alone, as older versions wrote them), and any not written to for STALE_PARTIAL_S."""
    host = socket.gethostname()
    now = time.time()
    for path in folder.glob("*.partial-*"):
        owner = path.name.rsplit(".partial-", 1)[1]
        writer, _, pid = owner.rpartition("-")
        try:
            ours = writer in ("", host) and pid.isdigit()
            gone = (ours and not process_alive(int(pid))) or now - path.stat().st_mtime > STALE_PARTIAL_S
            if gone:
                path.unlink()
        except OSError:
            continue  # removed meanwhile by another run, or not ours to remove


def _lookup(key: str) -> TokenFile | None:
    """The complete entry under `key`, or None (absent, or damaged: then it is built again)."""
    folder = token_dir()
    try:
        meta = json.loads((folder / f"{key}.json").read_text())
        entry = TokenFile(
            path=folder / f"{key}.bin",
            tokens=int(meta["tokens"]),
            documents=int(meta["documents"]),
            dtype=str(meta["dtype"]),
            masked=bool(meta["masked"]),
        )
        if entry.dtype not in ("uint16", "uint32"):
            return None
        if entry.path.stat().st_size != entry.tokens * np.dtype(entry.dtype).itemsize:
            return None
        if entry.path.with_suffix(".docs").stat().st_size != entry.documents * 8:
            return None
        if entry.masked and entry.path.with_suffix(".mask").stat().st_size != entry.tokens:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(resolved path, size, modification time in ns) of each file: what changes when a file is edited."""
    identity = []
    for path in paths:
        stat = path.stat()
        identity.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return identity
