"""Proactive push and the session view: the admin API (``/v1/push``, ``/v1/sessions/{id}``).

A push puts response items in front of a session's client without a turn: at once on a
live connection of that session (on whichever instance holds it: the append to the
session's outbox is announced on the bus, the connection sends it and confirms), else
queued in the session's outbox (gateway/outbox.py) until the client next connects or
takes a turn. The answer's ``delivery`` says which: ``live``, ``queued``; or why not:
``unknown-target`` (no such session, or the device has none), ``outbox-full``
(GATEWAY_OUTBOX_MAX events are already waiting), ``session-busy`` (a turn of the session
held it for :data:`PUSH_LOCK_WAIT_S` after the push came; answered 409 with
``Retry-After``). A push takes the session's lock (it may wake the session) but does not
wait the GATEWAY_LOCK_WAIT_S a turn waits: most turns end within the second it waits,
and behind a slow core an admin learns at once that the session is busy and when to
try again, instead of an HTTP request held for up to 15 s.

The pushed items travel as one ``Response {items, sessionEnded: false}`` event, the form
flowstorm-socket-v1.md gives for a server that "actively send[s] BotEvent.Response when
client is Sleeping to initiate conversation": a Sleeping client goes to Responding and
then Listening (flowstorm-client-states.md), so a push to a session whose last known
client state is ``Sleeping`` records it as ``Listening`` and gives the session its
normal lifetime again (GATEWAY_SESSION_TIMEOUT_S).

Targets: ``sessionId`` (a session of a channel whose clients follow their outbox, given
to :class:`Pusher`: Flowstorm V1 and Voiceflow socket.io connections; Flowstorm V2, whose
waiting ``GET /client`` gets the push at once, else its next ``PUT /client`` answer
first), optionally with ``appKey`` (then it must be the session's), or ``appKey`` +
``deviceId`` (the session that device talked in last, from the outbox's device index,
which V1 turns fill). A Voiceflow client gets the items as
``action.trace`` events under a messageID of their own (no ``action.status``).

Authentication: ``Authorization: Bearer KEY`` with a key of GATEWAY_ADMIN_KEYS; none
sent: 401 (``WWW-Authenticate: Bearer``); a wrong one: 401 (``WWW-Authenticate: Bearer``
with ``error="invalid_token"``, RFC 6750 section 3.1); no keys configured: 403. All
refusals are RFC 9457 problem bodies. The key is checked before the body is read; a
body over GATEWAY_MAX_BODY_BYTES is 413, one that is not ``application/json`` 415, and
one that is not client JSON (:func:`gateway.protocol.load_json`: malformed, nested too
deep, ``NaN``, a lone surrogate) 400 (:class:`_AdminRoute`). The pure parts (models,
:func:`gateway.protocol.key_valid`, :func:`push_event`, :func:`wake`) do no I/O.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HTTPResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ConfigDict, Field, field_validator, model_validator

from gateway.admin import (
    ADMIN_CHECKS,
    BEARER,
    CHALLENGE_HEADER,
    RETRY_AFTER_HEADER,
    TOO_MANY_FAILURES,
    admit,
)
from gateway.admin import install as install_admin
from gateway.apidoc import NOT_BLANK
from gateway.breaker import outage_level
from gateway.bus import BusUnavailable
from gateway.deps import gateway_of
from gateway.events import Response, ResponseEvent, ResponseItem, TtsConfig, Wire
from gateway.httputil import (
    check_json_type,
    problem,
    read_body,
    refused_request,
    status_phrase,
)
from gateway.logs import session_ref
from gateway.outbox import Journal, OutboxError, ack_topic
from gateway.protocol import MAX_ID_CHARS, ProtocolError, load_json
from gateway.sessions import (
    ClientState,
    LockLost,
    Session,
    SessionBusy,
    SessionStore,
    StoreUnavailable,
)
from gateway.settings import Settings

log = logging.getLogger(__name__)

Delivery = Literal["live", "queued", "unknown-target", "outbox-full", "session-busy"]

MAX_ITEMS = 50
"""Items one push may carry."""
PUSH_LOCK_WAIT_S = 1.0
"""How long a push waits for a running turn to release its session (s; GATEWAY_LOCK_WAIT_S
when that is shorter) before it is refused ``session-busy``."""
BUSY_RETRY_AFTER_S = 1
"""The ``Retry-After`` (s) of a ``session-busy`` refusal."""
CONTENT_FIELDS = ("text", "ssml", "audio", "image", "video", "code", "background")
"""The fields of a ResponseItem that give the client something to say, play or show: a
pushed item needs one of them (not blank)."""


# -------------------------------------------------------------------- pure


def _target_schema(schema: dict[str, Any]) -> None:
    """PushTarget's JSON schema says what :meth:`PushTarget._one_target` checks: a
    ``sessionId`` string, or ``appKey`` and ``deviceId`` strings."""
    schema["anyOf"] = [
        {"required": names, "properties": {name: {"type": "string"} for name in names}}
        for names in (["sessionId"], ["appKey", "deviceId"])
    ]


def _push_schema(schema: dict[str, Any]) -> None:
    """PushRequest's JSON schema says what :meth:`PushRequest._not_empty` checks: each
    item has one of :data:`CONTENT_FIELDS` as a string that is not blank
    (:data:`gateway.apidoc.NOT_BLANK`), besides the ResponseItem shape."""
    items = schema["properties"]["items"]
    filled = [{"required": [name], "properties": {name: NOT_BLANK}} for name in CONTENT_FIELDS]
    items["items"] = {"allOf": [items["items"], {"anyOf": filled}]}


class PushTarget(Wire):
    """Whom to push to: ``sessionId`` (optionally with ``appKey``), or ``appKey`` +
    ``deviceId``. Another property is refused (a typo is a 400, not a target without it:
    the admin API is the operators' own, unlike the channels' wire models), a snake_case
    spelling (``session_id``) too: the push API takes the names it documents, as
    ``POST /v1/calls`` does."""

    model_config = ConfigDict(
        json_schema_extra=_target_schema, extra="forbid", validate_by_name=False
    )

    session_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    app_key: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    device_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)

    @model_validator(mode="after")
    def _one_target(self) -> PushTarget:
        if self.session_id is None and (self.app_key is None or self.device_id is None):
            raise ValueError("give target.sessionId, or target.appKey and target.deviceId")
        return self


class PushTtsConfig(TtsConfig):
    """The `ttsConfig` of a pushed item: the core's TtsConfig shape, a property it does not
    know refused (a 400 naming it, `items.0.ttsConfig.voice`)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=False)


