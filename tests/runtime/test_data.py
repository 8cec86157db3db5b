"""Tests of gkd.runtime.data: tokenizers, sources, packing, rank split, determinism and MLM masking.

Specs with a 512-token vocabulary are built from the tiny presets' configs with `spec_from_config`, so that
folder tokenizers and the byte tokenizer's checks have room; the tiny presets themselves (vocabulary 256) take
the byte tokenizer as they are.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from gkd.errors import InputError
from gkd.models import ModelSpec, resolve_model, spec_from_config
from gkd.runtime.data import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    batches,
    load_tokenizer,
    prepare_tokens,
    read_documents,
)


def token_stream(documents: list[str], tokenizer: Tokenizer) -> list[int]:
    """The reference: all documents' ids, one at a time, each followed by eos."""
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer.encode(document))
        if tokenizer.eos_id is not None:
            stream.append(tokenizer.eos_id)
    return stream


def pack(stream: list[int], seq_len: int) -> torch.Tensor:
    """The reference: the stream cut into full rows, the final partial row dropped."""
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def _spec(preset: str, vocab: int) -> ModelSpec:
    config = dict(resolve_model(preset).hf_config)
    config["vocab_size"] = vocab
    return spec_from_config(config, name=f"{preset}-v{vocab}")


@pytest.fixture(scope="module")
def llama512() -> ModelSpec:
    return _spec("tiny-llama-student", 512)


@pytest.fixture(scope="module")
def bert512() -> ModelSpec:
    return _spec("tiny-bert-student", 512)


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _docs(count: int, length: int) -> list[str]:
    """Distinct ASCII documents of exactly `length` characters."""
    return [f"doc {i:04d} ".ljust(length, "abcdefghij"[i % 10]) for i in range(count)]


def _rows(batch_list: list[dict[str, torch.Tensor]]) -> Counter[tuple[int, ...]]:
    return Counter(tuple(row.tolist()) for batch in batch_list for row in batch["input_ids"])


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Distillation héllo, 世界! \t end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(4 <= i < 256 for i in ids)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 1, 2, 3, 256)
    # The control codes that carry the specials never come out of text.
    assert tok.encode("a\x00b\x01c\x02d\x03e") == list(b"abcde")


def test_byte_tokenizer_fits_the_tiny_presets_and_needs_256_ids() -> None:
    tiny = resolve_model("tiny-llama-student")
    assert tiny.vocab == 256
    assert isinstance(load_tokenizer("tiny-llama-student", tiny), ByteTokenizer)
    with pytest.raises(InputError, match=r"vocabulary of 200 .* needs 256 ids") as info:
        load_tokenizer("tiny-llama-student", _spec("tiny-llama-student", 200))
    assert "\n" not in str(info.value)


