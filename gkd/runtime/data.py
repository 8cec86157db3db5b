"""Training data for `gkd run`: a tokenizer and an endless, deterministic stream of packed micro-batches.

Two entry points:

- `load_tokenizer(ref, spec)`: the tokenizer the models were trained with, read from the model's folder
  (or the folder of its config.json) with `AutoTokenizer.from_pretrained(..., local_files_only=True)`, so
  nothing is ever downloaded. Presets and folders without tokenizer files get the built-in `ByteTokenizer`
  (UTF-8 bytes as ids 0..255, with pad / bos / eos / mask on four ASCII control codes that text never
  holds), which needs a vocabulary of at least 256 ids, so it fits every preset, the tiny ones included.
- `batches(source, tokenizer, ..., options)`: documents from the built-in corpus, a `.txt` or `.jsonl` file,
  or anything gkd.runtime.records opens through `datasets` (data files, folders, `save_to_disk` folders,
  cached hub ids), as text, chat or prompt/completion records (the config's `data` section, `options`);
  tokenised, joined with eos and packed into rows of exactly `seq_len` tokens.

Design choices:

- Packing, not padding. Every row is full, so the attention mask is all True and no compute goes to pad
  tokens; the final partial row is dropped. Documents are encoded without the tokenizer's own special
  tokens (no per-document BOS / CLS) and each one is followed by eos, so document boundaries stay visible to
  the model. Each row also carries position ids that restart at every document (and at the row's start):
  gkd.runtime.packing gives them to the models (with a block mask for every family not checked to keep
  documents apart by them) so that packed documents do not attend to each other.
- Completion-only data (chat, prompt/completion) stores a per-token loss mask: labels are -100 outside the
  completion, and "loss_mask" marks the positions whose output predicts a completion token, which every loss
  term reads (gkd.runtime.step).
- The source is tokenised once, streamed document by document, into a flat file of ids in the cache
  (gkd.runtime.tokens), keyed by the source's path, size and modification time and the tokenizer's files.
  Every rank memory-maps that file and reads only the rows of its batches, so a corpus of billions of tokens
  costs 2 bytes a token on disk and next to nothing in memory, and a second run on it starts at once.
- Rows are shuffled globally each epoch with a generator seeded from (seed, epoch); the epochs' permutations,
  end to end, are the run's one endless stream of rows. Global micro-batch k is the stream's next world x
  micro_batch rows and rank r takes rows r, r + world, ... of it: every rank computes the same permutation,
  so ranks see disjoint rows that together cover each epoch, a different split each epoch, and no row is
  dropped at an epoch boundary. Since an optimizer step reads a contiguous stretch of the stream (global_batch
  rows), a run that resumes at stream position `start` (steps done x global batch) with another number of
  ranks or another micro-batch trains on exactly the rows the uninterrupted run would have. A permutation
  holds 8 bytes per row (a corpus of 10^10 tokens in rows of 2048: 40 MB per rank).
- MLM masking follows BERT (Devlin et al. 2019, section 3.1): 15% of positions are chosen, of those 80% become
  the mask id, 10% a random non-special id and 10% stay unchanged; labels hold the original id at chosen
  positions and -100 elsewhere. Special tokens (the eos separators) are never chosen, as in transformers'
  `DataCollatorForLanguageModeling`. Each row is masked with a generator seeded from (seed, its stream
  position), so masking is deterministic, and the same for a row whatever rank or micro-batch reads it.
- Causal labels are a copy of input_ids (-100 where a token is not trained): the model (and
  `gkd.methods.losses.task_loss`) shifts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gkd.config import DataConfig
from gkd.errors import InputError, shown
from gkd.models import ModelSpec, preset_names
from gkd.runtime.records import (
    DATASET_FILES,
    FORMS,
    ChatTemplate,
    chat_template,
    check_fields,
    detect_format,
    is_hub_id,
    open_records,
    segments,
)
from gkd.runtime.tokens import Document, TokenFile, file_identity, stored_tokens

OBJECTIVES = ("causal", "mlm")

# The third part of a row's masking seed (seed, position, _MASKING): keeps it apart from the epochs'
# permutation seeds (seed, epoch).
_MASKING = 1

# Fractions of BERT masking (Devlin et al. 2019): positions chosen, and of those, masked / randomised.
MLM_CHOOSE = 0.15
MLM_MASK = 0.8
MLM_RANDOM = 0.1

# Files whose presence marks a folder as holding a Hugging Face tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "vocab.json",
)

# The files a transformers tokenizer reads: their content identifies what it encodes to.
_TOKENIZER_IDENTITY_FILES = frozenset(
    (
        *_TOKENIZER_FILES,
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "sentencepiece.bpe.model",
        "chat_template.jinja",  # the chat template, when not in tokenizer_config.json
        "chat_template.json",
    )
)

SOURCE_FORMS = FORMS


class Tokenizer(Protocol):
    """What `batches` needs from a tokenizer."""

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def mask_id(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def identity(self) -> str:
        """What determines the ids this tokenizer gives (its kind, files and separators), as text."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Pad, bos, eos and mask are the ASCII control codes NUL, SOH, STX and ETX
    (ids 0..3), which prose never contains; `encode` drops them from the text so they stay unambiguous.

    For presets and config-only models, which have random weights and no tokenizer of their own. Placing the
    specials inside the byte range (rather than at 256..259) keeps the vocabulary at 256, the size of the tiny
    presets.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    mask_id = 3
    vocab_size = 256
    _SPECIALS = bytes((0, 1, 2, 3))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8").translate(None, self._SPECIALS))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def identity(self) -> str:
        return f"bytes eos={self.eos_id}"

    def decode(self, ids: list[int]) -> str:
        """The text of the byte ids; special ids are skipped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 4 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the `Tokenizer` protocol.

    Models without an eos token (BERT) separate documents with their sep token; models without a pad token
    (Llama) pad with eos, as is usual for them; packed rows never need padding anyway.
    """

    def __init__(self, tokenizer: Any, folder: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.folder = folder
        self.bos_id: int | None = _first_id(tokenizer.bos_token_id, tokenizer.cls_token_id)
        self.eos_id: int | None = _first_id(tokenizer.eos_token_id, tokenizer.sep_token_id)
        self.mask_id: int | None = _first_id(tokenizer.mask_token_id)
        self.pad_id: int = _first_id(tokenizer.pad_token_id, self.eos_id) or 0
        self.vocab_size: int = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        # verbose=False: a long document is longer than the model's context, which is fine because it is
        # packed into rows afterwards; transformers would warn about it otherwise.
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One call for the batch: a fast (Rust) tokenizer encodes it on all cores.
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def identity(self) -> str:
        files = []
        if self.folder is not None:
            for path in sorted(self.folder.iterdir()):
                if path.is_file() and path.name in _TOKENIZER_IDENTITY_FILES:
                    files.append(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
        where = " ".join(files) or str(self.tokenizer.name_or_path)
        return f"hf {type(self.tokenizer).__name__} eos={self.eos_id} n={self.vocab_size} {where}"


def _first_id(*ids: int | None) -> int | None:
    for value in ids:
        if value is not None:
            return int(value)
    return None


def load_tokenizer(ref: str, spec: ModelSpec) -> Tokenizer:
    """The tokenizer for the model that `ref` names (preset name, config.json path or checkpoint folder).

    A folder holding tokenizer files gives a transformers tokenizer, loaded offline; anything else gives the
    `ByteTokenizer`. Raises InputError when the tokenizer's ids do not fit the model's vocabulary.
    """
    folder = _tokenizer_folder(ref)
    if folder is None:
        if spec.vocab < ByteTokenizer.vocab_size:
            need = ByteTokenizer.vocab_size
            raise InputError(
                f"model {spec.name} has a vocabulary of {spec.vocab} but the built-in byte tokenizer "
                f"needs {need} ids (one per byte); point the model at a folder "
                f"with tokenizer files or use a config with vocab_size >= {need}"
            )
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        from gkd.models import is_trusted

        # A custom tokenizer class (auto_map) runs only for a model the config trusts (trust_remote_code).
        trusted = is_trusted(folder)
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trusted)
    except Exception as err:  # transformers raises many kinds (OSError, ValueError, KeyError, ...)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(
            f"cannot load the tokenizer in {folder}: {err.__class__.__name__}: {detail}; "
            "check its tokenizer files or remove them to use the built-in byte tokenizer"
        ) from None
    tokenizer = HFTokenizer(hf, folder)
    if tokenizer.vocab_size > spec.vocab:
        raise InputError(
            f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but model {spec.name} has a "
            f"vocabulary of {spec.vocab}; use the tokenizer the model was trained with"
        )
    return tokenizer


