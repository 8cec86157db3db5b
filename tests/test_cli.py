"""The CLI's contract for usage errors: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gkd.cli import main


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["inspect", "gpt2", "--seq-len", "x"], "--seq-len"),
        (["inspect", "gpt2", "--micro-batch", "0"], "--micro-batch"),
        (["inspect"], "MODEL"),
        (["nosuch"], "nosuch"),
        (["plan", "--bogus"], "--bogus"),
        (["methods", "kd", "extra"], "extra"),
        # A seed beyond 64 bits failed in a worker ("Overflow when unpacking long long").
        (["run", "no-such-config.yaml", "--seed", "99999999999999999999"], "--seed"),
        (["run", "no-such-config.yaml", "--seed", "-1"], "--seed"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gkd: error: ") and expected in lines[0]
    assert "Traceback" not in result.output


def test_help_and_version_exit_0() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    assert runner.invoke(main, ["plan", "--help"]).exit_code == 0
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and "version" in version.output


def test_plan_help_names_what_each_flag_takes() -> None:
    """The flags read as text (so config validation words their errors) show a metavar, not TEXT."""
    out = CliRunner().invoke(main, ["plan", "--help"]).output
    assert "TEXT" not in out
    for flag in ("--gpus N", "--seq-len N", "--global-batch N", "--gpu-memory SIZE", "--micro-batch N|"):
        assert flag in out, flag
