"""V2 clients that leave mid-turn, over a real server, with the memory and the Redis store:
nothing of the abandoned turn stays held.

- Mid-answer (text PUT, realtime PUT with its GET): the client closes its connection after
  the first streamed item. The turn runs on to its end (gateway/conversation.py: a client
  that vanishes does not cut it short); then the session's next request is served at once.
- Mid-recognition (realtime PUT streaming audio, its GET following): the client closes
  both; the session's next realtime PUT is served at once.

Afterwards no bus subscription of this process, retained recognition marker (the realtime
claim), turn or other asyncio task, Redis pub/sub subscriber or Redis key of the turn
remains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.bus import MemoryBus, RedisBus
from gateway.deps import Gateway
from gateway.server import uvicorn_options
from gateway.settings import Settings
from tests.adapters.flowstorm.v2.helpers import RawPut
from tests.conftest import serve
from tests.gateway.core_app import make_core

KEY = "leaving-test"
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
PROMPT_S = 2.0
"""The bound: what the abandoned turn held is given back within this many seconds of its
core's last answer, and the session's next request is then answered within this many
seconds (a turn here takes milliseconds; nothing may wait for a timeout, the shortest of
which is LOST_S, 5 s)."""


def input_line(text: str) -> bytes:
    return json.dumps({"type": "Input", "input": {"transcript": {"text": text}}}).encode() + b"\n"


class Leaving:
    """A served gateway (``app``, memory or Redis store; ``redis``/``prefix`` for the
    latter) whose core streams its answers (tests/gateway/core_app.py ``/stream``:
    ``first``, then, once ``core.state.release`` is set, ``second`` and the Response), a
    client with the cookie of a session it started, and the checks."""

    def __init__(
        self,
        app: FastAPI,
        core: FastAPI,
        client: httpx.AsyncClient,
        redis: Redis | None,
        prefix: str,
    ) -> None:
        self.app, self.core, self.client = app, core, client
        self.redis, self.prefix = redis, prefix
        self.gw: Gateway = app.state.gateway
        self.session = client.cookies["flowstorm-session-id"]
        self.topic = f"flowstorm:{self.session}"  # the session's key: its recognition topic
        self.tasks = len(asyncio.all_tasks())

    async def retained(self) -> bool:
        """Whether the session's recognition topic holds a retained value (a claim)."""
        bus = self.gw.bus
        if isinstance(bus, MemoryBus):
            held = bus._retained.get(self.topic)
            return held is not None and held[0] > asyncio.get_running_loop().time()
        assert self.redis is not None
        return bool(await self.redis.exists(f"{self.prefix}:{{{self.topic}}}:retained"))

    async def released(self) -> None:
        """Wait (at most PROMPT_S) until the turn ended and the recognition topic is free."""
        for _ in range(int(PROMPT_S / 0.02)):
            if not self.gw.conversation.turns_in_flight and not await self.retained():
                return
            await asyncio.sleep(0.02)
        bus = self.gw.bus
        raise AssertionError(
            f"still held after {PROMPT_S} s: {self.gw.conversation.turns_in_flight} turn(s), "
            f"retained {getattr(bus, '_retained', {}).get(self.topic)}"
        )

    async def recognition_free(self) -> None:
        """Wait (at most PROMPT_S) until the session's recognition topic is free."""
        for _ in range(int(PROMPT_S / 0.02)):
            if not await self.retained():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the recognition of the session is still held after {PROMPT_S} s")

    async def served_at_once(self, query: str, kind: dict[str, str], body: bytes) -> None:
        """The session's next request is answered 200 within PROMPT_S, in the same session."""
        t0 = time.monotonic()
        answer = await self.client.put(query, headers=kind, content=body)
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - t0 < PROMPT_S
        assert "second" in answer.text  # the core's whole answer
        assert self.client.cookies["flowstorm-session-id"] == self.session

    async def nothing_held(self) -> None:
        """No subscription, claim, task, Redis subscriber or key of the turn remains."""
        bus = self.gw.bus
        assert isinstance(bus, MemoryBus | RedisBus)
        for _ in range(int(PROMPT_S / 0.05)):  # the Redis bus reader's last read (1 s) ends
            if not bus._subs and len(asyncio.all_tasks()) <= self.tasks:
                break
            await asyncio.sleep(0.05)
        assert not bus._subs
        assert len(asyncio.all_tasks()) <= self.tasks, asyncio.all_tasks()
        assert self.gw.conversation.turns_in_flight == 0
        assert not await self.retained()
        if self.redis is not None:
            channel = f"{self.prefix}:{{{self.topic}}}:bus"
            assert await self.redis.pubsub_numsub(channel) == [(channel.encode(), 0)]
            keys = {k.decode() async for k in self.redis.scan_iter(match=f"{self.prefix}:*")}
            assert keys == {f"{self.prefix}:secret-key", f"{self.prefix}:{{{self.topic}}}:s"}


