"""The http pipeline against a real core: the request it sends, JSON and streamed answers,
every kind of core failure as a pipeline error, and the request id it forwards."""

from __future__ import annotations

import asyncio
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

import gateway.pipeline.http as http_core
from gateway.events import (
    Input,
    ResponseEvent,
    ResponseItemEvent,
    SessionEndedEvent,
)
from gateway.pipeline.cores import core_json
from tests.conftest import gateway
from tests.gateway.core_app import BOMB_BYTES, cut_early, gzip_bomb
from tests.gateway.turns import ctx, engine, failed_session, pipeline_error, streamed, texts


async def test_http_core_json_answer_state_and_attributes(core: tuple[str, FastAPI]) -> None:
    url, app = core
    conv = engine(pipeline=f"{url}/json")
    first = await conv.turn(ctx(device_id="d1"), Input.of("hello")).collect()
    assert texts(first) == ["core heard hello"]
    await conv.turn(ctx(), Input.of("again")).collect()
    sent = app.state.requests
    assert sent[0]["sessionId"] == "s1"
    assert sent[0]["appKey"] == "app"
    assert sent[0]["deviceId"] == "d1"
    assert sent[0]["turn"] == 1
    assert sent[0]["state"] == {}
    assert sent[1]["turn"] == 2
    assert sent[1]["state"] == {"count": 1}  # the core's state came back
    assert sent[1]["attributes"]["lastHeard"] == "hello"
    assert "x-request-id" in sent[0]["_headers"]
    bye = await conv.turn(ctx(), Input.of("bye")).collect()
    assert isinstance(bye[-1], SessionEndedEvent)
    await conv.pipeline.aclose()


