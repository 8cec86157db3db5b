"""Starting the worker processes of `gkd run`: one per CUDA device, or 2 on the CPU with gloo.

`launch(fn, args, processes=N)` starts N processes, sets the torch.distributed environment (MASTER_ADDR,
MASTER_PORT on a free local port, RANK, WORLD_SIZE, LOCAL_RANK), initialises the process group through
`deepspeed.init_distributed` (nccl on CUDA, gloo on the CPU) and calls `fn(rank, world, *args)` in each.

A worker's failure becomes one error in the parent: `InputError` (exit code 2) when a worker raised
InputError, `WorkerFailedError` (exit code 1) for anything else, its message one line naming the rank, the
exception and a file holding the full traceback. The other workers are killed as soon as one fails (a worker
left waiting in a collective would otherwise wait for its peers forever), and `timeout_s` bounds the whole
run.

Design choices:
- One node's workers. A job of several nodes (`node`, from `gkd run --nnodes`) starts this node's workers
  with global ranks; they meet the other nodes' workers through gkd.runtime.cluster, which also serves
  workers that torchrun or srun started. A worker's failure is reported on its own node; the other nodes'
  workers fail on the closed connections of their collectives.
- The rendezvous port is found free by the parent and bound by rank 0 a moment later; another process can
  take it in between (two runs starting at once). Rank 0 then records that, and the parent starts the
  workers again on another port, up to `PORT_ATTEMPTS` times.
- torch.multiprocessing, not DeepSpeed's launcher: the parent has validated the inputs and holds the plan, and
  the workers report their errors back through files the parent reads (one JSON file per failed rank), which
  survives any exception type and a worker that dies before it can send anything.
- On the CPU the workers are forked: the parent has imported torch, transformers and DeepSpeed already, and
  importing them again in each worker would take longer than a short run. The parent also loads the
  DeepSpeed ops the workers use (`cpu_ops`) before forking, so the workers inherit them loaded; with the
  plans gkd writes there is none unless the student's optimizer is offloaded (DeepSpeed's CPU Adam), so a
  first run compiles nothing. DeepSpeed's shared-memory collective op is not built either: gloo's
  collectives serve (the op is only a fast path of DeepSpeed's `inference_all_reduce`, which falls back to
  torch's all_reduce without it). Loading a JIT op takes a file lock in the torch extensions folder; a
  process killed while holding it (a peer's failure, Ctrl-C) leaves the lock behind, and torch
  would make every later run wait for it forever. So the parent waits for a lock itself, at most until the
  lock is `STALE_LOCK_S` old (a build takes about a minute), then removes it with a note. Each forked worker
  runs with `cores // processes` intra-op threads (at least 1), so the workers do not oversubscribe the
  cores, in a thread of its own (`in_fresh_thread`: a forked process cannot use its parent's OpenMP pool).
  CUDA workers are spawned (a CUDA context cannot be forked).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.errors import GkdError, InputError


class WorkerFailedError(GkdError):
    """A worker process failed for a reason other than bad input: exit code 1."""


def default_processes() -> int:
    """One process per CUDA device, else 2 on the CPU."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTakenError(RuntimeError):
    """Another process took the rendezvous port between `free_port()` and rank 0 binding it; the parent
    starts the workers again on another port."""


# Starts of the workers in one `launch`, each on a fresh port, before a taken port is reported as an error.
PORT_ATTEMPTS = 3


def one_line(err: BaseException) -> str:
    """The first line of `err`, after its type's name unless gkd raised it (its message says it all)."""
    text = str(err).strip().splitlines()
    if text and isinstance(err, GkdError):
        return text[0]
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """This node's place in a job of several (`gkd run --nnodes`): its workers get global ranks
    node_rank x processes + local rank, and meet at master_addr:master_port (gkd.runtime.cluster)."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def setup_worker(local_rank: int, local_world: int, use_cuda: bool) -> None:
    """What every worker process does first, whoever started it: its device or its share of the cores, and
    quiet libraries."""
    import logging
    import warnings

    import torch

    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    import deepspeed

    # The run's own progress lines are what the user reads: DeepSpeed logs its whole config at INFO and
    # warns about hooks it cannot attach where gkd attaches them itself (gkd.runtime.engines), torch warns
    # about a deprecated collective that DeepSpeed calls, and building the CPU comm op prints.
    deepspeed.utils.logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def init_deepspeed(use_cuda: bool) -> None:
    """DeepSpeed's communication over the process group (made from the environment when there is none)."""
    import io

    import deepspeed

    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)


