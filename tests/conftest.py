"""Shared test fixtures: a real Redis, real servers on free ports, gateway processes.

Redis: GATEWAY_TEST_REDIS_URL when set; else the server on 127.0.0.1:6379 when it
answers; else a private ``redis-server`` started on a free port for the run.
Each test gets its own key prefix and its keys are deleted afterwards.

Redis topologies (tests/redis_topologies.py), started once per run when a test
first asks for them: ``redis_cluster_url`` (a 3-master Redis Cluster) and
``redis_sentinel`` (master + replica + sentinel). ``topology_url(request, kind)``
gives the GATEWAY_REDIS_URL of ``redis`` (the one server), ``cluster`` or
``sentinel``, for fixtures parametrised over them (``TOPOLOGIES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import uvicorn

from gateway.app import create_app
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.speech.audio import Pcm
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from tests.gateway.core_app import answering_core
from tests.gateway.redis_proxy import ReplyDropper
from tests.redis_topologies import SentinelSetup, start_cluster, start_sentinel
from tests.speech import SENTENCES

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

S_co = TypeVar("S_co", covariant=True)


class Stateful(Protocol[S_co]):
    """Anything with a ``state`` (a protocol machine's State, a breaker's state name)."""

    @property
    def state(self) -> S_co: ...


def state_of(machine: Stateful[S_co]) -> S_co:
    """``machine.state``, typed as declared rather than as an earlier assert narrowed it.

    mypy keeps ``assert call.state is State.BOT`` narrowing ``call.state`` across the
    method calls that change it, and calls a later ``assert call.state is State.CALLER``
    a non-overlapping check; reading the state through this function checks the same.
    """
    return machine.state


T = TypeVar("T")


async def unless_hung(awaitable: Awaitable[T], what: str, within_s: float = 30.0) -> T:
    """``await awaitable``, failing the test as ``hung: {what}`` when it takes more than
    ``within_s``: a guard against hanging, never the property a test checks.

    Only this guard's own deadline is "hung": a TimeoutError the awaitable raises itself
    (the code under test's timeout firing, a helper's receive timeout) propagates as it
    is, so a test can expect a product's TimeoutError (``pytest.raises``) through the
    guard, and a helper's timeout fails the test with its own message."""
    guard = asyncio.timeout(within_s)
    try:
        async with guard:
            return await awaitable
    except TimeoutError:
        if guard.expired():
            pytest.fail(f"hung: {what}")
        raise


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    within_s: float = 30.0,
    every_s: float = 0.01,
) -> None:
    """Wait until ``condition()`` (a function, or a coroutine function) is true, polling
    it every ``every_s`` seconds, under the hang guard :func:`unless_hung` (``hung:
    {what}`` after ``within_s``): for a state the code under test reaches in its own
    time (a task inside the pool, every place given back), where a fixed sleep only
    made it likely and a wall-clock bound failed on a loaded machine."""

    async def poll() -> None:
        while True:
            result = condition()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(every_s)

    await unless_hung(poll(), what, within_s)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: another process (another
    xdist worker's server) may take it before a server of this test binds it, so a child
    server is not started on it (:func:`reserved_port` and ``gateway serve --fd``, or
    checking that what answers there is that child: :func:`redis_server_ours`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_RESERVED: dict[int, socket.socket] = {}  # the sockets holding the ports of reserved_port


def _reuseport_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def reserved_port(port: int | None = None) -> int:
    """A TCP port on 127.0.0.1 (``port``, else a free one) that no other process can bind
    for the rest of the run: a socket of this process stays bound to it, not listening
    (a connection is refused while no server of this process listens there), with
    SO_REUSEPORT, so that only this process can bind it again (same user, SO_REUSEPORT
    too): :func:`listener_on` makes the listening socket a child server is handed
    (``gateway serve --fd``), again after a restart on the same port. Raises OSError
    (EADDRINUSE) when ``port`` is already bound by another process."""
    if port is not None and port in _RESERVED:
        return port
    held = _reuseport_socket()
    try:
        held.bind(("127.0.0.1", port or 0))
    except OSError:
        held.close()
        raise
    reserved: int = held.getsockname()[1]
    _RESERVED[reserved] = held
    return reserved


def listener_on(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port``, a port of :func:`reserved_port`
    (SO_REUSEPORT), inheritable: to hand to a child server (``--fd``, ``pass_fds``);
    close this process's copy once the child is spawned."""
    assert port in _RESERVED, "reserved_port() first"
    sock = _reuseport_socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def redis_server_ours(proc: subprocess.Popen[bytes], url: str) -> bool | None:
    """Whether the redis-server ``proc`` answers at ``url``: True when the server there
    answers PING and its ``INFO server`` process_id is ``proc``'s pid; None when not yet
    (nothing answers); False when ``proc`` exited (its port was taken: address already in
    use) or another process answers there (another xdist worker's server took the port
    first), so the caller starts it again on another port."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        with client:
            pid = int(client.info("server")["process_id"])
    except redis.RedisError:
        return False if proc.poll() is not None else None
    return pid == proc.pid


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on TCP ``port`` (IPv4 or IPv6,
    Linux: /proc/net/tcp*, /proc/PID/fd): for a child that binds its port itself (the
    image's command, ``GATEWAY_PORT``), so that an answer on the port is known to be its,
    not another xdist worker's server's that took the port first."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return True
    return False


def serve_refused(env: dict[str, str], *args: str) -> str:
    """Run ``gateway serve`` (this tree first on PYTHONPATH) with ``env`` added to the
    environment and ``args`` after its own; assert it refuses to start (exit 2) and
    return what it wrote to stderr. The port is one of :func:`refused_port`: a child that
    went as far as binding it fails (exit 3), never serving on another process's port."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(refused_port()), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    return done.stderr


_HELD: list[socket.socket] = []  # the sockets holding the ports of refused_port


def refused_port() -> int:
    """A TCP port on 127.0.0.1 where a connection is refused for the rest of the run: a
    socket of this process stays bound to it without listening, so no server of the
    tests (whose ports come from :func:`free_port`) can take it meanwhile, as one could
    a port that was merely free a moment ago."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    port: int = held.getsockname()[1]
    return port


def hanging_port() -> int:
    """A TCP port on 127.0.0.1 where a connection is never made for the rest of the run
    (a connect hangs until its own timeout): a socket of this process listens on it with
    a backlog of 0 and never accepts, and a few connections of this process fill its
    queue, so the kernel drops every further SYN (the client retries in vain), as for a
    host that silently drops packets."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(0)
    _HELD.append(held)
    port: int = held.getsockname()[1]
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        _HELD.append(filler)
    return port


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a real Redis server for this test run."""
    url = os.environ.get("GATEWAY_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
    if _answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "no Redis answers and redis-server is not installed (apt-get install redis-server)"
        )
    deadline = time.monotonic() + 10
    while True:  # again on another port when another process took this one first
        port = free_port()
        proc = subprocess.Popen(
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
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        while (ours := redis_server_ours(proc, url)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if ours:
            break
        proc.kill()
        proc.wait(5)
        if time.monotonic() > deadline:
            pytest.fail("the private redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(5)


@pytest.fixture
async def reply_dropper(redis_url: str) -> AsyncIterator[tuple[ReplyDropper, str]]:
    """A proxy in front of the test Redis (tests/gateway/redis_proxy.py: it can lose a
    reply, hang, or cut Redis off), and the Redis URL through it."""
    target = urlsplit(redis_url)
    proxy = ReplyDropper(target.hostname or "127.0.0.1", target.port or 6379)
    port = await proxy.start()
    yield proxy, f"redis://127.0.0.1:{port}{target.path or '/0'}"
    await proxy.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """The ``redis+cluster://`` URL of a 3-master Redis Cluster started for this run."""
    with start_cluster() as url:
        yield url


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelSetup]:
    """A master + replica + sentinel started for this run (``.url``, ``.failover()``)."""
    with start_sentinel() as setup:
        yield setup


TOPOLOGIES = ("redis", "cluster", "sentinel")
"""The Redis deployments a Redis-backed contract runs against (see ``topology_url``)."""


def topology_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The GATEWAY_REDIS_URL of ``kind`` (one of TOPOLOGIES), started on first use."""
    if kind == "cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    if kind == "sentinel":
        return str(request.getfixturevalue("redis_sentinel").url)
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test-{secrets.token_hex(6)}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client on the test Redis."""
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def serve(
    app: Any, *, ws_max_size: int = 16 * 1024 * 1024, **options: Any
) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free port in this event loop; yields its base URL.

    ``options`` are more uvicorn.Config arguments.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {"ws_max_size": ws_max_size, **options}
    config = uvicorn.Config(app, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def gateway(settings: Settings | None = None, **overrides: Any) -> AsyncIterator[str]:
    """A gateway app made with ``settings`` (defaults + ``overrides``), served on a free port
    with the protocol classes and limits of ``gateway serve`` (gateway/server.py)."""
    async with gateway_app(settings, **overrides) as (url, _):
        yield url


@contextlib.asynccontextmanager
async def gateway_app(
    settings: Settings | None = None, **overrides: Any
) -> AsyncIterator[tuple[str, Any]]:
    """:func:`gateway`, yielding its base URL and the app (FastAPI, create_app): for
    :func:`settled`."""
    settings = (settings or Settings()).model_copy(update=overrides)
    app = create_app(settings)
    async with serve(app, **uvicorn_options(settings)) as url:
        yield url, app


async def settled(app: Any, what: str = "the gateway's turns") -> None:
    """Wait until every turn of ``app``'s gateway (create_app, served) has ended (its
    session saved or given up, its lock released; a retry or an ``#error`` turn it made,
    done) and the session ends running in the background (a webhook's, after a late
    turn) with them: Conversation.drain, under the hang guard.

    It orders "the late turn saved" before what a test does next, where a fixed sleep
    ("the slow turn saves") only made it likely, and it makes "would have run by now"
    a fact: a turn still waiting for its session's lock is waited for too."""
    conversation = app.state.gateway.conversation

    async def drained() -> None:
        while True:
            await conversation.drain(3600.0)  # (the guard bounds it)
            if not conversation.turns_in_flight:
                return

    await unless_hung(drained(), what)


@contextlib.asynccontextmanager
async def gateway_answering(
    items: list[dict[str, Any]], *, client_timeout_s: float = 5.0, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client (``client_timeout_s``: its timeout in seconds, httpx's 5 s by default) of a :func:`gateway`
    (``overrides``: its settings) whose core answers every turn with ``items`` (the
    webhook contract's ``{"items": items}``: tests/gateway/core_app.py
    :func:`~tests.gateway.core_app.answering_core`, served on a free port)."""
    async with (
        serve(answering_core(items)) as core_url,
        gateway(pipeline=f"{core_url}/turn", **overrides) as url,
        httpx.AsyncClient(base_url=url, timeout=client_timeout_s) as client,
    ):
        yield client


class _ErrorRecorder(logging.Handler):
    """Collects ERROR records of the server's loggers (not the test client's)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # a test's own aiohttp client (socket.io) may leave a connection for the garbage
        # collector; asyncio reports it under the same logger as the server
        if record.name == "asyncio" and "client_connection" in record.getMessage():
            return
        self.records.append(record)


SERVER_LOGGERS = ("uvicorn.error", "asyncio", "adapters", "gateway", "socketio", "engineio")
"""Where an unhandled exception of the app or its event loop is logged."""


@contextlib.contextmanager
def no_server_errors() -> Iterator[None]:
    """Fail the test if a server in this process logged an ERROR inside the block.

    Enter it after the server started (uvicorn configures its loggers when the
    server is made). :func:`served` uses it; tests that serve their own app
    (``serve(create_app(...))``) can wrap their requests in it.
    """
    recorder = _ErrorRecorder()
    loggers = [logging.getLogger(name) for name in SERVER_LOGGERS]
    for logger in loggers:
        logger.addHandler(recorder)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)
    if recorder.records:
        shown = "\n".join(f"{r.name}: {r.getMessage()}" for r in recorder.records)
        pytest.fail(f"the server logged errors:\n{shown}")


@contextlib.asynccontextmanager
async def served_app(
    app: Any, settings: Settings | None = None, **options: Any
) -> AsyncIterator[str]:
    """:func:`serve` ``app``, failing the test if the server logged an ERROR.

    It is served as ``gateway serve`` serves it (gateway/server.py's protocol classes
    and limits of ``settings``, the defaults when omitted), plus ``options`` (more
    uvicorn.Config arguments). An unhandled exception in the app shows as an ERROR
    record of uvicorn.error (or asyncio, or our own loggers). Yields the base URL
    (``http://127.0.0.1:PORT``).
    """
    settings = settings or Settings()
    async with serve(app, **{**uvicorn_options(settings), **options}) as url:
        with no_server_errors():
            yield url


@contextlib.asynccontextmanager
async def served(settings: Settings | None = None, **overrides: Any) -> AsyncIterator[str]:
    """:func:`gateway` (same arguments), failing the test if the server logged an ERROR."""
    settings = (settings or Settings()).model_copy(update=overrides)
    async with served_app(create_app(settings), settings) as url:
        yield url


def start_timeout_s() -> float:
    """How long a test waits for a child gateway to answer /healthz, in seconds:
    GATEWAY_TEST_START_TIMEOUT_S if set, else 60 s (120 s with CI set), times the CPU
    load per core when above 1 (a loaded machine's start-up is slow, not broken).

    What the start-up spends (``python -X importtime -m gateway serve``; bench figures,
    not asserted): about 2 s of CPU, nearly all of it importing (FastAPI and the
    pydantic models of the routes and the Alexa envelope, socketio with its clients'
    aiohttp, numpy under miniaudio); the app's lifespan takes about 0.5 s and the
    speech warm-up (Piper's voice, a recognizer worker) runs after /healthz answers.
    Two cores shared by several test runs stretch those 2 s to 10-20 s of wall clock.
    """
    configured = os.environ.get("GATEWAY_TEST_START_TIMEOUT_S")
    if configured:
        return float(configured)
    base = 120.0 if os.environ.get("CI") else 60.0
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return base * max(1.0, min(load, 4.0))


class GatewayProcess:
    """A ``gateway serve`` child process (a real, separate gateway instance)."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None = None,
        *,
        open_files: int | None = None,
        stderr: Any = None,
        log_level: str = "warning",
        plain_uvicorn: bool = False,
    ) -> None:
        """``open_files``: the child's RLIMIT_NOFILE (soft and hard); ``stderr``: where its
        log goes (a file; default a temporary file, copied to this process's stderr when
        the process stops, and its tail put in the error when it does not start);
        ``log_level``: its ``--log-level``; ``plain_uvicorn``: the app under uvicorn's own
        CLI (``python -m uvicorn --factory gateway.app:create_app``), not ``gateway
        serve``.

        ``port``: default a free one. Either way it is held for the rest of the run
        (:func:`reserved_port`), and each spawn hands the child a socket listening on it
        (``--fd``): no other process (another xdist worker's gateway) can take the port
        between its choice and the child's start, nor between a stop and a restart on
        the same port (``GatewayProcess(env, port=earlier.port)``)."""
        self.port = reserved_port(port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.open_files = open_files
        self.stderr = stderr
        self.log_level = log_level
        self.plain_uvicorn = plain_uvicorn
        self._log: Any = None  # the temporary file of its stderr (no ``stderr`` given)
        self.proc: subprocess.Popen[bytes] | None = None

    def _limit_open_files(self) -> None:
        import resource

        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def spawn(self) -> GatewayProcess:
        """Start the process, without waiting for it (see :meth:`wait_ready`)."""
        if self.stderr is None:
            import tempfile

            # not a pipe (a full pipe would block it); closed by stop()
            self._log = tempfile.TemporaryFile()  # noqa: SIM115
        command = (
            ["uvicorn", "--factory", "gateway.app:create_app"]
            if self.plain_uvicorn
            else ["gateway", "serve"]
        )
        with listener_on(self.port) as listener:  # the child's copy stays open
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    *command,
                    "--port",
                    str(self.port),
                    "--fd",
                    str(listener.fileno()),
                    "--log-level",
                    self.log_level,
                ],
                env=self.env,
                cwd=ROOT,
                stderr=self.stderr if self.stderr is not None else self._log,
                preexec_fn=self._limit_open_files if self.open_files else None,
                pass_fds=(listener.fileno(),),
            )
        return self

    def wait_ready(self, timeout_s: float | None = None) -> GatewayProcess:
        """Wait until /healthz answers 200 (at most ``timeout_s``, default
        :func:`start_timeout_s`). Raises RuntimeError, with the end of the process's
        stderr, if it exits first or does not answer in time (it is killed then), or if
        it has exited when /healthz answers (something else answered)."""
        assert self.proc is not None, "spawn() first"
        within = start_timeout_s() if timeout_s is None else timeout_s
        started = time.monotonic()
        while True:
            try:
                answered = httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                answered = False
            exited = self.proc.poll()
            if answered and exited is None:
                return self
            waited = time.monotonic() - started
            if exited is not None or waited > within:
                tail = self.log_tail()
                self.stop(signal.SIGKILL)  # not left running when it answers too late
                why = f"exited with {exited}" if exited is not None else "did not answer"
                raise RuntimeError(
                    f"gateway on port {self.port} {why} after {waited:.1f} s (limit "
                    f"{within:.0f} s, load average {os.getloadavg()[0]:.1f}); its stderr:\n"
                    f"{tail}"
                )
            time.sleep(0.1)

    def start(self, timeout_s: float | None = None) -> GatewayProcess:
        """Start the process and wait until /healthz answers (:meth:`wait_ready`)."""
        return self.spawn().wait_ready(timeout_s)

    def log_tail(self, limit: int = 4000) -> str:
        """The last ``limit`` characters of its stderr (kept in a temporary file), or a
        note where it went instead."""
        if self._log is None:
            return "(written to the stderr given to GatewayProcess)"
        self._log.seek(0)
        text: str = self._log.read().decode(errors="replace")
        return text[-limit:] or "(empty)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process with ``sig`` (SIGKILL to crash it) and reap it; its stderr (a
        temporary file) goes to this process's stderr (shown by pytest if a test fails)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            tail = self.log_tail(20000)
            self._log.close()
            self._log = None
            if tail != "(empty)":
                sys.stderr.write(f"--- gateway on port {self.port}, stderr:\n{tail}\n")


def start_all(*procs: GatewayProcess) -> tuple[GatewayProcess, ...]:
    """Start several gateway processes at once (their imports overlap on two cores) and
    wait until each answers /healthz; ``procs`` as given. If one does not start, all are
    stopped and its RuntimeError (with its stderr) raised."""
    try:
        for proc in procs:
            proc.spawn()
        for proc in procs:
            proc.wait_ready()
    except BaseException:
        for proc in procs:
            proc.stop(signal.SIGKILL)
        raise
    return procs


@pytest.fixture
def gateway_processes() -> Iterator[list[GatewayProcess]]:
    """A list to put started GatewayProcess objects in; all are stopped afterwards."""
    procs: list[GatewayProcess] = []
    yield procs
    for proc in procs:
        proc.stop(signal.SIGKILL)


# ------------------------------------------------------------------ speech


@pytest.fixture(scope="session")
def piper() -> PiperSynthesizer:
    """The default Piper voice (joe), deterministic: no sampling noise; whole sentences
    (the caller's voice and the corpus: ``first_clause_chars`` 0)."""
    return PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)


@pytest.fixture(scope="session")
def gateway_piper() -> PiperSynthesizer:
    """The gateway's Piper voice as the default settings make it (an item's first clause
    a piece of its own: GATEWAY_TTS_FIRST_CLAUSE_CHARS), deterministic like :func:`piper`."""
    return PiperSynthesizer(
        noise_scale=0.0, noise_w_scale=0.0, first_clause_chars=Settings().tts_first_clause_chars
    )


@pytest.fixture(scope="session")
def corpus(piper: PiperSynthesizer) -> dict[str, Pcm]:
    """Each of SENTENCES spoken by Piper: 16-bit mono PCM at 22050 Hz, no padding."""

    async def synthesize_all() -> dict[str, Pcm]:
        return {text: await piper.synthesize(text) for text in SENTENCES}

    return asyncio.run(synthesize_all())


@pytest.fixture(scope="session")
def recognizer() -> Iterator[PocketsphinxRecognizer]:
    """One PocketSphinx recognizer (pooled decoders) for all STT tests."""
    rec = PocketsphinxRecognizer(max_streams=3)
    yield rec
    asyncio.run(rec.aclose())
