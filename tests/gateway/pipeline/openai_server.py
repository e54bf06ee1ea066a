"""A small OpenAI-compatible chat completions server for tests (a real FastAPI app).

It speaks the contract of shared/specs/CORES.md ("OpenAI-compatible Chat Completions"):
``POST /<mode>/v1/chat/completions`` with ``Authorization: Bearer <KEY>``; with
``"stream": true`` it answers server-sent events ``data: {chunk}`` (content in small
deltas), a ``finish_reason`` chunk, the usage chunk when ``stream_options.include_usage``
and ``data: [DONE]``, with the known variations of real servers: a ``:`` keepalive
comment first, ``data:`` without its space (llama.cpp style), the usage chunk with
``choices: null`` (vLLM) in mode ``vllm``, ``finish_reason: ""`` (not null) in every chunk
before the last in mode ``empty-finish`` (sglang before 0.4.4, Ollama in 2024).

Its "model" is scripted on the last user message (see :func:`reply`); the ``<mode>``
path segment picks a failure: ``status-500``, ``status-429``, ``event-error``,
``error-data``, ``slow``, ``garbage``, ``truncated``, ``json`` (ignores ``stream``),
``json-labelled`` (the event stream with ``Content-Type: application/json``),
``empty``, ``html`` (200 with a web page), ``tools-number`` (a delta whose ``tool_calls`` are a number), ``deep`` (a chunk
nested 50,000 levels deep), ``deep-json`` (such a
non-streamed body), ``bad-tools`` (a completion whose ``tool_calls`` are strings), ``crash`` (the
connection dropped mid-stream), ``names-again`` (a tool call's whole name repeated in each of
its deltas, as some servers send it; ``ids-again`` with its id too, ``fresh-ids`` with a
new id each time, ``fresh-ids-no-index`` and no ``index``), ``interleaved`` (the deltas of parallel tool calls
interleaved, told apart by their ``index`` only), ``no-index`` (tool call deltas without
``index``), ``index-0`` (as streamed, all at ``index`` 0), ``ollama`` (each tool call
whole in one delta, all at ``index`` 0), ``unended-<how>`` (the stream's last event
without the blank line that ends it, the server closing right after it: ``-last`` the
finish chunk, then ``\n`` and no ``[DONE]``; ``-last-bare`` without the ``\n``; ``-done``
no finish_reason in any chunk, then ``data: [DONE]\n``; ``-done-bare`` without the
``\n``; ``-cut`` the finish chunk cut off mid-JSON), ``length`` (the answer ends with
``finish_reason: "length"``, cut at max_tokens; ``length-json`` not streamed), ``echo-401`` (401 with a message echoing the Authorization header
and the key, as a careless proxy might). ``app.state.requests`` keeps each request body (``ports`` its client port, ``received_at`` when it came); ``app.state.gap_s`` is a
pause after the first sentence (the model "thinking" on), cut short when the
``asyncio.Event`` ``app.state.release`` (None: no event) is set, so a test can hold the
answer until it has seen what it waits for, however slow the machine;
``app.state.sent_all_at`` when the last content delta was written (``time.monotonic()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from itertools import zip_longest
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.gateway.core_app import DEEP

KEY = "sk-test-0123456789"
LOWER_CASE = "sure. i can do that. " * 500
"""The answer to a message asking for one ``in lower case`` (10,500 characters)."""
POINTS = "Wait" + "." * 2_000 + " " * 2_000 + "Done."
"""The answer to a message asking for one ``in points``: a model repeating a point, then
white space (two sentences, ``Wait....`` and ``Done.``)."""


def reply(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The scripted model: (content, tool calls) for a conversation."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    last = users[-1]
    if last.startswith("[The caller has just joined"):
        return "Hello, this is the front desk of the city museum. How can I help you today?", []
    if last.startswith("[The caller said nothing"):
        return "Are you still there?", []
    if "what did i say" in last.lower():
        before = users[-2] if len(users) > 1 else "nothing"
        return f"You said: {before}. Anything else?", []
    if "hand me over and bye" in last.lower():  # two tool calls in one answer
        return "Connecting you. Goodbye.", [
            _tool("transfer", {"reason": "caller asked for a person"}),
            _tool("end_session", {}),
        ]
    if "bye" in last.lower():
        return "Goodbye, have a nice day.", [_tool("end_session", {})]
    if "person" in last.lower():
        return "Let me connect you.", [_tool("transfer", {"reason": "caller asked for a person"})]
    if "silent tool" in last.lower():
        return "", [_tool("end_session", {})]
    if "in lower case" in last.lower():  # no sentence ends: a point, then lower case
        return LOWER_CASE, []
    if "in points" in last.lower():
        return POINTS, []
    if last.startswith("call tools "):  # "call tools <n>": n calls of tools lookup_<i>
        return "", [_tool(f"lookup_{n}", {}) for n in range(int(last.split()[2]))]
    return (
        f"You said {last}. The price is 3.5 dollars, e.g. cheap. Is there anything else?",
        [],
    )


def _tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}  # fmt: skip


def make_openai_server() -> FastAPI:
    """The server app (see the module doc)."""
    app = FastAPI()
    app.state.requests = []
    app.state.ports = []
    app.state.received_at = []
    app.state.gap_s = 0.0
    app.state.release = None
    app.state.sent_all_at = None

    @app.post("/{mode}/v1/chat/completions")
    async def completions(mode: str, request: Request) -> Response:
        if mode == "echo-401":  # a proxy that tells all it knows in its error message
            said = request.headers.get("authorization")
            return _error(401, f"Upstream refused {said} (key {KEY}) at 10.0.0.7", "auth")
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        body = await request.json()
        app.state.received_at.append(time.monotonic())
        app.state.requests.append(body)
        app.state.ports.append(request.client.port if request.client else None)
        if mode.startswith("status-"):
            code = int(mode.removeprefix("status-"))
            return _error(code, "Rate limit reached" if code == 429 else "Server error", "x")
        if mode == "slow":
            await asyncio.sleep(1.5)
        if mode == "html":  # a web UI at the configured URL: 200, a page
            return Response("<!doctype html><html><body>Chat UI</body></html>", media_type="text/html")  # fmt: skip
        if mode == "deep-json":
            return Response(DEEP, media_type="application/json")
        if mode == "bad-tools":  # a completion whose tool_calls are not objects
            bad = _completion("Hello.", [], body["model"])
            bad["choices"][0]["message"]["tool_calls"] = ["end_session"]
            return JSONResponse(bad)
        content, tools = reply(body["messages"])
        if mode in ("json", "length-json") or not body.get("stream"):
            whole = _completion(content, tools, body["model"])
            if mode == "length-json":
                whole["choices"][0]["finish_reason"] = "length"
            return JSONResponse(whole)
        # json-labelled: the event stream labelled application/json (servers, proxies)
        kind = "application/json" if mode == "json-labelled" else "text/event-stream"
        return StreamingResponse(_stream(app, mode, body, content, tools), media_type=kind)

    return app


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _completion(content: str, tools: list[dict[str, Any]], model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if tools:
        message["tool_calls"] = tools
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


async def _stream(
    app: FastAPI, mode: str, body: dict[str, Any], content: str, tools: list[dict[str, Any]]
) -> AsyncIterator[bytes]:
    model = body["model"]

    def data(obj: Any, space: bool = True) -> bytes:
        text = obj if isinstance(obj, str) else json.dumps(obj)
        return f"data:{' ' if space else ''}{text}\n\n".encode()

    # "" in every chunk before the last, not null (sglang before 0.4.4, Ollama 0.1.3x, Sensenova)
    unfinished = "" if mode == "empty-finish" else None
    yield b": keepalive\n\n"
    yield data(_chunk(model, {"role": "assistant", "content": ""}, unfinished))
    if mode == "garbage":
        yield b"data: {not json\n\n"
        return
    if mode == "deep":
        yield data(DEEP)
        return
    if mode == "empty":
        yield data(_chunk(model, {}, "stop"))
        yield data("[DONE]")
        return
    if mode == "tools-number":  # a delta whose tool_calls are a number
        yield data(_chunk(model, {"tool_calls": 2}, "tool_calls"))
        yield data("[DONE]")
        return
    boundary = re.search(r"[.!?]\s\S", content)  # the first sentence and the next letter
    pause_at = boundary.end() if boundary else -1
    pieces = [content[i : i + 4] for i in range(0, len(content), 4)]
    written = 0
    for n, piece in enumerate(pieces):
        yield data(_chunk(model, {"content": piece}, unfinished), space=n % 2 == 0)
        written += len(piece)
        if mode == "event-error" and n == 3:
            yield b'event: error\ndata: {"error":{"message":"The model is overloaded"}}\n\n'
            return
        if mode == "error-data" and n == 3:
            yield data({"error": {"message": "context length exceeded", "code": 400}})
            return
        if mode == "truncated" and n == 3:
            return
        if mode == "crash" and n == 3:  # the connection dropped, the body not ended
            raise RuntimeError("the model server crashed")
        if written - len(piece) < pause_at <= written:
            release: asyncio.Event | None = app.state.release
            with contextlib.suppress(TimeoutError):  # the model keeps "thinking"
                await asyncio.wait_for(
                    release.wait() if release else asyncio.sleep(app.state.gap_s),
                    app.state.gap_s,
                )
        await asyncio.sleep(0)
    app.state.sent_all_at = time.monotonic()
    calls: list[list[dict[str, Any]]] = []  # each call's deltas
    for index, call in enumerate(tools):
        args = call["function"]["arguments"]
        head = {"index": index, "id": call["id"], "type": "function"}
        deltas = [{**head, "function": {"name": call["function"]["name"], "arguments": ""}}]
        for i in range(0, len(args), 5):
            function = {"arguments": args[i : i + 5]}
            if mode in ("names-again", "ids-again") or mode.startswith("fresh-ids"):
                # the whole name again in every delta (MiniMax via NIM), with the id too
                function = {"name": call["function"]["name"], **function}
            delta: dict[str, Any] = {"index": index, "function": function}
            if mode == "ids-again":  # the call's id again in every delta
                delta["id"] = call["id"]
            if mode.startswith("fresh-ids"):  # a fresh id in every delta (mlx-openai-server did)
                delta["id"] = f"{call['id']}_{i}"
            deltas.append(delta)
        calls.append(deltas)
    if mode == "interleaved":  # one delta of each call in turn
        calls = [[d for turn in zip_longest(*calls) for d in turn if d is not None]]
    if mode.endswith("no-index"):  # the deltas without their index
        calls = [[{k: v for k, v in d.items() if k != "index"} for d in ds] for ds in calls]
    if mode == "index-0":  # the deltas of every call streamed in pieces, all at index 0
        calls = [[{**d, "index": 0} for d in ds] for ds in calls]
    if mode == "ollama":  # each call whole in one delta, every one at index 0
        calls = [[{**call, "index": 0}] for call in tools]
    for deltas in calls:
        for delta in deltas:
            yield data(_chunk(model, {"tool_calls": [delta]}, unfinished))
    if mode.startswith("unended-"):  # the last event without its blank line, then the end
        how = mode.removeprefix("unended-")
        end = b"" if how.endswith("-bare") else b"\n"
        last = data(_chunk(model, {}, "tool_calls" if tools else "stop")).removesuffix(b"\n\n")
        if how.startswith("done"):
            last = b"data: [DONE]"
        yield last[:-20] if how == "cut" else last + end
        return
    finish = "length" if mode == "length" else "tool_calls" if tools else "stop"
    yield data(_chunk(model, {}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
        usage_chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model}
        usage_chunk["choices"] = None if mode == "vllm" else []
        yield data({**usage_chunk, "usage": usage})
    yield b": keepalive\n\n"
    yield data("[DONE]")
