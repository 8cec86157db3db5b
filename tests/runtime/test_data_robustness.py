"""Bad training data ends in one line (InputError), not a traceback or gigabytes: JSON lines with a lone
surrogate, 200,000-deep nesting or a 5,000-digit integer; a FIFO or a device named as data; a document
beyond the size limit (GKD_MAX_DOCUMENT_BYTES); and a tokenizing run killed midway leaves nothing behind for
good."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gkd.errors import InputError
from gkd.runtime import data, tokens
from gkd.runtime.data import ByteTokenizer, prepare_tokens


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("GKD_CACHE_DIR", str(folder))
    return folder


def _prepare(path: Path) -> str:
    with pytest.raises(InputError) as err:
        prepare_tokens(str(path), ByteTokenizer())
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    return message


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"text": "ok \\ud800 there"}', "surrogate"),
        ('{"text": "x", "deep": ' + "[" * 200_000 + "]" * 200_000 + "}", "nests"),
        ('{"text": "x"} trailing', "not valid JSON"),
    ],
    ids=["surrogate", "deep", "trailing"],
)
def test_bad_json_lines(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    message = _prepare(path)
    assert expected in message and "line 2" in message, message


def test_a_5000_digit_integer_beside_the_text_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "abc", "n": ' + "9" * 5000 + "}\n")
    stored, _ = prepare_tokens(str(path), ByteTokenizer())
    assert stored.tokens == 4


def test_a_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    message = _prepare(fifo)
    assert "not a regular file" in message


def test_a_device_is_not_a_regular_file() -> None:
    message = _prepare(Path("/dev/zero"))
    assert "not a regular file" in message


def test_a_document_beyond_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "4KiB")
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "short"}\n{"text": "' + "a" * 10_000 + '"}\n')
    message = _prepare(path)
    assert "line 2" in message and "GKD_MAX_DOCUMENT_BYTES" in message and "4.0 KiB" in message
    text = tmp_path / "data.txt"
    text.write_text("b" * 10_000)  # one line without a newline: one document
    assert "GKD_MAX_DOCUMENT_BYTES" in _prepare(text)
    # Below the limit it is read as before.
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "64KiB")
    stored, built = prepare_tokens(str(path), ByteTokenizer())
    assert built and stored.tokens == len("short") + 1 + 10_000 + 1


def test_the_limit_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.max_document_bytes() == 64 << 20
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "lots")
    with pytest.raises(InputError, match="GKD_MAX_DOCUMENT_BYTES"):
        data.max_document_bytes()


def test_a_bare_limit_is_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """GKD_MAX_DOCUMENT_BYTES=1000 is 1000 bytes (a config's bare small size is GiB: it was 1000 GiB)."""
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "1000")
    assert data.max_document_bytes() == 1000
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "2KiB")
    assert data.max_document_bytes() == 2048


def test_a_bad_limit_is_refused_when_the_ids_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is read when the source was tokenized before; the setting is refused all the same."""
    path = tmp_path / "data.txt"
    path.write_text("one\ntwo\n")
    assert prepare_tokens(str(path), ByteTokenizer())[1]
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "lots")
    with pytest.raises(InputError, match="GKD_MAX_DOCUMENT_BYTES 'lots' is not a size"):
        prepare_tokens(str(path), ByteTokenizer())


def test_a_long_line_is_never_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is applied while reading: a line 100x the limit costs about the limit, not the line."""
    monkeypatch.setenv("GKD_MAX_DOCUMENT_BYTES", "1MiB")
    path = tmp_path / "data.jsonl"
    with path.open("w") as f:
        f.write('{"text": "')
        for _ in range(100):
            f.write("a" * (1 << 20))
        f.write('"}\n')
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self.f = f

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *args):  # type: ignore[no-untyped-def]
            self.f.close()

        def readline(self, size: int = -1) -> bytes:
            line = self.f.readline(size)
            reads.append(len(line))
            return line

        def __iter__(self):  # type: ignore[no-untyped-def]
            for line in self.f:
                reads.append(len(line))
                yield line

    monkeypatch.setattr(data, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    assert "GKD_MAX_DOCUMENT_BYTES" in _prepare(path)
    assert max(reads) <= (1 << 20) + 1


def test_partial_files_of_dead_runs_are_removed(own_cache: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = own_cache / "tokens"
    folder.mkdir(parents=True)
    stale = folder / f"{'0' * 32}.bin.partial-{dead.pid}"
    stale.write_bytes(b"\0" * 100)
    alive = folder / f"{'1' * 32}.bin.partial-{os.getpid()}"  # this process: a build in progress
    alive.write_bytes(b"\0" * 100)
    source = tmp_path / "data.txt"
    source.write_text("some text\n")
    prepare_tokens(str(source), ByteTokenizer())
    assert not stale.exists() and alive.exists()


def test_killed_while_tokenizing_leaves_nothing_for_good(tmp_path: Path, own_cache: Path) -> None:
    """A run killed (SIGKILL) while it tokenizes leaves its partial file; the next run removes it."""
    source = tmp_path / "data.txt"
    source.write_text("words and more words\n" * 200_000)
    script = (
        "import os, signal\n"
        "from gkd.runtime import tokens\n"
        "from gkd.runtime.data import ByteTokenizer, prepare_tokens\n"
        "real = tokens.np.ndarray.tofile\n"
        "class Dying(ByteTokenizer):\n"
        "    n = 0\n"
        "    def encode_batch(self, texts):\n"
        "        Dying.n += 1\n"
        "        if Dying.n == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return super().encode_batch(texts)\n"
        f"prepare_tokens({str(source)!r}, Dying())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ}, timeout=120)
    assert done.returncode == -9
    left = list((own_cache / "tokens").glob("*.partial-*"))
    assert left  # the killed run could not clean up after itself
    prepare_tokens(str(source), ByteTokenizer())
    assert not list((own_cache / "tokens").glob("*.partial-*"))
    assert tokens.token_dir() == own_cache / "tokens"
