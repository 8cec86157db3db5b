"""`gkd check` on tiny models: --update records, an unchanged plan passes, memory growth beyond the tolerance
and a job that stops fitting fail with exit 1, bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.errors import InputError
from gkd.planner.check import parse_tolerance

TINY = """\
teacher: tiny-llama-teacher
student: tiny-llama-student
methods: [kd, minilmv2]
hardware: {gpus: 2, gpu_memory: 1GiB, host_memory: 1GiB, cuda_context: 0}
training: {seq_len: 64, global_batch: 4}
"""


def check(*args: object):
    """`gkd check ARGS... --baseline base.json` (the folder fixture's working directory)."""
    args_ = list(map(str, args))
    if "--baseline" not in args_:
        args_ += ["--baseline", "base.json"]
    return CliRunner().invoke(main, ["check", *args_])


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "small.yaml").write_text(TINY.replace("gpu_memory: 1GiB", "gpu_memory: 256KiB"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edit(path: Path, key: str, **fields: object) -> None:
    data = json.loads(path.read_text())
    data["entries"][key].update(fields)
    path.write_text(json.dumps(data))


def test_update_then_check_passes(folder: Path) -> None:
    r = check("tiny.yaml", "--update")
    assert r.exit_code == 0, r.output
    data = json.loads((folder / "base.json").read_text())
    assert data["version"] == 1 and set(data["entries"]) == {"tiny.yaml"}
    entry = data["entries"]["tiny.yaml"]
    assert entry["fits"] is True and entry["peak_bytes"] > 0 and "ZeRO" in entry["strategy"]
    r = check()
    assert r.exit_code == 0, r.output
    assert "no regression in 1 config" in r.output and " ok" in r.output


def test_memory_growth_beyond_the_tolerance_fails(folder: Path) -> None:
    assert check("tiny.yaml", "--update").exit_code == 0
    recorded = json.loads((folder / "base.json").read_text())["entries"]["tiny.yaml"]["peak_bytes"]
    edit(folder / "base.json", "tiny.yaml", peak_bytes=int(recorded / 1.05))  # now 5% above the record
    r = check()
    assert r.exit_code == 1
    assert "REGRESSED: peak +5.0%" in r.output and "--update" in r.output
    assert check("--tolerance", "6%").exit_code == 0
    assert check("--tolerance", "0.04").exit_code == 1
    # Less memory than recorded is never a regression.
    edit(folder / "base.json", "tiny.yaml", peak_bytes=recorded * 2)
    assert check("--tolerance", "0%").exit_code == 0


def test_a_job_that_stops_fitting_fails(folder: Path) -> None:
    assert check("small.yaml", "--update").exit_code == 0
    data = json.loads((folder / "base.json").read_text())
    assert data["entries"]["small.yaml"]["fits"] is False  # 256 KiB per GPU: the job does not fit
    assert check().exit_code == 0  # not fitting, as recorded
    edit(folder / "base.json", "small.yaml", fits=True)
    r = check()
    assert r.exit_code == 1 and "no longer fits" in r.output


def test_update_without_configs_refreshes_every_record(folder: Path) -> None:
    assert check("tiny.yaml", "small.yaml", "--update").exit_code == 0
    edit(folder / "base.json", "tiny.yaml", peak_bytes=1)
    r = check("--update")
    assert r.exit_code == 0 and "2 record(s) written" in r.output
    assert json.loads((folder / "base.json").read_text())["entries"]["tiny.yaml"]["peak_bytes"] > 1
    assert check("--tolerance", "0%").exit_code == 0


@pytest.mark.parametrize(
    ("setup", "args", "fragment"),
    [
        (None, ["--baseline", "missing.json"], "does not exist"),
        ("{", ["--baseline", "bad.json"], "not JSON"),
        ('{"version": 7, "entries": {}}', ["--baseline", "bad.json"], "version-1"),
        ('{"version": 1, "entries": {"x.yaml": {"fits": 1}}}', ["--baseline", "bad.json"], "malformed"),
        ('{"version": 1, "entries": {}}', ["tiny.yaml", "--baseline", "bad.json"], "not in the baseline"),
        (
            '{"version": 1, "entries": {}}',
            ["nope.yaml", "--baseline", "bad.json", "--update"],
            "does not exist",
        ),
        ('{"version": 1, "entries": {}}', ["--baseline", "bad.json", "--tolerance", "lots"], "--tolerance"),
        ('{"version": 1, "entries": {}}', ["--baseline", "bad.json", "--update"], "name the configs"),
        (
            '{"version": 1, "entries": {"gone.yaml": {"fits": true, "peak_bytes": 1, "host_bytes": 1, '
            '"step_seconds": 1.0, "strategy": "s"}}}',
            ["--baseline", "bad.json"],
            "records configs that are gone: gone.yaml",
        ),
    ],
)
def test_bad_input_exit_2_one_line(folder: Path, setup: str | None, args: list[str], fragment: str) -> None:
    if setup is not None:
        (folder / "bad.json").write_text(setup)
    r = check(*args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.output
    assert not (folder / "missing.json").exists()
    if setup is not None:
        assert (folder / "bad.json").read_text() == setup  # nothing rewritten


def test_default_baseline_is_gkd_baseline_json(folder: Path) -> None:
    r = CliRunner().invoke(main, ["check"])
    assert r.exit_code == 2 and "gkd-baseline.json does not exist" in r.output
    assert "`gkd check CONFIG... --update`" in r.output
    assert CliRunner().invoke(main, ["check", "tiny.yaml", "--update"]).exit_code == 0
    assert (folder / "gkd-baseline.json").is_file()
    assert CliRunner().invoke(main, ["check"]).exit_code == 0


def test_unwritable_baseline_is_one_line_and_leaves_nothing(folder: Path) -> None:
    r = check("tiny.yaml", "--update", "--baseline", folder / "no-such-dir" / "base.json")
    assert r.exit_code == 2 and "cannot write the baseline" in r.output.strip().splitlines()[-1]
    assert not (folder / "no-such-dir").exists()


def test_tolerance_parsing() -> None:
    assert parse_tolerance("1%") == pytest.approx(0.01)
    assert parse_tolerance("0.5 %") == pytest.approx(0.005)
    assert parse_tolerance(0.02) == pytest.approx(0.02)
    for bad in ("-1%", "100%", "x"):
        with pytest.raises(InputError, match="tolerance"):
            parse_tolerance(bad)


@pytest.mark.parametrize(
    "fields",
    [
        {"peak_bytes": "big"},
        {"fits": "yes"},
        {"step_seconds": None},
        {"strategy": 5},
        {"host_bytes": -1},
        {"peak_bytes": True},
        {"measured_peak_bytes": 1.5},
    ],
)
def test_a_record_with_wrong_types_is_one_line(folder: Path, fields: dict[str, object]) -> None:
    """A hand-edited record of the right keys but wrong types was a traceback deep in the comparison."""
    assert check("tiny.yaml", "--update").exit_code == 0
    edit(folder / "base.json", "tiny.yaml", **fields)
    r = check()
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "malformed entry for 'tiny.yaml'" in lines[0]
    assert next(iter(fields)) in lines[0]
