"""Sources read through `datasets` (parquet, csv, json, save_to_disk folders, cached hub ids), chat and
prompt/completion records with their completion-only loss mask, and a few training steps on each source.

Nothing downloads: the hub id is a snapshot folder written into a Hugging Face cache under tmp_path, as
`hf download` leaves it, and HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import functools
import json
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from gkd.config import Config, DataConfig
from gkd.errors import InputError
from gkd.runtime.data import (
    ByteTokenizer,
    HFTokenizer,
    batches,
    load_tokenizer,
    prepare_tokens,
    read_documents,
)
from gkd.runtime.records import is_hub_id

datasets = pytest.importorskip("datasets")

TEXTS = [f"document {i}: " + "the quick brown fox " * (1 + i % 3) for i in range(40)]

# A ChatML-like template, as many chat models ship it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"what is {i} plus one?"},
        {"role": "assistant", "content": f"it is {i + 1}"},
        {"role": "user", "content": "and twice that?"},
        {"role": "assistant", "content": f"{2 * (i + 1)}"},
    ]
    for i in range(30)
]
PAIRS = [
    {"prompt": f"count to {i}:", "completion": " " + " ".join(map(str, range(i % 5 + 1)))} for i in range(30)
]


@pytest.fixture(autouse=True)
def own_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token store, datasets' Arrow cache and the hub cache under tmp_path; never the network."""
    monkeypatch.setenv("GKD_CACHE_DIR", str(tmp_path / "gkd-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _text_table() -> Any:
    return datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})


def cached_hub_dataset(hub: Path, repo_id: str, files: dict[str, Any]) -> None:
    """Write a dataset snapshot into the hub cache as huggingface_hub lays it out: blobs, a snapshot folder
    of links to them, and refs/main naming the snapshot."""
    repo = hub / f"datasets--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for name, table in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = repo / "blobs" / f"blob-{name.replace('/', '-')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(blob)) if name.endswith(".parquet") else blob.write_text(table)
        target.symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def _sources(tmp_path: Path) -> dict[str, str]:
    """One text source of each kind, all holding TEXTS."""
    table = _text_table()
    out = {}
    table.to_parquet(str(tmp_path / "data.parquet"))
    out["parquet"] = str(tmp_path / "data.parquet")
    table.to_csv(str(tmp_path / "data.csv"), index=False)
    out["csv"] = str(tmp_path / "data.csv")
    (tmp_path / "data.json").write_text(json.dumps([{"text": t} for t in TEXTS]))  # a JSON array
    out["json"] = str(tmp_path / "data.json")
    table.save_to_disk(str(tmp_path / "saved"))
    out["save_to_disk"] = str(tmp_path / "saved")
    folder = tmp_path / "files" / "data"
    folder.mkdir(parents=True)
    table.select(range(20)).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    table.select(range(20, 40)).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    out["folder"] = str(tmp_path / "files")
    cached_hub_dataset(tmp_path / "hub", "gkd-test/tiny-text", {"data/train-00000-of-00001.parquet": table})
    out["hub"] = "gkd-test/tiny-text"
    return out


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "save_to_disk", "folder", "hub"])
def test_each_source_gives_its_documents(tmp_path: Path, kind: str) -> None:
    source = _sources(tmp_path)[kind]
    assert read_documents(source) == TEXTS
    streamed = DataConfig(streaming=True)
    if kind != "save_to_disk":  # a save_to_disk folder is memory-mapped: nothing to stream
        assert read_documents(source, streamed) == TEXTS


def test_split_subset_and_text_field(tmp_path: Path) -> None:
    both = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["a b", "c d"]}),
            "test": datasets.Dataset.from_dict({"body": ["e f"]}),
        }
    )
    both.save_to_disk(str(tmp_path / "dict"))
    assert read_documents(str(tmp_path / "dict"), DataConfig(text_field="body")) == ["a b", "c d"]
    assert read_documents(str(tmp_path / "dict"), DataConfig(text_field="body", split="test")) == ["e f"]
    with pytest.raises(InputError, match="none is 'valid'"):
        read_documents(str(tmp_path / "dict"), DataConfig(text_field="body", split="valid"))
    with pytest.raises(InputError, match="no 'text' field.*fields: body.*data.text_field"):
        read_documents(str(tmp_path / "dict"))
    # A hub dataset with two configurations (its README's), picked by data.subset, and its test split.
    card = (
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - {split: train, path: small/train.parquet}\n"
        "  - {split: test, path: small/test.parquet}\n- config_name: large\n  data_files:\n"
        "  - {split: train, path: large/train.parquet}\n---\n"
    )
    cached_hub_dataset(
        tmp_path / "hub",
        "gkd-test/two-configs",
        {
            "README.md": card,
            "small/train.parquet": datasets.Dataset.from_dict({"text": ["small train"]}),
            "small/test.parquet": datasets.Dataset.from_dict({"text": ["small test"]}),
            "large/train.parquet": datasets.Dataset.from_dict({"text": ["large train"]}),
        },
    )
    assert read_documents("gkd-test/two-configs", DataConfig(subset="large")) == ["large train"]
    assert read_documents("gkd-test/two-configs", DataConfig(subset="small", split="test")) == ["small test"]


