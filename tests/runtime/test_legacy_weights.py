"""A checkpoint folder whose pytorch_model.bin is a legacy (pickle, pre-zip) torch.save file is checked like a
zip-format one: accepted when its tensors fit the config.json, refused naming the tensor when they do not
(it used to be refused as holding none of the model's tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gkd.errors import InputError
from gkd.models import build_model
from gkd.planner.specs import load_spec
from gkd.runtime.engines import check_weights


def _legacy_folder(tmp_path: Path, *, break_shape: bool) -> Path:
    spec = load_spec("tiny-llama-student")
    model = build_model(spec, device="cpu", dtype=torch.float32)
    folder = tmp_path / "student"
    model.save_pretrained(str(folder), safe_serialization=False)
    state = model.state_dict()
    if break_shape:
        name = next(iter(state))
        state[name] = torch.zeros(3, 3)
    (folder / "model.safetensors").unlink(missing_ok=True)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return folder


def test_a_legacy_bin_is_checked_and_accepted(tmp_path: Path) -> None:
    folder = _legacy_folder(tmp_path, break_shape=False)
    assert (folder / "pytorch_model.bin").read_bytes()[:1] == b"\x80"  # a pickle, not a zip archive
    check_weights(str(folder), load_spec(str(folder)))


def test_a_legacy_bin_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = _legacy_folder(tmp_path, break_shape=True)
    with pytest.raises(InputError, match=r"of shape \[3, 3\]"):
        check_weights(str(folder), load_spec(str(folder)))
