"""Bad config files end in one line and exit code 2, quickly and in little memory: an alias bomb, invalid
UTF-8, sections of the wrong shape, sizes beyond any float, model names no file system takes, and a plan
file written over a full disk."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.errors import InputError, shown

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
HEAD = "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"


def _bomb(levels: int = 9) -> str:
    """The "billion laughs": each level a list of ten aliases of the one before (10**levels strings), as the
    value of `student`, which a message echoes when it is not a string."""
    items = ['&a0 ["lol"]']
    for i in range(1, levels + 1):
        items.append(f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "teacher: tiny-llama-teacher\nmethods: [kd]\nstudent: [" + ", ".join(items) + "]\n"


def _limit_memory() -> None:
    """In the child: at most 2 GiB of address space, so that a bomb that does go off fails quickly with a
    MemoryError instead of taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _plan(path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plan", str(path), *args])
    return result.exit_code, result.output


def test_shown_cuts_long_values() -> None:
    assert shown("abc") == "'abc'"
    long = shown("x" * 10_000)
    assert len(long) <= 90 and long.endswith("...")


def test_alias_bomb_exits_2_fast_and_small(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert len(bomb.read_bytes()) < 700
    start = time.monotonic()
    with (tmp_path / "err").open("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "gkd.cli", "plan", str(bomb)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            preexec_fn=_limit_memory,
        )
        # wait4 gives this child's own peak; RUSAGE_CHILDREN is the largest of every child this test process
        # (an xdist worker) ever waited for, 2-process runs of earlier tests included.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        err.seek(0)
        stderr = err.read()
    assert child.returncode == 2, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1 and "alias" in stderr
    assert seconds < 10  # the interpreter's start included; the bomb itself is refused at once
    assert usage.ru_maxrss < 200 * 1024, usage.ru_maxrss  # KiB


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        HEAD + "hardware: &hw {gpus: 2}\ntraining: {seq_len: 64, global_batch: 8}\noverrides: {}\n"
    )
    code, out = _plan(config)
    assert code in (0, 1), out


@pytest.mark.parametrize(
    "text, expected",
    [
        (HEAD.encode() + b"training: {seq_len: 6\xff4}\n", "not UTF-8"),
        (b"\xfe\xff" + HEAD.encode(), "not UTF-8"),
        (HEAD.encode() + b"training: 5\n", "training must be a mapping"),
        (HEAD.encode() + b"training: [1, 2]\n", "training must be a mapping"),
        (HEAD.encode() + b"hardware: 5\n", "hardware must be a mapping"),
        (HEAD.encode() + b"overrides: [1]\n", "overrides must be a mapping"),
        (HEAD.encode() + b"deepspeed: text\n", "deepspeed must be a mapping"),
        (HEAD.encode() + b"hardware: {gpu_memory: 1e400GiB}\n", "hardware.gpu_memory"),
        (HEAD.encode() + b"hardware: {gpu_memory: 1e400}\n", "hardware.gpu_memory"),
        (HEAD.encode() + b"hardware: {gpu_memory: 1e300TiB}\n", "hardware.gpu_memory"),
        (HEAD.encode() + b"hardware: {gpu_memory: .inf}\n", "hardware.gpu_memory"),
        (HEAD.encode() + b"hardware: {gpu_memory: .nan}\n", "hardware.gpu_memory"),
        (HEAD.encode() + b"hardware: {peak_flops: 1e400}\n", "hardware.peak_flops"),
        (HEAD.encode() + b"training: {lr: .nan}\n", "training.lr"),
        (HEAD.replace("tiny-llama-teacher", "t" * 5000).encode(), "teacher"),
        (HEAD.replace("tiny-llama-student", "s" * 300).encode(), "student"),
        (HEAD.replace("tiny-llama-student", '"a\\0b"').encode(), "student"),
        (HEAD.encode() + b"training: {seq_len: " + b"9" * 5000 + b"}\n", "5000 digits"),
        (HEAD.encode() + b"methods: [{name: kd, options: {temperature: " + b"9" * 5000 + b"}}]\n", ""),
    ],
    ids=lambda value: (
        value.decode("utf-8", "replace")[len(HEAD) - 8 :][:40] if isinstance(value, bytes) else None
    ),
)
def test_bad_files_end_in_one_line(tmp_path: Path, text: bytes, expected: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(text)
    code, out = _plan(config)
    assert code == 2, out[-3000:]
    assert len(out.strip().splitlines()) == 1 and expected in out
    assert len(out) < 600, out  # values are cut when echoed


def test_json_config_with_invalid_utf8(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_bytes(b'{"teacher": "tiny-\xff"}')
    code, out = _plan(config)
    assert code == 2 and "not UTF-8" in out and len(out.strip().splitlines()) == 1


def test_plan_output_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "plan.json"
    assert _plan(TINY, "--gpus", "2", "-o", str(out))[0] == 0
    good = out.read_bytes()
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if len(data) > 100:
            real_write(fd, bytes(data)[:100])  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    code, text = _plan(TINY, "--gpus", "2", "--global-batch", "16", "-o", str(out))
    monkeypatch.undo()
    assert code == 2 and "no space left on device" in text and len(text.strip().splitlines()) == 1
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_output_into_a_missing_folder_says_so(tmp_path: Path) -> None:
    """Not "free space there": the folder is missing, and nothing is written."""
    code, text = _plan(TINY, "--gpus", "2", "-o", str(tmp_path / "missing" / "plan.json"))
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "no such file or directory; choose a path in a writable folder" in text
    assert "free space" not in text
    assert list(tmp_path.iterdir()) == []


def test_load_config_refuses_the_bomb_in_process(tmp_path: Path) -> None:
    from gkd.config import load_config

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb(30))
    start = time.monotonic()
    with pytest.raises(InputError, match="alias"):
        load_config(bomb)
    assert time.monotonic() - start < 1


def test_paths_too_long_for_the_file_system(tmp_path: Path) -> None:
    long = str(tmp_path / ("a" * 5000))
    for args in (
        ["plan", long],
        ["run", long, "--out", str(tmp_path / "out")],
        ["run", str(TINY), "--data", long, "--out", str(tmp_path / "out")],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args[:2], result.output[-500:])
        assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 400
    assert not (tmp_path / "out").exists()
