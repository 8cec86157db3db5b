"""The schedule of one training step, and the memory it implies.

`build_schedule(workload, strategy)` lays out the operations of one optimizer step in the order the runtime
runs them, each with the tensors it allocates and frees; `simulate(schedule)` replays it and returns the live
bytes per category at every operation, the peak and its moment. The planner's peak *is* this replay, so what
the plan predicts and what the executor follows are one and the same list.

Order of one micro-step (why this order):
1. Each online teacher runs its forward first, layer by layer, under no_grad, keeping only the requested taps
   (its activations are transient; the teacher's weights are resident, sharded or streamed per placement).
2. The student forward runs layer by layer, saving activations for backward (only the input of a recomputed
   layer, plus the tapped tensors its losses hold). With `tap_loss = layerwise`, each intermediate-tap loss
   runs as soon as its last student tap exists: the loss and its gradient with respect to the student taps are
   computed at once, the gradient is kept (student-tap sized) and the teacher taps it read are freed. With
   `end`, tap losses run after the student forward and hold every tap until the backward starts.
3. The logit loss: the fused-linear path takes the final hidden state and the LM-head weight and keeps only a
   chunk of logits at a time, computing the input and weight gradients in the forward; the plain path
   materialises student and teacher logits and keeps dL/dlogits, computed in the forward. Either way the
   teacher's logits (or final hidden state) are freed when the loss op ends.
4. The backward runs from the head down; a recomputed layer first re-runs its forward (allocating its saved
   activations again), then its backward frees them.
5. After grad_accum micro-steps, the optimizer step (its buffers are resident and counted in `static`; in a
   CPU plan of one micro-batch per step, the gradients and buckets exist from the backward to this step:
   `Workload.backward_allocs`).

An offline teacher adds one "offline" operation before training: the teacher pass that writes top-k
log-probs to disk, with its own resident teacher; it does not overlap training, so it is replayed on its own.

Generation (the `generation` config section) adds "generate" operations (`Generation`): on_policy's student
samples at the start of a micro-step, before the teachers' forward (the step then runs on the sample), and
sequence_kd's first teacher generates once before training: with the training's resident tensors ("before":
a live teacher generates as training places it, the student engine built) or, for an offline teacher, in
the offline phase beside the top-k pass's own resident teacher. Each holds the model's key/value cache, the
prompt's logits and one no-grad layer's workspace (gkd.planner.analysis.generation_allocs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gkd.planner.plan import CATEGORIES, Op, Schedule, Strategy, TensorAlloc


@dataclass(frozen=True, kw_only=True)
class ModelActivity:
    """Activation bytes of one model for one micro-batch (already scaled to the micro-batch).

    saved: bytes one layer's training forward saves for backward. checkpoint: what a recomputed layer keeps
    (its input). forward_workspace: transient bytes of one layer's no-grad forward (teacher) or forward
    intermediates not saved (student). backward_workspace: transient bytes of one layer's backward.
    embed_saved: what the embedding saves. layer_taps[i]: taps produced by layer i as (name, bytes,
    saved_by_layer); embed_taps: taps produced by the embedding; head_taps: final / logits.
    """

    name: str
    layers: int
    saved: int
    checkpoint: int
    forward_workspace: int
    backward_workspace: int
    embed_saved: int
    hidden_bytes: int
    layer_taps: tuple[tuple[tuple[str, int, bool], ...], ...]
    embed_taps: tuple[tuple[str, int, bool], ...] = ()
    head_taps: tuple[tuple[str, int, bool], ...] = ()


@dataclass(frozen=True, kw_only=True)
class LossTerm:
    """A loss term as the schedule needs it: the taps it reads (model-qualified, e.g. "s:q[3]", "t0:q[9]")."""

    name: str  # "method.term"
    taps: tuple[str, ...]
    logits: bool  # reads logits (the head-level loss) rather than intermediate taps
    # Bytes the term's kernel allocates and frees while it runs (a CPU plan's relation tiles:
    # gkd.planner.cpu_relation); 0 where the kernel works in on-chip memory.
    workspace: int = 0


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One generate op: `model` ("student", "teacher0") samples with `allocs` alive (all freed at its end);
    `phase` "micro" (on_policy), "before" or "offline" (sequence_kd; see the module docstring)."""

    model: str
    phase: str
    allocs: tuple[TensorAlloc, ...]


