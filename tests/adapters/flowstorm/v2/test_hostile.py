"""Flowstorm V2 against failures and hostile clients, over real servers.

The store dying mid-turn, guessed and foreign session cookies on GET /client,
session-id guessing, and the memory store's cap: each answered in V2's own
error form (``!`` line / ErrorEvent, with its HTTP status), with no error in the
server's log (``served``), and other sessions going on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import free_port, redis_server_ours, serve, served, served_app
from tests.gateway.core_app import make_core

KEY = "hostile-test"
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
COOKIE = "flowstorm-session-id"
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


async def call(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    session: str | None = None,
    **kwargs: object,
) -> httpx.Response:
    """One request with ``session`` as its only cookie (the client's jar is not used)."""
    client.cookies.clear()
    headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
    if session is not None:
        headers["Cookie"] = f"{COOKIE}={session}"
    answer = await client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]
    client.cookies.clear()
    return answer


def input_event(text: str) -> str:
    return json.dumps({"type": "Input", "input": {"transcript": {"text": text}}})


class PortTaken(Exception):
    """Another process bound the port of a :class:`PrivateRedis` first."""


class PrivateRedis:
    """A redis-server of this test's own on ``port`` (no persistence), to kill and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        # ours answering, not another worker's server that took the port (ours exited)
        while (ours := redis_server_ours(self.proc, self.url)) is None:
            if time.monotonic() > deadline:
                pytest.fail("the private redis-server did not start")
            time.sleep(0.05)
        if not ours:
            self.kill()
            raise PortTaken(self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    for _ in range(5):  # again on another port when another process took this one
        with contextlib.suppress(PortTaken):
            server = PrivateRedis(free_port()).start()
            break
    else:
        pytest.fail("five ports in a row were taken by other processes")
    yield server
    server.kill()


@contextlib.asynccontextmanager
async def held_core() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """The test core; its /stream answer waits after its first item until the event is set."""
    core = make_core()
    async with serve(core) as url:
        yield url, core.state.release


async def test_store_killed_mid_turn_ends_every_streaming_answer_with_the_error(
    private_redis: PrivateRedis,
) -> None:
    async with (
        held_core() as (core_url, release),
        served(
            redis_url=private_redis.url, pipeline=f"{core_url}/stream", turn_timeout_s=20
        ) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):

        async def turn(plain: bool, seen: asyncio.Event) -> tuple[int, str, dict[str, str]]:
            headers, body = (TEXT, "hello") if plain else (JSON, input_event("hello"))
            lines = []
            async with client.stream(
                "PUT", "/client?key=k&tts=None", headers=headers, content=body
            ) as answer:
                async for line in answer.aiter_lines():  # raises on a cut-off body
                    lines.append(line)
                    seen.set()
                return answer.status_code, "\n".join(lines), dict(answer.headers)

        first_items = [asyncio.Event() for _ in range(6)]
        turns = [asyncio.create_task(turn(i % 2 == 0, seen)) for i, seen in enumerate(first_items)]
        async with asyncio.timeout(20):
            for seen in first_items:
                await seen.wait()  # every turn has streamed its first item
        private_redis.kill()
        release.set()
        results = await asyncio.gather(*turns)
        assert [status for status, _, _ in results] == [200] * 6
        kinds = [(headers["content-type"], text) for _, text, headers in results]
        plain_answers = [text for kind, text in kinds if kind.startswith("text/plain")]
        json_answers = [text for kind, text in kinds if "ndjson" in kind]
        assert len(plain_answers) == len(json_answers) == 3
        for text in plain_answers:
            assert text.splitlines() == [
                "< first",
                "< second",
                "! gateway: The session store is unavailable: this turn was not saved.",
            ]
        for text in json_answers:
            events = [json.loads(line) for line in text.splitlines() if line]
            assert [e["type"] for e in events] == ["ResponseItem", "ResponseItem", "Error"]
            assert events[-1]["source"] == "gateway"
            assert "not saved" in events[-1]["text"]

        # while Redis is down a new turn is refused before anything streams
        down = await call(client, "PUT", "/client?key=k&tts=None", headers=TEXT, content="hi")
        assert down.status_code == 503
        assert down.text == "! gateway: The session store is unavailable.\n"

        # Redis back on the same port: other sessions work again, turn after turn
        private_redis.start()
        fresh = await call(client, "PUT", "/client?key=k&tts=None", headers=TEXT, content="again")
        assert fresh.status_code == 200
        assert fresh.text == "< first\n< second\n"
        again = await call(
            client,
            "PUT",
            "/client?key=k&tts=None",
            fresh.cookies[COOKIE],
            headers=TEXT,
            content="more",
        )
        assert again.status_code == 200
        assert again.text == "< first\n< second\n"


async def test_get_client_checks_the_cookie_session_and_its_key() -> None:
    async with (
        served(tts_provider="espeak-ng") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        made = await call(client, "PUT", f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        session = made.cookies[COOKIE]
        # another application's key cannot follow this session
        foreign = await call(
            client, "GET", "/client?key=intruder", session=session, headers={"Accept": "text/plain"}
        )
        assert foreign.status_code == 403
        assert foreign.text == f"! session: Session {session} belongs to another application.\n"
        unknown = await call(client, "GET", "/client?key=intruder", session="guess")
        assert unknown.status_code == 404
        (error,) = [json.loads(line) for line in unknown.text.splitlines()]
        assert (error["type"], error["source"]) == ("Error", "session")
        # its own key follows it (nothing running: an empty answer after the marker wait)
        own = await call(client, "GET", f"/client?key={KEY}", session=session)
        assert own.status_code == 200
        assert own.text == ""
        # and the session goes on
        on = await call(
            client,
            "PUT",
            f"/client?key={KEY}&tts=None",
            session,
            headers=TEXT,
            content="still here",
        )
        assert on.text == "< You said: still here\n"


async def test_session_id_guessing_is_limited_per_ipv6_64() -> None:
    """The "unknown session" limiter counted each client address: an IPv6 client guessed
    session ids with a new allowance per address of its /64. It is keyed as the admin
    limiter is (:func:`gateway.ratelimit.client_key`): an IPv6 address by its /64, an
    IPv4-mapped one as its IPv4 address (addresses from a trusted proxy's
    X-Forwarded-For)."""
    settings = Settings().model_copy(update={"not_found_burst": 2, "not_found_per_s": 0.01})
    served = served_app(create_app(settings), settings, forwarded_allow_ips="127.0.0.1")
    async with served as url, httpx.AsyncClient(base_url=url) as client:

        async def guess(address: str) -> int:
            answer = await call(
                client,
                "GET",
                f"/client?key={KEY}",
                session="guess-1",
                headers={"X-Forwarded-For": address},
            )
            return answer.status_code

        assert [await guess(a) for a in ("2001:db8:5:6::1", "2001:db8:5:6:1::2")] == [404, 404]
        assert await guess("2001:db8:5:6:ffff::3") == 429  # the same /64
        assert await guess("2001:db8:5:7::1") == 404  # another /64
        assert [await guess(a) for a in ("192.0.2.9", "::ffff:192.0.2.9")] == [404, 404]
        assert await guess("192.0.2.9") == 429
        assert await guess("192.0.2.10") == 404


async def test_session_id_guessing_is_limited_per_client() -> None:
    async with (
        served(not_found_burst=5, not_found_per_s=0.5) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        mine = await call(client, "PUT", f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        session = mine.cookies[COOKIE]
        statuses: list[int] = []
        last: httpx.Response | None = None
        for i in range(12):
            last = await call(
                client,
                "PUT",
                f"/client?key={KEY}&tts=None",
                headers=TEXT,
                content="guess",
                session=f"guess-{i}",
            )
            statuses.append(last.status_code)
        assert statuses[:5] == [404] * 5
        # past the burst: 429 (a slow machine may have refilled one token meanwhile)
        assert statuses.count(404) <= 6
        assert statuses[-4:] == [429] * 4
        assert last is not None
        assert 1 <= int(last.headers["retry-after"]) <= 3
        assert last.text.startswith("! client: Too many requests for unknown sessions")
        json_guess = await call(
            client, "PUT", f"/client?key={KEY}", headers=JSON, content=input_event("x"), session="g"
        )
        assert json_guess.status_code == 429
        assert json.loads(json_guess.text)["type"] == "Error"
        get_guess = await call(client, "GET", f"/client?key={KEY}", session="g")
        assert get_guess.status_code == 429
        # a new session (no cookie) is not limited
        new = await call(client, "PUT", f"/client?key={KEY}&tts=None", headers=TEXT, content="new")
        assert new.status_code == 200
        # the allowance refills: after Retry-After the real session answers again
        await asyncio.sleep(int(last.headers["retry-after"]) + 0.2)
        back = await call(
            client,
            "PUT",
            f"/client?key={KEY}&tts=None",
            headers=TEXT,
            content="back",
            session=session,
        )
        assert back.status_code == 200
        assert back.text == "< You said: back\n"


async def test_memory_store_cap_drops_the_session_idle_longest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        served(memory_max_sessions=3) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):

        async def start(text: str) -> str:
            answer = await call(
                client, "PUT", f"/client?key={KEY}&tts=None", headers=TEXT, content=text
            )
            assert answer.status_code == 200
            return answer.cookies[COOKIE]

        async def say(session: str, text: str) -> httpx.Response:
            return await call(
                client,
                "PUT",
                f"/client?key={KEY}&tts=None",
                headers=TEXT,
                content=text,
                session=session,
            )

        oldest, middle, newest = [await start(f"s{i}") for i in range(3)]
        assert (await say(oldest, "touch")).status_code == 200  # now middle is idle longest
        with caplog.at_level("WARNING", logger="gateway.sessions"):
            fourth = await start("s3")
        assert (await say(middle, "gone?")).status_code == 404
        for session in (oldest, newest, fourth):
            answer = await say(session, "still here")
            assert answer.text == "< You said: still here\n"
    assert any("GATEWAY_MEMORY_MAX_SESSIONS" in r.getMessage() for r in caplog.records)


async def test_a_wrong_method_on_client_is_refused_in_v2_form_with_allow() -> None:
    """POST, HEAD, OPTIONS (and DELETE) on ``/client`` got the gateway's 405 problem body
    (``application/problem+json``), which a V2 client does not read: now 405 with ``Allow:
    GET, PUT`` and V2's own error form, an ErrorEvent line of source ``client`` (NDJSON),
    or a ``!`` line when ``Accept`` ranks ``text/plain`` first (as GET answers)."""
    async with served() as url, httpx.AsyncClient(base_url=url) as client:
        for method in ("OPTIONS", "POST", "DELETE", "HEAD"):
            answer = await client.request(method, "/client?key=k&deviceId=d")
            assert answer.status_code == 405, method
            assert answer.headers["content-type"].startswith("application/x-ndjson"), method
            assert answer.headers["allow"] == "GET, PUT"
            if method == "HEAD":
                assert answer.content == b""
                continue
            (line,) = answer.text.splitlines()
            error = json.loads(line)
            assert error["type"] == "Error", error
            assert error["source"] == "client", error
            assert f"{method} is not allowed on /client" in error["text"], error
            plain = await client.request(method, "/client", headers={"Accept": "text/plain"})
            assert plain.status_code == 405
            assert plain.headers["content-type"].startswith("text/plain")
            assert plain.headers["allow"] == "GET, PUT"
            assert plain.text.startswith("! client: "), plain.text
        health = await client.post("/healthz")  # other paths keep the problem body
        assert health.headers["content-type"] == "application/problem+json"
        assert health.headers["allow"] == "GET, HEAD"


async def test_pool_exhausted_mid_turn_ends_the_streaming_answer_with_the_error(
    redis_url: str, redis_prefix: str
) -> None:
    """The issue's pool-exhaustion case: the store's pool has no connection for the
    turn's save (here: its only connection is taken while the core streams), so the
    save fails after items went out; the answer still ends with V2's error line, and
    the session's lock frees itself within one lease."""
    async with held_core() as (core_url, release):
        settings = Settings(
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            redis_max_connections=1,
            pipeline=f"{core_url}/stream",
            turn_timeout_s=20,
        )
        app = create_app(settings)
        async with (
            served_app(app, settings) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            lines: list[str] = []
            seen = asyncio.Event()

            async def turn() -> tuple[int, str]:
                async with client.stream(
                    "PUT", "/client?key=k&tts=None", headers=TEXT, content="hello"
                ) as answer:
                    async for line in answer.aiter_lines():  # raises on a cut-off body
                        lines.append(line)
                        seen.set()
                    return answer.status_code, answer.cookies[COOKIE]

            running = asyncio.create_task(turn())
            async with asyncio.timeout(20):
                await seen.wait()  # the first item is out, the core holds the rest
            pool = app.state.gateway.store.redis.connection_pool
            taken = await pool.get_connection()  # the pool's only connection
            try:
                release.set()
                status, session = await running  # the save waits 5 s for a connection
            finally:
                await pool.release(taken)
            assert status == 200
            assert lines == [
                "< first",
                "< second",
                "! gateway: The session store is unavailable: this turn was not saved.",
            ]
            # the turn that would have created the session was not saved, and the failed
            # release left its lock to the lease: the session's next turn waits at most
            # that long, then finds no session (404), as the error line said
            started = time.monotonic()
            again = await call(
                client, "PUT", "/client?key=k&tts=None", session, headers=TEXT, content="more"
            )
            waited = time.monotonic() - started
            assert again.status_code == 404, again.text
            assert waited < settings.lock_lease_s + 2
            # other sessions are served as usual (the pool has its connection back)
            fresh = await call(client, "PUT", "/client?key=k&tts=None", headers=TEXT, content="hi")
            assert fresh.status_code == 200


async def test_get_client_of_a_session_being_made_is_a_404_not_a_500() -> None:
    """A GET whose cookie names a session the store does not have while a turn holds its
    lock (its first turn making it, e.g. a V1 client's proposed id, or a turn about to be
    refused): ``Conversation.find`` says ``creating``; the GET answered 500 (no refusal of
    that name) and logged an ERROR (``served_app`` fails the test on it). It is a 404 as
    for an unknown session: there is nothing to follow yet."""
    app = create_app(Settings())
    async with served_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        store = app.state.gateway.conversation.store
        async with store.open("flowstorm:being-made", lease_s=5, wait_s=1):
            made = await call(client, "GET", f"/client?key={KEY}", session="being-made")
        assert made.status_code == 404
        (error,) = [json.loads(line) for line in made.text.splitlines()]
        assert (error["type"], error["source"]) == ("Error", "session")


async def test_get_client_of_a_session_being_made_keeps_its_cookie() -> None:
    """A client holds the cookie of a session still being made when its first turn's
    answer streams (its headers, with the cookie, go out before the turn saves the
    session). A GET it sends meanwhile was answered 404 with the cookie cleared, as for a
    session that is gone: the client's cookie jar dropped the id, and its next PUT began
    a new conversation, losing the one being made. The 404 stays (nothing to follow yet);
    the cookie is kept. An unknown session's 404 still clears it."""
    app = create_app(Settings())
    async with served_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        store = app.state.gateway.conversation.store
        async with store.open("flowstorm:being-made", lease_s=5, wait_s=1):
            made = await call(client, "GET", f"/client?key={KEY}", session="being-made")
        assert made.status_code == 404
        assert "set-cookie" not in made.headers, made.headers["set-cookie"]
        gone = await call(client, "GET", f"/client?key={KEY}", session="being-made")
        assert gone.status_code == 404  # (its turn ended without saving it: it is unknown)
        assert 'flowstorm-session-id=""' in gone.headers["set-cookie"]


async def test_get_client_of_a_session_being_made_takes_nothing_of_the_guessing_allowance() -> None:
    """A GET whose cookie names a session its first turn is still making (the cookie came
    with the turn's streaming answer) is a 404 (nothing to follow yet), but the session
    exists: no guess. Each such 404 took a token of the client IP's allowance of "unknown
    session" answers, so a client polling GET while its first turn ran (a core taking
    seconds) used it up, and then every request of it with a cookie, its PUTs too, was
    answered 429. A real unknown session's 404 still takes one."""
    settings = Settings(not_found_burst=1, not_found_per_s=0.001)
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        intro = await call(client, "PUT", f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        assert intro.status_code == 200, intro.text
        session = intro.cookies["flowstorm-session-id"]
        store = app.state.gateway.conversation.store
        async with store.open("flowstorm:being-made", lease_s=5, wait_s=1):
            for _ in range(3):  # polling: the burst is 1
                made = await call(client, "GET", f"/client?key={KEY}", session="being-made")
                assert made.status_code == 404, made.text
        turn = await call(
            client, "PUT", f"/client?key={KEY}&tts=None", session, headers=TEXT, content="more"
        )
        assert turn.status_code == 200, turn.text  # the allowance is whole
        gone = await call(client, "GET", f"/client?key={KEY}", session="never-was")
        assert gone.status_code == 404  # a guess: the one token
        limited = await call(client, "GET", f"/client?key={KEY}", session="never-was-either")
        assert limited.status_code == 429
