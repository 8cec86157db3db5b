"""`gkd run`'s robustness at its edges: OUT changing under a finished run, SIGTERM, `--eval-batches` beyond
the held-out data, checkpoint folders with bad weights, the tokenizer saved with the student and the saved
files' modes, and fix suggestions that `gkd run` can follow.

Most tests replace the workers with a stand-in (as tests/e2e/test_executor.py does); two run real 2-process
jobs of 2 steps: one stopped with SIGTERM, one from checkpoint folders with a tokenizer."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import gkd.runtime.executor as executor
import gkd.runtime.publishing as publishing
import gkd.runtime.signals as signals
from gkd.cli import main
from gkd.config import Config
from gkd.planner.pipeline import plan as make_plan
from gkd.runtime.engines import check_weights
from gkd.runtime.launch import WorkerFailedError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plan_file(models_dir: Path, job_config: Any, tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(make_plan(Config.from_dict(job_config(models_dir, "llama", {}))).to_json())
    return path


def _fake_launch(*, during: Any = None, error: BaseException | None = None, checkpoint: bool = False) -> Any:
    """Workers that write a finished run's files into the run's folder, call `during(settings)`, and raise
    `error` if given."""
    seen: list[Any] = []

    def launch(fn: Any, args: Any, *, processes: int, cpu_ops: Any = ()) -> None:
        settings = args[1]
        seen.append(settings)
        folder = Path(settings.out)
        (folder / "student").mkdir()
        (folder / "student" / "model.safetensors").write_text("weights")
        (folder / "log.jsonl").write_text('{"step": 1}\n')
        if checkpoint:  # a complete one, as a resume checks it before anything else
            import json

            import torch

            from gkd.runtime.checkpoints import COMPLETE

            step = folder / "checkpoints" / "step-1"
            step.mkdir(parents=True)
            for rank in range(processes):
                torch.save({"rank": rank}, step / f"rng-rank{rank}.pt")
            files = {p.name: p.stat().st_size for p in step.iterdir()}
            (step / COMPLETE).write_text(json.dumps({"files": files, "world": processes}))
            (folder / "checkpoints" / "latest").write_text("step-1")
        if during is not None:
            during(settings)
        if error is not None:
            raise error

    launch.seen = seen  # type: ignore[attr-defined]
    return launch


def _run(plan_file: Path, out: Path, **options: Any) -> Path:
    return executor.run_job(
        str(plan_file), out=str(out), processes=2, steps=2, echo=lambda _: None, **options
    )


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob(".*.partial-*"))


def _one_line(result: Any, code: int, expected: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd: error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# 1. A finished run is never removed because OUT cannot take it


def test_out_written_to_during_the_run_keeps_the_result(
    plan_file: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    out = tmp_path / "out"
    out.mkdir()  # empty: allowed

    def meanwhile(settings: Any) -> None:
        (out / "notes.txt").write_text("x")  # someone writes into OUT while the workers run

    monkeypatch.setattr(executor, "launch", _fake_launch(during=meanwhile))
    result = CliRunner().invoke(main, ["run", str(plan_file), "--out", str(out), "--steps", "2"])
    line = _one_line(result, 1, "is not empty")
    [kept] = _partials(tmp_path)
    assert str(kept) in line and "the run finished" in line
    assert (kept / "student" / "model.safetensors").read_text() == "weights"
    assert (kept / "log.jsonl").is_file() and (kept / "run.json").is_file()
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_empty_out_that_cannot_be_replaced_keeps_the_result(
    plan_file: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rename = Path.rename

    def busy(self: Path, target: Any) -> Any:
        if Path(target) == out:  # e.g. OUT is a mount point
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self), str(target))
        return rename(self, target)

    monkeypatch.setattr(executor, "launch", _fake_launch())
    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(publishing.OutputKeptError, match="cannot be replaced") as caught:
        _run(plan_file, out)
    [kept] = _partials(tmp_path)
    assert str(kept) in str(caught.value) and (kept / "student" / "model.safetensors").is_file()
    assert out.is_dir() and not any(out.iterdir())


def test_publish_replaces_an_empty_out_and_refuses_a_full_one(tmp_path: Path) -> None:
    tmp, out = tmp_path / ".out.partial-1", tmp_path / "out"
    tmp.mkdir()
    (tmp / "log.jsonl").write_text("row\n")
    out.mkdir()
    (out / "late.txt").write_text("x")
    with pytest.raises(publishing.OutputKeptError, match=f"kept in {tmp}"):
        publishing.publish(tmp, out)
    assert (tmp / "log.jsonl").is_file() and (out / "late.txt").is_file()
    (out / "late.txt").unlink()
    publishing.publish(tmp, out)  # an empty OUT is replaced
    assert (out / "log.jsonl").read_text() == "row\n" and not tmp.exists()


def test_a_failure_after_a_checkpoint_keeps_the_checkpoints_when_out_is_taken(
    plan_file: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    out = tmp_path / "out"

    def meanwhile(settings: Any) -> None:
        out.mkdir()
        (out / "other.txt").write_text("x")

    failure = WorkerFailedError("worker 1 failed: RuntimeError: oom")
    monkeypatch.setattr(executor, "launch", _fake_launch(during=meanwhile, error=failure, checkpoint=True))
    with pytest.raises(
        publishing.OutputKeptError, match="oom; .* resume with `gkd run --resume --out "
    ) as err:
        _run(plan_file, out)
    [kept] = _partials(tmp_path)
    assert f"--out {kept}`" in str(err.value) and (kept / "checkpoints" / "latest").is_file()


# ----------------------------------------------------------------------------------------------------------
# 2. --eval-batches is capped at one pass over the held-out data


def test_eval_batches_are_capped_at_one_pass_of_the_held_out_data(
    plan_file: Path, models_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from gkd.planner.plan import Plan
    from gkd.planner.specs import load_spec
    from gkd.runtime.data import load_tokenizer, prepare_tokens

    plan = Plan.from_json(plan_file.read_text())
    config = plan.inputs["config"]
    tokenizer = load_tokenizer(config["teachers"][0], load_spec(config["teachers"][0]))
    held_out = models_dir / "corpus.txt"
    rows = prepare_tokens(str(held_out), tokenizer)[0].tokens // config["training"]["seq_len"]
    one_pass = rows // (2 * plan.strategy.micro_batch)
    assert 8 < one_pass < 100_000

    fake = _fake_launch()
    monkeypatch.setattr(executor, "launch", fake)
    out = _run(plan_file, tmp_path / "out", eval_data=str(held_out), eval_batches=100_000)
    [settings] = fake.seen
    assert settings.eval_batches == one_pass
    assert any(f"the {one_pass} micro-batches per process" in note for note in settings.notes)
    assert json.loads((out / "run.json").read_text())["eval_batches"] == one_pass

    fake = _fake_launch()
    monkeypatch.setattr(executor, "launch", fake)
    _run(plan_file, tmp_path / "out2", eval_data=str(held_out), eval_batches=3)
    assert fake.seen[0].eval_batches == 3 and not any("--eval-batches" in n for n in fake.seen[0].notes)


# ----------------------------------------------------------------------------------------------------------
# 3. SIGTERM in the parent cleans up as Ctrl-C and failures do


@pytest.fixture
def sigterm_guard() -> Any:
    """SIGTERM raises here while a test sends it to itself, so that a run that does not handle it fails the
    test instead of killing pytest."""

    def unhandled(signum: int, frame: Any) -> None:
        raise AssertionError("SIGTERM reached the test: the run installed no handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


def _sigterm_self(settings: Any) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends
    raise AssertionError("SIGTERM did not stop the run")


def test_sigterm_removes_a_run_without_checkpoints(
    plan_file: Path, tmp_path: Path, monkeypatch: Any, sigterm_guard: Any
) -> None:
    monkeypatch.setattr(executor, "launch", _fake_launch(during=_sigterm_self))
    with pytest.raises(SystemExit) as done:
        _run(plan_file, tmp_path / "out")
    assert done.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "out").exists() and not _partials(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # restored after the run


def test_sigterm_after_a_checkpoint_publishes_out_to_resume(
    plan_file: Path, tmp_path: Path, monkeypatch: Any, capsys: Any, sigterm_guard: Any
) -> None:
    monkeypatch.setattr(executor, "launch", _fake_launch(during=_sigterm_self, checkpoint=True))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        _run(plan_file, out)
    assert (out / "checkpoints" / "latest").is_file() and not _partials(tmp_path)
    assert f"stopped by SIGTERM; resume from its last checkpoint with `gkd run --resume --out {out}`" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ctrl_c_is_one_line_and_exit_130(
    plan_file: Path, tmp_path: Path, monkeypatch: Any, checkpoint: bool
) -> None:
    """Ctrl-C ends as SIGTERM does: one line saying what became of the run, the shell's status for SIGINT
    (not click's blank line, "gkd: aborted" and exit 1)."""
    monkeypatch.setattr(executor, "launch", _fake_launch(error=KeyboardInterrupt(), checkpoint=checkpoint))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(plan_file), "--out", str(out), "--steps", "2"])
    assert result.exit_code == 128 + signal.SIGINT, result.output
    expected = (
        f"gkd: interrupted; resume from its last checkpoint with `gkd run --resume --out {out}`"
        if checkpoint
        else "gkd: interrupted; the unfinished run was removed"
    )
    assert result.stderr.splitlines() == [expected]
    assert out.exists() == checkpoint and not _partials(tmp_path)
    if checkpoint:  # and a resume stopped by Ctrl-C says how to go on
        monkeypatch.setattr(
            executor, "load_or_plan", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        )
        result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
        assert result.exit_code == 128 + signal.SIGINT and result.stderr.splitlines() == ["gkd: interrupted"]


