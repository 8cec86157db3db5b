"""Tensor-parallel teachers in 2 CPU processes: each rank's taps from the split teacher equal the whole
teacher's on that rank's own micro-batch (float32), for decoder and encoder families and every tap kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from storage_peak import StoragePeak

from gkd.runtime.launch import launch

CPU = torch.device("cpu")

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


# ----------------------------------------------------------------------------------------------------------
# Building the teacher slice by slice (gkd.runtime.tensor_parallel.build_tensor_parallel)

TINY_OPT = {
    "model_type": "opt",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_dim": 128,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "word_embed_proj_dim": 64,
    "activation_function": "relu",
    "do_layer_norm_before": True,
    "tie_word_embeddings": True,
}
# (model, checkpoint dtype or None for the seeded random initialisation, training dtype)
CASES = [
    ("tiny-llama-teacher", "bfloat16", "bfloat16"),  # read straight into the slices
    ("tiny-llama-teacher", None, "bfloat16"),
    ("tiny-bert-teacher", "float32", "bfloat16"),  # staged and cast
    ("opt", "float32", "float32"),  # biases, an LM head tied to the embedding
]


def _spec(name: str) -> Any:
    from gkd.models import resolve_model, spec_from_config

    return spec_from_config(dict(TINY_OPT), name="tiny-opt") if name == "opt" else resolve_model(name)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sliced_worker(rank: int, world: int, root: str) -> None:
    import deepspeed  # noqa: F401

    from gkd.runtime.capture import transformer_layers
    from gkd.runtime.loading import build_whole
    from gkd.runtime.tensor_parallel import (
        TensorParallelSource,
        build_tensor_parallel,
        place_tensor_parallel,
    )

    results = []
    for i, (name, stored, training) in enumerate(CASES):
        spec, dtype = _spec(name), getattr(torch, training)
        folder = str(Path(root) / f"case{i}") if stored else None
        # Before: the whole teacher built on every rank, then split by AutoTP.
        whole = build_whole(spec, weights=folder, seed=3, attention="eager", dtype=dtype, device=CPU)
        whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
        # A checkpoint's tensor is staged in the file's dtype.
        item = torch.empty((), dtype=getattr(torch, stored or training)).element_size()
        largest = max(p.numel() for p in whole.parameters()) * item
        layer = max(sum(_bytes(p) for p in block.parameters()) for block in transformer_layers(whole))
        ends = (whole.get_input_embeddings(), whole.get_output_embeddings())
        heads = {id(m.weight): m.weight for m in ends}
        full = {n: p.shape for n, p in whole.named_parameters(remove_duplicate=False)}
        before, _ = place_tensor_parallel(whole, tp=world, dtype=dtype)
        source = TensorParallelSource(spec=spec, weights=folder, seed=3, attention="eager", dtype=dtype)
        with StoragePeak() as peak:
            after, _ = build_tensor_parallel(source, tp=world)
        gen = torch.Generator().manual_seed(10 + rank)
        inputs = {"input_ids": torch.randint(0, spec.vocab, (2, 7), generator=gen)}
        with torch.no_grad():
            logits = [t.run_taps({"logits"}, inputs)["logits"] for t in (before, after)]
        params = [
            {n: p.detach().clone() for n, p in t.module.named_parameters(remove_duplicate=False)}
            for t in (before, after)
        ]
        buffers = [
            {n: b.detach().clone() for n, b in t.module.named_buffers(remove_duplicate=False)}
            for t in (before, after)
        ]
        slice_bytes = sum(_bytes(p) for p in after.module.parameters())
        results.append(
            {
                "params": params,
                "buffers": buffers,
                "logits": logits,
                "peak": peak.peak,
                "slice_bytes": slice_bytes,
                "buffer_bytes": sum(_bytes(b) for b in after.module.buffers()),
                "largest": largest,
                # The seeded init holds the embeddings and one layer whole at a time (loading.fill_random).
                "init": layer + sum(_bytes(p) for p in heads.values()),
                "whole_bytes": whole_bytes,
                "split": [n for n, p in params[1].items() if p.shape != full[n]],
            }
        )
    torch.save(results, Path(root) / f"rank{rank}.pt")


def test_each_rank_builds_only_its_slice_with_the_weights_of_the_split_whole(tmp_path: Path) -> None:
    """Each rank's slices (from a checkpoint of >= 2 safetensors shards, in the file's dtype or cast, or from
    the seeded initialisation) equal what AutoTP cuts from the whole teacher, buffers and logits included,
    and building them never holds more CPU tensor storage than the slices plus one whole tensor."""
    from gkd.models import build_model

    for i, (name, stored, _) in enumerate(CASES):
        if stored:
            torch.manual_seed(5)
            model = build_model(_spec(name), device="cpu", dtype=getattr(torch, stored))
            model.save_pretrained(str(tmp_path / f"case{i}"), max_shard_size="100KB")
            assert len(list((tmp_path / f"case{i}").glob("*.safetensors"))) >= 2
    launch(_sliced_worker, (str(tmp_path),), processes=2, timeout_s=300)
    for rank in range(2):
        results: list[dict[str, Any]] = torch.load(tmp_path / f"rank{rank}.pt")
        for (name, stored, _), got in zip(CASES, results, strict=True):
            case = f"{name} from {stored or 'the seeded init'}, rank {rank}"
            before, after = got["params"]
            assert set(before) == set(after), case
            for key in before:
                assert before[key].shape == after[key].shape, f"{case}: {key}"
                assert before[key].dtype == after[key].dtype, f"{case}: {key}"
                assert torch.equal(before[key], after[key]), f"{case}: {key}"
            for key, value in got["buffers"][0].items():
                assert torch.equal(value, got["buffers"][1][key]), f"{case}: {key}"
            torch.testing.assert_close(got["logits"][1], got["logits"][0], rtol=0, atol=0, msg=case)
            assert got["split"], f"{case}: nothing was split"
            assert got["slice_bytes"] < got["whole_bytes"], case
            # The slices plus one tensor staged (a checkpoint) or the seeded init's whole tensors of the
            # embeddings and one layer; the buffers (a few KB: RoPE's frequencies, position ids) are held
            # twice while the engine re-allocates them.
            transient = got["largest"] if stored else got["init"]
            bound = got["slice_bytes"] + 2 * got["buffer_bytes"] + transient
            assert got["peak"] <= bound, (case, got["peak"], bound)
            print(f"{case}: peak {got['peak']} B, slices {got['slice_bytes']} B, whole {got['whole_bytes']}")
