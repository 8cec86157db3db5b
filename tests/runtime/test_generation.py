"""On-policy generation (gkd.runtime.generation): the generation config, which micro-batches are sampled, the
prompts found in prompt/completion batches, the student's samples (seeded, cache-consistent) and the batch
built from them (labels and loss mask on the sampled tokens only), and gkd's jsd on such a batch against
TRL's `GKDTrainer.generalized_jsd_loss`."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gkd.config import Config
from gkd.errors import InputError
from gkd.methods import DistillLoss, resolve
from gkd.models import build_model, resolve_model
from gkd.runtime.data import ByteTokenizer, batches
from gkd.runtime.generation import is_sampled, prompts, sample, sampled_batch, seeded
from gkd.runtime.step import distill_step

PAIRS = [{"prompt": f"Q{i}: add {'and ' * (i % 4)}{i}?", "completion": f" A: {2 * i}."} for i in range(40)]


# ---------------------------------------------------------------------------------------------------------
# Config


def test_generation_config_is_validated_and_kept_out_of_configs_that_do_not_generate() -> None:
    assert "generation" not in Config.from_dict({}).to_dict()
    on = Config.from_dict({"generation": {"mode": "on_policy", "lambda": 0.25, "max_new_tokens": 8}})
    assert on.generation.fraction == 0.25
    assert on.to_dict()["generation"] == {
        "mode": "on_policy",
        "lambda": 0.25,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    assert Config.from_dict(on.to_dict()).generation == on.generation
    seq = Config.from_dict({"generation": {"mode": "sequence_kd", "prompt_field": "q", "refresh_every": 0}})
    assert seq.generation.fraction == 0.0  # the teacher's completions only, unless lambda says otherwise
    assert seq.to_dict()["generation"]["prompt_field"] == "q"
    assert Config.from_dict(seq.to_dict()).generation == seq.generation
    bad = [
        ({"mode": "sample"}, "generation.mode 'sample' is not one of off, sequence_kd, on_policy"),
        ({"mode": "on_policy", "refresh_every": 2}, "generation.refresh_every 2 is not built: on_policy"),
        ({"mode": "sequence_kd", "refresh_every": 1}, "generation.refresh_every 1 is not built: sequence_kd"),
        ({"mode": "sequence_kd", "refresh_every": -1}, "generation.refresh_every must be at least 0"),
        ({"mode": "on_policy", "prompt_field": "q"}, "so it needs generation.mode sequence_kd"),
        ({"mode": "sequence_kd", "prompt_field": " "}, "generation.prompt_field must be a record field"),
        ({"lambda": 1.5}, "generation.lambda must be a fraction in 0..1"),
        ({"lambda": -0.1}, "generation.lambda must be >= 0"),
        ({"top_p": 0}, "generation.top_p must be > 0"),
        ({"temperature": "hot"}, "generation.temperature must be a number"),
        ({"max_new_tokens": 0}, "generation.max_new_tokens must be at least 1"),
        ({"refresh": 2}, "generation has no setting 'refresh'"),
        ({"mode": "on_policy", "max_new_tokens": 512}, r"must be below training.seq_len \(512\)"),
    ]
    for section, message in bad:
        with pytest.raises(InputError, match=message):
            Config.from_dict({"generation": section})


def test_which_micro_batches_are_sampled_depends_on_the_seed_and_step_only() -> None:
    picks = [is_sampled(0.5, seed=3, step=s, micro=m) for s in range(50) for m in range(2)]
    assert picks == [is_sampled(0.5, seed=3, step=s, micro=m) for s in range(50) for m in range(2)]
    assert 30 < sum(picks) < 70  # a fair coin over 100 draws
    assert picks != [is_sampled(0.5, seed=4, step=s, micro=m) for s in range(50) for m in range(2)]
    assert not any(is_sampled(0.0, seed=3, step=s, micro=0) for s in range(50))
    assert all(is_sampled(1.0, seed=3, step=s, micro=0) for s in range(50))


# ---------------------------------------------------------------------------------------------------------
# Prompts, samples and the batch built from them


@pytest.fixture(scope="module")
def pair_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    stream = batches(str(path), ByteTokenizer(), seq_len=48, micro_batch=2, objective="causal", seed=0)
    return next(islice(stream, 1, None))


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_model(resolve_model("tiny-llama-student"), device="cpu").eval()
    teacher = build_model(resolve_model("tiny-llama-teacher"), device="cpu").eval()
    return student, teacher


def test_prompts_are_the_records_prompts(pair_batch: dict[str, torch.Tensor]) -> None:
    tok = ByteTokenizer()
    found = [tok.decode(p.tolist()) for p in prompts(pair_batch)]
    print("prompts:", found)
    known = {p["prompt"] for p in PAIRS}
    assert all(text in known for text in found), found
    text = {"input_ids": pair_batch["input_ids"], "labels": pair_batch["input_ids"]}
    with pytest.raises(InputError, match="on_policy needs chat or prompt/completion data"):
        prompts(text)


def _sampled(student: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int, **kw: float):
    tok = ByteTokenizer()
    found = prompts(batch)
    options = {"temperature": 1.0, "top_p": 1.0, **kw}
    completions = sample(
        student,
        found,
        max_new_tokens=12,
        vocab=tok.vocab_size,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        generator=seeded(seed),
        **options,
    )
    return found, completions, sampled_batch(found, completions, seq_len=48, pad_id=tok.pad_id)


def test_samples_are_seeded_and_trained_on_their_own_tokens_only(
    pair_batch: dict[str, torch.Tensor], models: tuple[torch.nn.Module, torch.nn.Module]
) -> None:
    student, _ = models
    found, completions, batch = _sampled(student, pair_batch, seed=7)
    again = _sampled(student, pair_batch, seed=7)[1]
    other = _sampled(student, pair_batch, seed=8)[1]
    assert all(torch.equal(a, b) for a, b in zip(completions, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(completions, other, strict=True))
    tok = ByteTokenizer()
    ids, labels, loss_mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
    # One decoded example: the row, what the loss trains on, and the positions whose outputs it reads.
    n, m = len(found[0]), len(completions[0])
    print("row:    ", repr(tok.decode(ids[0, : n + m].tolist())))
    print("trained:", repr(tok.decode(ids[0][labels[0] != -100].tolist())))
    print("loss mask positions:", loss_mask[0].nonzero().flatten().tolist())
    assert tok.decode(ids[0][labels[0] != -100].tolist()) == tok.decode(completions[0].tolist())
    assert loss_mask[0].nonzero().flatten().tolist() == list(range(n - 1, n + m - 1))
    for row, (p, c) in enumerate(zip(found, completions, strict=True)):
        assert torch.equal(ids[row, : len(p)], p) and torch.equal(ids[row, len(p) : len(p) + len(c)], c)
        assert int(batch["attention_mask"][row].sum()) == len(p) + len(c)
        assert torch.equal(loss_mask[row, :-1], labels[row, 1:] != -100)
        ended = (c == tok.eos_id).nonzero()
        assert len(c) == 12 if len(ended) == 0 else int(ended[0]) == len(c) - 1  # nothing after eos


def test_cached_sampling_matches_a_full_forward(
    pair_batch: dict[str, torch.Tensor], models: tuple[torch.nn.Module, torch.nn.Module]
) -> None:
    """Greedy sampling (top_p near 0 keeps only the likeliest token) with left-padded prompts and the key/
    value cache picks, at every step, the argmax of a plain forward of the right-padded row."""
    student, _ = models
    found, completions, batch = _sampled(student, pair_batch, seed=1, top_p=1e-6)
    assert len({len(p) for p in found}) > 1  # the prompts differ in length: left padding is exercised
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    for row, (p, c) in enumerate(zip(found, completions, strict=True)):
        picked = logits[row, len(p) - 1 : len(p) + len(c) - 1, :256].argmax(-1)
        assert torch.equal(picked, c)


# ---------------------------------------------------------------------------------------------------------
# gkd's jsd on the student's samples against TRL's


def _trl_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TRL's `GKDTrainer.generalized_jsd_loss` (huggingface/trl 1.16.0, trl/experimental/gkd/gkd_trainer.py;
    trl/trainer/gkd_trainer.py before), for 0 < beta < 1, reduction "batchmean" with labels, transcribed;
    used when trl is not installed (it is not a dependency: importing it takes seconds)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    b = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]), dim=0
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = b * kl_teacher + (1 - b) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def _reference_jsd():
    try:
        from trl.experimental.gkd import GKDTrainer  # trl >= 1.0
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            return _trl_generalized_jsd, "transcribed"
    return GKDTrainer.generalized_jsd_loss, "trl"


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_on_student_samples_equals_trls(
    beta: float, pair_batch: dict[str, torch.Tensor], models: tuple[torch.nn.Module, torch.nn.Module]
) -> None:
    student, teacher = models
    _, _, batch = _sampled(student, pair_batch, seed=5)
    t_specs, s_spec = [resolve_model("tiny-llama-teacher")], resolve_model("tiny-llama-student")
    method = {"name": "jsd", "options": {"beta": beta}}
    resolved = resolve([method], t_specs, s_spec, fused_linear=False)
    out = distill_step(student, [teacher], DistillLoss(resolved, t_specs, s_spec), batch, resolved)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long()}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
    reference, which = _reference_jsd()
    # TRL's compute_loss: the logits of positions 0..T-2 against the labels of tokens 1..T-1.
    expected = reference(s_logits[:, :-1], t_logits[:, :-1], labels=batch["labels"][:, 1:], beta=beta)
    got = out.total.detach()
    print(f"beta {beta}: gkd {float(got):.8f}  {which} {float(expected):.8f}")
    assert float(expected) > 1e-4  # a divergence to compare, not two zeros
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_run_refuses_what_cannot_train_on_samples() -> None:
    from gkd.methods.registry import get
    from gkd.methods.report import on_generated
    from gkd.runtime.generation import policy_for

    config = Config.from_dict(
        {"methods": ["jsd", "hidden_mse"], "generation": {"mode": "on_policy", "max_new_tokens": 8}}
    ).to_dict()
    kw = {"seed": 0, "rank": 0, "tokenizer": ByteTokenizer()}
    policy = policy_for(config, placement="replicated", encoder=False, **kw)
    assert policy is not None and policy.settings.max_new_tokens == 8 and policy.seq_len == 512
    assert policy_for(Config.from_dict({}).to_dict(), placement="offline", encoder=True, **kw) is None
    with pytest.raises(InputError, match="needs a decoder student"):
        policy_for(config, placement="replicated", encoder=True, **kw)
    with pytest.raises(InputError, match="plan runs the teacher offline"):
        policy_for(config, placement="offline", encoder=False, **kw)
    with pytest.raises(InputError, match="method minilmv2 does not apply to generated sequences"):
        policy_for({**config, "methods": [{"name": "minilmv2"}]}, placement="replicated", encoder=False, **kw)
    assert on_generated(get("kd")) == "yes" and on_generated(get("topk_kl")).startswith("no: ")
    # sequence_kd: the student samples only with lambda above 0, and only then needs a live teacher.
    seq = Config.from_dict({"methods": ["kd"], "generation": {"mode": "sequence_kd"}}).to_dict()
    assert policy_for(seq, placement="offline", encoder=False, **kw) is None
    attention = {**seq, "methods": [{"name": "minilmv2"}]}  # stored data: any method reads it
    assert policy_for(attention, placement="replicated", encoder=False, **kw) is None
    mixed = {**seq, "generation": {**seq["generation"], "lambda": 0.5}}
    assert policy_for(mixed, placement="replicated", encoder=False, **kw) is not None
    with pytest.raises(InputError, match="plan runs the teacher offline.*or set generation.lambda 0"):
        policy_for(mixed, placement="offline", encoder=False, **kw)
    with pytest.raises(InputError, match="sequence_kd needs a decoder student"):
        policy_for(seq, placement="replicated", encoder=True, **kw)


@pytest.mark.parametrize(
    ("methods", "pairs", "message"),
    [
        ("[jsd]", False, "needs chat or prompt/completion data"),
        ("[kd, minilmv2]", True, "method minilmv2 does not apply to generated sequences"),
    ],
)
def test_gkd_run_refuses_an_on_policy_job_before_any_process_starts(
    tmp_path: Path, methods: str, pairs: bool, message: str
) -> None:
    from click.testing import CliRunner

    from gkd.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(
        f"teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: {methods}\n"
        "training: {seq_len: 64, global_batch: 8, micro_batch: [2], steps: 1}\n"
        "generation: {mode: on_policy, max_new_tokens: 8}\n"
    )
    args = ["run", str(config), "--out", str(tmp_path / "run")]
    if pairs:
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        args += ["--data", str(tmp_path / "pairs.jsonl")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd: error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_gkd_run_refuses_a_sequence_kd_job_on_text_before_any_process_starts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gkd.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"
        "training: {seq_len: 64, global_batch: 8, micro_batch: [2], steps: 1}\n"
        "generation: {mode: sequence_kd, max_new_tokens: 8}\n"
    )
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "generation.mode sequence_kd needs prompts" in lines[0], lines
    assert not (tmp_path / "run").exists()
