"""`gkd run` as ranks of a job that spans processes started elsewhere: one rank of a job that torchrun, the
deepspeed launcher or srun started (`run_as_rank`), and this node's workers of a job of `--nnodes` nodes
(`run_nodes`: gkd's launcher starts them with global ranks, and each is such a rank).

The ranks meet through gkd.runtime.cluster. Global rank 0 does what gkd's own parent does for a one-node run
(gkd.runtime.executor: the checks, the plan for the job's world size, publishing OUT), in its own process,
and trains as a rank too; it hands its plan and settings to the others. Local rank 0 of each other node
builds that node's token cache and, on node-local disks, the node's own run folder (`node_folder`).
docs/run.md, "Clusters", says what each node writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import click

from gkd.errors import GkdError, InputError
from gkd.planner.plan import Plan
from gkd.runtime.checks import check_data, check_out
from gkd.runtime.cluster import DEFAULT_PORT, ClusterEnv, Rendezvous, from_environment
from gkd.runtime.launch import (
    NodeSpec,
    WorkerFailedError,
    default_processes,
    init_deepspeed,
    launch,
    one_line,
    prepare_cpu,
    setup_worker,
)
from gkd.runtime.publishing import out_lock, run_in, settle
from gkd.runtime.settings import RunSettings
from gkd.runtime.signals import Terminated
from gkd.runtime.worker import train_worker

# Written by rank 0 into the run's folder: a node that finds it (with this run's id) shares that folder.
RUN_ID_FILE = ".gkd-run-id"


def run_as_rank(env: ClusterEnv, job: dict[str, Any], *, timeout_s: float, echo: Any) -> Path | None:
    """One rank of a launched job (gkd.runtime.cluster): rank 0 checks, plans for the job's world size and
    publishes OUT as `_run_job` does for gkd's own workers; the other ranks wait for its plan and train."""
    try:
        return _rank(env, job, timeout_s=timeout_s, echo=echo)
    except Exception as err:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # torchrun's summary of a failed job prints the error file of each failed worker.
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            with contextlib.suppress(Exception):
                ErrorHandler().record_exception(err)
        raise


def _rank(env: ClusterEnv, job: dict[str, Any], *, timeout_s: float, echo: Any) -> Path | None:
    import torch

    from gkd.runtime.executor import run_checked  # the parent's part of a run (it imports this module)

    # What DeepSpeed reads (srun sets SLURM_* only).
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world),
            "LOCAL_RANK": str(env.local_rank),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        prepare_cpu()
    setup_worker(env.local_rank, env.local_world, use_cuda)
    rendezvous = Rendezvous(env, timeout_s)
    rendezvous.join()
    if env.rank == 0:

        def start(plan: Plan, settings: RunSettings, world: int, tmp: Path, out_path: Path) -> None:
            _train_joined(env, rendezvous, plan, settings, tmp=tmp, out_path=out_path, run_id="")

        try:
            # The plan spans the job's nodes: as many GPUs per node as this node has ranks.
            per_node = env.local_world if env.world > env.local_world else None
            return run_checked(**job, processes=env.world, start=start, echo=echo, per_node=per_node)
        except BaseException as err:
            rendezvous.abort(err)  # the others stop with this line (they no longer listen once training)
            raise
    published = rendezvous.wait_for_job()
    settings = RunSettings(**{**published["settings"], "notes": tuple(published["settings"]["notes"])})
    _train_joined(
        env,
        rendezvous,
        Plan.from_json(published["plan"]),
        settings,
        tmp=Path(published["tmp"]),
        out_path=Path(published["out"]),
        run_id=published["run_id"],
    )
    return None


