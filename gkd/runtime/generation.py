"""On-policy distillation (`generation.mode: on_policy`, and `sequence_kd` with `lambda` above 0, whose other
micro-batches are the teacher's generations, gkd.runtime.sequence_kd): the student samples the completions it
trains on.

Usage (one rank of `gkd run`, gkd.runtime.worker):
    policy = OnPolicy(settings=config.generation, seed=seed, rank=rank, vocab=tokenizer.vocab_size,
                      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seq_len=seq_len)
    batch = policy.batch(student, batch, step=s, micro=m)   # the data's batch, or prompt + student sample

For a fraction `lambda` of the micro-batches, the student (in eval mode, without gradients) samples a
completion of up to `max_new_tokens` tokens for each row's prompt; the step then runs as on any batch (the
teacher scores prompt + sample, the student trains on it), with the labels and the loss mask on the sampled
tokens only, so every loss term, hard and distillation alike, reads only them (gkd.runtime.step). This is
GKD's on-policy mix (Agarwal et al. 2024, TRL's `GKDTrainer` with `lmbda`).

Design choices:
- Which micro-batches are sampled depends on (seed, step, micro-batch) only, never on the rank: under ZeRO-3
  the student's forward is a collective, so every rank must sample the same micro-batches. The sampling
  generator is seeded from (seed, rank, step, micro-batch), so a resumed run, whose student is restored,
  samples the same completions.
- The sampling loop always runs `max_new_tokens` forwards, also after every row has ended with eos: ranks
  stay in step (ZeRO-3 gathers each layer's parameters in every rank's forward) without a collective per
  token. Tokens after a row's eos are padding outside the attention and loss masks.
- Prompts come from the data's own prompt/completion structure (chat and prompt/completion records,
  gkd.runtime.data): a row's prompt is its first document start that is not trained on, up to the first
  trained token; a row with none (it starts inside a completion) takes its first token. A prompt longer than
  `seq_len - max_new_tokens` keeps its end. Rows are right-padded to seq_len.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gkd.config import GenerationConfig
from gkd.errors import InputError

NO_PROMPTS = (
    "generation.mode on_policy needs chat or prompt/completion data (their prompts are what the student "
    "completes) with data.loss_mask auto or completion; use such records in --data, or generation.mode off"
)


def seeded(*parts: int | str, device: Any = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from a tuple; hashing keeps distinct tuples apart."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def is_sampled(fraction: float, *, seed: int, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of `step` is the student's sample (the same answer on every rank)."""
    if fraction <= 0:
        return False
    draw = torch.rand((), generator=seeded(seed, "on_policy", step, micro))
    return bool(draw < fraction)