class PushItem(ResponseItem):
    """One item of a push: the core's ResponseItem shape, but a property it does not know
    (a typo such as `txt` for `text`, which would leave the item empty) is refused, a 400
    naming it (`items.0.txt`), here and in its `ttsConfig`."""

    # Only the push API (the operators' own) is strict: the core's answers are parsed
    # by ResponseItem, which ignores properties it does not know (a core may add some).
    # response_item() gives the item as that model, what the session's client gets.
    model_config = ConfigDict(extra="forbid", validate_by_name=False)

    tts_config: PushTtsConfig | None = None

    def response_item(self) -> ResponseItem:
        """This item as the core's :class:`~gateway.events.ResponseItem` (the same values)."""
        return ResponseItem.model_validate(self.model_dump(exclude_unset=True))


class PushRequest(Wire):
    """Body of ``POST /v1/push``: a target and 1..50 response items (PushItem, the
    core's ResponseItem shape: text, ssml, image, video, audio, code, ...), each with at
    least one of text, ssml, audio, image, video, code or background not blank (an empty
    item, ``{}`` or only ``confidence``/``repeatable``/``ttsConfig``/``nodeId``, is a
    validation error: 400). Another property, here, in ``target`` or in an item (and its
    ``ttsConfig``), is a 400 naming it (a mistyped option is not dropped); so is the
    snake_case spelling of a documented name (``node_id``: the 400 names ``nodeId``)."""

    model_config = ConfigDict(
        json_schema_extra=_push_schema, extra="forbid", validate_by_name=False
    )

    target: PushTarget
    items: list[PushItem] = Field(min_length=1, max_length=MAX_ITEMS)

    @field_validator("items")
    @classmethod
    def _not_empty(cls, items: list[PushItem]) -> list[PushItem]:
        for index, item in enumerate(items):
            if not any((getattr(item, name) or "").strip() for name in CONTENT_FIELDS):
                raise ValueError(
                    f"items[{index}] is empty: give it one of {', '.join(CONTENT_FIELDS)}"
                )
        return items


class PushResult(Wire):
    """Answer of a push that reached a session: ``delivery`` ``live`` (a connection sent
    it) or ``queued`` (in the outbox); ``seq`` is its sequence number in the session."""

    delivery: Literal["live", "queued"]
    session_id: str
    seq: int


class OutboxView(Wire):
    """A session's outbox: ``length`` events not yet delivered, ``last_seq`` the last
    sequence number given, ``delivered`` the highest one known delivered."""

    length: int
    last_seq: int
    delivered: int


