"""resolve(): merged taps, weighted sums, planner flags, constraints and conflicting requirements."""

from __future__ import annotations

import pytest
from method_checks import check_combination, model_specs, run_formula, truncated_teacher_specs

from gkd.errors import InputError
from gkd.methods import get, names, resolve


def test_combination_equals_weighted_sum_of_parts():
    case = check_combination(
        [
            {"name": "kd", "weight": 0.5},
            {"name": "minilmv2", "weight": 2.0, "options": {"relation_heads": 8}},
            {"name": "hidden_mse", "weight": 0.25, "options": {"layer_map": "last"}},
        ]
    )
    # q/k/v of the last layers are requested by minilmv2 only; logits once for kd's two terms
    assert case.resolved.student_taps == {"logits", "q[1]", "k[1]", "v[1]", "hidden[2]"}
    assert case.resolved.teacher_taps == (frozenset({"logits", "q[3]", "k[3]", "v[3]", "hidden[4]"}),)


def test_shared_taps_captured_once():
    case = check_combination(
        [{"name": "kd"}, {"name": "fkl"}, {"name": "hidden_mse"}, {"name": "hidden_cos"}]
    )
    assert case.resolved.student_taps == {"logits", "hidden[1]", "hidden[2]"}
    assert [t.weight for t in case.resolved.loss_terms] == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_flags_logit_only_decoders_fused_and_offline():
    teachers, student = model_specs("llama")
    r = resolve([{"name": "fkl"}, {"name": "rkl", "weight": 0.5}], teachers, student)
    # rkl needs the teacher's whole distribution, which an offline pass does not store (only its top-k).
    assert r.fused_linear and not r.offline_ok and r.needs_teacher_logits and r.needs_teacher_forward
    assert r.student_taps == {"final"} and r.teacher_taps == (frozenset({"final"}),)
    assert not r.eager_attention
    r2 = resolve([{"name": "fkl"}], teachers, student, fused_linear=False)
    assert not r2.fused_linear and r2.student_taps == {"logits"} and r2.offline_ok


def test_flags_hard_loss_blocks_fused_encoder_never_fused():
    teachers, student = model_specs("llama")
    assert not resolve(["kd"], teachers, student).fused_linear  # the hard loss needs student logits
    bt, bs = model_specs("bert")
    assert not resolve(["fkl"], bt, bs).fused_linear  # BERT's MLM head is not a plain linear on `final`


def test_flags_intermediate_taps_not_offline():
    teachers, student = model_specs("llama")
    r = resolve(["kd", "hidden_mse"], teachers, student)
    assert not r.offline_ok and r.needs_teacher_forward
    assert r.extras[0].name == "hidden_mse.proj" and r.extras[0].num_parameters == 2 * (32 * 64 + 64)


def test_zero_weight_and_hard_loss_none_drop_terms_and_taps():
    teachers, student = model_specs("llama")
    r = resolve(
        [{"name": "kd", "options": {"hard_loss": "none"}}, {"name": "hidden_mse", "weight": 0}],
        teachers,
        student,
    )
    assert [(t.method, t.name) for t in r.loss_terms] == [("kd", "soft")]
    assert r.student_taps == {"logits"} and r.extras == ()


def test_temperature_option_overrides_term_default():
    case = run_formula([{"name": "kd", "options": {"temperature": 4.0}}])
    assert case.resolved.loss_terms[0].temperature == 4.0


def test_unknown_method_suggests_nearest():
    with pytest.raises(InputError, match=r"unknown method 'fk'.*fkl"):
        get("fk")


def test_vocab_mismatch_names_sizes_and_alternatives():
    teachers, student = model_specs("llama")
    from dataclasses import replace

    other = replace(teachers[0], vocab=300, name="big-vocab")
    with pytest.raises(InputError) as err:
        resolve(["kd"], [other], student)
    msg = str(err.value)
    assert "256" in msg and "300" in msg and "big-vocab" in msg and "minilmv2" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "bad, match",
    [
        ([{"name": "kd"}, {"name": "kd"}], "listed twice"),
        ([{"name": "kd", "options": {"nope": 1}}], "unknown options"),
        ([{"name": "kd", "weight": -1}], "weight must be"),
        ([{"name": "kd", "extra": 1}], "unknown keys"),
        (
            [
                {"name": "kd", "options": {"hard_loss": "mlm"}},
                {"name": "fkl", "options": {"hard_loss": "causal_lm", "hard_rate": 1}},
            ],
            "disagree",
        ),
        ([{"name": "hidden_mse", "options": {"layer_map": "skip-3"}}], "skip-3"),
        ([{"name": "hidden_mse", "options": {"layer_map": "explicit:1,2,3"}}], "explicit layer map"),
        ([{"name": "minilmv2", "options": {"stage": "nope"}}], "no stage"),
        ([], "no distillation methods"),
    ],
)
def test_bad_input(bad, match):
    teachers, student = model_specs("llama")
    with pytest.raises(InputError, match=match):
        resolve(bad, teachers, student)


def test_single_teacher_method_with_two_teachers_refused():
    teachers, student = model_specs("llama", teachers=2)
    with pytest.raises(InputError, match="takes one teacher.*fkl"):
        resolve(["kd"], teachers, student)


