"""A local multi-instance deployment: Redis, ``gateway serve`` processes and a real HAProxy.

Used by ``scripts/multi_instance.py`` and ``tests/scale/test_multi_instance.py``.

- :class:`RedisServer`: a private ``redis-server`` on a free port (no persistence), or
  an existing Redis given by URL; the gateways get a key prefix of their own.
- :class:`GatewayProcess`: one ``python -m gateway serve`` child in a process group of
  its own (its speech worker processes join that group), logging to a file; it can be
  SIGKILLed and started again on the same port.
- :class:`Balancer`: HAProxy 2.6 from Debian with a config generated from the rules of
  ``deploy/haproxy/haproxy.cfg`` (round robin for HTTP, ``timeout tunnel`` for
  WebSockets, stickiness only for ``/v4/interact/socket``, ``/readyz`` checks,
  ``option redispatch`` + ``retries``), servers on 127.0.0.1 and fast check intervals;
  its admin socket reads server states and puts servers in and out of maintenance.

Every process is started with ``start_new_session=True`` and stopped by its own id
(the gateways by their process group id, so their speech workers go too).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from tests.conftest import listener_on, reserved_port

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_COMMAND = (sys.executable, "-m", "gateway", "serve")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def _stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``proc`` (its own session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    else:  # the leader is gone (e.g. SIGKILLed); children of its group may remain
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc); 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_members(pgid: int) -> list[int]:
    """Process ids whose process group is ``pgid`` (Linux /proc), zombies excluded."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A Redis for the run: ``url`` given (kept running), else a private redis-server."""

    def __init__(self, url: str | None, workdir: Path) -> None:
        self.url = url or ""
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        if self.url:
            if not redis_answers(self.url):
                raise RuntimeError(f"no Redis answers at {self.url}")
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.05)
        return self

    @property
    def private(self) -> bool:
        return self.proc is not None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM)
            self.proc = None


# --------------------------------------------------------------------------- gateways


class GatewayProcess:
    """A ``gateway serve`` child on a fixed port (see the module doc)."""

    def __init__(
        self, name: str, env: dict[str, str], log_path: Path, log_level: str = "warning"
    ) -> None:
        self.name = name
        self.log_level = log_level
        # held for the run and handed to each life as a listening socket (--fd): no other
        # process takes it between the choice and a start, or a kill and the restart
        self.port = reserved_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # only the settings given: none of this shell's GATEWAY_* (GATEWAY_APP_KEYS, ...)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.env = {**inherited, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.old: list[subprocess.Popen[bytes]] = []  # earlier lives (killed), reaped at stop
        self.starts = 0

    def spawn(self) -> None:
        """Start the process (does not wait; see :meth:`wait_ready`)."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} of {self.name} on port {self.port}\n".encode())
            log.flush()
            with listener_on(self.port) as listener:
                where = ["--port", str(self.port), "--fd", str(listener.fileno())]
                self.proc = subprocess.Popen(
                    [*GATEWAY_COMMAND, *where, "--log-level", self.log_level],
                    env=self.env,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(listener.fileno(),),
                )

    async def wait_ready(self, within_s: float = 60.0) -> float:
        """Wait until /readyz answers 200; the seconds it took. RuntimeError otherwise."""
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=1.0) as client:
            for _ in range(int(within_s / 0.05) + 1):
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start (see {self.log_path})")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return time.monotonic() - t0
                if time.monotonic() - t0 > within_s:
                    break
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} was not ready within {within_s} s (see {self.log_path})")

    def kill(self) -> int:
        """SIGKILL the gateway process itself (a crash; its workers are not signalled).

        Returns its pid, which is also the process group id of its speech workers.
        """
        assert self.proc is not None
        pid = self.proc.pid
        self.proc.kill()
        self.proc.wait(10)
        self.old.append(self.proc)
        self.proc = None
        return pid

    def stop(self) -> None:
        """Stop this gateway and everything of its group, current and earlier lives."""
        for proc in [*self.old, *([self.proc] if self.proc else [])]:
            _stop_group(proc, signal.SIGKILL)
        self.old.clear()
        self.proc = None


# --------------------------------------------------------------------------- HAProxy


HAPROXY_CFG = """\
# Generated by tests/scale/cluster.py from the rules of deploy/haproxy/haproxy.cfg:
# servers on 127.0.0.1 instead of Docker DNS, fast health checks, an admin socket.
global
    log stdout format raw local0 info
    maxconn 4000
    stats socket {socket} mode 600 level admin

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # log only abnormal sessions (errors, connections cut by a dying server)
    option dontlog-normal
    option forwardfor
    # a request that could not be sent to its server (refused: a killed process) is
    # sent to another one; a request that reached a server is never sent twice
    option redispatch
    retries 3
    timeout connect 2s
    timeout http-request 15s
    timeout http-keep-alive 15s
    timeout queue 30s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
    timeout client-fin 30s
    timeout server-fin 30s
    timeout check 1s
    # fast checks: a killed process is out of rotation within ~{down_ms} ms
    default-server inter {inter_ms}ms fastinter {fast_ms}ms downinter {inter_ms}ms fall 2 rise 2

