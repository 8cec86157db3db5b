"""The quality benchmark: are gkd's students better than the same student trained without a teacher?

For each teacher (a real causal LM and a real BERT-family encoder, prepared by benchmarks/prepare_quality.py),
one small student is trained from the same random initialisation (per seed) for the same steps on the same
tokens with: the hard loss alone (the no-teacher twin), each method (plus the hard loss at weight 1), and a
combination; then student_init (the teacher's embeddings, every other block, final norm and head) against
random init, both with the hard loss alone. Every run is a `gkd run` of a config this script writes, on one
CPU process; every student is then evaluated on the same held-out rows (gkd's own data pipeline, seed 0, the
figures `gkd eval` computes: loss, perplexity, top-1 agreement with the teacher, whose forward runs once and
is reused for every student). One student of the table is also checked against `gkd eval --json` itself.

    .venv/bin/python benchmarks/prepare_quality.py           # once: teachers and text
    nice .venv/bin/python benchmarks/quality.py               # the full tables (about an hour on 2 cores)
    .venv/bin/python benchmarks/quality.py --smoke            # tiny random models, a few steps (CI)

It prints held-out loss, perplexity and teacher top-1 agreement per method, the difference of the loss to the
twin's (mean over the seeds) with the seed spread (the largest minus the smallest loss of the method over the
seeds, and the twin's), the first logged step's loss, the wall time and the tokens/s of the training steps,
and writes the tables (Markdown) to `--out` (default benchmarks/results/quality_cpu.md) with the command and
the commit. `--smoke` uses the tiny presets' shapes (random teachers built from configs, the built-in byte
tokenizer) and a short text written into the work folder: it checks the machinery, its numbers mean nothing.

Settings that decide whether distillation helps are flags: --steps, --lr, --temperature (every method with a
temperature), --seq-len, --batch, --seeds, --methods (a subset of the rows, by name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "quality"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality_cpu.md"
HARD = {"name": "kd", "options": {"soft_rate": 0.0}}  # the hard (LM / MLM) loss alone: the twin's objective


@dataclass
class Row:
    """One line of a table: the methods of its config, the student it trains and how it starts."""

    name: str
    methods: list[dict[str, Any]]
    student: str = "student"  # key into Pair.students
    init: dict[str, Any] | None = None  # the config's student_init section
    overrides: dict[str, Any] = field(default_factory=dict)
    twin: str = "twin"  # the row it is compared with
    steps: int | None = None  # None: --steps; 1 for rows that show where a student starts


@dataclass
class Pair:
    name: str
    teacher: str  # folder or config.json
    students: dict[str, dict[str, Any]]  # name -> config.json contents
    rows: list[Row]
    note: str = ""


def with_temperature(method: dict[str, Any], temperature: float | None) -> dict[str, Any]:
    if temperature is None:
        return method
    return {**method, "options": {**method.get("options", {}), "temperature": temperature}}


def ends(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher's first ceil(n/2) and last floor(n/2) block indices, n = `student_layers`."""
    first = (student_layers + 1) // 2
    return [*range(first), *range(teacher_layers - (student_layers - first), teacher_layers)]


def causal_rows(temperature: float | None, teacher_layers: int, wide_layers: int) -> list[Row]:
    t = temperature
    return [
        Row("twin", [HARD]),
        Row("kd", [with_temperature({"name": "kd"}, t)]),
        Row("fkl", [with_temperature({"name": "fkl", "options": {"hard_rate": 1.0}}, t)]),
        Row("rkl", [with_temperature({"name": "rkl", "options": {"hard_rate": 1.0}}, t)]),
        Row("jsd", [with_temperature({"name": "jsd", "options": {"hard_rate": 1.0}}, t)]),
        Row("tvd", [with_temperature({"name": "tvd", "options": {"hard_rate": 1.0}}, t)]),
        Row(
            "topk_kl",
            [with_temperature({"name": "topk_kl", "options": {"hard_rate": 1.0}}, t)],
            overrides={"teacher_placement": "offline"},
        ),
        Row("minilmv2", [HARD, {"name": "minilmv2"}]),
        Row("hidden_mse", [HARD, {"name": "hidden_mse"}]),
        Row("tinybert", [HARD, with_temperature({"name": "tinybert"}, t)]),
        Row("kd+minilmv2", [with_temperature({"name": "kd"}, t), {"name": "minilmv2"}]),
        Row("twin_wide", [HARD], student="wide", twin="twin_wide", steps=1),
        Row(
            "student_init_every2",
            [HARD],
            student="wide",
            init={"from": "teacher", "every": 2},
            twin="twin_wide",
            steps=1,
        ),
        # The teacher's first and last blocks (real pair: 0-7 and 23-29): dropping every other block of a deep
        # decoder breaks its residual stream more than dropping a run of middle blocks (docs/methods.md).
        Row(
            "student_init_ends",
            [HARD],
            student="wide",
            init={"from": "teacher", "layers": ends(teacher_layers, wide_layers)},
            twin="twin_wide",
            steps=1,
        ),
    ]


