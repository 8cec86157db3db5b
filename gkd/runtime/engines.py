"""The models of a run, placed as the plan says: the student (with the loss extras) in a DeepSpeed engine, the
teachers replicated or in ZeRO-3 inference engines.

`check_supported(plan, cuda=...)` rejects, before any process starts, what this runtime does not execute yet;
`check_weights(ref, spec)` rejects a checkpoint folder whose weight files are unreadable or belong to another
model (from the files' headers);
`build_models(plan, seed=...)` builds the models with a fixed seed (the same weights on every rank and in a
single-process reference), each as the plan places it; `make_engines(models, plan)` hands them to DeepSpeed;
`check_host_memory(plan, ...)` refuses, before any worker starts, a plan whose host memory this machine lacks.

What comes from the plan and nothing else: the student's DeepSpeed config (ZeRO stage, offload, batch sizes,
gradient accumulation, clipping, optimizer, bf16/fp16), the layers to recompute, the teacher placement and the
teachers' DeepSpeed configs, the attention implementation and the logit-loss path (fused-linear or logits,
which decides how the methods are resolved).

Design choices:
- The engine wraps `DistillModule`, a module holding the student and the `DistillLoss` (its trainable
  projections), so one optimizer and one gradient reduction cover both. Its forward is the whole distillation
  step (`gkd.runtime.step.distill_step`), so ZeRO-3 sees every use of the student's parameters inside the
  engine's forward. The teachers are a plain list attribute, not submodules: they are not trained and must not
  enter the student's optimizer or ZeRO partitioning. Under ZeRO-3 the loss extras are registered as external
  parameters of the DistillModule, so they are gathered for its whole forward and again when its backward
  starts (DistillLoss returns a dataclass, to whose tensors ZeRO-3 cannot attach its backward hooks). On the
  fused-linear logit path the student's LM-head weight is registered the same way (the loss reads it after
  the head's own forward); a ZeRO-3 teacher's head is gathered read-only around the loss
  (`gkd.runtime.step`).
- Recompute: each layer the plan lists runs its forward under `torch.utils.checkpoint` (non-reentrant), by
  wrapping that layer's `forward`; the layer's module hooks (tap capture) stay outside the checkpoint, so taps
  hold the layer's outputs as usual. Other layers are untouched; this is per layer, not all-or-nothing.
- Weights (`gkd.runtime.loading`): a checkpoint folder with weights is read tensor by tensor; a preset or a
  bare config.json is randomly initialised from the run's seed, the same whatever the placement and the
  number of workers. Inside workers (a process group exists), a ZeRO-3 student and a zero3/zero3_offload
  teacher are built under `deepspeed.zero.Init` with the plan's DeepSpeed config for them, each rank filling
  only its own partition; a tensor-parallel teacher is built when it is placed, on the meta device, AutoTP
  splitting the empty model and each rank filling only its own slices (`gkd.runtime.tensor_parallel`); the
  others are built on the meta device and filled onto the worker's device. Without a process group (a
  single-process reference) every model is built whole on the CPU, with the same weights. Parameters come in
  the training dtype, non-persistent buffers (RoPE's frequencies) in float32, as `from_pretrained` gives
  them. Distilling from a random teacher only exercises the machinery; the run says so.
- Offline teachers run before the student engine exists (`gkd.runtime.offline`); the engine's module then
  holds stand-ins and reads the stored top-k per micro-batch (`DistillModule.stored`).
- Tensor-parallel teachers are split by DeepSpeed's automatic tensor parallelism over groups of consecutive
  ranks (`gkd.runtime.tensor_parallel`).
- Refused (InputError naming the override that avoids it): hook ops that move teacher modules into the
  student (Theseus) with a sharded teacher; a tensor-parallel teacher AutoTP or the tap capture cannot split
  (GPT-2, BLOOM, key/value heads the degree does not divide); fp16 on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gkd.errors import InputError
from gkd.planner.plan import Plan, human_bytes
from gkd.runtime.memory import map_large_allocations, release_freed_memory

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _overrides_hint(key: str, value: str) -> str:
    return f"set `overrides: {{{key}: {value}}}` in the config and plan again"


def check_supported(plan: Plan, *, cuda: bool) -> None:
    """Raise InputError for a plan this runtime cannot execute (see the module docstring)."""
    s = plan.strategy
    if s.teacher_placement == "tensor_parallel":
        from gkd.planner.specs import load_spec
        from gkd.runtime.tensor_parallel import unsupported_reason

        for ref in plan.inputs.get("config", {}).get("teachers", []):
            spec = load_spec(ref)
            reason = unsupported_reason(spec.model_type, spec.kv_heads, s.tensor_parallel)
            if reason:
                raise InputError(
                    f"teacher {ref} cannot run tensor-parallel: {reason}; "
                    + _overrides_hint("teacher_placement", "zero3_offload")
                )
    methods = plan.inputs.get("config", {}).get("methods", [])
    if s.teacher_placement != "replicated" and any(m.get("name") == "theseus" for m in methods):
        raise InputError(
            "theseus moves teacher layers into the student, which needs a replicated teacher; "
            + _overrides_hint("teacher_placement", "replicated")
        )
    if s.teacher_placement == "tensor_parallel" and any(m.get("name") == "diito" for m in methods):
        raise InputError(
            "diito records the teacher's layer states per micro-batch, which a tensor-parallel teacher runs "
            "for its whole group; " + _overrides_hint("teacher_placement", "replicated")
        )
    dtype = plan.inputs.get("config", {}).get("training", {}).get("dtype", "bfloat16")
    if dtype == "float16" and not cuda:
        raise InputError("training.dtype float16 needs CUDA; on the CPU set training.dtype: bfloat16")


def available_host_memory() -> int | None:
    """Bytes of host memory available now (Linux's MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_memory_needed(plan: Plan, *, world: int, cuda: bool) -> tuple[int, str]:
    """(bytes, what they are) of host memory this machine needs for `plan` run by `world` local workers:
    the plan's host memory per node (the largest of its steady state, its load and its final save, see
    `gkd.planner.memory.host_memory`), and on the CPU each worker's device peak as well, since there the
    device is the host."""
    need, what = plan.host_bytes, f"the plan's host memory {human_bytes(plan.host_bytes)} per node"
    if not cuda:
        need += world * plan.peak_bytes
        what += (
            f" + {world} workers x its device peak {human_bytes(plan.peak_bytes)} (on the CPU, host memory)"
        )
    return need, what


def check_host_memory(plan: Plan, *, world: int, available: int | None, cuda: bool) -> None:
    """Refuse, before any worker starts, a job that needs more host memory than this machine has available
    (`host_memory_needed`), instead of letting the workers be killed; no check where it cannot be read."""
    if available is None:
        return
    need, what = host_memory_needed(plan, world=world, cuda=cuda)
    if need > available:
        names = ", ".join(f"{m['name']} ({int(m['params']) / 1e9:.2f}B)" for m in _model_entries(plan))
        raise InputError(
            f"{names} need {human_bytes(need)} of host memory here ({what}), but this machine has "
            f"{human_bytes(available)} of memory available; run smaller models (e.g. the tiny presets, see "
            "docs/run.md) or on a machine with more memory"
        )


def _model_entries(plan: Plan) -> list[dict[str, Any]]:
    models = plan.inputs.get("models", {})
    return [m for m in (*models.get("teachers", []), models.get("student", {})) if "name" in m]


# ----------------------------------------------------------------------------------------------------------
# Building the models


@dataclass(kw_only=True)
class Models:
    """The run's models before placement, and how to resolve its methods at a step."""

    student: Any  # a transformers model with its LM head
    teachers: list[Any]  # modules; a tensor-parallel teacher in workers: its TensorParallelSource
    loss: Any  # gkd.methods.DistillLoss
    student_spec: Any
    teacher_specs: list[Any]
    resolver: Resolver
    pretrained_teachers: tuple[bool, ...]


@dataclass(kw_only=True)
class Resolver:
    """The methods resolved at a step: re-resolved only where they can change (stages, schedules of layer
    rules), since resolving is pure Python but not free."""

    entries: tuple[dict[str, Any], ...]
    teacher_specs: list[Any]
    student_spec: Any
    total_steps: int
    fused_linear: bool
    _first: Any = None

    def at(self, step: int) -> Any:
        from gkd.methods import get, resolve

        if self._first is None:
            self._first = self._resolve(resolve, 0)
        static = not self._first.varies_with_step and not any(get(e["name"]).stages for e in self.entries)
        return self._first if static or step == 0 else self._resolve(resolve, step)

    def _resolve(self, resolve: Callable[..., Any], step: int) -> Any:
        resolved = resolve(
            [dict(e) for e in self.entries],
            self.teacher_specs,
            self.student_spec,
            step=step,
            total_steps=self.total_steps,
            fused_linear=self.fused_linear,
        )
        if resolved.chain:
            raise InputError("a chained method (takd) is a sequence of runs; run each link's plan on its own")
        return resolved


def training_dtype(plan: Plan) -> Any:
    import torch

    name = plan.inputs.get("config", {}).get("training", {}).get("dtype", "bfloat16")
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def has_weights(ref: str) -> bool:
    """Whether a model reference is a checkpoint folder with weights (loaded), not a config (random)."""
    path = Path(ref).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in WEIGHT_FILES)


