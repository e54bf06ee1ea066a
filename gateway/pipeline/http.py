"""The ``http`` pipeline: each turn is POSTed to the user's core as JSON (the webhook contract).

Contract (also in README.md and in the OpenAPI document under ``webhooks``):

- Request: ``POST <GATEWAY_PIPELINE>`` with ``Content-Type: application/json``,
  ``Accept: application/x-ndjson, application/json`` and ``X-Request-Id``; the body
  is a :class:`PipelineRequest`.
- Answer, either
  - ``application/json``: one :class:`PipelineResponse` (a Flowstorm Response,
    plus an optional ``state`` object), or
  - ``application/x-ndjson`` (also ``application/jsonl``; or ``application/json-seq``,
    RFC 7464, whose records begin with RS and may span lines: :func:`json_seq_records`):
    one JSON event per line (record), any number of
    ``{"type":"ResponseItem","responseItem":{...}}`` (forwarded to the client as
    each line arrives), then ``{"type":"Response","response":{...},"state":{...}}``.
- ``response.attributes`` are merged into the session's attributes; ``state``,
  when present, replaces the pipeline's stored state and comes back in the next
  request. Any other status than 2xx, a body over GATEWAY_PIPELINE_MAX_RESPONSE_BYTES,
  invalid JSON (also JSON nested deeper than :data:`gateway.protocol.MAX_JSON_DEPTH`, read
  by :func:`~gateway.pipeline.cores.core_json` whether whole or streamed) or a stream
  without a Response is a PipelineError.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import httpx
from pydantic import Field, ValidationError

from gateway.events import Input, Response, ResponseItem, Wire
from gateway.pipeline.base import REQUEST_ID, PipelineConfigError, PipelineError, PipelineOutput
from gateway.pipeline.cores import (
    DEFAULT_RETRY,
    PooledCore,
    RetryPolicy,
    bounded_lines,
    check_status,
    core_json,
    core_stream,
    pooled_client,
    read_body,
    talking_to,
)
from gateway.protocol import media_type
from gateway.sessions import Session
from gateway.settings import Settings


class PipelineRequest(Wire):
    """Body of the webhook request: one turn of one session."""

    session_id: str
    channel: str
    app_key: str
    device_id: str | None = None
    locale: str
    time_zone: str
    turn: int = Field(description="1 for the first turn of the session")
    input: Input
    attributes: dict[str, Any] = Field(default_factory=dict)
    state: dict[str, Any] = Field(
        default_factory=dict, description="what the core returned as `state` last turn"
    )


class PipelineResponse(Response):
    """A Flowstorm Response, plus the core's own ``state`` to keep with the session."""

    state: dict[str, Any] | None = None


class PipelineItemLine(Wire):
    """One NDJSON line of a streamed answer carrying a response item."""

    type: Literal["ResponseItem", "ResponseItemEvent"]
    response_item: ResponseItem


class PipelineResponseLine(Wire):
    """The last NDJSON line of a streamed answer."""

    type: Literal["Response", "ResponseEvent"]
    response: Response
    state: dict[str, Any] | None = None


