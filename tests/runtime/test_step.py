"""distill_step: the order in which hook ops are called, equality with a hand-written step for a method
without hook ops, and its input checks."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import gkd.runtime.step as step_module
from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.methods.hooks import HookOpBase
from gkd.models import build_model, resolve_model
from gkd.runtime.capture import capture_taps
from gkd.runtime.step import distill_step


@pytest.fixture(scope="module")
def setup():
    t_specs, s_spec = [resolve_model("tiny-llama-teacher")], resolve_model("tiny-llama-student")
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu").eval()
    teacher = build_model(t_specs[0], device="cpu").eval()
    ids = torch.randint(0, s_spec.vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    labels = ids.masked_fill(~mask, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return t_specs, s_spec, student, teacher, batch


def test_matches_a_hand_written_step(setup):
    t_specs, s_spec, student, teacher, batch = setup
    resolved = resolve(["kd", "hidden_mse"], t_specs, s_spec, fused_linear=False)
    loss = DistillLoss(resolved, t_specs, s_spec)
    out = distill_step(student, [teacher], loss, batch, resolved)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long()}
    with torch.no_grad(), capture_taps(teacher, resolved.teacher_taps[0]) as t_taps:
        teacher(**inputs)
    with capture_taps(student, resolved.student_taps) as s_taps:
        student(**inputs)
    ref = loss(s_taps, [t_taps], labels=batch["labels"], mask=batch["attention_mask"])
    assert set(out.terms) == set(ref.terms) == {"kd.soft", "kd.hard", "hidden_mse.loss"}
    for key in ref.terms:
        torch.testing.assert_close(out.terms[key], ref.terms[key], rtol=0, atol=0)


class Recorder(HookOpBase):
    """Records when the step calls it, relative to the forwards."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.name = "recorder"
        self.log = log

    def install(self, student, teachers, *, step, total_steps):
        @contextmanager
        def active():
            handles = [
                m.register_forward_hook(lambda *_, w=w: self.log.append(w))
                for m, w in ((teachers[0], "teacher"), (student, "student"))
            ]
            self.log.append("install")
            yield
            self.log.append("uninstall")
            for h in handles:
                h.remove()

        return active()

    def before_forward(self, runner):
        self.log.append("before")
        assert set(runner.teacher_taps[0]) == set(runner.resolved.teacher_taps[0])

    def extra_forward(self, runner):
        self.log.append("extra")
        return {"logits": runner.run_student({"logits"})["logits"]}


def test_hook_op_call_order_and_aux(setup, monkeypatch):
    t_specs, s_spec, student, teacher, batch = setup
    log: list[str] = []
    monkeypatch.setattr(step_module, "build_hook_ops", lambda resolved: [Recorder(log)])
    seen = {}

    def spy(self, *args, **kwargs):
        seen.update(kwargs.get("aux") or {})
        return original(self, *args, **kwargs)

    original = DistillLoss.forward
    monkeypatch.setattr(DistillLoss, "forward", spy)
    resolved = resolve(["kd"], t_specs, s_spec, fused_linear=False)
    distill_step(student, [teacher], DistillLoss(resolved, t_specs, s_spec), batch, resolved)
    assert log == ["install", "teacher", "before", "student", "extra", "student", "uninstall"]
    assert set(seen) == {"recorder"} and seen["recorder"]["logits"].shape == (2, 6, s_spec.vocab)


def test_input_checks(setup):
    t_specs, s_spec, student, teacher, batch = setup
    resolved = resolve(["kd"], t_specs, s_spec)
    loss = DistillLoss(resolved, t_specs, s_spec)
    with pytest.raises(InputError, match="input_ids"):
        distill_step(student, [teacher], loss, {"labels": batch["labels"]}, resolved)
    with pytest.raises(InputError, match="1 teachers but 2"):
        distill_step(student, [teacher, teacher], loss, batch, resolved)
    topk = resolve(["topk_kl"], t_specs, s_spec)
    with pytest.raises(InputError, match="offline teacher pass"):
        distill_step(student, [teacher], DistillLoss(topk, t_specs, s_spec), batch, topk)


def test_fused_linear_forwards_make_no_full_logits(setup):
    """The fused-linear loss reads `final` and the head weight: neither forward may materialise the (tokens x
    vocabulary) logits the plan does not count; on the plain logits path both are made as usual."""
    t_specs, s_spec, student, teacher, batch = setup
    for fused, positions in ((True, 1), (False, 6)):
        resolved = resolve(["fkl"], t_specs, s_spec, fused_linear=fused)
        assert resolved.fused_linear == fused
        shapes: dict[str, tuple[int, ...]] = {}
        handles = [
            m.get_output_embeddings().register_forward_hook(
                lambda _m, _a, out, who=who, shapes=shapes: shapes.__setitem__(who, tuple(out.shape))
            )
            for m, who in ((student, "student"), (teacher, "teacher"))
        ]
        try:
            out = distill_step(student, [teacher], DistillLoss(resolved, t_specs, s_spec), batch, resolved)
        finally:
            for h in handles:
                h.remove()
        assert torch.isfinite(out.total)
        assert shapes == {"student": (2, positions, s_spec.vocab), "teacher": (2, positions, s_spec.vocab)}
