"""The data stream as one endless sequence of rows: a run that resumes at a stream position with another
number of ranks or another micro-batch reads, step by step, exactly the rows the uninterrupted run reads."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest

from gkd.errors import InputError
from gkd.runtime.data import ByteTokenizer, batches

GLOBAL_BATCH = 4
ROWS = 13  # not a multiple of the global batch: steps cross epoch boundaries


def _source(tmp_path: Path) -> str:
    # 13 distinct documents of 15 bytes + eos: 13 rows of 16 tokens, one document each.
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(f"doc {i:04d} ".ljust(15, "abcdefghij"[i % 10]) for i in range(ROWS)) + "\n")
    return str(path)


def _steps(
    source: str, *, world: int, micro_batch: int, steps: int, start_step: int = 0, objective: str = "causal"
) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Per optimizer step: (row number, its input ids as trained on) of every row, over all ranks and
    micro-batches, sorted (a step that spans an epoch boundary may read a row twice)."""
    accum = GLOBAL_BATCH // (world * micro_batch)
    streams = [
        batches(
            source,
            ByteTokenizer(),
            seq_len=16,
            micro_batch=micro_batch,
            objective=objective,
            rank=r,
            world=world,
            seed=3,
            start=start_step * GLOBAL_BATCH,
            row_ids=True,
        )
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        seen = []
        for stream in streams:
            for batch in islice(stream, accum):
                rows = zip(batch["row_ids"].tolist(), batch["input_ids"].tolist(), strict=True)
                seen.extend((number, tuple(ids)) for number, ids in rows)
        out.append(sorted(seen))
    return out


@pytest.mark.parametrize("objective", ["causal", "mlm"])
@pytest.mark.parametrize(("world", "micro_batch"), [(1, 2), (1, 4), (4, 1), (2, 2)])
def test_resume_on_another_world_reads_the_same_rows(
    tmp_path: Path, objective: str, world: int, micro_batch: int
) -> None:
    """From steps 0, 3 and 5, M ranks of micro-batch m read the rows (MLM: masked the same way) that the
    uninterrupted run of 2 ranks of micro-batch 1 reads at each step."""
    source = _source(tmp_path)
    reference = _steps(source, world=2, micro_batch=1, steps=13, objective=objective)
    # 13 steps of 4 rows are 4 epochs of 13 rows: every row read 4 times, never twice in one epoch.
    read = [n for step in reference for n, _ in step]
    assert sorted(read) == sorted(list(range(ROWS)) * 4)
    assert len({n for step in reference[:3] for n, _ in step}) == 12  # the first 3 steps: the first epoch
    for start in (0, 3, 5):
        resumed = _steps(
            source,
            world=world,
            micro_batch=micro_batch,
            steps=13 - start,
            start_step=start,
            objective=objective,
        )
        assert resumed == reference[start:]


def test_another_start_reads_other_rows(tmp_path: Path) -> None:
    """The comparison above can fail: a start one row off gives other steps."""
    source = _source(tmp_path)
    reference = _steps(source, world=2, micro_batch=1, steps=2)
    rows = next(
        batches(source, ByteTokenizer(), seq_len=16, micro_batch=4, objective="causal", seed=3, start=5)
    )
    assert {tuple(r) for r in rows["input_ids"].tolist()} != {ids for _, ids in reference[1]}


def test_a_negative_start_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="stream position"):
        batches(_source(tmp_path), ByteTokenizer(), seq_len=16, micro_batch=1, objective="causal", start=-1)
