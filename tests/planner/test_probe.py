"""Activation polynomials from two probe lengths against direct traces at the requested length, for every
family; probe choice; and the fallback when the probes disagree."""

from __future__ import annotations

import dataclasses

import pytest
from test_taps import FAMILY_CONFIGS, family_spec

from gkd.planner import probe
from gkd.planner.facts import compute_facts, model_facts
from gkd.planner.trace import SavedTensor, SavedTrace


def _activation_fields(facts: object) -> dict[str, object]:
    d = dataclasses.asdict(facts)  # type: ignore[call-overload]
    d.pop("source")
    return d


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_polynomials_equal_direct_traces(family: str) -> None:
    spec = family_spec(family)
    lengths = (40, 13) if family in ("llama", "bert") else (40,)
    for seq in lengths:
        assert probe.probe_lengths(spec, seq) is not None
        from_probes = model_facts(spec, seq_len=seq, use_cache=False)
        assert "probe lengths" in from_probes.source
        direct = compute_facts(spec, seq_len=seq)
        assert _activation_fields(from_probes) == _activation_fields(direct), (family, seq)


def test_sliding_window_has_its_own_regime() -> None:
    spec = family_spec("mistral")  # sliding window 64
    full = probe.probe_lengths(spec, 40)
    windowed = probe.probe_lengths(spec, 90)
    assert full is not None and windowed is not None
    assert full[0] == "full" and max(full[1:]) <= 64
    assert windowed[0] == "windowed-64" and min(windowed[1:]) > 64
    from_probes = model_facts(spec, seq_len=90, use_cache=False)
    assert _activation_fields(from_probes) == _activation_fields(compute_facts(spec, seq_len=90))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_probes_are_primes_unlike_any_config_size(family: str) -> None:
    spec = family_spec(family)
    regime, t1, t2 = probe.probe_lengths(spec, 32) or ("", 0, 0)
    assert t1 > t2 >= 5
    for t in (t1, t2):
        assert all(t % d for d in range(2, t))
        assert t not in (spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.ffn, spec.vocab)
        assert t <= spec.max_positions or spec.model_type not in ("gpt2", "bert", "opt")


def _trace(seq: int, sizes: list[tuple[str, int]]) -> SavedTrace:
    return SavedTrace(
        model="m",
        micro_batch=1,
        seq_len=seq,
        attn_implementation="eager",
        traced_layers=1,
        checkpointing=False,
        tensors=tuple(
            SavedTensor(
                owner=owner, layer=0 if owner == "layer" else -1, nbytes=n, shape=(n,), dtype="float32"
            )
            for owner, n in sizes
        ),
    )


def test_saved_polys_find_each_storage_degree() -> None:
    t1, t2 = 11, 7
    # A constant, a linear and a quadratic storage in the layer; one linear storage outside.
    first = _trace(t1, [("layer", 100), ("layer", 6 * t1), ("layer", 8 * t1 * t1), ("outside", 4 * t1)])
    second = _trace(t2, [("layer", 100), ("layer", 6 * t2), ("layer", 8 * t2 * t2), ("outside", 4 * t2)])
    polys = probe.saved_polys(first, second)
    assert polys.layer == (100, 6, 8)
    assert polys.outside == (0, 4, 0)


def test_saved_polys_refuse_traces_that_differ_in_more_than_length() -> None:
    with pytest.raises(probe.ProbeMismatch):
        probe.saved_polys(_trace(11, [("layer", 10)]), _trace(7, [("layer", 10), ("layer", 5)]))
    with pytest.raises(probe.ProbeMismatch):  # 3 * T^3 is no polynomial of degree <= 2
        probe.saved_polys(_trace(11, [("layer", 3 * 11**3)]), _trace(7, [("layer", 3 * 7**3)]))


def test_mismatch_falls_back_to_a_trace_at_the_length(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = family_spec("llama")

    def refuse(first: SavedTrace, second: SavedTrace) -> probe.SavedPolys:
        raise probe.ProbeMismatch("test")

    monkeypatch.setattr(probe, "saved_polys", refuse)
    facts = model_facts(spec, seq_len=24, use_cache=False)
    assert "traced at sequence 24" in facts.source
    assert _activation_fields(facts) == _activation_fields(compute_facts(spec, seq_len=24))


def test_peak_takes_the_largest_candidate_at_each_length() -> None:
    # A linear working set dominates at short lengths, the attention matrix (T^2) at long ones.
    candidates = probe.prune([(0, 1000, 0), (0, 10, 4), (0, 5, 1)])
    assert (0, 5, 1) not in candidates  # bounded coefficient-wise by (0, 10, 4)
    assert probe.peak(candidates, 10) == 10_000
    assert probe.peak(candidates, 1000) == 10 * 1000 + 4 * 1000 * 1000
