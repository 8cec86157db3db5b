"""`gkd export`: a `--save-every` checkpoint as a Hugging Face folder.

Real 2-process runs of the tiny Llama pair (kd + minilmv2, whose projections are loss extras the export must
drop) under ZeRO-2 and ZeRO-3 (a tied student, every parameter partitioned) stop at step 2 with a checkpoint
there: the export of that checkpoint must equal the run's own saved student file for file (names, tensors bit
for bit, config). Bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from gkd.cli import main
from gkd.config import Config
from gkd.planner.pipeline import plan as make_plan
from gkd.runtime.executor import run_job

pytestmark = pytest.mark.slow

STEPS = 2


def _run(tmp: Path, models_dir: Path, config: dict[str, Any]) -> Path:
    plan = make_plan(Config.from_dict(config))
    assert plan.fits
    (tmp / "plan.json").write_text(plan.to_json())
    return run_job(
        str(tmp / "plan.json"),
        data=str(models_dir / "corpus.txt"),
        steps=STEPS,
        out=str(tmp / "out"),
        processes=2,
        seed=1,
        save_every=STEPS,
        echo=lambda _: None,
    )


@pytest.fixture(scope="module")
def zero2_run(models_dir: Path, job_config: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = job_config(models_dir, "llama", {"student_zero_stage": 2, "teacher_placement": "replicated"})
    return _run(tmp_path_factory.mktemp("zero2"), models_dir, config)


def _export(*args: str) -> Result:
    return CliRunner().invoke(main, ["export", *args])


def _same_folder(exported: Path, saved: Path) -> None:
    from safetensors import safe_open

    files = sorted(p.name for p in saved.iterdir())
    assert sorted(p.name for p in exported.iterdir()) == files
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(saved / name, "pt") as a, safe_open(exported / name, "pt") as b:
                assert set(a.keys()) == set(b.keys())
                for key in a.keys():  # noqa: SIM118
                    x, y = a.get_tensor(key), b.get_tensor(key)
                    assert x.dtype == y.dtype and torch.equal(x, y), key
        else:
            assert json.loads((exported / name).read_text()) == json.loads((saved / name).read_text()), name


def test_export_of_a_zero2_checkpoint_equals_the_saved_student(zero2_run: Path, tmp_path: Path) -> None:
    step = zero2_run / "checkpoints" / f"step-{STEPS}"
    assert (step / "mp_rank_00_model_states.pt").is_file()  # ZeRO-2: the weights are in the partitions
    result = _export(str(step), "--out", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    _same_folder(tmp_path / "hf", zero2_run / "student")
    # The run's checkpoints folder: its newest complete checkpoint, into an empty --out.
    (tmp_path / "empty").mkdir()
    result = _export(str(zero2_run / "checkpoints"), "--out", str(tmp_path / "empty"))
    assert result.exit_code == 0, result.output
    _same_folder(tmp_path / "empty", zero2_run / "student")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf"]
    # A folder of the user's named like a stale partial export is not the export's to remove.
    (tmp_path / "mine.partial").mkdir()
    (tmp_path / "mine.partial" / "notes.txt").write_text("mine")
    assert _export(str(step), "--out", str(tmp_path / "mine")).exit_code == 0
    assert (tmp_path / "mine.partial" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf", "mine", "mine.partial"]
    # What a killed export left is removed by the next export to the same folder; a live export's is not.
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        (tmp_path / f".again.partial-{pid}-0123abcd").mkdir()
    assert _export(str(step), "--out", str(tmp_path / "again")).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob(".again.partial-*")) == [
        f".again.partial-{os.getpid()}-0123abcd"
    ]


def test_export_of_a_zero3_checkpoint_equals_the_saved_student(
    models_dir: Path, job_config: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    overrides = {"student_zero_stage": 3, "teacher_placement": "replicated"}
    config = job_config(models_dir, "llama", overrides, stage3_param_persistence_threshold=0)
    tied = json.loads((models_dir / "llama-student.json").read_text()) | {"tie_word_embeddings": True}
    (tmp_path / "tied.json").write_text(json.dumps(tied))
    config["student"] = str(tmp_path / "tied.json")
    out = _run(tmp_path, models_dir, config)
    assert (out / "checkpoints" / f"step-{STEPS}" / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()
    # The run folder: its newest complete checkpoint.
    result = _export(str(out), "--out", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"Exported step-{STEPS} of {out} to {tmp_path / 'hf'}"
    _same_folder(tmp_path / "hf", out / "student")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not (tmp_path / "hf.partial").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing written


def _refused(tmp_path: Path, source: Path | str, match: str, out: Path | None = None) -> None:
    out = out or tmp_path / "hf"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _export(str(source), "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd: error: ") and match in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_what_is_not_a_checkpoint_is_refused(zero2_run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", "is neither a run folder nor a checkpoint")
    (tmp_path / "file").write_text("x")
    _refused(tmp_path, tmp_path / "file", "is a file, not a checkpoint")
    _refused(tmp_path, tmp_path / "missing", "does not exist")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    _refused(tmp_path, zero2_run, "exists and is not empty", out=tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    run = _copy_run(zero2_run, tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    plan["inputs"]["config"]["student"] = "tiny-llama-teacher"  # a plan edited to name another student
    (run / "plan.json").write_text(json.dumps(plan))
    _refused(tmp_path, run, "it is not a checkpoint of this run's student")
    shutil.rmtree(run / "checkpoints")
    _refused(tmp_path, run, "has no checkpoints (it ran without --save-every)")


def test_incomplete_or_damaged_checkpoints_are_refused(zero2_run: Path, tmp_path: Path) -> None:
    run = _copy_run(zero2_run, tmp_path)
    step = run / "checkpoints" / f"step-{STEPS}"
    # `latest` on a checkpoint that is not there: the newest complete one, with a note.
    (run / "checkpoints" / "latest").write_text("step-9")
    result = _export(str(run), "--out", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"Note: {run / 'checkpoints' / 'latest'} names no complete checkpoint; exporting step-{STEPS}, "
        "the newest",
        f"Exported step-{STEPS} of {run} to {tmp_path / 'hf'}",
    ]
    shutil.rmtree(tmp_path / "hf")
    (step / "complete").unlink()  # a write that was interrupted
    _refused(tmp_path, step, "no `complete` marker")
    _refused(tmp_path, run, "holds no complete checkpoint")

    shutil.rmtree(run)
    run = _copy_run(zero2_run, tmp_path)
    step = run / "checkpoints" / f"step-{STEPS}"
    optim = step / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if not optim.is_file():
        optim = next(step.glob("*_optim_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])  # cut short
    _refused(tmp_path, step, f"{optim.name} has {len(data) // 2} bytes, not the {len(data)} written")
    optim.write_bytes(bytes(64) + data[64:])  # its zip header overwritten, same size: the marker cannot tell
    _refused(tmp_path, step, f"cannot read checkpoint {step}")


class _Payload:
    """Unpickling it creates the file `path`: what a hostile checkpoint could do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_a_checkpoint_file_that_would_run_code_is_refused(zero2_run: Path, tmp_path: Path) -> None:
    run = _copy_run(zero2_run, tmp_path)
    step = run / "checkpoints" / f"step-{STEPS}"
    marker = json.loads((step / "complete").read_text())
    model_states = step / "mp_rank_00_model_states.pt"
    ran = tmp_path.parent / f"{tmp_path.name}-payload-ran"
    state = torch.load(model_states, weights_only=False)
    state["payload"] = _Payload(ran)
    torch.save(state, model_states)
    marker["files"][model_states.name] = model_states.stat().st_size
    (step / "complete").write_text(json.dumps(marker))
    _refused(tmp_path, step, "could run code")
    assert not ran.exists()


def test_a_write_that_fails_exits_1_and_leaves_nothing(
    zero2_run: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from safetensors import SafetensorError
    from safetensors import torch as st

    def full(*args: Any, **kwargs: Any) -> None:  # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "serialize_file", full)
    result = _export(str(zero2_run), "--out", str(tmp_path / "hf"))
    assert result.exit_code == 1
    assert result.output.strip() == f"gkd: error: cannot write {tmp_path / 'hf'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