@pytest.fixture(params=["memory", "redis"])
async def leaving(request: pytest.FixtureRequest) -> AsyncIterator[Leaving]:
    store: dict[str, Any] = {}
    redis: Redis | None = None
    prefix = ""
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        store = {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": prefix}
        redis = Redis.from_url(request.getfixturevalue("redis_url"))
    core = make_core()
    async with serve(core) as core_url:
        settings = Settings(pipeline=f"{core_url}/stream", **store)
        app = create_app(settings)
        async with (
            serve(app, **uvicorn_options(settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as client,
        ):
            core.state.release.set()  # the first turn streams whole
            intro = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="#intro")
            assert intro.status_code == 200, intro.text
            core.state.release.clear()  # the next turns' answers stop after "first"
            await asyncio.sleep(0.1)  # the intro's connection tasks are done
            try:
                yield Leaving(app, core, client, redis, prefix)
            finally:
                if redis is not None:
                    await redis.aclose()


@pytest.mark.parametrize("path", ["text", "realtime"])
async def test_a_client_that_leaves_mid_answer_holds_nothing(leaving: Leaving, path: str) -> None:
    """The answer's body runs to the turn's end although nobody reads it: the realtime
    claim is given back as soon as the client left (its next realtime PUT is taken: see
    :func:`test_a_realtime_put_whose_client_vanishes_after_done_frees_the_session`), the
    turn still running; the text PUT waiting on the lock is served once the turn ends."""
    client = leaving.client
    realtime = path == "realtime"
    query = f"/client?key={KEY}&tts=None" + ("&realtime=1" if realtime else "")
    kind, body, again = (
        (JSON, input_line("again"), input_line("back")) if realtime else (TEXT, b"again", b"back")
    )
    follower = None
    if realtime:  # the client's GET follows the recognition (the switch to text ends it)
        follower = asyncio.create_task(client.get(f"/client?key={KEY}"))
        await asyncio.sleep(0.2)
    async with client.stream("PUT", query, headers=kind, content=body) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            assert "first" in line, line
            break  # the client leaves: the connection closes, the rest is never read
    if follower is not None:
        assert (await follower).status_code == 200
    await asyncio.sleep(0.2)
    assert leaving.gw.conversation.turns_in_flight == 1  # the turn goes on, held by the core
    if realtime:  # the client left: its recognition is given back, the turn runs on
        await leaving.recognition_free()
        assert leaving.gw.conversation.turns_in_flight == 1
    leaving.core.state.release.set()  # the core answers the rest: nobody reads it
    if not realtime:  # a text PUT waits for the session lock: it is served once the turn ends
        await leaving.served_at_once(query, kind, again)
    await leaving.released()
    await leaving.served_at_once(query, kind, again)
    await leaving.nothing_held()


def binary_line(chunk: bytes) -> bytes:
    return json.dumps({"type": "Binary", "data": base64.b64encode(chunk).decode()}).encode() + b"\n"


async def test_a_client_that_leaves_mid_recognition_holds_nothing(leaving: Leaving) -> None:
    """The realtime PUT notices that its body stopped (ClientDisconnect) and gives the
    recognition topic back; the GET's subscription ends with its connection."""
    client = leaving.client
    leaving.core.state.release.set()
    query = f"/client?key={KEY}&tts=None&realtime=1"
    lines: list[str] = []

    async def follow() -> None:
        async with client.stream("GET", f"/client?key={KEY}") as get:
            async for line in get.aiter_lines():
                lines.append(line)

    class Leave(Exception):
        pass

    async def mic() -> AsyncIterator[bytes]:
        for _ in range(8):  # 100 ms of silence at 16 kHz every 50 ms, then the client is gone
            yield binary_line(bytes(3200))
            await asyncio.sleep(0.05)
        raise Leave

    # a realtime turn first: the recognizer is warm (its first start takes 1-2 s, for which
    # the audio already received waits, and the PUT notices that its client left after it)
    warm = b"".join([binary_line(bytes(3200))] * 3) + b'{"type":"InputStreamClose"}\n'
    warmed = await client.put(query, headers=JSON, content=warm + input_line("warm"))
    assert warmed.status_code == 200, warmed.text
    await leaving.released()
    leaving.tasks = len(asyncio.all_tasks())
    getter = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    with pytest.raises(Leave):
        await client.put(query, headers=JSON, content=mic())
    getter.cancel()  # the client leaves its GET too (if the recognition's end did not end it)
    with contextlib.suppress(asyncio.CancelledError):
        await getter
    await leaving.released()
    await leaving.served_at_once(query, JSON, input_line("back"))
    await leaving.nothing_held()


@pytest.mark.parametrize("body", ["ended", "open"])
async def test_a_realtime_put_whose_client_vanishes_after_done_frees_the_session(
    leaving: Leaving, body: str
) -> None:
    """A realtime PUT whose recognition ended (``done``: the typed Input) and whose turn
    runs (held by the core after its first item) loses its client: the TCP connection is
    dropped. The session's recognition is given back within PROMPT_S of that, the turn
    still running: a new GET of the session follows the next recognition (the old code:
    it ended at once on the retained ``done``) and the next realtime PUT is taken (the old
    code: 409 until the turn ended, or ``done`` expired after GATEWAY_TURN_TIMEOUT_S +
    GATEWAY_LOCK_WAIT_S + 5 s should the PUT die). Its turn waits for the session lock
    and answers once the first turn ended. Another session's realtime PUT meanwhile is
    never refused. The client ended its body before it vanished, or left it open (the
    answer streams at once all the same)."""
    client = leaving.client
    query = f"/client?key={KEY}&tts=None&realtime=1"
    follower = asyncio.create_task(client.get(f"/client?key={KEY}"))
    await asyncio.sleep(0.2)
    put = await RawPut.open(str(client.base_url), query, JSON["Content-Type"], leaving.session)
    try:
        await put.send(input_line("again"))
        if body == "ended":
            await put.end()  # (the old code answers only a whole body)
        await put.read_until(b"first", PROMPT_S * 5)  # the turn runs, held by the core
        assert put.status == 200
        assert (await asyncio.wait_for(follower, PROMPT_S)).status_code == 200  # done
        assert await leaving.retained()  # the recognition is the session's while it answers
    finally:
        put.drop()  # the client vanishes
    await leaving.recognition_free()
    assert leaving.gw.conversation.turns_in_flight == 1  # the first turn runs on

    async with httpx.AsyncClient(base_url=client.base_url, timeout=20) as other:
        other_put = asyncio.create_task(  # a new session's realtime PUT (no cookie)
            other.put(query, headers=JSON, content=input_line("other"))
        )
        getter = asyncio.create_task(client.get(f"/client?key={KEY}"))
        await asyncio.sleep(0.3)
        assert not getter.done()  # it waits for the next recognition of the session
        again = asyncio.create_task(client.put(query, headers=JSON, content=input_line("back")))
        await asyncio.sleep(0.3)
        assert not again.done(), again.result().text  # taken (not a 409): its turn waits
        assert (await asyncio.wait_for(getter, PROMPT_S)).status_code == 200  # its done
        leaving.core.state.release.set()  # the first turn ends: the next one runs
        answer = await asyncio.wait_for(again, PROMPT_S * 5)
        assert answer.status_code == 200, answer.text
        assert "second" in answer.text
        assert client.cookies["flowstorm-session-id"] == leaving.session
        other_answer = await asyncio.wait_for(other_put, PROMPT_S * 5)
        assert other_answer.status_code == 200, other_answer.text
        assert "second" in other_answer.text
    await leaving.released()
