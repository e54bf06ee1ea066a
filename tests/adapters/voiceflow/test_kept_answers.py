"""A client that leaves while its action runs gets the answer when it comes back.

Real python-socketio clients against served gateways: one in-process app (the memory
store), and two ``gateway serve`` processes sharing Redis. The core holds ``slow``
actions until released (tests/adapters/voiceflow/helpers.py RecordingCore)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import SecretStr

from adapters.voiceflow import routes
from adapters.voiceflow.protocol import ANSWER_TOO_LONG_TEXT, PATH, SessionKeys, VoiceflowConnection
from gateway.answers import MemoryAnswerStore
from gateway.app import create_app
from gateway.server import uvicorn_options
from gateway.settings import Settings
from tests.adapters.voiceflow.helpers import (
    PROJECT,
    SECRET,
    USER,
    RecordingCore,
    VoiceflowClient,
    client,
    messages,
)
from tests.adapters.voiceflow.test_socket import connections
from tests.conftest import (
    GatewayProcess,
    serve,
    served_app,
    start_all,
    unless_hung,
)
from tests.gateway.redis_proxy import ReplyDropper

ADMIN_KEY = "admin-key-of-the-kept-answers-test"
SAFETY_S = 10.0
"""Safety net of the waits for a mechanism (not an assertion of time)."""


class BigCore(RecordingCore):
    """RecordingCore whose ``slow big`` answer (once released) is over 256 KiB of text."""

    async def answer(self, body: dict[str, Any]) -> Any:
        if body["input"]["transcript"]["text"] == "slow big":
            await self.release.wait()
            return {"items": [{"text": "x" * 300_000}]}
        return await super().answer(body)


@contextlib.asynccontextmanager
async def gateway_app(
    core: RecordingCore, *, faults: bool = False, **settings: Any
) -> AsyncIterator[tuple[str, FastAPI]]:
    """An in-process gateway on ``core`` (no Redis: the memory stores); (url, app).
    ``faults``: the test makes the gateway fail (its ERROR lines do not fail the test)."""
    async with core.running() as core_url:
        app = create_app(Settings().model_copy(update={"pipeline": core_url, **settings}))
        if faults:
            async with serve(app, **uvicorn_options(Settings())) as url:
                yield url, app
            return
        async with served_app(app) as url:
            yield url, app


def answers_of(app: FastAPI) -> MemoryAnswerStore:
    store = app.state.gateway.answers
    assert isinstance(store, MemoryAnswerStore)
    return store


async def until(check: Any) -> None:
    """Wait until ``check()`` (sync or async) is true (a mechanism, not a time bound)."""
    async with asyncio.timeout(SAFETY_S):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


async def leave_mid_action(
    url: str, core: RecordingCore, text: str = "slow", transport: str = "websocket"
) -> str:
    """A client that starts a session (launch), sends action ``first`` (``text``, held by
    the core) and disconnects while it runs, seen by the server; the sessionKey."""
    before = connections()
    async with client(url, transport) as vf:
        key = await vf.handshake()
        await vf.act({"type": "launch"})
        assert (await core.next_request())["input"]["transcript"]["text"] == "#intro"
        await vf.send({"type": "text", "payload": text}, "first")
        assert await vf.expect("action.status") == {"status": "accepted", "messageID": "first"}
        assert (await core.next_request())["input"]["transcript"]["text"] == text
    await until(lambda: connections() == before)  # the server saw the client leave
    return key


async def expect_first_answer(vf: VoiceflowClient, message: str = "slow answer") -> None:
    """The kept answer of action ``first``: its traces and ``completed``, as they would
    have gone out."""
    traces, done = await vf.traces_until_status("first")
    assert messages(traces) == [message]
    assert done == {"status": "completed", "messageID": "first"}


async def expect_hello_answer(vf: VoiceflowClient) -> None:
    """Action ``m1`` (the text "hello") answered whole after the kept answers: accepted,
    the RecordingCore's trace, completed, and nothing more."""
    assert await vf.expect("action.status") == {"status": "accepted", "messageID": "m1"}
    traces, done = await vf.traces_until_status("m1")
    assert messages(traces) == ["core heard hello"]
    assert done == {"status": "completed", "messageID": "m1"}
    await vf.nothing_more()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_an_answer_lost_with_its_socket_comes_on_the_next_connection(
    transport: str,
) -> None:
    """The client's socket dropped while its action ran: the turn ran and saved the
    session, and its traces and ``completed`` went nowhere; the client, back with its
    sessionKey, heard nothing of its messageID. It now gets them after ``client.started``,
    before anything new, once: a later connection gets nothing more."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        key = await leave_mid_action(url, core, transport=transport)
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)  # kept once its turn ended
        async with client(url, transport) as again:
            assert await again.start(key) is False
            await expect_first_answer(again)
            await again.nothing_more()
            assert await again.say("hello") == ["core heard hello"]
        assert len(answers_of(app)) == 0  # delivered: not kept
        async with client(url) as third:
            assert await third.start(key) is False
            await third.nothing_more()  # nothing pending: nothing more than client.started


async def test_a_client_back_while_its_action_runs_gets_the_answer_when_it_ends() -> None:
    """The client is back (another connection, the same instance) while the action its
    old socket sent still runs: the answer comes on the new connection as the action
    ends (it is kept and announced to the session's connections), not at a later
    reconnect."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        key = await leave_mid_action(url, core)
        async with client(url) as again:
            assert await again.start(key) is False
            await again.nothing_more()
            core.release.set()
            await expect_first_answer(again)
            await again.nothing_more()
            assert await again.say("hello") == ["core heard hello"]
        assert len(answers_of(app)) == 0


async def test_a_kept_answer_waits_for_the_action_running_on_the_new_connection() -> None:
    """Back while the old action runs, the client sends a new action at once: that one
    waits for the session (the old turn holds it); the old answer comes as the old turn
    ends, and the new action's traces after it, never interleaved."""
    core = RecordingCore()
    async with gateway_app(core) as (url, _):
        key = await leave_mid_action(url, core)
        async with client(url) as again:
            assert await again.start(key) is False
            await again.send({"type": "text", "payload": "next"}, "second")
            assert await again.expect("action.status") == {
                "status": "accepted",
                "messageID": "second",
            }
            core.release.set()
            await expect_first_answer(again)
            traces, done = await again.traces_until_status("second")
            assert (messages(traces), done["status"]) == (["core heard next"], "completed")
            await again.nothing_more()


async def test_pushes_queued_while_away_come_after_the_kept_answer_not_inside_it() -> None:
    """The client left mid-action and an operator pushed two items meanwhile (queued in
    the outbox). Back with its sessionKey, the client got the first pushed trace, then the
    kept answer's trace, then the second pushed trace, then the kept ``completed``: the
    two were emitted at once, interleaved. The kept answer now comes first and whole
    (right after ``client.started``), the pushed traces after it."""
    core = RecordingCore()
    async with gateway_app(core, admin_keys=frozenset({ADMIN_KEY})) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)
        session_id = jwt.decode(key, options={"verify_signature": False})["sub"]
        async with httpx.AsyncClient() as http:
            pushed = await http.post(
                f"{url}/v1/push",
                json={
                    "target": {"sessionId": session_id},
                    "items": [{"text": "p1"}, {"text": "p2"}],
                },
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
        assert pushed.json()["delivery"] == "queued", pushed.text
        async with client(url) as again:
            assert await again.start(key) is False
            got = [await again.next() for _ in range(4)]
            await again.nothing_more()
        assert [(event, data["messageID"]) for event, data in got][:2] == [
            ("action.trace", "first"),
            ("action.status", "first"),
        ]
        assert messages([data["trace"] for _, data in got[2:]]) == ["p1", "p2"]
        assert got[2][1]["messageID"] == got[3][1]["messageID"] != "first"


async def test_a_kept_answer_expires_after_its_ttl() -> None:
    """GATEWAY_VOICEFLOW_ANSWER_TTL_S: an answer nobody came back for within it is gone."""
    core = RecordingCore()
    async with gateway_app(core, voiceflow_answer_ttl_s=1) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)
        await asyncio.sleep(1.1)  # past the TTL
        async with client(url) as again:
            assert await again.start(key) is False
            await again.nothing_more()


