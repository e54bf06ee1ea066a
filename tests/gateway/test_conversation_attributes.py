"""The turn engine bounds a session's attributes (GATEWAY_MAX_ATTRIBUTES_BYTES): a client's
(TurnContext.attributes, merged every turn) cannot grow them past it; a core's are kept
with a WARNING naming the core. Memory and a real Redis."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from gateway.conversation import Conversation, TurnRejected
from gateway.events import Input, ResponseEvent
from gateway.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from tests.gateway.turns import ctx, engine

LIMIT = 1000


@pytest.fixture(params=["memory", "redis"])
async def conv(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[Conversation]:
    """The demo engine, GATEWAY_MAX_ATTRIBUTES_BYTES :data:`LIMIT`, on memory then Redis."""
    store: SessionStore = (
        MemorySessionStore()
        if request.param == "memory"
        else RedisSessionStore(redis_url, prefix=redis_prefix)
    )
    engine_ = engine(store, max_attributes_bytes=LIMIT)
    try:
        yield engine_
    finally:
        await engine_.store.aclose()


async def _raw(conv: Conversation, redis_url: str, redis_prefix: str) -> str | bytes | None:
    """The session of :func:`ctx` as stored: the JSON Redis holds, or the memory store's."""
    if isinstance(conv.store, RedisSessionStore):
        client = Redis.from_url(redis_url)
        try:
            raw: str | bytes | None = await client.get(f"{redis_prefix}:{{{ctx().key}}}:s")
        finally:
            await client.aclose()
        return raw
    session = await conv.store.get(ctx().key)
    return None if session is None else session.model_dump_json()


async def test_client_attributes_cannot_grow_the_session_past_the_bound(
    conv: Conversation, redis_url: str, redis_prefix: str
) -> None:
    """A client's attributes were merged into the session every turn without a bound: one
    of ~200 KB a turn made a session of 1.2 MB after 6 turns, loaded and saved by every
    turn after. A turn that would take them past GATEWAY_MAX_ATTRIBUTES_BYTES of JSON is
    refused before it runs (``attributes-too-large``, source ``client``), the session as
    it was; attributes that keep within it, or replace others, still go."""
    first = await conv.turn(ctx(attributes={"a": "x" * 400}), Input.of("#intro")).collect()
    assert isinstance(first[-1], ResponseEvent)
    before = await _raw(conv, redis_url, redis_prefix)
    assert before is not None

    with pytest.raises(TurnRejected) as refused:
        await conv.turn(ctx(attributes={"b": "y" * 700}), Input.of("hello")).collect()
    assert refused.value.reason == "attributes-too-large"
    assert refused.value.source == "client"
    assert "GATEWAY_MAX_ATTRIBUTES_BYTES" in refused.value.text
    assert str(LIMIT) in refused.value.text
    assert await _raw(conv, redis_url, redis_prefix) == before  # not touched

    # a value replaced within the bound: the turn runs and the session keeps it
    replaced = await conv.turn(ctx(attributes={"a": "z" * 700}), Input.of("hello")).collect()
    assert isinstance(replaced[-1], ResponseEvent)
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.attributes == {"a": "z" * 700}
    assert session.turn_count == 2
    assert len(json.dumps(session.attributes)) <= LIMIT


async def test_a_first_turn_with_too_many_attributes_makes_no_session(
    conv: Conversation, redis_url: str, redis_prefix: str
) -> None:
    with pytest.raises(TurnRejected) as refused:
        await conv.turn(ctx(attributes={"blob": "x" * LIMIT}), Input.of("#intro")).collect()
    assert refused.value.reason == "attributes-too-large"
    assert await _raw(conv, redis_url, redis_prefix) is None
    # the same client with fewer attributes starts it
    events = await conv.turn(ctx(attributes={"blob": "x"}), Input.of("#intro")).collect()
    assert isinstance(events[-1], ResponseEvent)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_core_past_the_bound_is_kept_with_a_warning_naming_the_core(
    kind: str,
    redis_url: str,
    redis_prefix: str,
    core: tuple[str, FastAPI],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The core's attributes (a Response's ``attributes``, merged) share the dict: past the
    bound they are kept and the turn answered, with a WARNING naming the core each such
    turn. A client's attributes then still go when they do not make the session larger
    (the core's size is not the client's doing), and are refused when they do."""
    caplog.set_level(logging.WARNING, logger="gateway.conversation")
    url, _ = core
    store: SessionStore = (
        MemorySessionStore()
        if kind == "memory"
        else RedisSessionStore(redis_url, prefix=redis_prefix)
    )
    conv = engine(store, pipeline=f"{url}/json", max_attributes_bytes=LIMIT)  # lastHeard
    try:
        heard = "a" * (LIMIT + 100)
        answered = await conv.turn(ctx(), Input.of(heard)).collect()
        assert isinstance(answered[-1], ResponseEvent)
        session = await conv.store.get(ctx().key)
        assert session is not None
        assert session.attributes == {"lastHeard": heard}  # kept
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("core http" in w and "GATEWAY_MAX_ATTRIBUTES_BYTES" in w for w in warnings)

        with pytest.raises(TurnRejected):  # larger still: the client's doing
            await conv.turn(ctx(attributes={"more": "x"}), Input.of(heard)).collect()
        # the same size: the client's attributes go (the core replaces lastHeard)
        kept = await conv.turn(ctx(attributes={"lastHeard": "b"}), Input.of("hi")).collect()
        assert isinstance(kept[-1], ResponseEvent)
        session = await conv.store.get(ctx().key)
        assert session is not None
        assert session.attributes == {"lastHeard": "hi"}
    finally:
        await conv.pipeline.aclose()
        await conv.store.aclose()