def test_a_hub_id_not_in_the_cache_names_it_and_the_offline_setting(tmp_path: Path) -> None:
    assert is_hub_id("org/name") and is_hub_id("wikitext") and not is_hub_id("data.parquet")
    with pytest.raises(
        InputError, match=r"org/absent.*Hugging Face cache.*HF_HUB_OFFLINE.*hf download"
    ) as info:
        read_documents("org/absent")
    assert "\n" not in str(info.value)


def test_bad_dataset_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read data source .*bad.parquet") as info:
        read_documents(str(tmp_path / "bad.parquet"))
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="data.split must be a non-empty name"):
        Config.from_dict({"data": {"split": ""}})
    with pytest.raises(InputError, match="data has no setting 'path'"):
        Config.from_dict({"data": {"path": "x"}})
    with pytest.raises(InputError, match="data.loss_mask completion needs records with a completion"):
        Config.from_dict({"data": {"format": "text", "loss_mask": "completion"}})
    with pytest.raises(InputError, match="data.format 'xml' is not one of auto, text, chat"):
        Config.from_dict({"data": {"format": "xml"}})


# ---------------------------------------------------------------------------------------------------------
# Chat and prompt/completion records
# ---------------------------------------------------------------------------------------------------------


def save_chat_tokenizer(folder: Path, vocab: int = 512) -> None:
    """A small byte-level BPE tokenizer with ChatML specials and CHAT_TEMPLATE, trained offline on the
    test's records (under 256 ids, so that it fits the tiny presets too), saved beside a tiny Llama
    config.json (vocabulary `vocab`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gkd.models import resolve_model

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    corpus = [f"{m['role']}\n{m['content']}\n" for chat in CHATS for m in chat]
    corpus += [p["prompt"] + p["completion"] for p in PAIRS]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    model.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=model,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    config = dict(resolve_model("tiny-llama-teacher").hf_config)
    config["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def chat_tokenizer(tmp_path: Path) -> HFTokenizer:
    from gkd.planner.specs import load_spec

    save_chat_tokenizer(tmp_path / "teacher")
    tokenizer = load_tokenizer(str(tmp_path / "teacher"), load_spec(str(tmp_path / "teacher")))
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


def _jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _trained_ids(source: str, tokenizer: HFTokenizer, options: DataConfig | None = None) -> list[list[int]]:
    """The stored trained ids of each document."""
    stored, _ = prepare_tokens(source, tokenizer, options=options)
    ids, flags, starts = stored.ids(), stored.trained(), [*stored.starts().tolist(), stored.tokens]
    assert flags is not None
    return [
        [int(i) for i, f in zip(ids[a:b], flags[a:b], strict=True) if f]
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


def test_prompt_completion_masks_exactly_the_completion(tmp_path: Path, chat_tokenizer: HFTokenizer) -> None:
    source = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    eos = chat_tokenizer.eos_id
    expected = [chat_tokenizer.encode(p["completion"]) + [eos] for p in PAIRS]
    assert _trained_ids(source, chat_tokenizer) == expected
    # The same records as a parquet file, and the whole record trained when asked.
    datasets.Dataset.from_list(PAIRS).to_parquet(str(tmp_path / "pairs.parquet"))
    assert _trained_ids(str(tmp_path / "pairs.parquet"), chat_tokenizer) == expected
    stored, _ = prepare_tokens(source, chat_tokenizer, options=DataConfig(loss_mask="all"))
    assert stored.trained() is None


def test_chat_masks_exactly_the_assistant_turns(tmp_path: Path, chat_tokenizer: HFTokenizer) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    expected = [
        [
            i
            for m in chat
            if m["role"] == "assistant"
            for i in chat_tokenizer.encode(m["content"] + "<|im_end|>\n")
        ]
        + [chat_tokenizer.eos_id]
        for chat in CHATS
    ]
    assert _trained_ids(source, chat_tokenizer) == expected
    # One decoded example: the first conversation as rendered, and what the loss trains on.
    stored, _ = prepare_tokens(source, chat_tokenizer)
    end = int(stored.starts()[1])
    ids, flags = (
        torch.from_numpy(stored.ids()[:end].astype("int64")),
        torch.from_numpy(stored.trained()[:end].copy()),
    )
    decode = chat_tokenizer.tokenizer.decode
    print("document:", repr(decode(ids.tolist())))
    print("trained: ", repr(decode(ids[flags.bool()].tolist())))
    assert decode(ids[flags.bool()].tolist()) == "it is 1<|im_end|>\n2<|im_end|>\n<|endoftext|>"
    # In batches: labels are -100 outside the completion, and the positions the loss reads are those whose
    # next token is a target.
    stream = batches(source, chat_tokenizer, seq_len=96, micro_batch=2, objective="causal", seed=0)
    for batch in islice(stream, 4):
        labels, loss_mask = batch["labels"], batch["loss_mask"]
        assert torch.equal(loss_mask[:, :-1], labels[:, 1:] != -100)
        assert 0 < int((labels != -100).sum()) < labels.numel()


def test_chat_records_need_a_chat_template(tmp_path: Path, chat_tokenizer: HFTokenizer) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}])
    with pytest.raises(InputError, match="chat.jsonl line 1 is a conversation.*chat template.*has none"):
        prepare_tokens(source, ByteTokenizer())
    with pytest.raises(InputError, match="line 2: messages must be a non-empty list"):
        prepare_tokens(
            _jsonl(tmp_path / "bad.jsonl", [{"messages": CHATS[0]}, {"messages": []}]), chat_tokenizer
        )


def test_an_encoder_refuses_completion_masked_data(tmp_path: Path, chat_tokenizer: HFTokenizer) -> None:
    source = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    chat_tokenizer.mask_id = chat_tokenizer.eos_id  # any mask id: the check is about the data
    with pytest.raises(InputError, match="encoder \\(mlm\\) student needs text records"):
        batches(source, chat_tokenizer, seq_len=32, micro_batch=1, objective="mlm")


# ---------------------------------------------------------------------------------------------------------
# Training on each source
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _plan(config: str) -> Any:
    """The plan of a config (as JSON), made once for the tests that train on it."""
    from gkd.planner.pipeline import plan as make_plan

    return make_plan(Config.from_dict(json.loads(config)))


def _two_steps(
    config: dict[str, Any], source: str, options: DataConfig, tokenizer: Any = None
) -> list[float]:
    """Two optimizer steps of the plan's distillation (kd + the hard loss) on `source`, in this process."""
    from gkd.runtime.engines import build_models
    from gkd.runtime.step import distill_step

    models = build_models(_plan(json.dumps(config)), seed=0, total_steps=2)
    tokenizer = tokenizer or load_tokenizer(config["teacher"], models.teacher_specs[0])
    stream = batches(source, tokenizer, seq_len=32, micro_batch=2, objective="causal", options=options)
    optimizer = torch.optim.AdamW(models.student.parameters(), lr=1e-2)
    losses = []
    for step, batch in enumerate(islice(stream, 2)):
        out = distill_step(
            models.student, models.teachers, models.loss, batch, models.resolver.at(step), step, 2
        )
        out.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.total.detach()))
    return losses


