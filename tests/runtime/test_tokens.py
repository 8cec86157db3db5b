"""The stored token files behind gkd.runtime.data.batches: tokenised once per source and tokenizer, the same
ids as encoding each document alone, rebuilt when the source changes, and nothing left behind by a failure."""

from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd.errors import InputError
from gkd.runtime import tokens
from gkd.runtime.data import ByteTokenizer, HFTokenizer, batches, prepare_tokens, read_documents


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own cache folder, so that one test's entries never serve another."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("GKD_CACHE_DIR", str(folder))
    return folder


class CountingBytes(ByteTokenizer):
    """The byte tokenizer, counting the documents it encodes."""

    def __init__(self) -> None:
        self.encoded = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.encoded += len(texts)
        return super().encode_batch(texts)


def _reference(documents: list[str], tokenizer: ByteTokenizer | HFTokenizer) -> list[int]:
    """Each document encoded alone, followed by eos."""
    return [i for doc in documents for i in [*tokenizer.encode(doc), tokenizer.eos_id]]


def _take(source: str, tokenizer: ByteTokenizer, count: int, **kwargs: int) -> list[torch.Tensor]:
    it = batches(source, tokenizer, seq_len=16, micro_batch=2, objective="causal", **kwargs)
    return [batch["input_ids"] for batch in islice(it, count)]


def test_tokenised_once_and_the_same_batches_again(tmp_path: Path, own_cache: Path) -> None:
    source = tmp_path / "docs.txt"
    documents = [f"document {i} " + "word " * (i % 7) for i in range(3000)]  # more than one encode batch
    source.write_text("\n".join(documents) + "\n", encoding="utf-8")
    tok = CountingBytes()
    stored, built = prepare_tokens(str(source), tok)
    assert built and tok.encoded == 3000 and stored.documents == 3000
    assert stored.dtype == "uint16" and isinstance(stored.ids(), np.memmap)
    assert stored.ids().tolist() == _reference(documents, tok)
    first = _take(str(source), tok, 5, rank=1, world=2, seed=3)
    assert tok.encoded == 3000  # the second and third use read the stored ids
    again = _take(str(source), tok, 5, rank=1, world=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sorted(p.suffix for p in (own_cache / "tokens").iterdir()) == [".bin", ".docs", ".json"]


def test_an_edited_source_is_tokenised_again(tmp_path: Path) -> None:
    source = tmp_path / "docs.txt"
    source.write_text("alpha beta\n" * 40, encoding="utf-8")
    tok = CountingBytes()
    before, _ = prepare_tokens(str(source), tok)
    source.write_text("gamma delta\n" * 50, encoding="utf-8")
    after, built = prepare_tokens(str(source), tok)
    assert built and after.path != before.path
    assert after.ids().tolist() == _reference(["gamma delta"] * 50, tok)


def test_a_bad_line_late_in_the_source_leaves_nothing(tmp_path: Path, own_cache: Path) -> None:
    source = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(2500)] + ['{"title": "no text"}']
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2501 has no"):
        prepare_tokens(str(source), ByteTokenizer())
    assert list((own_cache / "tokens").iterdir()) == []  # the first 2500 documents' ids are not kept


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    source = tmp_path / "docs.txt"
    source.write_bytes(b"fine\nstill fine\ncaf\xe9\n")
    with pytest.raises(InputError, match=r"not UTF-8 text \(line 3, byte 3 of it\)"):
        read_documents(str(source))


def test_line_ends_as_universal_newlines(tmp_path: Path) -> None:
    source = tmp_path / "docs.txt"
    source.write_bytes(b"one\r\ntwo\rthree\n\n  \nfour")
    assert read_documents(str(source)) == ["one", "two", "three", "four"]


def test_a_damaged_entry_is_built_again(tmp_path: Path, own_cache: Path) -> None:
    source = tmp_path / "docs.txt"
    source.write_text("some words here\n" * 30, encoding="utf-8")
    stored, _ = prepare_tokens(str(source), ByteTokenizer())
    with open(stored.path, "r+b") as f:
        f.truncate(10)
    again, built = prepare_tokens(str(source), ByteTokenizer())
    assert built and again.ids().tolist() == _reference(["some words here"] * 30, ByteTokenizer())


def test_an_unwritable_cache_is_one_clear_error(tmp_path: Path, own_cache: Path) -> None:
    source = tmp_path / "docs.txt"
    source.write_text("some words here\n" * 30, encoding="utf-8")
    own_cache.write_text("a file where the cache folder should be")  # unwritable, even for root
    with pytest.raises(InputError, match=r"cannot store the tokenized data in .*GKD_CACHE_DIR") as info:
        prepare_tokens(str(source), ByteTokenizer())
    assert "\n" not in str(info.value)


def test_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    class Broken(ByteTokenizer):
        def encode_batch(self, texts: list[str]) -> list[list[int]]:
            return [[300] for _ in texts]

    source = tmp_path / "docs.txt"
    source.write_text("x\n", encoding="utf-8")
    with pytest.raises(InputError, match="id 300, outside its 256 tokens"):
        prepare_tokens(str(source), Broken())


def test_id_width_follows_the_vocabulary() -> None:
    assert tokens.id_dtype(256) == "uint16"
    assert tokens.id_dtype(65536) == "uint16"  # ids 0..65535
    assert tokens.id_dtype(65537) == "uint32"
    assert tokens.id_dtype(128256) == "uint32"


def test_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    assert read_documents(str(tmp_path / "bom.txt")) == ["first", "second"]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a b c"}\n')
    assert read_documents(str(tmp_path / "bom.jsonl")) == ["a b c"]


def test_an_interrupted_tokenization_leaves_no_partial_file(tmp_path: Path, own_cache: Path) -> None:
    """Ctrl-C or SIGTERM (which `gkd run` turns into an exception) while tokenizing: no partial file stays."""

    def documents():
        for i in range(3000):
            if i == 1500:
                raise KeyboardInterrupt
            yield f"document {i}", 1

    with pytest.raises(KeyboardInterrupt):
        tokens.stored_tokens("k", documents, ByteTokenizer().encode_batch, eos_id=2, vocab_size=256)
    assert list((own_cache / "tokens").iterdir()) == []


def test_sigterm_while_preparing_the_data_exits_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from gkd.runtime import executor

    def terminated(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the parent tokenizes

    monkeypatch.setattr(executor, "check_data", terminated)
    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        executor.run_job(tiny, out=str(tmp_path / "out"), processes=2, echo=lambda _: None)
    assert exit_info.value.code == 143
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone again
