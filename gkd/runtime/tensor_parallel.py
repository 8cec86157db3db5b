"""Tensor-parallel teachers (`"teacher_placement": "tensor_parallel"`): the teacher's weights split `tp` ways
over groups of `tp` consecutive ranks by DeepSpeed's automatic tensor parallelism, each group running one
copy on the micro-batches of all its ranks.

Usage (one rank of `gkd.runtime.worker.train_worker`, every rank in the same order):
    teacher = place_tensor_parallel(model, tp=2, dtype=torch.bfloat16)   # a TensorParallelTeacher
    taps = teacher.run_taps({"logits", "q[3]"}, inputs)                  # this rank's rows, whole heads

What one teacher forward does, as the planner's cost model has it (`gkd.planner.cost`: the teacher runs tp
micro-batches, with two all-reduces per layer):
1. the group gathers its ranks' model inputs (all-gather along the batch);
2. the sharded teacher runs on the tp micro-batches; AutoTP splits the attention and MLP projections by rows
   and all-reduces the out-projections, so hidden states, MLP outputs, `final` and the logits (its LM head is
   split and all-reduced too) come out whole;
3. the attention taps (`q`, `k`, `v`, `scores`, `probs`, `context`) hold this rank's heads only: they are
   gathered along the head dimension (AutoTP keeps each rank's heads contiguous and in order);
4. each rank keeps the rows of its own micro-batch.

Design choices:
- On the CPU, DeepSpeed's shared-memory all-reduce kernel (used by AutoTP's all-reduces) faults on machines
  without the vector instructions it assumes, so the process group's all-reduce is used there instead.
- The fused-linear loss reads the LM head whole: `get_output_embeddings` gathers its columns when asked
  (only on that path).
- Families AutoTP cannot split without kernel injection (GPT-2), BLOOM (whose attention taps come from its
  fused query-key-value projection, which the split changes) and key/value head counts the degree does not
  divide are refused before any worker starts (`unsupported_reason`), with the override that avoids them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gkd.errors import InputError

# Tap kinds that hold a rank's own heads under tensor parallelism, and the dimension of their heads.
HEAD_DIMS = {"q": 1, "k": 1, "v": 1, "scores": 1, "probs": 1, "context": -1}
UNSUPPORTED_TYPES = {
    "gpt2": "DeepSpeed's automatic tensor parallelism cannot split GPT-2 without kernel injection",
    "bloom": "BLOOM's attention taps come from its fused query-key-value projection, which the split changes",
}


def unsupported_reason(model_type: str, kv_heads: int, tp: int) -> str | None:
    """Why a teacher cannot run tensor-parallel `tp` ways here, or None when it can."""
    if model_type in UNSUPPORTED_TYPES:
        return UNSUPPORTED_TYPES[model_type]
    if kv_heads % tp:
        return f"its {kv_heads} key/value heads do not split {tp} ways"
    return None


def tp_group(tp: int) -> Any:
    """This rank's group of `tp` consecutive ranks (every rank creates every group, as torch requires)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise InputError(f"tensor parallel degree {tp} does not divide the {world} processes; plan again")
    mine = None
    for start in range(0, world, tp):
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = group
    return mine


class TensorParallelTeacher:
    """A teacher split over a tensor-parallel group; `run_taps` is its forward (see the module docstring).

    Not an `nn.Module` on purpose: nothing may call the sharded model directly, since its outputs are for
    the whole group's batch.
    """

    def __init__(self, module: Any, group: Any, tp: int) -> None:
        self.module = module
        self.group = group
        self.tp = tp

    def get_output_embeddings(self) -> Any:
        """The whole LM head, for the fused-linear loss: AutoTP splits its weight by input features (columns),
        so the group gathers them (a transient (vocab x hidden) copy, as the planner counts for the loss)."""
        from types import SimpleNamespace

        import torch
        import torch.distributed as dist

        head = self.module.get_output_embeddings()
        sizes = getattr(head, "_partition_sizes", None)  # columns per rank; uneven (AutoTP splits in grains)
        if sizes is None:
            return SimpleNamespace(weight=head.weight)  # not split
        widest = max(sizes)
        local = torch.nn.functional.pad(head.weight, (0, widest - head.weight.shape[1]))
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return SimpleNamespace(weight=torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1))

    def _gather(self, x: Any, dim: int) -> Any:
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def run_taps(self, names: Iterable[str], inputs: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's taps `names` of one no-grad forward (call under `torch.no_grad()`)."""
        import torch
        import torch.distributed as dist

        from gkd.runtime.capture import parse_tap
        from gkd.runtime.step import run_captured

        batch = {k: self._gather(v, 0) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        taps = run_captured(self.module, names, batch, "tensor-parallel teacher")
        rows = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        index = dist.get_rank(group=self.group)
        out = {}
        for name, value in taps.items():
            kind, _ = parse_tap(name)
            if kind in HEAD_DIMS:
                value = self._gather(value, HEAD_DIMS[kind])
            out[name] = value[index * rows : (index + 1) * rows]
        return out


def place_tensor_parallel(teacher: Any, *, tp: int, dtype: Any) -> tuple[TensorParallelTeacher, Any]:
    """(the split teacher, its DeepSpeed inference engine)."""
    import deepspeed
    import torch

    if not torch.cuda.is_available():
        # See the module docstring: the process group's all-reduce instead of the shared-memory kernel.
        backend = getattr(deepspeed.comm.comm, "cdb", None)
        if backend is not None and hasattr(backend, "shm_vector_kernel_level"):
            backend.shm_vector_kernel_level = 0
    group = tp_group(tp)
    config = {
        "tensor_parallel": {"tp_size": tp, "tp_group": group},
        "dtype": dtype,
        "replace_with_kernel_inject": False,
    }
    engine = deepspeed.init_inference(teacher, config=config)
    engine.module.eval()
    return TensorParallelTeacher(engine.module, group, tp), engine
