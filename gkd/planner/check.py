"""`gkd check`: a memory-regression gate for CI.

A baseline file records what the plan of each config predicted: whether it fits, the peak bytes on the most
loaded GPU, the host bytes per node, the step time and the chosen strategy. `gkd check` plans every config
recorded in the baseline (`--baseline`, default `gkd-baseline.json` in the current folder) again and compares
it with its record:
- a regression: the job no longer fits, or its peak or host memory grew by more than the tolerance
  (default 1%);
- anything else passes (less memory, or a change within the tolerance) and is shown with its change. The step
  time is shown but not gated: it is an estimate.

Exit code 0 when nothing regressed, 1 when something did, 2 on bad input.
`gkd check CONFIG... --update` plans the configs and writes their records (creating the file); `--update`
with no CONFIG refreshes every record. The file is JSON, keyed by config path relative to the baseline's
folder, with "default" for the headline job, so it can be committed with the configs it guards: gkd's own
test suite runs `gkd check` on the repository's `gkd-baseline.json` (the headline job and every reference
config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from gkd.errors import InputError

BASELINE_VERSION = 1
DEFAULT_KEY = "default"  # the headline job (`gkd plan` with no arguments)
DEFAULT_BASELINE = "gkd-baseline.json"
GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class Record:
    """What one config's plan predicted."""

    fits: bool
    peak_bytes: int
    host_bytes: int
    step_seconds: float
    strategy: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "host_bytes": self.host_bytes,
            "step_seconds": self.step_seconds,
            "strategy": self.strategy,
        }


def _command(baseline: str, *args: str) -> str:
    """The `gkd check` command line that acts on `baseline`."""
    flag = [] if baseline == DEFAULT_BASELINE else ["--baseline", baseline]
    return "`" + " ".join(["gkd check", *args, *flag]) + "`"


