"""The README's newcomer path, step by step, offline on tiny models: two hub ids read from a Hugging Face
cache (HF_HUB_OFFLINE=1), a chat dataset (.jsonl records with `messages`), `gkd plan`, `gkd run` (2 steps, 2
processes), then the saved student loaded with AutoModelForCausalLM / AutoTokenizer and generating."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

LLAMA = {
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    [
        {"role": "user", "content": f"what is {i} plus one?"},
        {"role": "assistant", "content": f"it is {i + 1}"},
    ]
    for i in range(16)
]


def save_chat_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer with a chat template, trained offline on the chats (under 256 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    corpus = [f"{m['role']}\n{m['content']}\n" for chat in CHATS for m in chat]
    model.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
    )
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.save_pretrained(str(folder))


def gkd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=dict(os.environ)
    )
    print(proc.stdout, proc.stderr)  # the README's output blocks are these
    return proc


def test_hub_ids_chat_data_plan_run_then_generate(hub_cache: Any, tmp_path: Path) -> None:
    # 1. Two hub ids in the local cache (as `hf download` leaves them); the teacher has a chat tokenizer.
    teacher = hub_cache(
        "org/tiny-teacher", {**LLAMA, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
    )
    hub_cache(
        "org/tiny-student", {**LLAMA, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}
    )
    save_chat_tokenizer(teacher)
    # 2. A chat dataset.
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    (tmp_path / "chat.yaml").write_text(
        "teacher: org/tiny-teacher\n"
        "student: org/tiny-student\n"
        "methods: [kd]\n"
        "training: {seq_len: 64, global_batch: 4, steps: 2}\n"
    )
    # 3. gkd plan: the job fits the two processes.
    planned = gkd(tmp_path, "plan", "chat.yaml", "--gpus", "2")
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "org/tiny-teacher" in planned.stdout and "FITS" in planned.stdout
    # 4. gkd run, 2 steps in 2 processes, on the chat data.
    ran = gkd(tmp_path, "run", "chat.yaml", "--data", "chat.jsonl", "--out", "run", "--processes", "2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # 5. The student, as any Hugging Face causal LM, answers a chat prompt.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 1
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is 3 plus one?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out[0, : ids.shape[1]], ids[0])
    print(tokenizer.decode(out[0, ids.shape[1] :]))