def _tokenizer_folder(ref: str) -> Path | None:
    """The folder whose tokenizer files belong to `ref`, or None (presets, folders without them)."""
    if ref in preset_names():
        return None
    path = Path(ref).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if folder is None or not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return folder


# ----------------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------------


def data_options(config: Mapping[str, Any]) -> DataConfig:
    """The data section of a plan's config (its defaults for plans written before it had one)."""
    return DataConfig(**dict(config.get("data") or {}))


def read_documents(
    source: str | None, options: DataConfig | None = None, tokenizer: Tokenizer | None = None
) -> list[str]:
    """The documents of a data source (None: the built-in corpus), in file order, as text (a chat record as
    its rendered conversation)."""
    found = _source(source, options or DataConfig(), tokenizer or ByteTokenizer())
    return [doc if isinstance(doc, str) else "".join(text for text, _ in doc) for doc, _ in found.documents()]


@dataclass(frozen=True)
class _Found:
    """An opened source: `identity` changes when it (or how it is read) changes; `total` progress units
    (None: unknown); `masked`: its documents carry a loss mask; `documents()` streams (document, progress
    units) pairs, the units being bytes read (records for a dataset), and raises InputError at the first bad
    record."""

    identity: str
    total: int | None
    masked: bool
    documents: Callable[[], Iterator[tuple[Document, int]]]