async def test_another_sessions_or_a_forged_key_gets_nothing_of_it() -> None:
    """The answer is the session's: another session's key, a key naming the same session
    signed with another secret, and the session's key sent by another user or for
    another project get nothing of it; the session's own key still gets it."""
    core = RecordingCore()
    async with gateway_app(core, voiceflow_secret=SecretStr(SECRET)) as (url, app):
        async with client(url) as other:
            other_key = await other.handshake()
            await other.act({"type": "launch"})
        await core.next_request()
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)
        session_id = jwt.decode(key, options={"verify_signature": False})["sub"]
        forged = SessionKeys("another-secret-0123456789abcdef-xyz", 3600).issue(
            session_id=session_id, project_id=PROJECT, user_id=USER, now=time.time()
        )
        async with client(url) as vf:
            assert await vf.start(other_key) is False  # its own session goes on
            await vf.nothing_more()
            assert await vf.start(forged) is True  # not a key of this gateway
            await vf.nothing_more()
            assert await vf.start(key, userID="mallory") is True  # the key is USER's
            await vf.nothing_more()
            assert await vf.start(key, projectID="another-project") is True
            await vf.nothing_more()
            assert await vf.start(key) is False
            await expect_first_answer(vf)
            await vf.nothing_more()


async def test_an_answer_too_long_to_keep_is_kept_as_answer_lost() -> None:
    """An answer longer than a session may keep (256 KiB) is kept in short: the client
    hears that the action ran and its answer is lost, not nothing."""
    core = BigCore()
    async with gateway_app(core) as (url, app):
        key = await leave_mid_action(url, core, "slow big")
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)
        async with client(url) as again:
            assert await again.start(key) is False
            assert await again.expect("error") == {
                "code": "answer-lost",
                "error": ANSWER_TOO_LONG_TEXT,
                "messageID": "first",
            }
            assert await again.expect("action.status") == {
                "status": "completed",
                "messageID": "first",
                "reason": "error",
            }
            await again.nothing_more()


# ------------------------------------------- a second client.start, notices that race


@dataclasses.dataclass
class Step:
    """A coroutine method of the server's parts wrapped by :func:`step`: the real one
    runs, once ``go`` is set (held until then when made with ``held``)."""

    go: asyncio.Event
    calls: int = 0
    """Calls begun."""
    done: int = 0
    """Calls the real method returned from (or raised)."""


def step(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str, *, held: bool = False) -> Step:
    """Wrap coroutine method ``name`` of ``obj`` (an instance: the real method runs) to
    count its calls and, with ``held``, hold each until the test sets ``go``."""
    real = getattr(obj, name)
    seen = Step(asyncio.Event())
    if not held:
        seen.go.set()

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        seen.calls += 1
        await seen.go.wait()
        try:
            return await real(*args, **kwargs)
        finally:
            seen.done += 1

    monkeypatch.setattr(obj, name, wrapped)
    return seen


def client_events(monkeypatch: pytest.MonkeyPatch, app: FastAPI) -> Step:
    """Count the client events the app's Voiceflow server began to handle (its socket.io
    catch-all handler, wrapped by :func:`step`)."""
    handlers = app.state.voiceflow.sio.handlers["/"]
    holder = types.SimpleNamespace(handle=handlers["*"])
    seen = step(monkeypatch, holder, "handle")
    monkeypatch.setitem(handlers, "*", holder.handle)
    return seen


