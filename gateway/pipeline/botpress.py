"""The Botpress core: the Chat API of Botpress Cloud (``GATEWAY_PIPELINE=botpress:<webhookId>``).

Spec: shared/specs/CORES.md, "Botpress Chat API". Base URL
``{GATEWAY_BOTPRESS_URL}/{webhookId}``. Per gateway session, kept in its
``pipeline_state``: a Chat user (``POST /users`` -> ``{user, key}``; with
GATEWAY_BOTPRESS_ENCRYPTION_KEY the manual mode: the key is the HS256 JWT of
``{"id": <user id>}`` and ``POST /users/get-or-create``) as ``userId``/``userKey``, and one
conversation (``POST /conversations``; in manual mode ``POST /conversations/get-or-create``
with an id derived from the session, :func:`conversation_id`) as ``conversationId``.
Every request but ``POST /users`` carries ``x-user-key``. A key ``POST /users`` answers
that is no usable header value (:func:`usable_key`: printable ASCII, at most
:data:`MAX_USER_KEY_CHARS`) is refused there (a PipelineError naming Botpress) and not
kept: sent on, it failed every later turn of the session as the gateway's own fault; a
kept one that is not (a session stored before the check) is dropped and made anew.

The turn engine discards a failed turn's ``pipeline_state`` but for the keys a core
names durable (:attr:`BotpressPipeline.durable_state`): ``userId``, ``userKey`` and
``conversationId`` survive a failed turn, so the next turn (or the ``#error`` turn) of a
session whose first turn failed finds the same user and conversation, with the first
message and the bot's context. In default mode this is the only way: the user key
exists only in the answer of ``POST /users`` (the Chat API gives it once; a user id
given again is refused as existing). In manual mode the ids are also derived from the
session, so even a state lost with the session store finds them again. Kept ids that
Botpress no longer takes (``listen`` answers 401 or 403 for the user key, 404 for the
conversation: deleted, the integration reinstalled, its encryption key changed; or,
for a session that kept a user and no conversation, its first turn having failed
after making the user, ``POST /conversations`` answers 401, 403 or 404 for the user
key) are made anew in the same turn, each kind once, before the input is sent
(:data:`STALE`, :data:`STALE_USER`); kept, they would fail every later turn of the
session. The status alone does not say the refusal is about them (a wrong webhook id is
404 on every call, a proxy's 403 is not the Chat API's): they are set aside
(:class:`_SetAside`) and dropped, logged at WARNING, only once the new ones are listened
to; when making or listening to the new ones fails too, they are put back (one WARNING)
and the turn fails with that error, naming its call (``Botpress answered POST /users
with HTTP 404``).

A turn: open ``GET /conversations/{id}/listen`` (SSE, each ``data`` a JSON ``{type,
data}``), then send the input, then forward each ``message_created`` with ``isBot: true``
as items as it arrives. The Chat API has no end-of-turn marker: the turn is over
GATEWAY_BOTPRESS_IDLE_S after the bot's last message, or at once after a signal nothing
of the bot's follows (:func:`_final`: a ``choice``/``dropdown`` with options, which
waits for the user's pick, or the ``transfer``/``handoff``/``end`` event). The first
message must come within GATEWAY_BOTPRESS_REPLY_TIMEOUT_S after text (else a
PipelineError: the bot did not answer); after an action none may come (an empty answer).

Input: text -> ``POST /messages {conversationId, payload: {type: "text", text}}`` (the
name of a choice option of the last turn sends that option's ``value``); an action
``#name`` (``#intro``, ``#silence``...) -> ``POST /events {conversationId, payload:
{type: "name"}}``, for the bot's event handlers.

Bot message payloads -> items: ``text``, ``markdown`` -> text; ``image``, ``audio``,
``video`` -> those media URLs; ``card`` -> title and subtitle, ``imageUrl``, its
``actions`` as buttons (``postback``/``say`` send their ``value`` as text, ``url`` opens
it); ``carousel`` -> one item per card; ``choice``/``dropdown`` -> text with the options
as quick replies (gateway/pipeline/cores.py), without options its text alone (and no
end of the turn); ``bloc`` -> its items (flat ``{type,
text}`` as the Chat API sends them, or ``{type, payload}``); ``file``,
``location`` and others -> the command item ``#<type>``. A bot's ``event_created`` whose
payload is ``{type: "transfer"|"handoff", target, reason?}`` is the transfer action
(:func:`gateway.events.transfer_item`), one without a target is not carried out (no
item, one WARNING line: :class:`gateway.pipeline.cores.UntargetedHandoffs`; it still
ends the turn); ``{type: "end"}`` ends the session; another
bot event is dropped, its type logged at DEBUG, one line per turn
(:func:`gateway.pipeline.cores.log_dropped`).

Why a plain text answer waits the idle gap (checked against the Chat API's sources,
shared/specs/CORES.md): nothing in the contract says a turn is complete. The listen
stream's signals are ``message_created``, ``event_created``, ``participant_added``/
``_removed``, ``message_deleted`` and ``init``; the newer ``message_stream_delta``/
``_abort``/``_complete`` tell when one streamed message (``metadata.streamId``) is
whole, not when the bot is done, and are followed by that message's
``message_created`` anyway. ``POST /messages`` answers 201 with the user's own message
before the bot runs (its handler runs asynchronously in Botpress Cloud and may send any
number of messages, spaced by its own LLM or API calls), and ``GET
/conversations/{id}/messages`` lists what exists so far, the same as the stream: no
count, no "more to come", no typing signal. A text message is as often followed by
another (a flow's consecutive text cards, an answer split into sentences) as it is
the last, so ending the turn at it would cut answers, and the rest would arrive into
the next turn. Items are forwarded as they arrive, so the wait delays only the
Response (the end of the turn, the next listening), not the first words; where a bot
is known to answer in one quick message, GATEWAY_BOTPRESS_IDLE_S can be lowered.

A non-2xx status, invalid JSON, a listen stream that ends before the bot's answer, a
bot message or event whose ``conversationId`` is another conversation's (another user's
words: never shown), a message without a payload type or whose
``options``/``items``/``actions`` are not an array is a PipelineError. The stream's
keepalive (``data: ping``, :data:`KEEPALIVE`) is no signal and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Collection, Iterator
from typing import Any, Self
from urllib.parse import quote

import httpx
import jwt
from httpx_sse import SSEError

from gateway.events import Input, Response, ResponseItem
from gateway.pipeline.base import PipelineConfigError, PipelineError, PipelineOutput
from gateway.pipeline.cores import (
    DEFAULT_RETRY,
    PooledCore,
    RetryPolicy,
    SseEvent,
    UntargetedHandoffs,
    bounded_sse,
    button,
    buttons_item,
    card_item,
    check_status,
    checked_json,
    chosen,
    command_item,
    core_client,
    core_stream,
    is_url,
    log_dropped,
    objects_in,
    read_json,
    talking_to,
    transfer_to,
)
from gateway.sessions import Session
from gateway.settings import Settings

log = logging.getLogger(__name__)

KEEPALIVE = "ping"
"""The ``data`` of the listen stream's keepalive (``event: message``), which the Chat
integration has its stream proxy send after 30 s without a signal (its
``listenConversation``: ``Grip-Keep-Alive``); not a signal, skipped (Botpress's own
chat client reads it as an unknown signal and ignores it)."""


MAX_USER_KEY_CHARS = 4096
"""Most characters of a user key :func:`usable_key` accepts (the Chat API's keys are JWTs
of a few hundred characters)."""

_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
"""A header value httpx sends as is: printable ASCII, no whitespace at either end."""


def usable_key(key: object) -> bool:
    """Whether ``key`` (a user key Botpress gave) can go out as ``x-user-key``: a string
    of 1 to :data:`MAX_USER_KEY_CHARS` printable ASCII characters (no control character,
    none past ASCII, no space at either end), read in time bounded by the limit."""
    return (
        isinstance(key, str)
        and len(key) <= MAX_USER_KEY_CHARS
        and _HEADER_VALUE.fullmatch(key) is not None
    )


class BotpressPipeline(PooledCore):
    """A Botpress bot through its Chat integration's Chat API (see the module doc).

    ``retry`` (a :class:`~gateway.pipeline.cores.RetryPolicy`: GATEWAY_PIPELINE_RETRIES and
    its limits) says how a request the core refused unprocessed is sent again."""

    name = "botpress"
    durable_state = ("userId", "userKey", "conversationId")
    """The ``pipeline_state`` keys a failed turn keeps (see
    :class:`~gateway.pipeline.base.Pipeline`): the Chat user and conversation made on
    Botpress's side."""

    def __init__(
        self,
        base_url: str,
        *,
        encryption_key: str | None = None,
        idle_s: float = 1.0,
        reply_timeout_s: float = 8.0,
        max_response_bytes: int = 1_048_576,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._encryption_key = encryption_key
        self._idle_s = idle_s
        self._reply_timeout_s = reply_timeout_s
        self._max = max_response_bytes
        self._retry = retry
        self._client = client
        self.untargeted_handoffs = UntargetedHandoffs(log, "Botpress", "the event names none")
        """The lines of transfer/handoff events that name no target (not carried out)."""

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The Chat API of ``botpress:<webhookId>`` (or GATEWAY_BOTPRESS_WEBHOOK_ID).

        Raises PipelineConfigError naming GATEWAY_BOTPRESS_WEBHOOK_ID when neither names one.
        """
        webhook_id = spec.strip().split(":", 1)[1].strip() or settings.botpress_webhook_id
        if not webhook_id:
            raise PipelineConfigError(
                "needs the Chat integration's webhook id: botpress:<webhookId> or "
                "GATEWAY_BOTPRESS_WEBHOOK_ID"
            )
        key = settings.botpress_encryption_key
        return cls(
            f"{settings.botpress_url.rstrip('/')}/{quote(webhook_id, safe='')}",
            encryption_key=key.get_secret_value() if key else None,
            idle_s=settings.botpress_idle_s,
            reply_timeout_s=settings.botpress_reply_timeout_s,
            max_response_bytes=settings.pipeline_max_response_bytes,
            retry=RetryPolicy.of(settings),
            client=core_client(settings),
        )

    async def _call(
        self, path: str, key: str | None, body: dict[str, Any], stale: Collection[int] = ()
    ) -> dict[str, Any]:
        """The JSON object Botpress answers ``POST <path>`` (``x-user-key: key`` when given).

        Raises :class:`_Stale` when the status is one of ``stale`` (the caller's kept key
        refused), PipelineError for another non-2xx status (``Botpress answered POST
        /messages with HTTP 500``: the call named) or an answer that is no object.
        """
        headers = {"x-user-key": key} if key else {}
        async with core_stream(
            self._client,
            "POST",
            f"{self.base_url}{path}",
            core="Botpress",
            label=self.name,
            retry=self._retry,
            json=body,
            headers=headers,
        ) as answer:
            if answer.status_code in stale:
                raise _Stale(answer.status_code)
            secrets = (key, self._encryption_key)
            await check_status(answer, "Botpress", secrets, call=f"POST {path}")
            data = await read_json(answer, self._max, "Botpress", secrets)
        if not isinstance(data, dict):
            raise PipelineError(f"Botpress answered {path} with something else than an object")
        return data

    async def _user(self, session: Session) -> tuple[str, str]:
        """The session's Chat user ``(id, key)``, created on its first turn (and anew,
        with its conversation, when the kept key is not :func:`usable_key`). A user made
        anew drops a kept conversation id (a session that kept one without its user:
        that conversation is not the new user's, and listening to it was refused).

        Raises PipelineError naming Botpress when the key ``POST /users`` gives is not
        :func:`usable_key` (not kept: the next turn asks for another user).
        """
        state = session.pipeline_state
        if "userKey" in state and not usable_key(state["userKey"]):
            for name in self.durable_state:  # its conversation was that user's
                state.pop(name, None)
        if isinstance(state.get("userKey"), str) and isinstance(state.get("userId"), str):
            return state["userId"], state["userKey"]
        state.pop("conversationId", None)  # a kept one was another user's: not this one's
        if self._encryption_key:
            user_id = _derived(session.key)
            key = jwt.encode({"id": user_id}, self._encryption_key, algorithm="HS256")
            await self._call("/users/get-or-create", key, {})
        else:
            made = await self._call("/users", None, {})
            user, made_key = made.get("user"), made.get("key")
            if not isinstance(user, dict) or not isinstance(made_key, str) or not made_key:
                raise PipelineError("Botpress created a user without an id or key")
            if not usable_key(made_key):
                raise PipelineError(
                    "Botpress created a user whose key is not a usable header value "
                    f"(printable ASCII, at most {MAX_USER_KEY_CHARS} characters)"
                )
            user_id, key = str(user.get("id", "")), made_key
        state["userId"], state["userKey"] = user_id, key
        return user_id, key

    async def _conversation(self, session: Session, key: str, kept_key: bool) -> str:
        """The session's conversation id, created on its first turn: in manual mode
        ``POST /conversations/get-or-create`` with the id :func:`conversation_id` derives
        from the session, so every attempt at the first turn (the engine discards a
        failed turn's state) finds the same conversation; else ``POST /conversations``.

        Raises :class:`_Stale` when ``kept_key`` (``key`` is the session's kept user key,
        not one made in this turn) and Botpress refuses it (:data:`STALE_USER`)."""
        state = session.pipeline_state
        if isinstance(state.get("conversationId"), str):
            return str(state["conversationId"])
        if self._encryption_key:
            path, body = "/conversations/get-or-create", {"id": conversation_id(session)}
        else:
            path, body = "/conversations", {}
        stale = STALE_USER if kept_key else ()
        made = (await self._call(path, key, body, stale)).get("conversation")
        if not isinstance(made, dict) or not isinstance(made.get("id"), str):
            raise PipelineError("Botpress created a conversation without an id")
        state["conversationId"] = made["id"]
        return str(made["id"])

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        """Send the turn to the bot; yield its messages' items until it is idle, then the
        Response."""
        offered: list[dict[str, Any]] = []
        ended = False
        unknown: dict[str, None] = {}  # types of bot events dropped, in order
        # the kept ids set aside while new ones are tried, and the refusals that set them
        # aside: they are dropped (the refusals logged) once the new ones are listened to,
        # and put back when the turn fails before (the refusal was not about them)
        aside = _SetAside()
        with talking_to("Botpress"), aside.restored_on_failure(session):
            while True:  # once more after each kind of kept id refused: at most 3 times
                state = session.pipeline_state
                kept_key = state.get("userKey")
                kept_conversation = isinstance(state.get("conversationId"), str)
                user_id, key = await self._user(session)
                kept_user = key == kept_key  # not made in this turn
                kept_conversation = kept_conversation and kept_user  # (_user dropped it)
                try:
                    conversation = await self._conversation(session, key, kept_user)
                except _Stale as stale:  # the kept user key refused, no conversation kept
                    aside.put(session, stale.status, "POST /conversations", USER_IDS)
                    continue  # nothing was sent yet: on a new user
                listen_url = f"{self.base_url}/conversations/{quote(conversation, safe='')}/listen"
                headers = {"x-user-key": key, "Accept": "text/event-stream"}
                async with core_stream(
                    self._client,
                    "GET",
                    listen_url,
                    core="Botpress",
                    label=self.name,
                    retry=self._retry,
                    headers=headers,
                ) as listen:
                    status = listen.status_code
                    dropped = STALE.get(status, ())
                    refused = kept_user if "userKey" in dropped else kept_conversation
                    if dropped and refused:  # kept ids, not ones made in this turn
                        aside.put(session, status, "listen", dropped)
                        continue  # nothing was sent yet: the turn runs once, on new ids
                    secrets = (key, self._encryption_key)
                    await check_status(listen, "Botpress", secrets, call="listen")
                    aside.drop()  # new ids listened to: the kept ones were stale
                    # the stream is open (its headers came): nothing the bot says is missed
                    await self._send(session, input, conversation, key)
                    signals = self._bot_signals(listen, user_id, conversation, bool(input.action))
                    async for kind, data in signals:
                        if kind == "message":
                            for item in _items(data.get("payload"), offered):
                                yield item
                            continue
                        event = _event(data.get("payload"))
                        if isinstance(event, ResponseItem):
                            yield event
                        elif event == "end":
                            ended = True
                        elif event is not None:  # a transfer/handoff naming no target
                            self.untargeted_handoffs.log(f"{event} event")
                        else:
                            unknown[_event_type(data.get("payload"))] = None
                    break
        log_dropped(log, "Botpress", "bot events", unknown)
        session.pipeline_state["buttons"] = offered
        yield Response(session_ended=ended)

    async def _send(self, session: Session, input: Input, conversation: str, key: str) -> None:
        if input.action:
            payload = {"type": input.action.removeprefix("#")}
            await self._call("/events", key, {"payload": payload, "conversationId": conversation})
            return
        request = chosen(session.pipeline_state, input.text)
        text = request.get("payload") if request else input.text
        body = {"conversationId": conversation, "payload": {"type": "text", "text": str(text)}}
        await self._call("/messages", key, body)

    async def _bot_signals(
        self, listen: httpx.Response, user_id: str, conversation: str, quiet_ok: bool
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """``("message", Message)`` and ``("event", Event)`` of the bot in ``conversation``,
        until it is idle; PipelineError for one that names another conversation."""
        events = bounded_sse(listen, self._max, "Botpress")
        heard = False
        loop = asyncio.get_running_loop()
        # deadlines, not a wait per signal: signals the bot's answer is not made of
        # (participants, the user's own message, pings) do not put them off
        deadline = loop.time() + self._reply_timeout_s
        while True:
            try:
                sse: SseEvent = await asyncio.wait_for(
                    anext(events), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                if heard or quiet_ok:
                    return
                raise PipelineError(
                    f"the Botpress bot did not answer within {self._reply_timeout_s:g} s"
                ) from None
            except StopAsyncIteration:
                if heard:
                    return
                raise PipelineError("Botpress closed the listen stream before answering") from None
            except SSEError as exc:
                raise PipelineError(
                    f"Botpress's listen stream is not an event stream: {exc}"
                ) from exc
            if not sse.data or sse.data == KEEPALIVE:
                continue
            signal = checked_json(sse.data, "Botpress sent an invalid signal")
            if not isinstance(signal, dict) or not isinstance(signal.get("data"), dict):
                raise PipelineError("Botpress sent a signal without data")
            data: dict[str, Any] = signal["data"]
            if signal.get("type") == "message_created" and data.get("isBot") is True:
                kind = "message"
            elif signal.get("type") == "event_created" and data.get("userId") != user_id:
                kind = "event"
            else:
                continue
            named = data.get("conversationId")
            if named is not None and named != conversation:  # another user's: never shown
                raise PipelineError("Botpress sent a signal of another conversation")
            heard = True
            yield kind, data
            if _final(kind, data.get("payload")):
                return
            deadline = loop.time() + self._idle_s  # the bot is idle this long after its last


USER_IDS = ("userId", "userKey", "conversationId")
"""The ``pipeline_state`` keys of a Chat user: its id, its key and its conversation."""

STALE = {401: USER_IDS, 403: USER_IDS, 404: ("conversationId",)}
"""Statuses of ``listen`` on a session's kept ids that say Botpress no longer takes them
-> the ``pipeline_state`` keys dropped, to be made anew: 401 the user key (the user was
deleted, the integration reinstalled or its encryption key changed), 403 the user may
not listen to the conversation (not its own), 404 the conversation."""

STALE_USER = frozenset({401, 403, 404})
"""Statuses of ``POST /conversations`` (``/get-or-create``) with a session's kept user key
that say Botpress no longer takes the key (401, 403) or knows its user (404): the user
and its conversation are made anew. A session keeps a user without a conversation when
its first turn made the user and then failed (:attr:`BotpressPipeline.durable_state`)."""


class _Stale(Exception):
    """Botpress refused a session's kept id with ``status`` (:data:`STALE_USER`)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _SetAside:
    """The session's kept ids Botpress refused in this turn (:data:`STALE`,
    :data:`STALE_USER`), set aside while new ones are made: a refusal's status alone does
    not say it is about them (a wrong webhook id is 404 on every call, a proxy's 403 is
    not the Chat API's). They are dropped, each refusal logged at WARNING (``... for the
    session's kept user and conversation: made anew``), only once the new ids are
    listened to (:meth:`drop`); when the turn fails before (the new ids refused the same
    way, or making them failed: ``POST /users`` 404 for a wrong webhook id), they are put
    back (:meth:`restored_on_failure`) and one WARNING says the refusal was not about
    them, the turn failing with what failed in the end."""

    def __init__(self) -> None:
        self.kept: dict[str, Any] = {}
        """The ``pipeline_state`` values set aside (the first ones, when set aside twice)."""
        self.refusals: list[tuple[int, str, str]] = []
        """``(status, call, what)`` of each refusal that set ids aside, in order."""

    def put(self, session: Session, status: int, call: str, names: Collection[str]) -> None:
        """Set aside the ids (``pipeline_state`` keys ``names``) Botpress refused with
        ``status`` at ``call`` (``listen``, ``POST /conversations``)."""
        state = session.pipeline_state
        for name in names:
            if name in state:
                self.kept.setdefault(name, state.pop(name))
        what = "user and conversation" if "userKey" in names else "conversation"
        self.refusals.append((status, call, what))

    def drop(self) -> None:
        """The new ids are listened to: the ones set aside were stale, dropped for good,
        each refusal logged at WARNING."""
        for status, call, what in self.refusals:
            log.warning(
                "Botpress answered %s with HTTP %d for the session's kept %s: made anew",
                call,
                status,
                what,
            )
        self.kept.clear()
        self.refusals.clear()

    @contextlib.contextmanager
    def restored_on_failure(self, session: Session) -> Iterator[None]:
        """Put the ids set aside back into ``session``'s ``pipeline_state`` when the body
        raises before :meth:`drop` (the new ids in their place dropped), with a WARNING."""
        try:
            yield
        except BaseException:
            if self.refusals:
                state = session.pipeline_state
                if "userKey" in self.kept:  # a new user (and its conversation) made
                    for name in USER_IDS:
                        state.pop(name, None)
                state.update(self.kept)
                status, call, what = self.refusals[0]
                log.warning(
                    "Botpress answered %s with HTTP %d for the session's kept %s, and the "
                    "new ones failed too: kept (the refusal was not about them)",
                    call,
                    status,
                    what,
                )
            raise


def conversation_id(session: Session) -> str:
    """The id of ``session``'s conversation in manual mode: ``gw-`` and 32 hex digits of
    the SHA-256 of its key and creation time (epoch s): the same for every turn of the
    session, failed ones too, and another for a new session under the same key (a new
    conversation, as in default mode). Within the Chat API's ids (at most 70 characters
    of ``[a-zA-Z0-9_-\\/]``)."""
    return _derived(f"{session.key}\n{session.created_at!r}")


def _derived(text: str) -> str:
    """A Chat API id derived from ``text``: ``gw-`` and 32 hex digits of its SHA-256."""
    return "gw-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _items(payload: Any, offered: list[dict[str, Any]]) -> list[ResponseItem]:
    """The items of one bot message's payload (see the module doc)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise PipelineError("Botpress sent a message without a payload type")
    kind: str = payload["type"]
    if kind in ("text", "markdown"):
        text = payload.get(kind)
        return [ResponseItem(text=text)] if isinstance(text, str) and text else []
    if kind in ("image", "audio", "video"):
        url = payload.get(f"{kind}Url")
        return [ResponseItem(**{kind: url})] if is_url(url) else []
    if kind == "card":
        return [_card(payload, offered)]
    if kind == "carousel":
        return [_card(c, offered) for c in _objects(payload, "items")]
    if kind in ("choice", "dropdown"):
        buttons = [
            button(str(o.get("label", "")), {"type": "text", "payload": str(o.get("value", ""))})
            for o in _objects(payload, "options")
        ]
        offered.extend(buttons)
        text = payload.get("text")
        text = text if isinstance(text, str) and text else None
        if not buttons:  # nothing to pick: the text alone, as a text message
            return [ResponseItem(text=text)] if text else []
        return [buttons_item(buttons, text)]
    if kind == "bloc":
        # the Chat API sends a bloc's items flat, {type, text} (chat-api models/message.ts;
        # the Chat integration spreads each item's payload); a bot's SDK form nests them,
        # {type, payload: {text}}: both are read
        out: list[ResponseItem] = []
        for part in _objects(payload, "items"):
            inner = part.get("payload")
            fields = inner if isinstance(inner, dict) else part
            out.extend(_items({**fields, "type": part.get("type")}, offered))
        return out
    return [command_item(kind, payload)]


def _card(card: dict[str, Any], offered: list[dict[str, Any]]) -> ResponseItem:
    text = ". ".join(
        t for t in (card.get("title"), card.get("subtitle")) if isinstance(t, str) and t
    )
    buttons = []
    for action in _objects(card, "actions"):
        kind = "url" if action.get("action") == "url" else "text"
        request = {"type": kind, "payload": str(action.get("value", ""))}
        buttons.append(button(str(action.get("label", "")), request))
    offered.extend(b for b in buttons if b["request"]["type"] == "text")
    return card_item(text, card.get("imageUrl"), buttons)


def _objects(payload: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """The objects in the array ``payload[field]`` (:func:`objects_in`; the PipelineError
    names the payload's ``type``, ``card`` for a carousel's card without one)."""
    kind = payload["type"] if isinstance(payload.get("type"), str) else "card"
    return objects_in(payload, field, "Botpress", kind)


def _final(kind: str, payload: Any) -> bool:
    """Whether the bot's turn is over with this signal, without waiting for the idle gap.

    ``kind`` is ``"message"`` or ``"event"``; ``payload`` its payload. A Botpress flow
    stops after a choice (``choice``/``dropdown`` with options) until the user picks, and
    says nothing after it hands the conversation over or ends it (the
    ``transfer``/``handoff``/``end`` event). A choice without options offers nothing to
    pick: it is a text, and the turn waits for the idle gap.
    """
    if not isinstance(payload, dict):
        return False
    if kind == "message":
        return payload.get("type") in ("choice", "dropdown") and bool(_objects(payload, "options"))
    return payload.get("type") in ("transfer", "handoff", "end")


def _event(payload: Any) -> ResponseItem | str | None:
    """A bot event's meaning: the transfer item, ``"end"``, the type (``"transfer"`` or
    ``"handoff"``) of a handoff that names no target, or None (not one of ours)."""
    if not isinstance(payload, dict):
        return None
    kind = payload.get("type")
    if kind == "end":
        return "end"
    if kind not in ("transfer", "handoff"):
        return None
    return transfer_to(payload) or str(kind)


def _event_type(payload: Any) -> str:
    """The type of a bot event's payload for the log (``(none)`` when it names none)."""
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else "(none)"
