"""A small user core for tests: a real FastAPI app speaking the pipeline webhook contract.

Each path behaves differently, so a test picks a behaviour by the URL it gives
the gateway as GATEWAY_PIPELINE. Every request body received is kept in
``app.state.requests`` for assertions, with its headers (``_headers``) and when
it arrived (``_received_at``, ``time.monotonic()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

DEEP = "[" * 50_000 + "]" * 50_000
"""JSON nested 50,000 levels deep: past any bound, and past the recursion limit of the
standard library's parser (a RecursionError where nothing bounds it first)."""


BOMB_BYTES = 100 * 1024 * 1024
"""What :func:`gzip_bomb` inflates to: 100 MB of spaces."""


@functools.cache
def gzip_bomb() -> bytes:
    """:data:`BOMB_BYTES` spaces, gzip-compressed (about 100 KB), made 1 MB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    space = b" " * 1_048_576
    packed = [packer.compress(space) for _ in range(BOMB_BYTES // len(space))]
    return b"".join([*packed, packer.flush()])


def endless_body(app: FastAPI, prefix: bytes = b"") -> AsyncIterator[bytes]:
    """A streamed body of ``prefix`` then one line that never ends: 32 MB in 64 KB chunks,
    no newline. ``app.state.sent`` counts the bytes handed to the server,
    ``app.state.line_stopped`` is set when the stream stops, ``app.state.line_whole``
    only when it was all sent."""
    app.state.sent, app.state.line_whole = 0, False
    app.state.line_stopped = asyncio.Event()
    chunk = b"x" * 65_536

    async def line() -> AsyncIterator[bytes]:
        try:
            if prefix:  # (an empty chunk would end a chunked body)
                yield prefix
            for _ in range(32 * 16):
                yield chunk
                app.state.sent += len(chunk)
                await asyncio.sleep(0)  # a disconnect can cancel the stream here
            app.state.line_whole = True
        finally:
            app.state.line_stopped.set()

    return line()


async def cut_early(app: FastAPI) -> None:
    """Assert that the gateway stopped reading an :func:`endless_body` long before its end
    (it cut the connection: the bound, what socket buffers hold, and slack)."""
    async with asyncio.timeout(15):  # a safety net, not a bound on the time taken
        await app.state.line_stopped.wait()
    assert not app.state.line_whole
    assert app.state.sent < 16 * 1_048_576


def answering_core(items: list[dict[str, Any]]) -> FastAPI:
    """A core whose every turn (``POST /turn``) is answered ``{"items": items}``."""
    app = FastAPI()

    @app.post("/turn")
    async def turn() -> JSONResponse:
        return JSONResponse({"items": items})

    return app


def make_core() -> FastAPI:
    """The test core; ``app.state.release`` lets a test hold the streaming answer open;
    ``app.state.arrived`` is set once a request has come."""
    app = FastAPI()
    app.state.requests = []
    app.state.release = asyncio.Event()
    app.state.arrived = asyncio.Event()  # set by the first request

    async def body(request: Request) -> dict[str, Any]:
        data: dict[str, Any] = await request.json()
        data["_headers"] = dict(request.headers)
        data["_received_at"] = time.monotonic()  # this process's clock (the test's)
        app.state.requests.append(data)
        app.state.arrived.set()
        return data

    @app.post("/json")
    async def whole(request: Request) -> JSONResponse:
        turn = await body(request)
        text = turn["input"]["transcript"]["text"]
        count = int(turn["state"].get("count", 0)) + 1
        return JSONResponse(
            {
                "items": [{"text": f"core heard {text}"}],
                "attributes": {"lastHeard": text},
                "state": {"count": count},
                "sessionEnded": text == "bye",
            }
        )

    @app.post("/sleep-end")
    async def sleep_end(request: Request) -> JSONResponse:
        await body(request)
        return JSONResponse(
            {"items": [{"text": "good night"}], "sessionEnded": True, "sleepTimeout": 30}
        )

    @app.post("/stream")
    async def stream(request: Request) -> StreamingResponse:
        await body(request)

        async def lines() -> AsyncIterator[bytes]:
            yield b'{"type":"ResponseItem","responseItem":{"text":"first"}}\n'
            await app.state.release.wait()  # the test releases it after it saw "first"
            yield b'{"type":"ResponseItem","responseItem":{"text":"second"}}\n'
            yield b'{"type":"Response","response":{"items":[]},"state":{"streamed":true}}\n'

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/timeouts")
    async def timeouts(request: Request) -> Response:
        """A text ``<field>=<n>`` (``sessionTimeout=-5``) is answered with an item and that
        field (``sleepTimeout`` with ``sessionEnded``); prefixed ``stream ``, as NDJSON (the
        item's line, then the Response's). Other texts get ``core heard <text>``."""
        turn = await body(request)
        text = turn["input"]["transcript"]["text"]
        stream = text.startswith("stream ")
        field, sep, value = text.removeprefix("stream ").partition("=")
        if not sep:
            return JSONResponse({"items": [{"text": f"core heard {text}"}]})
        item = {"text": "set the time"}
        answer = {field: int(value), "sessionEnded": field == "sleepTimeout"}
        if not stream:
            return JSONResponse({"items": [item], **answer})
        lines = [
            {"type": "ResponseItem", "responseItem": item},
            {"type": "Response", "response": {"items": [], **answer}},
        ]
        return Response(
            "".join(json.dumps(line) + "\n" for line in lines), media_type="application/x-ndjson"
        )

    @app.post("/slow")
    async def slow(request: Request) -> JSONResponse:
        await body(request)
        await asyncio.sleep(float(request.query_params.get("s", "5")))
        return JSONResponse({"items": [{"text": "slow answer"}]})

    @app.post("/hold-on")
    async def hold_on(request: Request) -> JSONResponse:
        """``?text=T``: a turn whose text is T is held until ``release``; others answer."""
        turn = await body(request)
        text = turn["input"]["transcript"]["text"]
        if text == request.query_params.get("text"):
            await app.state.release.wait()
        return JSONResponse({"items": [{"text": f"core heard {text}"}]})

    @app.post("/error-or-echo")
    async def error_or_echo(request: Request) -> JSONResponse:
        turn = await body(request)
        text = turn["input"]["transcript"]["text"]
        if text == "#error":
            return JSONResponse({"items": [{"text": "sorry, the core tripped"}]})
        return JSONResponse({"detail": "boom"}, status_code=500)

    @app.post("/status/{code}")
    async def status(code: int, request: Request) -> Response:
        await body(request)
        return JSONResponse({"detail": "no"}, status_code=code)

    @app.post("/garbage")
    async def garbage(request: Request) -> Response:
        await body(request)
        return PlainTextResponse("<html>not json</html>", media_type="application/json")

    @app.post("/wrong-shape")
    async def wrong_shape(request: Request) -> JSONResponse:
        await body(request)
        return JSONResponse({"items": "not a list"})

    @app.post("/huge")
    async def huge(request: Request) -> JSONResponse:
        await body(request)
        return JSONResponse({"items": [{"text": "x" * 2_000_000}]})

    @app.post("/gzip-bomb-{kind}{rest:path}")
    async def bomb(kind: str, request: Request) -> Response:
        """:func:`gzip_bomb` with ``Content-Encoding: gzip``, at any path under it, as
        ``json``, ``ndjson`` or ``sse`` (its Content-Type)."""
        await body(request)
        media = {"json": "application/json", "ndjson": "application/x-ndjson"}
        return Response(
            gzip_bomb(),
            media_type=media.get(kind, "text/event-stream"),
            headers={"Content-Encoding": "gzip"},
        )

    @app.post("/not-gzip{rest:path}")
    async def not_gzip(request: Request) -> Response:
        """A body that says ``Content-Encoding: gzip`` but is not gzip, at any path under it."""
        await body(request)
        return Response(
            b"[not gzip at all]",
            media_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )

    @app.post("/packed-{coding}")
    async def packed(coding: str, request: Request) -> Response:
        """A valid answer of one 300 KB item (``"squeezed "`` repeated) sent with
        ``Content-Encoding`` ``gzip``, ``deflate`` (zlib format), or ``deflate`` as raw
        deflate (``raw``, as some servers send it), or ``gzip, deflate`` (``both``)."""
        await body(request)
        data = json.dumps({"items": [{"text": "squeezed " * 33_333}]}).encode()
        gzip_, zlib_, raw = zlib.MAX_WBITS | 16, zlib.MAX_WBITS, -zlib.MAX_WBITS

        def pack(data: bytes, wbits: int) -> bytes:
            packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
            return packer.compress(data) + packer.flush()

        if coding == "both":
            data, name = pack(pack(data, gzip_), zlib_), "gzip, deflate"
        else:
            wbits = {"gzip": gzip_, "deflate": zlib_, "raw": raw}[coding]
            data, name = pack(data, wbits), "gzip" if coding == "gzip" else "deflate"
        return Response(data, media_type="application/json", headers={"Content-Encoding": name})

    @app.post("/endless-line{rest:path}")
    async def endless_line(request: Request) -> StreamingResponse:
        """A streamed answer of one line that never ends, at any path under it (a Rasa
        webhook, chat completions): 32 MB in 64 KB chunks, no newline. ``app.state.sent``
        counts the bytes handed to the server; ``app.state.line_stopped`` is set when the
        stream stops, ``app.state.line_whole`` only when it was all sent."""
        await body(request)
        return StreamingResponse(endless_body(app), media_type="application/x-ndjson")

    @app.post("/stream-split")
    async def stream_split(request: Request) -> StreamingResponse:
        """NDJSON lines ended by CRLF, written in pieces cut anywhere (inside a line,
        between CR and LF, inside a UTF-8 character), a raw U+2028 in one text."""
        await body(request)
        data = (
            '{"type":"ResponseItem","responseItem":{"text":"one\u2028two"}}\r\n'
            '{"type":"ResponseItem","responseItem":{"text":"žluťoučký"}}\r\n'
            '\r\n{"type":"Response","response":{"items":[]}}'
        ).encode()
        marks = ("\u2028".encode(), b"\r\n", "ž".encode(), b"\r\n\r\n", b"\n{")
        cuts = sorted({0, len(data), *(data.index(mark) + 1 for mark in marks)})

        async def pieces() -> AsyncIterator[bytes]:
            for start, end in itertools.pairwise(cuts):
                yield data[start:end]
                await asyncio.sleep(0.01)  # each piece its own chunk (most likely)

        return StreamingResponse(pieces(), media_type="application/x-ndjson")

    @app.post("/stream-deep")
    async def stream_deep(request: Request) -> Response:
        await body(request)
        return Response(DEEP + "\n", media_type="application/x-ndjson")

    @app.post("/nested/{depth}")
    async def nested(depth: int, request: Request, stream: bool = False) -> Response:
        """A valid answer whose attribute ``deep`` is ``depth`` arrays one in another, whole
        (JSON nested ``depth + 2`` levels: the body, ``attributes``) or, with ``?stream=1``,
        as the Response line of an NDJSON answer (``depth + 3`` levels: the line too)."""
        await body(request)
        deep = "[" * depth + "]" * depth
        answer = '{"items":[{"text":"deep"}],"attributes":{"deep":' + deep + "}}"
        if stream:
            line = '{"type":"Response","response":' + answer + "}\n"
            return Response(line, media_type="application/x-ndjson")
        return Response(answer, media_type="application/json")

    @app.post("/stream-no-response")
    async def stream_no_response(request: Request) -> Response:
        await body(request)
        line = json.dumps({"type": "ResponseItem", "responseItem": {"text": "only"}}) + "\n"
        return Response(line, media_type="application/x-ndjson")

    @app.post("/said-then-fails")
    async def said_then_fails(request: Request) -> Response:
        # a sentence streamed, then the stream ends without its Response: the turn fails;
        # the #error turn is answered
        text = (await body(request))["input"]["transcript"]["text"]
        if text == "#error":
            return JSONResponse({"items": [{"text": "sorry, the core tripped"}]})
        line = json.dumps({"type": "ResponseItem", "responseItem": {"text": "Let me look."}})
        return Response(line + "\n", media_type="application/x-ndjson")

    @app.post("/stream-unknown")
    async def stream_unknown(request: Request) -> Response:
        await body(request)
        return Response('{"type":"Mystery"}\n', media_type="application/x-ndjson")

    return app


class WebhookCore:
    """A real core webhook (the pipeline contract) whose answers a subclass gives in
    :meth:`answer`: every POSTed PipelineRequest body goes on :attr:`requests` first;
    :attr:`release` is the event slow answers wait for (set on leaving :meth:`running`)."""

    RECV_LIMIT_S = 15.0

    def __init__(self) -> None:
        self.requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.release = asyncio.Event()
        self.app = FastAPI()

        @self.app.post("/turn", response_model=None)
        async def turn(request: Request) -> Any:
            body: dict[str, Any] = await request.json()
            await self.requests.put(body)
            return await self.answer(body)

    async def answer(self, body: dict[str, Any]) -> Any:
        """The answer to one PipelineRequest ``body`` (a JSON-able dict or a Response)."""
        raise NotImplementedError

    async def next_request(self) -> dict[str, Any]:
        """The next request the core received (TimeoutError after RECV_LIMIT_S s)."""
        async with asyncio.timeout(self.RECV_LIMIT_S):
            return await self.requests.get()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve the core; yields its webhook URL. Releases every waiting answer on exit."""
        from tests.conftest import serve

        async with serve(self.app) as url:
            try:
                yield f"{url}/turn"
            finally:
                self.release.set()
