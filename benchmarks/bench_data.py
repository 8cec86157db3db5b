"""`gkd run`'s data path: tokenizing a source once into the stored id file, and what a rank then holds.

For a synthetic corpus (random words, one document per line, seeded) of --mb megabytes, prints:
- tokenize: the wall time and tokens/s of `prepare_tokens` (stream, encode in batches, write ids) for the
  built-in byte tokenizer and a BPE tokenizer trained here offline (8,000 tokens, a transformers fast
  tokenizer, as a model folder would hold);
- again: the time of the second `prepare_tokens` on the same source (the stored ids are found);
- rank memory: the private (anonymous) resident memory of a fresh process that opens `batches(...)` on the
  source and draws 200 micro-batches, against the same for the whole-source-in-memory way (each document's
  ids appended to a Python list, packed into one tensor), which is how the data path worked before the
  stored ids. Each measurement runs in its own process; the figure is RssAnon at the end minus RssAnon
  after imports and warm-up. The stored ids' pages are not in it: they are page cache, shared by the ranks
  and evicted under pressure.

Usage: python benchmarks/bench_data.py [--mb 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20


def write_corpus(path: Path, megabytes: int) -> None:
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    target = megabytes * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = " ".join(rng.choices(words, k=rng.randint(20, 400))) + "\n"
            f.write(line)
            written += len(line)


def train_bpe(corpus: Path, folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    with open(corpus, encoding="utf-8") as f:
        sample = [line for _, line in zip(range(2000), f, strict=False)]
    model.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))


CHILD = r"""
import json, sys
from itertools import islice
sys.path.insert(0, {root!r})
import torch
from gkd.models import resolve_model, spec_from_config
from gkd.runtime.data import batches, load_tokenizer, read_documents
config = dict(resolve_model("tiny-llama-student").hf_config) | {{"vocab_size": 8000}}
tok = load_tokenizer({tokenizer!r}, spec_from_config(config, name="bench"))
def anon():
    # Private (anonymous) resident memory: what a rank takes from the host. The stored ids' pages are file
    # pages of the page cache instead, shared by all ranks and evictable.
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
# Warm up what both paths use (torch's CPU kernels and thread pools), so that the figure is the data's.
torch.randperm(1000)
torch.tensor([1, 2, 3], dtype=torch.long).view(3, 1)
torch.stack([torch.zeros(4, dtype=torch.long)] * 2)
base = anon()
if {mode!r} == "stored":
    it = batches({source!r}, tok, seq_len=2048, micro_batch=8, objective="causal", rank=0, world=8)
    for batch in islice(it, 200):
        pass
else:  # the whole source in memory, as before the stored ids
    stream = []
    for doc in read_documents({source!r}):
        stream.extend(tok.encode(doc))
        stream.append(tok.eos_id)
    rows = len(stream) // 2048
    packed = torch.tensor(stream[: rows * 2048], dtype=torch.long).view(rows, 2048)
print(json.dumps({{"base": base, "end": anon()}}))  # the in-memory path's list and tensor are still alive
"""


def rank_memory(mode: str, source: Path, tokenizer: str, cache: Path) -> float:
    code = CHILD.format(
        root=str(Path(__file__).resolve().parents[1]), tokenizer=tokenizer, mode=mode, source=str(source)
    )
    env = dict(os.environ, GKD_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return (figures["end"] - figures["base"]) / MIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100, help="corpus size in megabytes (default 100)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gkd-bench-data-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus.txt"
        write_corpus(corpus, args.mb)
        train_bpe(corpus, root / "bpe")
        cache = root / "cache"
        os.environ["GKD_CACHE_DIR"] = str(cache)
        from gkd.models import resolve_model, spec_from_config
        from gkd.runtime.data import ByteTokenizer, load_tokenizer, prepare_tokens

        config = dict(resolve_model("tiny-llama-student").hf_config) | {"vocab_size": 8000}
        bpe = load_tokenizer(str(root / "bpe"), spec_from_config(config, name="bench"))
        size = corpus.stat().st_size / 1e6
        print(f"# benchmarks/bench_data.py --mb {args.mb}: corpus {size:.0f} MB, {os.cpu_count()} cores")
        print("| tokenizer | tokens | tokenize s | tokens/s | stored MiB | again s |")
        print("|---|---|---|---|---|---|")
        for name, tok in (("bytes", ByteTokenizer()), ("bpe-8000", bpe)):
            start = time.perf_counter()
            stored, built = prepare_tokens(str(corpus), tok)
            took = time.perf_counter() - start
            assert built
            start = time.perf_counter()
            _, built_again = prepare_tokens(str(corpus), tok)
            again = time.perf_counter() - start
            assert not built_again
            print(
                f"| {name} | {stored.tokens:,} | {took:.1f} | {stored.tokens / took:,.0f} | "
                f"{stored.path.stat().st_size / MIB:.0f} | {again:.3f} |"
            )
        print()
        print("rank memory (bpe-8000, seq_len 2048, micro_batch 8, rank 0 of 8, 200 batches drawn):")
        print("| data path | private resident memory above imports MiB |")
        print("|---|---|")
        stored_mib = rank_memory("stored", corpus, str(root / "bpe"), cache)
        memory_mib = rank_memory("in-memory", corpus, str(root / "bpe"), cache)
        print(f"| stored ids, memory-mapped | {stored_mib:.1f} |")
        print(f"| whole source in memory (before) | {memory_mib:.1f} |")


if __name__ == "__main__":
    main()