def _train_joined(
    env: ClusterEnv,
    rendezvous: Rendezvous,
    plan: Plan,
    settings: RunSettings,
    *,
    tmp: Path,
    out_path: Path,
    run_id: str,
) -> None:
    """Train as rank `env.rank` of a launched job. Rank 0 (run_id "") hands its plan and settings to the
    others first; local rank 0 of each other node builds that node's token cache and, on node-local disks,
    the node's own run folder (published to its OUT at the end, as rank 0 publishes the shared one)."""
    import torch

    own = None  # this node's run folder, when the run's folder is not shared with rank 0
    try:
        if env.rank == 0:
            run_id = secrets.token_hex(8)
            (tmp / RUN_ID_FILE).write_text(run_id)
            absolute = dataclasses.replace(settings, out=str(tmp.absolute()))
            rendezvous.publish(
                {
                    "plan": plan.to_json(),
                    "settings": dataclasses.asdict(absolute),
                    "tmp": str(tmp.absolute()),
                    "out": str(out_path.absolute()),
                    "run_id": run_id,
                }
            )
            _note_partial(tmp, out_path)
            rendezvous.node_done()
        elif env.local_rank == 0:
            # The token cache is per machine (GKD_CACHE_DIR): built here once for the node's ranks.
            check_data(plan, settings.data, env.world, settings.seed, lambda _: None)
            if settings.eval_data is not None:
                check_data(plan, settings.eval_data, env.world, settings.seed, lambda _: None)
            own = node_folder(tmp, out_path, run_id)
            if own is not None:
                _note_partial(own, out_path)
            rendezvous.node_done()
        else:
            rendezvous.wait_node()
        rendezvous.ready()
        if env.rank == 0:
            (tmp / RUN_ID_FILE).unlink()  # every node has looked for it
        rendezvous.init_group("nccl" if torch.cuda.is_available() else "gloo")
        init_deepspeed(torch.cuda.is_available())
    except BaseException as err:
        rendezvous.abort(err)
        raise
    if own is None:
        _train_rank(env, plan, settings)
    else:
        run_in(own, out_path, lambda: _train_rank(env, plan, settings))


def _train_rank(env: ClusterEnv, plan: Plan, settings: RunSettings) -> None:
    """`train_worker` in this process; a failure becomes WorkerFailedError, one line naming the rank and a
    file with its traceback (also handed to torchrun's error file, which its summary prints)."""
    import torch.distributed as dist

    try:
        train_worker(env.rank, env.world, plan.to_json(), settings)
        dist.barrier()  # every rank is done (the student saved, run.json written) before OUT is published
    except GkdError:
        raise
    except Exception as err:
        trace = Path(tempfile.mkdtemp(prefix="gkd-run-errors-")) / f"rank{env.rank}.traceback.txt"
        trace.write_text(traceback.format_exc())
        # A peer that stopped (on another node: its own line is there) breaks this rank's collective.
        lost = any(t in str(err) for t in ("Connection reset by peer", "Connection closed by peer"))
        why = "lost the connection to another rank, which stopped (see its node's output)" if lost else ""
        what = why or one_line(err)
        raise WorkerFailedError(f"worker {env.rank} failed: {what} (traceback: {trace})") from None
    dist.destroy_process_group()


def node_folder(tmp: Path, out_path: Path, run_id: str) -> Path | None:
    """This node's folder of the run: None when rank 0's `tmp` is visible here (shared storage), else `tmp`
    made on this node's disk, for its ranks' checkpoint parts (OUT must be new here too)."""

    def shared() -> bool:
        try:
            return (tmp / RUN_ID_FILE).read_text() == run_id
        except OSError:
            return False

    if shared():
        return None
    if tmp == out_path:
        raise InputError(
            f"{out_path} on this node is not the folder rank 0 resumes: a resumed run of several nodes needs "
            "its folder on storage that every node sees (docs/run.md, Clusters)"
        )
    check_out(out_path)
    try:
        tmp.mkdir(parents=True)
    except FileExistsError:
        # A shared file system that showed the folder late (a stale cache of its parent): mkdir asks the
        # server, so the folder is there; its id file follows.
        for _ in range(50):
            if shared():
                return None
            time.sleep(0.1)
        raise InputError(
            f"{tmp} exists on this node but is not this run's folder; remove it and start the run again"
        ) from None
    except OSError as err:
        raise InputError(f"cannot create {tmp} on this node ({err.strerror or err})") from None
    return tmp


