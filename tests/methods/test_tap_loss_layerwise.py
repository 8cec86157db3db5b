"""Layerwise tap losses (`distill_step(..., tap_loss="layerwise")`): every method's loss terms and gradients
equal those of computing the terms at the end of the forward, teacher taps are dropped once read, and a
recomputed student layer does not replay a term."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from method_checks import make_batch, model_specs, moe_specs, stored_topk, truncated_teacher_specs

from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.methods.registry import get, names
from gkd.models import build_model
from gkd.planner.schedule import layerwise_layer
from gkd.runtime.capture import capture_taps
from gkd.runtime.engines import apply_recompute
from gkd.runtime.step import distill_step

# Hook ops run extra forwards that read taps at the end (layerwise is refused); a chain runs several jobs.
LAYERWISE_METHODS = [n for n in names() if not get(n).hook_ops and not get(n).chain]


def _specs(method: str) -> tuple[list[Any], Any]:
    teachers = max(1, get(method).min_teachers)
    try:
        specs = model_specs("llama", teachers)
        resolve([method], *specs, fused_linear=False)
        return specs
    except InputError:  # equal widths needed (e.g. pkd): a truncated teacher
        pass
    try:
        specs = truncated_teacher_specs("llama", 2)
        resolve([method], *specs, fused_linear=False)
        return specs
    except InputError:  # a router read (router_kl): mixture-of-experts models
        return moe_specs()


def _run(method: str, tap_loss: str, recompute: tuple[int, ...] = ()) -> tuple[Any, dict[str, torch.Tensor]]:
    t_specs, s_spec = _specs(method)
    resolved = resolve([method], t_specs, s_spec, fused_linear=False)
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu").double().eval()
    teachers = [build_model(s, device="cpu").double().eval() for s in t_specs]
    for model, spec in zip((student, *teachers), (s_spec, *t_specs), strict=True):
        if spec.layout.get("moe"):  # torch's grouped_mm has no float64 kernel: transformers' expert loop
            model.set_experts_implementation("eager")
    apply_recompute(student, recompute)
    loss = DistillLoss(resolved, t_specs, s_spec).double()
    ids, mask, labels = make_batch(s_spec, 2, 6, torch.Generator().manual_seed(0))
    stored = []
    for model, wanted in zip(teachers, resolved.teacher_taps, strict=True):
        entry: dict[str, Any] = {}
        if "topk" in wanted:
            with torch.no_grad(), capture_taps(model, {"logits"}) as taps:
                model(input_ids=ids, attention_mask=mask.long())
            entry["topk"] = stored_topk(taps["logits"])
        stored.append(entry)
    torch.manual_seed(1)  # random spans / layers draw the same numbers in both runs
    out = distill_step(
        student,
        teachers,
        loss,
        {"input_ids": ids, "attention_mask": mask, "labels": labels},
        resolved,
        stored_teacher_taps=stored,
        tap_loss=tap_loss,
    )
    out.total.backward()
    grads = {f"s.{n}": p.grad for n, p in student.named_parameters() if p.grad is not None}
    grads.update({f"x.{n}": p.grad for n, p in loss.named_parameters() if p.grad is not None})
    return out, grads


@pytest.mark.parametrize("method", LAYERWISE_METHODS)
def test_layerwise_equals_end(method: str) -> None:
    end, end_grads = _run(method, "end")
    lw, lw_grads = _run(method, "layerwise")
    assert set(lw.terms) == set(end.terms)
    for key in end.terms:
        torch.testing.assert_close(lw.terms[key], end.terms[key], rtol=1e-10, atol=1e-12, msg=key)
    torch.testing.assert_close(lw.total, end.total, rtol=1e-10, atol=1e-12)
    assert set(lw_grads) == set(end_grads)
    for key, g in end_grads.items():
        torch.testing.assert_close(lw_grads[key], g, rtol=1e-9, atol=1e-12, msg=key)


def test_some_terms_really_run_during_the_forward() -> None:
    # The equality above would hold trivially if every term fell back to the end: minilmv2 and tinybert read
    # taps of inner layers, so they must be computed by the layer hooks.
    t_specs, s_spec = model_specs("llama")
    for method in ("minilmv2", "tinybert", "hidden_mse"):
        resolved = resolve([method], t_specs, s_spec, fused_linear=False)
        where = [layerwise_layer(t.taps, s_spec.layers) for t in resolved.loss_terms]
        assert any(w is not None for w in where), (method, [t.taps for t in resolved.loss_terms])


def test_teacher_taps_are_dropped_after_their_last_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    import gkd.runtime.step as step_module

    seen: list[tuple[int, list[str]]] = []
    student_seen: list[tuple[list[str], list[str]]] = []
    original = step_module._Layerwise.after_layer

    def spy(self: Any, layer: int, student_taps: dict[str, torch.Tensor]) -> None:
        before = sorted(student_taps)
        original(self, layer, student_taps)
        seen.append((layer, sorted(self.runner.teacher_taps[0])))
        student_seen.append((before, sorted(student_taps)))

    monkeypatch.setattr(step_module._Layerwise, "after_layer", spy)
    _run("minilmv2", "layerwise")
    # minilmv2 reads the teacher's last-layer q, k, v: gone once the student's last layer has run; before
    # that they are held.
    last = max(layer for layer, _ in seen)
    assert all(any(k.startswith("q[") for k in held) for layer, held in seen if layer < last)
    assert not any(k.startswith(("q[", "k[", "v[")) for k in dict(seen)[last])
    # The student's q, k, v are read by minilmv2 alone: dropped once it has run.
    before, after = student_seen[-1]
    assert sorted(k.partition("[")[0] for k in before) == ["k", "q", "v"] and after == []


def test_a_recomputed_layer_does_not_replay_the_term(monkeypatch: pytest.MonkeyPatch) -> None:
    import gkd.runtime.step as step_module

    calls: list[str] = []
    original = step_module.StepRunner.term

    def counting(self: Any, term: Any, student_taps: Any) -> Any:
        calls.append(term.name)
        return original(self, term, student_taps)

    monkeypatch.setattr(step_module.StepRunner, "term", counting)
    end, end_grads = _run("minilmv2", "end", recompute=(0, 1))
    calls.clear()
    lw, lw_grads = _run("minilmv2", "layerwise", recompute=(0, 1))
    assert len(calls) == len(lw.terms)  # once each, during the forward; the backward's recompute adds none
    torch.testing.assert_close(lw.total, end.total, rtol=1e-10, atol=1e-12)
    for key, g in end_grads.items():
        torch.testing.assert_close(lw_grads[key], g, rtol=1e-9, atol=1e-12, msg=key)


def test_hook_ops_refuse_layerwise() -> None:
    t_specs, s_spec = truncated_teacher_specs("llama", 2)
    resolved = resolve(["theseus"], t_specs, s_spec, fused_linear=False)
    student = build_model(s_spec, device="cpu")
    teacher = build_model(t_specs[0], device="cpu")
    ids, mask, labels = make_batch(s_spec, 2, 6, torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="theseus_replace"):
        distill_step(
            student,
            [teacher],
            DistillLoss(resolved, t_specs, s_spec),
            {"input_ids": ids, "attention_mask": mask, "labels": labels},
            resolved,
            tap_loss="layerwise",
        )