def _source(source: str | None, options: DataConfig, tokenizer: Tokenizer) -> _Found:
    if source is None:
        text = resources.files("gkd").joinpath("data/corpus.txt").read_text(encoding="utf-8")
        identity = f"builtin {hashlib.sha256(text.encode()).hexdigest()}"
        lines = _text_documents(text)
        _resolve_format("text", options, "the built-in corpus")
        return _Found(identity, len(lines), False, lambda: ((line, 1) for line in lines))
    path = Path(source).expanduser()
    try:
        is_dir = path.is_dir()
        exists, regular = path.exists(), path.is_file()
    except OSError as err:  # a name too long for the file system, a folder that cannot be searched
        raise InputError(
            f"cannot read data source {shown(source)}: {err.strerror or type(err).__name__}"
        ) from None
    suffix = path.suffix.lower()
    if (
        is_dir
        or (regular and suffix in DATASET_FILES and suffix != ".jsonl")
        or (not exists and is_hub_id(source))
    ):
        return _dataset_source(source, options, tokenizer)
    if not exists:
        raise InputError(f"data source {shown(source)} does not exist; give {SOURCE_FORMS}")
    if not regular:  # a FIFO or a device: neither has an end to tokenise up to
        raise InputError(f"data source {shown(source)} is not a regular file; give {SOURCE_FORMS}")
    if suffix not in (".txt", ".jsonl"):
        raise InputError(
            f"data source {source} has an unsupported type {suffix or '(none)'}; give {SOURCE_FORMS}"
        )
    try:
        files = file_identity([path])
    except OSError as err:
        raise InputError(
            f"cannot read data source {path}: {err.strerror or err.__class__.__name__}"
        ) from None
    if suffix == ".txt":
        form, masked = _resolve_format("text", options, str(path))
        return _Found(
            _identity("file", files, form, masked, options),
            path.stat().st_size,
            False,
            lambda: _text_lines(path),
        )
    first = next((record for _, record, _ in _jsonl_records(path)), {})
    form, masked = _resolve_format(detect_format(list(first)), options, str(path))
    template = chat_template(tokenizer) if form != "text" else None
    return _Found(
        _identity("file", files, form, masked, options),
        path.stat().st_size,
        masked,
        lambda: _jsonl_documents(path, form, options.text_field, template),
    )


