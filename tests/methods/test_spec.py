"""Layer rules, schedules, stages and spec validation: stepping through them."""

from __future__ import annotations

import pytest

from gkd.errors import InputError
from gkd.methods.mapping import pairs, progressive_stage, tap_name
from gkd.methods.spec import LayerRule, LossTermSpec, MethodSpec, Schedule, StageSpec, TapSpec, parse_rule


@pytest.mark.parametrize(
    "rule, ls, lt, expected",
    [
        ("uniform", 2, 4, ((1, 2), (2, 4))),
        ("uniform", 3, 12, ((1, 4), (2, 8), (3, 12))),
        ("uniform+emb", 2, 4, ((0, 0), (1, 2), (2, 4))),
        ("last", 2, 4, ((2, 4),)),
        ("skip-2", 3, 12, ((1, 2), (2, 4), (3, 6))),
        ("explicit:3,4", 2, 4, ((1, 3), (2, 4))),
        ("all", 2, 3, ((2, 1), (2, 2), (2, 3))),
    ],
)
def test_static_rules(rule, ls, lt, expected):
    assert pairs(parse_rule(rule), ls, lt) == expected


def test_random_rule_resamples_every_k_steps_reproducibly():
    rule = parse_rule({"kind": "random", "seed": 3, "every": 10})
    draws = [pairs(rule, 4, 12, step=s) for s in range(0, 200, 10)]
    for d in draws:
        assert d[-1] == (4, 12)  # RAIL-KD keeps the last pair fixed
        teacher = [t for _, t in d[:-1]]
        assert teacher == sorted(teacher) and len(set(teacher)) == 3 and all(1 <= t < 12 for t in teacher)
    assert len(set(draws)) > 1  # it does re-sample
    assert pairs(rule, 4, 12, step=13) == pairs(rule, 4, 12, step=10)  # constant within a window
    assert pairs(rule, 4, 12, step=25) == pairs(
        parse_rule({"kind": "random", "seed": 3, "every": 10}), 4, 12, step=25
    )


def test_progressive_unlocks_one_pair_per_stage():
    rule = LayerRule(kind="progressive")
    total = 30  # Ls = 2 -> 3 stages of 10 steps
    assert pairs(rule, 2, 4, step=0, total_steps=total) == ((1, 2),)
    assert pairs(rule, 2, 4, step=9, total_steps=total) == ((1, 2),)
    assert pairs(rule, 2, 4, step=10, total_steps=total) == ((1, 2), (2, 4))
    assert pairs(rule, 2, 4, step=29, total_steps=total) == ((1, 2), (2, 4))
    only_new = LayerRule(kind="progressive", keep_unlocked=False)
    assert pairs(only_new, 2, 4, step=15, total_steps=total) == ((2, 4),)
    assert [progressive_stage(2, s, total) for s in (0, 10, 20, 29)] == [0, 1, 2, 2]


@pytest.mark.parametrize("bad", ["skip-x", "explicit:a", "sideways", 3, {"kind": "uniform", "nope": 1}])
def test_bad_rules(bad):
    with pytest.raises(InputError):
        parse_rule(bad)


def test_tap_names():
    assert tap_name("hidden", 0) == "hidden[0]"
    assert tap_name("scores", 1) == "scores[0]"
    assert tap_name("logits", None) == "logits"
    with pytest.raises(InputError):
        tap_name("q", 0)


def test_schedules():
    lin = Schedule(kind="linear", start=0.3, end=1.0, begin=0.0, finish=0.66)  # Theseus keep-probability
    assert lin.at(0, 100) == pytest.approx(0.3)
    assert lin.at(33, 100) == pytest.approx(0.3 + 0.7 * 33 / 66)
    assert lin.at(80, 100) == 1.0
    phi = Schedule(kind="piecewise", points=((0.0, 1 / 7), (0.5, 4 / 7), (0.9, 1.0)))  # annealing steps
    assert [phi.at(s, 10) for s in (0, 4, 5, 9)] == [1 / 7, 1 / 7, 4 / 7, 1.0]
    late = Schedule(kind="window", begin=0.666, finish=1.01)  # continuation-KD hard loss after 66.6%
    assert late.at(60, 100) == 0.0 and late.at(70, 100) == 1.0
    with pytest.raises(InputError):
        Schedule(kind="cosine")


def test_stage_selection_by_progress_and_option():
    from gkd.methods.combine import _active_stage

    spec = MethodSpec(
        name="three_stage",
        title="t",
        paper="p",
        year=2020,
        taps=(TapSpec(kind="logits"),),
        terms=(
            LossTermSpec(name="a", fn="soft", taps=("logits",)),
            LossTermSpec(name="b", fn="soft", taps=("logits",)),
        ),
        stages=(
            StageSpec(name="s1", fraction=0.5, terms=("a",)),
            StageSpec(name="s2", fraction=0.25, terms=("b",)),
            StageSpec(name="s3", fraction=0.25, terms=("a", "b")),
        ),
    )
    got = [_active_stage(spec, {}, s, 100).name for s in (0, 49, 50, 74, 75, 99, 100)]
    assert got == ["s1", "s1", "s2", "s2", "s3", "s3", "s3"]
    assert _active_stage(spec, {"stage": "s2"}, 0, 100).name == "s2"
    assert _active_stage(spec, {"stage": 2}, 0, 100).name == "s3"


def test_spec_validation_catches_undeclared_taps_and_terms():
    with pytest.raises(ValueError, match="undeclared taps"):
        MethodSpec(
            name="x",
            title="x",
            paper="p",
            year=1,
            terms=(LossTermSpec(name="a", fn="soft", taps=("logits",)),),
        )
    with pytest.raises(ValueError, match="unknown terms"):
        MethodSpec(name="x", title="x", paper="p", year=1, stages=(StageSpec(name="s", terms=("zz",)),))
    with pytest.raises(ValueError, match="needs a layer rule"):
        TapSpec(kind="hidden")


def test_after_progressive_schedule_follows_unlocking():
    sched = Schedule(kind="after_progressive")
    # Ls = 2, 30 steps: pairs unlock at 0 and 10; every layer is unlocked from step 20 (= 2 * 30 // 3)
    assert [sched.at(s, 30, student_layers=2) for s in (0, 19, 20, 29)] == [0.0, 0.0, 1.0, 1.0]


def test_distill_loss_applies_term_schedule(monkeypatch):
    from method_checks import run_formula

    from gkd.methods import registry

    spec = MethodSpec(
        name="ramped_kd",
        title="t",
        paper="p",
        year=2020,
        taps=(TapSpec(kind="logits"),),
        terms=(
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                temperature=1.0,
                schedule=Schedule(kind="linear", start=0.0, end=1.0, begin=0.0, finish=1.0),
            ),
        ),
    )
    registry.names()
    monkeypatch.setitem(registry._METHODS, "ramped_kd", spec)
    values = [run_formula(["ramped_kd"], step=s, total_steps=100).out.total.item() for s in (0, 25, 100)]
    kd_t1 = run_formula([{"name": "kd", "options": {"temperature": 1.0}}]).term("kd.soft").item()
    assert values[0] == 0.0
    assert values[1] == pytest.approx(0.25 * kd_t1, rel=1e-12)
    assert values[2] == pytest.approx(kd_t1, rel=1e-12)