async def test_http_core_stream_is_forwarded_as_it_arrives(core: tuple[str, FastAPI]) -> None:
    url, app = core
    conv = engine(pipeline=f"{url}/stream")
    rest = await streamed(conv, app.state.release, "hi")
    assert [e.response_item.text for e in rest if isinstance(e, ResponseItemEvent)] == ["second"]
    assert isinstance(rest[-1], ResponseEvent)
    assert [i.text for i in rest[-1].response.items] == ["first", "second"]
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state == {"streamed": True}
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("status/500", "HTTP 500"),
        ("status/404", "HTTP 404"),
        ("garbage", "invalid Response"),
        ("wrong-shape", "invalid Response"),
        ("huge", "larger than"),
        ("stream-no-response", "without a Response"),
        ("stream-unknown", "unknown event type"),
        ("stream-deep", "nested deeper than 64 levels"),
        ("slow?s=1.5", "did not answer within"),
    ],
)
async def test_core_failures_become_pipeline_errors(
    core: tuple[str, FastAPI], path: str, words: str
) -> None:
    url, _ = core
    conv = engine(pipeline=f"{url}/{path}", turn_timeout_s=0.5)
    await pipeline_error(conv, words)
    await failed_session(conv, 0)  # the session survives, marked Failed, not advanced
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_answer_nested_too_deep_fails_whole_or_streamed(
    core: tuple[str, FastAPI], stream: bool
) -> None:
    """A core's JSON is read within the depth bound of every core (core_json: 64 levels)
    whether it comes whole or as NDJSON lines: an attribute 100 arrays deep fails the
    turn naming the depth (before, a whole answer went to pydantic, whose own limit is
    about 200: accepted there, refused streamed); 60 deep (62 and 63 levels with the
    body, the line) is kept in the session's attributes."""
    url, _ = core
    query = "?stream=1" if stream else ""
    conv = engine(pipeline=f"{url}/nested/100{query}")
    await pipeline_error(conv, "the JSON is nested deeper than 64 levels")
    await failed_session(conv, 0)
    await conv.pipeline.aclose()
    conv = engine(pipeline=f"{url}/nested/60{query}")
    assert texts(await conv.turn(ctx(), Input.of("hello")).collect()) == ["deep"]
    session = await conv.store.get(ctx().key)
    assert session is not None
    deep, depth = session.attributes["deep"], 1
    while deep:
        (deep,), depth = deep, depth + 1
    assert (deep, depth) == ([], 60)
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("{url}/endless-line", {}),
        ("rasa+{url}/endless-line", {"rasa_stream": True}),
        ("openai+{url}/endless-line/v1", {"openai_model": "m"}),
    ],
    ids=["http", "rasa", "openai"],
)
async def test_a_line_past_the_bound_fails_the_turn_before_the_core_sent_it_all(
    core: tuple[str, FastAPI], spec: str, options: dict[str, Any]
) -> None:
    """GATEWAY_PIPELINE_MAX_RESPONSE_BYTES bounds the bytes read, not only whole lines,
    for every core that reads its answer by lines: a 32 MB line without a newline fails
    the turn once 1 MB came, and the gateway stops reading (the core's stream is cut
    long before its end)."""
    url, app = core
    conv = engine(pipeline=spec.format(url=url), pipeline_max_response_bytes=1_048_576, **options)
    await pipeline_error(conv, "larger than 1048576 bytes")
    await failed_session(conv, 0)
    await cut_early(app)
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("{url}/gzip-bomb-json", {}),
        ("{url}/gzip-bomb-ndjson", {}),
        ("rasa+{url}/gzip-bomb-json", {}),
        ("rasa+{url}/gzip-bomb-ndjson", {"rasa_stream": True}),
        ("openai+{url}/gzip-bomb-sse/v1", {"openai_model": "m"}),
    ],
    ids=["http", "http-stream", "rasa", "rasa-stream", "openai"],
)
async def test_a_compressed_answer_is_bounded_as_it_inflates(
    core: tuple[str, FastAPI], spec: str, options: dict[str, Any]
) -> None:
    """A gzip answer of about 100 KB that inflates to 100 MB fails the turn once the
    inflated body passes GATEWAY_PIPELINE_MAX_RESPONSE_BYTES, and the gateway never holds
    more than about that much of it: the peak of the memory Python allocated during the
    turn (tracemalloc, the test server's part included) stays far below one inflated
    64 KB chunk (64 MB), which is what httpx's own decoding would hold at once."""
    url, _ = core
    assert len(gzip_bomb()) * 500 < BOMB_BYTES  # made before tracing: a bomb indeed
    conv = engine(pipeline=spec.format(url=url), pipeline_max_response_bytes=1_048_576, **options)
    tracemalloc.start()
    try:
        await pipeline_error(conv, "larger than 1048576 bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1_048_576, f"{peak / 1_048_576:.1f} MB held"
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("spec", "options", "words"),
    [
        ("rasa+{url}/not-gzip", {}, "Rasa answered a body that is not valid gzip"),
        (
            "openai+{url}/not-gzip/v1",
            {"openai_model": "m"},
            "the OpenAI-compatible core answered a body that is not valid gzip",
        ),
    ],
    ids=["rasa", "openai"],
)
async def test_a_body_that_does_not_inflate_is_the_cores_bad_answer(
    core: tuple[str, FastAPI], spec: str, options: dict[str, Any], words: str
) -> None:
    """A body that says gzip but is not: the core answered, it was not "could not be
    reached: DecodingError"."""
    url, _ = core
    conv = engine(pipeline=spec.format(url=url), **options)
    await pipeline_error(conv, words)
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw", "both"])
async def test_a_compressed_answer_is_read_whole(core: tuple[str, FastAPI], coding: str) -> None:
    """gzip, deflate (zlib or raw) and both in turn: inflated step by step, the answer
    (300 KB, several steps) is read whole; the core was asked for gzip and deflate only."""
    url, app = core
    conv = engine(pipeline=f"{url}/packed-{coding}")
    events = await conv.turn(ctx(), Input.of("hi")).collect()
    assert texts(events) == ["squeezed " * 33_333]
    assert app.state.requests[-1]["_headers"]["accept-encoding"] == "gzip, deflate"
    await conv.pipeline.aclose()


