"""The offline teacher pass's storage: what `write_pass` stores reads back as the teacher's top-k of each
micro-batch, in order; a pass counts as done only for enough records at the same k and temperature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gkd.errors import InputError
from gkd.methods import resolve
from gkd.methods.divergence import topk_targets
from gkd.models import build_model, resolve_model
from gkd.runtime.capture import capture_taps
from gkd.runtime.offline import OfflineTeacher, TopKReader, pass_is_done, stored_taps, write_pass


def _stream(vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 7), generator=gen)
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, 5:] = False
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_stored_records_read_back_in_order(tmp_path: Path) -> None:
    t_spec, s_spec = resolve_model("tiny-llama-teacher"), resolve_model("tiny-llama-student")
    resolved = resolve(["kd"], [t_spec], s_spec)
    (served,) = stored_taps(resolved)
    assert served.names == ("logits",) and served.temperature == 2.0  # kd's default T
    teacher = build_model(t_spec, device="cpu").eval()
    batches = _stream(t_spec.vocab, 3)
    size = write_pass(
        teacher,
        served,
        iter(batches),
        records=3,
        k=5,
        folder=tmp_path,
        rank=1,
        index=0,
        device=torch.device("cpu"),
    )
    assert size == 3 * 2 * 7 * 5 * (4 + 2)  # int32 index + bfloat16 log-prob per entry
    reader = TopKReader(tmp_path, rank=1, index=0, device=torch.device("cpu"))
    for record in (2, 0, 1):  # random access: a resumed run starts in the middle
        b = batches[record]
        with torch.no_grad(), capture_taps(teacher, {"logits"}) as taps:
            teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long())
        expected = topk_targets(taps["logits"], 5, temperature=2.0)
        got = reader.read(record)
        assert torch.equal(got.indices, expected.indices)
        assert got.logprobs.dtype == torch.bfloat16
        assert torch.equal(got.logprobs, expected.logprobs.to(torch.bfloat16))

    def done(**kw: object) -> bool:
        args = {"rank": 1, "index": 0, "records": 3, "k": 5, "temperature": 2.0, **kw}
        return pass_is_done(tmp_path, **args)  # type: ignore[arg-type]

    assert done() and done(records=2)
    assert not done(records=4) and not done(k=6) and not done(temperature=1.0) and not done(rank=0)


def test_k_beyond_the_vocabulary_and_no_records_are_input_errors(tmp_path: Path) -> None:
    t_spec, s_spec = resolve_model("tiny-llama-teacher"), resolve_model("tiny-llama-student")
    (served,) = stored_taps(resolve(["kd"], [t_spec], s_spec))
    teacher = build_model(t_spec, device="cpu").eval()
    cpu = torch.device("cpu")
    with pytest.raises(InputError, match="offline_topk"):
        write_pass(
            teacher,
            served,
            iter(_stream(t_spec.vocab, 1)),
            records=1,
            k=10**6,
            folder=tmp_path,
            rank=0,
            index=0,
            device=cpu,
        )
    with pytest.raises(InputError, match="steps must be at least 1"):
        write_pass(teacher, served, iter([]), records=0, k=4, folder=tmp_path, rank=0, index=0, device=cpu)


def test_the_stand_in_teacher_never_runs() -> None:
    with pytest.raises(RuntimeError, match="offline pass"):
        OfflineTeacher()(input_ids=torch.zeros(1, 1, dtype=torch.long))
