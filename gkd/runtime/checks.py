"""What `gkd run`'s parent checks before any worker starts: the plan (read, or made for this run's processes),
the output folder, the data and tokenizer (tokenised here, once, for all workers), the weight files, the
offline pass's disk. Each failure is an InputError (exit 2, one line) or DoesNotFitError (exit 1)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import click

from gkd.errors import DoesNotFitError, InputError, shown
from gkd.planner.plan import Plan, human_bytes


def _is_plan_file(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deeply
        return False
    # Any key only a plan has makes it one (a damaged plan then gets the plan reader's message, not the
    # config reader's list of unknown keys).
    return isinstance(data, dict) and bool(_PLAN_ONLY_KEYS & set(data))


_PLAN_ONLY_KEYS = frozenset({"strategy", "schedule", "inputs", "alternatives", "provenance", "peak_bytes"})


def load_or_plan(
    target: str | None,
    *,
    processes: int,
    echo: Any = click.echo,
    per_node: int | None = None,
    config: Any = None,
) -> Plan:
    """The plan to run: read from a plan file (its GPU count must be the world size), or planned from a config
    (or the headline job when `target` is None) for `processes` GPUs, `per_node` of them on each node when
    the run spans nodes (`hardware.gpus_per_node`). `config`: plan that Config instead (a resumed run's own,
    for another number of processes)."""
    from gkd.config import apply_flags, default_config

    if target is not None and config is None:
        path = Path(target)
        try:
            regular, folder, exists = path.is_file(), path.is_dir(), path.exists()
        except OSError as err:  # a name longer than the file system takes
            raise InputError(f"cannot read {shown(target)}: {err.strerror or type(err).__name__}") from None
        if not regular:
            what = "is a folder" if folder else "is not a regular file" if exists else "does not exist"
            raise InputError(f"{target} {what}; give a config (YAML or JSON) or a plan from `gkd plan -o`")
        if _is_plan_file(path):
            plan = read_plan(path)
            gpus = int(plan.inputs["config"]["hardware"]["gpus"])
            if gpus != processes:
                raise InputError(
                    f"the plan {target} was made for {gpus} GPUs but this run has {processes} processes; "
                    f"re-plan with `gkd plan CONFIG --gpus {processes} -o plan.json` or run with "
                    f"--processes {gpus}"
                )
            if not plan.fits:
                raise DoesNotFitError(
                    f"the plan {target} does not fit: peak {human_bytes(plan.peak_bytes)} per GPU exceeds "
                    f"{human_bytes(plan.budget_bytes)}; `gkd plan` lists the smallest changes that fit"
                )
            return plan
    from gkd.planner.pipeline import plan as make_plan

    if config is None:
        config = _load_run_config(target, processes) if target is not None else default_config()
    _check_global_batch(config.training.global_batch, processes, target)
    config = apply_flags(config, gpus=processes)
    if per_node is not None:
        config = dataclasses.replace(
            config, hardware=dataclasses.replace(config.hardware, gpus_per_node=per_node)
        )
    if not _cuda():  # CPU processes: the plan counts the CPU code paths (gkd.config.HardwareConfig.device)
        config = dataclasses.replace(config, hardware=dataclasses.replace(config.hardware, device="cpu"))
    ov = config.overrides
    note = ""
    reason = tensor_parallel_blocker(config)
    if reason and ov.tensor_parallel is None and ov.teacher_placement != "tensor_parallel":
        # Plan among the placements this runtime can run for these teachers, so a config always gets the
        # best plan `gkd run` executes (a pinned tensor-parallel teacher is refused with the fix).
        config = dataclasses.replace(config, overrides=dataclasses.replace(ov, tensor_parallel=1))
        note = f"; tensor-parallel teachers left out: {reason}"
    echo(f"Planning for this run's {processes} processes (hardware.gpus = world size = {processes}{note}).")
    plan = make_plan(config)
    if not plan.fits:
        if config.hardware.device == "cpu":
            # CPU processes' device is the host: a machine without the memory is the first limit to name.
            from gkd.runtime.engines import available_host_memory, check_host_memory

            check_host_memory(plan, world=processes, available=available_host_memory(), cuda=False)
        command = " ".join(["gkd plan", *([target] if target else []), f"--gpus {processes}"])
        raise DoesNotFitError(
            f"the job does not fit: peak {human_bytes(plan.peak_bytes)} per GPU exceeds "
            f"{human_bytes(plan.budget_bytes)}; `{command}` lists the smallest changes that fit"
        )
    return plan


def read_plan(path: Path) -> Plan:
    """The plan in the file at `path`, checked as data from outside before anything runs it: every field's
    type and range (`Plan.from_dict`), its inputs as a config, its strategy against those inputs, and its
    DeepSpeed configs against the ones gkd generates for them (`check_plan`). InputError names the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"plan {path} is not UTF-8 text (byte {err.start}); write plans with `gkd plan -o`"
        ) from None
    except OSError as err:
        raise InputError(f"cannot read the plan {path}: {err.strerror or type(err).__name__}") from None
    try:
        plan = Plan.from_json(text)
        check_plan(plan)
    except InputError as err:
        raise InputError(f"plan {path}: {err}") from None
    return plan


