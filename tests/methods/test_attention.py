"""minilm and sid: formulas in float64 against straightforward implementations, SID's progressive unlocking
stepped through, forward + backward through the real tap capture."""

from __future__ import annotations

import pytest
import torch
from method_checks import (
    assert_rel,
    check_backward,
    make_batch,
    model_specs,
    run_formula,
    truncated_teacher_specs,
)
from test_tinybert import attention_kl, raw_scores

from gkd.methods import DistillLoss, resolve
from gkd.models import build_model, resolve_model, spec_from_config
from gkd.runtime.capture import capture_taps


def value_relation(v: torch.Tensor) -> torch.Tensor:
    return v @ v.transpose(-1, -2) / v.shape[-1] ** 0.5


# ---------------------------------------------------------------------------------------------------------
# MiniLM


@pytest.mark.parametrize(("family", "causal"), [("llama", True), ("bert", False)])
def test_minilm_formula(family, causal):
    case = run_formula([{"name": "minilm", "weight": 0.7}], family=family)
    s, t = case.student, case.teachers[0]
    # last student layer (index 1) against the last teacher layer (index 3)
    assert case.resolved.student_taps == {"q[1]", "k[1]", "v[1]"}
    att = attention_kl(raw_scores(s["q[1]"], s["k[1]"]), raw_scores(t["q[3]"], t["k[3]"]), case.mask, causal)
    val = attention_kl(value_relation(s["v[1]"]), value_relation(t["v[3]"]), case.mask, causal)
    assert_rel(case.term("minilm.attention"), 0.7 * att)
    assert_rel(case.term("minilm.value"), 0.7 * val)


def test_minilm_value_relation_across_kv_groupings():
    """Teacher with 4 key/value heads, student with 2: values are compared per query head."""
    base = resolve_model("tiny-llama-teacher")
    teacher = spec_from_config({**base.hf_config, "num_key_value_heads": 4}, name="t-kv4", dtype="float32")
    _, student = model_specs("llama")
    case = run_formula(["minilm"], specs=([teacher], student))
    s_v = case.student["v[1]"].repeat_interleave(2, dim=1)  # 2 kv heads -> 4 query heads
    t_v = case.teachers[0]["v[3]"]
    assert s_v.shape[1] == t_v.shape[1] == 4
    expected = attention_kl(value_relation(s_v), value_relation(t_v), case.mask, True)
    assert_rel(case.term("minilm.value"), expected)


def test_minilm_attention_equals_kl_of_probs_on_real_models():
    """The q/k kernel path gives the KL of the attention probabilities the models actually use (float64
    models with a wide init, so the attention is far from uniform and the KL well above rounding)."""

    def wide(spec):
        return spec_from_config({**spec.hf_config, "initializer_range": 0.3}, name=spec.name, dtype="float32")

    for family in ("llama", "bert"):
        t_specs, s_spec = model_specs(family)
        t_specs, s_spec = [wide(t_specs[0])], wide(s_spec)
        gen = torch.Generator().manual_seed(1)
        ids, mask, labels = make_batch(s_spec, 2, 6, gen)
        torch.manual_seed(1)
        student = build_model(s_spec, device="cpu", dtype=torch.float64)
        teacher = build_model(t_specs[0], device="cpu", dtype=torch.float64)
        r = resolve(["minilm"], t_specs, s_spec)
        with torch.no_grad(), capture_taps(teacher, r.teacher_taps[0] | {"probs[3]"}) as t_taps:
            teacher(input_ids=ids, attention_mask=mask.long())
        with torch.no_grad(), capture_taps(student, r.student_taps | {"probs[1]"}) as s_taps:
            student(input_ids=ids, attention_mask=mask.long())
        out = DistillLoss(r, t_specs, s_spec)(s_taps, [t_taps], labels=labels, mask=mask)
        p_t, p_s = t_taps["probs[3]"], s_taps["probs[1]"]
        vis = mask[:, None, None, :]
        if family == "llama":
            vis = vis & torch.ones(6, 6, dtype=torch.bool).tril()
        log_ratio = p_t.clamp_min(1e-300).log() - p_s.clamp_min(1e-300).log()
        per_row = torch.where(vis, p_t * log_ratio, 0.0).sum(-1)
        expected = per_row[mask[:, None, :].expand_as(per_row)].mean()
        assert expected > 0.05
        assert_rel(out.terms["minilm.attention"], expected, rtol=1e-5)