class SessionView(Wire):
    """``GET /v1/sessions/{id}``: what the gateway knows of one session.

    ``client_state`` is the last known state of flowstorm-client-states.md;
    ``last_activity`` and ``created_at`` are epoch seconds.
    """

    session_id: str
    channel: str
    app_key: str
    device_id: str | None = None
    client_state: ClientState
    turn_count: int
    last_activity: float
    created_at: float
    outbox: OutboxView


def push_event(items: Sequence[ResponseItem], locale: str | None) -> ResponseEvent:
    """The event a push delivers: ``Response {items, sessionEnded: false}`` (see module doc)."""
    return ResponseEvent(response=Response(locale=locale, items=list(items)))


def wake(session: Session, settings: Settings) -> bool:
    """Record that a push woke ``session``'s client; True when the session changed.

    A Sleeping client that gets a Response goes to Responding, then Listening
    (flowstorm-client-states.md): the state becomes Listening and the session gets
    its normal idle lifetime again. Other states are left alone.
    """
    if session.client_state is not ClientState.SLEEPING:
        return False
    session.client_state = ClientState.LISTENING
    session.timeout_s = settings.session_timeout_s
    session.updated_at = time.time()
    return True


# ------------------------------------------------------------------ service


class PushRefused(Exception):
    """A push that reached no outbox: ``delivery`` says why (see module doc)."""

    def __init__(self, delivery: Delivery, text: str) -> None:
        super().__init__(text)
        self.delivery = delivery
        self.text = text


class Pusher:
    """Pushes and session lookups over the store and the outbox :class:`Journal`.

    ``push_namespaces`` are the session namespaces a ``sessionId`` target is looked up
    in, ``push_channels`` the channels whose clients follow their outbox (a session last
    served by another channel is ``unknown-target``); ``all_namespaces`` those the
    session view looks in.
    """

    def __init__(
        self,
        store: SessionStore,
        journal: Journal,
        settings: Settings,
        *,
        push_namespaces: Sequence[str],
        push_channels: Collection[str],
        all_namespaces: Sequence[str],
    ) -> None:
        self.store = store
        self.journal = journal
        self.settings = settings
        self.push_namespaces = tuple(push_namespaces)
        self.push_channels = frozenset(push_channels)
        self.all_namespaces = tuple(all_namespaces)

    async def find(self, session_id: str, namespaces: Sequence[str]) -> Session | None:
        """The session ``session_id`` in the first of ``namespaces`` that has it.

        Raises StoreUnavailable."""
        for namespace in namespaces:
            session = await self.store.get(f"{namespace}:{session_id}")
            if session is not None:
                return session
        return None

    async def _target_key(self, target: PushTarget) -> str:
        if target.session_id is not None:
            session = await self.find(target.session_id, self.push_namespaces)
            if session is None or (target.app_key and session.app_key != target.app_key):
                raise PushRefused("unknown-target", "No session of a push channel has this id.")
            return session.key
        assert target.app_key is not None
        assert target.device_id is not None
        key = await self.journal.outbox.device(target.app_key, target.device_id)
        if key is None:
            raise PushRefused("unknown-target", "This device has no session.")
        return key

    async def push(self, request: PushRequest) -> PushResult:
        """Deliver or queue ``request``'s items (module doc). Raises PushRefused,
        StoreUnavailable, OutboxError or BusUnavailable. A turn holding the session for
        :data:`PUSH_LOCK_WAIT_S` is PushRefused ``session-busy``.

        A lock whose lease ran out before the woken session was saved (LockLost: Redis
        stalled longer than GATEWAY_LOCK_LEASE_S) drops that save only: the items are in
        the outbox already, so the push is answered as any other (logged at WARNING).
        """
        key = await self._target_key(request.target)
        token = secrets.token_hex(12)
        async with self.journal.bus.subscribe(ack_topic(token)) as acks:
            try:
                wait_s = min(self.settings.lock_wait_s, PUSH_LOCK_WAIT_S)
                async with self.store.open(
                    key, lease_s=self.settings.lock_lease_s, wait_s=wait_s
                ) as txn:
                    session = txn.session
                    if session is None or (
                        request.target.app_key and session.app_key != request.target.app_key
                    ):
                        raise PushRefused("unknown-target", "The session has ended.")
                    if session.channel not in self.push_channels:
                        raise PushRefused(
                            "unknown-target",
                            f"Sessions of channel {session.channel} cannot receive pushes.",
                        )
                    items = [item.response_item() for item in request.items]
                    event = push_event(items, session.locale)
                    seqs = await self.journal.append(key, [event.wire()], "push", ack=token)
                    if seqs is None:
                        raise PushRefused(
                            "outbox-full",
                            f"{self.journal.limit} events already wait for this session's client.",
                        )
                    seq, session_id = seqs[-1], session.id
                    if wake(session, self.settings):
                        txn.save(session, session.timeout_s)
            except SessionBusy:
                raise PushRefused(
                    "session-busy", "A turn of this session is still running."
                ) from None
            except LockLost:
                # raised only for the wake's save (the one write here), after the append:
                # the items are kept and go out as any push; the session stays Sleeping
                log.warning(
                    "push to %s: the session's lock ran out before it was woken; "
                    "the items are kept, the session was not saved",
                    session_ref(key),
                )
            confirmed = await acks.get(self.settings.push_ack_ms / 1000)
        delivery: Literal["live", "queued"] = "live" if confirmed is not None else "queued"
        log.info("push %s to %s", delivery, session_ref(key))
        return PushResult(delivery=delivery, session_id=session_id, seq=seq)

    async def view(self, session_id: str) -> SessionView | None:
        """The session view of ``session_id`` (None when no namespace has it).

        Raises StoreUnavailable or OutboxError."""
        session = await self.find(session_id, self.all_namespaces)
        if session is None:
            return None
        state = await self.journal.outbox.state(session.key)
        return SessionView(
            session_id=session.id,
            channel=session.channel,
            app_key=session.app_key,
            device_id=session.device_id,
            client_state=session.client_state,
            turn_count=session.turn_count,
            last_activity=session.updated_at,
            created_at=session.created_at,
            outbox=OutboxView(length=state.pending, last_seq=state.last_seq, delivered=state.mark),
        )