def _resolve_format(detected: str, options: DataConfig, name: str) -> tuple[str, bool]:
    """(format, masked): data.format (auto: `detected`) and whether the loss mask is the completion's."""
    form = detected if options.format == "auto" else options.format
    if form == "text" and options.loss_mask == "completion":
        raise InputError(
            f"data.loss_mask is completion but {name} holds text records, which have no completion; use "
            "chat or prompt/completion records, or data.loss_mask all"
        )
    masked = options.loss_mask == "completion" or (options.loss_mask == "auto" and form != "text")
    return form, masked


def _identity(kind: str, files: Any, form: str, masked: bool, options: DataConfig) -> str:
    """What the stored ids depend on besides the tokenizer: the files and how their records are read."""
    how = f"{form} field={options.text_field} split={options.split} subset={options.subset} masked={masked}"
    return f"{kind} {files} {how}"


def _dataset_source(source: str, options: DataConfig, tokenizer: Tokenizer) -> _Found:
    """A source read through `datasets` (gkd.runtime.records): data files, folders and hub ids."""
    records = open_records(source, split=options.split, subset=options.subset, streaming=options.streaming)
    columns = records.columns
    if columns is None:  # a stream whose fields are known only once read
        columns = list(next(records.rows(), {}))
    form, masked = _resolve_format(detect_format(columns), options, source)
    check_fields(columns, form, options.text_field, f"data source {source}")
    template = chat_template(tokenizer) if form != "text" else None
    # Streamed sources are identified by their files too: the stored ids are built once from them.
    identity = _identity("dataset", file_identity(records.files), form, masked, options)

    def documents() -> Iterator[tuple[Document, int]]:
        for number, record in enumerate(records.rows(), start=1):
            doc = segments(
                record, form, options.text_field, template, f"data source {source} record {number}"
            )
            if doc:
                yield (doc[0][0] if form == "text" else doc), 1

    return _Found(identity, records.total, masked, documents)


# The most bytes one document (a line of a .txt or .jsonl file) may hold, unless GKD_MAX_DOCUMENT_BYTES says
# otherwise. Tokenising a document holds its ids as Python ints (an 8-byte pointer a token in the list, then
# 8 bytes a token as int64), so a document costs the parent many times its size while it is encoded. Real
# documents (a book is a few MiB) are far below 64 MiB; a larger "line" is almost always a file without line
# breaks.
DEFAULT_MAX_DOCUMENT_BYTES = 64 << 20


def max_document_bytes() -> int:
    """The document size limit: GKD_MAX_DOCUMENT_BYTES (a number of bytes, or a size such as 256MiB), else
    64 MiB."""
    from gkd.config import parse_bytes

    value = os.environ.get("GKD_MAX_DOCUMENT_BYTES", "").strip()
    if not value:
        return DEFAULT_MAX_DOCUMENT_BYTES
    # A bare number is bytes, as the name says (a config's sizes read a small bare number as GiB, which
    # made "1000" a limit of 1000 GiB).
    bare = value.isascii() and value.isdigit()
    limit = int(value) if bare else parse_bytes(value, "GKD_MAX_DOCUMENT_BYTES")
    if limit < 1:
        raise InputError("GKD_MAX_DOCUMENT_BYTES must be a size > 0 such as 256MiB")
    return limit