def start_payload(session_key: str | None) -> dict[str, Any]:
    """A client.start (:meth:`VoiceflowClient.start`'s) with ``session_key``."""
    return {"userID": USER, "projectID": PROJECT, "sessionKey": session_key}


async def test_an_answer_announced_during_a_second_client_start_comes_after_its_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection back while the old action runs sends client.start again (same key);
    the old action ends while the store is asked about the session, so the notice of its
    kept answer lands while that client.start is being answered. The answer went out at
    once: ``action.trace``, ``action.status completed``, then ``client.started``. It now
    comes after the ``client.started`` of the client.start that takes it, once."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        gw = app.state.gateway
        notices = step(monkeypatch, app.state.voiceflow, "_kept_announced")
        takes = step(monkeypatch, answers_of(app), "take")
        key = await leave_mid_action(url, core)
        async with client(url) as again:
            assert await again.start(key) is False
            await until(lambda: takes.done == 1)  # (nothing yet) it follows the session's topic
            finds = step(monkeypatch, gw.conversation, "find", held=True)
            await again.emit("client.start", start_payload(key))
            await until(lambda: finds.calls == 1)  # the second client.start is being answered
            core.release.set()  # the old action ends: its answer is kept and announced
            await until(lambda: notices.done == 1)  # the connection heard of it
            finds.go.set()
            assert await again.expect("client.started") == {"newSessionRequired": False}
            await expect_first_answer(again)
            assert await again.say("hello") == ["core heard hello"]
            await again.nothing_more()
        assert len(answers_of(app)) == 0


async def test_a_notice_for_a_session_the_connection_left_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection resumed the session while its old action ran, then sent client.start
    without a key (it starts anew: ``newSessionRequired: true``) and still listened to the
    old session's topic. The old action's answer, announced there, was taken and sent to
    it, a session it had left. It is now left kept for the session: the connection gets
    it when it resumes that session again, after that ``client.started``."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        notices = step(monkeypatch, app.state.voiceflow, "_kept_announced")
        takes = step(monkeypatch, answers_of(app), "take")
        key = await leave_mid_action(url, core)
        async with client(url) as again:
            assert await again.start(key) is False
            await until(lambda: takes.done == 1)  # it follows the session's topic
            assert await again.start(None) is True  # leaves it
            core.release.set()
            await until(lambda: notices.done == 1)
            assert len(answers_of(app)) == 1  # not taken
            assert await again.start(key) is False
            await expect_first_answer(again)
            await again.nothing_more()
        assert len(answers_of(app)) == 0


async def test_a_notice_of_the_old_session_landing_during_session_create_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection resumed the session while its old action ran, then sent
    session.create (a new session). The old action's answer was announced while that
    session.create was being answered (its ``session.created`` going out): the notice
    passed the test of the session the connection was in (the handshake records the new
    one at its end) and the old session's answer was taken and sent after
    ``session.created``, into the new session. The notice is now tested again once the
    handshake is received: the answer stays kept for the old session, and the
    connection gets it when it resumes that session, after that ``client.started``."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        server = app.state.voiceflow
        notices = step(monkeypatch, server, "_kept_announced")
        announced = step(monkeypatch, server, "_announce_kept", held=True)
        takes = step(monkeypatch, answers_of(app), "take")
        key = await leave_mid_action(url, core)
        async with client(url) as again:
            assert await again.start(key) is False
            await until(lambda: takes.done == 1)  # (nothing yet) it follows the session's topic
            core.release.set()
            await until(lambda: len(answers_of(app)) == 1)  # kept; its notice held
            real_emit = server.sio.emit

            async def emit(event: str, *args: Any, **kwargs: Any) -> Any:
                if event == "session.created":  # the notice lands while it goes out
                    announced.go.set()
                    await until(lambda: notices.calls == 1)
                    await asyncio.sleep(0.2)  # (the notice is past its first test)
                return await real_emit(event, *args, **kwargs)

            monkeypatch.setattr(server.sio, "emit", emit)
            await again.create()
            await again.nothing_more(0.5)  # before: the old session's answer came here
            assert len(answers_of(app)) == 1  # still kept for the old session
            assert await again.start(key) is False
            await expect_first_answer(again)
            await again.nothing_more()
        assert len(answers_of(app)) == 0


