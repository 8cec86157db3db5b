"""Fixtures for method tests; the helpers live in method_checks.py (its docstring gives the pattern)."""

from __future__ import annotations

import pytest
from method_checks import FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each tiny model family: llama, gpt2, bert."""
    return request.param