@dataclass(frozen=True, kw_only=True)
class Workload:
    """Everything the schedule needs besides the strategy: models' activity, loss terms, static bytes."""

    student: ModelActivity
    teachers: tuple[ModelActivity, ...]
    terms: tuple[LossTerm, ...]
    static: tuple[TensorAlloc, ...]  # resident tensors (model states, teacher weights, buffers, reserve)
    logit_loss_retained: int  # bytes the logit loss keeps from its forward until backward
    logit_loss_transient: int  # bytes it uses only while running (chunks, gathered teacher head)
    logit_backward_transient: int  # the logits' gradient, alive while the head's backward runs
    # The logit loss's own backward temporaries, freed before the backward reaches the head (the methods'
    # torch top-k KL: gkd.planner.analysis); their own op, so they do not add to the head's gradients.
    loss_backward_transient: int = 0
    offline_allocs: tuple[TensorAlloc, ...] = ()  # the offline teacher pass, when there is one
    topk_bytes: int = 0  # stored teacher outputs read per micro-batch (offline)
    # Tensors that exist from the backward to the end of the optimizer step, not for the whole step (a CPU
    # plan's gradients and reduction buckets: gkd.planner.analysis).
    backward_allocs: tuple[TensorAlloc, ...] = ()
    generation: tuple[Generation, ...] = ()  # the generate ops (the generation config section)


def _generate_op(g: Generation) -> Op:
    return Op(
        name=f"generate.{g.model}",
        kind="generate",
        model=g.model,
        phase=g.phase,
        allocs=g.allocs,
        frees=tuple(a.name for a in g.allocs),
    )


def layerwise_layer(taps: Sequence[str], student_layers: int) -> int | None:
    """Where a loss term runs with `tap_loss = layerwise`: after this student layer (-1: before layer 0), or
    None for the end of the forward (it reads logits, a stored top-k output, or a tap of the final layer).
    `taps` are the term's model-qualified taps ("s:q[3]", "t0:q[9]"). The runtime uses the same rule."""
    if any(x.endswith((":logits", ":topk")) for x in taps):
        return None
    where = max((_tap_layer(x.split(":", 1)[1]) for x in taps if x.startswith("s:")), default=-1)
    return where if where < student_layers else None


def _tap_layer(name: str) -> int:
    """The student layer after which tap `name` exists: hidden[i] after layer i-1, kind[i] after layer i,
    emb before layer 0 (-1), final / logits after the last layer (a large number)."""
    if name in ("emb",):
        return -1
    if name in ("final", "logits"):
        return 1 << 30
    kind, _, rest = name.partition("[")
    index = int(rest.rstrip("]"))
    return index - 1 if kind == "hidden" else index