def check_plan(plan: Plan) -> None:
    """Refuse a plan whose fields disagree with each other or with what gkd would generate from its inputs:
    the runtime executes the strategy and passes the DeepSpeed configs to deepspeed.initialize as they stand,
    so an edited plan could otherwise train nothing (grad_accum -3), run another placement than it names, or
    give DeepSpeed settings that write files anywhere (flops_profiler.output_file)."""
    from gkd.config import Config
    from gkd.planner.pipeline import deepspeed_configs, load_methods
    from gkd.planner.specs import load_spec

    data = plan.inputs.get("config")
    if not isinstance(data, dict):
        raise InputError("plan field inputs.config must be the resolved config; re-plan with `gkd plan -o`")
    try:
        config = Config.from_dict(data)
    except InputError as err:
        raise InputError(f"inputs.config: {err}") from None
    s, tr, gpus = plan.strategy, config.training, config.hardware.gpus
    if s.micro_batch * s.grad_accum * gpus != tr.global_batch:
        raise InputError(
            f"plan field strategy.micro_batch ({s.micro_batch}) x strategy.grad_accum ({s.grad_accum}) x "
            f"{gpus} GPUs is {s.micro_batch * s.grad_accum * gpus}, not the training.global_batch "
            f"{tr.global_batch} of its inputs; re-plan with `gkd plan CONFIG -o plan.json`"
        )
    if plan.schedule.grad_accum != s.grad_accum:
        raise InputError(
            f"plan field schedule.grad_accum ({plan.schedule.grad_accum}) is not strategy.grad_accum "
            f"({s.grad_accum}); re-plan with `gkd plan CONFIG -o plan.json`"
        )
    _check_strategy_choices(s, config.hardware.local_gpus)
    teachers = [load_spec(config.model_path(t)) for t in config.teachers]
    student = load_spec(config.model_path(config.student))
    if config.student_init is not None:  # as planning checks it (gkd.runtime.student_init)
        from gkd.runtime.student_init import check_student_init

        try:
            check_student_init(config.student_init, teachers[0], student)
        except InputError as err:
            raise InputError(f"inputs.config.student_init: {err}") from None
    bad_layers = [x for x in s.recompute_layers if x >= student.layers]
    if bad_layers:
        raise InputError(
            f"plan field strategy.recompute_layers names layer {bad_layers[0]}, but the student "
            f"{student.name} has {student.layers} layers; re-plan with `gkd plan CONFIG -o plan.json`"
        )
    methods = load_methods(config, teachers, student)  # the method options, checked as planning checks them
    from gkd.models import count_parameters

    # deepspeed_configs reads the chosen strategy and, of each model's facts, its parameter count (the bucket
    # caps): the plan's own facts' count, computed without tracing.
    t_facts = tuple(_Chosen(params=count_parameters(t)) for t in teachers)
    trainable = count_parameters(student) + methods.num_extra_parameters
    chosen = _Chosen(strategy=s)
    expected = json.loads(json.dumps(deepspeed_configs(config, chosen, t_facts, trainable)))  # type: ignore[arg-type]
    where = _first_difference(plan.deepspeed, expected, "deepspeed")
    if where is not None:
        raise InputError(
            f"plan field {where} is not what gkd generates for the plan's strategy and inputs; DeepSpeed "
            "settings come from the config (deepspeed:, training:): set them there and re-plan with "
            "`gkd plan CONFIG -o plan.json`"
        )


