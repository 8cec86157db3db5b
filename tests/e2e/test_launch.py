"""gkd.runtime.launch: the process group works, and a failing worker becomes one error in the parent (exit 2
for InputError, 1 otherwise) without leaving its peers hanging in a collective."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gkd.errors import InputError
from gkd.runtime.launch import WorkerFailedError, launch

pytestmark = pytest.mark.slow


def _all_reduce(rank: int, world: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    value = torch.tensor([rank + 1.0])
    dist.all_reduce(value)
    env = f"{os.environ['RANK']} {os.environ['LOCAL_RANK']} {os.environ['WORLD_SIZE']}"
    Path(out, f"rank{rank}").write_text(f"{world} {value.item():g} {env}")


def _bad_input_on_rank1(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise InputError("the data source is empty; give a file with text")
    dist.barrier()  # rank 0 waits here for a peer that never comes


def _crash_on_rank0(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        raise ValueError("boom\nsecond line")
    dist.barrier()


def _silent_death(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        os._exit(3)
    dist.barrier()


def test_workers_form_a_process_group(tmp_path: Path) -> None:
    launch(_all_reduce, (str(tmp_path),), processes=2, timeout_s=120)
    assert Path(tmp_path, "rank0").read_text() == "2 3 0 0 2"
    assert Path(tmp_path, "rank1").read_text() == "2 3 1 1 2"


def test_input_error_in_a_worker_is_an_input_error() -> None:
    with pytest.raises(InputError, match="^the data source is empty; give a file with text$"):
        launch(_bad_input_on_rank1, processes=2, timeout_s=120)


def test_other_errors_name_the_rank_and_keep_the_traceback() -> None:
    with pytest.raises(WorkerFailedError, match=r"^worker 0 failed: ValueError: boom \(traceback: ") as info:
        launch(_crash_on_rank0, processes=2, timeout_s=120)
    message = str(info.value)
    assert "\n" not in message
    trace = Path(message.rsplit("traceback: ", 1)[1].rstrip(")"))
    assert "ValueError: boom" in trace.read_text()
    shutil.rmtree(trace.parent)


def test_a_worker_that_dies_silently_is_reported() -> None:
    with pytest.raises(WorkerFailedError, match="rank 1 exit code 3"):
        launch(_silent_death, processes=2, timeout_s=120)


def _killed(rank: int, world: int) -> None:
    import signal

    import torch.distributed as dist

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    dist.barrier()


def test_a_killed_worker_points_at_host_memory() -> None:
    with pytest.raises(WorkerFailedError, match=r"rank 1 exit code -9\); killed by signal 9, most often out"):
        launch(_killed, processes=2, timeout_s=120)


def test_a_stale_op_build_lock_does_not_hang_the_run(tmp_path: Path) -> None:
    """A worker killed while loading a DeepSpeed op leaves its build lock; the next run removes it when it
    is older than any build, instead of waiting for it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    from gkd.runtime.launch import STALE_LOCK_S

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    old = lock.stat().st_mtime - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    # Runs load no op by default now (gkd.runtime.launch); the lock of an op named to load is what matters.
    launch(_all_reduce, (str(tmp_path),), processes=2, timeout_s=120, cpu_ops=("ShareMemCommBuilder",))
    assert not lock.exists()
    assert Path(tmp_path, "rank0").read_text() == "2 3 0 0 2"


def test_a_killed_rank_outranks_its_peers_consequent_errors(tmp_path: Path) -> None:
    """Rank 1 killed by SIGKILL writes nothing; rank 0 then fails on the reset connection and writes its
    record. The cause reported is the killed rank, whichever order the two happened in."""
    import json

    from gkd.runtime.launch import _failure

    message = "RuntimeError: Connection reset by peer"
    record = {"rank": 0, "kind": "error", "message": message, "traceback": "t"}
    (tmp_path / "rank0.json").write_text(json.dumps(record))
    killed = _failure(tmp_path, {0: 1, 1: -9})
    assert str(killed).startswith("a worker died without reporting an error (rank 1 exit code -9); killed by")
    crashed = _failure(tmp_path, {0: 1, 1: -15})  # no kill: rank 0's own record is the cause
    assert str(crashed) == "worker 0 failed: RuntimeError: Connection reset by peer (traceback: t)"
    exited = _failure(tmp_path, {0: 1, 1: 3})  # rank 1 left on its own before rank 0 saw the closed pair
    expected = "a worker died without reporting an error (rank 1 exit code 3); see its output above"
    assert str(exited) == expected


def test_a_taken_port_starts_the_workers_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process binds the rendezvous port between `free_port()` and rank 0: the run starts again
    on another port instead of failing."""
    import socket

    from gkd.runtime import launch as launch_module

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        real = launch_module.free_port
        ports = [taken.getsockname()[1]]
        monkeypatch.setattr(launch_module, "free_port", lambda: ports.pop() if ports else real())
        launch(_all_reduce, (str(tmp_path),), processes=2, timeout_s=120)
    assert not ports
    assert Path(tmp_path, "rank0").read_text() == "2 3 0 0 2"


def _interrupted(rank: int, world: int) -> None:
    raise KeyboardInterrupt  # what Ctrl-C raises in every worker of the process group


def test_an_interrupted_run_leaves_no_error_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the error folders are made here
    with pytest.raises(WorkerFailedError):
        launch(_interrupted, processes=2, timeout_s=120)
    kept = list(tmp_path.glob("gkd-run-errors-*"))
    assert kept and all((k / "rank0.traceback.txt").is_file() for k in kept)  # a failure points into it

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the parent while the workers run

    for k in kept:
        shutil.rmtree(k)
    from gkd.runtime import launch as launch_module

    monkeypatch.setattr(launch_module, "_run_workers", stop)
    with pytest.raises(KeyboardInterrupt):
        launch(_all_reduce, (str(tmp_path),), processes=2, timeout_s=120)
    assert not list(tmp_path.glob("gkd-run-errors-*"))


def _parallel_work(rank: int, world: int, out: str) -> None:
    import torch

    a = torch.randn(256, 256)
    for _ in range(4):
        a = (a @ a).tanh()
    Path(out, f"rank{rank}").write_text(str(torch.get_num_threads()))


def test_a_parent_that_ran_threaded_work_forks_workers_that_do_not_hang(tmp_path: Path) -> None:
    """A process that ran multi-threaded torch work holds an OpenMP pool; a worker forked from it waited
    forever at its first parallel region (CI: a gkd run started in a test process after other tests had
    computed) until the worker's body ran in a thread of its own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        for _ in range(4):
            a = (a @ a).tanh()
        # One worker, so it gets every core (2 threads where there are 2 cores).
        launch(_parallel_work, (str(tmp_path),), processes=1, timeout_s=60)
    finally:
        torch.set_num_threads(threads)
    assert int(Path(tmp_path, "rank0").read_text()) == max(1, os.cpu_count() or 1)
