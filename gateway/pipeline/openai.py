"""The ``openai`` pipeline: an LLM behind any OpenAI-compatible chat completions server.

Spec: shared/specs/CORES.md, "OpenAI-compatible Chat Completions (as an LLM core)".
``GATEWAY_PIPELINE=openai+https://host/v1`` (or ``openai+http://`` for a local server
such as vLLM, llama.cpp or Ollama); settings ``GATEWAY_OPENAI_*``.

Each turn is ``POST <base>/chat/completions`` with ``Authorization: Bearer <key>``,
``{"model", "messages": [system, history..., user], "stream": true,
"stream_options": {"include_usage": true}, "temperature"?, "max_tokens"?, "tools"?,
"tool_choice": "auto"}``. The answer is read as server-sent events:

- ``data: {chunk}``: ``choices[0].delta.content`` is accumulated and cut into items at
  sentence boundaries (:mod:`gateway.pipeline.sentences`), each forwarded as soon as it
  is complete, so a phone call speaks the first sentence while the model still writes;
  ``delta.tool_calls`` are accumulated by ``index`` (a name sent whole again in a
  later delta, as some servers do, is not appended; nor does a fresh id sent with it
  in every delta split the call: :func:`_another`); a ``finish_reason`` neither null
  nor ``""`` (which some servers send in every chunk before the last) ends the turn:
  the last sentence is forwarded at once, then the rest of the stream (usage chunk,
  ``[DONE]``) is read for at most :data:`DRAIN_S`, so the connection is reused.
- tolerated variations: a usage chunk with ``choices: []``, ``choices: null`` or no
  ``choices``; ``:`` comment (keepalive) lines; ``data:`` without the space; a
  server that ignores ``stream`` and answers one ``application/json`` completion (a body
  whose first character after JSON white space is ``{`` or ``[``); an event stream
  labelled ``application/json`` (a body that begins otherwise: ``data:``, ``:``,
  ``event:``), as some servers and proxies send it, read as the event stream it is, as
  openai-python reads it (before, ``... answered no chat completion``).
- ``data: [DONE]`` ends the stream; ``event: error``, or a data object with an
  ``error`` key, is a PipelineError. Another Content-Type than ``application/json`` is
  read as an event stream (as openai-python does, whatever it says); one that holds no
  event and is not ``text/event-stream`` (a web page answered 200 at the configured
  URL) is the PipelineError ``... answered no event stream`` (its type logged).
- the last event of a stream the server closed without the blank line that ends an
  event (``data: [DONE]`` or the final chunk, then the end of the body: llama-server
  builds, proxies) is taken when it is whole: ``[DONE]``, or data that is a whole JSON
  object. One cut off mid-JSON is discarded, as WHATWG HTML's event stream
  interpretation discards every unended event (openai-python discards even a whole
  one, and reports no error; openai-node takes it since openai/openai-node#2725), so a
  stream cut short before its ``finish_reason`` and ``[DONE]`` still fails the turn
  (``... stream ended without a finish_reason or [DONE] (its last event cut off)``).

Errors the server reports (a non-2xx status, an error in the stream or body) are
PipelineErrors whose text is fixed (``the OpenAI-compatible core answered HTTP 401``,
``... streamed an error``): the server's own message, which a proxy in front of the
model may fill with the API key or internal details, goes only to the log (WARNING,
redacted, cut; :func:`gateway.pipeline.cores.check_status`,
:func:`~gateway.pipeline.cores.core_failed`).

Tools (sent when GATEWAY_OPENAI_TOOLS is on): ``end_session`` (no arguments) ends the
session after the answer (``Response.session_ended``); ``transfer`` (``{"reason"}``),
offered only when GATEWAY_OPENAI_TRANSFER_TARGET is set, hands the conversation over
to that target with :func:`gateway.events.transfer_item` (the model never chooses
the number). Other tool names are ignored, named in one WARNING line per turn.

Inputs: the transcript is the user message; the actions ``#intro`` and ``#silence``
(and any other ``#action``) become bracketed notes, :data:`ACTION_MESSAGES`.
History: ``session.pipeline_state["messages"]``, the user and assistant messages of
the past turns, at most GATEWAY_OPENAI_MAX_HISTORY (oldest dropped first, never
starting with an assistant message); it is saved by the turn engine only when the
turn succeeds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final, Self
from urllib.parse import urlsplit

import httpx

from gateway.events import INTRO, SILENCE, Input, Response, ResponseItem, transfer_item
from gateway.pipeline.base import PipelineConfigError, PipelineError, PipelineOutput, shown_spec
from gateway.pipeline.cores import (
    DEFAULT_RETRY,
    DROPPED_CHARS,
    PooledCore,
    RetryPolicy,
    SseEvent,
    body_chunks,
    bounded_lines,
    check_status,
    core_failed,
    core_json,
    core_stream,
    iter_sse,
    pooled_client,
    talking_to,
)
from gateway.pipeline.sentences import SentenceSplitter
from gateway.protocol import clipped, media_type
from gateway.sessions import Session
from gateway.settings import Settings

KIND = "OpenAI-compatible"
"""How errors name this core (``the OpenAI-compatible core answered HTTP 401``)."""

log = logging.getLogger(__name__)

MAX_HISTORY_BYTES: Final = 131_072
"""Most UTF-8 bytes of message contents the history saved in a session keeps (the oldest
messages go first), beside ``GATEWAY_OPENAI_MAX_HISTORY`` messages: a count alone let 20
messages of up to a request body or a core answer each (1 MiB) make a 20 MB session,
loaded, sent to the model and saved on every turn."""

DRAIN_S = 1.0
"""After ``finish_reason``, how long the rest of the stream (usage chunk, ``[DONE]``) is read."""

ACTION_MESSAGES = {
    INTRO: "[The caller has just joined the conversation. Greet them.]",
    SILENCE: "[The caller said nothing for a while.]",
}
"""User messages sent for action inputs; another ``#name`` becomes ``[Event: name]``."""

