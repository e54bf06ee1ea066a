"""A core that refuses a request unprocessed (HTTP 429, or 503 with ``Retry-After``) gets
it once more after the delay it asked for, when that fits in the turn's time
(gateway/pipeline/cores.py, ``send_retried``): every core against its real (fake) server
on a free port, a :class:`Refusing` app in front of it answering the refusals first.
Before, every such answer failed the turn at once (``<core> answered HTTP 429``)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.conversation import Conversation
from gateway.events import ErrorEvent, Input, ResponseEvent
from gateway.metrics import REGISTRY
from gateway.pipeline.base import ANSWER_DEADLINE
from gateway.pipeline.cores import MAX_RETRY_WAIT_S, RetryPolicy, retry_after_s
from gateway.pipeline.openai import OpenAIPipeline
from gateway.sessions import MemorySessionStore
from gateway.settings import Settings
from tests.conftest import serve
from tests.gateway.core_app import make_core
from tests.gateway.pipeline.cx_server import AGENT, make_cx_server
from tests.gateway.pipeline.fake_botpress import WEBHOOK_ID, make_botpress
from tests.gateway.pipeline.fake_rasa import make_rasa
from tests.gateway.pipeline.fake_voiceflow import API_KEY, make_voiceflow
from tests.gateway.pipeline.openai_server import KEY, make_openai_server
from tests.gateway.pipeline.test_dialogflow_cx import _key, key_file
from tests.gateway.pipeline.test_dialogflow_cx import engine as cx_engine
from tests.gateway.turns import ctx, engine, pipeline_error, texts

ROOT = Path(__file__).resolve().parents[3]
"""The repository (README.md, openapi/openapi.json)."""

RetryAfter = str | Callable[[], str] | None
"""A refusal's ``Retry-After``: a value, one made when the refusal is answered (an
HTTP-date from the clock then), or none."""


class Refusing:
    """An ASGI app in front of ``app``: the requests whose path ends with ``path`` are
    counted (``seen``) and answered the next of ``refusals`` (status, Retry-After), a
    JSON error body, while there are some; every other request, and those after, go to
    ``app`` (the core's fake, which answers them as ever)."""

    def __init__(self, app: FastAPI, path: str) -> None:
        self.app = app
        self.path = path
        self.refusals: list[tuple[int, RetryAfter]] = []
        self.broken = False
        """The refusals' bodies break off (the connection dropped after their start)."""
        self.seen = 0
        self.request_ids: list[str] = []  # the X-Request-Id of each request seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith(self.path):
            self.seen += 1
            self.request_ids.append(dict(scope["headers"]).get(b"x-request-id", b"").decode())
            if self.refusals:
                status, retry_after = self.refusals.pop(0)
                if callable(retry_after):
                    retry_after = retry_after()
                headers = [(b"content-type", b"application/json")]
                if retry_after is not None:
                    headers.append((b"retry-after", retry_after.encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                body = b'{"error": {"message": "slow down, please"}}'
                if self.broken:  # its start, then the connection drops (uvicorn aborts it)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    raise RuntimeError("the proxy in front of the core crashed")
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Core:
    """One core under test: its fake, the path of its turn's request, how errors name it
    (``shown``), its pipeline name (``label``), a text and the texts it is answered."""

    make: Callable[[], FastAPI]
    path: str
    shown: str
    label: str
    said: str
    answer: list[str]
    conversation: Callable[[str, dict[str, Any]], Conversation]
    call: str = ""
    """How its errors name the refused call, before the status (``POST /messages with ``)."""


def _openai(url: str, overrides: dict[str, Any]) -> Conversation:
    settings = Settings().model_copy(update=overrides)
    pipe = OpenAIPipeline(
        f"{url}/chat/v1", model="test-model", api_key=KEY, retry=RetryPolicy.of(settings)
    )
    return Conversation(MemorySessionStore(), pipe, settings)


def _voiceflow(stream: bool) -> Callable[[str, dict[str, Any]], Conversation]:
    def made(url: str, overrides: dict[str, Any]) -> Conversation:
        return engine(
            pipeline="voiceflow:",
            voiceflow_api_key=SecretStr(API_KEY),
            voiceflow_runtime_url=url,
            voiceflow_project_id="proj1" if stream else None,
            **overrides,
        )

    return made


def _botpress(url: str, overrides: dict[str, Any]) -> Conversation:
    return engine(
        pipeline=f"botpress:{WEBHOOK_ID}",
        botpress_url=url,
        botpress_idle_s=0.3,
        botpress_reply_timeout_s=5.0,
        **overrides,
    )


CORES = {
    "rasa": Core(
        make_rasa,
        "/webhooks/rest/webhook",
        "Rasa",
        "rasa",
        "my name is ada",
        ["Nice to meet you, Ada."],
        lambda url, more: engine(pipeline=f"rasa+{url}", **more),
    ),
    "openai": Core(
        make_openai_server,
        "/chat/completions",
        "the OpenAI-compatible core",
        "openai",
        "hi",
        ["You said hi.", "The price is 3.5 dollars, e.g. cheap.", "Is there anything else?"],
        _openai,
    ),
    "voiceflow": Core(
        make_voiceflow,
        "/interact",
        "Voiceflow",
        "voiceflow",
        "hi",
        ["You said: hi"],
        _voiceflow(False),
    ),
    "voiceflow-stream": Core(
        make_voiceflow,
        "/interact/stream",
        "Voiceflow",
        "voiceflow",
        "hi",
        ["You said: hi"],
        _voiceflow(True),
    ),
    "http": Core(
        make_core,
        "/json",
        "the core",
        "http",
        "hi",
        ["core heard hi"],
        lambda url, more: engine(pipeline=f"{url}/json", **more),
    ),
    "botpress": Core(
        make_botpress,
        "/messages",
        "Botpress",
        "botpress",
        "hi",
        ["You said: hi"],
        _botpress,
        "POST /messages with ",
    ),
}


@dataclass
class Served:
    """A core under test served behind its :class:`Refusing` app."""

    core: Core
    url: str
    refusing: Refusing

    def conversation(self, **overrides: Any) -> Conversation:
        """A turn engine on this core (``overrides``: Settings fields)."""
        return self.core.conversation(self.url, overrides)


async def _served(core: Core) -> AsyncIterator[Served]:
    refusing = Refusing(core.make(), core.path)
    async with serve(refusing) as url:
        yield Served(core, url, refusing)


@pytest.fixture(params=list(CORES))
async def every_core(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """Each HTTP core (but Dialogflow CX: its own test) behind a :class:`Refusing` app."""
    async for served in _served(CORES[request.param]):
        yield served


@pytest.fixture(params=["rasa", "openai", "voiceflow-stream"])
async def some_core(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """Rasa, the OpenAI-compatible core and Voiceflow's stream, each behind a
    :class:`Refusing` app."""
    async for served in _served(CORES[request.param]):
        yield served


def _retries(label: str) -> float:
    return REGISTRY.get_sample_value("gateway_core_retries_total", {"core": label}) or 0.0


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.pipeline.cores" and "once more" in r.getMessage()
    ]


async def _answered(conv: Conversation, core: Core) -> None:
    events = await conv.turn(ctx(), Input.of(core.said)).collect()
    assert isinstance(events[-1], ResponseEvent), events
    assert texts(events) == core.answer


@pytest.mark.parametrize(("status", "retry_after"), [(429, "0"), (503, "0"), (429, "1")])
async def test_a_refused_request_is_sent_once_more_after_its_retry_after(
    every_core: Served, status: int, retry_after: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A core that answers 429 (or 503 with Retry-After) once, then answers: the turn
    answers, the request was sent twice, one WARNING names the core and the delay, and
    ``gateway_core_retries_total{core}`` counts it. Before: the turn failed at once."""
    served, core = every_core, every_core.core
    served.refusing.refusals.append((status, retry_after))
    conv = served.conversation()
    before = _retries(core.label)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await _answered(conv, core)
    assert served.refusing.seen == 2
    reason = "rate limiting" if status == 429 else "unavailable"
    assert _retry_lines(caplog) == [
        f"{core.shown} answered HTTP {status} ({reason}): sending the request once more "
        f"in {retry_after} s"
    ]
    assert _retries(core.label) == before + 1
    await conv.pipeline.aclose()


async def test_a_retry_after_under_a_twentieth_of_a_second_is_not_said_to_be_0_s(
    some_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``Retry-After: 0.04`` is waited for 0.04 s; the WARNING rounded it to 0.1 s and
    said "once more in 0 s". A delay under 0.05 s is now given to one significant digit."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, "0.04"))
    conv = served.conversation()
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await _answered(conv, core)
    assert _retry_lines(caplog) == [
        f"{core.shown} answered HTTP 429 (rate limiting): sending the request once more in 0.04 s"
    ]
    await conv.pipeline.aclose()


async def test_a_429_without_retry_after_waits_a_second(
    some_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 without Retry-After is sent again after the default delay (1 s)."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, None))
    conv = served.conversation()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await _answered(conv, core)
    assert time.monotonic() - started >= 0.9  # it waited (no upper bound: a loaded machine)
    assert served.refusing.seen == 2
    assert _retry_lines(caplog) == [
        f"{core.shown} answered HTTP 429 (rate limiting): sending the request once more in 1 s"
    ]
    await conv.pipeline.aclose()


async def test_an_http_date_retry_after_is_waited_for(some_core: Served) -> None:
    """``Retry-After`` as an HTTP-date (IMF-fixdate, a second from when it is answered)
    is read as the delay until then: the request is sent once more and answered."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, lambda: formatdate(time.time() + 1, usegmt=True)))
    conv = served.conversation()
    await _answered(conv, core)
    assert served.refusing.seen == 2
    await conv.pipeline.aclose()


async def test_a_retry_after_past_the_turns_time_fails_the_turn_at_once(
    some_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A Retry-After that does not fit in what is left of GATEWAY_TURN_TIMEOUT_S (9 s of
    8 s; within the gateway's 10 s bound) is not waited for: the turn fails at once,
    saying the core is rate limiting and what it asked for, with source ``pipeline``."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, "9"))
    conv = served.conversation(turn_timeout_s=8.0)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        # not the turn's timeout (8 s waited), nor a retry after 9 s (seen below)
        events = await pipeline_error(
            conv,
            f"{core.shown} answered HTTP 429 (rate limiting; Retry-After: 9 s; not retried: "
            "a wait of 9 s does not fit in the ",
            core.said,
        )
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text.endswith(" s left of the turn)"), error.text
    assert served.refusing.seen == 1
    assert _retry_lines(caplog) == []
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("answer_in_s", "limit"),
    [
        (3.0, "before the platform must answer"),
        (60.0, "of the turn"),
        (-1.0, "of the turn"),
        (None, "of the turn"),
    ],
)
async def test_a_retry_that_does_not_fit_names_the_limit_that_stops_it(
    answer_in_s: float | None, limit: str
) -> None:
    """A webhook's turn runs with the platform's deadline (ANSWER_DEADLINE, as
    gateway.io.webhook.run_turn sets it as it starts the turn). A Retry-After of 9 s
    that does not fit before that deadline (3 s away, within the turn's 8 s) is said not
    to fit "before the platform must answer" (was: "left of the turn", the turn's
    8 s not being what stopped it); when the turn's time ends first (a deadline 60 s
    away), the deadline has passed (a late turn: the platform was answered, the turn has
    its own time) or there is none (a streaming channel) it is "of the turn"."""
    served = Refusing(make_core(), "/json")
    served.refusals.append((429, "9"))
    async with serve(served) as url:
        conv = engine(pipeline=f"{url}/json", turn_timeout_s=8.0)
        loop = asyncio.get_running_loop()
        try:
            answering = ANSWER_DEADLINE.set(
                None if answer_in_s is None else loop.time() + answer_in_s
            )
            try:  # the turn's task keeps it (a copy of this context)
                stream = conv.turn(ctx(), Input.of("hi"))
            finally:
                ANSWER_DEADLINE.reset(answering)
            events = await stream.collect()
        finally:
            await conv.pipeline.aclose()
    error = events[-1]
    assert isinstance(error, ErrorEvent), events
    assert re.fullmatch(
        r"the core answered HTTP 429 \(rate limiting; Retry-After: 9 s; not retried: a wait "
        rf"of 9 s does not fit in the [0-9.]+ s left {limit}\)",
        error.text,
    ), error.text
    assert served.seen == 1


@pytest.mark.parametrize(
    ("retry_after", "shown"),
    [("3600", "3600 s"), (lambda: formatdate(time.time() + 7200, usegmt=True), None)],
)
async def test_a_retry_after_past_the_gateways_bound_is_not_waited_for(
    some_core: Served, retry_after: RetryAfter, shown: str | None
) -> None:
    """``Retry-After: 3600`` (or a date two hours ahead) with a turn of a minute: not
    waited for (the gateway waits at most MAX_RETRY_WAIT_S); the turn fails at once."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, retry_after))
    conv = served.conversation(turn_timeout_s=60.0)
    events = await pipeline_error(conv, f"{core.shown} answered HTTP 429 (rate limiting", core.said)
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert f"is more than the {MAX_RETRY_WAIT_S:g} s the gateway waits)" in error.text
    if shown is not None:
        assert f"Retry-After: {shown};" in error.text
    assert served.refusing.seen == 1
    await conv.pipeline.aclose()


@pytest.mark.parametrize("status", [429, 503])
async def test_a_request_refused_twice_fails_after_one_retry(
    some_core: Served, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused, sent again, refused again: the turn fails (no third request), saying so."""
    served, core = some_core, some_core.core
    served.refusing.refusals += [(status, "0"), (status, "0")]
    conv = served.conversation()
    reason = "rate limiting" if status == 429 else "unavailable"
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await pipeline_error(
            conv,
            f"{core.shown} answered HTTP {status} ({reason}; Retry-After: 0 s; refused again "
            "after one retry 0 s later)",
            core.said,
        )
    assert served.refusing.seen == 2
    assert len(_retry_lines(caplog)) == 1
    # the next turn, not refused, is answered
    events = await conv.turn(ctx(), Input.of(core.said)).collect()
    assert texts(events) == core.answer
    await conv.pipeline.aclose()


async def test_a_503_without_retry_after_is_not_retried(
    some_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 without Retry-After says nothing of the request (a proxy's, a crashed
    core's): the turn fails at once, as before, with the same words."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((503, None))
    conv = served.conversation()
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(conv, f"{core.shown} answered HTTP 503", core.said)
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text == f"{core.shown} answered HTTP 503"
    assert served.refusing.seen == 1
    assert _retry_lines(caplog) == []
    await conv.pipeline.aclose()


@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (429, "3600")])
async def test_a_refusal_whose_body_breaks_off_is_still_the_cores_status(
    every_core: Served, status: int, retry_after: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-2xx answer whose body breaks off (the connection dropped after its status,
    headers and the start of its body: a proxy or core crashing while it explains) is
    the core's answer all the same: ``<core> answered HTTP 500``, a 429 with what it
    asked for and why it was not waited for, the body's start in the log. Before,
    reading the error body for the log raised, and the turn failed as ``the connection
    to <core> failed: RemoteProtocolError``, the status and the Retry-After lost."""
    served, core = every_core, every_core.core
    served.refusing.refusals.append((status, retry_after))
    served.refusing.broken = True
    conv = served.conversation(turn_timeout_s=60.0)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(
            conv, f"{core.shown} answered {core.call}HTTP {status}", core.said
        )
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    if status == 429:
        assert "(rate limiting; Retry-After: 3600 s; not retried: a wait of 3600 s" in error.text
    else:
        assert error.text == f"{core.shown} answered {core.call}HTTP 500"
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert any(line.startswith(error.text) and "slow down" in line for line in logged), logged
    assert served.refusing.seen == 1
    await conv.pipeline.aclose()


async def test_a_2xx_answer_that_breaks_off_is_not_sent_again() -> None:
    """Only a request refused by its status is sent again: a streamed 2xx answer that
    breaks off after its first line (Rasa's ``crash``) fails the turn, once."""
    async for served in _served(CORES["rasa"]):
        conv = served.conversation()
        await pipeline_error(conv, "the connection to Rasa failed", "crash")
        assert served.refusing.seen == 1
        await conv.pipeline.aclose()


async def test_dialogflow_cx_retries_a_429_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Dialogflow CX's detectIntent (sent with its access token, and again with a fresh
    one after a 401) goes through the same retry: a 429 once, then the answer."""
    private, public = _key()
    refusing = Refusing(make_cx_server(public), ":detectIntent")
    async with serve(refusing) as url:
        settings = Settings(
            pipeline=f"dialogflow-cx:{AGENT}",
            dialogflow_cx_credentials=key_file(tmp_path, private, f"{url}/token"),
            dialogflow_cx_endpoint=url,
        )
        conv = cx_engine(settings)
        refusing.refusals.append((429, "0"))
        with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
            events = await conv.turn(ctx(), Input.of("pizza")).collect()
        assert texts(events) == ["What size?"]
        assert refusing.seen == 2
        assert _retry_lines(caplog) == [
            "the Dialogflow CX core answered HTTP 429 (rate limiting): sending the request "
            "once more in 0 s"
        ]
        refusing.refusals += [(429, "0"), (429, "0")]
        await pipeline_error(
            conv,
            "the Dialogflow CX core answered HTTP 429 (rate limiting; Retry-After: 0 s; "
            "refused again after one retry 0 s later)",
            "pizza",
        )
        await conv.pipeline.aclose()


# ------------------------------------------------------------------ the retry settings


async def test_no_retries_fail_a_refused_request_at_once(
    every_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """GATEWAY_PIPELINE_RETRIES=0: a 503 with ``Retry-After: 0`` fails the turn at once,
    with the usual words and why it was not sent again; one request, no retry counted.
    Before, the count was a constant (1): the request was sent again and answered."""
    served, core = every_core, every_core.core
    served.refusing.refusals.append((503, "0"))
    conv = served.conversation(pipeline_retries=0)
    before = _retries(core.label)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(conv, f"{core.shown} answered {core.call}HTTP 503", core.said)
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text == (
        f"{core.shown} answered {core.call}HTTP 503 (unavailable; Retry-After: 0 s; not retried: "
        "retries are off)"
    )
    assert served.refusing.seen == 1
    assert _retry_lines(caplog) == []
    assert _retries(core.label) == before
    await conv.pipeline.aclose()


async def test_two_retries_send_a_request_three_times(
    every_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """GATEWAY_PIPELINE_RETRIES=2: a core that refuses twice (a 503, then a 429) and then
    answers gets the request three times and the turn answers; each retry is one WARNING
    saying which it is, and counts. Before, the second refusal failed the turn."""
    served, core = every_core, every_core.core
    served.refusing.refusals += [(503, "0"), (429, "0")]
    conv = served.conversation(pipeline_retries=2)
    before = _retries(core.label)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await _answered(conv, core)
    assert served.refusing.seen == 3
    assert _retry_lines(caplog) == [
        f"{core.shown} answered HTTP 503 (unavailable): sending the request once more in 0 s "
        "(retry 1 of 2)",
        f"{core.shown} answered HTTP 429 (rate limiting): sending the request once more in "
        "0 s (retry 2 of 2)",
    ]
    assert _retries(core.label) == before + 2
    await conv.pipeline.aclose()


async def test_a_request_refused_past_its_retries_says_how_many(some_core: Served) -> None:
    """Refused three times with two retries: the turn fails after the third request
    (no fourth), saying it was refused again after 2 retries."""
    served, core = some_core, some_core.core
    served.refusing.refusals += [(429, "0"), (429, "0"), (429, "0"), (429, "0")]
    conv = served.conversation(pipeline_retries=2)
    events = await pipeline_error(conv, f"{core.shown} answered HTTP 429", core.said)
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text == (
        f"{core.shown} answered HTTP 429 (rate limiting; Retry-After: 0 s; refused again "
        "after 2 retries, the last 0 s later)"
    )
    assert served.refusing.seen == 3
    await conv.pipeline.aclose()


async def test_a_retry_after_past_the_set_max_wait_is_not_waited_for(some_core: Served) -> None:
    """GATEWAY_PIPELINE_RETRY_MAX_WAIT_S=2: a ``Retry-After: 3``, which the turn's minute
    and the default 10 s would allow, is not waited for: the turn fails at once, its
    message naming the 2 s limit. Before, the bound was a constant: the gateway waited
    3 s and the turn answered."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, "3"))
    conv = served.conversation(turn_timeout_s=60.0, pipeline_retry_max_wait_s=2.0)
    events = await pipeline_error(conv, f"{core.shown} answered HTTP 429", core.said)
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text == (
        f"{core.shown} answered HTTP 429 (rate limiting; Retry-After: 3 s; not retried: a "
        "wait of 3 s is more than the 2 s the gateway waits)"
    )
    assert served.refusing.seen == 1
    await conv.pipeline.aclose()


async def test_a_later_retry_past_the_max_wait_says_what_came_before(some_core: Served) -> None:
    """Two retries allowed, the first made (``Retry-After: 0``), the second refusal asking
    for an hour: not waited for; the message says the request was refused again after
    one retry and why it was not sent a third time."""
    served, core = some_core, some_core.core
    served.refusing.refusals += [(429, "0"), (429, "3600")]
    conv = served.conversation(turn_timeout_s=60.0, pipeline_retries=2)
    events = await pipeline_error(conv, f"{core.shown} answered HTTP 429", core.said)
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text == (
        f"{core.shown} answered HTTP 429 (rate limiting; Retry-After: 3600 s; refused again "
        f"after one retry 0 s later; not retried: a wait of 3600 s is more than the "
        f"{MAX_RETRY_WAIT_S:g} s the gateway waits)"
    )
    assert served.refusing.seen == 2
    await conv.pipeline.aclose()


async def test_a_429_without_retry_after_waits_the_set_default(
    some_core: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S=0: a 429 without Retry-After is sent again
    at once (was: always after 1 s)."""
    served, core = some_core, some_core.core
    served.refusing.refusals.append((429, None))
    conv = served.conversation(pipeline_retry_default_wait_s=0.0)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await _answered(conv, core)
    assert served.refusing.seen == 2
    assert _retry_lines(caplog) == [
        f"{core.shown} answered HTTP 429 (rate limiting): sending the request once more in 0 s"
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize(("retries", "seen"), [(0, 1), (2, 3)])
async def test_dialogflow_cx_takes_the_retry_settings(
    tmp_path: Path, retries: int, seen: int
) -> None:
    """Dialogflow CX's client gets GATEWAY_PIPELINE_RETRIES too: none, the first 429
    fails the turn; two, the third request is answered."""
    private, public = _key()
    refusing = Refusing(make_cx_server(public), ":detectIntent")
    async with serve(refusing) as url:
        settings = Settings(
            pipeline=f"dialogflow-cx:{AGENT}",
            dialogflow_cx_credentials=key_file(tmp_path, private, f"{url}/token"),
            dialogflow_cx_endpoint=url,
            pipeline_retries=retries,
        )
        conv = cx_engine(settings)
        refusing.refusals += [(429, "0"), (429, "0")]
        events = await conv.turn(ctx(), Input.of("pizza")).collect()
        if retries:
            assert texts(events) == ["What size?"]
        else:
            assert isinstance(events[-1], ErrorEvent), events
            assert events[-1].text == (
                "the Dialogflow CX core answered HTTP 429 (rate limiting; Retry-After: 0 s; "
                "not retried: retries are off)"
            )
        assert refusing.seen == seen
        await conv.pipeline.aclose()


def test_the_default_retry_policy_is_the_settings_defaults() -> None:
    """Unset, the retry settings are the limits the gateway always had: one retry, at
    most 10 s, 1 s for a 429 without Retry-After."""
    assert RetryPolicy.of(Settings()) == RetryPolicy() == RetryPolicy(1, 10.0, 1.0)


@pytest.mark.parametrize(
    "fields",
    [{"retries": -1}, {"max_wait_s": -0.5}, {"default_wait_s": -1.0}, {"max_wait_s": math.inf}],
)
def test_a_retry_policy_refuses_negative_limits(fields: dict[str, Any]) -> None:
    """A core made directly (not from the settings, which refuse them at startup) is
    refused a negative count or wait, or an endless one."""
    (name,) = fields
    with pytest.raises(ValueError, match=name):
        RetryPolicy(**fields)


# ------------------------------------------------------------------ Retry-After values


NOW = 784_111_777.0
"""Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example date), as Unix time."""


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),  # not RFC 9110's delta-seconds, but what some servers send
        ("9" * 40, math.inf),  # no int of thousands of digits: forever
        ("Sun, 06 Nov 1994 08:49:47 GMT", 10.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:57 GMT", 20.0),  # obsolete RFC 850
        ("Sun Nov  6 08:50:37 1994", 60.0),  # obsolete asctime, GMT
        ("Sun, 06 Nov 1994 08:49:07 GMT", 0.0),  # past: no wait
        (None, None),
        ("", None),
        ("soon", None),
        ("-1", None),
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("5 s", None),
    ],
)
def test_retry_after_values(value: str | None, delay: float | None) -> None:
    """:func:`retry_after_s` reads delta-seconds and the three HTTP-date forms, a date
    against the clock given; what is neither is None (a 429 then waits the default)."""
    assert retry_after_s(value, now=NOW) == delay


async def test_the_webhook_contract_says_a_retried_turn_is_the_same_request() -> None:
    """A core (the gateway's own webhook contract) refusing a turn 503 with Retry-After
    gets the same request again, its ``X-Request-Id`` unchanged (by which it can know the
    turn it refused), and the contract (OpenAPI ``webhooks``, README) says to answer 429
    or 503 with Retry-After only for a turn not acted on: sent again, the core would see
    the user's words twice. Before, neither said that a refusal is sent again at all."""
    async for served in _served(CORES["http"]):
        served.refusing.refusals.append((503, "0"))
        conv = served.conversation()
        await _answered(conv, served.core)
        first, again = served.refusing.request_ids
        assert first
        assert again == first
        await conv.pipeline.aclose()
    document = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    (turn,) = document["webhooks"]["pipeline-turn"].values()
    readme = " ".join((ROOT / "README.md").read_text().split())
    for text in (turn["description"], readme):
        assert "the same body and `X-Request-Id`" in text
        assert "user's words twice" in text