def test_a_resume_checks_the_host_memory_before_any_worker_starts(
    plan_file: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """As a new run does: the machine a run is resumed on may have less memory than the one it started on."""
    import gkd.runtime.engines as engines

    monkeypatch.setattr(executor, "launch", _fake_launch(error=KeyboardInterrupt(), checkpoint=True))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):  # stopped after a checkpoint: OUT is published, to resume
        _run(plan_file, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(engines, "available_host_memory", lambda: 1 << 20)
    result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
    line = _one_line(result, 2, "of host memory here")
    assert "1.0 MiB of memory available" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_resume_checks_what_this_machine_runs(
    plan_file: Path, tmp_path: Path, monkeypatch: Any, models_dir: Path, job_config: Any
) -> None:
    """A float16 run (made on a GPU machine) resumed without CUDA is refused before any worker starts."""
    monkeypatch.setattr(executor, "launch", _fake_launch(error=KeyboardInterrupt(), checkpoint=True))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        _run(plan_file, out)
    config = job_config(models_dir, "llama", {})
    config["training"]["dtype"] = "float16"
    (out / "plan.json").write_text(make_plan(Config.from_dict(config)).to_json())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine: no CUDA
    result = CliRunner().invoke(main, ["run", "--resume", "--out", str(out)])
    _one_line(result, 2, "training.dtype float16 needs CUDA")


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch: Any) -> None:
    import gkd.planner.inspect as inspect

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect, "run_inspect", interrupted)
    result = CliRunner().invoke(main, ["inspect", "tiny-llama-student"])
    assert result.exit_code == 128 + signal.SIGINT and result.stderr.splitlines() == ["gkd: interrupted"]


