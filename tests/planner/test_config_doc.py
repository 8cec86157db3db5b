"""docs/config.md names every setting a config accepts, by the name a config file uses."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from gkd.config import _HARDWARE_SIZES, DeepSpeedSettings, HardwareConfig, Overrides, TrainingConfig

DOC = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
FILE_NAMES = {internal: key for key, internal in _HARDWARE_SIZES.items()}


@pytest.mark.parametrize("section", [HardwareConfig, TrainingConfig, DeepSpeedSettings, Overrides])
def test_every_setting_is_documented(section: type) -> None:
    missing = [
        FILE_NAMES.get(f.name, f.name)
        for f in fields(section)
        if f"`{FILE_NAMES.get(f.name, f.name)}`" not in DOC
    ]
    assert not missing, f"docs/config.md lacks {missing}"


def test_the_top_level_keys_are_documented() -> None:
    for key in (
        "teacher",
        "teachers",
        "student",
        "methods",
        "hardware",
        "training",
        "deepspeed",
        "overrides",
    ):
        assert f"`{key}`" in DOC
