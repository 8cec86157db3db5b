"""Records of a training source, and the documents (text segments with loss-mask flags) made from them.

`open_records(source, options)` opens what `--data` names through the `datasets` library: any data file
`datasets.load_dataset` reads (.json / .jsonl, .parquet, .csv, .arrow), a folder of such files (its
README's configurations and split names included), a folder written by `save_to_disk`, or a hub dataset id
(`org/name`) found in the local Hugging Face cache. `documents(records, format, tokenizer, ...)` turns
each record into a document for gkd.runtime.tokens:

- text: the record's text field, all of it trained;
- prompt_completion: the prompt (context) then the completion (trained); given as lists of messages, the
  two are rendered together with the chat template;
- chat: a "messages" list rendered with the teacher tokenizer's chat template, the assistant turns trained
  and everything else (system and user turns, the template's headers) context.

Design choices:
- The chat template is applied to text, not ids: each assistant turn's characters are found by rendering
  the conversation up to the turn (with the generation prompt) and up to its end, and the rendered text is
  cut there. Each piece is then encoded on its own (gkd.runtime.tokens), so the loss mask covers exactly
  the completion tokens whatever the tokenizer merges, with any tokenizer (fast or not), and no template
  needs `{% generation %}` markers. A template whose renderings of a conversation's beginnings are not
  prefixes of the whole (one that rewrites earlier turns) is refused with the record's number.
- Hub ids are resolved in the Hugging Face hub cache only (HF_HUB_CACHE, or HF_HOME/hub): the run never
  downloads; a dataset not there is refused with the command that fetches it. The snapshot folder is then
  read like any local folder, so offline and online machines read the same files.
- A single data file is its own "train" split; `split` and `subset` pick among the splits and
  configurations of a folder, a hub dataset or a `save_to_disk` DatasetDict.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.errors import InputError, shown

# Suffixes of the data files read through `datasets`, and the builder that reads each.
DATASET_FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Records read from a dataset at once.
READ_BATCH = 1000
# A hub id: a name, or an owner and a name (the characters the hub allows).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
FORMS = (
    "a .txt, .jsonl, .json, .parquet, .csv or .arrow file, a folder of such files or written by datasets' "
    "save_to_disk, or a hub dataset id in the Hugging Face cache"
)


@dataclass(frozen=True, kw_only=True)
class Records:
    """An opened source: `files` identify its content, `total` counts its records (None when streamed),
    `columns` names its fields (None when not known before reading), `rows()` yields the records."""

    files: list[Path]
    total: int | None
    columns: list[str] | None
    rows: Callable[[], Iterator[Mapping[str, Any]]]


def is_hub_id(source: str) -> bool:
    """Whether `source`, which names no file or folder, has the form of a hub dataset id."""
    return _HUB_ID.fullmatch(source) is not None and Path(source).suffix.lower() not in (
        *DATASET_FILES,
        ".txt",
    )


def source_ref(source: str) -> str:
    """`source` as a run records it: a file or folder made absolute (so that a resume from another folder
    reads the same files), a hub id as given."""
    path = Path(source).expanduser()
    return source if not path.exists() and is_hub_id(source) else str(path.resolve())


def check_exists(source: str, what: str) -> None:
    """Refuse a source that is neither a file or folder nor shaped like a hub id (whether a hub dataset is in
    the cache is checked where the data is opened)."""
    if not Path(source).expanduser().exists() and not is_hub_id(source):
        raise InputError(f"{what} {source} does not exist; give {FORMS}")


def open_records(source: str, *, split: str, subset: str | None, streaming: bool) -> Records:
    """The records of a data file, folder or cached hub dataset (see the module docstring)."""
    datasets = _datasets(source)
    path = Path(source).expanduser()
    if path.is_dir() and _saved_to_disk(path):
        return _saved(datasets, path, split)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        return _loaded(datasets, source, files, (str(path),), {"name": subset}, split, streaming)
    if path.is_file():
        builder = DATASET_FILES[path.suffix.lower()]
        # A single file is its own "train" split: `split` picks among a folder's or a hub dataset's splits.
        kwargs = {"data_files": str(path)}
        return _loaded(datasets, source, [path], (builder,), kwargs, "train", streaming)
    folder = hub_snapshot(source)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder))
    return _loaded(datasets, source, files, (str(folder),), {"name": subset}, split, streaming)


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (read now, not at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_snapshot(dataset_id: str) -> Path:
    """The cached snapshot folder of hub dataset `dataset_id` (its main revision); never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(
            snapshot_download(dataset_id, repo_type="dataset", cache_dir=str(cache), local_files_only=True)
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        offline = (
            " (HF_HUB_OFFLINE is set)"
            if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
            else ""
        )
        raise InputError(
            f"data source {shown(dataset_id)} is neither a file or folder nor a dataset in the Hugging Face "
            f"cache {cache}{offline}; give {FORMS}, or fetch it first with "
            f"`hf download {dataset_id} --repo-type dataset`"
        ) from None


def _datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"data source {source} is read through the datasets package; `pip install datasets` or give a "
            ".txt or .jsonl file"
        ) from None
    datasets.disable_progress_bars()  # the run prints its own progress
    return datasets


