"""theseus (Xu et al., EMNLP 2020): the keep-probability curriculum stepped through, seeded draws, the hybrid
model against an independently assembled one (float64), and forward + backward through the teacher blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from method_checks import assert_rel, check_backward, make_batch, truncated_teacher_specs

from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.methods.theseus import TheseusReplace, teacher_blocks
from gkd.models import build_model
from gkd.runtime.step import distill_step


def test_keep_probability_rises_linearly_to_one_at_66_percent():
    op = TheseusReplace()
    total = 100
    for step in (0, 10, 33, 50, 65, 66, 80, 100):
        expected = min(1.0, 0.3 + 0.7 * step / (0.66 * total))  # the paper's curriculum
        assert op.keep_probability(step, total) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert op.keep_probability(66, 100) == 1.0


def test_draws_are_seeded_and_bernoulli():
    op, other = TheseusReplace(seed=1), TheseusReplace(seed=2)
    assert op.draw(6, 7, 100) == TheseusReplace(seed=1).draw(6, 7, 100)
    assert any(op.draw(6, s, 100) != other.draw(6, s, 100) for s in range(5))
    # at step 0 each module is replaced with probability 1 - 0.3 = 0.7; after 66% of the steps never
    replaced = sum(len(TheseusReplace(seed=s).draw(4, 0, 100)) for s in range(2000))
    assert abs(replaced / 8000 - 0.7) < 0.03
    assert all(op.draw(4, s, 100) == [] for s in range(66, 100))


def test_teacher_blocks_are_consecutive():
    assert teacher_blocks(2, 4) == [range(0, 2), range(2, 4)]
    assert teacher_blocks(3, 4) == [range(0, 1), range(1, 2), range(2, 4)]
    with pytest.raises(InputError):
        teacher_blocks(4, 2)


def _run(replaced: list[int], monkeypatch: pytest.MonkeyPatch, family: str = "llama"):
    t_specs, s_spec = truncated_teacher_specs(family)
    monkeypatch.setattr(TheseusReplace, "draw", lambda self, n, step, total: list(replaced))
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu", dtype=torch.float64).train()
    teacher = build_model(t_specs[0], device="cpu", dtype=torch.float64).eval()
    ids, mask, labels = make_batch(s_spec, 2, 6, torch.Generator().manual_seed(0))
    resolved = resolve(["theseus"], t_specs, s_spec, fused_linear=False)
    loss = DistillLoss(resolved, t_specs, s_spec)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = distill_step(student, [teacher], loss, batch, resolved)
    return out, student, teacher, batch


def _causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1], -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    return -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()


@pytest.mark.parametrize("replaced", [[0], [0, 1], []])
def test_hybrid_equals_assembled_model(replaced, monkeypatch):
    """The op's hybrid equals a model assembled by hand: the student with its layer list rebuilt from
    teacher blocks (student layer j <- teacher layers 2j, 2j + 1) and student layers."""
    out, student, teacher, batch = _run(replaced, monkeypatch)
    ref = copy.deepcopy(student).eval()
    layers = []
    for j, layer in enumerate(student.model.layers):
        layers += [teacher.model.layers[2 * j], teacher.model.layers[2 * j + 1]] if j in replaced else [layer]
    ref.model.layers = torch.nn.ModuleList(layers)
    ref.config.num_hidden_layers = len(layers)
    with torch.no_grad():
        logits = ref(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), use_cache=False
        )
    assert_rel(out.terms["theseus.hard"], _causal_nll(logits.logits, batch["labels"]))
    assert set(out.terms) == {"theseus.hard"}


def test_gradients_flow_through_frozen_teacher_block(monkeypatch):
    out, student, teacher, _ = _run([1], monkeypatch)
    flags = [p.requires_grad for p in teacher.parameters()]
    out.total.backward()
    layers = student.model.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[0].parameters())  # through block
    assert all(p.grad is None for p in layers[1].parameters())  # replaced this step
    assert all(p.grad is None for p in teacher.parameters())
    assert [p.requires_grad for p in teacher.parameters()] == flags  # restored after the step
    assert "forward" not in vars(layers[1])  # the swap is undone


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_backward(family):
    out = check_backward(
        [{"name": "theseus", "options": {"keep_rate_start": 0.0}}], specs=truncated_teacher_specs(family)
    )
    assert set(out.terms) == {"theseus.hard"}


def test_no_teacher_forward_and_width_constraint():
    t_specs, s_spec = truncated_teacher_specs("llama")
    r = resolve(["theseus"], t_specs, s_spec)
    assert not r.needs_teacher_forward and r.teacher_taps == (frozenset(),)
    assert r.hook_ops[0].needs_teacher_modules
    from method_checks import model_specs

    t_specs, s_spec = model_specs("llama")
    with pytest.raises(InputError, match="32.*64|64.*32"):
        resolve(["theseus"], t_specs, s_spec)