@pytest.mark.parametrize("resumes", ["another session", "none"])
async def test_a_notice_of_the_old_session_landing_during_a_second_client_start_is_ignored(
    monkeypatch: pytest.MonkeyPatch, resumes: str
) -> None:
    """A connection resumed the session while its old action ran, then sent client.start
    again: with another session's key (it resumes that one), or without a key (it starts
    anew: ``newSessionRequired: true``). The old action's answer was announced while that
    client.start was being answered, its ``client.started`` going out (past the store's
    lookup of the other session): the notice passed the test of the session the
    connection was in, since the handshake records its session only at its end. Without a
    key, the old session's answer was then taken and sent after ``client.started``, to a
    connection that had left that session (with another session's key, the resumed
    session's own due answers replaced the old one's: guarded here too). The notice is now tested again once the
    handshake is received: the answer stays kept for the old session (the other session
    goes on: a turn of it is answered), and the connection gets it when it resumes the
    old session, after that ``client.started``."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        server = app.state.voiceflow
        other_key: str | None = None
        if resumes == "another session":
            async with client(url) as elsewhere:  # the other session, its intro answered
                other_key = await elsewhere.handshake()
                await elsewhere.act({"type": "launch"})
                assert (await core.next_request())["input"]["transcript"]["text"] == "#intro"
        notices = step(monkeypatch, server, "_kept_announced")
        announced = step(monkeypatch, server, "_announce_kept", held=True)
        takes = step(monkeypatch, answers_of(app), "take")
        key = await leave_mid_action(url, core)
        async with client(url) as again:
            assert await again.start(key) is False
            await until(lambda: takes.done == 1)  # (nothing yet) it follows the session's topic
            core.release.set()
            await until(lambda: len(answers_of(app)) == 1)  # kept; its notice held
            real_emit = server.sio.emit

            async def emit(event: str, *args: Any, **kwargs: Any) -> Any:
                if event == "client.started" and not announced.go.is_set():
                    announced.go.set()  # the notice lands while it goes out
                    await until(lambda: notices.calls == 1)
                    await asyncio.sleep(0.2)  # (the notice is past its first test)
                return await real_emit(event, *args, **kwargs)

            monkeypatch.setattr(server.sio, "emit", emit)
            assert await again.start(other_key) is (other_key is None)
            await again.nothing_more(0.5)  # before, without a key: the old answer came here
            assert announced.go.is_set()
            await until(lambda: notices.done == 1)
            assert len(answers_of(app)) == 1  # still kept for the old session
            if other_key is not None:
                assert await again.say("hello") == ["core heard hello"]  # the other one's turn
            assert await again.start(key) is False
            await expect_first_answer(again)
            await again.nothing_more()
        assert len(answers_of(app)) == 0


async def test_a_second_client_start_before_the_kept_answer_is_taken_leaves_it_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client resumed its session (an answer is kept for it) and, before the gateway
    took the answer (it waits until the connection follows the session's topic), sent
    client.start again without a key: the kept answer went out after that second
    ``client.started {newSessionRequired: true}``, in no session. It is now left kept: a
    client.start with the key gets it after its own ``client.started``."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)
        following = step(monkeypatch, app.state.gateway.journal.outbox, "state", held=True)
        async with client(url) as again:
            assert await again.start(key) is False
            await until(lambda: following.calls == 1)  # the topic is being subscribed to
            assert await again.start(None) is True
            following.go.set()
            await until(lambda: following.done == 1)
            assert await again.start(key) is False
            await expect_first_answer(again)
            await again.nothing_more()
        assert len(answers_of(app)) == 0


async def test_a_second_client_start_waits_for_the_kept_answer_going_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kept answer is being taken (after the first ``client.started``) when the client
    sends client.start again without a key: its ``client.started {newSessionRequired:
    true}`` went out first, the old session's answer after it. The answer the first
    client.start took now goes out whole before the second ``client.started``."""
    core = RecordingCore()
    async with gateway_app(core) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: len(answers_of(app)) == 1)
        events = client_events(monkeypatch, app)
        takes = step(monkeypatch, answers_of(app), "take", held=True)
        async with client(url) as again:
            assert await again.start(key) is False
            await until(lambda: takes.calls == 1)
            await again.emit("client.start", start_payload(None))
            await until(lambda: events.calls == 2)  # the server has it
            takes.go.set()
            await expect_first_answer(again)
            assert await again.expect("client.started") == {"newSessionRequired": True}
            await again.nothing_more()
        assert len(answers_of(app)) == 0


# ------------------------------------------------------ two instances, shared Redis


def redis_env(redis_url: str, prefix: str, core_url: str) -> dict[str, str]:
    return {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_VOICEFLOW_SECRET": SECRET,
        "GATEWAY_PIPELINE": core_url,
    }


def kept_key(prefix: str, session_key: str) -> str:
    """The Redis key of the answers kept for the session of ``session_key``."""
    session_id = jwt.decode(session_key, options={"verify_signature": False})["sub"]
    return f"{prefix}:{{voiceflow:{session_id}}}:kept"


async def no_voiceflow_connections(url: str) -> bool:
    """Whether the gateway at ``url`` has no Voiceflow connection (its /metrics)."""
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{url}/metrics")).text
    return 'gateway_connections{channel="voiceflow"} 0.0' in text


async def leave_on(url: str, core: RecordingCore) -> str:
    """:func:`leave_mid_action` on a gateway process at ``url``."""
    async with client(url) as vf:
        key = await vf.handshake()
        await vf.act({"type": "launch"})
        await core.next_request()
        await vf.send({"type": "text", "payload": "slow"}, "first")
        assert (await vf.expect("action.status"))["status"] == "accepted"
        await core.next_request()
    await until(lambda: no_voiceflow_connections(url))
    return key


