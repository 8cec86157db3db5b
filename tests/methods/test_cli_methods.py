"""`gkd methods [NAME] [--json]`."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from gkd.cli import main
from gkd.methods import names


def test_table_lists_every_method():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    table, rules = result.output.split("\n\n")
    rows = {line.split()[0] for line in table.splitlines()[2:]}
    assert rows == set(names())
    # Under the table: how the methods combine with each generation mode.
    assert "on_policy, and sequence_kd with lambda > 0" in rules and "sequence_kd with lambda 0" in rules


def test_json_lists_every_key_with_taps():
    result = CliRunner().invoke(main, ["methods", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert [d["name"] for d in data] == names()
    by_name = {d["name"]: d for d in data}
    assert [t["kind"] for t in by_name["minilmv2"]["taps"]] == ["q", "k", "v"]
    assert by_name["minilmv2"]["taps"][0]["layers"] == "last"


def test_detail_has_parseable_example_config():
    result = CliRunner().invoke(main, ["methods", "hidden_mse"])
    assert result.exit_code == 0
    assert "proj: linear student.hidden -> teacher.hidden" in result.output
    snippet = result.output.split("example config:\n", 1)[1]
    config = yaml.safe_load("\n".join(line[4:] for line in snippet.splitlines()))
    assert config["methods"][0]["name"] == "hidden_mse"


def test_unknown_name_exit_2_one_line():
    result = CliRunner().invoke(main, ["methods", "minilm2"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and "minilmv2" in lines[0]


def test_a_name_in_capitals_suggests_the_name():
    result = CliRunner().invoke(main, ["methods", "KD"])
    assert result.exit_code == 2 and "did you mean kd" in result.output


def test_the_takd_example_names_an_assistant():
    """The example must show the one option takd cannot run without (an empty list is refused)."""
    import yaml

    result = CliRunner().invoke(main, ["methods", "takd"])
    example = yaml.safe_load(result.output.split("example config:", 1)[1])
    assert example["methods"][0]["options"]["assistants"] == ["path/to/assistant"]