def _hidden(path: Path, root: Path) -> bool:
    """Files below a dot-folder (.cache, .git, .huggingface) or dot-files: not data, and changed by tools."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _error(source: str, err: Exception) -> InputError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return InputError(f"cannot read data source {source}: {err.__class__.__name__}: {shown(detail, 200)}")


def _saved(datasets: Any, path: Path, split: str) -> Records:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict's `split` (its only split when it has one)."""
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ... for foreign folders
        raise InputError(
            f"cannot load data folder {path} ({err.__class__.__name__}); give a folder written by "
            f"datasets' save_to_disk, or {FORMS}"
        ) from None
    if isinstance(dataset, Mapping):  # a DatasetDict
        splits = sorted(dataset)
        if split in dataset:
            dataset = dataset[split]
        elif len(splits) == 1:
            dataset = dataset[splits[0]]
        else:
            raise InputError(
                f"data folder {path} has splits {', '.join(splits)} and none is {shown(split)}; "
                "set data.split to one of them"
            )
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return Records(files=files, total=len(dataset), columns=list(dataset.column_names), rows=_rows(dataset))


def _loaded(
    datasets: Any,
    source: str,
    files: list[Path],
    args: tuple[str, ...],
    kwargs: dict[str, Any],
    split: str,
    streaming: bool,
) -> Records:
    try:
        dataset = datasets.load_dataset(*args, **kwargs, split=split, streaming=streaming)
    except Exception as err:  # datasets raises many kinds: no data files, an unknown split, a parse error
        raise _error(source, err) from None
    columns = dataset.column_names
    total = None if streaming else len(dataset)
    return Records(
        files=files, total=total, columns=None if columns is None else list(columns), rows=_rows(dataset)
    )


def _rows(dataset: Any) -> Callable[[], Iterator[Mapping[str, Any]]]:
    def rows() -> Iterator[Mapping[str, Any]]:
        for chunk in dataset.iter(batch_size=READ_BATCH):
            names = list(chunk)
            for values in zip(*(chunk[name] for name in names), strict=True):
                yield dict(zip(names, values, strict=True))

    return rows


# ----------------------------------------------------------------------------------------------------------
# Records -> documents
# ----------------------------------------------------------------------------------------------------------

Segments = list[tuple[str, bool]]


def detect_format(fields: Sequence[str]) -> str:
    """The format of records with these fields (data.format auto)."""
    if "messages" in fields:
        return "chat"
    if "prompt" in fields and "completion" in fields:
        return "prompt_completion"
    return "text"


def check_fields(fields: Sequence[str], form: str, text_field: str, where: str) -> None:
    """Refuse a source whose records lack the fields of `form`."""
    need = {"text": [text_field], "chat": ["messages"], "prompt_completion": ["prompt", "completion"]}[form]
    missing = [name for name in need if name not in fields]
    if missing:
        hint = "set data.text_field to the column holding the text" if form == "text" else "set data.format"
        raise InputError(
            f"{where} has no {', '.join(repr(m) for m in missing)} field for {form} records (fields: "
            f"{', '.join(map(str, fields)) or 'none'}); {hint}"
        )


@dataclass(frozen=True)
class ChatTemplate:
    """The teacher tokenizer's chat template: renders a list of messages to text."""

    render: Callable[[list[dict[str, Any]], bool], str]


def chat_template(tokenizer: Any) -> ChatTemplate | None:
    """The chat template of a gkd tokenizer (its transformers tokenizer's), or None when it has none."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None or not getattr(hf, "chat_template", None):
        return None

    def render(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return str(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))

    return ChatTemplate(render)


def segments(
    record: Mapping[str, Any], form: str, text_field: str, template: ChatTemplate | None, where: str
) -> Segments:
    """One record as (text, trained) segments; empty when the record holds no text. Raises InputError naming
    `where` (the record's line or row) for a record of the wrong shape."""
    if form == "text":
        text = record.get(text_field)
        if text is None:
            return []
        if not isinstance(text, str):
            raise InputError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
        return [(text, True)] if text else []
    if form == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return [(prompt, False), (completion, True)]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _conversation(_messages(prompt, where), _messages(completion, where), template, where)
        raise InputError(
            f"{where}: prompt and completion must both be text or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    messages = _messages(record.get("messages"), where)
    return _conversation([], messages, template, where)


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InputError(f"{where}: each message needs a role and a content, got {shown(message)}")
    return [dict(m) for m in value]


def _conversation(
    prompt: list[dict[str, Any]], messages: list[dict[str, Any]], template: ChatTemplate | None, where: str
) -> Segments:
    """`prompt` + `messages` rendered with the chat template; the assistant turns of `messages` trained (all
    of `messages` when `prompt` is given: a conversational completion)."""
    if template is None:
        raise InputError(
            f"{where} is a conversation, which is rendered with the teacher tokenizer's chat template, and "
            "the teacher has none; use a teacher folder whose tokenizer has a chat_template, or give "
            "prompt/completion text"
        )
    conversation = prompt + messages
    if prompt:
        spans = [(len(prompt), len(conversation))]  # one trained span: the whole completion
    else:
        spans = [(i, i + 1) for i, m in enumerate(conversation) if m["role"] == "assistant"]
    try:
        full = template.render(conversation, False)
        out: Segments = []
        done = 0
        for first, end in spans:
            # The turn starts after the template's header for it (the generation prompt) and ends where the
            # conversation up to it ends.
            head = template.render(conversation[:first], True) if first else ""
            upto = template.render(conversation[:end], False)
            start = len(head)
            if not (full.startswith(upto) and upto.startswith(head) and start >= done):
                raise InputError(
                    f"{where}: the chat template does not render this conversation's beginnings as "
                    "prefixes of the whole (it rewrites earlier turns), so the completion tokens cannot be "
                    "found; use data.loss_mask all, or a template without that rewriting"
                )
            out += [(full[done:start], False), (full[start : len(upto)], True)]
            done = len(upto)
        out.append((full[done:], False))
    except InputError:
        raise
    except Exception as err:  # jinja2 errors, a template raising on a role it does not know
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(
            f"{where}: the chat template failed on it ({err.__class__.__name__}: {shown(detail, 120)})"
        ) from None
    return [(text, flag) for text, flag in out if text]
