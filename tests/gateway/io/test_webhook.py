"""The webhook driver (gateway/io/webhook.py) over real HTTP, on a small channel of its own.

``EchoWebhook`` is the least a webhook channel says: a JSON body ``{"session", "text",
"end"}`` (or ``{"ping": true}``, answered without a turn), an ``X-App`` header as the
verified application key (``X-App: bad`` is refused with 401), and a fallback table
of its own, unlike the voice one, so the tests see the table decide. It is mounted on
the real gateway app (create_app: real turn engine, memory store, HTTP pipeline to a
small core, the Alexa tests' ``make_core``) and served by uvicorn. The adapters' own tests
(tests/adapters/alexa, tests/adapters/google) cover the driver under their wire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HTTPResponse
from starlette.datastructures import Headers

from gateway.app import create_app
from gateway.events import ErrorEvent, Input, Response, ResponseItem
from gateway.io.webhook import END_WAIT_S, WebhookChannel, WebhookRefused, run_turn
from gateway.protocol import ProtocolError, load_json
from gateway.ratelimit import LOGGED_REFUSALS_BURST
from gateway.sessions import LATE_ANSWER_MAX_BYTES, RedisSessionStore, Session, stored_session
from gateway.settings import Settings
from gateway.turn import (
    STORE_LOCK_LOST_TEXT,
    STORE_UNSAVED_TEXT,
    VOICE_FALLBACKS,
    Fallback,
    Prompt,
    TurnContext,
    TurnEnd,
    TurnOutcome,
    TurnRejected,
)
from tests.adapters.alexa.test_routes import make_core
from tests.conftest import serve, served_app, settled, unless_hung
from tests.gateway.core_app import WebhookCore
from tests.gateway.redis_proxy import ReplyDropper
from tests.gateway.turns import ctx, engine

log = logging.getLogger("tests.echo")

WORKING = "Still on it."
SORRY = "Sorry, that failed."

TABLE = {
    TurnEnd.LATE: Fallback(Prompt.STILL_WORKING, end=False),
    TurnEnd.BUSY: Fallback(Prompt.STILL_WORKING, end=True),  # unlike VOICE_FALLBACKS
    TurnEnd.REFUSED: Fallback(Prompt.ERROR, end=True),
    TurnEnd.UNAVAILABLE: Fallback(Prompt.ERROR, end=False),
    TurnEnd.FAILED: Fallback(Prompt.ERROR, end=False),
}

Plan = dict[str, Any]
Answer = dict[str, Any]


class EchoWebhook(WebhookChannel[Plan, Answer]):
    """A minimal webhook channel (module doc)."""

    platform = "Echo"
    log = log
    fallbacks = TABLE

    async def authenticate(self, headers: Headers) -> str | None:
        app = headers.get("x-app", "echo")
        if app == "bad":
            raise WebhookRefused(401, "bad_app", "X-App: bad", headers={"WWW-Authenticate": "App"})
        return app

    async def plan(self, headers: Headers, body: bytes, principal: str | None) -> Plan:
        data = load_json(body)
        if not isinstance(data, dict):
            raise ProtocolError("The body must be a JSON object.")
        if data.get("ping") is True:
            return {"ping": True}
        if not isinstance(data.get("session"), str) or not isinstance(data.get("text"), str):
            raise ProtocolError("session and text must be strings.")
        return {**data, "app": principal}

    def turn(self, planned: Plan) -> tuple[TurnContext, Input] | None:
        if planned.get("ping"):
            return None
        ctx = TurnContext(channel="echo", session_id=planned["session"], app_key=planned["app"])
        return ctx, Input.of(planned["text"])

    async def other(self, planned: Plan) -> Answer:
        return {"pong": True}

    def answer(self, planned: Plan, response: Response) -> tuple[Answer, bool]:
        end = bool(planned.get("end")) or response.session_ended
        return {"say": " ".join(i.text or "" for i in response.items), "end": end}, end

    def fallback(
        self, planned: Plan, text: str, end: bool, said: Sequence[ResponseItem] = ()
    ) -> Answer:
        return {"say": " ".join([*(i.text or "" for i in said), text]), "end": end}

    async def end(self, ctx: TurnContext, wait_s: float | None = None) -> None:
        """The driver's end of the session, logged (INFO) with how long it may wait."""
        wait = END_WAIT_S if wait_s is None else min(wait_s, END_WAIT_S)
        self.log.info("ending %s waits at most %.3f s", ctx.session_id, wait)
        await super().end(ctx, wait_s)

    def encode(self, answer: Answer) -> HTTPResponse:
        return JSONResponse(answer)