TINY = {
    "teacher": "tiny-llama-teacher",
    "student": "tiny-llama-student",
    "methods": [{"name": "kd"}],  # its soft and hard terms
    "hardware": {"gpus": 1, "gpu_memory": "8GiB"},
    "training": {"seq_len": 32, "global_batch": 2},
}


@pytest.mark.parametrize("kind", ["parquet", "csv", "save_to_disk", "hub"])
def test_each_source_trains(tmp_path: Path, kind: str) -> None:
    losses = _two_steps(TINY, _sources(tmp_path)[kind], DataConfig())
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_chat_data_trains(tmp_path: Path, chat_tokenizer: HFTokenizer) -> None:
    assert chat_tokenizer.vocab_size <= 256  # fits the tiny presets
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    losses = _two_steps(TINY, source, DataConfig(), chat_tokenizer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_the_completion_mask_applies_to_the_hard_and_the_soft_term(
    tmp_path: Path, chat_tokenizer: HFTokenizer
) -> None:
    """kd's soft term (KL at T=2, x T^2) and its hard term (next-token cross-entropy) of a distillation step
    on chat data equal plain-torch references taken over the completion positions only, and differ from the
    same terms over every position."""
    import torch.nn.functional as F

    from gkd.runtime.engines import build_models
    from gkd.runtime.step import distill_step, packed_inputs

    models = build_models(_plan(json.dumps(TINY)), seed=0, total_steps=1)
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    batch = next(batches(source, chat_tokenizer, seq_len=32, micro_batch=2, objective="causal", seed=0))
    out = distill_step(models.student, models.teachers, models.loss, batch, models.resolver.at(0), 0, 1)
    inputs = packed_inputs(
        models.student, {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    )
    with torch.no_grad():
        s = models.student(**inputs).logits.float()
        t = models.teachers[0](**inputs).logits.float()

    def soft(mask: torch.Tensor) -> float:
        kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1)
        return float(kl[mask].mean() * 4)

    def hard(labels: torch.Tensor) -> float:
        return float(F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), labels[:, 1:].reshape(-1)))

    mask, labels = batch["loss_mask"], batch["labels"]
    assert 0 < int(mask.sum()) < mask.numel()
    assert float(out.terms["kd.soft"].detach()) == pytest.approx(soft(mask), rel=1e-4)
    assert float(out.terms["kd.hard"].detach()) == pytest.approx(hard(labels), rel=1e-4)
    everywhere = torch.ones_like(mask)
    assert abs(soft(everywhere) - soft(mask)) > 1e-3 * soft(mask)
    assert abs(hard(batch["input_ids"]) - hard(labels)) > 1e-3 * hard(labels)
