"""Flowstorm Socket V2 over HTTP: ``PUT /client`` (a turn) and ``GET /client`` (interim results).

Thin I/O around :mod:`adapters.flowstorm_v2.protocol`; turns go through the turn
engine. Errors answer in the request's own format: a ``!`` line for
``text/plain``, an ErrorEvent line otherwise, with an HTTP status that says what
happened (400 malformed, 401 no key, 403 unknown key, 404 unknown session, 409
busy session, 413 too large, 415 unsupported content type, 503 store down).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import Response as HTTPResponse
from fastapi.responses import StreamingResponse
from starlette.requests import Request

from adapters.flowstorm_v2.protocol import (
    AUDIO_TYPES,
    JSON_TYPES,
    NDJSON,
    SESSION_COOKIE,
    TEXT,
    TEXT_TYPES,
    ClientConfig,
    error_body,
    json_lines,
    media_type,
    parse_config,
    parse_json_events,
    split_events,
    text_input,
    text_lines,
)
from gateway.conversation import TurnContext, TurnRejected, TurnStream, new_session_id
from gateway.deps import Gateway, gateway_of
from gateway.events import ErrorEvent, Input, TurnEvent
from gateway.httputil import read_body
from gateway.protocol import ProtocolError

CHANNEL = "flowstorm_v2"
NAMESPACE = "flowstorm"

router = APIRouter(tags=["Flowstorm Socket V2"])

_REJECT_STATUS = {
    "session-not-found": 404,
    "session-foreign": 403,
    "session-busy": 409,
    "store-unavailable": 503,
}

_TURN_DOC = {
    200: {
        "description": "The turn's events: NDJSON (ResponseItem..., Response | Error) for "
        "JSON requests, the plain-text line format for text/plain requests.",
        "content": {NDJSON: {}, "text/plain": {}},
    },
    400: {"description": "Malformed body or configuration (ErrorEvent / `!` line)"},
    401: {"description": "No application key"},
    403: {"description": "Unknown application key, or the session is another application's"},
    404: {"description": "The flowstorm-session-id cookie names an unknown or expired session"},
    409: {"description": "Another turn of this session is running"},
    413: {"description": "Body larger than GATEWAY_MAX_BODY_BYTES"},
    415: {"description": "Content type not supported (audio arrives with the speech path)"},
    503: {"description": "The session store is unavailable"},
}


def _answer(status: int, error: ErrorEvent, *, plain: bool) -> HTTPResponse:
    return HTTPResponse(
        error_body(error, plain=plain), status_code=status, media_type=TEXT if plain else NDJSON
    )


def _client_error(exc: ProtocolError, *, plain: bool) -> HTTPResponse:
    return _answer(exc.status, ErrorEvent(text=exc.text, source="client"), plain=plain)


def _check_key(gw: Gateway, config: ClientConfig, *, plain: bool) -> HTTPResponse | None:
    if not config.key:
        error = ErrorEvent(text="The application key is missing (X-Key or key).", source="client")
        return _answer(401, error, plain=plain)
    if not gw.settings.key_allowed(config.key):
        error = ErrorEvent(text=f"Unknown application key {config.key!r}.", source="client")
        return _answer(403, error, plain=plain)
    return None


def _set_cookie(answer: HTTPResponse, gw: Gateway, session_id: str) -> None:
    answer.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=gw.settings.session_timeout_s,
        path="/",
        httponly=True,
        samesite="lax",
        secure=gw.settings.public_url.startswith("https://"),
    )


@router.put(
    "/client",
    summary="One conversational turn (Flowstorm Socket V2)",
    responses=_TURN_DOC,  # type: ignore[arg-type]
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/plain": {"schema": {"type": "string"}, "example": "my name is Ada"},
                "application/json": {
                    "schema": {"type": "string", "description": "InputEvent/LogEvent objects"},
                    "example": '{"type":"Input","input":{"transcript":{"text":"hello"}}}',
                },
            },
        }
    },
)
async def put_client(request: Request) -> HTTPResponse:
    """Run one turn: the input in the body, the answer streamed back as it is produced."""
    gw = gateway_of(request)
    kind = media_type(request.headers.get("content-type"))
    plain = kind in TEXT_TYPES
    try:
        config = parse_config(request.headers, request.query_params)
    except ProtocolError as exc:
        return _client_error(exc, plain=plain)
    if refused := _check_key(gw, config, plain=plain):
        return refused
    if kind in AUDIO_TYPES:
        error = ErrorEvent(
            text=f"Audio input ({kind}) is not supported yet; send text/plain or application/json.",
            source="client",
        )
        return _answer(415, error, plain=False)
    if not plain and kind not in JSON_TYPES:
        error = ErrorEvent(
            text=f"Unsupported Content-Type {kind or '(none)'!r}: "
            "use text/plain or application/json.",
            source="client",
        )
        return _answer(415, error, plain=False)

    try:
        body = await read_body(request, gw.settings.max_body_bytes)
        input_: Input | None
        if plain:
            input_, logs = text_input(body), []
        else:
            found, log_events, audio = split_events(parse_json_events(body))
            if audio:
                raise ProtocolError(
                    "Binary and InputStreamClose events (audio input) are not supported yet.",
                    status=415,
                )
            input_ = found.input if found else None
            logs = [entry for event in log_events for entry in event.entries]
    except ProtocolError as exc:
        return _client_error(exc, plain=plain)

    cookie = request.cookies.get(SESSION_COOKIE) or None
    session_id = cookie or new_session_id()
    ctx = TurnContext(
        channel=CHANNEL,
        namespace=NAMESPACE,
        session_id=session_id,
        app_key=config.key or "",
        device_id=config.device_id,
        locale=config.locale,
        time_zone=config.time_zone,
        create=cookie is None,
        config=config.session_config(),
        logs=logs,
    )
    if input_ is None:
        return await _store_logs(gw, ctx, plain=plain)
    return await _turn(gw, ctx, input_, config, plain=plain, new=cookie is None)


async def _store_logs(gw: Gateway, ctx: TurnContext, *, plain: bool) -> HTTPResponse:
    if ctx.create:  # no session yet: nothing to attach the logs to
        return HTTPResponse(status_code=204)
    stored = await gw.conversation.log(ctx, ctx.logs)
    if not stored:
        error = ErrorEvent(
            text=f"Session {ctx.session_id} is unknown or has expired.", source="session"
        )
        return _answer(404, error, plain=plain)
    return HTTPResponse(status_code=204)


async def _turn(
    gw: Gateway, ctx: TurnContext, input_: Input, config: ClientConfig, *, plain: bool, new: bool
) -> HTTPResponse:
    stream: TurnStream = gw.conversation.turn(ctx, input_)
    events = aiter(stream)
    try:
        first = await anext(events)
    except TurnRejected as exc:
        answer = _answer(
            _REJECT_STATUS[exc.reason], ErrorEvent(text=exc.text, source=exc.source), plain=plain
        )
        if exc.reason == "session-not-found":
            answer.delete_cookie(SESSION_COOKIE, path="/")
        return answer

    async def body() -> AsyncIterator[bytes]:
        event: TurnEvent | None = first
        while event is not None:
            if plain:
                chunk = text_lines(event).encode()
            else:
                chunk = json_lines(event, send_items=config.send_response_items)
            if chunk:
                yield chunk
            event = await anext(events, None)

    answer = StreamingResponse(
        body(), media_type=TEXT if plain else NDJSON, headers={"Cache-Control": "no-store"}
    )
    _set_cookie(answer, gw, ctx.session_id)
    return answer


@router.get(
    "/client",
    summary="Interim recognition results of a streaming turn (Flowstorm Socket V2)",
    responses={
        200: {"description": "RecognizedInput events / `~` lines; ends when recognition ends"},
        401: {"description": "No application key"},
        403: {"description": "Unknown application key"},
    },
)
async def get_client(request: Request) -> HTTPResponse:
    """Stream interim results of the session's running audio input.

    Audio input arrives with the speech path; until then no recognition ever
    runs, so the answer is empty and ends at once, which tells the client that
    recognition has finished.
    """
    gw = gateway_of(request)
    plain = "text/plain" in request.headers.get("accept", "")
    try:
        config = parse_config(request.headers, request.query_params)
    except ProtocolError as exc:
        return _client_error(exc, plain=plain)
    if refused := _check_key(gw, config, plain=plain):
        return refused
    return HTTPResponse(b"", media_type=TEXT if plain else NDJSON)