class HttpPipeline(PooledCore):
    """Forwards turns to a core webhook (GATEWAY_PIPELINE=http(s)://...).

    ``connect_timeout_s`` bounds connecting; the turn engine bounds the whole
    turn. ``retry`` (a :class:`~gateway.pipeline.cores.RetryPolicy`:
    GATEWAY_PIPELINE_RETRIES and its limits) says how a request the core refused
    unprocessed is sent again. Raises PipelineError on connection errors, non-2xx
    answers, answers over ``max_response_bytes`` and answers that break the contract
    above.
    """

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 3.0,
        max_response_bytes: int = 1_048_576,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self._max = max_response_bytes
        self._retry = retry
        self._client = client or pooled_client(connect_timeout_s)

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The webhook at ``spec`` (an http(s):// URL), with the GATEWAY_PIPELINE_* limits.

        Raises PipelineConfigError when the URL has no host, or a port that is not a
        number from 1 to 65535.
        """
        parts = urlsplit(spec)
        if not parts.hostname:
            raise PipelineConfigError("the webhook URL has no host")
        try:
            port = parts.port
        except ValueError as exc:  # not a number, or past 65535
            raise PipelineConfigError(f"the webhook URL's port: {exc}") from None
        if port == 0:
            raise PipelineConfigError("the webhook URL's port is 0")
        return cls(
            spec,
            connect_timeout_s=settings.pipeline_connect_timeout_s,
            max_response_bytes=settings.pipeline_max_response_bytes,
            retry=RetryPolicy.of(settings),
        )

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        body = PipelineRequest(
            session_id=session.id,
            channel=session.channel,
            app_key=session.app_key,
            device_id=session.device_id,
            locale=input.locale or session.locale,
            time_zone=input.zone_id or session.time_zone,
            turn=session.turn_count + 1,
            input=input,
            attributes=session.attributes,
            state=session.pipeline_state,
        ).wire_json()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/x-ndjson, application/json",
            "X-Request-Id": REQUEST_ID.get() or uuid.uuid4().hex,
        }
        with talking_to("the core"):
            async with core_stream(
                self._client,
                "POST",
                self.url,
                core="the core",
                label=self.name,
                retry=self._retry,
                content=body,
                headers=headers,
            ) as answer:
                await check_status(answer, "the core")
                kind = media_type(answer.headers.get("content-type"))
                if kind in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
                    async for out in self._stream(session, answer, kind):
                        yield out
                    return
                data = await read_body(answer, self._max, "the core")
        try:  # bounded as every core's JSON (core_json), then validated: as a streamed line
            whole = PipelineResponse.model_validate(core_json(data))
        except (ValueError, ValidationError) as exc:
            raise PipelineError(f"the core answered an invalid Response: {_first(exc)}") from exc
        yield self._apply(session, whole, whole.state)

    async def _stream(
        self, session: Session, answer: httpx.Response, media: str
    ) -> AsyncIterator[PipelineOutput]:
        seq = media == "application/json-seq"
        # (json-seq with its blank lines: Python's str.strip counts RS as white space, and
        # a line that is only RS, then the text on the next, still separates records)
        lines = bounded_lines(answer, self._max, "the core", blank=seq)
        texts = json_seq_records(lines) if seq else lines
        async for text in texts:
            try:
                raw = core_json(text)
                kind = raw.get("type") if isinstance(raw, dict) else None
                if kind in ("ResponseItem", "ResponseItemEvent"):
                    yield PipelineItemLine.model_validate(raw).response_item
                    continue
                if kind in ("Response", "ResponseEvent"):
                    last = PipelineResponseLine.model_validate(raw)
                    yield self._apply(session, last.response, last.state)
                    return
            except (ValueError, ValidationError) as exc:
                raise PipelineError(f"the core streamed an invalid line: {_first(exc)}") from exc
            raise PipelineError(f"the core streamed an unknown event type {kind!r}")
        raise PipelineError("the core's stream ended without a Response")

    @staticmethod
    def _apply(session: Session, response: Response, state: dict[str, Any] | None) -> Response:
        session.attributes.update(response.attributes)
        if state is not None:
            session.pipeline_state = state
        return Response.model_validate(response.model_dump())


async def json_seq_records(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The JSON texts of an ``application/json-seq`` body (RFC 7464), given its
    ``lines`` (:func:`~gateway.pipeline.cores.bounded_lines` with ``blank``: a line that
    is only RS is blank to ``str.strip``, yet ends a record; blank lines are skipped here).

    A record runs from an RS (U+001E) to the next RS or the end of the body (section
    2.1: the parser splits at RS, not at line ends), so a JSON text written over several
    lines (pretty-printed: ``json.dumps(record, indent=2)``) is one record; before, each
    of its lines was read as a record of its own ("the core streamed an invalid line").
    Several RS in a row are one separator. A record is given as soon as it is known
    whole: at once when its first line is a whole JSON text (the usual one-line
    record), at a line that is only ``}`` or ``]`` (a pretty-printed text's last)
    when the text so far parses, else at the next RS or the end of the body; a
    record's text is tried at most once per doubling of its length (a core sending
    many ``}`` lines costs linear time, not quadratic). Text before the first RS is
    given as a record too (the caller refuses it as no JSON, or reads it if it is).
    """
    record: list[str] = []
    size = 0  # characters in record
    tried = 0  # its size when last tried early (0: not yet)

    def whole(text: str) -> bool:
        try:
            core_json(text)
        except ValueError:
            return False
        return True

    async for line in lines:
        first, *starts = line.split("\x1e")
        for piece, starting in ((first, False), *((s, True) for s in starts)):
            if starting and record:
                yield "\n".join(record)
                record, size, tried = [], 0, 0
            if not piece.strip():
                continue
            record.append(piece)
            size += len(piece) + 1
            closing = piece.rstrip() in ("}", "]")
            if (len(record) == 1 or closing) and size >= 2 * tried:
                tried = size
                text = "\n".join(record)
                if whole(text):
                    yield text
                    record, size, tried = [], 0, 0
    if record:
        yield "\n".join(record)


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc).splitlines()[0][:200]
