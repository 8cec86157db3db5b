"""Building a run's model and filling its weights without ever holding more than the plan counts.

`build_whole(spec, ...)` builds a model with its parameters on the meta device (buffers real) and fills each
parameter on `device` tensor by tensor; `build_partitioned(spec, ds_config, ...)` builds it under DeepSpeed's
`zero.Init` with the plan's config for that model, so that each rank only ever holds its own partition, and
fills each rank's slice of every parameter. Both take their weights from a checkpoint folder
(`weights=ref`) or from a fixed-seed random initialisation (`weights=None`, `seed=...`).

A tensor-parallel teacher (`gkd.runtime.tensor_parallel.build_tensor_parallel`) is filled through
`fill_from_checkpoint` too, each rank reading only its AutoTP slice of each parameter (`_Slices`,
`read_slice`).

What a rank holds while loading (besides what it keeps):
- partitioned: one module at a time while `zero.Init` builds it (uninitialised, in the training dtype), then
  a staging buffer of its slice of one tensor where the partition is not on the host in the file's dtype;
- whole: one tensor of the file as staging (none on the CPU when the file's dtype is the training dtype: the
  bytes are read straight into the parameter).

Design choices:
- The safetensors files are read with plain positioned reads from their header's offsets, one tensor (or one
  rank's slice of it) at a time: no memory map, so no file page is ever counted in a rank's private memory
  and no copy of a whole shard exists. `.bin` checkpoints are opened with `torch.load(mmap=True)` (a legacy
  pickle `.bin` is read whole, one shard at a time).
- DeepSpeed partitions a parameter by flattening it, padding it to a multiple of the world size and giving
  rank r elements [r*n, (r+1)*n) (`_partition_param` in deepspeed/runtime/zero/partition_parameters.py): a
  rank copies exactly that range into `param.ds_tensor`, with no communication; the padding is zeroed.
- Random initialisation is the same whatever the placement and world size, so a partitioned run, a
  replicated one and a single-process reference hold the same weights: the model is built with its
  parameters on the meta device, then visited as transformers' `initialize_weights` visits it (children
  first), each module's own parameters materialised on the CPU in the training dtype just before its
  `_init_weights` runs, from one generator seeded with the run's seed. A parameter is handed to its
  destination (and its CPU copy dropped) once the parents of its modules have been visited (GPT-2's init
  rescales its children's `c_proj`), so at most the embeddings and one layer are materialised at a time.
- Names: a checkpoint's keys are matched with the model's parameter names with or without the model's
  `base_model_prefix` (as `check_weights` does), LayerNorm's legacy gamma/beta read as weight/bias; tied
  parameters are one parameter, filled once. transformers' other key conversions (renamed, fused or split
  tensors of some architectures) are not applied: such a checkpoint lacks parameters, and a parameter no
  file holds is an InputError naming it (transformers would initialise it randomly; a run should not
  silently train from partly random weights). Keys the model lacks are ignored, as `from_pretrained` does.
- zero.Init's broadcast of each new parameter from rank 0 is skipped (`_no_broadcast_at_init`): every value
  is written afterwards, and receiving it would commit each module's whole tensors on the other ranks.
- Non-persistent buffers (RoPE's inverse frequencies) are computed when the model is built, in float32, as
  `from_pretrained` leaves them; under `zero.Init` torch.arange keeps its dtype for the same reason
  (transformers' `prevent_arange_dtype_change`).
- A damaged or missing shard found while loading is an InputError (one line, exit 2) naming the file.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.errors import InputError

SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def damaged(path: Path, why: str) -> InputError:
    """The error for a weights file that cannot be read (also `gkd.runtime.engines.check_weights`')."""
    return InputError(
        f"cannot read the weights file {path}: {why}; it is damaged or not a weights file: save or download "
        "it again"
    )


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoint files a range of elements at a time


@dataclass(frozen=True, kw_only=True)
class StoredTensor:
    """One tensor of a weights file: read any range of its flattened elements into a CPU tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: Any  # torch dtype in the file
    read: Callable[[int, int, Any], None]  # (start, stop, out: CPU tensor of stop-start elements, file dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def weight_files(folder: Path) -> list[Path]:
    """The weights files of a checkpoint folder in the order `from_pretrained` reads them (safetensors
    first); InputError when the index names a file that is missing."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise damaged(folder / index, str(err) or type(err).__name__) from None
            files = [folder / name for name in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(
                    f"{folder / index} lists the weights file {missing[0]}, which is not in {folder}; "
                    "copy every shard of the checkpoint"
                )
            return files
    raise InputError(f"{folder} holds no weights file (model.safetensors or pytorch_model.bin)")


@contextlib.contextmanager
def open_weights(path: Path) -> Iterator[list[StoredTensor]]:
    """The tensors of one weights file, readable while the context is open."""
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as tensors:
            yield tensors
    else:
        yield _open_bin(path)


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[list[StoredTensor]]:
    import torch

    try:
        f = path.open("rb")
    except OSError as err:
        raise damaged(path, err.strerror or str(err)) from None
    with f:
        size = path.stat().st_size
        head = f.read(8)
        if len(head) != 8:
            raise damaged(path, "it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise damaged(path, "its header is longer than the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise damaged(path, f"its header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise damaged(path, "its header is not a table of tensors")
        base = 8 + length
        tensors = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise damaged(path, f"its header entry for {name} is not a tensor description") from None
            item = torch.empty((), dtype=dtype).element_size()
            stored = StoredTensor(name=name, shape=shape, dtype=dtype, read=lambda *a: None)
            if end - begin != stored.numel * item or base + end > size:
                raise damaged(path, f"{name} does not fit the file (it is truncated)")

            def read(start: int, stop: int, out: Any, *, _at: int = base + begin, _item: int = item) -> None:
                view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
                f.seek(_at + start * _item)
                got = f.readinto(view)
                if got != (stop - start) * _item:
                    raise damaged(path, "it ends before its tensors do (it is truncated)")

            tensors.append(StoredTensor(name=name, shape=shape, dtype=dtype, read=read))
        yield tensors


def _open_bin(path: Path) -> list[StoredTensor]:
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (pickle) file
    except Exception as err:  # torch.load raises many kinds on a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise damaged(path, first) from None
    if not isinstance(state, dict):
        raise damaged(path, "it holds no state dict")

    def reader(t: Any) -> Callable[[int, int, Any], None]:
        return lambda start, stop, out: out.copy_(t.reshape(-1)[start:stop])

    return [
        StoredTensor(name=k, shape=tuple(v.shape), dtype=v.dtype, read=reader(v))
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    ]


# ----------------------------------------------------------------------------------------------------------
# Where a parameter's values go


class _Destination:
    """Where the values of a model's parameters go: `wanted(param)` is the range of the flattened parameter
    this rank holds, `put(param, start, values)` stores it; `fill(param, stored)` reads it from a file."""

    def wanted(self, param: Any) -> tuple[int, int]:
        raise NotImplementedError

    def full_shape(self, param: Any) -> tuple[int, ...]:
        """The whole parameter's shape, as the file must hold it."""
        return tuple(getattr(param, "ds_shape", None) or param.shape)

    def fill(self, param: Any, stored: StoredTensor) -> list[Any]:
        """Read this rank's part of `param` from `stored`; the parameters filled (here `param`)."""
        copy_stored(stored, param, self)
        return [param]

    def direct(self, param: Any, dtype: Any) -> Any:
        """A CPU tensor of the wanted range's elements to read the file's bytes into, or None to stage."""
        raise NotImplementedError

    def put(self, param: Any, values: Any) -> None:
        raise NotImplementedError


class _Partitions(_Destination):
    """Each rank's own slice of a ZeRO-3 parameter, in `param.ds_tensor` (see the module docstring)."""

    def _range(self, param: Any) -> tuple[int, int, Any]:
        import torch.distributed as dist

        part = param.ds_tensor
        n = part.ds_numel
        start = n * dist.get_rank(group=param.ds_process_group)
        return start, min(start + n, param.ds_numel), part

    def wanted(self, param: Any) -> tuple[int, int]:
        start, stop, part = self._range(param)
        if stop < start + part.numel():  # the padding of the last ranks
            part.narrow(0, max(stop - start, 0), part.numel() - max(stop - start, 0)).zero_()
        return start, max(start, stop)

    def direct(self, param: Any, dtype: Any) -> Any:
        start, stop, part = self._range(param)
        if part.device.type != "cpu" or part.dtype != dtype or stop <= start:
            return None
        return part.narrow(0, 0, stop - start)

    def put(self, param: Any, values: Any) -> None:
        start, stop, part = self._range(param)
        if stop > start:
            part.narrow(0, 0, stop - start).copy_(values.reshape(-1)[: stop - start])


class _Whole(_Destination):
    """Whole parameters on `device`: a meta parameter is replaced (in every module that holds it) by a real
    one when its values arrive."""

    def __init__(self, model: Any, device: Any, dtype: Any) -> None:
        self.device, self.dtype = device, dtype
        self.owners = _owners(model)
        self.ready: dict[int, Any] = {}

    def wanted(self, param: Any) -> tuple[int, int]:
        return 0, param.numel()

    def _install(self, param: Any, data: Any) -> None:
        import torch

        new = torch.nn.Parameter(data, requires_grad=param.requires_grad)
        for module, name in self.owners[id(param)]:
            module._parameters[name] = new

    def direct(self, param: Any, dtype: Any) -> Any:
        import torch

        if self.device.type != "cpu" or dtype != self.dtype:
            return None
        data = torch.empty(param.numel(), dtype=self.dtype)
        self._install(param, data.view(param.shape))
        return data

    def put(self, param: Any, values: Any) -> None:
        # A fresh staging buffer per tensor: on the CPU in the training dtype it becomes the parameter.
        self._install(param, values.reshape(param.shape).to(device=self.device, dtype=self.dtype))


@dataclass(frozen=True)
class Slice:
    """A rank's tensor-parallel slice of a tensor: the ranges `ranges` of dimension `dim`, in this order
    (one range for a plain split; one per sub-parameter for a fused weight, e.g. GLM's gate_up_proj)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        width = sum(b - a for a, b in self.ranges)
        return (*full[: self.dim], width, *full[self.dim + 1 :])

    def of(self, tensor: Any) -> Any:
        """This slice of the whole `tensor` (a view when it is one range)."""
        import torch

        parts = [tensor.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def read_slice(stored: StoredTensor, piece: Slice, out: Any) -> None:
    """Read the slice `piece` of `stored` into `out` (a contiguous CPU tensor of the slice's shape in the
    file's dtype): one positioned read per contiguous run of the slice in the file, so nothing outside the
    slice is read or held (a split of dimension 0 is one run per range; a split of dimension 1 of a matrix
    one run per row and range)."""
    outer = 1
    for d in stored.shape[: piece.dim]:
        outer *= d
    inner = 1
    for d in stored.shape[piece.dim + 1 :]:
        inner *= d
    size = stored.shape[piece.dim]
    width = sum(b - a for a, b in piece.ranges)
    flat = out.view(-1)
    for o in range(outer):
        at = o * width * inner
        for a, b in piece.ranges:
            n = (b - a) * inner
            start = (o * size + a) * inner
            if n:  # a rank may hold none of a small dimension
                stored.read(start, start + n, flat.narrow(0, at, n))
            at += n


class _Slices(_Destination):
    """Each rank's tensor-parallel slice of each parameter (`gkd.runtime.tensor_parallel`), allocated
    already (on the device): `slices[id(param)]` is the slice a parameter holds (None: whole), `full` the
    whole shapes, `tied[id(param)]` the parameters that held the same tensor before the split (AutoTP unties
    an LM head it splits from the embedding that shares its weight), filled from the same stored tensor."""

    def __init__(
        self, slices: dict[int, Slice | None], full: dict[int, tuple[int, ...]], tied: dict[int, list[Any]]
    ) -> None:
        self.slices, self.full, self.tied = slices, full, tied

    def full_shape(self, param: Any) -> tuple[int, ...]:
        return self.full[id(param)]

    def fill(self, param: Any, stored: StoredTensor) -> list[Any]:
        import torch

        targets = [param, *self.tied.get(id(param), [])]
        for target in targets:
            piece = self.slices[id(target)]
            data = target.data
            direct = data.device.type == "cpu" and data.dtype == stored.dtype and data.is_contiguous()
            out = data if direct else torch.empty(data.shape, dtype=stored.dtype)
            if piece is None:
                stored.read(0, stored.numel, out.view(-1))
            else:
                read_slice(stored, piece, out)
            if not direct:
                data.copy_(out)
                del out
        return targets


def _owners(model: Any) -> dict[int, list[tuple[Any, str]]]:
    """id(parameter) -> every (module, attribute) holding it (a tied parameter has several)."""
    owners: dict[int, list[tuple[Any, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    return owners


# ----------------------------------------------------------------------------------------------------------
# Filling from a checkpoint


def matched_name(name: str, prefix: str) -> str:
    """A checkpoint key or parameter name as the two are matched (see the module docstring): without the
    model's `base_model_prefix` ("model."), LayerNorm's legacy gamma/beta as weight/bias."""
    name = name.removeprefix(prefix) if prefix else name
    for old, new in ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias")):
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def missing_parameters(model: Any, keys: Any) -> list[str]:
    """The parameters of `model` (a tied one once, by its first name) that no name in `keys` fills."""
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    have = {matched_name(k, prefix) for k in keys}
    filled = {
        id(p) for n, p in model.named_parameters(remove_duplicate=False) if matched_name(n, prefix) in have
    }
    return [n for n, p in model.named_parameters() if id(p) not in filled]


def copy_stored(stored: StoredTensor, param: Any, destination: _Destination) -> None:
    """Read this rank's range of `stored` into `param` at `destination`: straight into the parameter's memory
    where the destination allows, else through a staging buffer of that range (also used by
    `gkd.runtime.student_init`)."""
    import torch

    start, stop = destination.wanted(param)
    out = destination.direct(param, stored.dtype)
    if out is not None:
        stored.read(start, stop, out)
        return
    staging = torch.empty(stop - start, dtype=stored.dtype)
    stored.read(start, stop, staging)
    destination.put(param, staging)


def fill_from_checkpoint(model: Any, folder: Path, destination: _Destination) -> None:
    """Fill every parameter of `model` from the weights files of `folder`, file by file and tensor by tensor
    (see the module docstring); InputError for a damaged file or a parameter no file holds."""
    import torch

    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""

    def bare(name: str) -> str:
        return matched_name(name, prefix)

    params = {bare(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    unique = list(model.named_parameters())  # as built: filling may replace them (`_Whole`)
    persistent = {
        bare(f"{mname}.{bname}" if mname else bname): (module, bname)
        for mname, module in model.named_modules()
        for bname in module._buffers
        if bname not in module._non_persistent_buffers_set and module._buffers[bname] is not None
    }
    filled: set[int] = set()
    for path in weight_files(folder):
        with open_weights(path) as tensors:
            for stored in tensors:
                key = bare(stored.name)
                if key in persistent:
                    module, bname = persistent[key]
                    old = module._buffers[bname]
                    value = torch.empty(stored.numel, dtype=stored.dtype)
                    stored.read(0, stored.numel, value)
                    module._buffers[bname] = value.view(stored.shape).to(device=old.device, dtype=old.dtype)
                    continue
                param = params.get(key)
                if param is None or id(param) in filled:
                    continue
                full = destination.full_shape(param)
                if full != stored.shape:
                    raise InputError(
                        f"{path} holds {stored.name} of shape {list(stored.shape)} but the model's config "
                        f"makes it {list(full)}: the weights belong to another model; put them next to the "
                        "config.json they were saved with"
                    )
                filled.update(id(p) for p in destination.fill(param, stored))
    missing = [n for n, p in unique if id(p) not in filled]
    if missing:
        raise InputError(
            f"the weights in {folder} lack {missing[0]} of the model its config.json describes"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": save the whole model with its weights"
        )


# ----------------------------------------------------------------------------------------------------------
# Filling with a seeded random initialisation


def fill_random(skeleton: Any, seed: int, dtype: Any, hand_off: Callable[[list[str], Any], bool]) -> None:
    """Initialise `skeleton` (parameters on the meta device) as transformers' `initialize_weights` would,
    materialising each module's parameters on the CPU in `dtype` just before its `_init_weights` runs, and
    call `hand_off(names, parameter)` for each parameter once no module left to visit can change it (see the
    module docstring); where it returns False the CPU copy is dropped (the parameter goes back to meta)."""
    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    owners = _owners(skeleton)
    names = {id(m): n for n, m in skeleton.named_modules(remove_duplicate=False)}
    parent: dict[int, int | None] = {id(skeleton): None}
    for module in skeleton.modules():
        for child in module.children():
            parent.setdefault(id(child), id(module))
    visited: set[int] = set()
    live: dict[int, Any] = {}  # id(materialised parameter) -> parameter

    def materialise(module: Any) -> None:
        for p in list(module._parameters.values()):
            if p is None or p.device.type != "meta":
                continue
            # Zeros, not empty: a parameter `_init_weights` does not cover is then the same on every rank.
            new = torch.nn.Parameter(torch.zeros(p.shape, dtype=dtype), requires_grad=p.requires_grad)
            for m, attr in owners[id(p)]:
                m._parameters[attr] = new
            owners[id(new)] = owners.pop(id(p))
            live[id(new)] = new

    def release() -> None:
        for key in list(live):
            holders = owners[key]
            # Final once every module holding it has had its parent visited (the root: itself).
            if all(
                (parent[id(m)] in visited) if parent[id(m)] is not None else (id(m) in visited)
                for m, _ in holders
            ):
                p = live.pop(key)
                if not hand_off([f"{names[id(m)]}.{a}" if names[id(m)] else a for m, a in holders], p):
                    gone = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"))
                    for m, a in holders:
                        m._parameters[a] = gone
                    owners[id(gone)] = owners.pop(key)

    def visit(module: Any, init: Callable[[Any], None]) -> None:
        for child in module.children():
            visit(child, child._init_weights if isinstance(child, PreTrainedModel) else init)
        materialise(module)
        init(module)
        visited.add(id(module))
        release()

    torch.manual_seed(seed)
    with torch.no_grad(), hf_init.guard_torch_init_functions():
        visit(skeleton, skeleton._init_weights)
    release()


# ----------------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (allocated nowhere) and their buffers
    for real (RoPE's frequencies computed as transformers computes them)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            cls, state = type(param), param.__dict__
            module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(state)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_skeleton(spec: Any, *, attention: str, dtype: Any) -> Any:
    """The model of `spec` with its parameters on the meta device and its buffers built (no weights)."""
    from transformers import initialization as hf_init

    from gkd.models import build_model

    with _parameters_on_meta(), hf_init.no_init_weights():
        # no_init_weights skips the (meta, pointless) init and the tying; tie as the model says.
        model = build_model(spec, device="cpu", attn_implementation=attention, dtype=dtype)
    model.tie_weights()
    leaked = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    assert not leaked, f"parameters {leaked[:3]} were allocated while building on meta"
    return model


def build_whole(spec: Any, *, weights: str | None, seed: int, attention: str, dtype: Any, device: Any) -> Any:
    """The model whole on `device` in `dtype`, filled tensor by tensor from the checkpoint folder `weights`
    or with the seeded random initialisation (see the module docstring)."""
    model = build_skeleton(spec, attention=attention, dtype=dtype)
    whole = _Whole(model, device, dtype)
    if weights is not None:
        fill_from_checkpoint(model, Path(weights).expanduser(), whole)
    else:

        def keep(names: list[str], p: Any) -> bool:
            p.data = p.data.to(device)  # the CPU copy goes once on the device
            return True

        fill_random(model, seed, dtype, keep)
    return model.to(device)  # the buffers (parameters are there already)


@contextlib.contextmanager
def _no_broadcast_at_init() -> Iterator[None]:
    """zero.Init broadcasts each new parameter from rank 0 before partitioning it, so that every rank starts
    from rank 0's random values (`Init._zero_init_param`). Here every value is written afterwards (from the
    checkpoint or the seeded init, the same on every rank), so the broadcast only costs a pass of the whole
    model through the network, and on the receiving ranks it writes, and so commits to memory, each module's
    whole uninitialised tensors: skipped while our models are built."""
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param

    def partition_only(self: Any, param: Any) -> None:
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        Init._zero_init_param = original  # type: ignore[method-assign]


def build_partitioned(
    spec: Any,
    ds_config: dict[str, Any],
    *,
    weights: str | None,
    seed: int,
    attention: str,
    dtype: Any,
) -> Any:
    """The model built under `deepspeed.zero.Init` with `ds_config` (the plan's DeepSpeed config for it), each
    rank filling only its own partition (see the module docstring)."""
    import deepspeed
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from gkd.models import build_model

    # The model's classes are imported (defined) before zero.Init: a class defined inside it gets its
    # __init__ wrapped at creation, and on exit zero.Init puts back the __init__ it saw then, dropping any
    # class decorator's __init__ applied after (transformers' `use_kernelized_func` on LlamaAttention, whose
    # instances built later then lack `_kernel_funcs` and fail in their forward).
    build_model(spec, device="meta", num_layers=1, attn_implementation=attention, dtype=dtype)
    with (
        hf_init.no_init_weights(),
        prevent_arange_dtype_change(),
        _no_broadcast_at_init(),
        deepspeed.zero.Init(config_dict_or_path=dict(ds_config), dtype=dtype),
    ):
        model = build_model(spec, device="cpu", attn_implementation=attention, dtype=dtype)
    model.tie_weights()
    partitions = _Partitions()
    if weights is not None:
        fill_from_checkpoint(model, Path(weights).expanduser(), partitions)
        return model
    params = dict(model.named_parameters(remove_duplicate=False))
    skeleton = build_skeleton(spec, attention=attention, dtype=dtype)

    def to_partition(names: list[str], p: Any) -> bool:
        target = next(params[n] for n in names if n in params)
        start, stop = partitions.wanted(target)  # and zeroes the padding
        partitions.put(target, p.data.reshape(-1)[start:stop])
        return False

    fill_random(skeleton, seed, dtype, to_partition)
    return model
