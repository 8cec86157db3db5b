"""The `gkd` command line: plan, run, check, inspect, methods.

Each command is a thin wrapper: it parses flags, calls the library, and prints. Errors the user can fix
(`gkd.errors.InputError`) become one line on stderr and exit code 2; a job that does not fit exits with 1.
New knobs belong in the config file, not in new flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from gkd.errors import InputError


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn InputError (and unreadable files) into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            click.echo(f"gkd: error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gkd")
def main() -> None:
    """gkd: knowledge distillation for large language models, planned to fit your GPUs."""


@main.command()
@click.argument("model")
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True, help="Sequence length.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batch size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_user_errors
def inspect(model: str, seq_len: int, micro_batch: int, as_json: bool) -> None:
    """Describe MODEL (preset name, config.json or checkpoint folder): parameters, activations, taps."""
    from gkd.planner.inspect import run_inspect

    run_inspect(model, seq_len=seq_len, micro_batch=micro_batch, as_json=as_json)


if __name__ == "__main__":
    main()
