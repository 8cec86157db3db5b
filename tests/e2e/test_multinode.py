"""`gkd run` across "nodes" and under launchers, on this machine with gloo over 127.0.0.1: two
`gkd run --nnodes 2` processes, `torchrun -m gkd run` and a simulated srun give the per-step losses of
`gkd run --processes 2`; a worker killed on one node stops the other's; bad input is one line and exit 2 on
the node that sees it, within the rendezvous timeout.

Each "node" (or srun task) is a process forked from the test runner that runs the command line
(`gkd.cli.main`) with its own environment and output files, as a user's shell would start it; torchrun is
started as a user starts it, with `python -m gkd`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import transformers.models.llama.modeling_llama  # noqa: F401 (imported once here, not in each forked node)

import gkd.runtime.executor  # noqa: F401
import gkd.runtime.worker  # noqa: F401
from gkd.cli import main
from gkd.runtime.launch import in_fresh_thread

pytestmark = pytest.mark.slow

STEPS = "2"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], env: dict[str, str], log: str) -> None:
    """The body of a forked "node": `gkd ARGS` with `env` added, stdout and stderr to `log`.out/.err."""
    for fd, suffix in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{log}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (the process's own streams, to its end)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    os.environ.update(env)
    code = 0
    try:
        # In a fresh thread: a forked process cannot use its parent's OpenMP pool (see in_fresh_thread).
        in_fresh_thread(main, args)
    except SystemExit as done:
        code = int(done.code or 0)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Node:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.process = multiprocessing.get_context("fork").Process(
            target=_cli, args=(["run", *args], env or {}, str(log))
        )
        self.process.start()

    def wait(self, timeout: float = 600) -> int:
        self.process.join(timeout)
        assert self.process.exitcode is not None, f"{self.log} still running after {timeout} s"
        self.ended = time.monotonic()
        return self.process.exitcode

    @property
    def err(self) -> str:
        return Path(f"{self.log}.err").read_text()


@pytest.fixture(scope="module")
def job(models_dir: Path, job_config: Any, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The run's arguments: a tiny job, 2 steps."""
    config = tmp_path_factory.mktemp("job") / "job.json"
    # ZeRO-1 pinned: planned for two nodes of one process, the planner would leave ZeRO out (the student's
    # gradients would cross nodes twice), and the losses compared are those of the same strategy.
    config.write_text(json.dumps(job_config(models_dir, "llama", {"student_zero_stage": 1})))
    return [str(config), "--data", str(models_dir / "corpus.txt"), "--steps", STEPS, "--seed", "3"]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(job: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The losses of `gkd run --processes 2`: gkd's own two workers on one node."""
    folder = tmp_path_factory.mktemp("reference")
    node = Node([*job, "--out", str(folder / "out"), "--processes", "2"], folder / "log")
    assert node.wait() == 0, node.err
    losses = _losses(folder / "out")
    assert len(losses) == int(STEPS)
    return losses


def _nodes(job: list[str], out: Path, port: int) -> list[str]:
    return [
        *job,
        "--out",
        str(out),
        "--processes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]


def test_two_nodes_give_the_losses_of_one(job: list[str], reference: list[float], tmp_path: Path) -> None:
    out, port = tmp_path / "out", _port()
    nodes = [
        Node([*_nodes(job, out, port), "--nnodes", "2", "--node-rank", str(r)], tmp_path / f"node{r}")
        for r in (1, 0)  # the worker node may well start first
    ]
    assert [n.wait() for n in nodes] == [0, 0], nodes[0].err + nodes[1].err
    assert _losses(out) == reference
    assert (out / "student" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial folder
    assert json.loads((out / "run.json").read_text())["processes"] == 2


def test_torchrun_and_srun_give_the_losses_of_one_node(
    job: list[str], reference: list[float], tmp_path: Path
) -> None:
    """`torchrun --nproc-per-node 2 -m gkd run` (as in docs/run.md), and two tasks as srun starts them."""
    out = tmp_path / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "gkd", "run", *job, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting as rank 0 of the job's 2 ranks" in proc.stdout
    assert _losses(out) == reference

    out, port = tmp_path / "srun", _port()
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "2",
        "MASTER_PORT": str(port),
    }
    tasks = [
        Node(
            [*job, "--out", str(out)],
            tmp_path / f"task{r}",
            {**slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
        )
        for r in (1, 0)
    ]
    assert [t.wait() for t in tasks] == [0, 0], tasks[0].err + tasks[1].err
    assert _losses(out) == reference


def test_a_worker_killed_on_one_node_stops_the_other(job: list[str], tmp_path: Path) -> None:
    """Rank 1 (node 1) dies as a SIGKILL would, at the start of the first checkpoint: node 1 names it, node 0
    stops at once (its collective breaks) naming its own rank, and no OUT is published."""
    out, port = tmp_path / "out", _port()
    args = [*_nodes(job, out, port), "--nnodes", "2", "--save-every", "2", "--steps", "3"]
    killed = Node([*args, "--node-rank", "1"], tmp_path / "node1", {"GKD_TEST_KILL_AT": "1:2:start"})
    master = Node([*args, "--node-rank", "0"], tmp_path / "node0")
    assert killed.wait() == 1
    assert master.wait() == 1
    assert master.ended - killed.ended < 30
    assert killed.err.count("\n") == 1 and "(rank 1 exit code 9)" in killed.err, killed.err
    assert master.err.count("\n") == 1, master.err
    assert master.err.startswith("gkd: error: worker 0 failed: lost the connection to another rank"), (
        master.err
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_input_is_one_line_on_the_node_that_sees_it(job: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # --node-rank out of range: refused before anything starts.
    node = Node([*_nodes(job, out, _port()), "--nnodes", "2", "--node-rank", "2"], tmp_path / "range")
    assert node.wait() == 2
    assert node.err == "gkd: error: --node-rank 2 is out of range for --nnodes 2: give 0 to 1\n"
    # A launcher's environment that contradicts --processes.
    launched = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
    node = Node([*job, "--out", str(out), "--processes", "3"], tmp_path / "env", launched)
    assert node.wait() == 2
    assert node.err.count("\n") == 1 and "--processes 3 contradicts the launcher, which started 2" in node.err
    # An unreachable master: node 1 gives up after the rendezvous timeout.
    start = time.monotonic()
    unreachable = [
        *_nodes(job, out, _port()),
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rendezvous-timeout",
        "2",
    ]
    node = Node(unreachable, tmp_path / "unreachable")
    assert node.wait() == 2
    assert time.monotonic() - start < 60
    assert node.err.count("\n") == 1 and "cannot reach the master 127.0.0.1:" in node.err, node.err
    # Nodes started for different world sizes: both say so.
    port = _port()
    nodes = [
        Node(
            [*_nodes(job, out, port), "--nnodes", n, "--node-rank", r, "--rendezvous-timeout", "30"],
            tmp_path / f"w{r}",
        )
        for n, r in (("3", "1"), ("2", "0"))
    ]
    assert [n.wait(120) for n in nodes] == [2, 2]
    for n in nodes:
        assert n.err.count("\n") == 1 and "the ranks disagree on the world size" in n.err, n.err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
