"""`gkd run` as one worker of a job that spans processes gkd did not start, or several nodes: the launcher's
environment (`from_environment`) and gkd's rendezvous over a TCPStore (`Rendezvous`).

Where the torch.distributed environment is set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from torchrun, the
deepspeed launcher or `gkd run --nnodes`; or SLURM_PROCID, SLURM_NTASKS and a node list under srun), each
process is one rank. They meet in a TCPStore at MASTER_ADDR:MASTER_PORT (hosted by global rank 0, or by
torchrun's agent when it says so, as torch's own env:// rendezvous does) before any process group exists:

1. `join`: every rank says which world size it was started for; rank 0 waits for all of them (at most the
   rendezvous timeout) and answers with the roster, or with one error every rank raises: a rank missing, two
   processes with the same rank, world sizes that disagree. A rank that cannot reach the store within the
   timeout fails on its own. So a job started wrongly ends in one line per node, within the timeout.
2. `publish` / `wait_for`: rank 0 runs the parent's checks once and hands the plan and settings to every
   rank through the store (the others wait; no process group, no collective timeout while it tokenizes).
3. `node_done` / `wait_node`: local rank 0 of each node does the node's share (its token cache, its run
   folder on node-local disks) while the node's other ranks wait.
4. `ready`: every rank waits for all the others to have done the above, then the process group is made over
   the same store (`init_group`). A rank that fails in steps 2-4 writes `abort` first, and every waiting rank
   stops with that line instead of waiting for a peer that will never come.

Values are JSON, not pickles: the store is reachable from the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from gkd.errors import GkdError, InputError

# The port rank 0 listens on when neither --master-port nor MASTER_PORT says (torchrun's default too); under
# SLURM without MASTER_PORT it is moved by the job id, so that two jobs on one node do not collide.
DEFAULT_PORT = 29500
# How long the ranks of a job wait for each other to join, by default (--rendezvous-timeout).
DEFAULT_TIMEOUT_S = 300.0
_POLL_S = 0.2
# How long rank 0, which hosts the store, waits for the others to read its error before it leaves.
LINGER_S = 10.0
# Set by `gkd run --nnodes` in its workers' environment: errors then name its flags, not a launcher's.
GKD_NODES_ENV = "GKD_NODE_LAUNCH"


@dataclass(frozen=True, kw_only=True)
class ClusterEnv:
    """This process's place in the job, as the launcher set it."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    node: str  # one name per node: its host name and node rank
    master_addr: str
    master_port: int
    source: str  # "torchrun", "SLURM", "gkd run --nnodes", ...: named in messages

    @property
    def fix(self) -> str:
        """How a user makes the ranks agree, for messages."""
        if self.source == "gkd run --nnodes":
            return "give every node the same --nnodes and --processes, and each its own --node-rank"
        return f"start every rank with the same world size ({self.source})"