def test_minilm_stages_pretrain_kd_then_plain_finetune():
    t_specs, s_spec = model_specs("gpt2")
    got = [
        (m.stage, m.terms, m.teacher)
        for step in (0, 1, 2, 3)
        for m in resolve(["minilm"], t_specs, s_spec, step=step, total_steps=4).methods
    ]
    assert got == [("pretrain_kd", ("attention", "value"), True)] * 2 + [("finetune", ("task",), False)] * 2


def test_minilm_backward(family):
    out = check_backward(["minilm"], family=family)
    assert set(out.terms) == {"minilm.attention", "minilm.value"}


# ---------------------------------------------------------------------------------------------------------
# SID


def test_sid_progressive_unlocking_stepped_through():
    t_specs, s_spec = truncated_teacher_specs("llama")
    rows = []
    for step in range(20):
        case = run_formula(["sid"], specs=(t_specs, s_spec), step=step, total_steps=20)
        (m,) = case.resolved.methods
        pairs = m.pairs["hidden"][0] if m.stage == "progressive" else None
        rows.append((m.stage, pairs, tuple(sorted(case.out.terms))))
    # pretrain: steps 0..9, plain; progressive: steps 10..19, 10 // (2 + 1) = 3 steps per part
    assert rows[:10] == [("pretrain", None, ("sid.pretrain",))] * 10
    intermediate = ("sid.attention", "sid.cls")
    assert rows[10:13] == [("progressive", ((1, 2),), intermediate)] * 3
    assert rows[13:16] == [("progressive", ((1, 2), (2, 4)), intermediate)] * 3
    assert rows[16:] == [("progressive", ((1, 2), (2, 4)), (*intermediate, "sid.hard", "sid.soft"))] * 4
    r = resolve(["sid"], t_specs, s_spec, step=10, total_steps=20)
    assert r.student_taps == {"q[0]", "k[0]", "hidden[1]", "logits"} and r.varies_with_step


@pytest.mark.parametrize(("family", "causal"), [("llama", True), ("bert", False)])
def test_sid_formula(family, causal):
    opts = {"soft_rate": 0.6, "hard_rate": 0.4, "temperature": 2.0}
    case = run_formula(
        [{"name": "sid", "options": opts}], specs=truncated_teacher_specs(family), step=19, total_steps=20
    )
    s, t = case.student, case.teachers[0]
    encoder = case.student_spec.is_encoder
    att = sum(
        attention_kl(
            raw_scores(s[f"q[{a}]"], s[f"k[{a}]"]), raw_scores(t[f"q[{b}]"], t[f"k[{b}]"]), case.mask, causal
        )
        for a, b in ((0, 1), (1, 3))
    )

    def cls(x: torch.Tensor) -> torch.Tensor:
        if encoder:
            return x[:, 0]
        return torch.stack([x[i, int(case.mask[i].sum()) - 1] for i in range(x.shape[0])])

    cos = sum(
        (1 - torch.cosine_similarity(cls(s[f"hidden[{a}]"]), cls(t[f"hidden[{b}]"]), dim=-1)).mean()
        for a, b in ((1, 2), (2, 4))
    )
    p = torch.softmax(t["logits"] / 2, -1)
    soft = -(p * torch.log_softmax(s["logits"] / 2, -1)).sum(-1)[case.mask].mean()
    assert_rel(case.term("sid.attention"), att)
    assert_rel(case.term("sid.cls"), cos)
    assert_rel(case.term("sid.soft"), 0.6 * soft)
    assert "sid.hard" in case.out.terms


def test_sid_backward(family):
    out = check_backward(["sid"], specs=truncated_teacher_specs(family), step=19, total_steps=20)
    assert set(out.terms) == {"sid.attention", "sid.cls", "sid.soft", "sid.hard"}
