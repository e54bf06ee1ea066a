"""Real Redis topologies for the tests: a 3-master Redis Cluster and a Sentinel setup.

Each is started from the ``redis-server`` binary on free ports in a temporary
directory, waited for until it serves, and torn down (processes terminated, files
removed) at the end:

- :func:`start_cluster` — three ``redis-server --cluster-enabled yes`` masters joined
  by ``redis-cli --cluster create`` (no replicas); ready when every node says
  ``cluster_state:ok``. Yields the GATEWAY_REDIS_URL ``redis+cluster://h:p,h:p,h:p``.
- :func:`start_sentinel` — a master, one replica of it and one sentinel (quorum 1)
  monitoring it as ``mymaster``. Yields a :class:`SentinelSetup` whose ``url`` is
  ``redis+sentinel://127.0.0.1:<sentinel port>/0/mymaster``.
- :func:`start_server` and :func:`start_monitor` — a lone server, and a sentinel that
  names as ``mymaster`` whatever port it is given (a proxy in front of that server, so
  that every connection the gateway makes to the master goes through it).

The sentinel runs as ``redis-server <conf> --sentinel`` (what the redis-sentinel
binary is), so only the redis-server package (and redis-cli, same package) is needed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

SERVICE = "mymaster"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return path


def _wait(what: str, check: object, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_ours(what: str, servers: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    """Wait until each ``(proc, port)`` answers on its port as itself (``INFO server``'s
    process_id is its pid): the ports were only free a moment ago, and another process
    (another xdist worker's server) may have bound one first; then that ``proc`` exited
    (address already in use) and what answers there is not ours. Raises RuntimeError
    then, at once, rather than let the tests talk to another run's server."""
    for proc, port in servers:
        with redis.Redis(port=port, socket_connect_timeout=1) as client:

            def ours(proc: subprocess.Popen[bytes] = proc, client: redis.Redis = client) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} on port {port} exited (port taken?)")  # noqa: B023 (called at once)
                return int(client.info("server")["process_id"]) == proc.pid

            _wait(f"{what} on port {port}", ours)


