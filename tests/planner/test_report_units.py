"""Units in the plan report: small models keep a readable size, and counts agree in number."""

from __future__ import annotations

from gkd.planner.report import param_count


def test_parameter_counts_scale_to_the_model() -> None:
    assert param_count(128_700_000_000) == "128.7B"
    assert param_count(10_290_000_000, digits=2) == "10.29B"
    assert param_count(124_439_808) == "124.4M"
    assert param_count(34_980, digits=2) == "34.98K"  # a tiny preset is not "0.00B"
    assert param_count(512) == "512"
