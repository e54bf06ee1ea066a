"""Voiceflow sessions across `gateway serve` processes sharing Redis; graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from adapters.voiceflow.protocol import PATH, SessionKeys
from adapters.voiceflow.routes import IDLE_MARGIN_S
from gateway.secrets import VOICEFLOW_SESSION_KEY, derive_key
from tests.adapters.voiceflow.helpers import (
    PROJECT,
    SECRET,
    USER,
    RecordingCore,
    VoiceflowClient,
    client,
    messages,
)
from tests.conftest import GatewayProcess, start_all, unless_hung


def env(redis_url: str, prefix: str, secret: str | None = SECRET, **more: str) -> dict[str, str]:
    """Two instances' environment: Redis (a key prefix of the test's own) and, unless
    ``secret`` is None, GATEWAY_VOICEFLOW_SECRET."""
    common = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": prefix, **more}
    return {**common, "GATEWAY_VOICEFLOW_SECRET": secret} if secret else common


@contextlib.asynccontextmanager
async def running_action(
    core: RecordingCore,
    redis_url: str,
    redis_prefix: str,
    gateway_processes: list[GatewayProcess],
    grace_s: str,
    transport: str = "websocket",
    **more: str,
) -> AsyncIterator[tuple[GatewayProcess, VoiceflowClient]]:
    """A gateway process on ``core`` (GATEWAY_VOICEFLOW_RESTART_GRACE_S ``grace_s``, and
    the settings ``more``) and a client connected over ``transport`` whose action
    ``running`` ("slow") was accepted and is running."""
    async with core.running() as core_url:
        first = GatewayProcess(
            env(
                redis_url,
                redis_prefix,
                GATEWAY_PIPELINE=core_url,
                GATEWAY_VOICEFLOW_RESTART_GRACE_S=grace_s,
                **more,
            )
        ).start()
        gateway_processes.append(first)
        async with client(first.url, transport) as vf:
            await vf.handshake()
            await vf.send({"type": "text", "payload": "slow"}, "running")
            assert (await vf.expect("action.status"))["status"] == "accepted"
            yield first, vf


@pytest.mark.parametrize("secret", [None, SECRET], ids=["only-redis-url", "voiceflow-secret"])
async def test_a_session_key_continues_the_session_on_another_instance(
    redis_url: str,
    redis_prefix: str,
    gateway_processes: list[GatewayProcess],
    secret: str | None,
    aredis: aioredis.Redis,
) -> None:
    """With nothing but a Redis URL the instances share the signing key (created once in
    Redis); with GATEWAY_VOICEFLOW_SECRET that secret signs, as before."""
    a = GatewayProcess(env(redis_url, redis_prefix, secret))
    b = GatewayProcess(env(redis_url, redis_prefix, secret))
    gateway_processes += [a, b]
    await asyncio.to_thread(start_all, a, b)  # at once: the first to start makes the key
    shared = await aredis.get(f"{redis_prefix}:secret-key")
    assert isinstance(shared, bytes)  # made by one instance (SET NX), read by the other
    async with client(a.url) as on_a:
        unused = await on_a.handshake()  # a session made on A that never has a turn
        key = await on_a.create()
        await on_a.act({"type": "launch"})
        assert await on_a.say("my name is Ada") == ["Nice to meet you, Ada."]
    signer = SessionKeys(
        secret or derive_key(shared, VOICEFLOW_SESSION_KEY), ttl_s=3600
    )  # the key is signed with the configured secret, or the key derived from Redis's
    check = signer.verify(key, project_id=PROJECT, user_id=USER, now=time.time())
    assert check.problem is None
    async with client(b.url, "polling") as on_b:
        # B asks the shared store: the session without a turn is in no store ...
        assert await on_b.start(unused) is True  # True: a new session is required
        assert await on_b.start(key) is False  # False: not a new session
        assert await on_b.say("what is my name") == ["Your name is Ada."]
        _, traces, _ = await on_b.act({"type": "text", "payload": "bye"})
        assert [t["type"] for t in traces] == ["text", "end"]
        assert await on_b.expect("session.ended") == {"reason": "end_of_diagram"}
    async with client(a.url) as again:  # the ended session is gone on every instance
        assert await again.start(key) is True  # the key is still well formed, but names
        await again.send({"type": "text", "payload": "what is my name"}, "m")  # no session
        assert (await again.expect("action.status"))["reason"] == "no-session"
        await again.create()  # a new session, as the spec's client makes one
        assert await again.say("what is my name") == ["I do not know your name yet."]
        await again.nothing_more()


async def test_a_reconnect_on_another_instance_while_the_first_action_runs_resumes_it(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """The store has a session once its first turn saved it. A client that reconnected
    to instance B with its sessionKey while its first action still ran on instance A was
    told ``newSessionRequired: true`` and lost its conversation. B now reads the session
    and its lock in one command: a turn holds the lock of a session not saved yet (its
    first turn is making it), so the session goes on, and B's idle watch does not take
    the running first turn for an expiry."""
    core = RecordingCore()
    async with core.running() as core_url:
        a = GatewayProcess(env(redis_url, redis_prefix, GATEWAY_PIPELINE=core_url))
        b = GatewayProcess(env(redis_url, redis_prefix, GATEWAY_PIPELINE=core_url))
        gateway_processes += [a, b]
        await asyncio.to_thread(start_all, a, b)
        async with client(a.url) as on_a:
            key = await on_a.handshake()
            await on_a.send({"type": "text", "payload": "slow"}, "first")
            assert (await on_a.expect("action.status"))["status"] == "accepted"
            first = await core.next_request()  # the core holds the first action: not saved
            assert first["turn"] == 1
            async with client(b.url, "polling") as on_b:
                assert await on_b.start(key) is False  # False: the session goes on
                await on_b.nothing_more(IDLE_MARGIN_S + 1.0)  # no session.ended meanwhile
                core.release.set()
                traces, done = await on_a.traces_until_status("first")
                assert (messages(traces), done["status"]) == (["slow answer"], "completed")
                assert await on_b.say("hello") == ["core heard hello"]
                second = await core.next_request()  # the same session, its second turn
                assert (second["sessionId"], second["turn"]) == (first["sessionId"], 2)
                await on_b.nothing_more()


async def test_readyz_is_503_from_sigterm_while_voiceflow_clients_are_told(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """Telling the Voiceflow clients server.restart takes up to
    GATEWAY_VOICEFLOW_RESTART_GRACE_S after SIGTERM, while the server still accepts: its
    /readyz answered 200 all that time, so a load balancer without preStop kept sending
    new clients to the instance going away. It now answers 503 (problem+json,
    Retry-After) from the signal on. A long-polling client that does not poll holds the
    restart open (its server.restart waits for a GET to take it)."""
    first = GatewayProcess(
        env(redis_url, redis_prefix, GATEWAY_VOICEFLOW_RESTART_GRACE_S="5")
    ).start()
    gateway_processes.append(first)
    polling = f"{first.url}{PATH}/?EIO=4&transport=polling"
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{first.url}/readyz")).status_code == 200
        opened = await http.get(polling)
        assert opened.text.startswith("0")  # Engine.IO OPEN {"sid": ...}
        session = f"{polling}&sid={json.loads(opened.text[1:])['sid']}"
        assert (await http.post(session, content="40")).text == "OK"  # socket.io CONNECT
        assert (await http.get(session)).text.startswith("40")  # connected; no more GETs
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        statuses = []
        deadline = time.monotonic() + 2.0  # well inside the 5 s the restart is held open
        while time.monotonic() < deadline:
            ready = await http.get(f"{first.url}/readyz")
            statuses.append(ready.status_code)
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert statuses[-1] == 503, statuses
        assert ready.headers["content-type"] == "application/problem+json"
        assert ready.headers["retry-after"] == "1"
        assert ready.json()["detail"] == "The gateway is shutting down."
        assert first.proc.poll() is None  # still serving: the client was not told yet
        told = await http.get(session)  # takes server.restart and Engine.IO CLOSE
        assert '42["server.restart",{}]' in told.text
    assert await asyncio.to_thread(first.proc.wait, 10) == 0  # a graceful stop, promptly


async def test_sigterm_lets_the_running_action_end_before_server_restart(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """An action running at SIGTERM got neither its traces nor ``completed``:
    server.restart went out at once, the client reconnected on it, and a new connection
    is never told the answer of the old one's turn (saved all the same). The running
    action now gets half of GATEWAY_VOICEFLOW_RESTART_GRACE_S to end first; the action
    queued behind it runs no turn here and comes back in server.restart to replay."""
    core = RecordingCore()
    async with running_action(core, redis_url, redis_prefix, gateway_processes, "6") as (
        first,
        vf,
    ):
        assert (await core.next_request())["input"]["transcript"]["text"] == "slow"
        await vf.send({"type": "text", "payload": "later"}, "queued")
        assert (await vf.expect("action.status")) == {
            "status": "accepted",
            "messageID": "queued",
        }
        stopping = asyncio.create_task(asyncio.to_thread(first.stop, signal.SIGTERM))
        await vf.nothing_more(1.0)  # the running action is waited for: no restart yet
        core.release.set()
        traces, done = await vf.traces_until_status("running")
        assert (messages(traces), done["status"]) == (["slow answer"], "completed")
        assert await vf.expect("server.restart") == {"action": {"type": "text", "payload": "later"}}
        async with asyncio.timeout(10):
            await stopping
        assert first.proc is not None
        assert first.proc.returncode == 0
        assert core.requests.qsize() == 0  # the queued action ran no turn here


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_sigterm_lets_a_running_action_outlasting_half_the_grace_answer(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess], transport: str
) -> None:
    """An action still running after half of GATEWAY_VOICEFLOW_RESTART_GRACE_S lost its
    answer: server.restart went out then, the client reconnected on it, and the traces of
    its turn (saved all the same) went nowhere. Such a client is now told once the server
    has stopped accepting, after its action's traces and ``completed``, as long as
    GATEWAY_SHUTDOWN_TIMEOUT_S allows (a long-polling client polls on its open
    connection)."""
    core = RecordingCore()
    async with running_action(core, redis_url, redis_prefix, gateway_processes, "2", transport) as (
        first,
        vf,
    ):
        await core.next_request()
        stopping = asyncio.create_task(asyncio.to_thread(first.stop, signal.SIGTERM))
        await vf.nothing_more(2.5)  # past half the grace (and all of it): still no restart
        core.release.set()
        traces, done = await vf.traces_until_status("running")
        assert (messages(traces), done) == (
            ["slow answer"],
            {"status": "completed", "messageID": "running"},
        )
        assert await vf.expect("server.restart") == {}
        async with asyncio.timeout(10):
            await stopping
        assert first.proc is not None
        assert first.proc.returncode == 0


async def test_sigterm_a_running_action_outlasting_the_shutdown_is_answered_answer_lost(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """An action that outlasts what GATEWAY_SHUTDOWN_TIMEOUT_S leaves does not hold up
    server.restart: before it the client hears that the action's answer is lost (``error
    answer-lost`` and ``completed`` with ``reason: "error"``), where it heard nothing of
    its action at all, only server.restart after half the grace."""
    core = RecordingCore()
    async with running_action(
        core, redis_url, redis_prefix, gateway_processes, "2", GATEWAY_SHUTDOWN_TIMEOUT_S="4"
    ) as (first, vf):
        await core.next_request()
        started = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(first.stop, signal.SIGTERM))
        async with asyncio.timeout(5):
            lost = await vf.expect("error")
        waited = time.monotonic() - started
        assert lost["code"] == "answer-lost"
        assert lost["messageID"] == "running"
        assert "answer is lost" in lost["error"]
        assert await vf.expect("action.status") == {
            "status": "completed",
            "messageID": "running",
            "reason": "error",
        }
        assert await vf.expect("server.restart") == {}
        # waited for the action (4 s less the 1 s to tell and the 1 s left to the server)
        assert 1.5 <= waited < 4.0, waited
        core.release.set()
        async with asyncio.timeout(15):
            await stopping
        assert first.proc is not None
        assert first.proc.returncode == 0


async def test_under_plain_uvicorn_a_running_action_is_told_within_the_grace(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """Under plain uvicorn (its CLI, no ``gateway serve``: nothing runs the Gateway's
    ``before_close`` hooks) a client whose action still runs after half of
    GATEWAY_VOICEFLOW_RESTART_GRACE_S is told ``server.restart`` within the grace, before
    uvicorn closes its socket, as it was before the hook. It was left to
    VoiceflowServer.finish_restart, which never ran: the socket was closed and the client
    told nothing."""
    core = RecordingCore()
    async with core.running() as core_url:
        first = GatewayProcess(
            env(
                redis_url,
                redis_prefix,
                GATEWAY_PIPELINE=core_url,
                GATEWAY_VOICEFLOW_RESTART_GRACE_S="2",
            ),
            plain_uvicorn=True,
        ).start()
        gateway_processes.append(first)
        async with client(first.url, "websocket") as vf:
            await vf.handshake()
            await vf.send({"type": "text", "payload": "slow"}, "running")
            assert (await vf.expect("action.status"))["status"] == "accepted"
            await core.next_request()
            stopping = asyncio.create_task(asyncio.to_thread(first.stop, signal.SIGTERM))
            # told at all is told within the grace: after it uvicorn closes the socket and
            # the client hears nothing (before the hook); told while its action still runs
            # (the core holds it until released). Was also: < 4 s of wall clock after the
            # signal; the receive guard is 30 s
            told = await unless_hung(vf.expect("server.restart"), "server.restart")
            assert told == {}
            assert not core.release.is_set()
            core.release.set()
            async with asyncio.timeout(20):
                await stopping


async def test_graceful_shutdown_sends_server_restart(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """SIGTERM: every connected client hears server.restart, on both transports; the
    process then stops promptly, and the sessions continue on another instance."""
    first = GatewayProcess(env(redis_url, redis_prefix)).start()
    gateway_processes.append(first)
    clients = [VoiceflowClient(first.url, t) for t in ("websocket", "polling")]
    keys = []
    for n, vf in enumerate(clients):
        await vf.connect()
        keys.append(await vf.handshake())
        await vf.act({"type": "launch"})
        await vf.say(f"my name is {'Ada' if n == 0 else 'Grace'}")
    try:
        stopping = asyncio.create_task(asyncio.to_thread(first.stop, signal.SIGTERM))
        for vf in clients:
            assert await vf.expect("server.restart") == {}
        async with asyncio.timeout(10):
            await stopping
        assert first.proc is not None
        assert first.proc.returncode == 0  # a graceful stop (gateway/cli.py: serve)
    finally:
        for vf in clients:
            await vf.close()

    second = GatewayProcess(env(redis_url, redis_prefix)).start()
    gateway_processes.append(second)
    for key, name in zip(keys, ["Ada", "Grace"], strict=True):
        async with client(second.url) as vf:
            assert await vf.start(key) is False
            _, traces, _ = await vf.act({"type": "text", "payload": "what is my name"})
            assert messages(traces) == [f"Your name is {name}."]
