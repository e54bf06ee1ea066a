"""The one server-sent events reader of the cores (gateway/pipeline/cores.py ``iter_sse``,
``bounded_sse``) and its callers, over a real HTTP server: an event with no blank line
after it when the stream ends is incomplete and discarded (WHATWG HTML, "Server-sent
events", "Event stream interpretation"). The OpenAI-compatible and Dialogflow CX cores
read such an event as a whole one before, the Voiceflow and Botpress cores (httpx-sse)
did not. The OpenAI-compatible core alone asks for it (``incomplete``) and takes it
when its data is whole (``[DONE]`` or a JSON object), not when it is cut off. The Dialogflow CX caller is tested in test_dialogflow_cx.py (its server needs
its credentials); Botpress reads through ``bounded_sse``, as Voiceflow does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from gateway.events import Input
from gateway.pipeline.base import PipelineError
from gateway.pipeline.cores import SseEvent, bounded_lines, bounded_sse, iter_sse
from tests.conftest import serve
from tests.gateway.pipeline.test_openai import engine as openai_engine
from tests.gateway.pipeline.test_openai import pipeline as openai_pipeline
from tests.gateway.pipeline.test_voiceflow import vf_engine
from tests.gateway.turns import ctx, pipeline_error, texts

WHOLE = ": keepalive\n\nevent: a\ndata: one\ndata: two\n\nid: 7\n\nevent: end\nid: 8\n\n"
"""Two whole events (the second with a type and no data, as Voiceflow ends its stream)
and one with neither (not dispatched, as the spec says; httpx-sse gave it as an empty
``message``, which its callers passed over)."""

CUT = ["data: cut off", "data: cut off\n", "event: b\r\ndata: cut off\r\n", "event: end"]
"""Endings of a stream whose last event has no blank line after it."""


@pytest.fixture
async def core() -> AsyncIterator[tuple[str, FastAPI]]:
    """A server answering every request with ``app.state.body`` as an event stream."""
    app = FastAPI()
    app.state.body = ""
    app.state.media_type = "text/event-stream"

    @app.api_route("/{rest:path}", methods=["GET", "POST"])
    async def answer(rest: str, request: Request) -> Response:
        return Response(app.state.body, media_type=app.state.media_type)

    async with serve(app) as url:
        yield url, app


def lines_reader(answer: httpx.Response) -> AsyncIterator[SseEvent]:
    return iter_sse(bounded_lines(answer, 10_000, "the core", blank=True))


def stream_reader(answer: httpx.Response) -> AsyncIterator[SseEvent]:
    return bounded_sse(answer, 10_000, "the core")


@pytest.mark.parametrize("cut", CUT)
@pytest.mark.parametrize("reader", [lines_reader, stream_reader])
async def test_an_event_cut_off_by_the_end_of_the_stream_is_discarded(
    core: tuple[str, FastAPI],
    reader: Callable[[httpx.Response], AsyncIterator[SseEvent]],
    cut: str,
) -> None:
    url, app = core
    app.state.body = WHOLE + cut
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        events = [(e.event, e.data) async for e in reader(answer)]
    assert events == [("a", "one\ntwo"), ("end", "")]


@pytest.mark.parametrize(
    ("cut", "last"),
    zip(
        CUT,
        [("message", "cut off"), ("message", "cut off"), ("b", "cut off"), ("end", "")],
        strict=True,
    ),
)
async def test_an_unended_last_event_is_given_as_incomplete_when_asked_for(
    core: tuple[str, FastAPI], cut: str, last: tuple[str, str]
) -> None:
    """``iter_sse(..., incomplete=True)``: the stream's unended last event comes last,
    marked incomplete, for the caller to judge (the OpenAI-compatible core)."""
    url, app = core
    app.state.body = WHOLE + cut
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        lines = bounded_lines(answer, 10_000, "the core", blank=True)
        events = [(e.event, e.data, e.complete) async for e in iter_sse(lines, incomplete=True)]
    assert events == [("a", "one\ntwo", True), ("end", "", True), (*last, False)]


async def test_the_openai_core_takes_a_whole_chunk_for_its_end_not_a_cut_off_one(
    core: tuple[str, FastAPI],
) -> None:
    """The chunk with the finish_reason came without its blank line (the server closed
    right after it): whole JSON, it is the end of the answer; cut off mid-JSON, the
    stream did not end as a completion ends (before, the cut one was read as the end,
    and later the whole one was discarded, failing the turn)."""
    url, app = core

    def chunk(content: str, finish: str | None) -> str:
        choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
        return "data: " + json.dumps({"choices": [choice]})

    first = f"{chunk('Hello there. ', None)}\n\n"
    app.state.body = first + chunk("Cut", "stop")[:-3]
    conv = openai_engine(openai_pipeline(url))
    events = await pipeline_error(conv, "stream ended without a finish_reason or [DONE] (its")
    assert texts(events) == []  # (a sentence waits for the next one to begin)
    for end in ("", "\n", "\r\n", "\n\n"):  # whole, with its line's end or not, it is the end
        app.state.body = first + chunk("Cut", "stop") + end
        served = await conv.turn(ctx(), Input.of("hi")).collect()
        assert texts(served) == ["Hello there.", "Cut"]
    await conv.pipeline.aclose()


async def test_the_voiceflow_core_does_not_take_a_cut_off_end_event_for_its_end(
    core: tuple[str, FastAPI],
) -> None:
    url, app = core
    trace = 'event: trace\ndata: {"type": "text", "payload": {"message": "first"}}\n\n'
    app.state.body = trace + "event: end"
    conv = vf_engine(url, True)
    events = await pipeline_error(conv, "Voiceflow's stream ended without its end event")
    assert texts(events) == ["first"]
    app.state.body += "\n\n"
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["first"]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("reader", [lines_reader, stream_reader])
async def test_a_byte_order_mark_that_begins_the_stream_is_no_part_of_its_first_field(
    core: tuple[str, FastAPI], reader: Callable[[httpx.Response], AsyncIterator[SseEvent]]
) -> None:
    """A stream beginning with a UTF-8 BOM: the BOM is stripped before the first field
    name, only there (WHATWG HTML, "Event stream interpretation": one leading U+FEFF is
    ignored; a later one is part of the line). Before, the first field was read as
    ``\\ufeffevent`` (unknown, ignored): its event lost its type, or its data."""
    url, app = core
    bom = "\ufeff"
    app.state.body = f"{bom}event: a\ndata: one\n\n{bom}data: lost\n\ndata: two\n\n".encode()
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        events = [(e.event, e.data) async for e in reader(answer)]
    assert events == [("a", "one"), ("message", "two")]
    app.state.body = f"{bom}data: first\n\n".encode()
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        assert [(e.event, e.data) async for e in reader(answer)] == [("message", "first")]


@pytest.mark.parametrize("charset", ["hex", "base64", "rot13", "uu"])
@pytest.mark.parametrize("reader", [lines_reader, stream_reader])
async def test_a_charset_that_names_no_text_encoding_is_read_as_utf_8(
    core: tuple[str, FastAPI],
    reader: Callable[[httpx.Response], AsyncIterator[SseEvent]],
    charset: str,
) -> None:
    """A Content-Type charset naming one of Python's codecs that are no text encoding
    (bytes to bytes, or str to str: ``hex``, ``base64``, ``rot13``) is passed over as an
    unknown one is (httpx reads those as UTF-8); a text encoding's name is kept. Before,
    its decoder was made and failed on the first chunk (``hex``: an AssertionError)."""
    url, app = core
    app.state.body = "data: caf\u00e9\n\n".encode()
    app.state.media_type = f"text/event-stream; charset={charset}"
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        assert [e.data async for e in reader(answer)] == ["caf\u00e9"]
    app.state.media_type = "text/event-stream; charset=latin-1"
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        assert [e.data async for e in reader(answer)] == ["caf\u00c3\u00a9"]


@pytest.mark.parametrize("charset", ["utf-16", "utf-32", "undefined", "idna"])
@pytest.mark.parametrize("reader", [lines_reader, stream_reader])
async def test_text_its_charset_cannot_decode_is_the_cores_error(
    core: tuple[str, FastAPI],
    reader: Callable[[httpx.Response], AsyncIterator[SseEvent]],
    charset: str,
) -> None:
    """Text whose charset's decoder refuses it whatever its errors handler (UTF-16 and
    UTF-32 without a byte order mark, ``undefined``, ``idna`` with bytes over 127) is a
    PipelineError naming the core and the charset; before, the decoder's UnicodeError
    went up as the gateway's own bug."""
    url, app = core
    app.state.body = "data: caf\u00e9\n\n".encode()
    app.state.media_type = f"text/event-stream; charset={charset}"
    async with httpx.AsyncClient() as client, client.stream("GET", url) as answer:
        with pytest.raises(PipelineError, match=f"the core's answer is no {charset} text"):
            [e.data async for e in reader(answer)]