def _server(args: list[str], cwd: Path, log: str) -> subprocess.Popen[bytes]:
    with open(cwd / log, "wb") as out:
        return subprocess.Popen(
            [_binary("redis-server"), *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


_COMMON = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


@contextlib.contextmanager
def start_cluster() -> Iterator[str]:
    """A 3-master Redis Cluster on free ports; yields its ``redis+cluster://`` URL."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = _free_ports(6)
        data, bus = ports[:3], ports[3:]
        for port, bus_port in zip(data, bus, strict=True):
            node_dir = tmp / str(port)
            node_dir.mkdir()
            procs.append(
                _server(
                    [
                        "--port", str(port),
                        "--cluster-enabled", "yes",
                        "--cluster-port", str(bus_port),
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000",
                        *_COMMON,
                    ],
                    node_dir,
                    "redis.log",
                )
            )  # fmt: skip
        _wait_ours("cluster node", list(zip(procs, data, strict=True)))
        clients = [redis.Redis(port=p, socket_connect_timeout=1) for p in data]
        subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster", "create",
                *(f"127.0.0.1:{p}" for p in data),
                "--cluster-replicas", "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )  # fmt: skip
        for client in clients:
            _wait("cluster_state:ok", lambda c=client: c.cluster("info")["cluster_state"] == "ok")
            client.close()
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in data)
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class SentinelSetup:
    """A running master + replica + sentinel; ``url`` is the gateway's Sentinel URL."""

    url: str
    sentinel_port: int
    data_ports: list[int] = field(default_factory=list)

    def sentinel(self) -> redis.Redis:
        """A (sync) client of the sentinel itself."""
        return redis.Redis(port=self.sentinel_port, socket_timeout=5, decode_responses=True)

    def master_port(self) -> int:
        """The port of the current master, as the sentinel says."""
        with self.sentinel() as s:
            _host, port = s.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def wait_replicated(self, master_port: int, timeout_s: float = 10) -> None:
        """Wait until the replica has everything the master had when called.

        On a loaded machine a replica can lag by a second or more; a forced failover
        then loses the writes it had not received (Redis's replication is
        asynchronous), which is not what the failover test is about.
        """
        with redis.Redis(port=master_port, socket_timeout=2) as master:
            target = int(master.info("replication")["master_repl_offset"])
        replica = next(p for p in self.data_ports if p != master_port)

        def caught_up() -> bool:
            with redis.Redis(port=replica, socket_timeout=2) as r:
                return int(r.info("replication").get("slave_repl_offset", -1)) >= target

        _wait("the replica to catch up", caught_up, timeout_s)

    def failover(self, timeout_s: float = 20) -> int:
        """Wait until the replica caught up (:meth:`wait_replicated`), ``SENTINEL
        FAILOVER``, then wait until the sentinel names the other server as master and
        that server says ``role:master``; returns the new master's port."""
        old = self.master_port()
        self.wait_replicated(old)

        def started() -> bool:
            # NOGOODSLAVE while the sentinel's view of the replica is not fresh: retry
            with self.sentinel() as s:
                try:
                    return bool(s.execute_command("SENTINEL", "FAILOVER", SERVICE))
                except redis.ResponseError as exc:
                    if "NOGOODSLAVE" in str(exc):
                        return False
                    raise

        _wait("SENTINEL FAILOVER to be accepted", started, timeout_s)
        new = next(p for p in self.data_ports if p != old)

        def switched() -> bool:
            if self.master_port() != new:
                return False
            with redis.Redis(port=new, socket_timeout=2) as r:
                return bool(r.info("replication")["role"] == "master")

        _wait("the failover", switched, timeout_s)
        return new


def _replica_in_sync(master_port: int) -> bool:
    with redis.Redis(port=master_port, socket_timeout=2) as r:
        info = r.info("replication")
        return bool(info.get("connected_slaves", 0) >= 1 and info["slave0"]["state"] == "online")


@contextlib.contextmanager
def start_sentinel() -> Iterator[SentinelSetup]:
    """A master, one replica and one sentinel (quorum 1) on free ports."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        master, replica, sentinel = _free_ports(3)
        # a full sync starts at once, not after the default 5 s wait for more replicas
        fast_sync = [*_COMMON, "--repl-diskless-sync-delay", "0"]
        for port in (master, replica):
            (tmp / str(port)).mkdir()
        procs.append(_server(["--port", str(master), *fast_sync], tmp / str(master), "redis.log"))
        procs.append(
            _server(
                ["--port", str(replica), "--replicaof", "127.0.0.1", str(master), *fast_sync],
                tmp / str(replica),
                "redis.log",
            )
        )
        _wait_ours("data server", list(zip(procs, (master, replica), strict=True)))
        _wait("replication", lambda: _replica_in_sync(master))
        conf = tmp / "sentinel.conf"
        conf.write_text(
            f"port {sentinel}\n"
            "bind 127.0.0.1\n"
            f"dir {tmp}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 2000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        procs.append(_server([str(conf), "--sentinel"], tmp, "sentinel.log"))
        setup = SentinelSetup(
            url=f"redis+sentinel://127.0.0.1:{sentinel}/0/{SERVICE}",
            sentinel_port=sentinel,
            data_ports=[master, replica],
        )
        _wait_ours("sentinel", [(procs[-1], sentinel)])

        def knows_replica() -> bool:
            with setup.sentinel() as s:
                return any(
                    r["flags"] == "slave" and r["master-link-status"] == "ok"
                    for r in s.sentinel_slaves(SERVICE)
                )

        _wait("the sentinel to see the replica", knows_replica)
        yield setup
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def start_server() -> Iterator[int]:
    """A lone ``redis-server`` on a free port (no replica); yields the port."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-server-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (port,) = _free_ports(1)
        procs.append(_server(["--port", str(port), *_COMMON], tmp, "redis.log"))
        _wait_ours("the server", [(procs[0], port)])
        yield port
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def start_monitor(master_port: int, *, down_after_ms: int = 60_000) -> Iterator[SentinelSetup]:
    """One sentinel (quorum 1) naming ``127.0.0.1:master_port`` the master ``mymaster``
    (a server of :func:`start_server`, or a proxy in front of it: the sentinel's own
    links to the master go through it too). With no replica there is nothing to fail
    over to, and ``down_after_ms`` (60 s by default) keeps a link of the sentinel that
    went silent from marking the master down meanwhile (a lone sentinel makes a new
    link after ``down_after_ms / 2`` without an answer). Ready once the sentinel
    answers; yields a :class:`SentinelSetup` (``data_ports`` empty)."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-monitor-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (sentinel,) = _free_ports(1)
        conf = tmp / "sentinel.conf"
        conf.write_text(
            f"port {sentinel}\n"
            "bind 127.0.0.1\n"
            f"dir {tmp}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
        )
        procs.append(_server([str(conf), "--sentinel"], tmp, "sentinel.log"))
        setup = SentinelSetup(
            url=f"redis+sentinel://127.0.0.1:{sentinel}/0/{SERVICE}", sentinel_port=sentinel
        )
        _wait_ours("the sentinel", [(procs[0], sentinel)])

        def names_the_master() -> bool:
            with setup.sentinel() as s:
                return setup.master_port() == master_port and bool(s.ping())

        _wait("the sentinel", names_the_master)
        yield setup
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