def build_schedule(w: Workload, s: Strategy) -> Schedule:
    """The ordered operations of one optimizer step for strategy `s` (see the module docstring)."""
    ops: list[Op] = []
    st = w.student
    recompute = set(s.recompute_layers)
    online = s.teacher_placement != "offline"

    # Before training: sequence_kd's teacher generation, then the offline teacher pass.
    ops += [_generate_op(g) for g in w.generation if g.phase != "micro"]
    if w.offline_allocs:
        names = tuple(a.name for a in w.offline_allocs)
        ops.append(
            Op(
                name="offline.teacher_pass",
                kind="offline_teacher_pass",
                model="teacher0",
                phase="offline",
                allocs=w.offline_allocs,
                frees=names,
            )
        )

    # Which loss terms run where, and when each teacher tap is last read.
    head_terms = [t for t in w.terms if t.logits]
    tap_terms = [t for t in w.terms if not t.logits]
    term_at: dict[int, list[LossTerm]] = {}
    for term in tap_terms:
        at = layerwise_layer(term.taps, st.layers)
        where = st.layers if s.tap_loss == "end" or at is None else at  # st.layers: after the forward
        term_at.setdefault(where, []).append(term)

    # 0. The student's samples (on_policy): the micro-step's sequences are prompt + sample.
    ops += [_generate_op(g) for g in w.generation if g.phase == "micro"]

    # 1. Teachers (online).
    teacher_tap_bytes: dict[str, int] = {}
    if online:
        for ti, t in enumerate(w.teachers):
            prefix = f"t{ti}"
            stream = f"{prefix}.hidden"
            allocs = [TensorAlloc(name=stream, bytes=t.hidden_bytes, category="activations")]
            allocs += [
                TensorAlloc(name=f"{prefix}:{n}", bytes=b, category="taps") for n, b, _ in t.embed_taps
            ]
            ops.append(
                Op(
                    name=f"{prefix}.forward.embed",
                    kind="teacher_forward",
                    model=f"teacher{ti}",
                    taps=tuple(n for n, _, _ in t.embed_taps),
                    allocs=tuple(allocs),
                )
            )
            for i in range(t.layers):
                ws = f"{prefix}.workspace.{i}"
                allocs = [TensorAlloc(name=ws, bytes=t.forward_workspace, category="activations")]
                allocs += [
                    TensorAlloc(name=f"{prefix}:{n}", bytes=b, category="taps") for n, b, _ in t.layer_taps[i]
                ]
                ops.append(
                    Op(
                        name=f"{prefix}.forward.{i}",
                        kind="teacher_forward",
                        model=f"teacher{ti}",
                        layer=i,
                        taps=tuple(n for n, _, _ in t.layer_taps[i]),
                        allocs=tuple(allocs),
                        frees=(ws,),
                    )
                )
            allocs = [TensorAlloc(name=f"{prefix}:{n}", bytes=b, category="taps") for n, b, _ in t.head_taps]
            ops.append(
                Op(
                    name=f"{prefix}.forward.head",
                    kind="teacher_forward",
                    model=f"teacher{ti}",
                    taps=tuple(n for n, _, _ in t.head_taps),
                    allocs=tuple(allocs),
                    frees=(stream,),
                )
            )
            for coll in (t.embed_taps, t.head_taps, *t.layer_taps):
                for n, b, _ in coll:
                    teacher_tap_bytes[f"{prefix}:{n}"] = b
    elif w.topk_bytes:
        ops.append(
            Op(
                name="offline.load_topk",
                kind="load_topk",
                model="teacher0",
                taps=("logits",),
                allocs=(TensorAlloc(name="t0:topk", bytes=w.topk_bytes, category="taps"),),
            )
        )

    # Student taps: (name -> bytes, saved_by_layer) to size what losses hold.
    s_taps: dict[str, tuple[int, bool]] = {}
    for coll in (st.embed_taps, st.head_taps, *st.layer_taps):
        for n, b, saved in coll:
            s_taps[f"s:{n}"] = (b, saved)

    held_by_end: list[str] = []  # tensors the end-of-forward losses hold until the backward starts

    def run_terms(where: int) -> None:
        for term in term_at.get(where, []):
            teacher_reads = [x for x in term.taps if not x.startswith("s:")]
            student_reads = [x for x in term.taps if x.startswith("s:")]
            grad_bytes = sum(s_taps.get(x, (0, True))[0] for x in student_reads)
            ws = f"ws:{term.name}@{where}"
            work = (TensorAlloc(name=ws, bytes=term.workspace, category="loss_workspace"),)
            work = work if term.workspace else ()
            if s.tap_loss == "layerwise" and where < st.layers:
                grad = f"grad:{term.name}@{where}"
                ops.append(
                    Op(
                        name=f"loss.{term.name}@{where}",
                        kind="tap_loss",
                        model="student",
                        layer=where,
                        taps=term.taps,
                        losses=(term.name,),
                        allocs=(TensorAlloc(name=grad, bytes=grad_bytes, category="taps"), *work),
                        frees=(
                            *(x for x in teacher_reads if last_read.get(x) == term.name),
                            *(a.name for a in work),
                        ),
                    )
                )
                grads_at.setdefault(where, []).append(grad)
            else:
                # Held by autograd until backward: student taps that the layers do not save anyway.
                extra = [
                    TensorAlloc(name=f"held:{x}", bytes=s_taps[x][0], category="taps")
                    for x in student_reads
                    if x in s_taps and not s_taps[x][1] and f"held:{x}" not in held_names
                ]
                held_names.update(a.name for a in extra)
                held_by_end.extend(a.name for a in extra)
                held_by_end.extend(x for x in teacher_reads if last_read.get(x) == term.name)
                ops.append(
                    Op(
                        name=f"loss.{term.name}@end",
                        kind="tap_loss",
                        model="student",
                        layer=-1,
                        taps=term.taps,
                        losses=(term.name,),
                        allocs=(*extra, *work),
                        frees=tuple(a.name for a in work),
                    )
                )

    last_read: dict[str, str] = {}
    for where in sorted(term_at):
        for term in term_at[where]:
            for x in term.taps:
                if not x.startswith("s:"):
                    last_read[x] = term.name
    for term in head_terms:
        for x in term.taps:
            if not x.startswith("s:"):
                last_read[x] = term.name
    held_names: set[str] = set()
    grads_at: dict[int, list[str]] = {}

    # 2. Student forward.
    ops.append(
        Op(
            name="s.forward.embed",
            kind="student_forward",
            model="student",
            taps=tuple(n for n, _, _ in st.embed_taps),
            allocs=(TensorAlloc(name="s.saved.embed", bytes=st.embed_saved, category="activations"),),
        )
    )
    run_terms(-1)
    for i in range(st.layers):
        rc = i in recompute
        tapped_saved = sum(b for n, b, saved in st.layer_taps[i] if saved and not _is_hidden(n))
        # A recomputed layer keeps its input and the tensors its losses read (never more than it would save).
        kept = min(st.checkpoint + tapped_saved, st.saved) if rc else st.saved
        ws = f"s.workspace.{i}"
        allocs = (
            TensorAlloc(name=f"s.saved.{i}", bytes=kept, category="activations"),
            TensorAlloc(name=ws, bytes=st.forward_workspace, category="activations"),
        )
        ops.append(
            Op(
                name=f"s.forward.{i}",
                kind="student_forward",
                model="student",
                layer=i,
                recompute=rc,
                taps=tuple(n for n, _, _ in st.layer_taps[i]),
                allocs=allocs,
                frees=(ws,),
            )
        )
        run_terms(i)

    # 3. Losses after the forward: intermediate taps (end) and the logit loss.
    run_terms(st.layers)
    if head_terms:
        teacher_reads = sorted({x for t in head_terms for x in t.taps if not x.startswith("s:")})
        if not online:
            teacher_reads = ["t0:topk"]  # the stored top-k stands in for the teacher's logits
        allocs = [
            TensorAlloc(name="loss.retained", bytes=w.logit_loss_retained, category="loss_workspace"),
            TensorAlloc(name="loss.transient", bytes=w.logit_loss_transient, category="loss_workspace"),
        ]
        frees = ["loss.transient"]
        # The logit kernels compute their gradients in the forward, so what the teacher gave is freed here.
        if not online:
            frees.append("t0:topk")
        else:
            frees += [x for x in teacher_reads if last_read.get(x) in {t.name for t in head_terms}]
        ops.append(
            Op(
                name="loss.logits",
                kind="logit_loss",
                model="student",
                taps=tuple(teacher_reads),
                losses=tuple(t.name for t in head_terms),
                allocs=tuple(allocs),
                frees=tuple(frees),
            )
        )

    # 4. Backward.
    frees = (["loss.retained"] if head_terms else []) + held_by_end
    if w.loss_backward_transient:
        ops.append(
            Op(
                name="s.backward.loss",
                kind="student_backward",
                model="student",
                allocs=(
                    TensorAlloc(
                        name="s.grad.loss", bytes=w.loss_backward_transient, category="loss_workspace"
                    ),
                ),
                frees=("s.grad.loss",),
            )
        )
    ops.append(
        Op(
            name="s.backward.head",
            kind="student_backward",
            model="student",
            allocs=(
                TensorAlloc(name="s.grad.head", bytes=w.logit_backward_transient, category="activations"),
                *w.backward_allocs,
            ),
            frees=tuple(["s.grad.head", *frees]),
        )
    )
    for i in range(st.layers - 1, -1, -1):
        if i in recompute:
            tapped_saved = sum(b for n, b, saved in st.layer_taps[i] if saved and not _is_hidden(n))
            again = st.saved - min(st.checkpoint + tapped_saved, st.saved)
            ops.append(
                Op(
                    name=f"s.recompute.{i}",
                    kind="student_recompute",
                    model="student",
                    layer=i,
                    recompute=True,
                    allocs=(
                        TensorAlloc(name=f"s.recomputed.{i}", bytes=max(again, 0), category="activations"),
                    ),
                )
            )
        ws = f"s.grad.{i}"
        frees = [ws, f"s.saved.{i}"] + ([f"s.recomputed.{i}"] if i in recompute else []) + grads_at.get(i, [])
        ops.append(
            Op(
                name=f"s.backward.{i}",
                kind="student_backward",
                model="student",
                layer=i,
                allocs=(TensorAlloc(name=ws, bytes=st.backward_workspace, category="activations"),),
                frees=tuple(frees),
            )
        )
    # Teacher taps no loss reads (none, when methods resolve consistently) go at the end of the micro-step.
    unread = sorted(n for n in teacher_tap_bytes if n not in last_read)
    tail = ["s.saved.embed", *grads_at.get(-1, []), *unread]
    ops.append(Op(name="s.backward.embed", kind="student_backward", model="student", frees=tuple(tail)))

    # 5. Optimizer step.
    ops.append(
        Op(
            name="optimizer.step",
            kind="optimizer_step",
            model="student",
            phase="step",
            frees=tuple(a.name for a in w.backward_allocs),
        )
    )
    return Schedule(grad_accum=s.grad_accum, ops=tuple(ops), static=w.static)