# ------------------------------------------------------------------- routes

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "delivery": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}


def _problem_doc(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI response: a problem body, with ``headers`` (OpenAPI header objects)."""
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
        **({"headers": headers} if headers else {}),
    }


_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: _problem_doc("The request is not valid"),
    401: _problem_doc(
        "No admin key was sent (`Authorization: Bearer KEY`), or the key is not one of "
        'GATEWAY_ADMIN_KEYS (`WWW-Authenticate: Bearer error="invalid_token"`)',
        CHALLENGE_HEADER,
    ),
    403: _problem_doc("No admin keys are configured (GATEWAY_ADMIN_KEYS unset)"),
    429: _problem_doc(TOO_MANY_FAILURES, RETRY_AFTER_HEADER),
    503: _problem_doc("The session store or the bus does not answer"),
}


class _AdminRoute(APIRoute):
    """An admin route that checks the admin key, and reads a body of at most
    GATEWAY_MAX_BODY_BYTES, before FastAPI reads and parses the body.

    FastAPI reads a route's whole JSON body (no size limit) and parses it before it
    solves the route's dependencies, so a client without a key could make the gateway
    read and parse a body of any size before its 401. Here the key comes first (401/403,
    AdminRefused), then the body, read up to the limit (413 problem body; a declared
    Content-Length over it refused before reading anything), its media type checked
    (415 problem body unless ``application/json`` or ``+json``) and parsed as client JSON
    (:func:`gateway.protocol.load_json`: 400 problem body for a body that is not JSON,
    nested too deep, or holding a number that is not finite or a lone UTF-16 surrogate),
    its value left cached on the request for FastAPI's model validation.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, HTTPResponse]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def guarded(request: Request) -> HTTPResponse:
            settings = gateway_of(request).settings
            admit(request, settings.admin_key_digests)
            try:
                raw = await read_body(request, settings.max_body_bytes)
                # not JSON by its media type: 415 (FastAPI would validate the bytes:
                # "Input should be a valid dictionary")
                check_json_type(request)
                # bounded client JSON: the standard parser takes NaN, Infinity, 1e999 and
                # lone surrogates ("\ud800"), which a client's JSON cannot carry and
                # the outbox cannot read back; FastAPI's parser gets the value from
                # Starlette's cache of Request.json()
                request._json = load_json(raw, what="The body")
            except ProtocolError as exc:
                return refused_request(exc)
            return await handler(request)

        return guarded


def _admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> None:
    """The admin key check of :mod:`gateway.admin` (GATEWAY_ADMIN_KEYS); raises
    AdminRefused with the 401/403 answer. ``credentials`` only documents the bearer
    scheme in the OpenAPI document."""
    admit(request, gateway_of(request).settings.admin_key_digests)


ADMIN_CHECKS.add(_admin)

router = APIRouter(
    prefix="/v1", tags=["admin"], route_class=_AdminRoute, dependencies=[Depends(_admin)]
)
"""The admin routes: each checks the admin key (:func:`_admin`)."""


def install(app: Any) -> None:
    """Add the admin routes and the admin refusal handler to the FastAPI ``app``."""
    install_admin(app)
    app.include_router(router)


def _pusher(request: Request) -> Pusher:
    """The app's Pusher; StoreUnavailable before the gateway has started."""
    pusher = gateway_of(request).pusher
    if pusher is None:
        raise StoreUnavailable("the gateway has not started")
    return pusher


_STATUS: dict[str, int] = {"unknown-target": 404, "outbox-full": 409, "session-busy": 409}


@router.post(
    "/push",
    summary="Push response items to a session's client (live, or queued in its outbox)",
    response_model=PushResult,
    responses={
        202: {"description": "Queued in the session's outbox", "model": PushResult},
        404: _problem_doc("`unknown-target`: no such session, or the device has none"),
        409: _problem_doc(
            "`outbox-full`, or `session-busy` (with `Retry-After`: a turn of the session "
            "held it for a second)",
            {
                "Retry-After": {
                    "description": "`session-busy`: seconds to wait before pushing again",
                    "schema": {"type": "integer"},
                }
            },
        ),
        413: _problem_doc("The body is larger than GATEWAY_MAX_BODY_BYTES"),
        415: _problem_doc("The body is not `application/json`"),
        **_REFUSALS,
    },
)
async def push(request: Request, body: PushRequest) -> JSONResponse:
    """Deliver ``items`` to the target's client at once when it is connected (on any
    instance), else queue them in the session's outbox; see gateway/push.py.

    Each item needs something to say, play or show (one of `text`, `ssml`, `audio`,
    `image`, `video`, `code`, `background`; 400 otherwise); a property the item does not
    know (`txt`, or `node_id` for `nodeId`) is a 400 naming it. While a turn of the session
    runs, the push waits for it at most 1 s (GATEWAY_LOCK_WAIT_S when shorter); a turn
    still running then is a 409 `session-busy` with `Retry-After: 1`, nothing queued.
    """
    try:
        result = await _pusher(request).push(body)
    except PushRefused as exc:
        status = _STATUS[exc.delivery]
        refused = problem(status, status_phrase(status), exc.text, delivery=exc.delivery)
        if exc.delivery == "session-busy":
            refused.headers["Retry-After"] = str(BUSY_RETRY_AFTER_S)
        return refused
    except (StoreUnavailable, OutboxError, BusUnavailable) as exc:
        log.log(outage_level(exc), "push failed: %s", exc)
        return problem(503, "Service Unavailable", "The session store or the bus does not answer.")
    return JSONResponse(result.wire(), status_code=200 if result.delivery == "live" else 202)


_SESSION_VIEW_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: _problem_doc("No such session (an id over 256 characters is none)"),
    **_REFUSALS,
}
"""The documented refusals of ``GET``/``HEAD /v1/sessions/{id}``."""