def prompts(batch: Mapping[str, Tensor]) -> list[Tensor]:
    """Each row's prompt ids (see the module docstring for the rule)."""
    if "loss_mask" not in batch or "labels" not in batch:
        raise InputError(NO_PROMPTS)
    ids, trained = batch["input_ids"], batch["labels"] != -100
    position = batch.get("position_ids")
    if position is None:
        position = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    out = []
    for row in range(ids.shape[0]):
        found = None
        starts = [int(i) for i in (position[row] == 0).nonzero().flatten() if not trained[row, i]]
        # A start inside the row first: the row's own start may cut a prompt.
        for start in [s for s in starts if s > 0] + [s for s in starts if s == 0]:
            later = trained[row, start:].nonzero().flatten()
            if len(later) == 0:
                continue
            end = start + int(later[0])
            if bool((position[row, start:end] == torch.arange(end - start, device=ids.device)).all()):
                found = ids[row, start:end]  # one document up to its first trained token
                break
        out.append(found if found is not None else ids[row, :1])
    return out


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """One token per row from `logits` (B, V) at `temperature`, keeping the nucleus of mass `top_p`."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        ordered, index = probs.sort(dim=-1, descending=True)
        # Keep the most likely tokens until their mass reaches top_p (the first always stays).
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, index, ordered)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _takes(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def sample(
    student: nn.Module,
    prompt_ids: list[Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    vocab: int,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator,
) -> list[Tensor]:
    """Each prompt's sampled completion (its eos included, nothing after it): exactly `max_new_tokens`
    forwards with a key/value cache, left-padded prompts (see the module docstring)."""
    device = prompt_ids[0].device
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p) :] = p
        attention[row, width - len(p) :] = 1
    positions = _takes(student, "position_ids")
    # The key/value cache argument is `cache` in recent transformers, `past_key_values` before.
    cache_key = "cache" if _takes(student, "cache") else "past_key_values"
    ended = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    new: list[Tensor] = []
    past = None
    step_ids = ids
    for _ in range(max_new_tokens):
        inputs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": attention, "use_cache": True}
        if positions:  # left padding: each row counts its positions from its first real token
            where = (attention.cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = where if past is None else where[:, -1:]
        if past is not None:
            inputs[cache_key] = past
        out = student(**inputs)
        past = getattr(out, cache_key)
        logits = out.logits[:, -1, :].float()
        logits[:, vocab:] = float("-inf")  # ids the tokenizer cannot write
        token = _sample(logits, temperature, top_p, generator)
        token = token.masked_fill(ended, pad_id)
        new.append(token)
        attention = torch.cat([attention, (~ended).long()[:, None]], dim=1)
        if eos_id is not None:
            ended |= token == eos_id
        step_ids = token[:, None]
    tokens = torch.stack(new, dim=1)
    completions = []
    for row in range(len(prompt_ids)):
        n = int(attention[row, width:].sum())
        completions.append(tokens[row, :n])
    return completions


def sampled_batch(prompt_ids: list[Tensor], completions: list[Tensor], *, seq_len: int, pad_id: int) -> dict:
    """A training batch of prompt + completion rows, right-padded to `seq_len`: labels and the loss mask on
    the completion tokens only (the loss mask at position i: the token at i + 1 is a completion token)."""
    rows = len(prompt_ids)
    device = prompt_ids[0].device
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((rows, seq_len), dtype=torch.bool, device=device)
    completion = torch.zeros_like(real)
    for row, (p, c) in enumerate(zip(prompt_ids, completions, strict=True)):
        n, m = len(p), len(c)
        ids[row, :n] = p
        ids[row, n : n + m] = c
        real[row, : n + m] = True
        completion[row, n : n + m] = True
    loss_mask = torch.zeros_like(real)
    loss_mask[:, :-1] = completion[:, 1:]
    return {
        "input_ids": ids,
        "attention_mask": real,
        "position_ids": torch.arange(seq_len, device=device).expand(rows, seq_len).clone(),
        "labels": ids.masked_fill(~completion, -100),
        "loss_mask": loss_mask,
    }


@dataclass(kw_only=True)
class OnPolicy:
    """One rank's on-policy sampler (see the module docstring)."""

    settings: GenerationConfig
    seed: int
    rank: int
    vocab: int
    eos_id: int | None
    pad_id: int
    seq_len: int

    def batch(self, student: nn.Module, batch: dict[str, Tensor], *, step: int, micro: int) -> dict:
        """`batch` itself, or, for a sampled micro-batch, its prompts completed by `student`."""
        g = self.settings
        if not is_sampled(g.fraction, seed=self.seed, step=step, micro=micro):
            return batch
        keep = self.seq_len - g.max_new_tokens
        found = [p[-keep:] for p in prompts(batch)]
        device = batch["input_ids"].device
        was_training = student.training
        student.eval()  # no dropout while sampling
        try:
            completions = sample(
                student,
                found,
                max_new_tokens=g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                vocab=self.vocab,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                generator=seeded(self.seed, self.rank, step, micro, device=device),
            )
        finally:
            student.train(was_training)
        return sampled_batch(found, completions, seq_len=self.seq_len, pad_id=self.pad_id)


