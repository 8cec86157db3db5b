"""The test tree's own rule: pytest imports test files by basename (no packages), so two test files with one
name in different folders make the second fail to collect ("import file mismatch") in a full run only."""

from collections import Counter
from pathlib import Path


def test_test_file_names_are_unique() -> None:
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], "rename one of each pair of same-named test files"