def _lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, text, bytes) of each line of a UTF-8 file; "\r\n" and a lone "\r" end lines too.
    A line is read at most `max_document_bytes()` at a time: a longer one is refused, never held whole."""
    from gkd.planner.plan import human_bytes

    number = 0
    limit = max_document_bytes()
    try:
        with open(path, "rb") as f:
            while raw := f.readline(limit + 1):
                if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                    raise InputError(
                        f"{path} line {number + 1} is longer than {human_bytes(limit)}, the most one "
                        "document may hold (GKD_MAX_DOCUMENT_BYTES); split the text into lines (one document "
                        "each) or raise the limit"
                    )
                if number == 0:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as some editors write
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InputError(
                        f"data source {path} is not UTF-8 text (line {number + 1}, byte {err.start} of it); "
                        "re-encode it as UTF-8"
                    ) from None
                parts = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                if parts[-1] == "":
                    parts.pop()  # the line's own end
                for i, part in enumerate(parts):
                    number += 1
                    yield number, part, len(raw) if i == 0 else 0
    except OSError as err:
        raise InputError(
            f"cannot read data source {path}: {err.strerror or err.__class__.__name__}"
        ) from None


def _text_documents(text: str) -> list[str]:
    """One document per non-empty line; a text without newlines is one document."""
    if "\n" not in text:
        return [text] if text.strip() else []
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _text_lines(path: Path) -> Iterator[tuple[str, int]]:
    """One document per non-empty line (a file without newlines is one document)."""
    for _, text, size in _lines(path):
        if text.strip():
            yield text, size


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(line number, record, bytes) of each non-empty line of a .jsonl file."""
    for number, line, size in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path} line {number} is not valid JSON ({err.msg}); write one object per line"
            ) from None
        except RecursionError:
            raise InputError(
                f"{path} line {number} nests its JSON too deeply to read; keep each line a flat object "
                'with a "text" field'
            ) from None
        if not isinstance(record, dict):
            raise InputError(f"{path} line {number} is not a JSON object; write one object per line")
        if "\\u" in line:  # only an escape can give a lone surrogate: the line itself is valid UTF-8
            _no_surrogates(record, f"{path} line {number}")
        yield number, record, size


