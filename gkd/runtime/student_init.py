"""A student that starts from its teacher's weights
(`student_init: {from: teacher, layers: [...] | every: k}`), as DistilBERT, TinyBERT and MiniLM initialise
theirs when the widths match: the embeddings, the final norm and the LM head are the teacher's, and student
block i is teacher block `layers[i]`.

`check_student_init(init, teacher, student)` checks at plan time, from the two ModelSpecs, that every tensor
can be copied: the same architecture and widths, only the number of blocks differing, and one teacher block
named per student block. `copy_from_teacher(model, folder, layers, destination)` copies at load time, after
the student was built and filled as usual (`gkd.runtime.loading`), into whatever placement it has: whole on
its device, or each rank's own slice of every ZeRO-3 partition. It reads the teacher's weights files tensor
by tensor (or one rank's slice of a tensor), as the loading of any checkpoint does.

Design choices:
- All or nothing: every student parameter is copied, or the run is refused with one line naming the first
  tensor that does not fit (a shape the spec check cannot see, such as a bias one model has and the other
  lacks). A student half from its teacher and half random is not what `student_init` says.
- The teacher must be a checkpoint folder with weights: copying a randomly initialised teacher would only
  copy noise (`gkd.runtime.checks.check_weight_files` refuses it before any worker starts).
- Names: a teacher key is matched as `gkd.runtime.loading` matches checkpoint keys (with or without the
  model's `base_model_prefix`); a key inside the teacher's block list `P.j.` is renamed `P.i.` for the
  student block i that starts from teacher block j, and keys of blocks no student block takes are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gkd.errors import InputError
from gkd.runtime.loading import _Destination  # imports no torch

# The ModelSpec fields that shape the copied tensors: all but the number of blocks must be the teacher's.
_SHAPE_FIELDS = (
    ("family", "architecture"),
    ("hidden", "hidden size"),
    ("heads", "attention heads"),
    ("kv_heads", "key/value heads"),
    ("attn_head_dim", "attention head size"),
    ("ffn", "FFN size"),
    ("activation", "activation"),
    ("vocab", "vocabulary"),
    ("tied_embeddings", "tied embeddings"),
)


def check_student_init(init: Any, teacher: Any, student: Any) -> tuple[int, ...]:
    """The teacher block of each student block, or an InputError saying why the teacher's tensors cannot
    initialise the student (see the module docstring; the caller names student_init in the message).
    `init` is a `gkd.config.StudentInit`; `teacher` and `student` are ModelSpecs."""
    for key, what in _SHAPE_FIELDS:
        mine, theirs = getattr(student, key), getattr(teacher, key)
        if mine != theirs:
            raise InputError(
                f"the student's {what} is {mine} and the teacher's {theirs}, so the teacher's tensors cannot "
                "initialise it; give the student the teacher's shape (only the layer count may differ) or "
                "drop student_init"
            )
    layers = init.teacher_layers(teacher.layers)
    if len(layers) != student.layers:
        how = f"every: {init.every} picks" if init.every else "layers lists"
        raise InputError(
            f"{how} {len(layers)} of the teacher's {teacher.layers} layers, but the student has "
            f"{student.layers}; name one teacher layer per student layer"
        )
    beyond = [layer for layer in layers if layer >= teacher.layers]
    if beyond:
        raise InputError(
            f"layers names layer {beyond[0]}, but the teacher has {teacher.layers} layers "
            f"(0 to {teacher.layers - 1})"
        )
    return layers


def _block_prefix(model: Any, prefix: str) -> str:
    """The name of the model's block list ("layers", "transformer.h", "encoder.layer"), as matched."""
    from gkd.runtime.capture import transformer_layers
    from gkd.runtime.loading import matched_name

    blocks = transformer_layers(model)
    name = next(n for n, m in model.named_modules() if m is blocks)
    return matched_name(name, prefix) + "."


def teacher_key(name: str, blocks: str, student_of: dict[int, int]) -> str | None:
    """The student parameter name (as matched) a teacher key (as matched) fills: the same name, with the
    block index renamed inside the block list; None for a block no student block takes."""
    if not name.startswith(blocks):
        return name
    index, _, rest = name[len(blocks) :].partition(".")
    if not index.isdigit() or int(index) not in student_of:
        return None
    return f"{blocks}{student_of[int(index)]}.{rest}"


def copy_from_teacher(model: Any, folder: Path, layers: tuple[int, ...], destination: Any) -> None:
    """Overwrite every parameter of `model` (the student, built and filled) with its teacher tensor from the
    weights files of `folder`, into `destination` (a `gkd.runtime.loading` destination for the student's
    placement); InputError, one line, when a tensor is missing or of another shape."""
    from gkd.runtime.loading import copy_stored, matched_name, open_weights, weight_files

    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    blocks = _block_prefix(model, prefix)
    student_of = {teacher: student for student, teacher in enumerate(layers)}
    params = {matched_name(n, prefix): p for n, p in model.named_parameters(remove_duplicate=False)}
    unique = list(model.named_parameters())  # as built: copying may replace them (a whole model's)
    copied: set[int] = set()
    for path in weight_files(folder):
        with open_weights(path) as tensors:
            for stored in tensors:
                name = teacher_key(matched_name(stored.name, prefix), blocks, student_of)
                param = params.get(name) if name is not None else None
                if param is None or id(param) in copied:
                    continue
                shape = tuple(getattr(param, "ds_shape", None) or param.shape)
                if shape != stored.shape:
                    raise InputError(
                        f"student_init: the teacher's {stored.name} has shape {list(stored.shape)}, the "
                        f"student's {name} {list(shape)}; give the student the teacher's shape or drop "
                        "student_init"
                    )
                copy_stored(stored, param, destination)
                copied.add(id(param))
    missing = [n for n, p in unique if id(p) not in copied]
    if missing:
        raise InputError(
            f"student_init: the teacher's weights in {folder} have nothing for the student's {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; give the student the teacher's architecture or drop student_init"
        )


class InPlace(_Destination):
    """The destination of a whole student's parameters, already built and filled: each is overwritten in its
    own memory, so that the copy never holds a second student."""

    def wanted(self, param: Any) -> tuple[int, int]:
        return 0, param.numel()

    def direct(self, param: Any, dtype: Any) -> Any:
        flat = param.data.view(-1)
        return flat if flat.device.type == "cpu" and flat.dtype == dtype else None

    def put(self, param: Any, values: Any) -> None:
        param.data.view(-1).copy_(values.reshape(-1))


def apply_student_init(
    student: Any, config: dict[str, Any], teacher: Any, spec: Any, *, stage3: bool
) -> None:
    """Copy the first teacher's tensors into `student` (built and filled) as the resolved `config`'s
    student_init says: into each rank's ZeRO-3 partitions (`stage3`), else into its whole parameters, in
    place, on whatever device they are."""
    from gkd.config import student_init_from
    from gkd.runtime.loading import _Partitions

    init = student_init_from(config["student_init"])
    try:
        layers = check_student_init(init, teacher, spec)
    except InputError as err:  # a plan file's inputs: the plan names the pass, here it is named
        raise InputError(f"student_init: {err}") from None
    destination = _Partitions() if stage3 else InPlace()
    copy_from_teacher(student, Path(config["teachers"][0]).expanduser(), layers, destination)
