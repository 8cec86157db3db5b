"""Tensor-parallel teachers in 2 CPU processes: each rank's taps from the split teacher equal the whole
teacher's on that rank's own micro-batch (float32), for decoder and encoder families and every tap kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gkd.runtime.launch import launch

pytestmark = pytest.mark.slow

TAPS = {
    "logits",
    "final",
    "hidden[2]",
    "q[1]",
    "k[1]",
    "v[1]",
    "probs[1]",
    "scores[0]",
    "context[1]",
    "mlp_out[1]",
}


def _worker(rank: int, world: int, family: str, out: str) -> None:
    import deepspeed  # noqa: F401

    from gkd.models import build_model, resolve_model
    from gkd.runtime.step import run_captured
    from gkd.runtime.tensor_parallel import place_tensor_parallel

    spec = resolve_model(f"tiny-{family}-teacher")
    torch.manual_seed(0)
    model = build_model(spec, device="cpu").eval()
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own micro-batch
    ids = torch.randint(0, spec.vocab, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        whole = run_captured(model, TAPS, inputs, "teacher")
        whole = {k: v.clone() for k, v in whole.items()}
        teacher, _ = place_tensor_parallel(model, tp=world, dtype=torch.float32)
        split = teacher.run_taps(TAPS, inputs)
        head = teacher.get_output_embeddings().weight
    torch.save({"whole": whole, "split": split, "head": head}, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_split_teacher_taps_equal_the_whole_teacher(family: str, tmp_path: Path) -> None:
    from gkd.models import build_model, resolve_model

    launch(_worker, (family, str(tmp_path)), processes=2, timeout_s=300)
    spec = resolve_model(f"tiny-{family}-teacher")
    torch.manual_seed(0)
    full_head = build_model(spec, device="cpu").get_output_embeddings().weight
    for rank in range(2):
        got: dict[str, Any] = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got["split"]) == TAPS
        for name in sorted(TAPS):
            torch.testing.assert_close(got["split"][name], got["whole"][name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got["head"], full_head, rtol=0, atol=0)