def test_a_forked_worker_keeps_the_default_sigterm_action() -> None:
    with signals.sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        pid = os.fork()
        if pid == 0:  # the child: as a worker forked by the launcher
            os._exit(0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:  # the parent pid, after the state
            found.append(int(stat.parent.name))
    return found


def test_sigterm_to_a_real_run_leaves_nothing(tmp_path: Path) -> None:
    """A real 2-process run, its parent sent SIGTERM once the first step is logged: exit 143, no OUT, no
    temporary folder, no worker left running."""
    out = tmp_path / "run"
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--steps", "500", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # only the parent is signalled, as `kill PID` does
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            logs = [p / "log.jsonl" for p in _partials(tmp_path)]
            if any(log.is_file() and log.read_text().strip() for log in logs):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        workers = _children(proc.pid)
        assert workers, "the run has no workers"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not _partials(tmp_path)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()]


# ----------------------------------------------------------------------------------------------------------
# 4. Bad weights are refused before any worker starts


def _llama(layers: int, hidden: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
    }


def _save(folder: Path, config: dict[str, Any], *, tokenizer: bool = False) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields)).save_pretrained(
        folder
    )
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        lines = (ROOT / "tests" / "e2e" / "conftest.py").read_text().splitlines()
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
        fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    _save(root / "teacher", _llama(2, 64), tokenizer=True)
    _save(root / "student", _llama(2, 32))
    return root


def _job(folder: Path, teacher: Path, student: Path) -> Path:
    path = folder / "job.json"
    job = {
        "teacher": str(teacher),
        "student": str(student),
        "methods": [{"name": "kd"}],
        "hardware": {"gpu_memory": "8GiB", "cuda_context": "64MiB"},
        "training": {"seq_len": 32, "global_batch": 4, "micro_batch": [2], "steps": 2},
    }
    path.write_text(json.dumps(job))
    return path