def encoder_rows() -> list[Row]:
    # The encoder teacher's masked-LM head is a small one prepare_quality.py fitted (its checkpoint had none),
    # so the table leans on the methods that read its blocks; TinyBERT runs its first stage (attention +
    # hidden) only, which a short run can show.
    return [
        Row("twin", [HARD]),
        Row("kd", [{"name": "kd"}]),
        Row("minilmv2", [HARD, {"name": "minilmv2"}]),
        Row("hidden_mse", [HARD, {"name": "hidden_mse"}]),
        Row("hidden_cos", [HARD, {"name": "hidden_cos"}]),
        Row("pkd", [{"name": "pkd"}]),
        Row("tinybert_stage0", [HARD, {"name": "tinybert", "options": {"stage": 0}}]),
        Row("student_init_every2", [HARD], init={"from": "teacher", "every": 2}),
        Row(
            "student_init_every2+minilmv2", [HARD, {"name": "minilmv2"}], init={"from": "teacher", "every": 2}
        ),
    ]


def llama(
    hidden: int, heads: int, kv: int, head_dim: int, ffn: int, layers: int, vocab: int
) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def bert(hidden: int, heads: int, ffn: int, layers: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def real_pairs(temperature: float | None) -> list[Pair]:
    for folder in ("smollm2-135m", "minilm-l6", "text"):
        if not (CACHE / folder).is_dir():
            sys.exit(f"quality: {CACHE / folder} is missing; run benchmarks/prepare_quality.py first")
    return [
        Pair(
            "causal: SmolLM2-135M teacher",
            str(CACHE / "smollm2-135m"),
            {
                # Narrow (288 wide, the teacher's 9 heads of 32), 4 blocks: hidden_mse goes through a
                # projection, tinybert has equal heads; pkd needs equal widths and is not in this table.
                "student": llama(288, 9, 3, 32, 768, 4, 49152),
                # The teacher's width and 15 blocks, so that `every: 2` takes teacher blocks 0, 2, ..., 28.
                "wide": llama(576, 9, 3, 64, 1536, 15, 49152),
                # --student-size large: the teacher's width, 6 of its 30 blocks.
                "large": llama(576, 9, 3, 64, 1536, 6, 49152),
            },
            causal_rows(temperature, teacher_layers=30, wide_layers=15),
        ),
        Pair(
            "encoder: all-MiniLM-L6-v2 teacher",
            str(CACHE / "minilm-l6"),
            {"student": bert(384, 12, 1536, 3, 30522), "large": bert(384, 12, 1536, 5, 30522)},
            encoder_rows(),
            note="the teacher's masked-LM head was fitted by prepare_quality.py (the checkpoint has none)",
        ),
    ]


def smoke_pairs(temperature: float | None, work: Path) -> list[Pair]:
    # Shapes like the tiny presets', random weights saved as folders (student_init needs a teacher with
    # weights) and the built-in byte tokenizer: nothing is downloaded.
    return [
        Pair(
            "causal (smoke)",
            random_folder(llama(64, 4, 2, 16, 128, 4, 256), work / "teacher-causal"),
            {
                "student": llama(32, 4, 2, 8, 64, 2, 256),
                "wide": llama(64, 4, 2, 16, 128, 2, 256),
                "large": llama(64, 4, 2, 16, 128, 3, 256),
            },
            causal_rows(temperature, teacher_layers=4, wide_layers=2),
        ),
        Pair(
            "encoder (smoke)",
            random_folder(bert(64, 4, 128, 4, 256), work / "teacher-encoder"),
            {"student": bert(64, 4, 128, 2, 256), "large": bert(64, 4, 128, 3, 256)},
            encoder_rows(),
        ),
    ]


def random_folder(config: dict[str, Any], folder: Path) -> str:
    """A seeded random model of `config` saved as a Hugging Face folder (the smoke test's teachers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        options = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
        hf_config = AutoConfig.for_model(config["model_type"], **options)
        auto = AutoModelForMaskedLM if config["model_type"] == "bert" else AutoModelForCausalLM
        auto.from_config(hf_config).to(torch.bfloat16).save_pretrained(str(folder))
    return str(folder)


SMOKE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns the letters of a few sentences. "
    "Distillation trains a student on a teacher's outputs as well as on the text. "
)


@dataclass
class Result:
    row: str
    seed: int
    out: Path
    seconds: float
    tokens_per_s: float
    first_loss: float
    eval_loss: float | None = None
    perplexity: float | None = None
    agreement: float | None = None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def teacher_ref(pair: Pair, work: Path) -> str:
    """A folder path as it is; a smoke teacher's config JSON written to a file (gkd reads a config.json)."""
    return pair.teacher


def run_one(
    pair: Pair, row: Row, seed: int, args: argparse.Namespace, work: Path, data: dict[str, Path]
) -> Result:
    slug = row.name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
    out = work / f"{slug}-seed{seed}"
    student = work / f"{row.student}.json"
    write_json(student, pair.students[row.student])
    config: dict[str, Any] = {
        "teacher": teacher_ref(pair, work),
        "student": str(student),
        "methods": row.methods,
        "training": {
            "seq_len": args.seq_len,
            "global_batch": args.batch,
            "micro_batch": args.batch,
            "steps": row.steps or args.steps,
            "lr": args.lr,
        },
        # Offline only where a row asks (topk_kl); the planner would otherwise pick it for a slow CPU teacher.
        "overrides": {"teacher_placement": "replicated", **row.overrides},
    }
    if row.init is not None:
        config["student_init"] = row.init
    config_path = work / f"{slug}-seed{seed}.json"
    wall_file = work / f"{slug}-seed{seed}.wall.json"
    if args.reuse and reusable(config_path, config, out, wall_file):
        return result_of(row.name, seed, out, float(json.loads(wall_file.read_text())["seconds"]))
    wall_file.unlink(missing_ok=True)
    write_json(config_path, config)
    command = [sys.executable, "-m", "gkd", "run", str(config_path), "--data", str(data["train"])]
    command += ["--out", str(out), "--seed", str(seed), "--processes", "1", "--discard-partial"]
    env = {**os.environ, "GKD_MEASURE": "0"}  # no per-operator memory accounting: it would slow every step
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    (work / f"{slug}-seed{seed}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise SystemExit(f"quality: gkd run for {pair.name} / {row.name} seed {seed} failed: {last[0]}")
    write_json(wall_file, {"seconds": seconds})
    return result_of(row.name, seed, out, seconds)


def reusable(config_path: Path, config: dict[str, Any], out: Path, wall_file: Path) -> bool:
    """--reuse: a finished run of the same config (its log, its student, its recorded wall time)."""
    if not (config_path.is_file() and wall_file.is_file() and (out / "student").is_dir()):
        return False
    return json.loads(config_path.read_text()) == json.loads(json.dumps(config))


def result_of(row: str, seed: int, out: Path, seconds: float) -> Result:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    tokens = sum(r["tokens"] for r in rows)
    train_seconds = sum(r["seconds"] for r in rows)
    return Result(row, seed, out, seconds, tokens / max(train_seconds, 1e-9), float(rows[0]["loss"]))


def evaluate(
    pair: Pair, results: list[Result], args: argparse.Namespace, work: Path, heldout: Path
) -> dict[str, float]:
    """Held-out loss, perplexity and top-1 agreement of every student on the same rows, as `gkd eval` computes
    them (its model loading and inputs; seed 0); the teacher runs once. Returns the teacher's figures."""
    import torch

    from gkd.runtime.data import batches, load_tokenizer
    from gkd.runtime.evaluate import _build, _open_model, model_inputs

    device = torch.device("cpu")
    teacher = _open_model(teacher_ref(pair, work), "teacher")
    objective = "mlm" if teacher.spec.is_encoder else "causal"
    # The students' tokenizer: a run copies the teacher's files into OUT/student (none in the smoke test).
    first = _open_model(str(results[0].out / "student"), "student")
    tokenizer = load_tokenizer(first.ref, first.spec)
    stream = batches(
        str(heldout), tokenizer, seq_len=args.seq_len, micro_batch=args.batch, objective=objective, seed=0
    )
    held = [next(stream) for _ in range(args.eval_batches)]

    def chosen(batch: dict[str, Any]) -> Any:
        labels = batch["labels"]
        return labels[:, 1:] != -100 if objective == "causal" else labels != -100

    def logits_of(out: Any) -> Any:
        return out.logits[:, :-1] if objective == "causal" else out.logits  # aligned with `chosen`

    def run(model: Any, top: list[Any] | None) -> tuple[float, int, int, list[Any]]:
        total, count, agree, tops = 0.0, 0, 0, []
        with torch.no_grad():
            for index, batch in enumerate(held):
                out = model(**model_inputs(model, batch, device))
                mask = chosen(batch)
                n = int(mask.sum())
                total += float(out.loss.float()) * n  # the batch's mean, weighed by its targets
                count += n
                argmax = logits_of(out)[mask].argmax(-1)
                tops.append(argmax)
                if top is not None:
                    agree += int((argmax == top[index]).sum())
        return total / count, count, agree, tops

    t_loss, count, _, t_top = run(_build(teacher, device, 0), None)
    for result in results:
        loss, _, agree, _ = run(_build(_open_model(str(result.out / "student"), "student"), device, 0), t_top)
        result.eval_loss = loss
        result.perplexity = math.exp(min(loss, 700.0))
        result.agreement = agree / count
    return {"loss": t_loss, "perplexity": math.exp(min(t_loss, 700.0)), "tokens": count}


def describe(config: dict[str, Any]) -> str:
    """A student's shape in words, from its config."""
    return f"{config['num_hidden_layers']} blocks, {config['hidden_size']} wide ({config['model_type']})"


def spread(values: list[float]) -> float:
    return max(values) - min(values) if values else 0.0


def table(pair: Pair, results: list[Result], teacher: dict[str, float]) -> list[str]:
    """The Markdown table of one pair: one line per row, the means over the seeds."""
    by_row: dict[str, list[Result]] = {}
    for r in results:
        by_row.setdefault(r.row, []).append(r)
    lines = [
        f"### {pair.name}",
        "",
        f"Teacher on the same held-out rows: loss {teacher['loss']:.4f}, "
        f"perplexity {teacher['perplexity']:.2f} "
        f"({teacher['tokens']} target tokens).",
        "",
        "| method | seeds | held-out loss | perplexity | top-1 agreement | vs twin (loss) "
        "| spread (method / twin) "
        "| beats twin by > 2x spread | first-step loss | wall s (mean) | train tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {row.name: row for row in pair.rows}
    for name, group in by_row.items():
        losses = [r.eval_loss for r in group if r.eval_loss is not None]
        mean = statistics.fmean(losses)
        twin_group = by_row.get(rows[name].twin, [])
        twin_losses = [r.eval_loss for r in twin_group if r.eval_loss is not None]
        if name == rows[name].twin or not twin_losses:
            diff, spreads, beats = "-", f"{spread(losses):.4f}", "-"
        else:
            delta = mean - statistics.fmean(twin_losses)
            margin = 2 * max(spread(losses), spread(twin_losses))
            diff = f"{delta:+.4f}"
            spreads = f"{spread(losses):.4f} / {spread(twin_losses):.4f}"
            beats = "yes" if -delta > margin else "no"
        lines.append(
            f"| {name} | {len(group)} | {mean:.4f} "
            f"| {statistics.fmean(r.perplexity or 0 for r in group):.2f} "
            f"| {statistics.fmean(r.agreement or 0 for r in group):.4f} | {diff} | {spreads} | {beats} "
            f"| {statistics.fmean(r.first_loss for r in group):.4f} "
            f"| {statistics.fmean(r.seconds for r in group):.0f} "
            f"| {statistics.fmean(r.tokens_per_s for r in group):.0f} |"
        )
    return lines


def check_against_gkd_eval(result: Result, args: argparse.Namespace, heldout: Path) -> str:
    """`gkd eval --json` on one student over the same rows: its loss must be the one the table shows."""
    command = [sys.executable, "-m", "gkd", "eval", str(result.out / "student"), "--data", str(heldout)]
    command += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch), "--seed", "0"]
    command += ["--max-batches", str(args.eval_batches), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"quality: gkd eval failed: {done.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(done.stdout)
    assert result.eval_loss is not None
    if abs(figures["loss"] - result.eval_loss) > 1e-4 * max(1.0, abs(result.eval_loss)):
        raise SystemExit(f"quality: gkd eval says {figures['loss']:.6f}, the table {result.eval_loss:.6f}")
    return (
        f"`gkd eval --json` on {result.row} seed {result.seed}: loss {figures['loss']:.6f} "
        f"(the table's {result.eval_loss:.6f})"
    )


def commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gkd", "benchmarks/quality.py"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random models and a few steps (CI)")
    parser.add_argument(
        "--pairs", default="causal,encoder", help="which tables: causal, encoder (default both)"
    )
    parser.add_argument(
        "--methods", default="", help="only these rows (comma-separated names) and their twins"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every run")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every run")
    parser.add_argument("--temperature", type=float, default=None, help="temperature of the logit methods")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (one micro-batch)")
    parser.add_argument("--eval-batches", type=int, default=None, help="held-out micro-batches evaluated")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the finished runs of the same configs in the work folder"
    )
    parser.add_argument(
        "--student-size",
        choices=("small", "large"),
        default="small",
        help="the method rows' student: small (default) or large (more blocks, the teacher's width)",
    )
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument(
        "--work", type=Path, default=None, help="run folders (default a folder under the cache)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"the Markdown table (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    defaults = (
        {"steps": 4, "lr": 1e-2, "seq_len": 32, "batch": 4, "eval_batches": 2}
        if args.smoke
        else {"steps": 8, "lr": 2e-3, "seq_len": 128, "batch": 2, "eval_batches": 8}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = (args.work or (CACHE / ("smoke-runs" if args.smoke else "runs"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "quality_smoke.md" if args.smoke else DEFAULT_OUT)
    if args.smoke:
        text = work / "text"
        text.mkdir(exist_ok=True)
        (text / "train.jsonl").write_text(
            "".join(json.dumps({"text": SMOKE_TEXT * 3}) + "\n" for _ in range(24))
        )
        (text / "heldout.jsonl").write_text(
            "".join(json.dumps({"text": SMOKE_TEXT * 2}) + "\n" for _ in range(8))
        )
        pairs = smoke_pairs(args.temperature, work)
    else:
        text = CACHE / "text"
        pairs = real_pairs(args.temperature)
    data = {"train": text / "train.jsonl", "heldout": text / "heldout.jsonl"}
    wanted = {p.strip() for p in args.pairs.split(",")}
    only = {m.strip() for m in args.methods.split(",") if m.strip()}
    invocation = "python benchmarks/quality.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = [
        "# Quality benchmark (benchmarks/quality.py)",
        "",
        f"Command: `{invocation.strip()}`; commit {commit()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Every run: {args.steps} steps of {args.batch} x {args.seq_len} tokens, lr {args.lr}, "
        "constant schedule, "
        f"bfloat16, one CPU process; seeds {seeds}; temperature "
        f"{args.temperature if args.temperature is not None else 'each method default'}. Held-out figures on "
        f"{args.eval_batches} micro-batches of {args.batch} x {args.seq_len} (seed 0). "
        "Spread: the largest minus "
        "the smallest held-out loss over the seeds.",
        "",
    ]
    started = time.perf_counter()
    for pair in pairs:
        kind = pair.name.split(":")[0].split(" ")[0]
        if kind not in wanted:
            continue
        unknown = only - {r.name for p in pairs for r in p.rows}
        if unknown:
            print(f"quality: no row named {sorted(unknown)[0]}; the rows: {[r.name for r in pair.rows]}")
            return 2
        picked = {r.name for r in pair.rows if not only or r.name in only}
        picked |= {r.twin for r in pair.rows if r.name in picked}  # each row's twin runs too
        rows = [r for r in pair.rows if r.name in picked]
        if not rows:
            continue
        if args.student_size == "large":
            # The method rows train the large student; rows with a student of their own keep it.
            rows = [dataclasses.replace(r, student="large") if r.student == "student" else r for r in rows]
        pair.rows = rows
        folder = work / (kind if args.student_size == "small" else f"{kind}-{args.student_size}")
        folder.mkdir(exist_ok=True)
        results: list[Result] = []
        for row in rows:
            for seed in seeds:
                result = run_one(pair, row, seed, args, folder, data)
                results.append(result)
                print(
                    f"{pair.name}: {row.name} seed {seed}: {result.seconds:.0f} s, first-step loss "
                    f"{result.first_loss:.4f}, {result.tokens_per_s:.0f} tok/s",
                    flush=True,
                )
        teacher = evaluate(pair, results, args, folder, data["heldout"])
        check = check_against_gkd_eval(results[0], args, data["heldout"])
        section = table(pair, results, teacher)
        shapes = {row.student: describe(pair.students[row.student]) for row in rows}
        section[1:1] = ["", "Students: " + "; ".join(f"{k}: {v}" for k, v in shapes.items()) + "."]
        if pair.note:
            section += ["", f"Note: {pair.note}."]
        section += ["", check + ".", ""]
        print("\n".join(section), flush=True)
        lines += section
    lines.append(f"Total wall time: {time.perf_counter() - started:.0f} s.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
