"""gkd.runtime.engines in one process: per-layer recompute, the checks for what `gkd run` does not execute
yet, seeded model building and per-step method resolution."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import torch

from gkd.config import Config
from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.models import build_model, resolve_model
from gkd.planner.pipeline import plan as make_plan
from gkd.planner.plan import Plan
from gkd.runtime.capture import transformer_layers
from gkd.runtime.engines import (
    Resolver,
    _with_extras_of,
    apply_recompute,
    build_models,
    check_host_memory,
    check_supported,
    distill_module,
    host_memory_needed,
    recomputed_layers,
)
from gkd.runtime.step import distill_step


@pytest.fixture(scope="module")
def tiny_plan() -> Plan:
    config = {
        "teacher": "tiny-llama-teacher",
        "student": "tiny-llama-student",
        "methods": [{"name": "kd"}, {"name": "hidden_mse"}],
        "hardware": {"gpus": 2, "gpu_memory": "8GiB", "cuda_context": "64MiB"},
        "training": {"seq_len": 16, "global_batch": 4, "micro_batch": [2], "steps": 4},
        "overrides": {"student_zero_stage": 2, "teacher_placement": "replicated"},
    }
    return make_plan(Config.from_dict(config))


def _with(plan: Plan, **strategy: Any) -> Plan:
    return dataclasses.replace(plan, strategy=dataclasses.replace(plan.strategy, **strategy))


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~mask, -100)}


def _loss_and_grads(recompute: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    t_specs, s_spec = [resolve_model("tiny-llama-teacher")], resolve_model("tiny-llama-student")
    torch.manual_seed(0)
    student = build_model(s_spec, device="cpu", dtype=torch.float32).train()
    teacher = build_model(t_specs[0], device="cpu", dtype=torch.float32).eval()
    apply_recompute(student, recompute)
    calls = [0] * len(transformer_layers(student))
    for i, layer in enumerate(transformer_layers(student)):
        # A pre-hook on the inner MLP fires once per forward of its layer, recomputed ones included (a
        # recompute stops once it has rebuilt the last saved tensor, so a hook after the MLP might not fire).
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    resolved = resolve(
        ["kd", {"name": "minilmv2", "options": {"relation_heads": 8}}], t_specs, s_spec, fused_linear=False
    )
    out = distill_step(
        student, [teacher], DistillLoss(resolved, t_specs, s_spec), _batch(s_spec.vocab), resolved
    )
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out.total.detach(), grads, calls


def test_recompute_only_the_listed_layers_same_loss_and_gradients() -> None:
    loss, grads, calls = _loss_and_grads(())
    loss_rc, grads_rc, calls_rc = _loss_and_grads((1,))
    assert calls == [1, 1]
    assert calls_rc == [1, 2]  # layer 1 ran again in the backward, layer 0 did not
    torch.testing.assert_close(loss_rc, loss, rtol=0, atol=0)
    assert set(grads_rc) == set(grads)
    for name in grads:
        torch.testing.assert_close(grads_rc[name], grads[name], rtol=1e-6, atol=1e-7)


def test_recompute_marks_and_rejects() -> None:
    student = build_model(resolve_model("tiny-llama-student"), device="cpu")
    apply_recompute(student, (0,))
    apply_recompute(student, (0,))  # idempotent: one checkpoint, not a checkpoint inside a checkpoint
    assert recomputed_layers(student) == [0]
    with pytest.raises(InputError, match="layer 5 but the student has 2 layers"):
        apply_recompute(student, (5,))


def test_float16_needs_cuda(tiny_plan: Plan) -> None:
    inputs = {**tiny_plan.inputs, "config": {**tiny_plan.inputs["config"]}}
    inputs["config"]["training"] = {**inputs["config"]["training"], "dtype": "float16"}
    fp16 = dataclasses.replace(tiny_plan, inputs=inputs)
    with pytest.raises(InputError, match="bfloat16"):
        check_supported(fp16, cuda=False)
    check_supported(fp16, cuda=True)


def test_build_models_is_seeded_and_in_the_training_dtype(tiny_plan: Plan) -> None:
    a = build_models(tiny_plan, seed=7, total_steps=4)
    b = build_models(tiny_plan, seed=7, total_steps=4)
    c = build_models(tiny_plan, seed=8, total_steps=4)
    for x, y in zip(a.student.parameters(), b.student.parameters(), strict=True):
        assert x.dtype == torch.bfloat16
        assert torch.equal(x, y)
    assert not all(
        torch.equal(x, z) for x, z in zip(a.student.parameters(), c.student.parameters(), strict=True)
    )
    assert all(not p.requires_grad for t in a.teachers for p in t.parameters())
    assert [p.dtype for p in a.loss.parameters()] == [torch.bfloat16] * len(list(a.loss.parameters()))
    assert len(list(a.loss.parameters())) > 0  # hidden_mse projects 32 -> 64


def test_distill_module_is_the_step(tiny_plan: Plan) -> None:
    models = build_models(tiny_plan, seed=0, total_steps=4)
    module = distill_module(models.student, models.loss)
    assert {n.split(".")[0] for n, _ in module.named_parameters()} == {"student", "loss"}  # no teacher
    module.teachers, module.resolved = models.teachers, models.resolver.at(0)
    batch = _batch(models.student_spec.vocab)
    total, terms = module(batch)
    ref = distill_step(models.student, models.teachers, models.loss, batch, models.resolver.at(0))
    torch.testing.assert_close(total, ref.total, rtol=0, atol=0)
    assert set(terms) == set(ref.terms) == {"kd.soft", "kd.hard", "hidden_mse.loss"}


def test_resolver_re_resolves_only_staged_methods() -> None:
    t_specs, s_spec = [resolve_model("tiny-llama-teacher")], resolve_model("tiny-llama-student")
    static = Resolver(
        entries=({"name": "kd"},),
        teacher_specs=t_specs,
        student_spec=s_spec,
        total_steps=10,
        fused_linear=False,
    )
    assert static.at(9) is static.at(0)
    staged = Resolver(
        entries=({"name": "annealing_kd"},),
        teacher_specs=t_specs,
        student_spec=s_spec,
        total_steps=9,
        fused_linear=False,
    )
    assert [t.name for t in staged.at(0).loss_terms] == ["anneal"]
    assert [t.name for t in staged.at(8).loss_terms] == ["hard"]
    assert staged.at(8).teacher_taps == (frozenset(),)  # the finetune stage runs no teacher


def test_extras_that_appear_later_are_rejected() -> None:
    t_specs, s_spec = [resolve_model("tiny-llama-teacher")], resolve_model("tiny-llama-student")
    without = resolve(["kd"], t_specs, s_spec)
    with_proj = resolve(["kd", "hidden_mse"], t_specs, s_spec)
    assert _with_extras_of(without, with_proj).extras == with_proj.extras
    with pytest.raises(InputError, match="later stage"):
        _with_extras_of(with_proj, without)


def test_checkpoint_folders_are_loaded_not_initialised(tiny_plan: Plan, tmp_path: Any) -> None:
    torch.manual_seed(123)
    saved = build_model(resolve_model("tiny-llama-teacher"), device="cpu", dtype=torch.float32)
    saved.save_pretrained(str(tmp_path / "teacher"))
    config = {**tiny_plan.inputs["config"], "teachers": [str(tmp_path / "teacher")]}
    plan = dataclasses.replace(tiny_plan, inputs={**tiny_plan.inputs, "config": config})
    models = build_models(plan, seed=0, total_steps=4)
    assert models.pretrained_teachers == (True,)
    expected = {k: v.to(torch.bfloat16) for k, v in saved.state_dict().items()}
    loaded = models.teachers[0].state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_a_run_refuses_a_plan_whose_host_memory_this_machine_lacks(tiny_plan):
    """The plan's host memory (load, steady state and save) is checked on GPUs too; on the CPU each worker's
    device peak is host memory as well."""
    plan = make_plan(Config())  # the headline job: GLM-130B -> GLM-10B
    assert host_memory_needed(plan, world=2, cuda=True) == (plan.host_bytes, ANY)
    assert host_memory_needed(plan, world=2, cuda=False)[0] == plan.host_bytes + 2 * plan.peak_bytes
    for cuda in (True, False):
        with pytest.raises(InputError, match=r"glm-130b \(128.69B\), glm-10b-icetk .* 22.00 GiB") as e:
            check_host_memory(plan, world=2, available=22 << 30, cuda=cuda)
        assert "\n" not in str(e.value)
    check_host_memory(plan, world=2, available=plan.host_bytes, cuda=True)  # exactly enough
    check_host_memory(tiny_plan, world=2, available=22 << 30, cuda=False)  # tiny models fit
    check_host_memory(plan, world=2, available=None, cuda=False)  # unknown: no check


def test_an_offline_pass_that_cannot_fit_on_disk_is_refused(tiny_plan: Plan, tmp_path: Path) -> None:
    from gkd.runtime.checks import check_offline_disk

    offline = _with(tiny_plan, teacher_placement="offline")
    check_offline_disk(offline, tmp_path / "out", steps=4, world=2)  # a few KiB
    check_offline_disk(tiny_plan, tmp_path / "out", steps=10**15, world=2)  # a live teacher stores nothing
    with pytest.raises(InputError, match="offline_topk or --steps"):
        check_offline_disk(offline, tmp_path / "a" / "b" / "out", steps=10**15, world=2)


def test_a_config_is_planned_among_the_placements_the_runtime_runs(
    monkeypatch: pytest.MonkeyPatch, tiny_plan: Plan, tmp_path: Path
) -> None:
    """`gkd run CONFIG` leaves tensor-parallel teachers out of the search when it cannot run them (GPT-2:
    AutoTP cannot split it), unless the config pins them, which is then refused with the fix."""
    import json

    import gkd.planner.pipeline as pipeline
    from gkd.runtime.checks import load_or_plan

    seen = []
    monkeypatch.setattr(pipeline, "plan", lambda config: seen.append(config) or tiny_plan)
    path = tmp_path / "job.json"
    lines: list[str] = []

    def planned(teacher: str, overrides: dict[str, Any]) -> Any:
        config = {**tiny_plan.inputs["config"], "teachers": [teacher], "overrides": overrides}
        path.write_text(json.dumps(config))
        load_or_plan(str(path), processes=2, echo=lines.append)
        return seen[-1].overrides

    assert planned("tiny-llama-teacher", {}).tensor_parallel is None
    assert "left out" not in lines[-1]
    assert planned("tiny-gpt2-teacher", {}).tensor_parallel == 1
    assert "tensor-parallel teachers left out: tiny-gpt2-teacher: DeepSpeed" in lines[-1]
    pinned = planned("tiny-gpt2-teacher", {"teacher_placement": "tensor_parallel"})
    assert pinned.tensor_parallel is None and pinned.teacher_placement == "tensor_parallel"


def test_a_tensor_parallel_teacher_that_cannot_be_split_is_refused(tiny_plan: Plan) -> None:
    check_supported(_with(tiny_plan, teacher_placement="tensor_parallel", tensor_parallel=2), cuda=False)
    config = {**tiny_plan.inputs["config"], "teachers": ["tiny-gpt2-teacher"]}
    gpt2 = dataclasses.replace(tiny_plan, inputs={**tiny_plan.inputs, "config": config})
    with pytest.raises(InputError, match="cannot run tensor-parallel: DeepSpeed's automatic"):
        check_supported(_with(gpt2, teacher_placement="tensor_parallel", tensor_parallel=2), cuda=False)
    diito = {**tiny_plan.inputs["config"], "methods": [{"name": "diito"}]}
    plan = dataclasses.replace(tiny_plan, inputs={**tiny_plan.inputs, "config": diito})
    with pytest.raises(InputError, match="diito records"):
        check_supported(_with(plan, teacher_placement="tensor_parallel", tensor_parallel=2), cuda=False)


@pytest.mark.parametrize(
    "path",
    [None, *sorted(str(p) for p in (Path(__file__).parents[2] / "configs" / "reference").glob("*.yaml"))],
)
def test_every_reference_plan_is_one_the_runtime_executes(path: str | None) -> None:
    """The planner's choice for the headline job and every reference config (layerwise tap losses, the
    fused-linear loss under ZeRO-3, an offline teacher) is executed as planned, not refused."""
    from gkd.config import default_config, load_config
    from gkd.planner.pipeline import plan as make_plan

    plan = make_plan(default_config() if path is None else load_config(path))
    assert plan.fits
    check_supported(plan, cuda=True)


def test_models_are_cast_as_from_pretrained_casts_them(tiny_plan: Plan, tmp_path: Path) -> None:
    """Parameters in the training dtype, RoPE's inverse frequencies (non-persistent buffers) kept in float32:
    the run's student computes what its saved copy computes once loaded."""
    from transformers import AutoModelForCausalLM

    models = build_models(tiny_plan, seed=7, total_steps=4)
    student = models.student.eval()
    buffers = dict(student.named_buffers())
    assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    student.save_pretrained(str(tmp_path / "s"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s")).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
        torch.testing.assert_close(student(input_ids=ids).logits, expected, rtol=0, atol=0)