@dataclasses.dataclass(frozen=True)
class _Chosen:
    """What `deepspeed_configs` reads of a search result (the chosen strategy) and of a model's facts (its
    parameter count)."""

    strategy: Any = None
    params: int = 0


def _check_strategy_choices(s: Any, local_gpus: int) -> None:
    """The strategy's choices must be ones the planner could make together."""

    def refuse(field: str, why: str) -> InputError:
        return InputError(f"plan field strategy.{field} {why}; re-plan with `gkd plan CONFIG -o plan.json`")

    if s.teacher_placement == "tensor_parallel":
        if local_gpus % s.tensor_parallel:
            raise refuse(
                "tensor_parallel", f"({s.tensor_parallel}) must divide the {local_gpus} GPUs of a node"
            )
    elif s.tensor_parallel != 1:
        raise refuse(
            "tensor_parallel", f"is {s.tensor_parallel}, but the teacher placement is {s.teacher_placement}"
        )
    if len(set(s.recompute_layers)) != len(s.recompute_layers):
        raise refuse("recompute_layers", "names a layer twice")
    if s.student_offload == "optimizer+parameters" and s.student_zero_stage != 3:
        raise refuse("student_offload", "optimizer+parameters needs student_zero_stage 3")
    if s.student_offload != "none" and s.student_zero_stage == 0:
        raise refuse("student_offload", f"{s.student_offload} needs a student_zero_stage of 1, 2 or 3")
    if (s.teacher_placement == "offline") != (s.offline_teacher_placement not in ("", "offline")):
        raise refuse(
            "offline_teacher_placement",
            f"{shown(s.offline_teacher_placement)} does not go with the teacher placement "
            f"{s.teacher_placement}",
        )