def _no_surrogates(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(
                f"{where}: its text holds a lone surrogate ({shown(value[err.start])}, "
                "from a broken \\u escape), which is not a character; fix or drop that escape"
            ) from None
    elif isinstance(value, dict):
        for item in value.values():
            _no_surrogates(item, where)
    elif isinstance(value, list):
        for item in value:
            _no_surrogates(item, where)


def _jsonl_documents(
    path: Path, form: str, text_field: str, template: ChatTemplate | None
) -> Iterator[tuple[Document, int]]:
    for number, record, size in _jsonl_records(path):
        if form == "text" and not isinstance(record.get(text_field), str):
            raise InputError(
                f"{path} line {number} has no {json.dumps(text_field)} string field; give every line one"
            )
        doc = segments(record, form, text_field, template, f"{path} line {number}")
        if doc:
            yield (doc[0][0] if form == "text" else doc), size


def _json_int(digits: str) -> int | float:
    """A JSON integer; one past Python's digit limit for int() (4,300) is kept as a float: only the "text"
    field of a line is read, so other fields need not be exact."""
    return int(digits) if len(digits) <= 4000 else float(digits)


# ----------------------------------------------------------------------------------------------------------
# Tokens, packing and batches
# ----------------------------------------------------------------------------------------------------------


def prepare_tokens(
    source: str | None,
    tokenizer: Tokenizer,
    *,
    options: DataConfig | None = None,
    show_progress: bool = False,
) -> tuple[TokenFile, bool]:
    """The source's ids, each document followed by eos when the tokenizer has one, stored once on disk (see
    gkd.runtime.tokens) with where each document starts and, for chat and prompt/completion records, which
    tokens the loss trains on; and whether this call tokenised it. `options`: the config's data section.
    `show_progress`: a progress bar on a terminal while a large source is tokenised."""
    found = _source(source, options or DataConfig(), tokenizer)
    if source is not None:
        max_document_bytes()  # a bad setting is refused even where the ids are stored and nothing is read
    # The store's layout is part of the key: entries of an older layout are never read.
    key = hashlib.sha256(f"{_STORE_LAYOUT}\n{found.identity}\n{tokenizer.identity()}".encode()).hexdigest()[
        :32
    ]
    name = source if source is not None else "the built-in corpus"
    by_records = source is not None and not Path(source).expanduser().is_file()
    large = source is not None and found.total is not None and (by_records or found.total >= _BAR_MIN_BYTES)
    with _tokenizing_bar(f"Tokenizing {name}", found.total or 0, show_progress and large) as advance:
        return stored_tokens(
            key,
            found.documents,
            tokenizer.encode_batch,
            eos_id=tokenizer.eos_id,
            vocab_size=tokenizer.vocab_size,
            masked=found.masked,
            progress=advance,
        )


# The stored ids' layout (gkd.runtime.tokens): ids, document starts and the optional loss mask.
_STORE_LAYOUT = "ids+docs+mask"


# Files smaller than this tokenise in about a second: no bar. (A dataset folder counts rows, not bytes: it
# always gets one.)
_BAR_MIN_BYTES = 16 << 20


@contextlib.contextmanager
def _tokenizing_bar(label: str, total: int, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A transient rich bar on stderr while the block runs, when `enabled`; yields its advance callback."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda units: bar.advance(task, units)


def batches(
    source: str | None,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    micro_batch: int,
    objective: str,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    options: DataConfig | None = None,
    start: int = 0,
    row_ids: bool = False,
    stored: TokenFile | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of micro-batches for one rank, each (micro_batch, seq_len): "input_ids",
    "labels" and "position_ids" long, "attention_mask" bool, and, for data with a completion loss mask,
    "loss_mask" bool (see `_Rows.take`). objective: "causal" (decoders) or "mlm" (encoders). `options`: the
    config's data section (how the source's records are read). `start`: the stream position to begin at
    (rows the run has trained on, over all ranks); `row_ids`: each batch also holds "row_ids" (micro_batch,)
    long, the rows' numbers in the stored ids (for checks of what a run trained on). `stored`: ids to read
    instead of the source's (a sequence_kd run's generations, gkd.runtime.sequence_kd).

    The source is tokenised (or its stored ids found) before this returns, so a bad source raises InputError
    here, not at the first `next`.
    """
    _check_args(seq_len=seq_len, micro_batch=micro_batch, objective=objective, rank=rank, world=world)
    if not isinstance(start, int) or start < 0:
        raise InputError(f"the stream position must be an integer >= 0, got {shown(start)}")
    if objective == "mlm" and tokenizer.mask_id is None:
        raise InputError(
            "the mlm objective needs a tokenizer with a mask token and this one has none; "
            "use the encoder's own tokenizer folder"
        )
    if stored is None:
        stored, _ = prepare_tokens(source, tokenizer, options=options)
    if objective == "mlm" and stored.masked:
        raise InputError(
            "chat and prompt/completion data train a decoder on its completions; an encoder (mlm) student "
            "needs text records (data.format text, or data.loss_mask all)"
        )
    count = stored.tokens // seq_len  # the final partial row is dropped
    needed = world * micro_batch
    if count < needed:
        name = source if source is not None else "the built-in corpus"
        raise InputError(
            f"data source {name} gives {count} rows of {seq_len} tokens but {world} rank(s) x "
            f"micro_batch {micro_batch} need {needed} rows, at least {needed * seq_len} tokens; "
            "use more data or lower seq_len / micro_batch"
        )
    rows = _Rows(stored, seq_len, count)
    return _generate(
        rows,
        tokenizer,
        micro_batch=micro_batch,
        objective=objective,
        rank=rank,
        world=world,
        seed=seed,
        start=start,
        row_ids=row_ids,
    )


def _check_args(*, seq_len: int, micro_batch: int, objective: str, rank: int, world: int) -> None:
    if objective not in OBJECTIVES:
        raise InputError(f"data objective {shown(objective)} is not one of {', '.join(OBJECTIVES)}")
    for key, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world", world)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{key} must be a positive integer, got {shown(value)}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise InputError(f"rank must be an integer in 0..{world - 1}, got {shown(rank)}")


@dataclass(frozen=True)
class _Rows:
    """The stored ids cut into `count` rows of `seq_len` tokens (the final partial row dropped)."""

    stored: TokenFile
    seq_len: int
    count: int

    def take(self, picked: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `picked` as a batch: "input_ids", "attention_mask" (all True: rows are full), "position_ids"
        (counting from 0 at each document's start and at the row's start, so that models whose attention
        reads them keep documents apart, see gkd.runtime.packing), and for masked data "trained" (the token is
        a target of the loss) and "loss_mask" (the position's output is trained: the next token is a trained
        token of the same document; the row's last position looks at the first token of the next row)."""
        seq_len = self.seq_len
        ids = self.stored.ids()
        where = picked[:, None].astype(np.int64) * seq_len + np.arange(seq_len)  # token offsets (B, T)
        starts = self.stored.starts()
        document = np.searchsorted(starts, where, side="right") - 1
        begin = np.maximum(starts[np.maximum(document, 0)] if len(starts) else 0, where[:, :1])
        out = {
            "input_ids": torch.from_numpy(ids[where].astype(np.int64)),
            "attention_mask": torch.ones(where.shape, dtype=torch.bool),
            "position_ids": torch.from_numpy(where - begin),
        }
        flags = self.stored.trained()
        if flags is not None:
            following = np.minimum(where + 1, self.stored.tokens - 1)
            same = (np.searchsorted(starts, following, side="right") - 1 == document) & (
                where + 1 < self.stored.tokens
            )
            out["trained"] = torch.from_numpy(flags[where].astype(bool))
            out["loss_mask"] = torch.from_numpy(flags[following].astype(bool) & same)
        return out


def _generate(
    rows: _Rows,
    tokenizer: Tokenizer,
    *,
    micro_batch: int,
    objective: str,
    rank: int,
    world: int,
    seed: int,
    start: int,
    row_ids: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    special = _special_ids(tokenizer)
    ordinary = _ordinary_ids(tokenizer.vocab_size, special) if objective == "mlm" else None
    order, epoch = torch.zeros(0, dtype=torch.long), -1  # the permutation of the epoch last read
    offsets = (torch.arange(micro_batch) * world + rank).tolist()  # this rank's rows in a global micro-batch
    position = start
    while True:
        positions = [position + offset for offset in offsets]
        picked = []
        for p in positions:
            if p // rows.count != epoch:
                epoch = p // rows.count
                order = torch.randperm(rows.count, generator=_generator(seed, epoch))
            picked.append(int(order[p % rows.count]))
        numbers = torch.tensor(picked, dtype=torch.long)
        # Only this batch's rows are read from the stored ids.
        batch = rows.take(numbers.numpy())
        input_ids = batch["input_ids"]
        if objective == "causal":
            # Labels are the input ids (the model shifts them), -100 where a token is not a target.
            trained = batch.pop("trained", None)
            labels = input_ids.clone() if trained is None else input_ids.masked_fill(~trained, -100)
            batch = {**batch, "labels": labels}
        else:
            assert ordinary is not None and tokenizer.mask_id is not None
            masked, labels = [], []
            for j, p in enumerate(positions):
                row_masked, row_labels = mask_tokens(
                    input_ids[j : j + 1],
                    mask_id=tokenizer.mask_id,
                    ordinary_ids=ordinary,
                    special_ids=special,
                    generator=_generator(seed, p, _MASKING),
                )
                masked.append(row_masked)
                labels.append(row_labels)
            batch = {**batch, "input_ids": torch.cat(masked), "labels": torch.cat(labels)}
        if row_ids:
            batch["row_ids"] = numbers
        yield batch
        position += world * micro_batch


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    ordinary_ids: torch.Tensor,
    special_ids: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a (B, T) batch: (masked input_ids, labels). Special ids are never chosen; random
    replacements are drawn from `ordinary_ids`. At least one position is chosen when any is eligible, so a
    short batch never gives an all-ignored MLM loss (which would be NaN)."""
    eligible = ~torch.isin(input_ids, special_ids)
    chosen = (torch.rand(input_ids.shape, generator=generator) < MLM_CHOOSE) & eligible
    if not chosen.any() and eligible.any():
        candidates = eligible.flatten().nonzero().squeeze(1)
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        chosen.view(-1)[pick] = True
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (action < MLM_MASK)
    to_random = chosen & (action >= MLM_MASK) & (action < MLM_MASK + MLM_RANDOM)
    random_ids = ordinary_ids[torch.randint(len(ordinary_ids), input_ids.shape, generator=generator)]
    masked = input_ids.clone()
    masked[to_mask] = mask_id
    masked[to_random] = random_ids[to_random]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


def _special_ids(tokenizer: Tokenizer) -> torch.Tensor:
    ids = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id}
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:  # a transformers tokenizer also knows its unk / cls / sep / added special ids
        ids.update(hf.all_special_ids)
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def _ordinary_ids(vocab_size: int, special: torch.Tensor) -> torch.Tensor:
    ids = torch.arange(vocab_size)
    return ids[~torch.isin(ids, special)]


def _generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers; hashing keeps distinct tuples apart."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator
