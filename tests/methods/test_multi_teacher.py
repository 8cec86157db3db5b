"""Multi-teacher methods (tmkd, mt_bert, rl_kd, uncertainty) with two teachers of different sizes.

Each formula is recomputed here from the papers with plain float64 torch: per-sample values are means over a
sample's real tokens; the causal LM loss predicts token i + 1 at position i; [CLS] on a decoder is the last
real token. Stage recipes are stepped through with `resolve` at every step of a short run.
"""

from __future__ import annotations

import math

import pytest
import torch
from method_checks import assert_rel, check_backward, model_specs, random_taps, run_formula

from gkd.methods import DistillLoss, resolve
from gkd.methods.multi_teacher import uncertainty_weights

# --------------------------------------------------------------------------------------------------------
# Independent reference formulas


def per_sample(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): mean over each row's real tokens."""
    return torch.stack([values[b][mask[b]].mean() for b in range(values.shape[0])])


def soft_ce_tokens(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    return -(torch.softmax(t / temp, -1) * torch.log_softmax(s / temp, -1)).sum(-1)


def kl_t2_tokens(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    p = torch.softmax(t / temp, -1)
    return (p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1) * temp**2


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token nll at positions 0..T-2, which of them have a label)."""
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll, keep


def causal_ce_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    nll, keep = causal_nll(logits, labels)
    return per_sample(nll, keep)


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    nll, keep = causal_nll(logits, labels)
    return nll[keep].mean()


def last_real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[b, int(mask[b].nonzero().max())] for b in range(x.shape[0])])


# --------------------------------------------------------------------------------------------------------
# TMKD


def test_tmkd_formula_finetune_two_teachers():
    case = run_formula([{"name": "tmkd", "weight": 2.0, "options": {"stage": "finetune"}}], teachers=2)
    s, mask = case.student["logits"], case.mask
    soft = [((s - t["logits"]) ** 2).mean(-1)[mask].mean() for t in case.teachers]  # MSE on logits
    assert_rel(case.term("tmkd.soft"), 2.0 * (soft[0] + soft[1]) / 2)
    assert_rel(case.term("tmkd.hard"), 2.0 * causal_ce(s, case.labels) / 2)  # hard rate 1 / #teachers


def test_tmkd_stages_step_through():
    teachers, student = model_specs("llama", teachers=2)
    seen = []
    for step in range(10):
        r = resolve(["tmkd"], teachers, student, step=step, total_steps=10)
        (m,) = r.methods
        seen.append((m.stage, m.terms))
    assert seen == [("pretrain", ("soft",))] * 5 + [("finetune", ("soft", "hard"))] * 5
    # Pre-training is soft-only: the total is the soft term and the hard loss is never evaluated.
    pre = run_formula(["tmkd"], teachers=2, step=2, total_steps=10)
    assert set(pre.out.terms) == {"tmkd.soft"}
    assert_rel(pre.out.total, pre.term("tmkd.soft"))
    fine = run_formula(["tmkd"], teachers=2, step=7, total_steps=10)
    assert set(fine.out.terms) == {"tmkd.soft", "tmkd.hard"}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_tmkd_backward_two_teachers(family):
    out = check_backward([{"name": "tmkd", "options": {"stage": "finetune"}}], family=family, teachers=2)
    assert set(out.terms) == {"tmkd.soft", "tmkd.hard"}


# --------------------------------------------------------------------------------------------------------
# MT-BERT


def test_mt_bert_formula_two_teachers():
    options = {"soft_rate": 0.7, "hidden_rate": 1.5, "hard_rate": 0.3}
    case = run_formula([{"name": "mt_bert", "options": options}], teachers=2)
    s, mask, labels = case.student["logits"], case.mask, case.labels
    soft = 0.0
    hidden = 0.0
    layer_pairs = [((1, 2), (2, 4)), ((1, 1), (2, 3))]  # uniform: student depth j <- teacher depth j*Lt//Ls
    for i, t in enumerate(case.teachers):
        weight = 1 / (1 + causal_ce_per_sample(t["logits"], labels))  # the teacher's loss on the gold labels
        soft = soft + (weight * per_sample(soft_ce_tokens(s, t["logits"], 1.0), mask)).mean()
        proj = case.loss.extras["mt_bert"]["proj"][i]
        assert proj.weight.shape == (case.teacher_specs[i].hidden, 32)
        assert case.resolved.methods[0].pairs["hidden"][i] == layer_pairs[i]
        for sd, td in layer_pairs[i]:
            hs = last_real(case.student[f"hidden[{sd}]"], mask) @ proj.weight.T + proj.bias
            ht = last_real(t[f"hidden[{td}]"], mask)
            diff = hs / hs.norm(dim=-1, keepdim=True) - ht / ht.norm(dim=-1, keepdim=True)
            hidden = hidden + (diff**2).sum(-1).mean()  # PKD: normalised [CLS] distance
    assert_rel(case.term("mt_bert.soft"), 0.7 * soft)
    assert_rel(case.term("mt_bert.hidden"), 1.5 * hidden)
    assert_rel(case.term("mt_bert.hard"), 0.3 * causal_ce(s, labels))


def test_mt_bert_confident_teacher_counts_more():
    """A teacher that fits the gold labels well gets weight near 1; a poor one near 1 / (1 + its loss)."""
    case = run_formula([{"name": "mt_bert", "options": {"hidden_rate": 0, "hard_rate": 0}}], teachers=2)
    teachers = [dict(t) for t in case.teachers]
    # Teacher 0 predicts the gold next token with a large margin at every position.
    good = torch.full_like(teachers[0]["logits"], -20.0)
    nxt = case.labels[:, 1:].clamp(min=0)
    good[:, :-1].scatter_(-1, nxt.unsqueeze(-1), 20.0)
    teachers[0]["logits"] = good
    out = case.loss(case.student, teachers, labels=case.labels, mask=case.mask)
    s = case.student["logits"]
    expected = per_sample(soft_ce_tokens(s, good, 1.0), case.mask).mean()  # weight ~ 1 for teacher 0
    weak = 1 / (1 + causal_ce_per_sample(teachers[1]["logits"], case.labels))
    expected = expected + (weak * per_sample(soft_ce_tokens(s, teachers[1]["logits"], 1.0), case.mask)).mean()
    assert_rel(out.terms["mt_bert.soft"], expected, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mt_bert_backward_two_teachers(family):
    out = check_backward(["mt_bert"], family=family, teachers=2)
    assert set(out.terms) == {"mt_bert.soft", "mt_bert.hidden", "mt_bert.hard"}


# --------------------------------------------------------------------------------------------------------
# RL-KD


def rl_expected(case, alpha: float, temp: float, seed: int, step: int) -> dict[str, torch.Tensor]:
    """RL-KD's stage-2 terms from the paper's definitions (agent state, Bernoulli policy, REINFORCE)."""
    s, mask, labels = case.student["logits"], case.mask, case.labels
    extras = case.loss.extras["rl_kd"]
    tl = [t["logits"] for t in case.teachers]
    semantic = last_real(case.teachers[0]["final"], mask)  # the semantic teacher's [CLS]
    ce = torch.stack([causal_ce_per_sample(t, labels) for t in tl], -1)
    soft_labels = torch.cat([torch.softmax(last_real(t, mask) / temp, -1) for t in tl], -1)
    # Linear([rep, CE]) + Linear(concat soft labels), written as the concatenated weight matrices
    w_state = torch.cat([extras["agent_rep"].weight, extras["agent_loss"].weight], 1)
    w_soft = torch.cat([extras["agent_soft"][i].weight for i in range(len(tl))], 1)
    z = torch.cat([semantic, ce], -1) @ w_state.T + extras["agent_rep"].bias + soft_labels @ w_soft.T
    prob = torch.sigmoid(z)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    actions = (torch.rand(z.shape, generator=gen, dtype=torch.float64) < prob).double()
    kd = torch.stack([per_sample(soft_ce_tokens(s, t, temp), mask) for t in tl], -1)
    selected = (actions * kd).sum(-1) / actions.sum(-1).clamp(min=1)
    reward = -(alpha * selected + (1 - alpha) * causal_ce_per_sample(s, labels))
    log_pi = (actions * prob.log() + (1 - actions) * (1 - prob).log()).sum(-1)
    return {
        "select": alpha * selected.mean(),
        "policy": -(reward * log_pi).mean(),
        "hard": (1 - alpha) * causal_ce(s, labels),
        "actions": actions,
    }


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_rl_kd_reinforce_formula_two_teachers(step):
    options = {"stage": "reinforce", "alpha": 0.6, "seed": 3}
    case = run_formula([{"name": "rl_kd", "options": options}], teachers=2, batch=4, step=step)
    expected = rl_expected(case, alpha=0.6, temp=10.0, seed=3, step=step)
    assert_rel(case.term("rl_kd.select"), expected["select"])
    assert_rel(case.term("rl_kd.policy"), expected["policy"])
    assert_rel(case.term("rl_kd.hard"), expected["hard"])


def test_rl_kd_selection_is_seeded_and_varies_with_step():
    options = {"stage": "reinforce", "seed": 3}
    case = run_formula([{"name": "rl_kd", "options": options}], teachers=2, batch=4)

    # same seed and step: the same selection, so the same loss
    def at(step: int):
        return case.loss(case.student, case.teachers, labels=case.labels, mask=case.mask, step=step)

    first = [at(step) for step in range(4)]
    again = [at(step) for step in range(4)]
    for a, b in zip(first, again, strict=True):
        assert_rel(a.total, b.total, rtol=1e-15)
    # a different step draws again
    assert len({float(out.terms["rl_kd.policy"].detach()) for out in first}) > 1


def test_rl_kd_all_selected_equals_averaging():
    """When the agent selects every teacher, stage 2's KD term equals stage 1's plain average."""
    stage1 = run_formula([{"name": "rl_kd", "options": {"stage": "average"}}], teachers=2)
    s, mask = stage1.student["logits"], stage1.mask
    avg = sum(per_sample(soft_ce_tokens(s, t["logits"], 10.0), mask).mean() for t in stage1.teachers) / 2
    assert_rel(stage1.term("rl_kd.average"), 0.5 * avg)
    stage2 = run_formula([{"name": "rl_kd", "options": {"stage": "reinforce"}}], teachers=2)
    with torch.no_grad():
        stage2.loss.extras["rl_kd"]["agent_rep"].bias.fill_(50.0)  # sigmoid -> 1: every teacher selected
    out = stage2.loss(stage2.student, stage2.teachers, labels=stage2.labels, mask=stage2.mask)
    # the same logits through stage 1's term (stage 2 also captures the semantic tap, so its tensors differ)
    teachers = [{"logits": t["logits"]} for t in stage2.teachers]
    avg = stage1.loss(stage2.student, teachers, labels=stage2.labels, mask=stage2.mask)
    assert_rel(out.terms["rl_kd.select"], avg.terms["rl_kd.average"])


def test_rl_kd_stages_step_through():
    teachers, student = model_specs("llama", teachers=2)
    seen = []
    for step in range(8):
        r = resolve(["rl_kd"], teachers, student, step=step, total_steps=8)
        (m,) = r.methods
        seen.append((m.stage, m.terms, m.train, r.teacher_taps))
    average = ("average", ("average", "hard"), "student", (frozenset({"logits"}), frozenset({"logits"})))
    # stage 2 adds the semantic teacher's final hidden state (teacher 0 only)
    reinforce = (
        "reinforce",
        ("select", "policy", "hard"),
        "student+extras",
        (frozenset({"logits", "final"}), frozenset({"logits"})),
    )
    assert seen == [average] * 4 + [reinforce] * 4
    # the agent: Linear([rep (64), CE (2)] -> 2) + Linear(concat soft labels (2 x 256) -> 2)
    assert [(e.name, e.shapes) for e in r.extras] == [
        ("rl_kd.agent_rep", ((64, 2),)),
        ("rl_kd.agent_loss", ((2, 2),)),
        ("rl_kd.agent_soft", ((256, 2), (256, 2))),
    ]
    assert r.num_extra_parameters == 64 * 2 + 2 + 2 * 2 + 2 * 256 * 2


def test_rl_kd_policy_gradient_reaches_only_the_agent():
    teachers, student = model_specs("llama", teachers=2)
    r = resolve([{"name": "rl_kd", "options": {"stage": "reinforce"}}], teachers, student, fused_linear=False)
    gen = torch.Generator().manual_seed(0)
    s_taps = random_taps(r.student_taps, student, 2, 5, gen, requires_grad=True)
    t_taps = [random_taps(n, spec, 2, 5, gen) for n, spec in zip(r.teacher_taps, teachers, strict=True)]
    labels = torch.randint(0, student.vocab, (2, 5), generator=gen)
    loss = DistillLoss(r, teachers, student).double()
    out = loss(s_taps, t_taps, labels=labels)
    out.terms["rl_kd.policy"].backward()
    assert s_taps["logits"].grad is None
    assert loss.extras["rl_kd"]["agent_rep"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_rl_kd_backward_two_teachers(family):
    out = check_backward(
        [{"name": "rl_kd", "options": {"stage": "reinforce"}}], family=family, teachers=2, batch=4
    )
    assert set(out.terms) == {"rl_kd.select", "rl_kd.policy", "rl_kd.hard"}


# --------------------------------------------------------------------------------------------------------
# Uncertainty


def normalized_entropy(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    q = torch.softmax(s, -1)
    return per_sample(-(q * q.log()).sum(-1) / math.log(s.shape[-1]), mask)


def test_uncertainty_soft_formula_two_teachers():
    case = run_formula([{"name": "uncertainty", "options": {"soft_rate": 0.8}}], teachers=2, batch=3)
    s, mask = case.student["logits"], case.mask
    u = normalized_entropy(s, mask)
    kd = [per_sample(kl_t2_tokens(s, t["logits"], 1.0), mask) for t in case.teachers]
    expected = (u * kd[0] + (1 - u) * kd[1]).mean()  # uncertain samples lean on the first teacher
    assert_rel(case.term("uncertainty.soft"), 0.8 * expected)
    assert_rel(case.term("uncertainty.hard"), causal_ce(s, case.labels))


def test_uncertainty_hard_assignment_by_entropy_rank():
    case = run_formula([{"name": "uncertainty", "options": {"selection": "hard"}}], teachers=2, batch=4)
    s, mask = case.student["logits"], case.mask
    u = normalized_entropy(s, mask)
    kd = [per_sample(kl_t2_tokens(s, t["logits"], 1.0), mask) for t in case.teachers]
    most_uncertain = set(torch.argsort(u, descending=True)[:2].tolist())
    expected = sum(kd[0][b] if b in most_uncertain else kd[1][b] for b in range(4)) / 4
    assert_rel(case.term("uncertainty.soft"), expected)


def test_uncertainty_weights_table():
    u = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7], dtype=torch.float64)
    w3 = uncertainty_weights(u, 3, "soft")  # proportional to u, 1/2, 1 - u
    expected = torch.stack([u, torch.full_like(u, 0.5), 1 - u], -1) / 1.5
    assert torch.allclose(w3, expected, rtol=1e-12)
    # hard: ranks by u descending are 4, 0, 2, 3, 1 -> rank * 2 // 5 -> teachers 1, 0, 0, 1, 0
    assert uncertainty_weights(u, 2, "hard").argmax(-1).tolist() == [1, 0, 0, 1, 0]
    assert uncertainty_weights(u, 3, "hard").argmax(-1).tolist() == [2, 0, 1, 1, 0]
    assert torch.equal(uncertainty_weights(u, 1, "soft"), torch.ones(5, 1, dtype=torch.float64))


@pytest.mark.parametrize("family, selection", [("llama", "soft"), ("bert", "hard")])
def test_uncertainty_backward_two_teachers(family, selection):
    check_backward(
        [{"name": "uncertainty", "options": {"selection": selection}}], family=family, teachers=2, batch=4
    )
