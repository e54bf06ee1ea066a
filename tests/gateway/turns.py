"""Helpers of the turn engine tests: a turn context, the texts and items of a turn, a V2
text turn through a served gateway, an engine, a
turn failed by the pipeline and the session it leaves, a stored session."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.conversation import Conversation, TurnContext
from gateway.events import (
    ErrorEvent,
    Input,
    ResponseItem,
    ResponseItemEvent,
    SessionStartedEvent,
    TurnEvent,
)
from gateway.pipeline import make_pipeline
from gateway.sessions import ClientState, MemorySessionStore, Session, SessionStore
from gateway.settings import Settings


def stored(key: str = "c:s1", **fields: object) -> Session:
    """A Session of channel ``c`` and app ``app`` under store key ``key`` (its id the
    key's last part), with ``fields`` as Session takes them."""
    return Session.model_validate(
        {"id": key.split(":")[-1], "key": key, "channel": "c", "app_key": "app", **fields}
    )


def ctx(session_id: str = "s1", **fields: Any) -> TurnContext:
    """A TurnContext of channel ``test`` and app ``app`` (``fields`` as TurnContext takes)."""
    return TurnContext(channel="test", session_id=session_id, app_key="app", **fields)


def texts(events: list[TurnEvent]) -> list[str]:
    """The texts of the ResponseItem events of a turn."""
    return [e.response_item.text or "" for e in events if isinstance(e, ResponseItemEvent)]


def items(events: list[TurnEvent]) -> list[ResponseItem]:
    """The ResponseItems of a turn's events."""
    return [e.response_item for e in events if isinstance(e, ResponseItemEvent)]


def engine(store: SessionStore | None = None, **overrides: Any) -> Conversation:
    """A turn engine over ``store`` (memory by default) with Settings ``overrides``."""
    settings = Settings().model_copy(update=overrides)
    store = store if store is not None else MemorySessionStore()  # an empty one is falsy (len)
    return Conversation(store, make_pipeline(settings), settings)


async def pipeline_error(
    conv: Conversation, words: str, said: str = "hello", context: TurnContext | None = None
) -> list[TurnEvent]:
    """Run a turn of ``said``; assert it ended in the pipeline's :class:`ErrorEvent` whose
    text holds ``words``; the turn's events."""
    events = await conv.turn(context or ctx(), Input.of(said)).collect()
    error = events[-1]
    assert isinstance(error, ErrorEvent), events
    assert error.source == "pipeline", error
    assert words in error.text, error.text
    return events


async def failed_session(conv: Conversation, turn_count: int) -> Session:
    """The session of :func:`ctx` after a failed turn: kept, marked Failed, ``turn_count``
    turns (a failed turn does not advance it)."""
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert (session.client_state, session.turn_count) == (ClientState.FAILED, turn_count)
    return session


async def fails_then_recovers(conv: Conversation, words: str, said: str) -> list[str]:
    """After a good first turn (``hello``), a turn of ``said`` fails (:func:`pipeline_error`
    ``words``), leaving the session Failed after 1 turn; the texts of the next turn
    (``again``), which the core answers."""
    await conv.turn(ctx(), Input.of("hello")).collect()
    await pipeline_error(conv, words, said)
    await failed_session(conv, 1)
    return texts(await conv.turn(ctx(), Input.of("again")).collect())


async def streamed(conv: Conversation, release: asyncio.Event, said: str) -> list[TurnEvent]:
    """A turn of ``said`` whose first item (``first``) arrives while the core still holds
    its answer open (``release`` unset); then ``release`` is set: the turn's other events."""
    events = aiter(conv.turn(ctx(), Input.of(said)))
    assert isinstance(await anext(events), SessionStartedEvent)
    first = await anext(events)
    assert isinstance(first, ResponseItemEvent)
    assert first.response_item.text == "first"
    assert not release.is_set()  # the core has not finished its answer yet
    release.set()
    return [e async for e in events]


async def v2_put(
    client: httpx.AsyncClient, key: str, content: str, content_type: str = "text/plain"
) -> httpx.Response:
    """A Flowstorm V2 turn ``PUT /client?key=<key>`` on a served gateway (``client`` has
    its base URL and keeps the session cookie); asserts it is answered 200."""
    answer = await client.put(
        f"/client?key={key}", content=content, headers={"Content-Type": content_type}
    )
    assert answer.status_code == 200, answer.text
    return answer


def said(body: str) -> list[str]:
    """The bot's lines (``< text``) of a V2 text answer."""
    return [line[2:] for line in body.splitlines() if line.startswith("< ")]