async def test_an_answer_in_a_coding_the_gateway_cannot_bound_is_refused(
    core: tuple[str, FastAPI],
) -> None:
    """``Content-Encoding: br`` (or any coding but gzip/deflate) is refused with the
    pipeline's error, not read as if it were plain."""
    url, app = core

    @app.post("/brotli")
    async def brotli() -> Response:
        return Response(b"\x1b\x00", media_type="application/json", headers={"Content-Encoding": "br"})  # fmt: skip

    conv = engine(pipeline=f"{url}/brotli")
    await pipeline_error(conv, "Content-Encoding 'br', which the gateway does not read")
    await conv.pipeline.aclose()


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_garbled_compressed_answer_is_the_cores_error(
    core: tuple[str, FastAPI], coding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that says it is gzip or deflate but is not (cut, or garbage) is the core's
    error (source pipeline, logged at WARNING at most), never the gateway's; it names
    the coding, not "could not be reached" (the core was reached, and answered)."""
    url, app = core

    @app.post("/garbled-{name}")
    async def garbled(name: str) -> Response:
        body = b"\x1f\x8b\x08\x00garbage, not a deflate stream" if name == "gzip" else b"nope"
        return Response(body, media_type="application/json", headers={"Content-Encoding": name})

    conv = engine(pipeline=f"{url}/garbled-{coding}")
    events = await pipeline_error(conv, f"the core answered a body that is not valid {coding}")
    assert "could not be reached" not in str(events[-1])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await conv.pipeline.aclose()


async def test_streamed_lines_are_whole_however_the_bytes_are_cut(
    core: tuple[str, FastAPI],
) -> None:
    """Lines ended by CRLF, cut on the wire inside a line, between CR and LF and inside a
    UTF-8 character, come whole; a raw U+2028 (a line separator for str.splitlines, a
    character like any other in JSON) stays in its string."""
    url, _ = core
    conv = engine(pipeline=f"{url}/stream-split")
    events = await conv.turn(ctx(), Input.of("hi")).collect()
    assert texts(events) == ["one\u2028two", "žluťoučký"]
    assert isinstance(events[-1], ResponseEvent)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_answer_that_breaks_off_is_not_called_unreachable(
    core: tuple[str, FastAPI], stream: bool
) -> None:
    """A core that answered and then dropped the connection mid-body fails the turn with
    "the connection to the core failed" (a streamed line before it still forwarded), not "the
    core could not be reached", which sent operators to look at the network."""
    url, app = core

    @app.post("/breaks-off")
    async def breaks_off() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b'{"type":"ResponseItem","responseItem":{"text":"first"}}\n'
            raise ConnectionAbortedError("the core died mid-answer")  # uvicorn drops it

        kind = "application/x-ndjson" if stream else "application/json"
        return StreamingResponse(body(), media_type=kind)

    conv = engine(pipeline=f"{url}/breaks-off")
    events = await pipeline_error(conv, "the connection to the core failed: RemoteProtocolError")
    assert texts(events) == (["first"] if stream else [])
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


async def test_a_json_seq_stream_is_read(core: tuple[str, FastAPI]) -> None:
    """``application/json-seq`` (RFC 7464: each record is RS, JSON text, LF), which the
    core accepts as a stream, is read record by record; every record failed as "an
    invalid line" (the RS is no JSON whitespace)."""
    url, app = core

    @app.post("/json-seq")
    async def json_seq() -> Response:
        records = [
            {"type": "ResponseItem", "responseItem": {"text": "first"}},
            {"type": "Response", "response": {"items": []}, "state": {"seq": True}},
        ]
        body = "".join(f"\x1e{json.dumps(r)}\n" for r in records)
        return Response(body, media_type="application/json-seq")

    conv = engine(pipeline=f"{url}/json-seq")
    events = await conv.turn(ctx(), Input.of("hi")).collect()
    assert texts(events) == ["first"]
    assert isinstance(events[-1], ResponseEvent)
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state == {"seq": True}
    await conv.pipeline.aclose()


async def test_a_json_seq_record_over_several_lines_is_one_record(
    core: tuple[str, FastAPI],
) -> None:
    """RFC 7464 splits a JSON text sequence at RS, not at line ends: a core that writes
    its records pretty-printed (``json.dumps(record, indent=2)``), or two records on one
    line, sends valid json-seq. Each record is read whole; the pretty-printed item is
    forwarded while the core still holds its answer (at its closing ``}``, not at the
    next RS). Before, each line was a record: "the core streamed an invalid line"."""
    url, app = core
    release = asyncio.Event()

    @app.post("/json-seq-pretty")
    async def json_seq_pretty() -> StreamingResponse:
        first = {"type": "ResponseItem", "responseItem": {"text": "first"}}
        second = {"type": "ResponseItem", "responseItem": {"text": "second"}}
        last = {"type": "Response", "response": {"items": []}, "state": {"pretty": True}}

        async def body() -> AsyncIterator[bytes]:
            yield f"\x1e{json.dumps(first, indent=2)}\n".encode()
            await release.wait()  # held until the first item is out
            yield f"\x1e\x1e{json.dumps(second)}\n\x1e{json.dumps(last, indent=1)}".encode()
            yield b"\n"

        return StreamingResponse(body(), media_type="application/json-seq")

    conv = engine(pipeline=f"{url}/json-seq-pretty")
    rest = await streamed(conv, release, "hi")
    assert texts(rest) == ["second"]
    assert isinstance(rest[-1], ResponseEvent)
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state == {"pretty": True}
    await conv.pipeline.aclose()


async def test_a_json_seq_rs_on_a_line_of_its_own_separates_records(
    core: tuple[str, FastAPI],
) -> None:
    """An RS alone on its line (``RS LF`` then the JSON text: the LF is JSON white space,
    RFC 7464 section 2.2) still ends the record before it. Python counts RS as white
    space (``"\\x1e".strip() == ""``), so the lines reader dropped such a line as blank
    and a record not yet known whole (its last line no lone ``}``) ran into the next:
    "the core streamed an invalid line"."""
    url, app = core

    @app.post("/json-seq-rs-lines")
    async def json_seq_rs_lines() -> Response:
        body = (
            '\x1e\n{"type": "ResponseItem",\n "responseItem": {"text": "first"}}\n'
            '\x1e\n{"type": "Response",\n "response": {"items": []}, "state": {"rs": 1}}\n'
        )
        return Response(body, media_type="application/json-seq")

    conv = engine(pipeline=f"{url}/json-seq-rs-lines")
    events = await conv.turn(ctx(), Input.of("hi")).collect()
    assert texts(events) == ["first"]
    assert isinstance(events[-1], ResponseEvent)
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state == {"rs": 1}
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    "body",
    [
        "\x1e{\n" + "]\n" * 20_000,  # many closing lines: one record, no JSON
        '\x1e{"type": "ResponseItem",\n\x1e"responseItem": {}}\n',  # an RS inside a text
        '\x1e{"type": "Response", "response": {\n',  # the last record cut off
    ],
    ids=["closers", "split", "cut"],
)
async def test_a_broken_json_seq_record_is_an_invalid_line(
    core: tuple[str, FastAPI], body: str
) -> None:
    """A json-seq record that is no JSON text, however its lines go, fails the turn
    ("invalid line"). (How often many ``}`` lines are parsed is counted in
    :func:`test_a_json_seq_record_of_many_closing_lines_is_tried_once_per_doubling`.)"""
    url, app = core

    @app.post("/json-seq-broken")
    async def json_seq_broken() -> Response:
        return Response(body, media_type="application/json-seq")

    conv = engine(pipeline=f"{url}/json-seq-broken")
    await pipeline_error(conv, "the core streamed an invalid line")
    await conv.pipeline.aclose()