END_SESSION_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "end_session",
        "description": "End the conversation after this answer, when the user says goodbye "
        "or nothing is left to do. Say your goodbye in the same answer.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
TRANSFER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "transfer",
        "description": "Hand the conversation over to a human agent, when the user asks "
        "for a person or you cannot help. Tell the user before you call it.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Why, in a few words."}},
            "required": ["reason"],
            "additionalProperties": False,
        },
    },
}


@dataclass
class _ToolCall:
    name: str = ""
    arguments: str = ""
    id: str = ""
    deltas: int = 0
    bare: bool = False
    """A delta of it came without an id (so its server sends the id in the first only)."""


@dataclass
class _Turn:
    """What one streamed answer has given so far."""

    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    text: list[str] = field(default_factory=list)
    tools: dict[int, _ToolCall] = field(default_factory=dict)
    latest: dict[int, int] = field(default_factory=dict)
    """A wire ``index`` -> the key in ``tools`` of the latest call that came at it (a call
    split off by its id, :func:`_add_tool_delta`, takes a key no wire index takes)."""
    lowest: int = 0
    """The lowest key in ``tools``, or 0: a call split off takes the one below (the min of
    the keys taken at each split made a stream of calls at one index quadratic)."""
    finish_reason: str | None = None
    done: bool = False