# GET and HEAD (RFC 9110 section 9.3.2: the same answer without its body), one route each
# so each has its own operationId, as /healthz (gateway/app.py)
@router.head(
    "/sessions/{session_id:path}",
    summary="The headers of GET /v1/sessions/{session_id}, no body",
    response_model=SessionView,
    responses=_SESSION_VIEW_RESPONSES,
)
@router.get(
    "/sessions/{session_id:path}",
    summary="What the gateway knows of one session",
    response_model=SessionView,
    responses=_SESSION_VIEW_RESPONSES,
)
async def session_view(request: Request, session_id: str) -> JSONResponse:
    """Channel, app key, device, last known client state, turn count, last activity and
    outbox of the session ``session_id``; 404 at once (the store not asked) for an id
    longer than MAX_ID_CHARS (256), which no channel gives a session, as
    ``GET /v1/calls/{callId}`` answers a call id too long. The id is the rest of the
    path: one holding ``/`` (Flowstorm V1 takes it) is asked for as ``team%2Fa`` or
    ``team/a``. ``HEAD`` answers the same status and headers without the body (RFC 9110
    section 9.3.2)."""
    if len(session_id) > MAX_ID_CHARS:
        return problem(404, "Not Found", "No session has this id.")
    try:
        view = await _pusher(request).view(session_id)
    except (StoreUnavailable, OutboxError) as exc:
        log.log(outage_level(exc), "session view failed: %s", exc)
        return problem(503, "Service Unavailable", "The session store does not answer.")
    if view is None:
        return problem(404, "Not Found", "No session has this id.")
    return JSONResponse(view.wire())