@pytest.mark.parametrize("closers", [1024, 4096])
async def test_a_json_seq_record_of_many_closing_lines_is_tried_once_per_doubling(
    monkeypatch: pytest.MonkeyPatch, closers: int
) -> None:
    """Each line that is only ``}`` may end a pretty-printed record, but the record so far
    is parsed again only once it has doubled since it was last tried: a broken record of
    n such lines is parsed about log2(n) times (n times would be quadratic work), counted
    on the real parser; the broken record is still given whole, once, at the end."""
    tried: list[int] = []
    real = core_json

    def counted(text: str | bytes) -> Any:
        tried.append(len(text))
        return real(text)

    monkeypatch.setattr(http_core, "core_json", counted)

    async def lines() -> AsyncIterator[str]:
        yield '\x1e{"a":'
        for _ in range(closers):
            yield "}"

    records = [record async for record in http_core.json_seq_records(lines())]
    assert records == ["\n".join(['{"a":', *["}"] * closers])]
    assert 2 <= len(tried) <= closers.bit_length() + 2, len(tried)


async def test_unreachable_core_is_a_pipeline_error() -> None:
    conv = engine(pipeline="http://127.0.0.1:1/core")
    await pipeline_error(conv, "could not be reached")
    await conv.pipeline.aclose()


async def test_request_id_reaches_the_core(core: tuple[str, FastAPI]) -> None:
    url, app = core
    async with gateway(pipeline=f"{url}/json") as base, httpx.AsyncClient(base_url=base) as client:
        given = await client.put(
            "/client?key=k", headers={"Content-Type": "text/plain", "X-Request-Id": "req-42"},
            content="hello",
        )  # fmt: skip
        assert given.headers["x-request-id"] == "req-42"
        made = await client.put(
            "/client?key=k", headers={"Content-Type": "text/plain", "X-Request-Id": "bad id!"},
            content="hello",
        )  # fmt: skip
    assert made.headers["x-request-id"] != "bad id!"
    assert [r["_headers"]["x-request-id"] for r in app.state.requests] == [
        "req-42",
        made.headers["x-request-id"],
    ]


async def test_why_the_core_refused_goes_to_the_log(
    core: tuple[str, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """A non-2xx answer: "the core answered HTTP 404" for the client, the same with the
    body's start in the log (WARNING). Before, the body was not read."""
    url, _ = core
    conv = engine(pipeline=f"{url}/status/404")
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        await pipeline_error(conv, "the core answered HTTP 404")
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert lines == ['the core answered HTTP 404: {"detail":"no"}']
    await conv.pipeline.aclose()
