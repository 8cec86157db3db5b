"""pd, pkd, distilbert, alp_kd: each formula in float64 against a straightforward implementation, the stage
recipes stepped through, and forward + backward through the real tap capture."""

from __future__ import annotations

import pytest
import torch
from method_checks import assert_rel, check_backward, run_formula, truncated_teacher_specs

from gkd.errors import InputError
from gkd.methods import resolve


def kl_tokens(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over real tokens of KL(softmax(t / T) || softmax(s / T)), no T^2."""
    p = torch.softmax(t / temp, -1)
    return (p * (torch.log(p) - torch.log_softmax(s / temp, -1))).sum(-1)[mask].mean()


def soft_ce_tokens(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temp: float) -> torch.Tensor:
    p = torch.softmax(t / temp, -1)
    return -(p * torch.log_softmax(s / temp, -1)).sum(-1)[mask].mean()


def causal_nll(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token i predicts label i + 1; -100 labels are skipped."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            y = int(labels[b, i + 1])
            if y != -100:
                total = total - torch.log_softmax(s[b, i], -1)[y]
                count += 1
    return total / count


def mlm_nll(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != -100
    return -torch.log_softmax(s, -1)[keep].gather(-1, labels[keep].unsqueeze(-1)).mean()


def cls_state(x: torch.Tensor, mask: torch.Tensor, encoder: bool) -> torch.Tensor:
    """BERT's [CLS] (first token) for encoders; the last real token for decoders."""
    if encoder:
        return x[:, 0]
    return torch.stack([x[b, int(mask[b].sum()) - 1] for b in range(x.shape[0])])


# ---------------------------------------------------------------------------------------------------------
# PD


def test_pd_steps_through_pretrain_then_distill():
    seen = []
    for step in range(10):
        case = run_formula(["pd"], step=step, total_steps=10)
        (method,) = case.resolved.methods
        seen.append((method.stage, method.teacher, set(case.out.terms)))
        s = case.student["logits"]
        if method.stage == "pretrain":
            assert case.resolved.teacher_taps == (frozenset(),) and not case.resolved.needs_teacher_forward
            assert_rel(case.out.total, causal_nll(s, case.labels))
        else:
            t = case.teachers[0]["logits"]
            assert_rel(case.out.total, soft_ce_tokens(s, t, case.mask, 1.0))
    assert seen[:5] == [("pretrain", False, {"pd.pretrain"})] * 5
    assert seen[5:] == [("distill", True, {"pd.soft"})] * 5


def test_pd_distill_kl_option_and_rate():
    case = run_formula([{"name": "pd", "options": {"stage": "distill", "soft": "kl", "soft_rate": 0.5}}])
    s, t = case.student["logits"], case.teachers[0]["logits"]
    assert_rel(case.term("pd.soft"), 0.5 * kl_tokens(s, t, case.mask, 1.0))


def test_pd_backward(family):
    check_backward([{"name": "pd", "options": {"stage": "distill"}}], family=family)
    check_backward(["pd"], family=family)  # the plain pretraining stage: no teacher taps at all


# ---------------------------------------------------------------------------------------------------------
# PKD


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_pkd_formula(family):
    specs = truncated_teacher_specs(family, layers=2)
    opts = {"alpha": 0.3, "beta": 50.0}
    case = run_formula([{"name": "pkd", "options": opts}], specs=specs)
    encoder = case.student_spec.is_encoder
    # PKD-skip, 2-layer student under a 4-layer teacher: only the intermediate pair (1, 2); the last layer is
    # left to the prediction loss.
    assert case.resolved.methods[0].pairs["hidden"][0] == ((1, 2),)
    assert case.resolved.student_taps == {"hidden[1]", "logits"}
    hs = cls_state(case.student["hidden[1]"], case.mask, encoder)
    ht = cls_state(case.teachers[0]["hidden[2]"], case.mask, encoder)
    patient = ((hs / hs.norm(dim=-1, keepdim=True) - ht / ht.norm(dim=-1, keepdim=True)) ** 2).sum(-1).mean()
    s, t = case.student["logits"], case.teachers[0]["logits"]
    hard = mlm_nll(s, case.labels) if encoder else causal_nll(s, case.labels)
    assert_rel(case.term("pkd.patient"), 50.0 * patient)
    assert_rel(case.term("pkd.soft"), 0.3 * kl_tokens(s, t, case.mask, 10.0))
    assert_rel(case.term("pkd.hard"), 0.7 * hard)
    assert_rel(case.out.total, 50.0 * patient + 0.3 * kl_tokens(s, t, case.mask, 10.0) + 0.7 * hard)


def test_pkd_mean_pool_and_deeper_student():
    specs = truncated_teacher_specs("gpt2", layers=3)
    case = run_formula([{"name": "pkd", "options": {"cls": "mean", "alpha": 1.0}}], specs=specs)
    pairs = case.resolved.methods[0].pairs["hidden"][0]
    assert pairs == ((1, 1), (2, 2))  # uniform 4 // 3, without the last pair (3, 4)
    assert "pkd.hard" not in case.out.terms  # alpha = 1: the hard loss has weight 0 and is dropped
    m = case.mask.double().unsqueeze(-1)
    expected = 0.0
    for sd, td in pairs:
        hs = (case.student[f"hidden[{sd}]"] * m).sum(1) / m.sum(1)
        ht = (case.teachers[0][f"hidden[{td}]"] * m).sum(1) / m.sum(1)
        expected = (
            expected
            + ((hs / hs.norm(dim=-1, keepdim=True) - ht / ht.norm(dim=-1, keepdim=True)) ** 2).sum(-1).mean()
        )
    assert_rel(case.term("pkd.patient"), 100.0 * expected)


def test_pkd_one_layer_student_is_refused():
    with pytest.raises(InputError, match="at least 2 layers"):
        run_formula(["pkd"], specs=truncated_teacher_specs("llama", layers=1))


def test_pkd_backward(family):
    out = check_backward(["pkd"], specs=truncated_teacher_specs(family, layers=2))
    assert set(out.terms) == {"pkd.patient", "pkd.soft", "pkd.hard"}


# ---------------------------------------------------------------------------------------------------------
# DistilBERT


@pytest.mark.parametrize("positions", ["tokens", "labels"])
def test_distilbert_formula(positions):
    case = run_formula(
        [{"name": "distilbert", "options": {"cos_positions": positions}}],
        family="bert",
        specs=truncated_teacher_specs("bert"),
    )
    s, t = case.student["logits"], case.teachers[0]["logits"]
    fs, ft = case.student["final"], case.teachers[0]["final"]
    where = case.mask if positions == "tokens" else case.mask & (case.labels != -100)
    cos = (1 - (fs * ft).sum(-1) / (fs.norm(dim=-1) * ft.norm(dim=-1)))[where].mean()
    assert_rel(case.term("distilbert.soft"), 5 * kl_tokens(s, t, case.mask, 2.0) * 4)
    assert_rel(case.term("distilbert.mlm"), 2 * mlm_nll(s, case.labels))
    assert_rel(case.term("distilbert.cos"), cos)


def test_distilbert_decoder_uses_causal_lm():
    case = run_formula(["distilbert"], specs=truncated_teacher_specs("llama"))
    assert_rel(case.term("distilbert.mlm"), 2 * causal_nll(case.student["logits"], case.labels))


def test_distilbert_steps_pretrain_kd_then_plain_finetune():
    specs = truncated_teacher_specs("bert")
    stages = []
    for step in range(4):
        r = resolve(["distilbert"], *specs, step=step, total_steps=4)
        (m,) = r.methods
        stages.append((m.stage, m.teacher, m.terms, r.needs_teacher_forward))
    assert stages == [
        ("pretrain_kd", True, ("soft", "mlm", "cos"), True),
        ("pretrain_kd", True, ("soft", "mlm", "cos"), True),
        ("finetune", False, ("task",), False),
        ("finetune", False, ("task",), False),
    ]


def test_distilbert_backward(family):
    out = check_backward(["distilbert"], specs=truncated_teacher_specs(family))
    assert set(out.terms) == {"distilbert.soft", "distilbert.mlm", "distilbert.cos"}


# ---------------------------------------------------------------------------------------------------------
# ALP-KD


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_alp_kd_formula(family):
    specs = truncated_teacher_specs(family, layers=2)
    case = run_formula([{"name": "alp_kd", "options": {"alp_rate": 0.4}}], specs=specs)
    encoder = case.student_spec.is_encoder
    assert case.resolved.student_taps == {"hidden[1]", "hidden[2]", "logits"}
    assert case.resolved.teacher_taps == (
        frozenset({"hidden[1]", "hidden[2]", "hidden[3]", "hidden[4]", "logits"}),
    )
    teacher = [cls_state(case.teachers[0][f"hidden[{k}]"], case.mask, encoder) for k in range(1, 5)]
    alp = 0.0
    for j in (1, 2):
        s = cls_state(case.student[f"hidden[{j}]"], case.mask, encoder)
        for b in range(s.shape[0]):
            scores = torch.stack([torch.dot(s[b], t[b]) for t in teacher])
            weights = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            c = sum(w * t[b] for w, t in zip(weights, teacher, strict=True))
            alp = alp + ((s[b] - c) ** 2).sum() / (s.shape[0] * s.shape[1])
    s, t = case.student["logits"], case.teachers[0]["logits"]
    hard = mlm_nll(s, case.labels) if encoder else causal_nll(s, case.labels)
    assert_rel(case.term("alp_kd.alp"), 0.4 * alp)
    assert_rel(case.term("alp_kd.soft"), 0.7 * soft_ce_tokens(s, t, case.mask, 20.0))
    assert_rel(case.term("alp_kd.hard"), 0.1 * hard)


def test_alp_kd_backward(family):
    out = check_backward(["alp_kd"], specs=truncated_teacher_specs(family))
    assert set(out.terms) == {"alp_kd.alp", "alp_kd.soft", "alp_kd.hard"}


@pytest.mark.parametrize("name", ["pkd", "distilbert", "alp_kd"])
def test_equal_hidden_methods_refuse_different_widths(name):
    from method_checks import model_specs

    with pytest.raises(InputError, match="hidden size.* 32 .* 64"):
        resolve([name], *model_specs("llama"))