def _is_hidden(name: str) -> bool:
    # A layer's output hidden[i+1] is the next layer's input: saved there, not counted twice.
    return name.startswith("hidden[")


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """Replay of a schedule: total live bytes at each op (at its high point), the peak and its breakdown."""

    op_names: tuple[str, ...]
    totals: tuple[int, ...]
    peak_bytes: int
    peak_op: str
    by_category: dict[str, int]


def simulate(schedule: Schedule) -> Timeline:
    """Replay the schedule once (one micro-step, then the step ops): live bytes = static + what the ops
    allocated and have not freed. An op's own allocations count at its high point; its frees apply after.
    Offline ops run before training, so they are replayed against the reserve only, not the training
    static."""
    static_total = sum(a.bytes for a in schedule.static)
    reserve_total = sum(a.bytes for a in schedule.static if a.category == "reserve")
    live: dict[str, TensorAlloc] = {}
    live_total = 0
    names: list[str] = []
    totals: list[int] = []
    best = -1
    best_op = ""
    best_live: dict[str, TensorAlloc] = {}
    best_offline = False
    for op in schedule.ops:
        offline = op.phase == "offline"
        for a in op.allocs:
            if a.name in live:
                live_total -= live[a.name].bytes
            live[a.name] = a
            live_total += a.bytes
        total = live_total + (reserve_total if offline else static_total)
        names.append(op.name)
        totals.append(total)
        if total > best:
            best, best_op, best_live, best_offline = total, op.name, dict(live), offline
        for name in op.frees:
            gone = live.pop(name, None)
            if gone is not None:
                live_total -= gone.bytes
    by_cat = dict.fromkeys(CATEGORIES, 0)
    if best < 0:
        best = static_total
    for a in schedule.static:
        if not best_offline or a.category == "reserve":
            by_cat[a.category] += a.bytes
    for a in best_live.values():
        by_cat[a.category] += a.bytes
    return Timeline(
        op_names=tuple(names), totals=tuple(totals), peak_bytes=best, peak_op=best_op, by_category=by_cat
    )