def _save_word_tokenizer(folder: Path, *, mask: bool = True, eos: bool = True) -> list[str]:
    """A WordLevel tokenizer trained offline on a few lines, saved beside a config.json. Returns its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]"] + (["[MASK]"] if mask else []) + (["[EOS]"] if eos else [])
    lines = ["the teacher knows more", "the student learns from the teacher", "memory is scarce"]
    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator(lines, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    extra = {"mask_token": "[MASK]"} if mask else {}
    extra.update({"eos_token": "[EOS]"} if eos else {})
    fast = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]", **extra)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    config = dict(resolve_model("tiny-llama-student").hf_config)
    config["vocab_size"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    return sorted({word for line in lines for word in line.split()})


def test_folder_tokenizer_is_used(tmp_path: Path, llama512: ModelSpec) -> None:
    _save_word_tokenizer(tmp_path / "model")
    vocab = json.loads((tmp_path / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    for ref in (str(tmp_path / "model"), str(tmp_path / "model" / "config.json")):
        tok = load_tokenizer(ref, llama512)
        assert isinstance(tok, HFTokenizer)
        # No per-text special tokens: packing adds the eos separators itself.
        assert tok.encode("the student knows memory") == [
            vocab["the"],
            vocab["student"],
            vocab["knows"],
            vocab["memory"],
        ]
        assert (tok.pad_id, tok.mask_id, tok.eos_id) == (vocab["[PAD]"], vocab["[MASK]"], vocab["[EOS]"])
        assert tok.vocab_size == len(vocab)


def test_folder_without_tokenizer_files_uses_bytes(tmp_path: Path, llama512: ModelSpec) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama512.hf_config))
    assert isinstance(load_tokenizer(str(tmp_path), llama512), ByteTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "config.json"), llama512), ByteTokenizer)


def test_folder_tokenizer_larger_than_vocab(tmp_path: Path) -> None:
    _save_word_tokenizer(tmp_path)
    small = _spec("tiny-llama-student", 8)
    with pytest.raises(InputError, match=r"has \d+ tokens but model .* vocabulary of 8"):
        load_tokenizer(str(tmp_path), small)


def test_broken_tokenizer_folder(tmp_path: Path, llama512: ModelSpec) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot load the tokenizer") as info:
        load_tokenizer(str(tmp_path), llama512)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def test_txt_documents(tmp_path: Path) -> None:
    assert read_documents(_write(tmp_path / "a.txt", "first doc\n\n  \nsecond doc\r\nthird\n")) == [
        "first doc",
        "second doc",
        "third",
    ]
    assert read_documents(_write(tmp_path / "b.txt", "one whole document. Two sentences.")) == [
        "one whole document. Two sentences."
    ]


def test_jsonl_documents(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"text": "alpha", "id": 1}\n\n{"text": "beta\\ngamma"}\n')
    assert read_documents(path) == ["alpha", "beta\ngamma"]


@pytest.mark.parametrize(
    "third_line",
    ['{"title": "no text"}', '{"text": 5}', "[1, 2]", "{broken"],
)
def test_jsonl_bad_line_names_its_number(tmp_path: Path, third_line: str) -> None:
    path = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n' + third_line + "\n")
    with pytest.raises(InputError, match="line 3") as info:
        read_documents(path)
    assert "\n" not in str(info.value)


def test_folder_without_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where datasets is installed
    with pytest.raises(InputError, match="pip install datasets"):
        read_documents(str(tmp_path))


def test_unsupported_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"unsupported type \.docx.*\.txt.*\.jsonl"):
        read_documents(_write(tmp_path / "a.docx", "text\nx\n"))
    with pytest.raises(InputError, match="does not exist"):
        read_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_documents(str(tmp_path / "latin1.txt"))


def test_too_small_source_says_tokens_needed(tmp_path: Path) -> None:
    path = _write(tmp_path / "small.txt", "\n".join(_docs(5, 15)) + "\n")  # 5 x 16 = 80 tokens
    with pytest.raises(InputError, match=r"at least 128 tokens") as info:
        batches(path, ByteTokenizer(), seq_len=16, micro_batch=2, objective="causal", rank=0, world=4)
    assert "\n" not in str(info.value)
    # 80 tokens are 5 rows of 16: enough for 2 ranks x micro_batch 2.
    assert next(batches(path, ByteTokenizer(), seq_len=16, micro_batch=2, objective="causal", world=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "seq2seq"}, "objective"),
        ({"seq_len": 0}, "seq_len"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"rank": 2, "world": 2}, "rank"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"seq_len": 8, "micro_batch": 1, "objective": "causal"} | kwargs
    with pytest.raises(InputError, match=message):
        batches(None, ByteTokenizer(), **args)  # type: ignore[arg-type]


def test_mlm_needs_mask_token(tmp_path: Path, llama512: ModelSpec) -> None:
    _save_word_tokenizer(tmp_path, mask=False)
    tok = load_tokenizer(str(tmp_path), llama512)
    assert tok.mask_id is None
    with pytest.raises(InputError, match="mask token"):
        batches(None, tok, seq_len=8, micro_batch=1, objective="mlm")


# ---------------------------------------------------------------------------------------------------------
# Packing, ranks, determinism
# ---------------------------------------------------------------------------------------------------------


def test_packing_matches_token_stream(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    docs = ["short", "a somewhat longer document", "ünïcödé", "x" * 40]
    path = _write(tmp_path / "docs.txt", "\n".join(docs) + "\n")
    stream = [i for doc in docs for i in [*doc.encode("utf-8"), tok.eos_id]]
    assert token_stream(read_documents(path), tok) == stream
    seq_len = 7
    rows = pack(stream, seq_len)
    assert rows.shape == (len(stream) // seq_len, seq_len)
    assert rows.flatten().tolist() == stream[: rows.numel()]  # the final partial row is dropped
    # One epoch of batches holds exactly the packed rows, each exactly seq_len long.
    it = batches(path, tok, seq_len=seq_len, micro_batch=1, objective="causal")
    epoch = list(islice(it, rows.shape[0]))
    assert all(b["input_ids"].shape == (1, seq_len) for b in epoch)
    assert _rows(epoch) == Counter(tuple(r) for r in rows.tolist())


def test_ranks_partition_each_epoch(tmp_path: Path) -> None:
    # 12 documents of 15 bytes + eos = 12 rows of 16 tokens, one document per row.
    path = _write(tmp_path / "docs.txt", "\n".join(_docs(12, 15)) + "\n")
    tok = ByteTokenizer()
    all_rows = Counter(tuple(r) for r in pack(token_stream(read_documents(path), tok), 16).tolist())
    assert len(all_rows) == 12
    world, micro_batch = 3, 2  # 4 rows per rank per epoch: 2 batches
    per_rank = [
        list(
            islice(
                batches(
                    path,
                    tok,
                    seq_len=16,
                    micro_batch=micro_batch,
                    objective="causal",
                    rank=r,
                    world=world,
                    seed=5,
                ),
                4,
            )
        )
        for r in range(world)
    ]
    for epoch in (slice(0, 2), slice(2, 4)):
        seen = [_rows(batch_list[epoch]) for batch_list in per_rank]
        assert sum(seen, Counter()) == all_rows  # disjoint, and together they cover the epoch
        assert all(sum(counts.values()) == 4 for counts in seen)
    # Rows are shuffled, not read in file order.
    one_rank = list(islice(batches(path, tok, seq_len=16, micro_batch=1, objective="causal", seed=5), 12))
    in_order = pack(token_stream(read_documents(path), tok), 16)
    assert _rows(one_rank) == all_rows
    assert [b["input_ids"][0].tolist() for b in one_rank] != in_order.tolist()
    # A new epoch reshuffles: rank 0's rows differ between the two epochs (fixed seed, so deterministic).
    assert _rows(per_rank[0][0:2]) != _rows(per_rank[0][2:4])


def test_rows_that_do_not_divide_into_batches_carry_over(tmp_path: Path) -> None:
    # 5 rows, micro_batch 2: the 3rd batch spans the epoch boundary; nothing is dropped.
    path = _write(tmp_path / "docs.txt", "\n".join(_docs(5, 15)) + "\n")
    got = list(islice(batches(path, ByteTokenizer(), seq_len=16, micro_batch=2, objective="causal"), 5))
    rows = [tuple(r) for b in got for r in b["input_ids"].tolist()]
    assert len(set(rows[:5])) == 5 and len(set(rows[5:10])) == 5


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_determinism_per_seed(objective: str) -> None:
    def take(seed: int, rank: int = 0) -> list[dict[str, torch.Tensor]]:
        it = batches(
            None,
            ByteTokenizer(),
            seq_len=32,
            micro_batch=4,
            objective=objective,
            rank=rank,
            world=2,
            seed=seed,
        )
        return list(islice(it, 3))

    def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
        return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)

    assert same(take(0), take(0))
    assert same(take(7, rank=1), take(7, rank=1))
    assert not same(take(0), take(1))
    assert not same(take(0, rank=0), take(0, rank=1))


# ---------------------------------------------------------------------------------------------------------
# Batch contents
# ---------------------------------------------------------------------------------------------------------


def test_builtin_corpus_causal_batches(llama512: ModelSpec) -> None:
    tok = load_tokenizer("tiny-llama-student", llama512)
    assert isinstance(tok, ByteTokenizer)
    for batch in islice(batches(None, tok, seq_len=64, micro_batch=3, objective="causal", seed=1), 4):
        assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
        assert batch["input_ids"].shape == batch["labels"].shape == (3, 64)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert batch["attention_mask"].dtype == torch.bool and bool(batch["attention_mask"].all())
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()  # a copy, not an alias
        assert int(batch["input_ids"].max()) < llama512.vocab
    # The built-in corpus is plain English prose of a few tens of KB.
    docs = read_documents(None)
    assert len(docs) >= 200 and 20_000 < sum(len(d) for d in docs) < 100_000


def test_mlm_masking_statistics(bert512: ModelSpec) -> None:
    tok = load_tokenizer("tiny-bert-student", bert512)
    kwargs = {"seq_len": 128, "micro_batch": 64, "rank": 1, "world": 2, "seed": 3}
    mlm = next(batches(None, tok, objective="mlm", **kwargs))  # type: ignore[arg-type]
    original = next(batches(None, tok, objective="causal", **kwargs))["input_ids"]  # same rows, unmasked
    ids, labels = mlm["input_ids"], mlm["labels"]
    assert ids.shape == labels.shape == original.shape == (64, 128)
    assert bool(mlm["attention_mask"].all())

    chosen = labels != -100
    eligible = original != tok.eos_id
    assert not bool((chosen & ~eligible).any())  # separators are never chosen
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen], original[~chosen])  # untouched outside the chosen positions

    n_chosen = int(chosen.sum())
    assert 0.13 < n_chosen / int(eligible.sum()) < 0.17
    masked = chosen & (ids == tok.mask_id)
    unchanged = chosen & (ids == original)
    randomised = chosen & (ids != tok.mask_id) & (ids != original)
    assert int(masked.sum() + unchanged.sum() + randomised.sum()) == n_chosen
    assert 0.75 < int(masked.sum()) / n_chosen < 0.85
    assert 0.06 < int(randomised.sum()) / n_chosen < 0.14
    assert 0.06 < int(unchanged.sum()) / n_chosen < 0.14
    assert int(ids[randomised].min()) >= 4  # random replacements are ordinary byte ids, never specials

    # Masking is seeded per rank: the same batch index on another rank chooses other positions.
    other = next(batches(None, tok, objective="mlm", **(kwargs | {"rank": 0})))  # type: ignore[arg-type]
    other_original = next(batches(None, tok, objective="causal", **(kwargs | {"rank": 0})))["input_ids"]
    both = eligible & (other_original != tok.eos_id)
    assert not torch.equal(chosen[both], (other["labels"] != -100)[both])


def test_mlm_short_batch_has_a_label() -> None:
    # 4 tokens per batch: with 15% alone, about half of all batches would have no label (a NaN MLM loss).
    it = batches(None, ByteTokenizer(), seq_len=4, micro_batch=1, objective="mlm", seed=2)
    for batch in islice(it, 30):
        assert int((batch["labels"] != -100).sum()) >= 1


def test_mlm_with_folder_tokenizer_separates_with_sep(tmp_path: Path, bert512: ModelSpec) -> None:
    # A BERT-style tokenizer has no eos: documents are joined with its sep token.
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    model.train_from_iterator(["the cat sat", "a dog ran"], trainer=trainer)
    vocab = model.get_vocab()
    # BERT's own template, which packing must not apply per document.
    model.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path), bert512)
    assert tok.eos_id == vocab["[SEP]"] and tok.mask_id == vocab["[MASK]"]
    source = _write(tmp_path / "docs.txt", "the cat sat\na dog ran\n" * 20)
    stream = token_stream(read_documents(source), tok)
    assert stream[:4] == [vocab["the"], vocab["cat"], vocab["sat"], vocab["[SEP]"]]
    batch = next(batches(source, tok, seq_len=8, micro_batch=4, objective="mlm"))
    specials = torch.tensor([vocab[s] for s in ("[UNK]", "[PAD]", "[CLS]", "[SEP]")])
    chosen = batch["labels"] != -100
    assert not bool(torch.isin(batch["labels"][chosen], specials).any())


def test_a_folder_tokenizer_stores_its_own_ids(
    tmp_path: Path, llama512: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same source under another tokenizer is another stored entry, and the batched encode gives the
    ids of each document encoded alone."""
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path / "cache"))
    _save_word_tokenizer(tmp_path / "model")
    word = load_tokenizer(str(tmp_path / "model"), llama512)
    documents = ["the teacher knows more", "memory is scarce", "the student learns from the teacher"] * 700
    source = _write(tmp_path / "docs.txt", "\n".join(documents) + "\n")
    by_bytes, _ = prepare_tokens(source, ByteTokenizer())
    by_words, built = prepare_tokens(source, word)
    assert built and by_words.path != by_bytes.path
    assert by_words.ids().tolist() == token_stream(documents, word)