def check_weights(ref: str, spec: Any) -> None:
    """Before any worker starts: the weights of the checkpoint folder `ref` must be readable and fit the model
    its config.json describes (`spec`), else InputError naming the file. Reads the safetensors headers (or a
    .bin's index through a memory map, onto the meta device), never the tensors, and compares them with the
    model built on the meta device: a tensor both name must have the same shape, and the files must hold
    every parameter of the model (a tied one under any of its names; names matched as
    `gkd.runtime.loading` matches them, which applies none of transformers' renamed or fused keys)."""
    from gkd.models import build_model

    folder = Path(ref).expanduser()
    stored = _stored_shapes(folder)
    from gkd.runtime.loading import matched_name, missing_parameters

    model = build_model(spec, device="meta")
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""

    def bare(name: str) -> str:
        return matched_name(name, prefix)

    found = {bare(name): (name, shape, where) for name, (shape, where) in stored.items()}
    for name, tensor in model.state_dict().items():
        if bare(name) in found:
            key, shape, where = found[bare(name)]
            if shape != tuple(tensor.shape):
                raise InputError(
                    f"{where} holds {key} of shape {list(shape)} but {folder / 'config.json'} makes it "
                    f"{list(tensor.shape)}: the weights belong to another model; put them next to the "
                    "config.json they were saved with"
                )
    params = [name for name, _ in model.named_parameters()]
    if params and not any(bare(name) in found for name in params):
        example = next(iter(stored), "nothing")
        raise InputError(
            f"the weights in {folder} hold none of the tensors of the {spec.model_type} model its "
            f"config.json describes (they hold {example}, it needs {params[0]}): put them next to the "
            "config.json they were saved with"
        )
    missing = missing_parameters(model, stored)
    if missing and stored:
        raise InputError(
            f"the weights in {folder} lack {missing[0]} of the model its config.json describes"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": save the whole model with its weights"
        )