class OpenAIPipeline(PooledCore):
    """An OpenAI-compatible chat completions server as the core (see the module doc).

    ``base_url`` is the API base (``https://api.openai.com/v1``); ``connect_timeout_s``
    bounds connecting, the turn engine the whole turn; ``retry`` (a
    :class:`~gateway.pipeline.cores.RetryPolicy`: GATEWAY_PIPELINE_RETRIES and its
    limits) says how a request the core refused unprocessed is sent again. Raises
    PipelineError when the server cannot be reached, answers non-2xx, streams an error,
    answers more than ``max_response_bytes`` or something that is not a chat completion.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        system_prompt: str = "",
        max_history: int = 20,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: bool = True,
        transfer_target: str | None = None,
        connect_timeout_s: float = 3.0,
        max_response_bytes: int = 1_048_576,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.system_prompt = system_prompt
        self.max_history = max_history
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.transfer_target = transfer_target
        self.tools: list[dict[str, Any]] = []
        if tools:
            self.tools.append(END_SESSION_TOOL)
            if transfer_target:
                self.tools.append(TRANSFER_TOOL)
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._secrets = (api_key,)  # hidden in the logged detail of the server's errors
        self._max = max_response_bytes
        self._retry = retry
        self._client = client or pooled_client(connect_timeout_s)

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The pipeline of ``GATEWAY_PIPELINE=openai+https://host/v1`` (or ``openai+http://``;
        the scheme in any case, as RFC 3986 section 3.1 has it).

        Raises PipelineConfigError naming the setting: a malformed spec
        (GATEWAY_PIPELINE), no GATEWAY_OPENAI_MODEL, or no GATEWAY_OPENAI_API_KEY
        for an ``openai+https://`` server (plain-http local servers may need none).
        """
        scheme, sep, rest = spec.strip().partition("+")
        url = rest.strip()
        parts = urlsplit(url)  # its scheme lower-cased: schemes are case-insensitive
        url = parts.scheme + url[len(parts.scheme) :]
        ours = sep and scheme.lower() == "openai" and parts.scheme in ("http", "https")
        if not ours or not parts.hostname or parts.query or parts.fragment:
            raise PipelineConfigError(
                f"GATEWAY_PIPELINE {shown_spec(spec)!r} is not an OpenAI-compatible server: "
                "expected openai+https://host/v1 or openai+http://host:port/v1"
            )
        if not settings.openai_model:
            raise PipelineConfigError(
                "GATEWAY_OPENAI_MODEL must name the model of the openai+ pipeline"
            )
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        if parts.scheme == "https" and not key:
            raise PipelineConfigError(
                "GATEWAY_OPENAI_API_KEY must be set for an openai+https:// pipeline"
            )
        return cls(
            url,
            model=settings.openai_model,
            api_key=key,
            system_prompt=settings.openai_system_prompt,
            max_history=settings.openai_max_history,
            temperature=settings.openai_temperature,
            max_tokens=settings.openai_max_tokens,
            tools=settings.openai_tools,
            transfer_target=settings.openai_transfer_target,
            connect_timeout_s=settings.pipeline_connect_timeout_s,
            max_response_bytes=settings.pipeline_max_response_bytes,
            retry=RetryPolicy.of(settings),
        )

    # ------------------------------------------------------------------ the turn

    def request_body(self, history: list[dict[str, Any]], user: str) -> dict[str, Any]:
        """The chat completions request of a turn: system prompt, ``history``, ``user``."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*system, *history, {"role": "user", "content": user}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        optional = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        body |= {key: value for key, value in optional.items() if value is not None}
        if self.tools:
            body["tools"] = self.tools
            body["tool_choice"] = "auto"
        return body

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        history = _history(session.pipeline_state)
        user = user_message(input)
        body = self.request_body(history, user)
        turn = _Turn()
        with talking_to(f"the {KIND} core"):
            async with core_stream(
                self._client,
                "POST",
                self.url,
                core=f"the {KIND} core",
                label=self.name,
                retry=self._retry,
                json=body,
                headers=self._headers,
            ) as answer:
                await check_status(answer, f"the {KIND} core", self._secrets, _error_text)
                kind = media_type(answer.headers.get("content-type"))
                chunks: AsyncIterator[bytes] | None = None
                if kind == "application/json":
                    chunks = body_chunks(answer, self._max, f"the {KIND} core")
                    head = await _head(chunks)
                    if head.lstrip(_JSON_SPACE)[:1] in (b"{", b"[", b""):
                        data = head + b"".join([chunk async for chunk in chunks])
                        for item in self._whole(turn, data):
                            yield item
                        chunks = None
                    else:  # an event stream labelled JSON (read as openai-python does)
                        chunks = _prepended(head, chunks)
                if chunks is not None or kind != "application/json":
                    async for item in self._stream(turn, answer, chunks):
                        yield item
        yield self._finish(session, history, user, turn)

    async def _stream(
        self, turn: _Turn, answer: httpx.Response, chunks: AsyncIterator[bytes] | None = None
    ) -> AsyncIterator[ResponseItem]:
        lines = bounded_lines(answer, self._max, f"the {KIND} core", blank=True, chunks=chunks)
        events = iter_sse(lines, incomplete=True)
        heard = cut = False
        async for event in events:
            if not event.complete and not _whole(event.data):
                cut = True  # the stream's last event, cut off: discarded
                break
            heard = True
            for item in self._event(turn, event):
                yield item
            if turn.done or turn.finish_reason is not None:
                break
        kind = media_type(answer.headers.get("content-type"))
        if not heard and kind != "text/event-stream":
            # a page (a web UI or proxy at the configured URL answering 200), not a stream
            raise core_failed(KIND, "answered no event stream", f"its Content-Type is {kind!r}")
        if not turn.done and turn.finish_reason is None:
            why = " (its last event cut off)" if cut else ""
            raise PipelineError(
                f"the {KIND} core's stream ended without a finish_reason or [DONE]{why}"
            )
        tail = turn.splitter.flush()
        if tail:
            yield ResponseItem(text=tail)  # the last sentence is not kept waiting for [DONE]
        try:  # read the rest (usage chunk, [DONE]) so the connection goes back to the pool
            async with asyncio.timeout(DRAIN_S):
                async for _ in events:
                    pass
        except (TimeoutError, PipelineError, httpx.HTTPError):
            pass

    def _event(self, turn: _Turn, event: SseEvent) -> list[ResponseItem]:
        data = event.data.strip()
        if event.event == "error":
            raise core_failed(KIND, "streamed an error", _error_text(data), self._secrets)
        if data.startswith("[DONE]"):
            turn.done = True
            return []
        if not data:
            return []  # an event with a type and no data (iter_sse)
        try:
            chunk = core_json(data)
        except ValueError as exc:
            raise PipelineError(f"the {KIND} core streamed a chunk that is not JSON") from exc
        if not isinstance(chunk, dict):
            raise PipelineError(f"the {KIND} core streamed a chunk that is not a JSON object")
        if chunk.get("error") is not None:
            raise core_failed(KIND, "streamed an error", _error_text(data), self._secrets)
        choices = chunk.get("choices") or []  # null / [] / absent in the usage chunk
        if not isinstance(choices, list):
            raise PipelineError(f"the {KIND} core streamed a chunk whose choices is not a list")
        items: list[ResponseItem] = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise PipelineError(
                    f"the {KIND} core streamed a choice whose delta is not an object"
                )
            content = delta.get("content")
            if isinstance(content, str) and content:
                turn.text.append(content)
                items += [ResponseItem(text=s) for s in turn.splitter.feed(content)]
            calls = delta.get("tool_calls") or []
            if not isinstance(calls, list):
                raise PipelineError(
                    f"the {KIND} core streamed a delta whose tool_calls is not a list"
                )
            for call in calls:
                _add_tool_delta(turn, call)
            reason = choice.get("finish_reason")
            if reason is not None and reason != "":  # "": not finished (sglang, Ollama)
                turn.finish_reason = str(reason)
        return items

    def _whole(self, turn: _Turn, data: bytes) -> list[ResponseItem]:
        """The items of a non-streamed chat completion (a server that ignored ``stream``),
        its last sentence included."""
        try:
            whole = core_json(data)
            if whole.get("error") is not None:
                raise core_failed(
                    KIND, "answered an error", _error_text(data.decode()), self._secrets
                )
            message = whole["choices"][0]["message"]
            content = message.get("content") or ""
            calls = message.get("tool_calls") or []
            if (
                not isinstance(content, str)
                or not isinstance(calls, list)
                or not all(isinstance(call, dict) for call in calls)
            ):
                raise TypeError("content or tool_calls of the wrong type")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise PipelineError(f"the {KIND} core answered no chat completion") from exc
        for index, call in enumerate(calls):
            _add_tool_delta(turn, {"index": index, **call})
        turn.text.append(content)
        turn.finish_reason = str(whole["choices"][0].get("finish_reason") or "stop")
        sentences = [*turn.splitter.feed(content), turn.splitter.flush()]  # the last one too
        return [ResponseItem(text=s) for s in sentences if s]

    def _finish(
        self, session: Session, history: list[dict[str, Any]], user: str, turn: _Turn
    ) -> Response:
        items: list[ResponseItem] = []
        ended = False
        unknown: dict[str, None] = {}  # the names of the other tools called, once each
        for call in turn.tools.values():
            if call.name == "end_session":
                ended = True
            elif call.name == "transfer" and self.transfer_target:
                items.append(transfer_item(self.transfer_target, reason=_reason(call.arguments)))
            else:
                unknown[call.name[:60]] = None
        if unknown:  # one line a turn, not one a call (a stream of 10,000 calls)
            names = clipped(list(unknown), DROPPED_CHARS)
            log.warning("the %s core called unknown tools %s; ignored", KIND, names)
        said = "".join(turn.text).strip()
        if turn.finish_reason == "length":  # CORES.md: a finish_reason ends the turn
            log.warning(
                "the %s core's answer was cut at its max_tokens (finish_reason length): "
                "said and kept as it is (%d characters)",
                KIND,
                len(said),
            )
        if not said and not turn.tools:
            raise PipelineError(f"the {KIND} core's answer has neither content nor a tool call")
        messages = [*history, {"role": "user", "content": user}]
        if said:
            messages.append({"role": "assistant", "content": said})
        kept = _bounded(messages[-self.max_history :])
        session.pipeline_state = {**session.pipeline_state, "messages": kept}
        return Response(items=items, session_ended=ended)


def _bounded(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest of ``messages`` whose contents take at most :data:`MAX_HISTORY_BYTES`
    of UTF-8 (the oldest dropped first), never starting with an assistant message; empty
    when the newest alone is larger."""
    start, size = len(messages), 0
    while start > 0:
        size += len(messages[start - 1]["content"].encode("utf-8", "surrogatepass"))
        if size > MAX_HISTORY_BYTES:
            break
        start -= 1
    while start < len(messages) and messages[start].get("role") != "user":
        start += 1
    return messages[start:]