def _first_difference(got: Any, expected: Any, where: str) -> str | None:
    """The path of the first place where `got` differs from `expected` (types compared too: true is not 1),
    or None when they are equal."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return where
        for key in got:
            if key not in expected:
                return f"{where}.{key}"
        for key, value in expected.items():
            if key not in got:
                return f"{where}.{key}"
            found = _first_difference(got[key], value, f"{where}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    return None if type(got) is type(expected) and got == expected else where


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_run_config(target: str, processes: int) -> Any:
    """The config at `target`, for a run whose GPU count is its number of processes (the file's own
    hardware.gpus need not divide its global batch); the fix for a global batch the processes do not divide
    names the config key, as `gkd run` has no --global-batch flag."""
    from gkd.config import GlobalBatchError, load_config

    try:
        return load_config(target, gpus=processes)
    except GlobalBatchError as err:
        _check_global_batch(err.batch, processes, target)
        raise


def _check_global_batch(batch: int, processes: int, target: str | None) -> None:
    """The run's processes must divide the global batch; the fix names the config key, as `gkd run` has no
    --global-batch flag."""
    if batch % processes:
        fewer = max(n for n in range(1, processes) if batch % n == 0)
        raise InputError(
            f"training.global_batch ({batch}) of {target or 'the headline job'} must be divisible by this "
            f"run's {processes} processes; set training.global_batch in the config to a multiple of "
            f"{processes} (e.g. {batch + processes - batch % processes}) or run with --processes {fewer}"
        )


def tensor_parallel_blocker(config: Any) -> str | None:
    """Why none of the tensor-parallel degrees the planner may pick can run these teachers, or None."""
    from gkd.planner.search import tensor_parallel_degrees
    from gkd.planner.specs import load_spec
    from gkd.runtime.tensor_parallel import unsupported_reason

    specs = [load_spec(config.model_path(ref)) for ref in config.teachers]
    for tp in tensor_parallel_degrees(config.hardware.local_gpus, [s.heads for s in specs]):
        for spec in specs:
            reason = unsupported_reason(spec.model_type, spec.kv_heads, tp)
            if reason:
                return f"{spec.name}: {reason}"
    return None


def check_out(out: Path) -> None:
    if out.is_symlink():
        # The run's folder is renamed onto OUT when it is done, which replaces no link (it failed after the
        # whole run): refused before it starts, naming the folder to give instead.
        target = os.readlink(out)
        where = out.resolve() if out.exists() else None
        fix = f"give the folder itself (--out {where})" if where is not None else "name a real folder"
        what = "" if where is not None else ", which leads nowhere"
        raise InputError(f"--out {out} is a symbolic link to {target}{what}; {fix}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; name a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not empty; choose another --out or remove it")
    # The folders above OUT are created as needed: the nearest one that exists must be writable.
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot write in {parent}; choose a writable --out")


def check_out_outside_data(out: Path, sources: list[str | None]) -> None:
    """OUT must not lie inside a data folder (a `datasets` folder) the run reads: the run's own files would
    change that folder, and with it the data's identity, so the run could never be resumed."""
    where = out.resolve()
    for source in sources:
        if source is None or not Path(source).is_dir():
            continue
        folder = Path(source).resolve()
        if where == folder or folder in where.parents:
            raise InputError(
                f"--out {out} is inside the data folder {source}: the run's files would change the data it "
                f"reads (and a resume would refuse it as changed); choose an --out outside {source}"
            )


def check_data(plan: Plan, data: str | None, processes: int, seed: int, echo: Any = click.echo) -> Any:
    """Open the data source and tokenizer as the workers will, so bad data fails before any process starts;
    a source not seen before is tokenised here, once, for all of them (see gkd.runtime.tokens). Returns the
    source's stored ids (a TokenFile)."""
    from gkd.planner.specs import load_spec
    from gkd.runtime.data import batches, data_options, load_tokenizer, prepare_tokens

    config = plan.inputs["config"]
    t_ref, s_ref = config["teachers"][0], config["student"]
    t_spec, s_spec = load_spec(t_ref), load_spec(s_ref)
    tokenizer = load_tokenizer(t_ref, t_spec)
    for spec in (s_spec, *(load_spec(r) for r in config["teachers"])):
        if tokenizer.vocab_size > spec.vocab:
            raise InputError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {spec.name} has a vocabulary of "
                f"{spec.vocab}; distil models that share the teacher's tokenizer"
            )
    options = data_options(config)
    if (config.get("generation") or {}).get("prompt_field"):  # sequence_kd reads that field as text
        from gkd.runtime.sequence_kd import prompt_options

        options = prompt_options(options, config["generation"]["prompt_field"])
    stored, built = prepare_tokens(data, tokenizer, options=options, show_progress=True)
    if built and data is not None:
        echo(
            f"Tokenized {data}: {stored.documents:,} documents, {stored.tokens:,} tokens "
            f"(stored in {stored.path})"
        )
    batches(
        data,
        tokenizer,
        seq_len=int(config["training"]["seq_len"]),
        micro_batch=plan.strategy.micro_batch,
        objective="mlm" if s_spec.is_encoder else "causal",
        rank=0,
        world=processes,
        seed=seed,
        options=options,
    )
    return stored