def prepare_cpu() -> None:
    """Before CPU workers start (and are forked): see the module docstring."""
    # Naming the CPU accelerator spares DeepSpeed its detection and the warning it prints about it.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    # No shared-memory op (see the module docstring): DeepSpeed's process group then uses gloo alone.
    # (`deepspeed.comm.torch` as an attribute is torch itself, which deepspeed.comm re-exports.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _worker(
    local_rank: int,
    fn: Callable[..., None],
    args: Sequence[Any],
    processes: int,
    port: int,
    errors: str,
    use_cuda: bool,
    parent: int,
    node: NodeSpec | None,
) -> None:
    """The body of one worker: environment, process group, `fn`, and the error file on failure. With a
    `node`, `fn` makes the process group itself (gkd.runtime.cluster)."""
    _die_with(parent)
    rank = local_rank if node is None else node.node_rank * processes + local_rank
    world = processes if node is None else node.nnodes * processes
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1" if node is None else node.master_addr,
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(processes),
        }
    )
    if node is not None:
        os.environ.update({"GROUP_RANK": str(node.node_rank), "GKD_NODE_LAUNCH": "1"})
    code = 0
    try:
        if node is None:
            setup_worker(local_rank, processes, use_cuda)
            try:
                init_deepspeed(use_cuda)
            except Exception as err:
                if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
                    raise _PortTakenError(str(err)) from err
                raise
        if use_cuda:
            fn(rank, world, *args)
        else:
            in_fresh_thread(fn, rank, world, *args)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException as err:  # every failure must reach the parent, whatever it is
        code = 2 if isinstance(err, InputError) else 1
        trace = Path(errors) / f"rank{rank}.traceback.txt"
        trace.write_text(traceback.format_exc())
        kind = "input" if code == 2 else "port" if isinstance(err, _PortTakenError) else "error"
        # A WorkerFailedError (a rank of a job of several nodes) names its rank and traceback itself.
        kind = "reported" if isinstance(err, WorkerFailedError) else kind
        said = code == 2 or kind == "reported"
        record = {
            "rank": rank,
            "kind": kind,
            "message": str(err).strip().splitlines()[0] if said and str(err).strip() else one_line(err),
            "traceback": str(trace),
        }
        (Path(errors) / f"rank{rank}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        # Leave at once: no interpreter teardown, no waiting on peers that are stuck in a collective.
        os._exit(code)


def in_fresh_thread(fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` in a new thread and return or raise as it did. A forked CPU worker inherits its
    parent's OpenMP thread pool without the pool's threads (a test process, or a program calling gkd as a
    library, that ran multi-threaded torch work before): GNU OpenMP then waits for them forever at the
    worker's first parallel region. The pool belongs to the thread that made it; a new thread makes its own.
    The main thread waits in short joins, so that signals still reach it."""
    import threading

    import torch

    threads = torch.get_num_threads()  # OpenMP's thread count is per thread: carry the worker's over
    failure: list[BaseException] = []

    def body() -> None:
        torch.set_num_threads(threads)
        try:
            fn(*args)
        except BaseException as err:  # re-raised in the worker's main thread
            failure.append(err)

    worker = threading.Thread(target=body, name="gkd-worker", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failure:
        raise failure[0]


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the process that started it dies (Linux PR_SET_PDEATHSIG): a
    parent killed with SIGKILL runs no clean-up, and workers left running would go on writing into the
    run's folder (and holding its lock, gkd.runtime.executor) with nobody to publish it."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _failure(errors: Path, exit_codes: dict[int, int | None]) -> GkdError:
    """The parent's error for a failed run, by cause: an InputError in any rank; else a rank that died
    without a record (killed by SIGKILL, most often the out-of-memory killer, or exiting on its own: its
    peers then fail on a closed connection, and their records are consequences, whichever came first);
    else the first rank's own record; else the exit statuses. SIGTERM without a record is not a cause: it
    is how the peers of a failed worker are stopped."""
    records = []
    for path in sorted(errors.glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    records.sort(key=lambda r: (r["kind"] != "input", r["rank"]))
    if records and records[0]["kind"] == "input":
        return InputError(records[0]["message"])
    recorded = {r["rank"] for r in records}
    bad = {r: c for r, c in exit_codes.items() if c not in (0, None)}
    silent = {r: c for r, c in bad.items() if r not in recorded and c != -signal.SIGTERM}
    killed = any(c == -signal.SIGKILL for c in silent.values())
    reported = [r for r in records if r["kind"] == "reported"]
    if reported and not silent:
        return WorkerFailedError(reported[0]["message"])
    if records and not silent:
        first = records[0]
        return WorkerFailedError(
            f"worker {first['rank']} failed: {first['message']} (traceback: {first['traceback']})"
        )
    silent = silent or bad
    detail = ", ".join(f"rank {r} exit code {c}" for r, c in sorted(silent.items())) or "no exit code"
    hint = "; killed by signal 9, most often out of host memory" if killed else ""
    return WorkerFailedError(
        f"a worker died without reporting an error ({detail}){hint}; see its output above"
    )


# A DeepSpeed op build lock older than this was left by a killed process (a build takes about a minute).
STALE_LOCK_S = 300.0


def preload_cpu_ops(names: Sequence[str]) -> None:
    """Load (building them the first time) the DeepSpeed CPU ops `names` (op builder class names, e.g.
    "ShareMemCommBuilder") in this process, so that forked workers inherit them (see the module docstring)."""
    import contextlib
    import io

    from deepspeed.accelerator import get_accelerator

    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            continue
        _remove_stale_lock(builder.name)
        with contextlib.redirect_stdout(io.StringIO()):
            builder.load(verbose=False)


def _remove_stale_lock(op_name: str) -> None:
    """Wait for another process's build of `op_name` to release its lock, at most until the lock is
    STALE_LOCK_S old; then it was left by a killed process, and is removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(op_name, verbose=False)) / "lock"
    except ImportError:
        return
    waited = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return  # no lock: the usual case, or the build finished
        if age > STALE_LOCK_S:
            print(
                f"gkd: removing {lock}, a build lock left by an interrupted process {age / 60:.0f} min ago",
                file=sys.stderr,
            )
            lock.unlink(missing_ok=True)
            return
        if not waited:
            print(f"gkd: waiting for another process's build of DeepSpeed's {op_name} op", file=sys.stderr)
            waited = True
        time.sleep(1.0)


def launch(
    fn: Callable[..., None],
    args: Sequence[Any] = (),
    *,
    processes: int,
    timeout_s: float | None = None,
    cpu_ops: Sequence[str] = (),
    node: NodeSpec | None = None,
) -> None:
    """Run `fn(rank, world, *args)` in `processes` workers (see the module docstring); returns when all
    succeeded, raises InputError or WorkerFailedError otherwise. `fn` and `args` must be picklable when the
    workers are spawned (CUDA). `cpu_ops`: DeepSpeed ops loaded before forking CPU workers. `node`: this
    node's workers of a job of several nodes (global ranks; no port retries: every node names the port)."""
    import torch

    if processes < 1:
        raise InputError(f"--processes must be at least 1, got {processes}")
    use_cuda = torch.cuda.is_available()
    if use_cuda and processes > torch.cuda.device_count():
        raise InputError(
            f"--processes {processes} exceeds the {torch.cuda.device_count()} CUDA devices of this machine; "
            f"use --processes {torch.cuda.device_count()} or fewer"
        )
    if not use_cuda:
        # Imported once here, so that the forked workers share it instead of importing it each.
        prepare_cpu()
        preload_cpu_ops(cpu_ops)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for attempt in range(PORT_ATTEMPTS if node is None else 1):
        errors = Path(tempfile.mkdtemp(prefix="gkd-run-errors-"))
        try:
            _run_workers(fn, args, processes, errors, use_cuda, deadline, timeout_s, node)
            shutil.rmtree(errors, ignore_errors=True)  # kept only when a worker failed
            return
        except _PortTakenError:
            shutil.rmtree(errors, ignore_errors=True)
            if attempt == PORT_ATTEMPTS - 1:
                raise WorkerFailedError(
                    f"the workers' rendezvous port was taken by another process {PORT_ATTEMPTS} times in a "
                    "row; free some local ports or run again"
                ) from None
        except BaseException as err:
            # The folder stays only when an error message points into it: never after an interruption
            # (Ctrl-C, SIGTERM: not an Exception), nor when it is empty.
            if not isinstance(err, Exception) or (errors.is_dir() and not any(errors.iterdir())):
                shutil.rmtree(errors, ignore_errors=True)
            raise


def _run_workers(
    fn: Callable[..., None],
    args: Sequence[Any],
    processes: int,
    errors: Path,
    use_cuda: bool,
    deadline: float | None,
    timeout_s: float | None,
    node: NodeSpec | None,
) -> None:
    """One start of the workers on a fresh port; raises _PortTakenError when the port was taken meanwhile."""
    import torch.multiprocessing as mp

    port = free_port() if node is None else node.master_port
    first = 0 if node is None else node.node_rank * processes  # the global rank of local worker 0
    context = mp.start_processes(
        _worker,
        args=(fn, tuple(args), processes, port, str(errors), use_cuda, os.getpid(), node),
        nprocs=processes,
        join=False,
        start_method="spawn" if use_cuda else "fork",
    )
    try:
        while True:
            try:
                if context.join(timeout=1.0):
                    return
            except mp.ProcessExitedException:
                # torch has terminated the other workers already.
                if _port_taken(errors):
                    raise _PortTakenError() from None
                exit_codes = {first + i: p.exitcode for i, p in enumerate(context.processes)}
                failure = _failure(errors, exit_codes)
                if "traceback: " not in str(failure):
                    shutil.rmtree(errors, ignore_errors=True)  # kept only where the message points to it
                raise failure from None
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerFailedError(
                    f"the run did not finish within {timeout_s:.0f} s; its workers were stopped"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _port_taken(errors: Path) -> bool:
    """Whether a worker recorded that the rendezvous port was taken (see _PortTakenError)."""
    for path in errors.glob("rank*.json"):
        try:
            if json.loads(path.read_text())["kind"] == "port":
                return True
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return False