def test_damaged_or_foreign_weights_exit_2_naming_the_file(checkpoints: Path, tmp_path: Path) -> None:
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints / "teacher", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    foreign = tmp_path / "foreign"  # the teacher's config.json next to the student's weights
    foreign.mkdir()
    shutil.copy(checkpoints / "teacher" / "config.json", foreign)
    shutil.copy(checkpoints / "student" / "model.safetensors", foreign)
    out = tmp_path / "out"
    for teacher, expected in (
        (corrupt, f"cannot read the weights file {corrupt / 'model.safetensors'}"),
        (foreign, f"{foreign / 'model.safetensors'} holds model.embed_tokens.weight of shape [512, 32]"),
    ):
        job = _job(tmp_path, teacher, checkpoints / "student")
        result = CliRunner().invoke(main, ["run", str(job), "--out", str(out), "--processes", "2"])
        _one_line(result, 2, expected)
        assert not out.exists() and not _partials(tmp_path)


def test_check_weights_reads_headers_shards_and_bin_files(checkpoints: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from gkd.errors import InputError
    from gkd.planner.specs import load_spec

    teacher = checkpoints / "teacher"
    check_weights(str(teacher), load_spec(str(teacher)))
    # Sharded: an index naming a shard that is missing.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(teacher / "config.json", sharded)
    state = load_file(teacher / "model.safetensors")
    names = sorted(state)
    save_file({k: state[k] for k in names[:3]}, sharded / "model-1.safetensors")
    weight_map = {k: "model-1.safetensors" if i < 3 else "model-2.safetensors" for i, k in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match="lists the weights file model-2.safetensors"):
        check_weights(str(sharded), load_spec(str(sharded)))
    save_file({k: state[k] for k in names[3:]}, sharded / "model-2.safetensors")
    check_weights(str(sharded), load_spec(str(sharded)))
    # A .bin without the base model's prefix (saved from the bare model) is matched; a wrong shape is not.
    binary = tmp_path / "binary"
    binary.mkdir()
    shutil.copy(teacher / "config.json", binary)
    bare = {k.removeprefix("model."): v for k, v in state.items()}
    torch.save(bare, binary / "pytorch_model.bin")
    check_weights(str(binary), load_spec(str(binary)))
    bare["norm.weight"] = torch.zeros(3)
    torch.save(bare, binary / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"holds norm.weight of shape \[3\]"):
        check_weights(str(binary), load_spec(str(binary)))
    (binary / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read the weights file .*pytorch_model.bin"):
        check_weights(str(binary), load_spec(str(binary)))


# ----------------------------------------------------------------------------------------------------------
# 5. The tokenizer: a note when a teacher with weights has none; saved with the student; usual file modes


def test_a_teacher_with_weights_but_no_tokenizer_gets_a_note(
    checkpoints: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    fake = _fake_launch()
    monkeypatch.setattr(executor, "launch", fake)
    lines: list[str] = []
    job = _job(tmp_path, checkpoints / "student", checkpoints / "student")  # weights, no tokenizer files
    executor.run_job(str(job), out=str(tmp_path / "out"), processes=2, echo=lines.append)
    assert any(line.startswith("Note: teacher") and "no tokenizer files" in line for line in lines), lines
    assert any("no tokenizer files" in note for note in fake.seen[0].notes)


def test_the_student_is_saved_with_the_teachers_tokenizer_and_usual_modes(
    checkpoints: Path, tmp_path: Path
) -> None:
    """A real 2-step run from checkpoint folders, the teacher's holding a tokenizer."""
    from transformers import AutoTokenizer

    job = _job(tmp_path, checkpoints / "teacher", checkpoints / "student")
    out = tmp_path / "out"
    mask = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["run", str(job), "--out", str(out), "--processes", "2"])
    finally:
        os.umask(mask)
    assert result.exit_code == 0, result.output
    assert "no tokenizer files" not in result.output
    student = out / "student"
    assert (student / "tokenizer.json").read_bytes() == (
        checkpoints / "teacher" / "tokenizer.json"
    ).read_bytes()
    teacher_tok = AutoTokenizer.from_pretrained(checkpoints / "teacher")
    assert AutoTokenizer.from_pretrained(student)("the fox").input_ids == teacher_tok("the fox").input_ids
    modes = {p.name: p.stat().st_mode & 0o777 for p in student.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


# ----------------------------------------------------------------------------------------------------------
# 6. Fix suggestions `gkd run` can follow


def test_processes_that_do_not_divide_the_global_batch(tmp_path: Path) -> None:
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--processes", "3", "--out", str(tmp_path / "o")]
    line = _one_line(CliRunner().invoke(main, args), 2, "set training.global_batch in the config")
    assert "--global-batch" not in line and "--processes 2" in line
    assert not (tmp_path / "o").exists()