@contextlib.asynccontextmanager
async def two_instances(
    core: RecordingCore, redis_url: str, prefix: str, processes: list[GatewayProcess]
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    async with core.running() as core_url:
        a = GatewayProcess(redis_env(redis_url, prefix, core_url))
        b = GatewayProcess(redis_env(redis_url, prefix, core_url))
        processes += [a, b]
        await asyncio.to_thread(start_all, a, b)
        yield a, b


async def test_an_answer_lost_on_one_instance_comes_on_another_once(
    redis_url: str,
    redis_prefix: str,
    gateway_processes: list[GatewayProcess],
    aredis: aioredis.Redis,
) -> None:
    """Kept in Redis (under the session's hash tag): the client back on instance B gets
    the answer of its action on A, once; then two connections racing with the key of
    another such session, one on each instance, get its answer once between them."""
    core = RecordingCore()
    async with two_instances(core, redis_url, redis_prefix, gateway_processes) as (a, b):
        key = await leave_on(a.url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        core.release.clear()
        async with client(b.url, "polling") as on_b:
            assert await on_b.start(key) is False
            await expect_first_answer(on_b)
            await on_b.nothing_more()
            assert await on_b.say("hello") == ["core heard hello"]
        assert not await aredis.exists(kept_key(redis_prefix, key))  # delivered: not kept
        async with client(a.url) as on_a:
            assert await on_a.start(key) is False
            await on_a.nothing_more()

        key = await leave_on(a.url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        racing = [VoiceflowClient(a.url), VoiceflowClient(b.url)]
        try:
            await asyncio.gather(*(vf.connect() for vf in racing))
            await asyncio.gather(*(vf.start(key) for vf in racing))
            await until(lambda: any(not vf.events.empty() for vf in racing))
            await asyncio.sleep(0.5)  # room for a second delivery that must not come
            got = [[vf.events.get_nowait() for _ in range(vf.events.qsize())] for vf in racing]
        finally:
            await asyncio.gather(*(vf.close() for vf in racing))
        answered = [events for events in got if events]
        assert len(answered) == 1, got  # once, on one of them
        assert [name for name, _ in answered[0]] == ["action.trace", "action.status"]


async def test_a_client_back_on_another_instance_while_its_action_runs_gets_the_answer(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """Back on instance B while its action still runs on A: the answer comes on B as the
    action ends (A keeps it in Redis and announces it on the session's topic)."""
    core = RecordingCore()
    async with two_instances(core, redis_url, redis_prefix, gateway_processes) as (a, b):
        key = await leave_on(a.url, core)
        async with client(b.url) as on_b:
            assert await on_b.start(key) is False
            await on_b.nothing_more()
            core.release.set()
            await expect_first_answer(on_b)
            await on_b.nothing_more()


async def test_a_kept_answer_store_that_fails_at_connect_is_a_warning_naming_it(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis fails the take of the kept answers (only it: the session store answers): the
    resumed connection goes on (``client.started``, then its own action), the failure is
    logged as the gateway logs a store outage, at WARNING naming the component
    (``component: answer-store``), not an INFO line that names nothing. (The reply is
    lost after Redis ran the take: its answers are gone with it, at most once.)"""
    proxy, redis_url = reply_dropper
    caplog.set_level(logging.DEBUG, logger="adapters.voiceflow.routes")
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix) as (url, _):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.drop_replies_to = b":kept"  # the take's reply is lost, every time
        async with client(url) as again:
            assert await again.start(key) is False
            assert await again.say("hello") == ["core heard hello"]
            await until(lambda: any("not read" in r.getMessage() for r in caplog.records))
            await again.nothing_more()
        lines = [r for r in caplog.records if "not read" in r.getMessage()]
        assert [r.name for r in lines] == ["adapters.voiceflow.routes"]
        if lines[0].levelno == logging.DEBUG:  # the hung take opened the circuit breaker
            # on its way (a loaded machine: its slow-call bound came first), which logged
            # the outage once at WARNING: this line is DEBUG then (outage_level)
            assert any(
                r.name == "gateway.breaker" and r.levelno == logging.WARNING for r in caplog.records
            ), caplog.records
        else:
            assert lines[0].levelno == logging.WARNING
        assert "(component: answer-store): Redis is unavailable" in lines[0].getMessage()


async def test_a_take_of_kept_answers_that_hangs_does_not_hold_the_connection_back(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """Redis is slow to answer the take of the kept answers (only it: the session store
    answers). The take held the connection's lock, so the client's next action waited for
    it (up to the Redis command timeout, 5 s, when the take failed and the answer was
    lost). The connection now goes on meanwhile: the action runs while the take still
    hangs, and what it emits is held back until the kept answer has gone out, which comes
    first, whole, then the action's answer."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix) as (url, _):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        try:
            async with client(url) as again:
                assert await again.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # the take hangs
                await again.send({"type": "text", "payload": "hello"}, "m1")
                request = await unless_hung(core.next_request(), "the action never ran")
                assert request["input"]["transcript"]["text"] == "hello"
                assert proxy.replies_held == 1  # (still held: not released yet)
                assert again.events.empty()  # held back: the kept answer goes first
                proxy.release_replies()
                await expect_first_answer(again)
                await expect_hello_answer(again)
        finally:
            proxy.release_replies()


async def test_an_answer_held_back_behind_a_hanging_take_is_kept_when_the_client_leaves(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """The take of the kept answers hangs; meanwhile the client's action runs to its end,
    and its answer is held back behind the kept one (``_Client.held``). The client leaves
    before the take ends: the kept answer is kept again, and the action's answer, never
    sent, was dropped (the turn ran and saved the session; no connection was told). It is
    now kept after the first, and the session's next connection gets both, in order."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        server = app.state.voiceflow
        try:
            before = connections()
            async with client(url) as again:
                assert await again.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # the take hangs
                await again.send({"type": "text", "payload": "hello"}, "m1")
                await unless_hung(core.next_request(), "the action never ran")
                # the action's turn has ended: its whole answer is held back
                (held,) = server._clients.values()  # (the one connection)
                await until(lambda: not held.turns)
                assert again.events.empty()
            await until(lambda: connections() == before)  # the server saw it leave
            proxy.hold_replies_to = None
            proxy.release_replies()
            await until(lambda: held.held is None)  # the take has ended
            async with client(url) as third:
                assert await third.start(key) is False
                await expect_first_answer(third)
                await expect_hello_answer(third)
        finally:
            proxy.release_replies()


async def test_answers_kept_again_by_a_connection_that_left_go_to_the_one_that_resumed_meanwhile(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """The take of a connection's kept answers hangs (Redis took them; its reply is slow)
    and the client's socket drops; it reconnects at once and resumes the session: its new
    connection's take finds nothing. The first take then ends, its connection gone: the
    answers are kept again, but nobody was told, so the connection that resumed the
    session meanwhile never got them (only a later client.start would). They are now
    announced as a kept answer is, and it gets them."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        server = app.state.voiceflow
        try:
            before = connections()
            async with client(url) as dropped:
                assert await dropped.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # the take hangs
                (first,) = server._clients.values()
            await until(lambda: connections() == before)  # the server saw it leave
            proxy.hold_replies_to = None  # (the first take's reply is still held)
            async with client(url) as again:
                assert await again.start(key) is False  # its take finds nothing
                await again.nothing_more()
                proxy.release_replies()
                await until(lambda: first.held is None)  # the first take has ended
                await unless_hung(expect_first_answer(again), "the answer never came")
                await again.nothing_more()
        finally:
            proxy.release_replies()


async def test_kept_answers_taken_by_redis_whose_reply_comes_past_the_timeout_stay_kept(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """Redis runs the take of the kept answers, but its reply comes after the command
    timeout (shortened here by the URL's ``socket_timeout``). The take read and deleted
    them in one step, so they were gone, though the gateway logs them as not read and its
    docs say they stay kept. The take now moves them to a claim that is put back when its
    outcome is unknown: the session's next client.start gets them."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    url_with_timeout = f"{redis_url}?socket_timeout=0.5"
    async with gateway_app(core, redis_url=url_with_timeout, redis_prefix=redis_prefix) as (
        url,
        app,
    ):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        server = app.state.voiceflow
        try:
            async with client(url) as again:
                assert await again.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # Redis ran the take
                (taking,) = server._clients.values()
                proxy.hold_replies_to = None  # (its reply stays held past the timeout)
                await until(lambda: taking.held is None)  # the take timed out and ended
                await again.nothing_more()  # nothing delivered by the take that timed out
                proxy.release_replies()
                # the session's next client.start (again while the breaker, opened by the
                # timeout, refuses the store's calls)
                await unless_hung(started_again(again, key), "client.start never answered")
                await expect_first_answer(again)
                await again.nothing_more()
        finally:
            proxy.release_replies()


async def started_again(vf: VoiceflowClient, key: str) -> None:
    """``client.start`` with ``key`` until it is answered ``client.started`` (resumed), not
    ``error`` ``store-unavailable``."""
    while True:
        await vf.emit("client.start", {"userID": USER, "projectID": PROJECT, "sessionKey": key})
        event, data = await vf.next()
        if event == "client.started":
            assert data["newSessionRequired"] is False
            return
        assert (event, data["code"]) == ("error", "store-unavailable"), (event, data)
        await asyncio.sleep(0.1)


async def test_answers_put_back_by_a_take_the_client_left_stay_ahead_of_its_running_actions(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """The take of the kept answers hangs (Redis took them; its reply is slow); the
    client's action runs meanwhile and the client leaves before either ends. The action's
    answer is kept as it ends; the take then ends, its connection gone, and kept its
    answers again after it: the session's next connection got the newer answer first.
    They are now put back ahead of it, and it gets both in order."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix) as (url, app):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        core.release.clear()  # the next slow action waits again
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        server = app.state.voiceflow
        try:
            before = connections()
            async with client(url) as again:
                assert await again.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # the take hangs
                (taking,) = server._clients.values()
                proxy.hold_replies_to = None  # (the take's reply is still held)
                await again.send({"type": "text", "payload": "slow"}, "m1")
                await unless_hung(core.next_request(), "the action never ran")
            await until(lambda: connections() == before)  # it left while both run
            core.release.set()  # the action ends: its answer is kept
            await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
            proxy.release_replies()  # then the take ends
            await until(lambda: taking.held is None)
            async with client(url) as third:
                assert await third.start(key) is False
                await expect_first_answer(third)
                assert await third.expect("action.status") == {
                    "status": "accepted",
                    "messageID": "m1",
                }
                traces, done = await third.traces_until_status("m1")
                assert messages(traces) == ["slow answer"]
                assert done == {"status": "completed", "messageID": "m1"}
                await third.nothing_more()
        finally:
            core.release.set()
            proxy.release_replies()


async def test_a_packet_refused_while_a_take_hangs_is_answered_after_the_kept_answers(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The take of the kept answers hangs; meanwhile the client sends a packet that does
    not decode. Its ``error invalid-payload`` went out at once, ahead of the kept answers
    (and of all that waited behind them); it now follows them, as every other message."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix) as (url, _):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        try:
            async with client(url) as again:
                assert await again.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # the take hangs
                await again.sio.eio.send('2["broken')  # an EVENT whose JSON does not decode
                refused = "Voiceflow socket.io packet refused"
                await until(lambda: any(refused in r.getMessage() for r in caplog.records))
                await again.emit("sentinel.event", {})  # answered after the refusal
                proxy.release_replies()
                await expect_first_answer(again)
                assert (await again.expect("error"))["code"] == "invalid-payload"
                assert (await again.expect("error"))["code"] == "unknown-event"
                await again.nothing_more()
        finally:
            proxy.release_replies()


@contextlib.asynccontextmanager
async def hanging_take(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    **settings: Any,
) -> AsyncIterator[tuple[FastAPI, VoiceflowClient, ReplyDropper, str]]:
    """An in-process gateway on Redis (through the proxy), an answer kept for a session
    (:func:`leave_mid_action`), and a client that resumed it whose take of that answer
    hangs (its reply held until the proxy's ``release_replies``): (app, client, proxy,
    the session's sessionKey)."""
    proxy, redis_url = reply_dropper
    core = RecordingCore()
    async with gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix, **settings) as (
        url,
        app,
    ):
        key = await leave_mid_action(url, core)
        core.release.set()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        proxy.hold_replies_to = b":kept"  # the take's reply waits for release_replies
        try:
            async with client(url) as again:
                assert await again.start(key) is False
                await until(lambda: proxy.replies_held == 1)  # the take hangs
                yield app, again, proxy, key
        finally:
            proxy.release_replies()


async def test_an_event_that_fails_while_a_take_hangs_is_answered_after_the_kept_answers(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The take of the kept answers hangs; meanwhile handling a client event fails (a
    gateway fault, made here by a connection whose ``receive`` raises for one event).
    Its ``error gateway-error`` went out at once, ahead of the kept answers; it now
    follows them, as every other message."""
    real = VoiceflowConnection.receive

    def receive(self: VoiceflowConnection, event: str, args: Any = ()) -> Any:
        if event == "explode":
            raise RuntimeError("a gateway fault")
        return real(self, event, args)

    monkeypatch.setattr(VoiceflowConnection, "receive", receive)
    async with hanging_take(reply_dropper, redis_prefix, aredis, faults=True) as (
        _,
        again,
        proxy,
        _key,
    ):
        await again.emit("explode", {})
        await until(lambda: any("'explode' failed" in r.getMessage() for r in caplog.records))
        proxy.release_replies()
        await expect_first_answer(again)
        assert (await again.expect("error"))["code"] == "gateway-error"
        await again.nothing_more()


async def test_an_action_that_fails_while_a_take_hangs_is_answered_after_its_accepted(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The take of the kept answers hangs; meanwhile the client's action fails in the
    gateway (its forwarder, made to fail here by a connection whose ``turn_event``
    raises). Its ``error gateway-error`` went out at once, ahead of the kept answers and
    of the action's own ``accepted`` (held behind them), and the connection was closed at
    once, so neither came. Now the kept answer comes, then ``accepted``, then the error,
    then the close."""

    def turn_event(self: VoiceflowConnection, event: Any) -> Any:
        raise RuntimeError("a gateway fault")

    async with hanging_take(reply_dropper, redis_prefix, aredis, faults=True) as (
        app,
        again,
        proxy,
        _key,
    ):
        monkeypatch.setattr(VoiceflowConnection, "turn_event", turn_event)
        server = app.state.voiceflow
        (resumed,) = server._clients.values()
        await again.send({"type": "text", "payload": "hello"}, "m1")
        await until(lambda: resumed.held)  # accepted, held back behind the take
        await until(lambda: not resumed.turns or len(resumed.held or []) > 1)
        proxy.release_replies()
        await expect_first_answer(again)
        assert await again.expect("action.status") == {"status": "accepted", "messageID": "m1"}
        failure = await again.expect("error")
        assert (failure["code"], failure["messageID"]) == ("gateway-error", "m1")
        await until(lambda: not again.sio.connected)  # then closed by the server
        assert again.events.empty()


async def test_server_restart_while_a_take_hangs_comes_after_the_kept_answers(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """The server restarts while the take of a client's kept answers hangs:
    ``server.restart`` went out at once, ahead of the answers (which then went nowhere:
    the connection was closed behind it). Now the answers the take got come first, then
    ``server.restart``. (A grace long enough for the test's steps: past half of it the
    client is told all the same, :func:`test_server_restart_is_told_in_time_when_the_
    take_hangs_past_the_grace`.)"""
    async with hanging_take(
        reply_dropper, redis_prefix, aredis, voiceflow_restart_grace_s=30.0
    ) as (app, again, proxy, _key):
        restart = asyncio.create_task(app.state.voiceflow.restart())
        try:
            await again.nothing_more()  # nothing ahead of the kept answers
            proxy.release_replies()
            await expect_first_answer(again)
            assert await again.expect("server.restart") == {}
            assert await unless_hung(restart, "the restart never ended") == 1
            await until(lambda: not again.sio.connected)  # then closed by the server
        finally:
            restart.cancel()


async def test_what_a_polling_client_is_sent_after_server_restart_is_kept(
    redis_url: str,
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """A long-polling client is told ``server.restart`` while its action still runs (half
    the grace went by); the server then waits for a GET to take it and Engine.IO CLOSE.
    The action ends meanwhile: its traces and ``completed`` were queued after CLOSE and
    dropped with the session (the client stops reading at CLOSE), never kept. They are
    now held and kept, and the session's next connection gets them."""
    core = RecordingCore()
    async with gateway_app(
        core, redis_url=redis_url, redis_prefix=redis_prefix, voiceflow_restart_grace_s=1.0
    ) as (url, app):
        server = app.state.voiceflow
        polling = f"{url}{PATH}/?EIO=4&transport=polling"
        async with httpx.AsyncClient(timeout=10) as http:
            opened = await http.get(polling)
            eio_sid = json.loads(opened.text[1:])["sid"]
            session = f"{polling}&sid={eio_sid}"

            async def post(*events: Any) -> None:
                body = "\x1e".join(f"42{json.dumps(e)}" for e in events)
                assert (await http.post(session, content=body)).text == "OK"

            async def get_events() -> list[Any]:
                packets = (await http.get(session)).text.split("\x1e")
                return [json.loads(p[2:]) if p.startswith("42") else p for p in packets]

            assert (await http.post(session, content="40")).text == "OK"
            assert (await http.get(session)).text.startswith("40")
            await post(["client.start", {"userID": USER, "projectID": PROJECT}])
            assert (await get_events())[0][0] == "client.started"
            await post(["session.create", {}])
            (created,) = await get_events()
            key = created[1]["sessionKey"]
            await post(
                ["action.send", {"action": {"type": "text", "payload": "slow"}, "messageID": "s"}]
            )
            assert (await get_events())[0] == [
                "action.status",
                {"status": "accepted", "messageID": "s"},
            ]
            await core.next_request()
            (polled,) = server._clients.values()
            socket = server.sio.eio.sockets[eio_sid]
            restart = asyncio.create_task(server.restart())
            try:
                # told: server.restart and CLOSE wait in the queue for a GET
                await until(lambda: any(p.packet_type == 1 for p in list(socket.queue._queue)))
                core.release.set()  # the action ends while the server waits for the GET
                await until(lambda: not polled.turns)
                told = await get_events()
                assert told == [["server.restart", {}], "1"]  # nothing after CLOSE
                assert await unless_hung(restart, "the restart never ended") == 1
            finally:
                restart.cancel()
        await until(lambda: aredis.exists(kept_key(redis_prefix, key)))
        async with client(url) as again:
            assert await again.start(key) is False
            traces, done = await again.traces_until_status("s")
            assert (messages(traces), done) == (
                ["slow answer"],
                {"status": "completed", "messageID": "s"},
            )
            await again.nothing_more()


async def test_a_refusal_held_behind_a_take_is_not_kept_for_the_next_connection(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """The take of the kept answers hangs; the client sends a packet that does not decode
    (its ``error invalid-payload`` is held behind the take) and leaves before the take
    ends. The held refusal was kept with the session's answers and shown to its next
    connection, which had sent nothing wrong. It is now dropped with the connection it
    answered; the kept answer itself is kept again and delivered."""
    async with hanging_take(reply_dropper, redis_prefix, aredis) as (app, again, proxy, key):
        (taking,) = app.state.voiceflow._clients.values()
        await again.sio.eio.send('2["broken')  # an EVENT whose JSON does not decode
        await until(lambda: taking.held)  # its refusal, held back behind the take
        url = again.url
        before = connections()
        await again.close()
        await until(lambda: connections() < before)  # the server saw it leave
        proxy.hold_replies_to = None
        proxy.release_replies()
        await until(lambda: taking.held is None)  # the take has ended: kept again
        async with client(url) as third:
            assert await third.start(key) is False
            await expect_first_answer(third)
            await third.nothing_more()


async def test_claims_to_put_back_are_bounded_by_count_and_one_the_breaker_refused_is_not_one(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis hangs: a take's claim times out (its outcome unknown: it is to be put back),
    which opens the circuit breaker, and the put-back is refused, so the instance
    remembers the claim to put back later. A later take's claim, refused by the open
    breaker, never reached Redis and claimed nothing, but was remembered and retried all
    the same; and the bound on what is remembered (``_MAX_UNCLAIMED``) counted sessions,
    so one session's failed put-backs grew without end. Now a refused claim is not
    remembered, and the bound counts claims (the oldest forgotten first)."""
    proxy, redis_url = reply_dropper
    monkeypatch.setattr(routes, "_MAX_UNCLAIMED", 3)
    core = RecordingCore()
    async with gateway_app(
        core, redis_url=f"{redis_url}?socket_timeout=0.5", redis_prefix=redis_prefix
    ) as (_, app):
        server = app.state.voiceflow
        key = "voiceflow:a-session-of-the-test"
        proxy.hung = True
        try:
            assert await unless_hung(server._take(key, "t1"), "the take never ended") == []
            assert server._unclaimed == {key: ["t1"]}  # timed out: its outcome unknown
            assert await server._take(key, "t2") == []  # refused by the open breaker
            assert server._unclaimed == {key: ["t1"]}  # (t1 tried again, refused again)
            for n in range(3):  # put-backs the breaker refuses: each remembered
                assert await server._unclaim(key, f"u{n}") is False
            assert server._unclaimed == {key: ["u0", "u1", "u2"]}  # three at most
        finally:
            proxy.hung = False


async def test_the_shutdown_waits_for_the_action_of_a_client_that_left_and_keeps_its_answer(
    redis_url: str,
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """A client left while its action ran, and the server shuts down before the action
    ends. The action's forwarder (which keeps its answer) was no longer among those the
    Voiceflow server's stop waits for (``VoiceflowServer._detached``, dropped from
    ``_disconnect`` when server.restart's held answers were added): the shutdown went on
    to close the store under it, and the answer could be lost. It is waited for again,
    and the answer is in Redis for the session's next connection once the shutdown has
    ended."""
    core = RecordingCore()
    stack = contextlib.AsyncExitStack()
    url, app = await stack.enter_async_context(
        gateway_app(core, redis_url=redis_url, redis_prefix=redis_prefix)
    )
    shutdown: asyncio.Task[None] | None = None
    try:
        server = app.state.voiceflow
        key = await leave_mid_action(url, core)
        assert len(server._detached) == 1  # its forwarder: the shutdown waits for it
        shutdown = asyncio.create_task(stack.aclose())
        core.release.set()
        await unless_hung(asyncio.shield(shutdown), "the shutdown never ended")
        assert await aredis.exists(kept_key(redis_prefix, key))
        kept = [json.loads(a) for a in await aredis.lrange(kept_key(redis_prefix, key), 0, -1)]
        assert kept[-1][-1] == ["action.status", {"status": "completed", "messageID": "first"}]
    finally:
        core.release.set()
        if shutdown is None:
            await stack.aclose()
        else:
            await asyncio.wait({shutdown})


async def test_server_restart_is_told_in_time_when_the_take_hangs_past_the_grace(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> None:
    """The server restarts while the take of a client's kept answers hangs past the
    restart's grace. ``server.restart`` waited for the take to end, so the grace ran out
    first: the client was never told (nor its queued action handed back to replay) and
    its connection was left open. It is now told within the grace, ahead of the
    answers still being taken, which are not sent after it (they would follow Engine.IO
    CLOSE): they stay kept, and the session's next connection gets them."""
    async with hanging_take(reply_dropper, redis_prefix, aredis, voiceflow_restart_grace_s=1.0) as (
        app,
        again,
        proxy,
        key,
    ):
        (taking,) = app.state.voiceflow._clients.values()
        restart = asyncio.create_task(app.state.voiceflow.restart())
        try:
            assert await again.expect("server.restart") == {}  # the take still hangs
            assert await unless_hung(restart, "the restart never ended") == 1
            await until(lambda: not again.sio.connected)  # then closed by the server
            proxy.hold_replies_to = None
            proxy.release_replies()
            await until(taking.take_over.is_set)  # the take has ended: kept again
            assert again.events.empty()  # nothing after server.restart
            async with client(again.url) as third:
                assert await third.start(key) is False
                await expect_first_answer(third)
                await third.nothing_more()
        finally:
            restart.cancel()