frontend http
    bind 127.0.0.1:{port}
    maxconn 4000
    monitor-uri /lb-healthz
    http-request set-header X-Forwarded-Proto http
    acl socketio path_beg /v4/interact/socket
    use_backend gateway_socketio if socketio
    default_backend gateway

# Everything but socket.io: round robin, no stickiness.
backend gateway
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host gateway
    http-check expect status 200
{servers}

# socket.io: sticky (cookie GW_SIO, else the source address).
backend gateway_socketio
    balance source
    hash-type consistent
    cookie GW_SIO insert indirect nocache httponly dynamic
    dynamic-cookie-key gateway-socketio
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host gateway
    http-check expect status 200
{servers}
"""

BACKENDS = ("gateway", "gateway_socketio")


@dataclass
class ServerState:
    """One server line of HAProxy's ``show stat``."""

    backend: str
    server: str
    status: str  # UP, DOWN, MAINT, "UP 1/2", ...
    current: int  # current sessions (connections; WebSocket tunnels included)
    total: int  # sessions so far


@dataclass
class Balancer:
    """HAProxy in front of ``servers`` ({name: port}), see the module doc."""

    servers: dict[str, int]
    workdir: Path
    inter_ms: int = 300
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "haproxy.sock"

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def config(self) -> str:
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} check" for name, port in self.servers.items()
        )
        return HAPROXY_CFG.format(
            socket=self.socket_path,
            port=self.port,
            servers=servers,
            inter_ms=self.inter_ms,
            fast_ms=max(self.inter_ms // 2, 100),
            down_ms=2 * max(self.inter_ms // 2, 100) + self.inter_ms,
        )

    def start(self) -> Balancer:
        binary = shutil.which("haproxy")
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.config_path.write_text(self.config())
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM)
            self.proc = None

    async def command(self, line: str) -> str:
        """One command on the admin socket; its answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(5):
                data = await reader.read()  # the socket closes after one command
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data.decode()

    async def states(self) -> list[ServerState]:
        """The servers of both backends, from ``show stat``."""
        text = (await self.command("show stat")).lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return [
            ServerState(
                row["pxname"], row["svname"], row["status"], int(row["scur"]), int(row["stot"])
            )
            for row in rows
            if row["pxname"] in BACKENDS and row["svname"] in self.servers
        ]

    async def wait(
        self, want: dict[str, str], within_s: float = 30.0, backends: tuple[str, ...] = BACKENDS
    ) -> float:
        """Wait until each server in ``want`` has that status (UP/DOWN/MAINT) in
        ``backends``; the seconds it took. TimeoutError otherwise."""
        t0 = time.monotonic()
        for _ in range(int(within_s / 0.02) + 1):
            with contextlib.suppress(OSError, TimeoutError):
                states = [s for s in await self.states() if s.backend in backends]
                if states and all(s.status == want[s.server] for s in states if s.server in want):
                    return time.monotonic() - t0
            if time.monotonic() - t0 > within_s:
                break
            await asyncio.sleep(0.02)
        raise TimeoutError(f"HAProxy servers did not reach {want} within {within_s} s")

    async def set_state(self, server: str, state: str, backends: tuple[str, ...]) -> None:
        """``set server <backend>/<server> state <ready|maint|drain>`` in ``backends``."""
        for backend in backends:
            answer = await self.command(f"set server {backend}/{server} state {state}")
            if answer.strip():
                raise RuntimeError(f"haproxy: {answer.strip()}")


_HTTPLOG = re.compile(
    r"^\S+ \[[^\]]+\] \S+ (?P<backend>[^/\s]+)/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+ \S+ \S+ "
    r"\S{4} \d+/\d+/\d+/\d+/(?P<redispatched>\+?)(?P<retries>\d+) "
)


@dataclass
class BalancerLog:
    """What HAProxy logged (abnormal sessions only: ``option dontlog-normal``)."""

    redispatched: int = 0
    """Requests or upgrades sent to another server after theirs refused the connection."""
    errors: dict[int, int] = field(default_factory=dict)
    """HAProxy's own 5xx answers by status (502: the server died with the request)."""


def read_balancer_log(path: Path) -> BalancerLog:
    """Summarise HAProxy's log at ``path`` (the format of ``option httplog``)."""
    summary = BalancerLog()
    if not path.exists():
        return summary
    for line in path.read_text(errors="replace").splitlines():
        match = _HTTPLOG.match(line)
        if match is None:
            continue
        if match["redispatched"]:
            summary.redispatched += 1
        status = int(match["status"])
        if status in (502, 503, 504):
            summary.errors[status] = summary.errors.get(status, 0) + 1
    return summary