def echo_app(settings: Settings, refusal: str | None = None) -> FastAPI:
    """The gateway app with ``POST /echo`` driven by an EchoWebhook."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = app.state.gateway
        app.state.echo = EchoWebhook(gw, gw.settings.alexa_deadline_s, refusal)
        yield

    router = APIRouter(lifespan=lifespan)

    @router.post("/echo")
    async def post_echo(request: Request) -> HTTPResponse:
        channel: EchoWebhook = request.app.state.echo
        return await channel.handle(request)

    app = create_app(settings)
    app.include_router(router)
    return app


@asynccontextmanager
async def echo(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """A client of /echo on a served gateway whose pipeline is ``make_core(1.5)``; the
    gateway's app is ``core.state.gateway`` (for :func:`~tests.conftest.settled`)."""
    core = make_core(1.5)
    refusal = overrides.pop("refusal", None)
    async with serve(core) as core_url:
        settings = Settings(
            pipeline=f"{core_url}/turn",
            alexa_deadline_s=0.5,
            voice_still_working_text=WORKING,
            voice_error_text=SORRY,
        ).model_copy(update=overrides)
        app = echo_app(settings, refusal)
        core.state.gateway = app
        async with (
            served_app(app, settings) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            yield client, core


async def say(client: httpx.AsyncClient, session: str, text: str, **extra: Any) -> Answer:
    headers = {"X-App": extra.pop("app")} if "app" in extra else {}
    answer = await client.post(
        "/echo", json={"session": session, "text": text, **extra}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    data: Answer = answer.json()
    return data


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="tests.echo"):
        yield caplog


# ---------------------------------------------------------------------- answered


async def test_a_turn_is_answered_and_its_session_goes_on() -> None:
    async with echo() as (client, _):
        assert await say(client, "S-1", "hello") == {"say": "turn 1 slowDone None", "end": False}
        assert await say(client, "S-1", "again") == {"say": "turn 2 slowDone None", "end": False}


async def test_an_answer_that_closes_the_conversation_ends_the_gateway_session() -> None:
    async with echo() as (client, _):
        await say(client, "S-end", "hello")
        assert await say(client, "S-end", "bye", end=True) == {
            "say": "turn 2 slowDone None",
            "end": True,
        }
        fresh = await say(client, "S-end", "hello")
        assert fresh["say"] == "turn 1 slowDone None"  # ended, so a new session


async def test_ending_the_session_after_a_closing_answer_stays_within_the_deadline(
    warnings: pytest.LogCaptureFixture,
) -> None:
    """A closing answer ends the gateway's session in what is left of the deadline, not in
    the whole deadline again. Here the end waits for the session's lock, held by the next
    request's turn: before, the answer to a 1.5 s turn came after ~3 s (the 2 s deadline
    less the margin spent again on the end), past the platform's deadline.

    The end is given what is left of the 2 s deadline after the 1.5 s turn less
    END_MARGIN_S (0.5 s): nothing, it goes on in the background (before: the whole 2 s,
    waiting for the next turn's lock). That is checked, not the clock: the answer comes at
    ~1.5 s on a quiet machine, 0.5 s from the deadline, and later on a loaded one (the
    core's 1.5 s turn itself runs late); the clock only guards against a hang (was also:
    < 3.5 s of wall clock)."""
    async with echo(alexa_deadline_s=2.0) as (client, core):
        await say(client, "S-close", "hello")
        closing = asyncio.create_task(say(client, "S-close", "slow", end=True))
        # the closing turn holds the lock; the next one queues
        await unless_hung(core.state.arrived.wait(), "the closing turn")
        queued = asyncio.create_task(say(client, "S-close", "slow"))
        assert await unless_hung(closing, "the closing answer") == {"say": "finally", "end": True}
        ends = [r.getMessage() for r in warnings.records if r.getMessage().startswith("ending")]
        assert ends == ["ending S-close waits at most 0.000 s"]  # not the whole 2 s again
        await queued
        await settled(core.state.gateway)  # the end went on in the background, after it
        fresh = await say(client, "S-close", "hello")
        assert fresh["say"] == "turn 1 slowDone None"  # the session did end


async def test_a_request_that_is_no_turn_is_answered_by_the_channel() -> None:
    async with echo() as (client, _):
        answer = await client.post("/echo", json={"ping": True})
        assert answer.status_code == 200
        assert answer.json() == {"pong": True}


# ---------------------------------------------------------------- the fallback table


def test_an_outcome_names_its_row_and_every_row_but_answered_is_in_the_voice_table() -> None:
    busy = TurnRejected("session-busy", "busy")
    foreign = TurnRejected("session-foreign", "not yours")
    assert TurnOutcome(response=Response(items=[])).end is TurnEnd.ANSWERED
    assert TurnOutcome(late=True).end is TurnEnd.LATE
    assert TurnOutcome(rejected=busy).end is TurnEnd.BUSY
    assert TurnOutcome(rejected=foreign).end is TurnEnd.REFUSED
    store_down = TurnRejected("store-unavailable", "The session store is unavailable.")
    assert TurnOutcome(rejected=store_down).end is TurnEnd.UNAVAILABLE
    assert TurnOutcome().end is TurnEnd.FAILED
    # the gateway's own store failing is no reason to end the user's conversation
    assert VOICE_FALLBACKS[TurnEnd.UNAVAILABLE] == Fallback(Prompt.ERROR, end=False)
    assert VOICE_FALLBACKS[TurnEnd.REFUSED] == Fallback(Prompt.ERROR, end=True)
    assert set(VOICE_FALLBACKS) == set(TurnEnd) - {TurnEnd.ANSWERED} == set(TABLE)


@pytest.mark.parametrize(
    ("text", "source", "end"),
    [
        (STORE_UNSAVED_TEXT, "gateway", TurnEnd.UNAVAILABLE),
        (STORE_LOCK_LOST_TEXT, "gateway", TurnEnd.UNAVAILABLE),
        (STORE_UNSAVED_TEXT, "pipeline", TurnEnd.FAILED),  # the source decides: the core's
        ("Internal gateway error.", "gateway", TurnEnd.FAILED),
        ("The session store", "gateway", TurnEnd.FAILED),  # only resembles the store's
    ],
)
def test_an_error_of_the_store_at_the_save_is_unavailable_not_failed(
    text: str, source: str, end: TurnEnd
) -> None:
    """The engine's Error for the session store failing as the turn was saved (or losing
    its lock) is the UNAVAILABLE row, as the store failing before the turn is (it was
    FAILED, the row of a turn the core or the gateway failed); every other Error FAILED."""
    assert TurnOutcome(error=ErrorEvent(text=text, source=source)).end is end


class _HeldCore(WebhookCore):
    """A core whose answer (``held``) waits for :attr:`release`."""

    async def answer(self, body: dict[str, Any]) -> Any:
        await self.release.wait()
        return {"items": [{"text": "held"}]}


async def test_run_turn_reports_a_store_that_failed_saving_the_answer_as_unavailable(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """Redis (behind the proxy) cut off while the core answers a webhook turn: the save
    fails, and the outcome is UNAVAILABLE with the store's Error (it was FAILED, as if the
    core or a bug of the gateway's had failed), the core's answer left unsaid."""
    proxy, url = reply_dropper
    core = _HeldCore()
    store = RedisSessionStore(url, prefix=redis_prefix)
    async with core.running() as core_url:
        conv = engine(store, pipeline=core_url)
        try:
            turn = asyncio.create_task(run_turn(conv, ctx("RT-store"), Input.of("hello"), 10))
            await core.next_request()
            proxy.cut()
            core.release.set()
            outcome = await turn
        finally:
            await conv.pipeline.aclose()
            await store.aclose()
    assert outcome.end is TurnEnd.UNAVAILABLE
    assert outcome.error == ErrorEvent(text=STORE_UNSAVED_TEXT, source="gateway")
    assert (outcome.response, outcome.said) == (None, ())


class _HoldingCore(WebhookCore):
    """A core: ``hold`` answers ``held`` once :attr:`release` is set, anything else at once."""

    async def answer(self, body: dict[str, Any]) -> Any:
        if body["input"]["transcript"]["text"] == "hold":
            await self.release.wait()
            return {"items": [{"text": "held"}]}
        return {"items": [{"text": f"turn {body['turn']}"}]}


async def test_run_turn_reports_a_lock_the_store_lost_before_the_save_as_unavailable(
    redis_url: str, redis_prefix: str
) -> None:
    """The session's lock taken by another while the core answers (its token replaced in
    Redis): the save finds it lost, and the outcome is UNAVAILABLE with the store's Error
    naming the session store (it was FAILED, with "The session's lock was lost ...")."""
    core = _HoldingCore()
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    context = ctx("RT-lock")
    lock = f"{redis_prefix}:{{{context.key}}}:lock"
    async with core.running() as core_url:
        conv = engine(store, pipeline=core_url)
        try:
            assert (await run_turn(conv, context, Input.of("one"), 10)).end is TurnEnd.ANSWERED
            turn = asyncio.create_task(run_turn(conv, context, Input.of("hold"), 10))
            await core.next_request()
            await core.next_request()  # the held one
            async with aioredis.from_url(redis_url) as admin:
                assert await admin.exists(lock)
                await admin.set(lock, "another", px=30_000)
            core.release.set()
            outcome = await turn
        finally:
            await conv.pipeline.aclose()
            await store.aclose()
    assert outcome.end is TurnEnd.UNAVAILABLE
    assert outcome.error == ErrorEvent(text=STORE_LOCK_LOST_TEXT, source="gateway")
    assert (outcome.response, outcome.said) == (None, ())


async def test_a_late_turn_is_still_working_within_the_deadline_and_saves_its_session(
    warnings: pytest.LogCaptureFixture,
) -> None:
    async with echo() as (client, core):
        late = await say(client, "S-late", "slow")
        # the 0.5 s deadline, not the core's 1.5 s: answered while the core still worked
        # (not a 1.45 s bound of the clock, which a loaded machine's stall breaks)
        assert not core.state.finished.is_set()
        assert late == {"say": WORKING, "end": False}
        assert any("outlived the Echo deadline" in r.getMessage() for r in warnings.records)
        await settled(core.state.gateway)  # the late turn saved
        after = await say(client, "S-late", "what?")
        assert after == {"say": "finally", "end": False}  # its kept answer, no turn run
        again = await say(client, "S-late", "next")
        assert again["say"] == "turn 2 slowDone True"  # the late turn was saved


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_late_answer_is_kept_in_the_store_and_dropped_once_older_than_the_timeout(
    kind: str, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The late turn's answer is kept in the session store (memory, Redis), without the
    attributes it set (the session has them); one kept longer than the session's timeout
    (a session touched meanwhile, as a client's log does) is dropped unsaid, and the
    request runs its turn."""
    store: dict[str, Any] = (
        {"redis_url": redis_url, "redis_prefix": redis_prefix} if kind == "redis" else {}
    )
    async with echo(**store) as (client, core):
        assert (await say(client, "S-stale", "slow"))["say"] == WORKING
        await settled(core.state.gateway)
        sessions = core.state.gateway.state.gateway.conversation.store
        async with sessions.open("echo:S-stale", lease_s=5.0, wait_s=5.0) as txn:
            session: Session | None = txn.session
            assert session is not None
            assert session.late_answer is not None
            kept = session.late_answer
            assert [i.text for i in kept.response.items] == ["finally"]
            assert not kept.response.attributes  # applied by the late turn already
            assert session.attributes["slowDone"] is True
            old = kept.model_copy(update={"at": kept.at - session.timeout_s - 1})
            session.late_answer = old
            txn.save(session, session.timeout_s)
        with caplog.at_level(logging.INFO, logger="gateway.conversation"):
            after = await say(client, "S-stale", "what?")
        assert after["say"] == "turn 2 slowDone True"  # not the stale "finally"
        assert any("dropped unsaid" in r.getMessage() for r in caplog.records)
        assert (await say(client, "S-stale", "next"))["say"] == "turn 3 slowDone True"


async def test_a_late_answer_larger_than_the_bound_is_not_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A late answer of more than LATE_ANSWER_MAX_BYTES of JSON is not kept (a WARNING
    says so); one within it is."""
    conv = engine()
    session = Session(id="s", key="test:s", channel="test", app_key="app")
    big = Response(items=(ResponseItem(text="x" * LATE_ANSWER_MAX_BYTES),))
    with caplog.at_level(logging.WARNING, logger="gateway.conversation"):
        assert conv._keep_late(session, big) is False
    assert session.late_answer is None
    assert any("not kept" in r.getMessage() for r in caplog.records)
    assert conv._keep_late(session, Response(items=(ResponseItem(text="x"),))) is True
    assert session.late_answer is not None


async def test_the_late_answer_bound_is_in_bytes_of_the_stored_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 64 KB bound counts the bytes stored (UTF-8), not characters: an answer of
    fewer characters than the bound but more bytes (two bytes each) is not kept. Before,
    len() of the JSON string was compared, and it was kept at twice the bound."""
    conv = engine()
    session = Session(id="s", key="test:s", channel="test", app_key="app")
    text = "\u00e9" * (LATE_ANSWER_MAX_BYTES // 2 + 64)  # < the bound in characters
    wide = Response(items=(ResponseItem(text=text),))
    assert len(text) < LATE_ANSWER_MAX_BYTES < len(text.encode())
    with caplog.at_level(logging.WARNING, logger="gateway.conversation"):
        assert conv._keep_late(session, wide) is False
    assert session.late_answer is None
    assert any("not kept" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "late",
    [{"response": 5, "at": 1.0}, {"response": {}, "at": "soon"}, {"at": 1.0}, [], "finally"],
)
def test_a_stored_late_answer_of_another_shape_is_an_unreadable_session(
    late: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A session in the store whose late answer is of another shape (edited by hand,
    another version) is unreadable as any such session is: taken as absent, an ERROR
    naming the field, never raised; a well-formed one reads back."""
    fields = {"id": "s", "key": "test:s", "channel": "test", "app_key": "app"}
    with caplog.at_level(logging.ERROR, logger="gateway.sessions"):
        assert stored_session(json.dumps({**fields, "late_answer": late}), "test:s") is None
    assert any("late_answer" in r.getMessage() for r in caplog.records)
    good = {"response": {"items": [{"text": "hi"}]}, "at": 1.0}
    session = stored_session(json.dumps({**fields, "late_answer": good}), "test:s")
    assert session is not None
    assert session.late_answer is not None
    assert [i.text for i in session.late_answer.response.items] == ["hi"]


async def test_a_busy_session_is_answered_by_its_row_without_waiting_for_the_deadline() -> None:
    async with echo(lock_wait_s=0.2, alexa_deadline_s=1.0) as (client, core):
        slow = asyncio.create_task(say(client, "S-busy", "slow"))
        await unless_hung(core.state.arrived.wait(), "the slow turn")  # it holds the lock
        busy = await say(client, "S-busy", "hello")
        # answered by the lock wait (0.2 s), not the 1 s deadline: TABLE's BUSY row, not
        # the LATE one the deadline gives (the row says which; a 0.9 s bound of the clock
        # failed on a loaded machine)
        assert busy == {"say": WORKING, "end": True}
        assert await slow == {"say": WORKING, "end": False}  # late: 1 s < the core's 1.5 s
        await settled(core.state.gateway)  # the late turn saved
        assert (await say(client, "S-busy", "what?"))["say"] == "finally"  # the late answer
        after = await say(client, "S-busy", "next")
        assert after["say"] == "turn 2 slowDone True"  # the busy turn changed nothing


async def test_a_turn_still_waiting_for_its_session_at_the_deadline_is_not_run(
    redis_url: str, redis_prefix: str
) -> None:
    """A turn that cannot take its session's lock before the platform's deadline is
    answered at the deadline and never runs: its user was told "still working, ask me
    again", so running it later would give the core a turn nobody hears, and the repeated
    question a second one. Before, it waited the whole GATEWAY_LOCK_WAIT_S (15 s) in the
    background and ran as soon as the late turn let the session go (the session then
    counted one turn more). Real Redis store."""
    store: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with echo(alexa_deadline_s=0.5, **store) as (client, core):
        await say(client, "S-queued", "hello")  # turn 1
        slow = asyncio.create_task(say(client, "S-queued", "slow"))  # turn 2: the core 1.5 s
        await unless_hung(core.state.arrived.wait(), "the slow turn")  # it holds the lock
        queued = await say(client, "S-queued", "hello")  # waits for the lock past 0.5 s
        assert queued["say"] == WORKING
        assert not core.state.finished.is_set()  # answered while the slow turn held on
        assert await slow == {"say": WORKING, "end": False}
        # the slow turn saved, and a queued turn still waiting for the lock has run too
        await settled(core.state.gateway)
        assert (await say(client, "S-queued", "what?"))["say"] == "finally"  # the late answer
        after = await say(client, "S-queued", "next")
        # turn 3: the queued turn never ran (before: "turn 4", it had run unheard)
        assert after["say"] == "turn 3 slowDone True"


async def test_a_failing_pipeline_is_apologised_for_and_the_session_kept() -> None:
    async with echo() as (client, _):
        await say(client, "S-fail", "hello")
        assert await say(client, "S-fail", "fail") == {"say": SORRY, "end": False}
        after = await say(client, "S-fail", "next")
        assert after["say"] == "turn 2 slowDone None"  # the failed turn did not advance it


async def test_a_turn_that_cannot_start_is_refused_by_its_row() -> None:
    async with echo() as (client, _):
        await say(client, "S-foreign", "hello", app="one")
        assert await say(client, "S-foreign", "hello", app="two") == {"say": SORRY, "end": True}
        mine = await say(client, "S-foreign", "again", app="one")
        assert mine["say"] == "turn 2 slowDone None"  # the owner's session is untouched


# --------------------------------------------------------------------------- bad input


def problem(answer: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    assert body["reason"] == reason
    assert body["detail"]
    return body


async def test_an_oversized_body_is_refused_whether_declared_or_streamed(
    warnings: pytest.LogCaptureFixture,
) -> None:
    big = json.dumps({"session": "S-big", "text": "x" * 5000}).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit cuts the stream
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    async with echo(max_body_bytes=4000) as (client, _):
        problem(await client.post("/echo", content=big), 413, "body_too_large")
        problem(await client.post("/echo", content=chunks()), 413, "body_too_large")
        assert [r.levelno for r in warnings.records if "body_too_large" in r.getMessage()] == [
            logging.WARNING,
            logging.WARNING,
        ]
        assert (await say(client, "S-big", "small"))["say"] == "turn 1 slowDone None"


async def test_malformed_requests_are_400_and_refusals_keep_their_status_and_headers(
    warnings: pytest.LogCaptureFixture,
) -> None:
    warnings.set_level(logging.DEBUG, logger="tests.echo")
    async with echo() as (client, _):
        for body in (b"", b"{not json", b"[1]", b"\xff", b'{"session": 1, "text": "x"}'):
            problem(await client.post("/echo", content=body), 400, "malformed_request")
        refused = await client.post(
            "/echo", json={"session": "S", "text": "x"}, headers={"X-App": "bad"}
        )
        assert problem(refused, 401, "bad_app")["title"] == "Unauthorized"
        assert refused.headers["www-authenticate"] == "App"
        # each logged: the first LOGGED_REFUSALS_BURST at WARNING, the others at DEBUG (the
        # channel's RefusalLog: a flood of bad requests does not flood the log)
        refusals = [r.levelno for r in warnings.records if "Echo request refused" in r.getMessage()]
        assert refusals == [logging.WARNING] * LOGGED_REFUSALS_BURST + [logging.DEBUG]


async def test_a_channel_not_configured_refuses_every_request_with_503() -> None:
    async with echo(refusal="Set GATEWAY_ECHO.") as (client, _):
        answer = await client.post("/echo", json={"session": "S", "text": "x"})
        assert problem(answer, 503, "not_configured")["detail"] == "Set GATEWAY_ECHO."


# ----------------------------------------------------------------- run_turn itself


async def test_run_turn_reports_a_started_answered_and_ended_session(
    core: tuple[str, FastAPI],
) -> None:
    url, _ = core
    conv = engine(pipeline=f"{url}/json")
    first = await run_turn(conv, ctx("RT-1"), Input.of("hello"), 5)
    assert first.end is TurnEnd.ANSWERED
    assert first.response is not None
    assert first.response.items[0].text == "core heard hello"
    assert (first.session_started, first.session_ended) == (True, False)
    second = await run_turn(conv, ctx("RT-1"), Input.of("bye"), 5)  # the core ends it
    assert second.end is TurnEnd.ANSWERED
    assert (second.session_started, second.session_ended) == (False, True)
    assert await conv.store.get(ctx("RT-1").key) is None
    await conv.pipeline.aclose()


async def in_the_core(app: FastAPI) -> None:
    """Wait (hang guard) until the core (tests/gateway/core_app.py) has a request: the
    turn that sent it holds its session's lock."""
    await unless_hung(app.state.arrived.wait(), "no request reached the core")


async def test_run_turn_is_late_at_its_deadline_and_the_turn_goes_on(
    core: tuple[str, FastAPI],
) -> None:
    url, _ = core
    conv = engine(pipeline=f"{url}/slow?s=0.6")
    started = time.monotonic()
    late = await run_turn(conv, ctx("RT-late"), Input.of("hello"), 0.2)
    waited = time.monotonic() - started
    assert late.end is TurnEnd.LATE
    assert late.response is None
    assert late.session_started  # it holds its lock and made the session
    assert waited >= 0.19  # not before its deadline; LATE: before the core's 0.6 s
    assert conv.turns_in_flight == 1
    await conv.drain(5)  # the late turn finishes on its own and saves
    session = await conv.store.get(ctx("RT-late").key)
    assert session is not None
    assert session.turn_count == 1
    await conv.pipeline.aclose()


async def test_run_turn_reports_a_busy_session_and_a_failed_core(
    core: tuple[str, FastAPI],
) -> None:
    url, app = core
    conv = engine(pipeline=f"{url}/hold-on?text=one", lock_wait_s=0.05)
    holder = asyncio.create_task(run_turn(conv, ctx("RT-busy"), Input.of("one"), 5))
    await in_the_core(app)  # the first turn holds the lock (until released)
    busy = await run_turn(conv, ctx("RT-busy"), Input.of("two"), 5)
    app.state.release.set()
    assert busy.end is TurnEnd.BUSY
    assert busy.rejected is not None
    assert (await holder).end is TurnEnd.ANSWERED
    await conv.pipeline.aclose()
    failing = engine(pipeline=f"{url}/no-such-route")
    failed = await run_turn(failing, ctx("RT-fail"), Input.of("hello"), 5)
    assert failed.end is TurnEnd.FAILED
    assert failed.error is not None
    assert failed.error.source == "pipeline"
    await failing.pipeline.aclose()


async def test_run_turn_with_its_deadline_passed_starts_no_turn(
    core: tuple[str, FastAPI],
) -> None:
    """A deadline already passed when the turn would start (``deadline_s`` <= 0: reading
    the request took the platform's whole time) is LATE at once: no turn is started, the
    free session's lock is not tried, the core gets nothing. Before, the turn was started
    and took the free lock at its one try: it ran for nobody and saved the session."""
    url, app = core
    conv = engine(pipeline=f"{url}/json")
    for deadline_s in (0.0, -0.4):
        late = await run_turn(conv, ctx("RT-passed"), Input.of("unheard"), deadline_s)
        assert late.end is TurnEnd.LATE
        assert not late.session_started
    assert conv.turns_in_flight == 0
    await conv.drain(5)  # (a turn started before would have run by now)
    assert app.state.requests == []
    assert await conv.store.get(ctx("RT-passed").key) is None
    await conv.pipeline.aclose()


async def test_run_turn_still_waiting_for_the_lock_at_its_deadline_is_busy_and_never_runs(
    core: tuple[str, FastAPI],
) -> None:
    """A turn waiting for its session's lock when the deadline ends the waiting (the lock
    wait bounded by the same deadline, not GATEWAY_LOCK_WAIT_S's 15 s) is BUSY and never
    runs: the user heard "still working". The lock wait and run_turn's wait end together;
    whichever ends first, the outcome is BUSY (TurnStream.abandon when run_turn's does;
    here the lock wait's mostly does, so this also passed before; the HTTP tests of the
    channels, tests/adapters/google, see the other order, LATE before)."""
    url, app = core
    conv = engine(pipeline=f"{url}/hold-on?text=one")
    holder = asyncio.create_task(run_turn(conv, ctx("RT-held"), Input.of("one"), 5))
    await in_the_core(app)  # the first turn holds the lock, held in the core
    busy = await run_turn(conv, ctx("RT-held"), Input.of("two"), 0.2)
    app.state.release.set()  # the lock frees now: the busy turn must not run then
    assert busy.end is TurnEnd.BUSY
    assert busy.rejected is not None
    assert busy.rejected.reason == "session-busy"
    assert (await holder).end is TurnEnd.ANSWERED
    await conv.drain(5)
    assert [r["input"]["transcript"]["text"] for r in app.state.requests] == ["one"]
    session = await conv.store.get(ctx("RT-held").key)
    assert session is not None
    assert session.turn_count == 1
    await conv.pipeline.aclose()


async def test_a_turn_stream_waits_without_taking_its_events(core: tuple[str, FastAPI]) -> None:
    url, _ = core
    conv = engine(pipeline=f"{url}/slow?s=0.3")
    stream = conv.turn(ctx("RT-wait"), Input.of("hello"))
    assert await stream.wait(0.05) is False  # still in the core
    assert stream.rest_if_done() is None
    assert await stream.wait(5) is True
    assert await stream.wait(0) is True  # done: no wait at all
    events = stream.rest_if_done()
    assert events is not None
    assert [type(e).__name__ for e in events] == [
        "SessionStartedEvent",
        "ResponseItemEvent",
        "ResponseEvent",
    ]
    await conv.pipeline.aclose()


async def test_run_turn_reports_what_a_failed_turn_said_before_it_failed(
    core: tuple[str, FastAPI],
) -> None:
    """A core whose stream gave an item and then ended without its Response: the turn
    FAILED, ``said`` holds the item (what a streaming channel got); the session is saved
    as for any failure (Failed, not advanced). An answered turn's ``said`` is empty: its
    Response has the items."""
    url, _ = core
    conv = engine(pipeline=f"{url}/stream-no-response")
    failed = await run_turn(conv, ctx("RT-said"), Input.of("hello"), 5)
    assert failed.end is TurnEnd.FAILED
    assert failed.error is not None
    assert [item.text for item in failed.said] == ["only"]
    session = await conv.store.get(ctx("RT-said").key)
    assert session is not None
    assert (session.client_state, session.turn_count) == ("Failed", 0)
    await conv.pipeline.aclose()
    answering = engine(pipeline=f"{url}/json")
    answered = await run_turn(answering, ctx("RT-said"), Input.of("hello"), 5)
    assert answered.end is TurnEnd.ANSWERED
    assert answered.said == ()
    await answering.pipeline.aclose()


async def test_an_answer_whose_save_outlives_the_deadline_is_said_at_the_next_request(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """The core answers in time, but the session's save (Redis's reply) comes only after
    the platform's deadline: the user heard "still working", and the answer, which the
    engine did not keep (its consumer had not given up yet when it saved), is kept once
    the turn ends (if no turn of the session ran meanwhile) and said at the next request.
    Before, it was never said."""
    proxy, url = reply_dropper
    async with echo(redis_url=url, redis_prefix=redis_prefix) as (client, core):
        proxy.hold_replies_to = b'"turn_count":1'  # the first turn's save: its reply waits
        asked = await unless_hung(say(client, "S-race", "hello"), "the answer")
        assert asked == {"say": WORKING, "end": False}  # the deadline passed first
        assert proxy.replies_held == 1  # as the save's reply waited
        proxy.release_replies()
        await settled(core.state.gateway)
        assert (await say(client, "S-race", "what?"))["say"] == "turn 1 slowDone None"
        assert (await say(client, "S-race", "next"))["say"] == "turn 2 slowDone None"


async def test_drain_waits_for_a_keep_started_by_a_turn_it_waited_for(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """Shutdown's drain waits for the keep (Conversation.keep_when_done) a late turn
    starts as it ends: that task exists only once the turn is over, after drain took its
    set of tasks. Before, drain returned with the keep still running (the store then
    closed under it: the answer lost)."""
    proxy, url = reply_dropper
    async with echo(redis_url=url, redis_prefix=redis_prefix) as (client, core):
        conversation = core.state.gateway.state.gateway.conversation
        proxy.hold_replies_to = b'"turn_count":1'
        asked = await unless_hung(say(client, "S-drain", "hello"), "the answer")
        assert asked == {"say": WORKING, "end": False}
        assert conversation.turns_in_flight == 1  # the turn waits for its save's reply
        draining = asyncio.create_task(conversation.drain(3600.0))
        proxy.release_replies()
        assert await unless_hung(draining, "the drain") == 0
        assert not conversation._ends  # the keep is over, not left running
        assert (await say(client, "S-drain", "what?"))["say"] == "turn 1 slowDone None"


async def test_a_launch_drops_a_kept_late_answer_and_runs_its_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A launch (``#intro``: Alexa's LaunchRequest, Google's MAIN and WELCOME) in a session
    that keeps a late answer begins a new conversation: it runs its turn and the old
    answer is dropped unsaid. Before, the launch was answered with the old answer (a
    Dialogflow session id reused for the user's next conversation heard it)."""
    async with echo() as (client, core):
        assert (await say(client, "S-relaunch", "slow")) == {"say": WORKING, "end": False}
        await settled(core.state.gateway)  # the late turn saved, its answer kept
        with caplog.at_level(logging.INFO, logger="gateway.conversation"):
            launched = await say(client, "S-relaunch", "#intro")
        assert launched["say"] != "finally"
        assert launched["say"].startswith("turn 2 ")  # the launch ran its turn
        assert any("dropped unsaid" in r.getMessage() for r in caplog.records)
        assert (await say(client, "S-relaunch", "what?"))["say"].startswith("turn 3 ")


async def test_a_keep_after_the_turn_is_not_made_in_a_new_session_of_the_same_key(
    core: tuple[str, FastAPI],
) -> None:
    """keep_when_done's write checks the session is the one the turn saved: a session
    ended and made anew under the same key (its turn count 1 again) before the keep
    got the lock is another conversation, which must not hear the old answer. Before,
    only the turn count was compared, and the old answer was kept in the new session."""
    url, _ = core
    conv = engine(pipeline=f"{url}/json")
    old = ctx("RT-anew")._replace(late_answers=True)
    stream = conv.turn(old, Input.of("hello"))
    assert await unless_hung(stream.wait(5), "the first turn")
    assert stream.saved_unkept  # as if its webhook gave up just after the engine's check
    assert await conv.end(old)  # the platform ended it; the user comes back at once
    again = await run_turn(conv, old, Input.of("again"), 5)
    assert again.session_started
    conv.keep_when_done(old, stream)  # the keep gets the lock only now
    await asyncio.sleep(0)  # its done callback starts the keep
    assert await conv.drain(5) == 0
    session = await conv.store.get(old.key)
    assert session is not None
    assert session.turn_count == 1
    assert session.late_answer is None  # the new conversation keeps no old answer
    await conv.pipeline.aclose()


async def test_a_kept_answer_whose_save_outlives_the_deadline_is_kept_again(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """The request that says a kept late answer is late itself (its save's reply comes
    past the deadline): its user heard "still working", so the answer is kept again
    (keep_when_done) and said at the next request. Before, it was lost: taken out of the
    session and said to nobody, and the next request ran a turn."""
    proxy, url = reply_dropper
    async with echo(redis_url=url, redis_prefix=redis_prefix) as (client, core):
        assert (await say(client, "S-relost", "slow")) == {"say": WORKING, "end": False}
        await settled(core.state.gateway)  # the late turn saved, "finally" kept
        proxy.hold_replies_to = b'"late_answer":null'  # the save that says it: held
        asked = await unless_hung(say(client, "S-relost", "what?"), "the answer")
        assert asked == {"say": WORKING, "end": False}
        assert proxy.replies_held == 1
        proxy.release_replies()
        await settled(core.state.gateway)
        assert (await say(client, "S-relost", "again"))["say"] == "finally"
        assert (await say(client, "S-relost", "next"))["say"] == "turn 2 slowDone True"