def _settings(config: Mapping[str, Any]) -> GenerationConfig | None:
    """The plan's generation settings (None when generation is off)."""
    entry = config.get("generation")
    if not entry or entry.get("mode", "off") == "off":
        return None
    return GenerationConfig(
        mode=entry["mode"],
        fraction=entry["lambda"],
        max_new_tokens=entry["max_new_tokens"],
        temperature=entry["temperature"],
        top_p=entry["top_p"],
        prompt_field=entry.get("prompt_field"),
        refresh_every=entry.get("refresh_every"),
    )


def _refuse(config: Mapping[str, Any], *, placement: str, encoder: bool) -> None:
    """One line for what generation cannot run: an encoder student, and where the student samples, an
    offline teacher or a method that does not apply to its samples (gkd.methods.report.GENERATION_RULES)."""
    from gkd.methods.registry import get
    from gkd.methods.report import on_generated

    settings = _settings(config)
    assert settings is not None
    mode = settings.mode
    if encoder:
        raise InputError(f"generation.mode {mode} needs a decoder student; an encoder does not generate")
    if placement == "offline" and (mode == "on_policy" or settings.fraction > 0):
        raise InputError(
            f"generation.mode {mode} with lambda above 0 scores the student's samples with a live teacher, "
            "but the plan runs the teacher offline; plan with overrides.teacher_placement set to another "
            "placement" + (", or set generation.lambda 0" if mode == "sequence_kd" else "")
        )
    if mode == "sequence_kd" and settings.fraction == 0:
        return  # the teacher's generations are stored prompt/completion data: every method reads them
    for method in config.get("methods", []):
        verdict = on_generated(get(method["name"]))
        if verdict != "yes":
            why = verdict.removeprefix("no: ")
            raise InputError(
                f"method {method['name']} does not apply to generated sequences ({why}); "
                "drop it or set generation.mode off (`gkd methods` lists the methods that do)"
            )


def check_generation(plan: Any, stored: Any, data: str | None = None) -> None:
    """Before any process starts (`gkd run`): refuse, in one line, a generating job that cannot run, and
    data without prompts (`stored`, the source's TokenFile, has no loss mask; for sequence_kd, the prompts
    are read here, as the workers will)."""
    config = plan.inputs["config"]
    settings = _settings(config)
    if settings is None:
        return
    from gkd.planner.specs import load_spec

    encoder = load_spec(config["student"]).is_encoder
    _refuse(config, placement=plan.strategy.teacher_placement, encoder=encoder)
    if settings.mode == "sequence_kd":
        from gkd.runtime.data import data_options, load_tokenizer
        from gkd.runtime.sequence_kd import prompt_ids

        if any(load_spec(ref).is_encoder for ref in config["teachers"][:1]):
            raise InputError(
                "generation.mode sequence_kd needs a decoder teacher; an encoder does not generate"
            )
        tokenizer = load_tokenizer(config["teachers"][0], load_spec(config["teachers"][0]))
        keep = int(config["training"]["seq_len"]) - settings.max_new_tokens
        prompt_ids(data, data_options(config), tokenizer, settings.prompt_field, keep)
        return
    if not stored.masked:
        raise InputError(NO_PROMPTS)


def policy_for(
    config: Mapping[str, Any], *, placement: str, encoder: bool, seed: int, rank: int, tokenizer: Any
) -> OnPolicy | None:
    """The run's student sampler from the plan's config (None when the student never samples)."""
    settings = _settings(config)
    if settings is None:
        return None
    _refuse(config, placement=placement, encoder=encoder)
    if settings.fraction == 0 and settings.mode == "sequence_kd":
        return None
    return OnPolicy(
        settings=settings,
        seed=seed,
        rank=rank,
        vocab=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seq_len=int(config["training"]["seq_len"]),
    )