def _int(env: dict[str, str], name: str, *, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise InputError(
                f"the launcher's environment sets no {name}; start gkd run with torchrun or srun"
            )
        return default
    try:
        return int(value.split("(")[0])  # SLURM_TASKS_PER_NODE-style "2(x3)"
    except ValueError:
        raise InputError(f"{name}={value!r} in the environment is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (what `scontrol show hostnames`
    prints first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise InputError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node")
    prefix, ranges = match.group(1), match.group(2)
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def from_environment(env: dict[str, str] | None = None) -> ClusterEnv | None:
    """This process's place in a launched job, or None when no launcher started it (see the module
    docstring). InputError when the environment is inconsistent."""
    env = dict(os.environ) if env is None else env
    host = socket.gethostname()
    if "RANK" in env and "WORLD_SIZE" in env:
        source = (
            "gkd run --nnodes"
            if GKD_NODES_ENV in env
            else "torchrun"
            if "TORCHELASTIC_RUN_ID" in env
            else "the launcher"
        )
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", default=0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=_int(env, "LOCAL_SIZE", default=1))
        node_rank = env.get("GROUP_RANK", env.get("CROSS_RANK", env.get("NODE_RANK", "0")))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise InputError(
                "RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is not; set both (torchrun and "
                "the deepspeed launcher do), or unset RANK and WORLD_SIZE to run gkd's own workers"
            )
        addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        source = "SLURM"
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", default=_int(env, "SLURM_NTASKS", default=1))
        local_rank = _int(env, "SLURM_LOCALID", default=0)
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", default=_int(env, "SLURM_TASKS_PER_NODE", default=1))
        node_rank = env.get("SLURM_NODEID", "0")
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        )
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = first_host(nodelist)
        else:
            raise InputError(
                "SLURM gives no node list (SLURM_JOB_NODELIST); set MASTER_ADDR to the first node"
            )
        job = _int(env, "SLURM_JOB_ID", default=0)
        port = _int(env, "MASTER_PORT", default=DEFAULT_PORT + job % 10000 if job else DEFAULT_PORT)
    else:
        return None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"{source} started rank {rank} of a world of {world}; a rank must be 0 to world - 1")
    if not 0 <= local_rank < max(local_world, local_rank + 1):
        raise InputError(f"{source} set a negative local rank ({local_rank})")
    if not 0 < port < 65536:
        raise InputError(f"the master port {port} is not a TCP port (1 to 65535)")
    return ClusterEnv(
        rank=rank,
        world=world,
        local_rank=local_rank,
        local_world=max(local_world, 1),
        node=f"{host}:{node_rank}",
        master_addr=addr,
        master_port=port,
        source=source,
    )


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null meanwhile (what C++ code writes there too)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Rendezvous:
    """The job's TCPStore and the steps of the module docstring, for one rank."""

    def __init__(self, env: ClusterEnv, timeout_s: float) -> None:
        from torch.distributed import TCPStore

        self.env, self.timeout_s = env, timeout_s
        self.training = False  # every rank is past `ready`: none of them reads the store any more
        where = f"{env.master_addr}:{env.master_port}"
        # torchrun's agent hosts the store itself and tells its workers so (torch's env:// does the same).
        hosted = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        try:
            with (
                _quiet_stderr()
            ):  # c10d logs each failed try to connect, with a C++ stack: the line below says it
                self.store = TCPStore(
                    env.master_addr,
                    env.master_port,
                    None,  # no waiting for the others in the constructor: `join` does, naming who is missing
                    hosted,
                    timedelta(seconds=timeout_s),
                    wait_for_workers=False,
                    multi_tenant=True,
                )
        except (RuntimeError, ValueError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            if hosted:
                raise InputError(
                    f"rank 0 cannot listen on {where} ({first}); choose a free port with --master-port "
                    "(or MASTER_PORT), or stop what holds it"
                ) from None
            raise InputError(
                f"cannot reach the master {where} within {timeout_s:g} s: check --master-addr and "
                "--master-port (MASTER_ADDR, MASTER_PORT), that node 0 is started and reachable from here, "
                "or raise --rendezvous-timeout"
            ) from None

    # -- keys --------------------------------------------------------------------------------------------
    def _set(self, key: str, value: Any) -> None:
        self.store.set(f"gkd/{key}", json.dumps(value))

    def _get(self, key: str) -> Any:
        with self._connection():
            return json.loads(self.store.get(f"gkd/{key}"))

    def _has(self, key: str) -> bool:
        with self._connection():
            return bool(self.store.check([f"gkd/{key}"]))

    def _count(self, key: str, add: int = 0) -> int:
        with self._connection():
            return int(self.store.add(f"gkd/{key}", add))

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        try:
            with _quiet_stderr():  # c10d logs a lost connection with a C++ stack; the error below says it
                yield
        except (RuntimeError, OSError):
            raise GkdError(
                f"lost the connection to the job's store at {self.env.master_addr}:{self.env.master_port} "
                "(rank 0 stopped)"
            ) from None

    def _linger(self, key: str, readers: int) -> None:
        """Rank 0 hosts the store: before it leaves with an error, the ranks that wait for it read it (at most
        `LINGER_S`)."""
        deadline = time.monotonic() + LINGER_S
        while time.monotonic() < deadline and self._count(key) < readers:
            time.sleep(_POLL_S)

    def _wait(self, keys: list[str], deadline: float | None) -> bool:
        """Wait until every key is there (True), until `deadline` (False), or until a rank aborts
        (InputError or GkdError with its line)."""
        while True:
            if self._has("abort"):
                failure = self._get("abort")
                self._count("abort-read", 1)
                error = InputError if failure["input"] else GkdError
                raise error(failure["message"])
            if all(self._has(k) for k in keys):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)

    # -- 1. join -----------------------------------------------------------------------------------------
    def join(self) -> None:
        env = self.env
        if int(self.store.add(f"gkd/count/{env.rank}", 1)) > 1:
            raise InputError(
                f"two processes joined as rank {env.rank} of {env.master_addr}:{env.master_port}; {env.fix}"
            )
        self._set(f"join/{env.rank}", {"world": env.world, "node": env.node})
        deadline = time.monotonic() + self.timeout_s
        if env.rank != 0:
            if not self._wait(["roster"], deadline + 5.0):
                raise InputError(
                    f"rank 0 did not confirm within {self.timeout_s:g} s that all {env.world} ranks joined; "
                    f"start every node, {env.fix}, or raise --rendezvous-timeout"
                )
            roster = self._get("roster")
            self._count("roster-read", 1)
            if "error" in roster:
                raise InputError(roster["error"])
            if roster["world"] != env.world:
                raise InputError(
                    f"this node was started for {env.world} ranks but rank 0 for {roster['world']}; {env.fix}"
                )
            return
        keys = [f"join/{r}" for r in range(env.world)]
        joined = self._wait(keys, deadline)
        error = ""
        if not joined:
            missing = [r for r in range(env.world) if not self._has(f"join/{r}")]
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            error = (
                f"only {env.world - len(missing)} of the {env.world} ranks joined within "
                f"{self.timeout_s:g} s (missing: rank {shown}); start every node, {env.fix}, or raise "
                "--rendezvous-timeout"
            )
        else:
            for r in range(1, env.world):
                other = self._get(f"join/{r}")
                if other["world"] != env.world:
                    error = (
                        f"the ranks disagree on the world size: rank 0 ({env.node}) was started for "
                        f"{env.world} ranks, rank {r} ({other['node']}) for {other['world']}; {env.fix}"
                    )
                    break
        self._set("roster", {"error": error} if error else {"world": env.world})
        if error:
            joined_others = sum(self._has(f"join/{r}") for r in range(1, env.world))
            self._linger("roster-read", joined_others)
            raise InputError(error)

    # -- 2. rank 0's checks ------------------------------------------------------------------------------
    def publish(self, what: dict[str, Any]) -> None:
        self._set("job", what)

    def wait_for_job(self) -> dict[str, Any]:
        self._wait(["job"], None)
        return dict(self._get("job"))

    # -- 3. the node's share -----------------------------------------------------------------------------
    def node_done(self) -> None:
        self._set(f"node/{self.env.node}", True)

    def wait_node(self) -> None:
        self._wait([f"node/{self.env.node}"], None)

    # -- 4. all ready ------------------------------------------------------------------------------------
    def ready(self) -> None:
        self._set(f"ready/{self.env.rank}", True)
        self._wait([f"ready/{r}" for r in range(self.env.world)], None)
        self.training = True

    def abort(self, err: BaseException) -> None:
        """Make every waiting rank stop with this rank's line (the first abort wins)."""
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        message = text if self.env.rank == 0 else f"rank {self.env.rank} ({self.env.node}): {text}"
        value = json.dumps({"input": isinstance(err, InputError), "message": message})
        try:
            self.store.compare_set("gkd/abort", "", value)
            if self.env.rank == 0 and not self.training:  # the others may be waiting: let them read it
                self._linger("abort-read", self.env.world - 1)
        except (GkdError, RuntimeError, OSError):
            pass  # the store is gone: the others fail on it anyway

    def init_group(self, backend: str) -> None:
        """The process group over this store (torch's default 30-minute timeout for collectives)."""
        import torch.distributed as dist

        dist.init_process_group(
            backend,
            store=dist.PrefixStore("gkd-pg", self.store),
            rank=self.env.rank,
            world_size=self.env.world,
        )