def _stored_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """{tensor name: (shape, file)} of the weights in `folder`, from the files the loader reads
    (`gkd.runtime.loading.weight_files`: as `from_pretrained` picks them, safetensors first), from their
    headers; InputError naming the file that cannot be read."""
    from gkd.runtime.loading import weight_files

    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in weight_files(folder):
        shapes.update({k: (v, path) for k, v in _file_shapes(path).items()})
    return shapes


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of one weights file, from its header (safetensors) or through a memory map onto the
    meta device (a zip-format .bin; a legacy pickle .bin is read through once)."""
    import zipfile

    import torch

    from gkd.runtime.loading import damaged

    def unreadable(path: Path, err: BaseException | str) -> InputError:
        return damaged(path, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        if not zipfile.is_zipfile(path):
            with path.open("rb") as f:
                if f.read(1) != b"\x80":  # a legacy torch.save file is a pickle
                    raise unreadable(path, "neither a zip archive nor a pickle")
            # A legacy file cannot be memory-mapped: it is read once, its tensors placed on the meta device.
            state = torch.load(path, map_location="meta", weights_only=True)
        else:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except InputError:
        raise
    except Exception as err:  # safetensors, torch and zipfile raise many kinds
        raise unreadable(path, err) from None
    if not isinstance(state, Mapping):
        raise unreadable(path, "it holds no state dict")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _this_device() -> Any:
    """This worker's device: its CUDA device (`gkd.runtime.launch` sets it), else the CPU."""
    import torch

    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _build(
    ref: str,
    spec: Any,
    *,
    seed: int,
    dtype: Any,
    attention: str,
    device: Any,
    partitioned: bool,
    ds_config: dict[str, Any] | None,
) -> Any:
    """One model as the plan places it (see the module docstring and `gkd.runtime.loading`)."""
    from gkd.runtime.loading import build_partitioned, build_whole

    weights = ref if has_weights(ref) else None
    if spec.family == "bloom":
        attention = "eager"  # BLOOM computes attention in its own code
    if partitioned and ds_config is not None:
        return build_partitioned(
            spec, ds_config, weights=weights, seed=seed, attention=attention, dtype=dtype
        )
    return build_whole(spec, weights=weights, seed=seed, attention=attention, dtype=dtype, device=device)