def eval_batches_in_one_pass(plan: Plan, stored: Any, world: int) -> int:
    """The micro-batches per rank that the held-out source holds without repeating a row (the rows of one
    shuffled pass, split over the ranks; see gkd.runtime.data)."""
    rows = stored.tokens // int(plan.inputs["config"]["training"]["seq_len"])
    return max(1, rows // (world * plan.strategy.micro_batch))


def check_weight_files(plan: Plan) -> None:
    """The weight files of every model given as a checkpoint folder, checked against its config.json before
    any worker loads them (headers only; `gkd.runtime.engines.check_weights`)."""
    from gkd.hub import fetch_weights
    from gkd.planner.specs import load_spec
    from gkd.runtime.engines import check_weights, has_weights

    config = plan.inputs["config"]
    for ref in dict.fromkeys([*config["teachers"], config["student"]]):
        fetch_weights(ref)  # a model from the Hugging Face cache: its weights, downloaded if allowed
        if has_weights(ref):
            check_weights(ref, load_spec(ref))
    if config.get("student_init") and not has_weights(config["teachers"][0]):
        raise InputError(
            f"student_init copies the teacher's weights, but teacher {config['teachers'][0]} has none (a "
            "preset or config.json); give a checkpoint folder with weights or drop student_init"
        )


def tokenizer_note(ref: str) -> str | None:
    """A note when the teacher whose tokenizer the run reads has weights but no tokenizer files: the data is
    then encoded with the built-in byte tokenizer, which is not what the teacher was trained with."""
    from gkd.runtime.data import _TOKENIZER_FILES, _tokenizer_folder
    from gkd.runtime.engines import has_weights

    if not has_weights(ref) or _tokenizer_folder(ref) is not None:
        return None
    return (
        f"teacher {ref} has weights but no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...): the "
        "data is encoded with the built-in byte tokenizer, not the teacher's own; copy its tokenizer files "
        "into that folder"
    )


# Windowed families whose mask builder ignores the position ids: a 4D block mask would replace their window
# masks, so they keep the position ids, and their packed documents see each other. Kept here, not in
# gkd.runtime.packing: it only words a note and changes no input, and packing.py is a source of the planner's
# shipped facts (a change there invalidates them).
CROSS_DOCUMENT_WINDOWED = frozenset({"modernbert"})


def cross_document_notes(config: dict[str, Any]) -> list[str]:
    """A note per model of the run (student, teachers) whose family gkd cannot keep packed documents apart
    in (gkd.runtime.packing: DeBERTa takes no 4D mask, ModernBERT's local layers would lose theirs to one;
    tests/runtime/test_packing.py checks that both still leak): its documents attend to each other."""
    from gkd.models import resolve_model
    from gkd.runtime.packing import UNSEPARATED_FAMILIES

    leaking = UNSEPARATED_FAMILIES | CROSS_DOCUMENT_WINDOWED
    notes = []
    for role, ref in [("student", config["student"])] + [("teacher", t) for t in config["teachers"]]:
        family = resolve_model(ref).hf_config.get("model_type")
        if family in leaking:
            notes.append(
                f"{role} {ref} is a {family} model: gkd packs documents into full rows, and its attention "
                "cannot be kept within a document, so packed documents attend to each other in its forward "
                "(see docs/run.md on packing)"
            )
    return notes


def check_offline_disk(plan: Plan, out: Path, *, steps: int, world: int) -> None:
    """An offline teacher pass stores k int32 indices and k bfloat16 log-probs per token of every micro-batch
    of every rank (`gkd.runtime.offline`): refuse a run whose disk next to OUT cannot hold them."""
    if plan.strategy.teacher_placement != "offline":
        return
    from gkd.runtime.offline import ENTRY_BYTES

    training = plan.inputs["config"]["training"]
    k = int(training.get("offline_topk", 64))
    tokens = steps * plan.strategy.grad_accum * plan.strategy.micro_batch * int(training["seq_len"])
    need = tokens * k * ENTRY_BYTES * world * len(plan.inputs["config"]["teachers"])
    where = out.resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise InputError(
            f"the offline teacher pass stores {human_bytes(need)} of top-k log-probs under OUT, but {where} "
            f"has {human_bytes(free)} free; free some disk, lower training.offline_topk or --steps, or "
            "choose a live teacher placement"
        )
