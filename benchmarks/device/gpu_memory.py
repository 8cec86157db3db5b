"""Predicted vs measured activation memory on a GPU.

The planner's saved-for-backward bytes (model facts: traced on the CPU under fake tensors with CUDA's dropout
and attention kernels, `gkd.planner.facts`) against what a real CUDA training forward keeps alive. For each
model, in bf16, training mode: build it on the device with random weights, record
`torch.cuda.memory_allocated()` before the forward, run the forward, and measure what the forward left
allocated minus the logits it returned (an output, not a saved tensor): the bytes autograd keeps for the
backward plus anything the model caches. The prediction is the planner's, for micro-batch B:
B x (layers x per-layer bytes + bytes outside the layers) on the sdpa path, with `saved` or, for full
recompute, `checkpoint` as the per-layer bytes; full recompute uses transformers' activation checkpointing.
The GPT-2-shaped rows have dropout on (attention and residual), where CUDA's fused dropout and flash kernel
keep less than their CPU counterparts. The peak during forward+backward is printed for reference.

Usage: python benchmarks/device/gpu_memory.py [--dry-run]
(--dry-run: tiny models on the CPU, predictions only). Writes a markdown copy to $OUT/gpu_memory.md when OUT
is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from gkd.models import build_model, spec_from_config  # noqa: E402
from gkd.planner.facts import model_facts  # noqa: E402

MIB = 1 << 20
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_memory.md").write_text("\n".join(LINES) + "\n")


def llama(layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    }


def qwen2(layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int) -> dict:
    return {**llama(layers, hidden, heads, kv, ffn, vocab), "model_type": "qwen2"}


def gpt2(layers: int, hidden: int, heads: int, vocab: int, positions: int) -> dict:
    # GPT-2's own dropout: 0.1 on attention, residual and embeddings.
    return {
        "model_type": "gpt2",
        "n_layer": layers,
        "n_embd": hidden,
        "n_head": heads,
        "vocab_size": vocab,
        "n_positions": positions,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def measure(spec, batch: int, seq: int, recompute: bool, device: torch.device) -> tuple[int, int]:
    """(bytes left allocated by the forward minus its logits, peak above the model during fwd+bwd)."""
    model = build_model(spec, device=str(device), dtype=torch.bfloat16).train()
    if recompute:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, spec.vocab, (batch, seq), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - out.logits.untyped_storage().nbytes()
    out.logits.float().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, out
    torch.cuda.empty_cache()
    return held, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args()
    if opts.dry_run:
        cases = [
            ("tiny-llama", llama(2, 64, 4, 2, 128, 256), 1, 32),
            ("tiny-gpt2 dropout", gpt2(2, 64, 4, 256, 64), 2, 32),
        ]
    else:
        cases = [
            ("llama 4L h2048 GQA", llama(4, 2048, 16, 4, 5632, 32000), 1, 2048),
            ("llama 4L h2048 GQA", llama(4, 2048, 16, 4, 5632, 32000), 2, 4096),
            ("qwen2 4L h1536", qwen2(4, 1536, 12, 2, 8960, 151936), 1, 2048),
            ("gpt2 4L h1600 dropout", gpt2(4, 1600, 25, 50257, 1024), 2, 1024),
        ]
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.dry_run else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run: predictions only)"
    say(f"# activation memory, predicted vs measured, bf16, training forward, on {name}")
    say(f"torch {torch.__version__}")
    say("")
    say("| model | batch x seq | recompute | predicted MiB | measured MiB | error | fwd+bwd peak MiB | s |")
    say("|---|---|---|---|---|---|---|---|")
    errors = []
    for label, cfg, batch, seq in cases:
        spec = spec_from_config({**cfg, "torch_dtype": "bfloat16"}, name=label)
        facts = model_facts(spec, seq_len=seq, use_cache=False)
        for recompute in (False, True):
            start = time.perf_counter()
            per_layer = facts.checkpoint if recompute else facts.saved["sdpa"]
            predicted = batch * (spec.layers * per_layer + facts.embed_saved)
            if device.type == "cuda":
                held, peak = measure(spec, batch, seq, recompute, device)
                err = abs(predicted - held) / held
                errors.append(err)
                cells = f"{held / MIB:.1f} | {100 * err:.2f}% | {peak / MIB:.1f}"
            else:
                cells = "- | - | -"
            say(
                f"| {label} | {batch} x {seq} | {'full' if recompute else 'none'} | {predicted / MIB:.1f} | "
                f"{cells} | {time.perf_counter() - start:.1f} |"
            )
    if errors:
        say("")
        median = sorted(errors)[len(errors) // 2]
        say(f"prediction error: median {100 * median:.2f}%, max {100 * max(errors):.2f}%")


if __name__ == "__main__":
    main()