def build_models(plan: Plan, *, seed: int, total_steps: int) -> Models:
    """The student, teachers and loss module with fixed-seed weights in the plan's training dtype (see the
    module docstring); every rank, and a single-process reference, builds the same weights."""
    import torch
    import torch.distributed as dist

    from gkd.methods import DistillLoss
    from gkd.planner.specs import load_spec

    map_large_allocations()  # freed tensors leave the process at once (gkd.runtime.memory)
    config = plan.inputs["config"]
    dtype = training_dtype(plan)
    attention = plan.strategy.attention
    teacher_refs = list(config["teachers"])
    t_specs = [load_spec(ref) for ref in teacher_refs]
    s_spec = load_spec(config["student"])
    resolver = Resolver(
        entries=tuple(config["methods"]),
        teacher_specs=t_specs,
        student_spec=s_spec,
        total_steps=total_steps,
        # "topk" (an offline teacher) is the fused top-k loss where the methods allow the fused path.
        fused_linear=plan.strategy.loss_path in ("fused_linear", "topk"),
    )
    resolved = resolver.at(0)
    placed = dist.is_initialized()
    device = _this_device() if placed else torch.device("cpu")
    # Each model from its own seed, so adding a teacher does not change the student's initial weights.
    stage3 = plan.strategy.student_zero_stage == 3
    student = _build(
        config["student"],
        s_spec,
        seed=seed,
        dtype=dtype,
        attention=attention,
        device=device,
        partitioned=placed and stage3,
        ds_config=plan.deepspeed.get("student"),
    )
    if config.get("student_init"):  # gkd.runtime.student_init: the teacher's tensors, in the same placement
        from gkd.runtime.student_init import apply_student_init

        apply_student_init(student, config, t_specs[0], s_spec, stage3=placed and stage3)
    release_freed_memory()  # the loading's staging buffers, before the next model loads
    placement = plan.strategy.teacher_placement
    if placement == "offline":
        placement = plan.strategy.offline_teacher_placement or "replicated"
    teachers, pretrained = [], []
    for i, (ref, spec) in enumerate(zip(teacher_refs, t_specs, strict=True)):
        cfg = plan.deepspeed["teachers"][i] if i < len(plan.deepspeed.get("teachers", [])) else None
        pretrained.append(has_weights(ref))
        if placed and placement == "tensor_parallel" and cfg is not None:
            # Built when placed, each rank materialising only its slice (gkd.runtime.tensor_parallel).
            from gkd.runtime.tensor_parallel import TensorParallelSource

            teachers.append(
                TensorParallelSource(
                    spec=spec,
                    weights=ref if has_weights(ref) else None,
                    seed=seed + 1 + i,
                    attention="eager" if spec.family == "bloom" else attention,
                    dtype=dtype,
                )
            )
            continue
        teacher = _build(
            ref,
            spec,
            seed=seed + 1 + i,
            dtype=dtype,
            attention=attention,
            device=device,
            partitioned=placed and placement in ("zero3", "zero3_offload") and cfg is not None,
            ds_config=cfg,
        )
        teachers.append(teacher.eval().requires_grad_(False))
        release_freed_memory()
    torch.manual_seed(seed + 1000)
    loss = DistillLoss(resolved, t_specs, s_spec).to(dtype)
    apply_recompute(student, plan.strategy.recompute_layers)
    return Models(
        student=student,
        teachers=teachers,
        loss=loss,
        student_spec=s_spec,
        teacher_specs=t_specs,
        resolver=resolver,
        pretrained_teachers=tuple(pretrained),
    )


