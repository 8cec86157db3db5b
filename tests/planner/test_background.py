"""Work in a forked child gives the same result as in-process, and falls back to in-process when it cannot."""

from __future__ import annotations

import os

import pytest

from gkd.models import resolve_model
from gkd.planner import background, trace
from gkd.planner.background import in_background


def test_child_result_comes_back_from_another_process() -> None:
    if not background.forking_enabled():
        pytest.skip("forking is off here")
    parent = os.getpid()
    job = in_background(lambda: (os.getpid(), {"a": (1, 2)}))
    pid, value = job()
    assert pid != parent and value == {"a": (1, 2)}
    assert job() == (pid, value)  # the answer is kept; the child is not asked twice


def test_failing_child_reruns_here_and_raises_here() -> None:
    calls: list[int] = []

    def fn() -> int:
        calls.append(os.getpid())
        raise ValueError("bad input")

    job = in_background(fn)
    with pytest.raises(ValueError, match="bad input"):
        job()
    assert os.getpid() in calls


def test_disabled_runs_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKD_NO_FORK", "1")
    assert not background.forking_enabled()
    assert in_background(os.getpid)() == os.getpid()


def test_background_saved_traces_equal_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = resolve_model("tiny-gpt2-student")
    variants = (("sdpa", False), ("eager", True))
    got = {}
    for no_fork in ("0", "1"):
        monkeypatch.setenv("GKD_NO_FORK", no_fork)
        monkeypatch.setattr(trace, "_SAVED", {})
        trace.trace_saved_in_background(spec, micro_batch=2, seq_len=6, variants=variants)
        got[no_fork] = [
            trace.trace_saved(spec, micro_batch=2, seq_len=6, attn_implementation=a, checkpointing=r)
            for a, r in variants
        ]
        assert not trace._PENDING
    assert got["0"] == got["1"]
    assert got["0"][0].layer_bytes(1) > got["0"][1].layer_bytes(1) > 0