def user_message(input: Input) -> str:
    """The user message of ``input``: its transcript, or the note of its ``#action``."""
    if input.action:
        return ACTION_MESSAGES.get(input.action, f"[Event: {input.action.removeprefix('#')}]")
    return input.text


def _history(state: dict[str, Any]) -> list[dict[str, Any]]:
    messages = state.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        {"role": m["role"], "content": m["content"]}
        for m in messages
        if isinstance(m, dict)
        and m.get("role") in ("user", "assistant")
        and isinstance(m.get("content"), str)
    ]


def _add_tool_delta(turn: _Turn, call: Any) -> None:
    if not isinstance(call, dict):
        raise PipelineError(f"the {KIND} core streamed a tool call that is not an object")
    wire = call.get("index")
    if wire is None:  # left out (Ollama before 0.4.7): a delta of the latest call
        index = next(reversed(turn.tools), 0)
    elif not isinstance(wire, int):
        raise PipelineError(f"the {KIND} core streamed a tool call without an integer index")
    else:  # the latest call that came at this index (a later delta of a split-off call)
        index = turn.latest.get(wire, wire)
    acc = turn.tools.setdefault(index, _ToolCall())
    turn.lowest = min(turn.lowest, index)
    function = call.get("function") or {}
    if not isinstance(function, dict):
        raise PipelineError(f"the {KIND} core streamed a tool call whose function is not an object")
    name = function.get("name")
    call_id = call.get("id")
    if isinstance(call_id, str) and call_id:
        if acc.id and call_id != acc.id and isinstance(name, str) and name and _another(acc, name):
            # another call's first delta (its id and name) where one is: a call of its own
            # (Ollama sends parallel calls whole at index 0 or with none); a new id
            # without a name continues the call (servers whose ids change mid-call)
            index = turn.lowest = turn.lowest - 1  # a key no wire index took
            acc = turn.tools[index] = _ToolCall()
            if isinstance(wire, int):  # its next deltas at this index are its own
                turn.latest[wire] = index
        acc.id = acc.id or call_id
    else:
        acc.bare = True
    acc.deltas += 1
    if isinstance(name, str) and name != acc.name:
        # the name comes in the first delta (or split over a few); some servers (MiniMax
        # via NVIDIA NIM, proxies) send it whole again in every delta: not appended twice
        acc.name += name
    if isinstance(function.get("arguments"), str):
        acc.arguments += function["arguments"]