def parse_tolerance(value: str | float) -> float:
    """A fraction from "1%", "0.5 %" or 0.01."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(
            f"--tolerance must be a percentage such as 1% or a fraction such as 0.01, got {value!r}"
        ) from None
    if not 0 <= fraction < 1:
        raise InputError(f"--tolerance must be at least 0% and below 100%, got {value!r}")
    return fraction


def _record(config_key: str, config_path: Path) -> Record:
    from gkd.config import default_config, load_config
    from gkd.planner.pipeline import plan

    config = default_config() if config_key == DEFAULT_KEY else load_config(config_path)
    result = plan(config)
    return Record(
        fits=result.fits,
        peak_bytes=result.peak_bytes,
        host_bytes=result.host_bytes,
        step_seconds=float(result.estimates.get("step_time_s", 0.0)),
        strategy=result.strategy.describe(),
    )


def _load(path: Path) -> dict[str, Record]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"cannot read the baseline {path}: {err.strerror}") from None
    except ValueError:
        raise InputError(
            f"the baseline {path} is not JSON; "
            f"recreate it with {_command(str(path), 'CONFIG...', '--update')}"
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("version") != BASELINE_VERSION
        or not isinstance(data.get("entries"), dict)
    ):
        raise InputError(
            f"the baseline {path} is not a version-{BASELINE_VERSION} gkd baseline; "
            f"recreate it with {_command(str(path), 'CONFIG...', '--update')}"
        )
    try:
        return {key: Record(**entry) for key, entry in data["entries"].items()}
    except TypeError:
        raise InputError(
            f"the baseline {path} has malformed entries; "
            f"recreate it with {_command(str(path), 'CONFIG...', '--update')}"
        ) from None


def _save(path: Path, records: dict[str, Record]) -> None:
    payload = {
        "version": BASELINE_VERSION,
        "entries": {key: records[key].to_dict() for key in sorted(records)},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)  # never a half-written baseline
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"cannot write the baseline {path}: {err.strerror}; choose a writable path"
        ) from None


def config_key(config: str, base_dir: Path) -> str:
    """The baseline key of a config path as given on the command line (relative to the baseline's folder)."""
    if config == DEFAULT_KEY:
        return DEFAULT_KEY
    path = Path(config).expanduser()
    if not path.is_file():
        raise InputError(f"config file {config!r} does not exist; give a YAML or JSON file or `default`")
    return os.path.relpath(path.resolve(), base_dir.resolve())


def _change(old: int, new: int) -> str:
    if old == new:
        return "same"
    if old == 0:
        return "new"
    return f"{(new - old) / old:+.1%}"


def compare(old: Record, new: Record, tolerance: float) -> list[str]:
    """Why `new` regressed from `old` (empty when it did not)."""
    reasons = []
    if old.fits and not new.fits:
        reasons.append("no longer fits")
    if new.peak_bytes > old.peak_bytes * (1 + tolerance):
        reasons.append(f"peak {_change(old.peak_bytes, new.peak_bytes)}")
    if new.host_bytes > old.host_bytes * (1 + tolerance):
        reasons.append(f"host memory {_change(old.host_bytes, new.host_bytes)}")
    return reasons


def run_check(baseline: str, configs: tuple[str, ...], *, update: bool, tolerance: str | float) -> int:
    """The body of `gkd check` (see the module docstring); returns the exit code."""
    path = Path(baseline).expanduser()
    base_dir = path.parent if str(path.parent) else Path(".")
    fraction = parse_tolerance(tolerance)
    if update and not path.parent.resolve().is_dir():
        raise InputError(f"cannot write the baseline {baseline}: its folder does not exist; create it first")
    if not path.exists() and not update:
        raise InputError(
            f"the baseline {baseline} does not exist; "
            f"create it with {_command(baseline, 'CONFIG...', '--update')}"
        )
    records = _load(path) if path.exists() else {}
    given = {config_key(c, base_dir): c for c in configs}
    keys = list(given) or sorted(records)
    if not keys:
        raise InputError(f"name the configs to record: {_command(baseline, 'CONFIG...', '--update')}")
    missing = [given[k] for k in keys if k not in records]
    if missing and not update:
        raise InputError(
            f"{', '.join(missing)} not in the baseline {baseline}; "
            f"add with {_command(baseline, *missing, '--update')}"
        )
    gone = [k for k in keys if k not in given and k != DEFAULT_KEY and not (base_dir / k).is_file()]
    if gone:
        raise InputError(
            f"the baseline {baseline} records configs that are gone: {', '.join(gone)}; restore them or "
            f"remove their entries from {baseline}"
        )
    regressions = 0
    click.echo(f"{'config':<48} {'fits':<11} {'peak/GPU':<26} {'host':<26} {'step s':<14} verdict")
    for key in keys:
        new = _record(key, Path(given[key]) if key in given else base_dir / key)
        old = records.get(key)
        if update:
            records[key] = new
        fits = f"{old.fits}->{new.fits}" if old is not None else str(new.fits)
        if old is None:
            peak, host, step = _gib(new.peak_bytes), _gib(new.host_bytes), f"{new.step_seconds:.2f}"
            verdict = "recorded"
        else:
            peak = f"{_gib(old.peak_bytes)}->{_gib(new.peak_bytes)} {_change(old.peak_bytes, new.peak_bytes)}"
            host = f"{_gib(old.host_bytes)}->{_gib(new.host_bytes)} {_change(old.host_bytes, new.host_bytes)}"
            step = f"{old.step_seconds:.2f}->{new.step_seconds:.2f}"
            reasons = compare(old, new, fraction)
            regressions += bool(reasons)
            verdict = ("REGRESSED: " + ", ".join(reasons)) if reasons else "ok"
            if update:
                verdict += " (updated)"
        click.echo(f"{key:<48} {fits:<11} {peak:<26} {host:<26} {step:<14} {verdict}")
    if update:
        _save(path, records)
        click.echo(f"baseline {baseline}: {len(keys)} record(s) written")
        return 0
    if regressions:
        click.echo(
            f"{regressions} of {len(keys)} config(s) regressed beyond {fraction:.1%}; "
            f"if the change is intended, record it with {_command(baseline, '--update')}",
            err=True,
        )
        return 1
    click.echo(f"no regression in {len(keys)} config(s) (tolerance {fraction:.1%})")
    return 0


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}Gi"
