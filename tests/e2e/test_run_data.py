"""`gkd run` on a hub dataset id found in a Hugging Face cache folder (built by the test; nothing downloads),
with the config's data section: 2 steps in 2 processes, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

datasets = pytest.importorskip("datasets")


def test_a_cached_hub_dataset_trains_from_the_command_line(tmp_path: Path) -> None:
    from tests.runtime.test_data_sources import cached_hub_dataset

    texts = [f"record {i}: the student learns from the teacher, step by step." for i in range(200)]
    table = datasets.Dataset.from_dict({"body": texts})
    cached_hub_dataset(tmp_path / "hub", "gkd-test/tiny-text", {"data/train-00000-of-00001.parquet": table})
    config = tmp_path / "job.yaml"
    config.write_text(
        "teacher: tiny-llama-teacher\nstudent: tiny-llama-student\nmethods: [kd]\n"
        "training: {seq_len: 64, global_batch: 8, micro_batch: auto, steps: 2}\n"
        "data: {text_field: body, streaming: true}\n"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
        "GKD_CACHE_DIR": str(tmp_path / "gkd-cache"),
    }
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    out = tmp_path / "run"
    args = ["run", str(config), "--data", "gkd-test/tiny-text", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert json.loads((out / "run.json").read_text())["data"] == "gkd-test/tiny-text"
    # Not in the cache: exit 2, one line naming the id and the offline setting.
    args = ["run", str(config), "--data", "gkd-test/absent", "--out", str(tmp_path / "run2")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 2
    assert "gkd-test/absent" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run2").exists()