def _another(acc: _ToolCall, name: str) -> bool:
    """Whether a delta with another id than ``acc``'s and the tool ``name`` starts a call
    of its own rather than continuing ``acc``: another tool; or ``acc``'s server sent a
    delta without an id (ids only in first deltas: this is a new one); or ``acc`` came
    whole in one delta (Ollama's parallel calls). Otherwise (every delta with an id, and
    the same name) it is a server that makes a fresh id for every delta of one call (as
    mlx-openai-server did before cubist38/mlx-openai-server#216): the call goes on.
    Only a call's first delta's arguments are parsed: each character once at most."""
    if name != acc.name or acc.bare:
        return True
    if acc.deltas > 1:
        return False
    try:
        core_json(acc.arguments)
    except ValueError:
        return False
    return True


def _reason(arguments: str) -> str | None:
    try:
        reason = core_json(arguments or "{}").get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) and reason else None


_JSON_SPACE = b" \t\r\n"
"""JSON's white space (RFC 8259, section 2), which may come before a completion's ``{``."""


async def _head(chunks: AsyncIterator[bytes]) -> bytes:
    """The first bytes of ``chunks``: up to and with the first chunk holding something
    else than JSON white space (all of them when none does)."""
    head = bytearray()
    async for chunk in chunks:
        head += chunk
        if chunk.lstrip(_JSON_SPACE):  # not the whole head: linear in a trickled body
            break
    return bytes(head)


async def _prepended(head: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``head``, then the rest of ``chunks``."""
    yield head
    async for chunk in chunks:
        yield chunk


def _whole(data: str) -> bool:
    """Whether the ``data`` of a stream's unended last event is whole: ``[DONE]``, or a
    JSON object (a chunk cut off anywhere is no JSON text: its closing brace is last)."""
    data = data.strip()
    if data == "[DONE]":
        return True
    try:
        return isinstance(core_json(data), dict)
    except ValueError:
        return False


def _error_text(data: str | bytes) -> str:
    """The ``error.message`` of an OpenAI error body (bytes decoded as UTF-8, bad ones
    replaced), else the body, on one line (for the log: :func:`gateway.pipeline.cores.log_detail`
    redacts and cuts it)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    try:
        body = core_json(data)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return " ".join(message.split())
    except ValueError:
        pass
    return " ".join(data.split())
