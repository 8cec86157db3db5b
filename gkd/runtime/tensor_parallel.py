"""Tensor-parallel teachers (`"teacher_placement": "tensor_parallel"`): the teacher's weights split `tp` ways
over groups of `tp` consecutive ranks by DeepSpeed's automatic tensor parallelism, each group running one
copy on the micro-batches of all its ranks.

Usage (one rank of `gkd.runtime.worker.train_worker`, every rank in the same order):
    teacher, engine = build_tensor_parallel(source, tp=2)                # a TensorParallelTeacher
    teacher, engine = place_tensor_parallel(model, tp=2, dtype=torch.bfloat16)  # from a whole model
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

Building (`build_tensor_parallel`, what `gkd run`'s workers do; `gkd.runtime.engines.build_models` hands
over a `TensorParallelSource` and `place_teacher` builds it): the teacher is built with its parameters on the
meta device and given to `deepspeed.init_inference` as it is. AutoTP replaces the layers it splits, cutting
the empty (meta) weights, and the engine allocates what is left of a meta model on this rank's device
(`to_empty`): each split parameter as this rank's slice, the others whole, uninitialised. Each slice is then
read from the checkpoint's safetensors files with positioned reads of its bytes only
(`gkd.runtime.loading.read_slice`: one read per range for a split of the output features, one per row for a
split of the input features), staged only where the file's dtype or the device differs, or, without a
checkpoint, cut from the whole model's seeded initialisation one module at a time
(`gkd.runtime.loading.fill_random`), so that every rank holds the same weights a whole teacher split by
AutoTP holds (`tests/e2e/test_tensor_parallel.py`, bit for bit). The split of each parameter is the one
DeepSpeed's layer class applies (`_layer_slices`: output features for `LinearLayer`, input features for
`LinearAllreduce` and the LM head, per sub-parameter for GLM's packed gate/up projection); a parameter whose
slice is not the shape that gives is an error, never a silent misread. A rank's host peak while loading is
its slices (on the CPU, its device) plus one tensor being read: 1115 MiB for 1112 MiB of slices of a
2.20 GB Llama checkpoint, against 2528 MiB whole-then-split (`benchmarks/bench_load_memory.py
--tensor-parallel-only`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError

if TYPE_CHECKING:
    from gkd.runtime.loading import Slice

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
    """(the split teacher, its DeepSpeed inference engine), split from the whole `teacher`. A teacher whose
    parameters are on the meta device comes out with this rank's slices allocated, uninitialised, on this
    rank's device (DeepSpeed's `to_empty` of a meta model; its buffers too): `build_tensor_parallel` fills
    them."""
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


# ----------------------------------------------------------------------------------------------------------
# Building a tensor-parallel teacher slice by slice


@dataclass(frozen=True, kw_only=True)
class TensorParallelSource:
    """A tensor-parallel teacher not built yet (`gkd.runtime.engines.build_models` inside workers): what
    `build_tensor_parallel` needs, so that the teacher is built when it is placed, each rank holding only its
    slice."""

    spec: Any
    weights: str | None  # a checkpoint folder, or None for the seeded random initialisation
    seed: int
    attention: str
    dtype: Any


def _layer_slices(layer: Any) -> dict[str, Slice | None]:
    """{parameter attribute: this rank's slice} of one module after AutoTP replaced it, following the split
    each of DeepSpeed's layer classes applies (`_tp_partition` in deepspeed/module_inject/layers.py)."""
    from deepspeed.module_inject import layers

    from gkd.runtime.loading import Slice

    kind = type(layer)
    if kind is layers.GateUpPack_LinearLayer:  # per sub-parameter, along the output features
        ranges, offset = [], 0
        for size, widths in zip(layer._subparam_sizes, layer._subparam_shard_widths, strict=True):
            start = offset + sum(widths[: layer.tp_index])
            ranges.append((start, start + widths[layer.tp_index]))
            offset += size
        piece = Slice(dim=0, ranges=tuple(ranges))
        return {"weight": piece, "bias": piece}
    sizes = getattr(layer, "_partition_sizes", None)
    if kind in (layers.LinearAllreduce, layers.LmHeadLinearAllreduce):  # input features; bias whole
        start = sum(sizes[: layer.tp_index])
        return {"weight": Slice(dim=1, ranges=((start, start + sizes[layer.tp_index]),)), "bias": None}
    if kind is layers.LinearLayer:  # output features, bias too
        start = sum(sizes[: layer.tp_index])
        piece = Slice(dim=0, ranges=((start, start + sizes[layer.tp_index]),))
        return {"weight": piece, "bias": piece}
    if isinstance(layer, layers.TensorParallel_Layer):
        raise InputError(
            f"DeepSpeed splits this teacher's {kind.__name__} layers in a way gkd cannot read slice by "
            "slice; set `overrides: {teacher_placement: zero3_offload}` in the config and plan again"
        )
    return {}


def build_tensor_parallel(source: TensorParallelSource, *, tp: int) -> tuple[TensorParallelTeacher, Any]:
    """(the split teacher, its engine), each rank materialising only its own slice of every parameter that
    AutoTP splits (the others whole), on its device in the training dtype, filled from the checkpoint's
    files slice by slice or from the seeded random initialisation (see the module docstring); the same
    weights as `place_tensor_parallel` of the whole teacher `gkd.runtime.loading.build_whole` builds."""
    from gkd.runtime.loading import (
        _Slices,
        build_skeleton,
        fill_from_checkpoint,
        fill_random,
    )

    model = build_skeleton(source.spec, attention=source.attention, dtype=source.dtype)
    full = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    groups: dict[int, list[str]] = {}  # the names of each parameter (a tied one has several)
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    # The engine re-allocates the buffers with the parameters (`to_empty`): their values, to put back.
    buffers = dict(model.named_buffers(remove_duplicate=False))
    teacher, engine = place_tensor_parallel(model, tp=tp, dtype=source.dtype)
    module = teacher.module
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value)  # in the dtype the engine gave it, as for a whole teacher
    slices: dict[int, Slice | None] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for mname, layer in module.named_modules(remove_duplicate=False):
        pieces = _layer_slices(layer)
        for attr, p in layer._parameters.items():
            if p is None:
                continue
            name = f"{mname}.{attr}" if mname else attr
            piece = pieces.get(attr)
            want = piece.shape(full[name]) if piece is not None else full[name]
            if p.device.type == "meta" or tuple(p.shape) != want:
                raise RuntimeError(
                    f"{name} of the tensor-parallel teacher is {tuple(p.shape)} on {p.device}, not this "
                    f"rank's slice {want} of {full[name]}: DeepSpeed split it in a way gkd does not know"
                )
            slices[id(p)], shapes[id(p)] = piece, full[name]
    tied: dict[int, list[Any]] = {}
    for names in groups.values():
        placed = list({id(p): p for p in (module.get_parameter(n) for n in names)}.values())
        tied[id(placed[0])] = placed[1:]
        for p in placed[1:]:
            tied[id(p)] = [q for q in placed if q is not p]
    if source.weights is not None:
        fill_from_checkpoint(module, Path(source.weights).expanduser(), _Slices(slices, shapes, tied))
    else:
        # The whole model's seeded initialisation one module at a time (as a whole build has it), each
        # tensor sliced as it is handed off.
        def to_slices(names: list[str], p: Any) -> bool:
            for target in {id(t): t for t in (module.get_parameter(n) for n in names)}.values():
                piece = slices[id(target)]
                target.data.copy_(p.data if piece is None else piece.of(p.data))
            return False

        fill_random(
            build_skeleton(source.spec, attention=source.attention, dtype=source.dtype),
            source.seed,
            source.dtype,
            to_slices,
        )
    return teacher, engine
