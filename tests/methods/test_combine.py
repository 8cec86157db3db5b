"""resolve(): merged taps, weighted sums, planner flags, constraints and conflicting requirements."""

from __future__ import annotations

import pytest
from method_checks import check_combination, model_specs, run_formula

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