# Where `gkd run --nnodes` tells its workers to note the run folder they own, for the clean-up after a
# worker that was killed (it cleans up after itself otherwise).
_STATE_ENV = "GKD_NODE_STATE"


def _note_partial(tmp: Path, out_path: Path) -> None:
    state = os.environ.get(_STATE_ENV)
    if state and tmp.absolute() != out_path.absolute():  # a resumed run's folder is OUT: it stays
        note = {"tmp": str(tmp.absolute()), "out": str(out_path.absolute())}
        (Path(state) / f"partial-{os.getpid()}.json").write_text(json.dumps(note))


def run_nodes(
    job: dict[str, Any],
    *,
    processes: int | None,
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    timeout_s: float,
    echo: Any,
) -> None:
    """`gkd run --nnodes N --node-rank R --master-addr HOST`: this node's workers of a job of N nodes, each a
    rank of it as under torchrun (`run_as_rank`); one line and exit code like gkd's own workers."""
    if nnodes is None:
        raise InputError("--node-rank, --master-addr and --master-port go with --nnodes N; give --nnodes")
    if nnodes < 1:
        raise InputError(f"--nnodes must be at least 1, got {nnodes}")
    if node_rank is None and nnodes > 1:
        raise InputError(
            f"--nnodes {nnodes} needs --node-rank R on each node (0 on the master, up to {nnodes - 1})"
        )
    node_rank = node_rank or 0
    if not 0 <= node_rank < nnodes:
        raise InputError(
            f"--node-rank {node_rank} is out of range for --nnodes {nnodes}: give 0 to {nnodes - 1}"
        )
    if master_addr is None and nnodes > 1:
        raise InputError(
            f"--nnodes {nnodes} needs --master-addr HOST: node 0's address, reachable from every node"
        )
    port = DEFAULT_PORT if master_port is None else master_port
    if not 0 < port < 65536:
        raise InputError(f"--master-port {port} is not a TCP port (1 to 65535)")
    per_node = processes if processes is not None else default_processes()
    world = nnodes * per_node
    first = node_rank * per_node
    echo(
        f"Node {node_rank} of {nnodes}: starting {per_node} worker process{'es' if per_node > 1 else ''}, "
        f"ranks {first} to {first + per_node - 1} of {world} ({'CUDA' if _cuda() else 'CPU, gloo'}), "
        f"meeting at {master_addr or '127.0.0.1'}:{port}"
    )
    state = Path(tempfile.mkdtemp(prefix="gkd-node-"))
    node = NodeSpec(
        nnodes=nnodes, node_rank=node_rank, master_addr=master_addr or "127.0.0.1", master_port=port
    )
    previous = os.environ.get(_STATE_ENV)
    os.environ[_STATE_ENV] = str(state)
    try:
        launch(_node_worker, (job, timeout_s), processes=per_node, node=node)
    except (WorkerFailedError, KeyboardInterrupt, Terminated) as err:
        # A worker killed before it could clean up (the parent's SIGTERM, SIGKILL) left its run folder and,
        # on rank 0, OUT's lock file: settle them as it would have.
        notes = [json.loads(note.read_text()) for note in state.glob("partial-*.json")]
        outs = {Path(n["out"]) for n in notes} | ({Path(job["out"])} if job["out"] else set())
        for out in outs:
            if out.parent.is_dir():
                with contextlib.suppress(InputError), out_lock(out):  # unless a run holds it
                    pass
        for left in notes:
            if Path(left["tmp"]).is_dir():
                settle(Path(left["tmp"]), Path(left["out"]), err)
        raise
    finally:
        shutil.rmtree(state, ignore_errors=True)
        if previous is None:
            os.environ.pop(_STATE_ENV, None)
        else:
            os.environ[_STATE_ENV] = previous


def _node_worker(rank: int, world: int, job: dict[str, Any], timeout_s: float) -> None:
    """One worker of `gkd run --nnodes` (gkd.runtime.launch set its rank in the environment)."""
    env = from_environment()
    assert env is not None and env.rank == rank and env.world == world
    run_as_rank(env, job, timeout_s=timeout_s, echo=click.echo if rank == 0 else lambda _: None)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