# ----------------------------------------------------------------------------------------------------------
# Recompute


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.gkd_recompute = True  # type: ignore[attr-defined]
    return run


def apply_recompute(student: Any, layers: Sequence[int]) -> None:
    """Run exactly the student layers `layers` (0-based) under activation checkpointing."""
    from gkd.runtime.capture import transformer_layers

    blocks = transformer_layers(student)
    for i in layers:
        if not 0 <= i < len(blocks):
            raise InputError(
                f"the plan recomputes student layer {i} but the student has {len(blocks)} layers; "
                "plan again for this student"
            )
        block = blocks[i]
        if getattr(block.forward, "gkd_recompute", False):
            continue
        block.forward = _checkpointed(block.forward)


def recomputed_layers(student: Any) -> list[int]:
    """The student layers that run under activation checkpointing."""
    from gkd.runtime.capture import transformer_layers

    return [
        i for i, b in enumerate(transformer_layers(student)) if getattr(b.forward, "gkd_recompute", False)
    ]


# ----------------------------------------------------------------------------------------------------------
# The engine's module


@functools.cache
def _distill_module_class() -> type:
    """The DistillModule class, defined on first use so that importing this module imports no torch."""
    from torch import nn

    from gkd.runtime.step import distill_step

    class DistillModule(nn.Module):
        """The student and the loss extras; forward = one distillation step on a micro-batch.

        Set `teachers`, `resolved`, `step` and `total_steps` before calling it; it returns (total loss,
        {term: value}), a tuple so that DeepSpeed's ZeRO-3 hooks see the output tensors.
        """

        def __init__(self, student: nn.Module, loss: nn.Module) -> None:
            super().__init__()
            self.student = student
            self.loss = loss
            self.teachers: list[nn.Module] = []  # a list attribute: not submodules, not trained
            self.resolved: Any = None
            self.step = 0
            self.total_steps = 0
            self.tap_loss = "end"  # the plan's strategy.tap_loss
            self.stored: list[dict[str, Any]] | None = None  # this micro-batch's offline teacher outputs

        def forward(self, batch: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
            if self.resolved is None:
                raise RuntimeError("DistillModule.resolved is not set; set it to the step's resolved methods")
            # DistillLoss reads its terms from `resolved`; methods with stages change them during a run.
            self.loss.resolved = _with_extras_of(self.resolved, self.loss.resolved)
            out = distill_step(
                self.student,
                self.teachers,
                self.loss,
                batch,
                self.resolved,
                step=self.step,
                total_steps=self.total_steps,
                tap_loss=self.tap_loss,
                stored_teacher_taps=self.stored,
            )
            return out.total, out.terms

    return DistillModule


def _with_extras_of(new: Any, built: Any) -> Any:
    """`new` resolved methods, checked to use only extras that the loss module was built with."""
    have = {(e.name, e.shapes) for e in built.extras}
    missing = [e.name for e in new.extras if (e.name, e.shapes) not in have]
    if missing:
        raise InputError(
            f"the extras {missing} first appear in a later stage of their method, which `gkd run` does not "
            "support yet; run that stage on its own with the method's `stage` option"
        )
    return replace(new, extras=built.extras)


def distill_module(student: Any, loss: Any) -> Any:
    """A `DistillModule` (see `_distill_module_class`) holding `student` and `loss`."""
    return _distill_module_class()(student, loss)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed engines


@dataclass(kw_only=True)
class Engines:
    """The placed models of one rank."""

    student: Any  # the DeepSpeed engine around the DistillModule
    module: Any  # the DistillModule (engine.module)
    teachers: list[Any]  # modules to call: plain (replicated) or the engine's module (ZeRO-3)
    teacher_engines: list[Any]  # the ZeRO-3 engines (kept alive with the run), empty when replicated


def place_teacher(
    teacher: Any, cfg: dict[str, Any] | None, placement: str, *, device: Any, dtype: Any = None
) -> tuple[Any, Any]:
    """(module to call, engine or None): replicated on the device, held by a ZeRO-3 inference engine (no
    optimizer) with the plan's teacher config (`zero3`, `zero3_offload`), or split over a tensor-parallel
    group (`tensor_parallel`, `gkd.runtime.tensor_parallel`; in the training dtype `dtype`)."""
    if placement == "replicated" or cfg is None:
        return teacher.to(device), None
    if placement == "tensor_parallel":
        from gkd.runtime.tensor_parallel import (
            TensorParallelSource,
            build_tensor_parallel,
            place_tensor_parallel,
        )

        tp = int(cfg["tensor_parallel"]["tp_size"])
        if isinstance(teacher, TensorParallelSource):
            return build_tensor_parallel(teacher, tp=tp)
        return place_tensor_parallel(teacher.to(device), tp=tp, dtype=dtype)
    import deepspeed

    t_engine, _, _, _ = deepspeed.initialize(model=teacher, config=dict(cfg))
    t_engine.eval()
    return t_engine.module, t_engine


def make_engines(models: Models, plan: Plan, *, device: Any) -> Engines:
    """The student engine and the placed teachers (see the module docstring)."""
    import deepspeed

    module = distill_module(models.student, models.loss)
    student_cfg = dict(plan.deepspeed["student"])
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=student_cfg,
    )
    if plan.strategy.student_zero_stage == 3:
        # The loss extras are read inside DistillLoss, whose output (a LossOutput) ZeRO-3 cannot attach its
        # backward hooks to, and some are read as raw weights outside any module forward. As external
        # parameters of the DistillModule they are gathered for its whole forward and again when its
        # backward starts (its output is a tuple of tensors), so every use sees the full tensors.
        for p in module.loss.parameters():
            deepspeed.zero.register_external_parameter(module, p)
        if plan.strategy.loss_path == "fused_linear":
            # The fused-linear loss reads the LM-head weight directly, after the head's own forward.
            head = models.student.get_output_embeddings()
            deepspeed.zero.register_external_parameter(module, head.weight)
    teachers, teacher_engines = [], []
    for teacher, cfg in zip(models.teachers, plan.deepspeed["teachers"], strict=True):
        if plan.strategy.teacher_placement == "offline":
            teachers.append(teacher)  # a stand-in: its outputs come from the offline pass
            continue
        module, t_engine = place_teacher(
            teacher, cfg, plan.strategy.teacher_placement, device=device, dtype=training_dtype(plan)
        )
        teachers.append(module)
        if t_engine is not None:
            teacher_engines.append(t_engine)
    engine.module.teachers = teachers
    release_freed_memory()  # what deepspeed.initialize freed (whole-parameter copies while partitioning)
    return Engines(student=engine, module=engine.module, teachers=teachers, teacher_engines=teacher_engines)
