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


# gkd in a child that writes its own peak resident set (VmHWM, in KiB) to argv[1] as it exits (gkd's entry
# point leaves through os._exit, so that is where). Not the
# child's ru_maxrss: that keeps the largest resident set the process ever had, and a child forked from this
# test process (an xdist worker of a few hundred MB) starts with the worker's before it execs.
_REPORTS_ITS_PEAK = """
import os, sys
from pathlib import Path

def exit_reporting_the_peak(code, exit=os._exit, report=Path(sys.argv[1])):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            report.write_text(line.split()[1])
    exit(code)

os._exit = exit_reporting_the_peak
sys.argv = ["gkd", *sys.argv[2:]]
from gkd.cli import entry
entry()
"""


def test_alias_bomb_exits_2_fast_and_small(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert len(bomb.read_bytes()) < 700
    peak_file = tmp_path / "peak"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _REPORTS_ITS_PEAK, str(peak_file), "plan", str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        preexec_fn=_limit_memory,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "alias" in done.stderr
    assert seconds < 10  # the interpreter's start included; the bomb itself is refused at once
    peak_kib = int(peak_file.read_text())
    assert peak_kib < 200 * 1024, peak_kib


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
