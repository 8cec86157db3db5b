"""Teacher assistants: takd as a chain of link runs (expansion, per-link specs, each link trainable), and
dgkd (teacher + assistants at once with seeded random drops) with two teachers of different sizes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from method_checks import assert_rel, check_backward, make_batch, model_specs, run_formula

from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.methods.assistant import surviving_teachers
from gkd.models import build_model
from gkd.runtime.capture import capture_taps

# --------------------------------------------------------------------------------------------------------
# TAKD


def test_takd_expands_into_ordered_links():
    (teacher, assistant), student = model_specs("llama", teachers=2)  # 4x64 -> 3x48 -> 2x32
    r = resolve([{"name": "takd", "options": {"assistants": [assistant]}}], [teacher], student)
    assert [(link.index, link.teacher.name, link.student.name) for link in r.chain] == [
        (0, "tiny-llama-teacher", "tiny-llama-teacher-b"),
        (1, "tiny-llama-teacher-b", "tiny-llama-student"),
    ]
    assert [link.methods for link in r.chain] == [({"name": "kd"},), ({"name": "kd"},)]
    # every link is plain kd between its own pair; the top-level fields are the first link's
    for link in r.chain:
        assert [(t.method, t.name) for t in link.resolved.loss_terms] == [("kd", "soft"), ("kd", "hard")]
        assert link.resolved.teacher_taps == (frozenset({"logits"}),)
    assert (
        r.loss_terms == r.chain[0].resolved.loss_terms and r.teacher_taps == r.chain[0].resolved.teacher_taps
    )
    data = json.loads(json.dumps(r.to_dict()))
    assert [(c["teacher"], c["student"]) for c in data["chain"]] == [
        ("tiny-llama-teacher", "tiny-llama-teacher-b"),
        ("tiny-llama-teacher-b", "tiny-llama-student"),
    ]


def test_takd_links_resolve_with_their_own_sizes(tmp_path):
    """Link methods with extras and layer maps see each link's teacher and student, not the outer pair."""
    (teacher, assistant), student = model_specs("llama", teachers=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(assistant.hf_config))  # assistants may be given as paths or preset names
    options = {"assistants": [str(config)], "link_methods": [{"name": "hidden_mse"}, {"name": "fkl"}]}
    r = resolve([{"name": "takd", "options": options}], [teacher], student)
    first, second = r.chain
    assert (first.student.layers, first.student.hidden) == (3, 48)
    assert second.teacher == first.student
    # uniform pairs: 3 <- 4 layers, then 2 <- 3 layers; fkl takes final hidden states + LM heads (fused)
    assert first.resolved.student_taps == {"hidden[1]", "hidden[2]", "hidden[3]", "final"}
    assert first.resolved.teacher_taps == (frozenset({"hidden[1]", "hidden[2]", "hidden[4]", "final"}),)
    assert second.resolved.student_taps == {"hidden[1]", "hidden[2]", "final"}
    assert second.resolved.teacher_taps == (frozenset({"hidden[1]", "hidden[3]", "final"}),)
    assert first.resolved.extras[0].shapes == ((48, 64),) * 3
    assert second.resolved.extras[0].shapes == ((32, 48),) * 2


def test_takd_three_links_and_each_link_trains():
    (teacher, assistant), student = model_specs("llama", teachers=2)
    middle = replace(student, name="tiny-llama-mid")  # a second assistant of the student's size
    r = resolve([{"name": "takd", "options": {"assistants": [assistant, middle]}}], [teacher], student)
    assert [(link.teacher.name, link.student.name) for link in r.chain] == [
        ("tiny-llama-teacher", "tiny-llama-teacher-b"),
        ("tiny-llama-teacher-b", "tiny-llama-mid"),
        ("tiny-llama-mid", "tiny-llama-student"),
    ]
    # Run the first two links one after another on real tiny models: link 0's student teaches link 1.
    gen = torch.Generator().manual_seed(0)
    ids, mask, labels = make_batch(student, 2, 6, gen)
    torch.manual_seed(0)
    trained = build_model(teacher, device="cpu").eval()
    for link in r.chain[:2]:
        model = build_model(link.student, device="cpu").train()
        with torch.no_grad(), capture_taps(trained, link.resolved.teacher_taps[0]) as t_taps:
            trained(input_ids=ids, attention_mask=mask.long())
        with capture_taps(model, link.resolved.student_taps) as s_taps:
            model(input_ids=ids, attention_mask=mask.long())
        loss = DistillLoss(link.resolved, [link.teacher], link.student)
        out = loss(s_taps, [t_taps], labels=labels, mask=mask)
        out.total.backward()
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in trained.parameters())
        model.zero_grad(set_to_none=True)  # the trained student becomes the next link's frozen teacher
        trained = model.eval()


