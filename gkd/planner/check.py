"""`gkd check`: a memory-regression gate for CI.

A baseline file records what the plan of each config predicted: whether it fits, the peak bytes on the most
loaded GPU, the host bytes per node, the step time and the chosen strategy. `gkd check` plans every config
recorded in the baseline (`--baseline`, default `gkd-baseline.json` in the current folder) again and compares
it with its record:
- a regression: the job no longer fits, or its peak or host memory grew by more than the tolerance
  (default 1%);
- anything else passes (less memory, or a change within the tolerance) and is shown with its change. The step
  time is shown but not gated: it is an estimate.

`--measure` also runs each config, as `gkd run CONFIG --steps N` does (on 2 CPU processes without CUDA, one
process per GPU with it, planned for them), and reads the memory the run measured (OUT/run.json, see
`gkd.runtime.memory`): a regression too when the measured device peak exceeds the run's own prediction by
more than the tolerance (the plan under-promised), or grew by more than the tolerance against the record's
`measured_peak_bytes` (written by `--update --measure`). Meant for small configs: the repository's
`configs/measured/gkd-baseline.json` records three tiny jobs that tests/memory gates this way.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from gkd.errors import InputError, shown

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
    measured_peak_bytes: int = 0  # the device peak a run measured (`--update --measure`); 0: none recorded

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "host_bytes": self.host_bytes,
            "step_seconds": self.step_seconds,
            "strategy": self.strategy,
        }
        if self.measured_peak_bytes:
            out["measured_peak_bytes"] = self.measured_peak_bytes
        return out


@dataclass(frozen=True, kw_only=True)
class Measured:
    """What a short run of a config measured against its own plan (the plan `gkd run` made for it)."""

    predicted_bytes: int  # the run's plan: peak without its reserve
    peak_bytes: int  # the largest measured device peak over steps and ranks
    strategy: str


def measure(config_path: Path, *, steps: int) -> Measured:
    """Run the config for `steps` steps as `gkd run` does (its own processes, a temporary OUT) and read what
    it measured."""
    import contextlib
    import io
    import tempfile

    from gkd.runtime.executor import run_job

    with tempfile.TemporaryDirectory(prefix="gkd-check-") as tmp:
        out = Path(tmp) / "out"
        with contextlib.redirect_stdout(io.StringIO()):
            run_job(str(config_path), steps=steps, out=str(out), echo=lambda *_a, **_k: None)
        run = json.loads((out / "run.json").read_text())
    device = run["memory"]["device"]
    return Measured(
        predicted_bytes=int(device["predicted_peak_bytes"]),
        peak_bytes=int(device["measured_peak_bytes"]),
        strategy=run["strategy"],
    )


def compare_measured(old: Record | None, got: Measured, tolerance: float) -> list[str]:
    """Why a measured run regressed (empty when it did not): above its prediction, or above the record."""
    reasons = []
    if got.peak_bytes > got.predicted_bytes * (1 + tolerance):
        reasons.append(
            f"measured {_mib(got.peak_bytes)} exceeds the predicted {_mib(got.predicted_bytes)} by "
            f"{(got.peak_bytes - got.predicted_bytes) / got.predicted_bytes:.1%}"
        )
    if (
        old is not None
        and old.measured_peak_bytes
        and got.peak_bytes > old.measured_peak_bytes * (1 + tolerance)
    ):
        reasons.append(f"measured peak {_change(old.measured_peak_bytes, got.peak_bytes)}")
    return reasons


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
    records = {}
    for key, entry in data["entries"].items():
        try:
            records[key] = _read_record(entry)
        except (TypeError, ValueError) as err:
            raise InputError(
                f"the baseline {path} has a malformed entry for {shown(key)} ({err}); "
                f"recreate it with {_command(str(path), 'CONFIG...', '--update')}"
            ) from None
    return records


# Each field of a baseline record and the types it may hold (JSON has no int/float distinction for a
# figure like 10.0; a bool is an int to Python, so it is refused where a number is wanted).
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "fits": (bool,),
    "peak_bytes": (int,),
    "host_bytes": (int,),
    "step_seconds": (int, float),
    "strategy": (str,),
    "measured_peak_bytes": (int,),
}


def _read_record(entry: Any) -> Record:
    """A baseline record read as data: every field of the right type and not negative, else ValueError."""
    if not isinstance(entry, dict):
        raise ValueError("not a mapping")
    unknown = sorted(set(entry) - set(_RECORD_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {shown(unknown[0])}")
    for name, types in _RECORD_FIELDS.items():
        if name not in entry:
            if name == "measured_peak_bytes":
                continue
            raise ValueError(f"{name} is missing")
        value = entry[name]
        number = types != (bool,) and types != (str,)
        if not isinstance(value, types) or (number and (isinstance(value, bool) or value < 0)):
            raise ValueError(f"{name} is {shown(value)}")
    return Record(**entry)


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


def run_check(
    baseline: str,
    configs: tuple[str, ...],
    *,
    update: bool,
    tolerance: str | float,
    measure_steps: int = 0,
) -> int:
    """The body of `gkd check` (see the module docstring); returns the exit code. `measure_steps` > 0: also
    run each config for that many steps and gate what it measured (`--measure`)."""
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
    if measure_steps and DEFAULT_KEY in keys:
        raise InputError(
            "--measure runs each config, and the headline job is far too large to run here; give small "
            "configs (e.g. --baseline configs/measured/gkd-baseline.json)"
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
        config_path = Path(given[key]) if key in given else base_dir / key
        new = _record(key, config_path)
        old = records.get(key)
        measured = measure(config_path, steps=measure_steps) if measure_steps else None
        if measured is not None:
            new = replace(new, measured_peak_bytes=measured.peak_bytes)
        elif old is not None:
            new = replace(new, measured_peak_bytes=old.measured_peak_bytes)  # kept when not measured again
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
            if measured is not None:
                reasons += compare_measured(old, measured, fraction)
            regressions += bool(reasons)
            verdict = ("REGRESSED: " + ", ".join(reasons)) if reasons else "ok"
            if update:
                verdict += " (updated)"
        click.echo(f"{key:<48} {fits:<11} {peak:<26} {host:<26} {step:<14} {verdict}")
        if measured is not None:
            recorded = (
                f", recorded {_mib(old.measured_peak_bytes)}" if old and old.measured_peak_bytes else ""
            )
            click.echo(
                f"  measured {measure_steps} steps ({measured.strategy}): device peak "
                f"{_mib(measured.peak_bytes)}, predicted {_mib(measured.predicted_bytes)}{recorded}"
            )
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


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}Gi"
