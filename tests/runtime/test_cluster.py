"""gkd.runtime.cluster: reading a launcher's environment (torchrun, the deepspeed launcher, srun, gkd's own
--nnodes), and a node's run folder on shared storage or a node-local disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkd.errors import InputError
from gkd.runtime.cluster import DEFAULT_PORT, first_host, from_environment
from gkd.runtime.nodes import RUN_ID_FILE, node_folder


def test_no_launcher_no_cluster() -> None:
    assert from_environment({"PATH": "/bin"}) is None


def test_torchrun() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "x",
    }
    found = from_environment(env)
    assert found is not None
    assert (found.rank, found.world, found.local_rank, found.local_world) == (3, 4, 1, 2)
    assert (found.master_addr, found.master_port, found.source) == ("n0", 29400, "torchrun")
    assert found.node.endswith(":1")


def test_deepspeed_launcher_names_its_node_by_cross_rank() -> None:
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_RANK": "1"}
    found = from_environment({**env, "MASTER_ADDR": "n0", "MASTER_PORT": "29500"})
    assert found is not None and found.local_world == 2 and found.node.endswith(":1")


def test_slurm_takes_the_first_node_and_a_port_by_job() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    found = from_environment(env)
    assert found is not None
    assert (found.rank, found.world, found.local_rank, found.local_world) == (5, 8, 1, 4)
    assert (found.master_addr, found.master_port, found.source) == ("gpu07", DEFAULT_PORT + 3456, "SLURM")
    given = from_environment({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert given is not None and (given.master_addr, given.master_port) == ("head", 4000)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"), ("a-b[3,5]", "a-b3"), ("x.y.z,w", "x.y.z")],
)
def test_first_host(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR or MASTER_PORT is not"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 of a world of 2"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_an_inconsistent_environment_is_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        from_environment(env)


def test_a_node_shares_rank_0s_folder_or_makes_its_own(tmp_path: Path) -> None:
    tmp = tmp_path / ".out.partial-1-ab"
    tmp.mkdir()
    (tmp / RUN_ID_FILE).write_text("run-a")
    assert node_folder(tmp, tmp_path / "out", "run-a") is None  # shared storage: rank 0's folder
    elsewhere = tmp_path / "node1" / ".out.partial-1-ab"  # a node-local disk: this node's own
    assert node_folder(elsewhere, tmp_path / "node1" / "out", "run-a") == elsewhere and elsewhere.is_dir()
    with pytest.raises(InputError, match="is not this run's folder"):
        node_folder(tmp, tmp_path / "out", "run-b")  # another run's folder
