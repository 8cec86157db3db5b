"""`gkd run` end to end: real 2-process gloo runs on the CPU with DeepSpeed.

Each run is checked against the single-process truth: its first logged loss must equal `distill_step` computed
in this process on the same micro-batches with the same seeded weights (every rank's micro-batches of the
first step, averaged as the run averages them). Bad inputs must exit with 2, one line, and leave no OUT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from gkd.cli import main
from gkd.config import Config
from gkd.errors import InputError
from gkd.planner.pipeline import plan as make_plan
from gkd.planner.plan import Plan
from gkd.runtime.data import batches, load_tokenizer
from gkd.runtime.engines import available_host_memory, build_models
from gkd.runtime.executor import run_job
from gkd.runtime.step import distill_step, packed_inputs

pytestmark = pytest.mark.slow

STEPS = 8
SEED = 3
# The planner's learning rate (1e-4) moves a random student too little in 8 steps to see the loss fall; a plan
# is plain data, so the test raises it in the plan it runs.
LR = 3e-3


def _plan_file(path: Path, config: dict[str, Any]) -> tuple[Plan, Path]:
    # The learning rate is a config setting (a plan's DeepSpeed section must be what gkd generates).
    plan = make_plan(Config.from_dict({**config, "training": {**config["training"], "lr": LR}}))
    assert plan.fits
    data = plan.to_dict()
    path.write_text(json.dumps(data))
    return Plan.from_dict(data), path


def _rank_stream(plan: Plan, models: Any, source: str, *, rank: int, world: int) -> Any:
    """Rank `rank`'s micro-batches of `source`, as the run's workers read them."""
    config = plan.inputs["config"]
    return batches(
        source,
        load_tokenizer(config["teachers"][0], models.teacher_specs[0]),
        seq_len=config["training"]["seq_len"],
        micro_batch=plan.strategy.micro_batch,
        objective="mlm" if models.student_spec.is_encoder else "causal",
        rank=rank,
        world=world,
        seed=SEED,
    )


def _reference_first_step(plan: Plan, corpus: str, *, world: int) -> tuple[float, set[str]]:
    """The first step's loss (and its term names) computed in one process, without DeepSpeed, without
    recompute and with every tap loss at the end."""
    plain = dataclasses.replace(plan, strategy=dataclasses.replace(plan.strategy, recompute_layers=()))
    models = build_models(plain, seed=SEED, total_steps=STEPS)
    models.student.train()
    resolved = models.resolver.at(0)
    offline = plan.strategy.teacher_placement == "offline"
    config = plan.inputs["config"]
    losses, terms = [], set()
    for rank in range(world):
        stream = _rank_stream(plan, models, corpus, rank=rank, world=world)
        for _ in range(plan.strategy.grad_accum):
            batch = next(stream)
            out = distill_step(
                models.student,
                models.teachers,
                models.loss,
                batch,
                resolved,
                step=0,
                total_steps=STEPS,
                stored_teacher_taps=_stored(models, resolved, batch, config) if offline else None,
            )
            losses.append(float(out.total.detach().float()))
            terms |= set(out.terms)
    return sum(losses) / len(losses), terms


def _stored(
    models: Any, resolved: Any, batch: dict[str, Any], config: dict[str, Any]
) -> list[dict[str, Any]]:
    """What the offline pass stores for this micro-batch: the teacher's top-k log-probs at the terms'
    temperature, in bfloat16 (written in-process here, from the same seeded teacher)."""
    from gkd.methods.divergence import TopK, topk_targets
    from gkd.runtime.capture import capture_taps
    from gkd.runtime.offline import stored_taps

    served = stored_taps(resolved)[0]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"].long(),
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    with torch.no_grad(), capture_taps(models.teachers[0], {"logits"}) as taps:
        models.teachers[0](**packed_inputs(models.teachers[0], inputs))
    target = topk_targets(taps["logits"], config["training"]["offline_topk"], temperature=served.temperature)
    target = TopK(target.indices, target.logprobs.to(torch.bfloat16))
    return [dict.fromkeys(served.names, target)]


def _own_loss(out: Path, plan: Plan, source: str, *, batches_per_rank: int, world: int = 2) -> float:
    """The saved student's own loss on each rank's first micro-batches of `source`, averaged."""
    from transformers import AutoModelForCausalLM

    models = build_models(plan, seed=SEED, total_steps=STEPS)
    student = AutoModelForCausalLM.from_pretrained(str(out / "student")).eval()
    losses = []
    for rank in range(world):
        stream = _rank_stream(plan, models, source, rank=rank, world=world)
        for _ in range(batches_per_rank):
            b = next(stream)
            # As the run's evaluation feeds it: packed documents kept apart by their position ids.
            inputs = {
                "input_ids": b["input_ids"],
                "attention_mask": b["attention_mask"].long(),
                "position_ids": b["position_ids"],
                "labels": b["labels"],
            }
            with torch.no_grad():
                out_ = student(**packed_inputs(student, inputs))
            losses.append(float(out_.loss.float()))
    return sum(losses) / len(losses)


def _check_run(out: Path, plan: Plan, corpus: str, auto: Any) -> None:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    reference, terms = _reference_first_step(plan, corpus, world=2)
    assert set(rows[0]["terms"]) == terms and terms
    assert all(r["tokens"] == 8 * 32 and r["peak_memory_bytes"] > 0 for r in rows)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.9 * first, [r["loss"] for r in rows]
    assert first == pytest.approx(reference, rel=1e-5)
    # The saved student loads with transformers and is not the initial one.
    saved = auto.from_pretrained(str(out / "student"))
    initial = build_models(plan, seed=SEED, total_steps=STEPS).student.state_dict()
    loaded = saved.state_dict()
    assert set(loaded) == set(initial)
    changed = [k for k in initial if not torch.equal(loaded[k].to(initial[k].dtype), initial[k])]
    assert len(changed) > len(initial) // 2, changed
    assert Plan.from_json((out / "plan.json").read_text()).strategy == plan.strategy
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == STEPS and run["tap_loss_executed"] == plan.strategy.tap_loss


def _train(path: Path, models_dir: Path, tmp_path: Path, **options: Any) -> tuple[Path, str]:
    """Run the plan file at `path` for STEPS steps on the tiny corpus in 2 processes; (OUT, corpus)."""
    corpus = str(models_dir / "corpus.txt")
    out = run_job(
        str(path),
        data=corpus,
        steps=STEPS,
        out=str(tmp_path / "out"),
        processes=2,
        seed=SEED,
        echo=lambda _: None,
        **options,
    )
    return out, corpus


def test_zero2_student_replicated_teacher(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    from transformers import AutoModelForCausalLM

    overrides = {"student_zero_stage": 2, "teacher_placement": "replicated", "tap_loss": "end"}
    config = job_config(models_dir, "llama", overrides)
    plan, path = _plan_file(tmp_path / "plan.json", config)
    held_out = models_dir / "corpus.txt"
    out, corpus = _train(
        path, models_dir, tmp_path, save_every=4, eval_data=str(held_out), eval_every=4, eval_batches=2
    )
    _check_run(out, plan, corpus, AutoModelForCausalLM)
    # Evaluation at steps 4 and 8: the last equals the saved student's own loss on the same micro-batches.
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    assert rows[-1]["eval_loss"] == pytest.approx(
        _own_loss(out, plan, str(held_out), batches_per_rank=2), rel=1e-5
    )

    # Resume: pretend the run stopped after its checkpoint at step 4 (what `latest` says after such a stop).
    # The resumed steps must repeat the original ones exactly: same weights, optimizer state and data.
    assert {"latest", "step-4", "step-8"} <= {p.name for p in (out / "checkpoints").iterdir()}
    original = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = AutoModelForCausalLM.from_pretrained(str(out / "student")).state_dict()
    (out / "checkpoints" / "latest").write_text("step-4")
    shutil.rmtree(out / "student")
    run_job(None, out=str(out), processes=2, resume=True, echo=lambda _: None)
    resumed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed[:4] == original[:4]
    for a, b in zip(original[4:], resumed[4:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["terms"] == pytest.approx(
            a["terms"], rel=1e-6
        )
        assert b.get("eval_loss") == pytest.approx(a.get("eval_loss"), rel=1e-6)
    again = AutoModelForCausalLM.from_pretrained(str(out / "student")).state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)

    # A resume replays the data stream: data edited since the start is refused, not silently trained on.
    assert json.loads((out / "run.json").read_text())["data"] == str(Path(corpus).resolve())
    stat = os.stat(corpus)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # what an edit changes
    try:
        with pytest.raises(InputError, match="changed since the run started"):
            run_job(None, out=str(out), steps=STEPS + 2, processes=2, resume=True, echo=lambda _: None)
    finally:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(InputError, match="keeps its own evaluation settings"):
        run_job(None, out=str(out), resume=True, eval_data=corpus, echo=lambda _: None)
    (out / "run.json").write_text("{")
    with pytest.raises(InputError, match="run.json is damaged"):
        run_job(None, out=str(out), steps=STEPS + 2, processes=2, resume=True, echo=lambda _: None)


def test_zero3_student_offloaded_teacher_and_recompute(
    models_dir: Path, tmp_path: Path, job_config: Any
) -> None:
    """The shape of the 70B -> 7B reference plan, tiny: ZeRO-3 on both sides (persistence threshold 0, so even
    these tiny tensors are partitioned), both student layers recomputed, tap losses computed layer by layer
    and the fused-linear logit loss (jsd) on the partitioned LM heads. The first loss still equals the plain
    single-process step with tap losses at the end."""
    from transformers import AutoModelForCausalLM

    overrides = {
        "student_zero_stage": 3,
        "teacher_placement": "zero3_offload",
        "recompute_layers": [0, 1],
        "tap_loss": "layerwise",
        "loss_path": "fused_linear",
    }
    config = job_config(models_dir, "llama", overrides, stage3_param_persistence_threshold=0)
    # hidden_mse trains a projection (32 -> 64): a loss extra, partitioned like the student's weights.
    config["methods"] = [
        {"name": "jsd"},
        {"name": "minilmv2", "options": {"relation_heads": 8}},
        {"name": "hidden_mse"},
    ]
    plan, path = _plan_file(tmp_path / "plan.json", config)
    assert plan.strategy.recompute_layers == (0, 1) and plan.strategy.loss_path == "fused_linear"
    assert plan.deepspeed["student"]["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    out, corpus = _train(path, models_dir, tmp_path)
    _check_run(out, plan, corpus, AutoModelForCausalLM)


def test_offline_teacher(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    """The qwen-72b -> qwen-7b reference plan's shape, tiny: the teacher runs once before training and stores
    its top-k log-probs; the student trains on them (kd's soft loss with the tail bucket). The first loss
    equals the single-process step on the same stored top-k, and the stored files are gone after the run."""
    from transformers import AutoModelForCausalLM

    config = job_config(models_dir, "llama", {"student_zero_stage": 2, "teacher_placement": "offline"})
    config["methods"] = [{"name": "kd"}]
    config["training"]["offline_topk"] = 16
    plan, path = _plan_file(tmp_path / "plan.json", config)
    assert plan.strategy.teacher_placement == "offline" and plan.strategy.loss_path == "topk"
    out, corpus = _train(path, models_dir, tmp_path, save_every=2, keep_last=2)
    _check_run(out, plan, corpus, AutoModelForCausalLM)
    assert not (out / "topk").exists()
    # --keep-last 2: of the checkpoints at steps 2, 4, 6 and 8, the two newest remain.
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step-6", "step-8"] and (out / "checkpoints" / "latest").read_text() == "step-8"


def test_bert_mlm(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    from transformers import AutoModelForMaskedLM

    overrides = {"student_zero_stage": 1, "teacher_placement": "replicated", "tap_loss": "layerwise"}
    config = job_config(models_dir, "bert", overrides)
    # hidden_mse's projection (32 -> 64) is a loss extra whose gradient the layerwise term hands over early.
    config["methods"].append({"name": "hidden_mse"})
    plan, path = _plan_file(tmp_path / "plan.json", config)
    out, corpus = _train(path, models_dir, tmp_path)
    _check_run(out, plan, corpus, AutoModelForMaskedLM)


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no OUT


def _one_line_exit(args: list[str], code: int, expected: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd: error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output


def test_plan_for_other_gpu_count(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    config = job_config(models_dir, "llama", {})
    config["hardware"]["gpus"] = 8
    config["training"]["global_batch"] = 16
    _, path = _plan_file(tmp_path / "plan8.json", config)
    out = tmp_path / "out"
    _one_line_exit(["run", str(path), "--out", str(out), "--processes", "2"], 2, "--gpus 2")
    assert not out.exists()


def test_unknown_data_file(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    _, path = _plan_file(tmp_path / "plan.json", job_config(models_dir, "llama", {}))
    out = tmp_path / "out"
    _one_line_exit(["run", str(path), "--data", str(tmp_path / "nope.txt"), "--out", str(out)], 2, "nope.txt")
    assert not out.exists()


def test_tensor_parallel_teacher(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    """The teacher split 2 ways by DeepSpeed's automatic tensor parallelism, its group running both ranks'
    micro-batches; minilmv2 reads its q, k, v, which each rank holds for half the heads and gathers."""
    from transformers import AutoModelForCausalLM

    overrides = {"student_zero_stage": 2, "teacher_placement": "tensor_parallel", "tensor_parallel": 2}
    plan, path = _plan_file(tmp_path / "plan.json", job_config(models_dir, "llama", overrides))
    assert plan.strategy.teacher_placement == "tensor_parallel" and plan.strategy.tensor_parallel == 2
    out, corpus = _train(path, models_dir, tmp_path)
    _check_run(out, plan, corpus, AutoModelForCausalLM)


def test_keep_last_needs_save_every(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    _, path = _plan_file(tmp_path / "plan.json", job_config(models_dir, "llama", {}))
    out = tmp_path / "out"
    _one_line_exit(["run", str(path), "--out", str(out), "--keep-last", "2"], 2, "give --save-every too")
    assert not out.exists()


def test_bad_eval_options(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    _, path = _plan_file(tmp_path / "plan.json", job_config(models_dir, "llama", {}))
    out = tmp_path / "out"
    _one_line_exit(["run", str(path), "--out", str(out), "--eval-every", "2"], 2, "give --eval-data PATH")
    args = ["run", str(path), "--out", str(out), "--eval-data", str(tmp_path / "held.txt")]
    _one_line_exit(args, 2, "held.txt does not exist")
    assert not out.exists()


def test_does_not_fit_exits_1(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    config = job_config(models_dir, "llama", {})
    config["hardware"]["gpu_memory"] = "1MiB"
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "out"
    _one_line_exit(["run", str(cfg), "--out", str(out), "--processes", "2"], 1, "does not fit")
    assert not out.exists()


def test_resume_needs_a_checkpoint(models_dir: Path, tmp_path: Path, job_config: Any) -> None:
    _, path = _plan_file(tmp_path / "plan.json", job_config(models_dir, "llama", {}))
    _one_line_exit(["run", str(path), "--resume", "--out", str(tmp_path / "out")], 2, "drop")
    _one_line_exit(["run", "--resume", "--out", str(tmp_path / "out")], 2, "no checkpoint")
    _one_line_exit(["run", "--resume"], 2, "--out")


def _gkd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`gkd ...` as a user runs it: a fresh process through the console entry point."""
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd)


def test_tiny_config_trains_from_the_command_line(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    proc = _gkd("run", str(root / "configs" / "tiny.yaml"), "--steps", "2", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done: 2 steps" in proc.stdout
    # The start is not silent: each phase of rank 0 has its line, before the first step's.
    lines = ["Starting 2 worker", "] loading the models", "] setting up the Deep", "] training", "step 1/"]
    at = [proc.stdout.find(line) for line in lines]
    assert -1 not in at and at == sorted(at), proc.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (out / "student" / "config.json").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert json.loads((out / "run.json").read_text())["tap_loss_executed"] == plan["strategy"]["tap_loss"]


@pytest.mark.skipif(
    torch.cuda.is_available() or not 0 < (available_host_memory() or 0) < 500 << 30,
    reason="needs a CPU machine with less memory than the headline job's weights (518 GiB on 2 workers)",
)
def test_default_run_on_the_cpu_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    """The headline job (GLM-130B) cannot be built in a CPU machine's memory: one line, exit 2, no OUT."""
    proc = _gkd("run", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "memory available" in proc.stderr
    assert not (tmp_path / "run").exists() and not any(tmp_path.iterdir())
