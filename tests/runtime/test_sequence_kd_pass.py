"""The teacher's generation pass of sequence_kd (gkd.runtime.sequence_kd), in one process: the prompts it
reads (the data's, or `generation.prompt_field`'s), a pass killed midway resumes from its whole chunks and
stores what the uninterrupted pass stores, a stored pass is read without running the teacher, and the key
follows the settings and the seed."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gkd.config import Config
from gkd.errors import InputError
from gkd.models import build_model, resolve_model
from gkd.runtime.data import ByteTokenizer
from gkd.runtime.sequence_kd import SequencePass, prompt_ids
from gkd.runtime.tokens import token_dir

PAIRS = [{"prompt": f"Q{i}: add {i}?", "completion": f" {2 * i}.", "question": f"why {i}?"} for i in range(7)]


def _config(**generation: Any) -> dict[str, Any]:
    entry = {"mode": "sequence_kd", "max_new_tokens": 6, "top_p": 0.9, **generation}
    config = Config.from_dict(
        {
            "teacher": "tiny-llama-teacher",
            "student": "tiny-llama-student",
            "methods": ["kd"],
            "training": {"seq_len": 32},
            "generation": entry,
        }
    )
    return config.to_dict()


@pytest.fixture()
def data(tmp_path: Path) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return str(path)


class Calls:
    """Counts a model's forwards (each sampled token is one) and raises at forward `fail_at`."""

    def __init__(self, model: nn.Module, fail_at: int = 0) -> None:
        self.count, self.fail_at = 0, fail_at
        model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.count += 1
        if self.count == self.fail_at:
            raise KeyboardInterrupt("killed")


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return build_model(resolve_model("tiny-llama-teacher"), device="cpu", dtype=torch.float32).eval()


def _open(data: str, seed: int = 0, **generation: Any) -> SequencePass:
    return SequencePass.open(
        _config(**generation), data, ByteTokenizer(), seed=seed, micro_batch=2, device_type="cpu"
    )


def _stored(work: SequencePass) -> tuple[np.ndarray, np.ndarray]:
    entry = work.stored()
    assert entry is not None
    return np.array(entry.ids()), np.array(entry.trained())


def _forget(work: SequencePass) -> None:
    for path in token_dir().glob(f"{work.key}.*"):
        path.unlink()


def test_prompts_are_the_datas_own_or_the_named_field(data: str) -> None:
    tok, options = ByteTokenizer(), Config.from_dict({}).data
    own, _ = prompt_ids(data, options, tok, None, keep=100)
    assert own == [list(r["prompt"].encode()) for r in PAIRS]
    named, _ = prompt_ids(data, options, tok, "question", keep=4)
    assert named == [list(r["question"].encode())[-4:] for r in PAIRS]  # each keeps its end


def test_text_data_without_a_prompt_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just text\n")
    with pytest.raises(InputError, match="sequence_kd needs prompts"):
        prompt_ids(str(path), Config.from_dict({}).data, ByteTokenizer(), None, keep=10)


def test_a_killed_pass_resumes_from_its_whole_chunks_and_a_stored_one_is_reused(
    data: str, tmp_path: Path
) -> None:
    work = _open(data)
    _forget(work)
    assert work.chunks == 4  # 7 prompts, 2 a chunk
    teacher = _teacher()
    entry = work.run(teacher, rank=0, world=1, device=torch.device("cpu"))
    chunks = token_dir() / f"{work.key}.chunks"
    assert entry.documents == len(PAIRS) and not chunks.exists()  # gone once the entry is stored
    reference = _stored(work)
    _forget(work)
    # Killed in its third chunk's first forward (chunks of 6 forwards): chunks 0 and 1 are whole.
    calls = Calls(teacher, fail_at=2 * 6 + 1)
    with pytest.raises(KeyboardInterrupt):
        work.run(teacher, rank=0, world=1, device=torch.device("cpu"))
    # Beside the store's entries, so that the next run with this key finds them.
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk-0000000.npz", "chunk-0000001.npz"]
    half = chunks / f"chunk-0000002.npz.partial-{socket.gethostname()}-{2**31 - 1}"
    half.write_bytes(b"half")  # as a kill mid-write leaves
    assert work.stored() is None
    calls.count, calls.fail_at = 0, 0
    work.run(teacher, rank=0, world=1, device=torch.device("cpu"))
    assert calls.count == 2 * 6  # chunks 2 and 3 only
    assert not chunks.exists()
    assert all(np.array_equal(a, b) for a, b in zip(_stored(work), reference, strict=True))
    # Stored: a later run reads it and the teacher never runs.
    calls.count = 0
    work.run(teacher, rank=0, world=1, device=torch.device("cpu"))
    assert calls.count == 0


def test_the_key_follows_the_settings_and_the_seed(data: str) -> None:
    base = _open(data).key
    assert _open(data).key == base
    assert _open(data, seed=1).key != base
    assert _open(data, temperature=0.5).key != base
    assert _open(data, prompt_field="question").key != base
    assert _open(data, **{"lambda": 0.5}).key == base  # the student's share is not the teacher's pass


def test_gkd_runs_checks_read_a_prompt_field_source_as_the_prompts(tmp_path: Path) -> None:
    """Records with only the prompt field pass `gkd run`'s data check (read as text of that field), which
    refuses them without `generation.prompt_field`."""
    from gkd.planner.pipeline import plan
    from gkd.runtime.checks import check_data

    path = tmp_path / "questions.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"What is {i} plus {i % 5}? Explain."}) + "\n" for i in range(60))
    )
    config = Config.from_dict(
        {
            "teacher": "tiny-llama-teacher",
            "student": "tiny-llama-student",
            "methods": ["kd"],
            "hardware": {"gpus": 1},
            "training": {"seq_len": 32, "global_batch": 2, "micro_batch": [2]},
            "generation": {"mode": "sequence_kd", "max_new_tokens": 6, "prompt_field": "question"},
        }
    )
    stored = check_data(plan(config), str(path), 1, 0, lambda _: None)
    assert stored.documents == 60 and not stored.masked
    bare = Config.from_dict({**config.to_dict(), "generation": {"mode": "sequence_kd", "max_new_tokens": 6}})
    with pytest.raises(InputError, match='has no "text" string field'):
        check_data(plan(bare), str(path), 1, 0, lambda _: None)
