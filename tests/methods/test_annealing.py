"""annealing_kd (Jafari et al., EACL 2021) and continuation_kd (Jafari et al., EMNLP Findings 2022): formulas
in float64, stage recipes and annealing schedules stepped through, backward on real models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_rel, check_backward, model_specs, run_formula

from gkd.errors import InputError
from gkd.methods import resolve
from gkd.methods.annealing import anneal_schedule


def masked_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((s - t) ** 2).mean(-1)[mask].mean()


def reference_phi(step: int, total: int, tau: int) -> float:
    """The paper's staircase in exact integer arithmetic: the temperature T = tau - k during the k-th of tau
    equal parts of the stage, phi(T) = 1 - (T - 1) / tau = (k + 1) / tau."""
    k = min(step * tau // total, tau - 1)
    return 1 - ((tau - k) - 1) / tau


def test_phi_schedule_steps_to_one():
    sched = anneal_schedule(7)
    values = [sched.at(step, 70) for step in range(70)]
    assert values[0] == pytest.approx(1 / 7) and values[-1] == pytest.approx(1.0)
    assert sorted(set(round(v, 9) for v in values)) == [round(k / 7, 9) for k in range(1, 8)]
    for step, v in enumerate(values):
        assert v == pytest.approx(reference_phi(step, 70, 7)), step


def test_annealing_formula_and_stages():
    """Steps through a 15-step run: anneal (steps 0..9, phi rising), then the hard loss alone (10..14)."""
    total, tau = 15, 5
    seen_phi = []
    for step in range(total):
        case = run_formula(
            [{"name": "annealing_kd", "options": {"max_temperature": tau}}], step=step, total_steps=total
        )
        stage = case.resolved.methods[0].stage
        if step < 10:
            assert stage == "anneal" and set(case.out.terms) == {"annealing_kd.anneal"}
            assert case.resolved.needs_teacher_forward
            phi = reference_phi(step, 10, tau)  # the staircase over the annealed stage's 10 steps
            s, t = case.student["logits"], case.teachers[0]["logits"]
            assert_rel(case.term("annealing_kd.anneal"), masked_mse(s, phi * t, case.mask))
            seen_phi.append(phi)
        else:
            assert stage == "finetune" and set(case.out.terms) == {"annealing_kd.hard"}
            assert not case.resolved.needs_teacher_forward and case.resolved.teacher_taps == (frozenset(),)
            logits = case.student["logits"]
            expected = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), case.labels[:, 1:].reshape(-1)
            )
            assert_rel(case.term("annealing_kd.hard"), expected)
    assert seen_phi[0] == pytest.approx(1 / tau) and seen_phi[-1] == pytest.approx(1.0)
    assert sorted(set(round(p, 9) for p in seen_phi)) == [round(k / tau, 9) for k in range(1, tau + 1)]


def test_annealing_explicit_stage_spans_the_run():
    case = run_formula(
        [{"name": "annealing_kd", "options": {"stage": "anneal"}}], step=0, total_steps=14
    )  # phi = 1/7 at the start of a run that is only the annealed stage
    s, t = case.student["logits"], case.teachers[0]["logits"]
    assert_rel(case.term("annealing_kd.anneal"), masked_mse(s, t / 7, case.mask))
    case = run_formula([{"name": "annealing_kd", "options": {"stage": "anneal"}}], step=13, total_steps=14)
    assert_rel(
        case.term("annealing_kd.anneal"),
        masked_mse(case.student["logits"], case.teachers[0]["logits"], case.mask),
    )
    teachers, student = model_specs("llama")
    r = resolve([{"name": "annealing_kd", "options": {"stage": "pretrain"}}], teachers, student)
    assert r.teacher_taps == (frozenset(),) and [t.name for t in r.loss_terms] == ["hard"]


def continuation_reference(
    case, step: int, total: int, margin: float, tau: int
) -> tuple[float, torch.Tensor]:
    p = step / total
    psi = 0.0 if p < 0.666 else min(p / 1.333, 1.0)
    phi = reference_phi(step, total, tau)
    s, t = case.student["logits"], case.teachers[0]["logits"]
    d = s - phi * t
    kept = torch.where(d.abs() > margin, d * d, torch.zeros_like(d))
    return psi, kept.mean(-1)[case.mask].mean()


def test_continuation_formula_and_schedule():
    """Steps through a 12-step run: KD alone until 66.6% of the steps, then (1 - psi) KD + psi hard."""
    total, tau, margin = 12, 4, 0.8
    hard_steps = []
    for step in range(total):
        case = run_formula(
            [{"name": "continuation_kd", "options": {"max_temperature": tau, "margin": margin}}],
            step=step,
            total_steps=total,
        )
        psi, kd = continuation_reference(case, step, total, margin, tau)
        assert_rel(case.term("continuation_kd.kd"), (1 - psi) * kd)
        logits = case.student["logits"]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), case.labels[:, 1:].reshape(-1))
        assert_rel(case.term("continuation_kd.hard"), psi * ce)
        if psi > 0:
            hard_steps.append(step)
    assert hard_steps == [8, 9, 10, 11]  # 8 / 12 = 0.667 >= 0.666
    # The margin masks something on random logits but not everything (so the test exercises it).
    case = run_formula(
        [{"name": "continuation_kd", "options": {"margin": margin}}], step=0, total_steps=total
    )
    d = case.student["logits"] - case.teachers[0]["logits"] / 10
    assert 0 < (d.abs() <= margin).float().mean() < 1


def test_continuation_hinge_margin_mode():
    """The alternative reading of the margin: only the part of |z_s - phi z_t| beyond the margin counts."""
    total, tau, margin = 12, 4, 0.8
    for step in (0, 9):
        options = {"max_temperature": tau, "margin": margin, "margin_mode": "hinge"}
        case = run_formula([{"name": "continuation_kd", "options": options}], step=step, total_steps=total)
        psi = 0.0 if step / total < 0.666 else min((step / total) / 1.333, 1.0)
        phi = reference_phi(step, total, tau)
        d = case.student["logits"] - phi * case.teachers[0]["logits"]
        hinge = torch.clamp(d.abs() - margin, min=0.0) ** 2
        assert_rel(case.term("continuation_kd.kd"), (1 - psi) * hinge.mean(-1)[case.mask].mean())
        _, masked = continuation_reference(case, step, total, margin, tau)
        # a different loss from the default mask reading
        assert abs(float(case.term("continuation_kd.kd")) - (1 - psi) * float(masked)) > 1e-3
    with pytest.raises(InputError, match="margin_mode"):
        run_formula([{"name": "continuation_kd", "options": {"margin_mode": "relu"}}], step=0, total_steps=4)


def test_continuation_psi_values():
    case = run_formula([{"name": "continuation_kd"}], step=8, total_steps=12)
    psi, _ = continuation_reference(case, 8, 12, 1.0, 10)
    assert psi == pytest.approx((8 / 12) / 1.333)
    case = run_formula(
        [{"name": "continuation_kd", "options": {"stage": "pretrain"}}], step=0, total_steps=12
    )
    assert set(case.out.terms) == {"continuation_kd.hard"} and case.resolved.teacher_taps == (frozenset(),)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("name", ["annealing_kd", "continuation_kd"])
def test_backward(name, family):
    out = check_backward([name], family=family, step=9, total_steps=12)
    assert f"{name}.hard" in out.terms or name == "annealing_kd"
