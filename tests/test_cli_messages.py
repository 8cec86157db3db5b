"""Messages that say what is really wrong: `gkd` alone is the overview, a folder or a text file given as a
config, and a file given as --out."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from gkd.cli import main


def test_gkd_alone_prints_the_overview() -> None:
    result = CliRunner().invoke(main, [], prog_name="gkd")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: gkd") and "error" not in result.output


def test_a_text_file_as_config_is_named(tmp_path: Path) -> None:
    data = tmp_path / "small.txt"
    data.write_text("some training text\nmore text\n")
    result = CliRunner().invoke(main, ["plan", str(data)])
    assert result.exit_code == 2
    assert f"{data} is not a config: its top level is a str" in result.output


def test_a_folder_as_config_and_a_file_as_out(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(tmp_path)])
    assert result.exit_code == 2 and f"{tmp_path} is a folder; give a config" in result.output
    taken = tmp_path / "afile"
    taken.write_text("x")
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    result = CliRunner().invoke(main, ["run", tiny, "--out", str(taken)])
    assert result.exit_code == 2 and f"--out {taken} is a file" in result.output
    assert taken.read_text() == "x"


def test_a_damaged_plan_is_named_a_plan(tmp_path: Path) -> None:
    import json

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    plan = tmp_path / "plan.json"
    assert CliRunner().invoke(main, ["plan", tiny, "--gpus", "2", "-o", str(plan)]).exit_code == 0
    data = json.loads(plan.read_text())
    del data["schedule"]
    plan.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["run", str(plan), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not a gkd plan: keys ['schedule'] are missing" in result.output


def test_an_empty_out_is_refused(tmp_path: Path) -> None:
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    result = CliRunner().invoke(main, ["run", tiny, "--out", ""])
    assert result.exit_code == 2 and "--out is empty" in result.output
