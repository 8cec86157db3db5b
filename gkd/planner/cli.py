"""The body of `gkd plan`: load the config, apply flags, plan, print, write files, pick the exit code.

Exit codes: 0 the job fits; 1 it does not (the report lists the smallest changes that would fit, each found
by planning again); 2 bad input (raised as InputError and printed as one line by gkd.cli).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from gkd.config import Config, apply_flags, default_config, load_config
from gkd.errors import InputError


def as_config(value: Any) -> Config:
    """A Config from a Config, a path, a mapping, or None (the headline job)."""
    if value is None:
        return default_config()
    if isinstance(value, Config):
        return value
    if isinstance(value, str | Path):
        return load_config(value)
    if isinstance(value, Mapping):
        return Config.from_dict(value)
    raise InputError(f"cannot plan {type(value).__name__}; pass a Config, a config file path or a mapping")


# Image formats of `--plot`, chosen by the file name's suffix.
PLOT_FORMATS = (".png", ".svg", ".pdf")


def run_plan(
    config_path: str | None,
    *,
    methods: str | None = None,
    as_json: bool = False,
    output: str | None = None,
    plot: str | None = None,
    explain: bool = False,
    **flags: Any,
) -> int:
    from gkd.planner.pipeline import plan as make_plan
    from gkd.planner.report import render, suggest

    if plot and Path(plot).suffix.lower() not in PLOT_FORMATS:
        raise InputError(
            f"--plot {plot}: give a file name ending in {', '.join(PLOT_FORMATS)}; it sets the image format"
        )
    if config_path:
        config = load_config(config_path, gpus=flags.get("gpus"), global_batch=flags.get("global_batch"))
    else:
        config = default_config()
    config = apply_flags(config, methods=methods, **flags)
    if explain and not as_json:
        click.echo("Resolved config:")
        click.echo(config.to_json())
        click.echo("")
    result = make_plan(config)
    if output:
        result.write(output)  # atomically: a full disk leaves the old file whole
    if plot:
        from gkd.planner.plot import plot_timeline

        try:
            plot_timeline(result, plot)
        except OSError as err:
            raise InputError(
                f"cannot write the plot to {plot}: {err.strerror}; choose a writable path"
            ) from None
    if as_json:
        click.echo(result.to_json())
    else:
        click.echo(render(result, explain=explain))
    if result.fits:
        return 0
    changes = suggest(config, result)
    out = click.echo if not as_json else (lambda text: click.echo(text, err=True))
    out("")
    if changes:
        out("Does not fit. The smallest changes that fit (each re-planned):")
        for change in changes:
            out(f"  - {change}")
    else:
        out(
            "Does not fit, and none of the tried changes (host memory, sequence length, micro-batch, GPU "
            "count, "
            "a lighter method) fits either."
        )
    if as_json:
        click.echo(json.dumps({"suggestions": changes}), err=True)
    return 1