def test_per_teacher_taps_follow_each_teacher_depth():
    teachers, student = model_specs("llama", teachers=2)
    r = resolve([{"name": "hidden_mse"}], teachers, student)
    assert r.teacher_taps == (frozenset({"hidden[2]", "hidden[4]"}), frozenset({"hidden[1]", "hidden[3]"}))
    (extra,) = r.extras
    assert extra.shapes == ((32, 64), (32, 64), (32, 48), (32, 48))


def test_every_registered_spec_resolves_or_fails_cleanly():
    """Every method either resolves on the tiny llama pair or refuses with a one-line InputError."""
    teachers, student = model_specs("llama")
    resolved = 0
    for name in names():
        options = {"relation_heads": 8} if name == "minilmv2" else {}
        try:
            r = resolve([{"name": name, "options": options}], teachers, student)
        except InputError as err:
            assert "\n" not in str(err) and name in str(err)
            continue
        assert r.loss_terms, name
        resolved += 1
    assert resolved >= 10


def test_teacher_weights_must_match_teacher_count():
    teachers, student = model_specs("llama", teachers=2)
    with pytest.raises(InputError, match="one weight per teacher"):
        resolve([{"name": "fkl", "options": {"teacher_weights": [1.0]}}], teachers, student)


def test_stage_fields_reach_resolved_methods():
    teachers, student = model_specs("llama")
    r = resolve([{"name": "minilmv2", "options": {"relation_heads": 8}}], teachers, student)
    assert (r.methods[0].stage, r.methods[0].train, r.methods[0].teacher) == (
        "pretrain_kd",
        "student+extras",
        True,
    )


@pytest.mark.parametrize(
    "entry, models, match",
    [
        # A bad value is refused at resolve time (so `gkd plan` exits 2), naming method, option, value, type.
        (
            {"name": "kd", "options": {"temperature": "hot"}},
            "one",
            "method 'kd': option temperature must be a finite number > 0, got 'hot' \\(str\\)",
        ),
        ({"name": "kd", "options": {"temperature": -1}}, "one", "'kd': option temperature must be .* > 0"),
        ({"name": "kd", "options": {"temperature": 0}}, "one", "'kd': option temperature"),
        ({"name": "kd", "options": {"temperature": float("nan")}}, "one", "'kd': option temperature"),
        ({"name": "kd", "options": {"temperature": True}}, "one", "'kd': option temperature"),
        (
            {"name": "kd", "options": {"soft": "bogus"}},
            "one",
            "'kd': option soft must be one of kl, soft_ce, mse",
        ),
        ({"name": "kd", "weight": float("nan")}, "one", "'kd': weight must be a finite number >= 0"),
        ({"name": "kd", "weight": float("inf")}, "one", "'kd': weight must be a finite number >= 0"),
        (
            {"name": "kd", "options": {"soft_rate": "x"}},
            "one",
            "'kd': option soft_rate must be a finite number",
        ),
        ({"name": "kd", "options": {"soft_rate": float("inf")}}, "one", "'kd': option soft_rate"),
        (
            {"name": "kd", "options": {"hard_rate": -1}},
            "one",
            "'kd': option hard_rate = -1 .* set hard_rate >= 0",
        ),
        (
            {"name": "pkd", "options": {"alpha": 1.5}},
            "truncated",
            "'pkd': option alpha = 1.5 .* set alpha <= 1",
        ),
        (
            {"name": "annealing_kd", "options": {"max_temperature": 2.5}},
            "one",
            "'annealing_kd': option max_temperature must be a whole number, got 2.5 \\(float\\)",
        ),
        (
            {"name": "fkl", "options": {"t2_scale": "yes"}},
            "one",
            "'fkl': option t2_scale must be true or false",
        ),
        (
            {"name": "fkl", "options": {"teacher_weights": [1.0, float("nan")]}},
            "two",
            "'fkl': option teacher_weights must be a list of finite numbers >= 0",
        ),
        ({"name": "fkl", "options": {"teacher_weights": [1.0, -1]}}, "two", "'fkl': option teacher_weights"),
        ({"name": "kd", "options": {"layer_map": 5}}, "one", "method 'kd': layer_map: layer rule must be"),
    ],
)
def test_option_types_and_ranges_refused_at_resolve(entry, models, match):
    teachers, student = {
        "one": lambda: model_specs("llama"),
        "two": lambda: model_specs("llama", teachers=2),
        "truncated": lambda: truncated_teacher_specs("llama"),
    }[models]()
    with pytest.raises(InputError, match=match) as err:
        resolve([entry], teachers, student)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "kd", "options": {"temperature": 2, "soft": "mse", "soft_rate": 1, "hard_rate": 0}},
        {"name": "annealing_kd", "options": {"max_temperature": 3}},
        {"name": "fkl", "options": {"t2_scale": True}},
    ],
)
def test_well_typed_options_still_resolve(entry):
    teachers, student = model_specs("llama")
    assert resolve([entry], teachers, student).loss_terms


def test_soft_kinds_match_the_runtime():
    """resolve accepts exactly the soft kinds the runtime's soft losses compute."""
    from gkd.methods.combine import SOFT_LOSSES
    from gkd.methods.multi_teacher import _DIVERGENCE

    assert set(SOFT_LOSSES) == set(_DIVERGENCE)