@pytest.mark.parametrize(
    "methods, teachers, match",
    [
        ([{"name": "takd"}], 1, "needs at least one assistant"),
        ([{"name": "takd", "options": {"assistants": ["B"]}}, {"name": "kd"}], 1, "cannot be combined"),
        ([{"name": "takd", "options": {"assistants": ["B"]}}], 2, "takes one teacher"),
        ([{"name": "takd", "options": {"assistants": ["B"], "link_methods": ["takd"]}}], 1, "single-teacher"),
        ([{"name": "takd", "options": {"assistants": ["no-such-model"]}}], 1, "no-such-model"),
        ([{"name": "takd", "options": {"assistants": ["B"], "link_methods": ["pkdx"]}}], 1, "unknown method"),
    ],
)
def test_takd_bad_input(methods, teachers, match):
    (teacher, assistant), student = model_specs("llama", teachers=2)
    for entry in methods:
        if entry.get("options", {}).get("assistants") == ["B"]:
            entry["options"]["assistants"] = [assistant]
    with pytest.raises(InputError, match=match) as err:
        resolve(methods, [teacher, assistant][:teachers], student)
    assert "\n" not in str(err.value)


def test_takd_link_violation_names_the_link():
    (teacher, assistant), student = model_specs("llama", teachers=2)
    other_vocab = replace(assistant, vocab=300, name="odd-vocab")
    with pytest.raises(InputError, match=r"takd link 0 \(tiny-llama-teacher -> odd-vocab\).*300"):
        resolve([{"name": "takd", "options": {"assistants": [other_vocab]}}], [teacher], student)


# --------------------------------------------------------------------------------------------------------
# DGKD


def test_surviving_teachers_is_seeded_nonempty_and_near_the_survival_rate():
    draws = [surviving_teachers(3, step, survival=0.75, seed=1) for step in range(4000)]
    assert draws == [surviving_teachers(3, step, survival=0.75, seed=1) for step in range(4000)]
    assert draws != [surviving_teachers(3, step, survival=0.75, seed=2) for step in range(4000)]
    assert all(d and list(d) == sorted(set(d)) for d in draws)
    for i in range(3):
        rate = sum(i in d for d in draws) / len(draws)
        assert 0.72 < rate < 0.78, rate  # 0.75 plus the rare forced keep when every teacher dropped
    assert all(surviving_teachers(2, s, survival=1.0) == (0, 1) for s in range(50))
    singles = [surviving_teachers(2, s, survival=0.05) for s in range(200)]
    assert all(len(d) >= 1 for d in singles) and {d for d in singles if len(d) == 1} == {(0,), (1,)}
    with pytest.raises(InputError, match="survival"):
        surviving_teachers(2, 0, survival=0.0)


def test_dgkd_formula_sums_surviving_teachers():
    kinds = set()
    for step in range(12):
        kept = surviving_teachers(2, step, survival=0.75, seed=0)
        kinds.add(kept)
        case = run_formula(
            [{"name": "dgkd", "weight": 0.5, "options": {"temperature": 3.0}}], teachers=2, step=step
        )
        s, mask = case.student["logits"], case.mask
        expected = 0.0
        for i in kept:
            p = torch.softmax(case.teachers[i]["logits"] / 3, -1)
            kl = (p * (p.log() - torch.log_softmax(s / 3, -1))).sum(-1)[mask].mean() * 9
            expected = expected + kl
        assert_rel(case.term("dgkd.soft"), 0.5 * expected)
    assert kinds == {(0,), (1,), (0, 1)}  # the steps above cover every pattern


def test_dgkd_needs_teacher_and_assistant():
    teachers, student = model_specs("llama")
    with pytest.raises(InputError, match="dgkd.*at least 2 teachers"):
        resolve(["dgkd"], teachers, student)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_dgkd_backward_two_teachers(family):
    out = check_backward(["dgkd"], family=family, teachers=2)
    assert set(out.terms) == {"dgkd.soft", "dgkd.hard"}
