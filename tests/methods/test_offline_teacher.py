"""Logit methods against an offline teacher: the teacher's `logits` (or `final`) tap served as a stored top-k
(`TopK`), which kd's soft loss (kl and soft_ce) and fkl compute from exactly, with the tail bucket; which
methods resolve() lets run offline."""

from __future__ import annotations

import pytest
import torch
from method_checks import assert_rel, make_batch, model_specs

from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.methods.divergence import TopK, topk_targets
from gkd.models import build_model
from gkd.runtime.capture import capture_taps
from gkd.runtime.step import distill_step


def _buckets(s: torch.Tensor, target: TopK, temp: float) -> tuple[torch.Tensor, ...]:
    """The (k + 1)-bucket distributions of teacher and student, probabilities summed directly."""
    q = torch.softmax(s / temp, -1)
    p_k, q_k = target.logprobs.exp(), q.gather(-1, target.indices)
    return p_k, q_k, 1 - p_k.sum(-1), 1 - q_k.sum(-1)


def _case(methods: list, k: int, fused: bool = False) -> tuple:
    t_specs, s_spec = model_specs("llama")
    resolved = resolve(methods, t_specs, s_spec, fused_linear=fused)
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, s_spec.vocab, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 5, s_spec.vocab, generator=gen, dtype=torch.float64)
    _, mask, labels = make_batch(s_spec, 2, 5, gen)
    loss = DistillLoss(resolved, t_specs, s_spec).double()
    temp = next(x.temperature for x in resolved.loss_terms if x.name in ("soft", "div"))
    target = topk_targets(t, k, temperature=temp)
    stored = loss({"logits": s}, [{"logits": target}], labels=labels, mask=mask)
    live = loss({"logits": s}, [{"logits": t}], labels=labels, mask=mask)
    return s, t, mask, target, temp, stored, live


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_kd_soft_from_a_stored_top_k(kind: str) -> None:
    s, _, mask, target, temp, stored, _ = _case([{"name": "kd", "options": {"soft": kind}}], k=8)
    p_k, q_k, p_t, q_t = _buckets(s, target, temp)
    if kind == "kl":
        rows = (p_k * (p_k.log() - q_k.log())).sum(-1) + p_t * (p_t.log() - q_t.log())
        expected = rows[mask].mean() * temp**2
    else:
        rows = -(p_k * q_k.log()).sum(-1) - p_t * q_t.log()
        expected = rows[mask].mean()
    assert_rel(stored.terms["kd.soft"], expected)


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_a_full_width_top_k_is_the_live_teacher(kind: str) -> None:
    # k = V leaves no tail: the stored teacher is the teacher, so the loss equals the live one.
    t_specs, s_spec = model_specs("llama")
    _, _, _, _, _, stored, live = _case([{"name": "kd", "options": {"soft": kind}}], k=s_spec.vocab)
    assert_rel(stored.terms["kd.soft"], live.terms["kd.soft"])
    _, _, _, _, _, stored, live = _case(["fkl"], k=s_spec.vocab)
    assert_rel(stored.terms["fkl.div"], live.terms["fkl.div"])


def test_fkl_fused_from_a_stored_top_k_equals_the_logits_path() -> None:
    """On the fused-linear path the student's final state and head weight are read, the teacher's `final`
    tap is the stored top-k: the value equals the same top-k loss on materialised student logits."""
    t_specs, s_spec = model_specs("llama")
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu").double().eval()
    teacher = build_model(t_specs[0], device="cpu").double().eval()
    ids, mask, labels = make_batch(s_spec, 2, 6, torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_taps(teacher, {"logits"}) as taps:
        teacher(input_ids=ids, attention_mask=mask.long())
    target = topk_targets(taps["logits"], 8)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    values = []
    for fused in (True, False):
        resolved = resolve(["fkl"], t_specs, s_spec, fused_linear=fused)
        assert resolved.fused_linear == fused and resolved.offline_ok
        loss = DistillLoss(resolved, t_specs, s_spec).double()
        served = [dict.fromkeys(resolved.teacher_taps[0], target)]
        out = distill_step(student, [teacher], loss, batch, resolved, stored_teacher_taps=served)
        values.append(out.terms["fkl.div"])
    assert_rel(values[0], values[1])


def test_divergences_that_need_the_whole_distribution_refuse_a_stored_top_k() -> None:
    with pytest.raises(InputError, match="whole distribution"):
        _case(["jsd"], k=8)
    with pytest.raises(InputError, match="raw logits"):
        _case([{"name": "kd", "options": {"soft": "mse"}}], k=8)


def test_resolve_offers_offline_only_where_the_top_k_is_exact() -> None:
    t_specs, s_spec = model_specs("llama")

    def offline(methods: list) -> bool:
        return resolve(methods, t_specs, s_spec).offline_ok

    assert offline(["kd"]) and offline(["fkl"]) and offline(["topk_kl"])
    assert offline([{"name": "kd", "options": {"soft": "soft_ce"}}])
    assert not offline(["jsd"]) and not offline(["rkl"]) and not offline(["tvd"])
    assert not offline([{"name": "kd", "options": {"soft": "mse"}}])
    assert not offline(["kd", "fkl"])  # T = 2 and T = 1: one stored top-k cannot serve both
    assert not offline(["kd", "minilmv2"])  # intermediate teacher taps need the live teacher
