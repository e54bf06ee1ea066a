"""The Botpress core against a real (fake) Chat API on a free port
(tests/gateway/pipeline/fake_botpress.py): the user and conversation kept in the session,
bot messages from the listen stream until the idle gap, rich items, the end, failures,
and a whole Flowstorm V2 conversation."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.conversation import Conversation
from gateway.events import (
    ErrorEvent,
    Input,
    ResponseEvent,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    transfer_target,
)
from gateway.pipeline.botpress import usable_key
from tests.conftest import gateway, unless_hung
from tests.gateway.core_app import cut_early
from tests.gateway.pipeline.fake_botpress import WEBHOOK_ID
from tests.gateway.turns import (
    ctx,
    engine,
    fails_then_recovers,
    items,
    pipeline_error,
    texts,
    v2_put,
)

IDLE_S = 0.3


def bp_engine(url: str, **more: Any) -> Conversation:
    """An engine whose core is the Chat API at ``url`` (idle gap :data:`IDLE_S`)."""
    more = {"botpress_idle_s": IDLE_S, "botpress_reply_timeout_s": 1.0, **more}
    return engine(pipeline=f"botpress:{WEBHOOK_ID}", botpress_url=url, **more)


async def test_conversation_with_user_and_conversation_kept(
    botpress: tuple[str, FastAPI],
) -> None:
    url, app = botpress
    conv = bp_engine(url)
    intro = await conv.turn(ctx(), Input.of("#intro")).collect()  # ends with its choice
    assert isinstance(intro[0], SessionStartedEvent)
    got = items(intro)
    assert got[0].text == "Hi, I am the Botpress bot."
    assert got[1].text == "Shall we start?"
    assert json.loads(got[1].code or "") == {
        "buttons": [
            {"name": "Yes please", "request": {"type": "text", "payload": "yes"}},
            {"name": "No", "request": {"type": "text", "payload": "no"}},
        ]
    }
    session = await conv.store.get(ctx().key)
    assert session is not None
    user_key, conversation_id = (
        session.pipeline_state["userKey"],
        session.pipeline_state["conversationId"],
    )
    # the option's label sends its value
    started = time.perf_counter()
    assert texts(await conv.turn(ctx(), Input.of("yes please")).collect()) == ["Let us start."]
    took = time.perf_counter() - started
    # a text ends the turn one idle gap after it, not at once (no upper bound: how much
    # later is the machine's load)
    assert took >= IDLE_S
    await conv.turn(ctx(), Input.of("my name is ada")).collect()
    assert texts(await conv.turn(ctx(), Input.of("what is my name")).collect()) == ["You are Ada."]
    calls = [(m, p) for m, p, _ in app.state.calls]
    assert calls.count(("POST", "/users")) == 1  # one user and one conversation per session
    assert calls.count(("POST", "/conversations")) == 1
    assert ("POST", "/events") in calls
    sent = [b["payload"] for m, p, b in app.state.calls if p == "/messages"]
    assert sent[0] == {"type": "text", "text": "yes"}
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state["userKey"] == user_key
    assert session.pipeline_state["conversationId"] == conversation_id
    # another session is another user and conversation
    await conv.turn(ctx("s2"), Input.of("hello")).collect()
    assert [p for _, p, _ in app.state.calls].count("/users") == 2
    await conv.pipeline.aclose()


async def test_rich_items_transfer_and_end(botpress: tuple[str, FastAPI]) -> None:
    url, _ = botpress
    conv = bp_engine(url)
    rich = items(await conv.turn(ctx(), Input.of("rich")).collect())
    assert [(i.text, i.image, i.audio) for i in rich] == [
        ("Pizza. Margherita", "https://cdn.example.com/p.png", None),
        (None, "https://cdn.example.com/i.png", None),
        (None, None, "https://cdn.example.com/a.mp3"),
        ("**bold**", None, None),
        ("in a bloc", None, None),
    ]
    assert json.loads(rich[0].code or "")["buttons"][1] == {
        "name": "Menu",
        "request": {"type": "url", "payload": "https://example.com/menu"},
    }
    agent = items(await conv.turn(ctx(), Input.of("agent")).collect())
    assert agent[0].text == "One moment."
    assert transfer_target(agent[1]) == ("+15550001111", "billing")
    bye = await conv.turn(ctx(), Input.of("bye")).collect()
    assert texts(bye) == ["Bye now."]
    assert isinstance(bye[-2], ResponseEvent)
    assert bye[-2].response.session_ended
    assert isinstance(bye[-1], SessionEndedEvent)
    await conv.pipeline.aclose()


async def test_bot_events_of_other_types_are_logged_at_debug(
    botpress: tuple[str, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """Bot events other than transfer/handoff/end give no item, and their types go to
    the log at DEBUG, one line for the turn, each once, clipped (``(none)`` for an event
    without one). Before, they were dropped without a word."""
    url, _ = botpress
    caplog.set_level(logging.DEBUG, logger="gateway.pipeline.botpress")
    conv = bp_engine(url)
    assert texts(await conv.turn(ctx(), Input.of("news")).collect()) == ["The news."]
    lines = [r for r in caplog.records if "unknown types" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.DEBUG
    line = lines[0].getMessage()
    assert line.startswith("Botpress sent bot events of unknown types ['typing', 'xxx")
    assert line.endswith("'(none)']; dropped")
    assert line.count("typing") == 1
    assert len(line) < 400
    caplog.clear()
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    assert not [r for r in caplog.records if "unknown types" in r.getMessage()]
    await conv.pipeline.aclose()


async def test_a_handoff_without_a_target_is_a_warning_and_the_turn_goes_on(
    botpress: tuple[str, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """A bot's ``handoff`` event that names no target was taken for an event of an
    unknown type (a DEBUG line about unknown types: nothing told the operator the
    handoff was lost). As every core's handoff without a target: the turn's items go
    out, no transfer, one WARNING naming Botpress, and the turn ends normally (at once:
    the bot says nothing after a handoff)."""
    url, _ = botpress
    caplog.set_level(logging.DEBUG, logger="gateway.pipeline.botpress")
    # at once, not after the idle gap (an hour): waiting for it, the turn would end with
    # the turn timeout's error (10 s), not a ResponseEvent
    conv = bp_engine(url, botpress_idle_s=3600.0)
    events = await unless_hung(
        conv.turn(ctx(), Input.of("nobody")).collect(), "the handoff waited for the idle gap"
    )
    assert isinstance(events[-1], ResponseEvent), events
    assert texts(events) == ["One moment."]
    assert not [r for r in caplog.records if "unknown types" in r.getMessage()]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "Botpress asked for a handoff event without a target and no handoff target is "
        "configured (the event names none); not handed off"
    ]
    await conv.pipeline.aclose()


async def test_a_bloc_gives_the_items_of_its_parts(botpress: tuple[str, FastAPI]) -> None:
    """The Chat API sends a bloc's items flat (``{"type": "text", "text"}``: the Chat
    integration spreads each item's payload); they were read only as ``{type, payload}``
    (a bot SDK's form), so every part of a real bloc was dropped without a word."""
    url, _ = botpress
    conv = bp_engine(url)
    got = items(await conv.turn(ctx(), Input.of("bloc")).collect())
    assert [(i.text, i.image) for i in got] == [
        ("Our shop:", None),
        (None, "https://cdn.example.com/shop.png"),
        ("#location", None),
        ("*Open* daily", None),
    ]
    assert json.loads(got[2].code or "") == {
        "type": "location",
        "latitude": 50.08,
        "longitude": 14.42,
        "title": "Shop",
    }
    await conv.pipeline.aclose()


async def test_messages_are_forwarded_before_the_turn_ends(botpress: tuple[str, FastAPI]) -> None:
    """The bot holds its other messages after the first until the test has the first
    item (``app.state.hold``): it comes while the bot is still to say them. A gateway that
    held the items until the turn's end would give it only once the idle gap after it
    (3 s) ended the turn, and the bot's later messages would be no part of the turn."""
    url, app = botpress
    conv = bp_engine(url, botpress_idle_s=3.0)
    await conv.turn(ctx(), Input.of("hello")).collect()
    app.state.hold = asyncio.Event()
    events = aiter(conv.turn(ctx(), Input.of("rich")))
    first = await unless_hung(anext(events), "no item came")
    assert isinstance(first, ResponseItemEvent)
    app.state.hold.set()
    rest = [e async for e in events]
    assert len(items(rest)) == 4
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("said", "count"),
    [("#intro", 2), ("agent", 2), ("bye", 1)],
)
async def test_a_choice_transfer_or_end_ends_the_turn_without_the_idle_gap(
    botpress: tuple[str, FastAPI], said: str, count: int
) -> None:
    url, _ = botpress
    # the bot's last signal (GAP_S apart) ended the turn, not the idle gap (an hour):
    # waiting for it, the turn would end with the turn timeout's error (10 s)
    conv = bp_engine(url, botpress_idle_s=3600.0)
    events = await unless_hung(
        conv.turn(ctx(), Input.of(said)).collect(), f"{said!r} waited for the idle gap"
    )
    # ended normally (its response, then SessionEnded after "bye"), no timeout's error
    assert any(isinstance(e, ResponseEvent) for e in events), events
    assert not [e for e in events if type(e).__name__ == "ErrorEvent"], events
    got = items(events)
    assert len(got) == count  # every message of the bot came
    await conv.pipeline.aclose()


@pytest.mark.parametrize("kind", ["choice", "dropdown"])
async def test_a_choice_without_options_is_its_text_alone(
    botpress: tuple[str, FastAPI], kind: str
) -> None:
    """A ``choice`` (or ``dropdown``) with no options gave an item offering the empty quick
    replies ``{"buttons": []}`` and ended the turn at once (as a choice waiting for the
    user's pick): the bot's next message was lost. It is its text alone, and the turn
    waits for the idle gap, as after a text."""
    url, _ = botpress
    conv = bp_engine(url)
    got = items(await conv.turn(ctx(), Input.of(f"empty {kind}")).collect())
    assert [(i.text, i.code) for i in got] == [("Pick one:", None), ("Or just say it.", None)]
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state["buttons"] == []
    assert texts(await conv.turn(ctx(), Input.of("hello")).collect()) == ["You said: hello"]
    await conv.pipeline.aclose()


async def test_manual_mode_user_key_is_a_jwt(botpress: tuple[str, FastAPI]) -> None:
    url, app = botpress
    app.state.encryption_key = "integration-encryption-key-0123456789"
    conv = bp_engine(url, botpress_encryption_key=SecretStr(app.state.encryption_key))
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    paths = [p for _, p, _ in app.state.calls]
    assert "/users/get-or-create" in paths
    assert "/users" not in paths
    await conv.pipeline.aclose()


@pytest.mark.parametrize("error_turn", [False, True])
async def test_manual_mode_a_failed_first_turn_keeps_its_conversation(
    botpress: tuple[str, FastAPI], error_turn: bool
) -> None:
    """The engine discards a failed turn's pipeline state: the conversation a failed
    first turn had created was forgotten, and the next turn (or the ``#error`` turn)
    created another: the first message and what the bot made of it were lost, and
    orphan conversations piled up in Botpress. In manual mode the conversation's id is
    derived from the session (``POST /conversations/get-or-create``), as the user's is:
    every turn of the session finds the same one."""
    url, app = botpress
    app.state.encryption_key = "integration-encryption-key-0123456789"
    conv = bp_engine(
        url,
        botpress_encryption_key=SecretStr(app.state.encryption_key),
        botpress_reply_timeout_s=0.3,
        error_turn=error_turn,
    )
    # the bot takes the name in, then is slow to answer: the first turn fails
    first = await conv.turn(ctx(), Input.of("my name is ada...")).collect()
    if error_turn:  # the #error event had no answer: an empty one
        assert isinstance(first[-1], ResponseEvent)
        assert texts(first) == []
    else:
        assert isinstance(first[-1], ErrorEvent)
        assert "did not answer within 0.3 s" in first[-1].text
    assert texts(await conv.turn(ctx(), Input.of("what is my name")).collect()) == ["You are Ada."]
    assert len(app.state.conversations) == 1
    sent = [
        (p, b["conversationId"]) for _, p, b in app.state.calls if p in ("/messages", "/events")
    ]
    assert [p for p, _ in sent] == ["/messages", *(["/events"] if error_turn else []), "/messages"]
    assert len({c for _, c in sent}) == 1
    assert ("POST", "/conversations") not in [(m, p) for m, p, _ in app.state.calls]
    # another session is another conversation
    assert texts(await conv.turn(ctx("s2"), Input.of("what is my name")).collect()) == [
        "You are unknown."
    ]
    assert len(app.state.conversations) == 2
    await conv.pipeline.aclose()


@pytest.mark.parametrize("error_turn", [False, True])
async def test_default_mode_a_failed_first_turn_keeps_its_user_and_conversation(
    botpress: tuple[str, FastAPI], error_turn: bool
) -> None:
    """In default mode the Chat API gives a user's key once (``POST /users``): the engine
    discarded the failed first turn's pipeline state with it, and the next turn made
    another user and conversation, the first message and what the bot made of it lost.
    Botpress's ``durable_state`` keys now survive a failed turn (and reach the
    ``#error`` turn), the rest of the turn's changes do not."""
    url, app = botpress
    conv = bp_engine(url, botpress_reply_timeout_s=0.3, error_turn=error_turn)
    # the bot takes the name in, then is slow to answer: the first turn fails
    first = await conv.turn(ctx(), Input.of("my name is ada...")).collect()
    if error_turn:
        assert isinstance(first[-1], ResponseEvent)
    else:
        assert isinstance(first[-1], ErrorEvent)
        assert "did not answer within 0.3 s" in first[-1].text
    assert texts(await conv.turn(ctx(), Input.of("what is my name")).collect()) == ["You are Ada."]
    calls = [(m, p) for m, p, _ in app.state.calls]
    assert calls.count(("POST", "/users")) == 1
    assert calls.count(("POST", "/conversations")) == 1
    assert len(app.state.users) == 1
    assert len(app.state.conversations) == 1
    sent = [p for _, p, _ in app.state.calls if p in ("/messages", "/events")]
    assert sent == ["/messages", *(["/events"] if error_turn else []), "/messages"]
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert set(session.pipeline_state) >= {"userId", "userKey", "conversationId"}
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("said", "words"),
    [
        ("boom", "Botpress answered POST /messages with HTTP 500"),
        ("slow", "did not answer within 1 s"),
        ("garbage", "invalid signal"),
        ("deep", "invalid signal: the JSON is nested deeper than 64 levels"),
        ("weird", "without a payload type"),
        # another conversation's message (another user's words): it was forwarded
        ("stranger", "Botpress sent a signal of another conversation"),
        # a number for a list: a TypeError in the parser, "failed unexpectedly" at ERROR
        ("bad options", "Botpress sent a choice whose options are not an array"),
        ("bad carousel", "Botpress sent a carousel whose items are not an array"),
        ("bad bloc", "Botpress sent a bloc whose items are not an array"),
        ("bad card", "Botpress sent a card whose actions are not an array"),
        ("hangup", "closed the listen stream"),
        ("crash", "the connection to Botpress failed: RemoteProtocolError"),
    ],
)
async def test_core_failures_are_pipeline_errors(
    botpress: tuple[str, FastAPI], said: str, words: str
) -> None:
    url, _ = botpress
    conv = bp_engine(url)
    assert (await fails_then_recovers(conv, words, said))[-1] == "You said: again"
    await conv.pipeline.aclose()


async def test_the_listen_streams_keepalive_is_no_signal(botpress: tuple[str, FastAPI]) -> None:
    """The Chat API's listen stream sends ``event: message`` / ``data: ping`` after 30 s
    without a signal (a bot that thinks long): it failed the turn as an invalid signal
    (not JSON); it is skipped, and the bot's answer after it is the turn's."""
    url, _ = botpress
    conv = bp_engine(url)
    assert texts(await conv.turn(ctx(), Input.of("take your time")).collect()) == ["Done thinking."]
    await conv.pipeline.aclose()


async def test_an_endless_line_on_the_listen_stream_is_cut_at_the_bound(
    botpress: tuple[str, FastAPI],
) -> None:
    """An event stream's reader buffers a line until it ends: the listen stream's bytes
    are counted as they come (GATEWAY_PIPELINE_MAX_RESPONSE_BYTES), and the gateway stops
    reading."""
    url, app = botpress
    conv = bp_engine(url, pipeline_max_response_bytes=1_048_576, turn_timeout_s=20)
    await pipeline_error(conv, "Botpress's answer is larger than 1048576 bytes", "endless")
    await cut_early(app)
    await conv.pipeline.aclose()


async def test_signals_that_are_no_answer_do_not_put_off_the_reply_timeout(
    botpress: tuple[str, FastAPI],
) -> None:
    """GATEWAY_BOTPRESS_REPLY_TIMEOUT_S counts from the message sent: a listen stream busy
    with other signals (every 0.2 s for 3 s here) restarted a wait per signal, and the
    turn failed only after the chatter had stopped."""
    url, app = botpress
    conv = bp_engine(url, botpress_reply_timeout_s=1.0, turn_timeout_s=20)
    await pipeline_error(conv, "did not answer within 1 s", "chatty")
    assert not app.state.chatter_done.is_set()  # before: only after the 3 s of chatter
    await conv.pipeline.aclose()


async def test_a_slow_bot_is_bounded_by_the_turn_timeout(botpress: tuple[str, FastAPI]) -> None:
    url, _ = botpress
    conv = bp_engine(url, botpress_reply_timeout_s=8.0, turn_timeout_s=0.5)
    await pipeline_error(conv, "did not answer within 0.5 s", "slow")
    await conv.pipeline.aclose()


async def test_a_wrong_webhook_id_is_a_pipeline_error(botpress: tuple[str, FastAPI]) -> None:
    url, _ = botpress
    conv = engine(pipeline="botpress:nope", botpress_url=url)
    await pipeline_error(conv, "Botpress answered POST /users with HTTP 404", "hi")
    await conv.pipeline.aclose()


async def test_a_flowstorm_v2_text_conversation_through_botpress(
    botpress: tuple[str, FastAPI],
) -> None:
    url, _ = botpress
    async with (
        gateway(
            pipeline="botpress:",
            botpress_webhook_id=WEBHOOK_ID,
            botpress_url=url,
            botpress_idle_s=IDLE_S,
        ) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        for text, lines in (
            ("my name is grace", ["< Hello Grace."]),
            ("what is my name", ["< You are Grace."]),
            ("bye", ["< Bye now.", "."]),
        ):
            body = (await v2_put(client, "bp", text)).text
            assert [line for line in body.splitlines() if line[:2] in ("< ", ".")] == lines


@pytest.mark.parametrize("lost", ["conversation", "user", "user-403", "manual"])
async def test_a_user_or_conversation_botpress_no_longer_knows_is_made_anew(
    botpress: tuple[str, FastAPI], lost: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's Chat conversation (404 at listen) or user key (401, or 403) that
    Botpress dropped (deleted, the integration reinstalled) is made anew in the same
    turn, once, with a WARNING: the turn is answered and the session goes on. Before,
    the stale ids, kept by every failed turn (durable state), failed each of the
    session's turns (and a 403 still did)."""
    url, app = botpress
    more: dict[str, Any] = {}
    if lost == "manual":  # the conversation, got or created again by its derived id
        app.state.encryption_key = "integration-encryption-key-0123456789"
        more["botpress_encryption_key"] = SecretStr(app.state.encryption_key)
    conv = bp_engine(url, **more)
    assert texts(await conv.turn(ctx(), Input.of("yes")).collect()) == ["Let us start."]
    app.state.conversations.clear()
    if lost.startswith("user"):
        app.state.users.clear()
        app.state.unknown_key_status = 403 if lost == "user-403" else 401
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        assert texts(await conv.turn(ctx(), Input.of("yes")).collect()) == ["Let us start."]
    assert any("made anew" in r.getMessage() for r in caplog.records)
    assert texts(await conv.turn(ctx(), Input.of("yes")).collect()) == ["Let us start."]
    calls = [(m, p) for m, p, _ in app.state.calls]
    if lost == "manual":
        assert calls.count(("POST", "/conversations/get-or-create")) == 2
    else:
        assert calls.count(("POST", "/conversations")) == 2
        assert calls.count(("POST", "/users")) == (2 if lost.startswith("user") else 1)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_kept_user_without_a_conversation_botpress_no_longer_knows_is_made_anew(
    botpress: tuple[str, FastAPI], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A first turn that made the Chat user, then failed to make its conversation,
    keeps the user (durable state) and no conversation. When Botpress no longer takes
    that user key (the user deleted, the integration reinstalled: 401, or 403 / 404 for
    the user), ``POST /conversations`` with it is refused: before, every later turn of
    the session failed so ("Botpress answered HTTP 401"); now the user and its
    conversation are made anew in the same turn, with a WARNING, and the turn is
    answered."""
    url, app = botpress
    conv = bp_engine(url)
    app.state.conversation_refusal = 503
    await pipeline_error(conv, "Botpress answered POST /conversations with HTTP 503", "hi")
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert set(session.pipeline_state) >= {"userId", "userKey"}
    assert "conversationId" not in session.pipeline_state
    stale = session.pipeline_state["userKey"]
    app.state.conversation_refusal = None
    app.state.users.clear()  # Botpress forgot the user
    app.state.unknown_key_status = status
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.botpress"] == [
        f"Botpress answered POST /conversations with HTTP {status} for the session's kept "
        "user and conversation: made anew"
    ]
    assert texts(await conv.turn(ctx(), Input.of("yes")).collect()) == ["Let us start."]
    calls = [(m, p) for m, p, _ in app.state.calls]
    assert calls.count(("POST", "/users")) == 2
    assert calls.count(("POST", "/conversations")) == 3  # refused twice, then made
    after = await conv.store.get(ctx().key)
    assert after is not None
    assert after.pipeline_state["userKey"] != stale
    await conv.pipeline.aclose()


async def test_a_kept_conversation_without_its_user_is_not_listened_to_with_another(
    botpress: tuple[str, FastAPI],
) -> None:
    """A session that kept a conversation id but no user key gets a new user, whose
    conversation is a new one too: the kept one was another user's. Before, the new user
    listened to the kept conversation, which Botpress refuses (403): every later turn of
    the session failed."""
    url, app = botpress
    conv = bp_engine(url)
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    async with conv.store.open(ctx().key, lease_s=5, wait_s=5) as txn:
        session = txn.session
        assert session is not None
        kept = session.pipeline_state["conversationId"]
        del session.pipeline_state["userKey"]
        txn.save(session, session.timeout_s)
    assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    listened = [p for m, p, _ in app.state.calls if m == "GET"]
    assert listened[0] == f"/conversations/{kept}/listen"
    assert listened[1] != listened[0]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_ids_made_anew_in_the_turn_are_not_made_anew_again_when_refused_too(
    botpress: tuple[str, FastAPI], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Listen refusing every user and conversation with a stale status (a Chat API that
    refuses all keys, not only the session's kept ones; a proxy's 403): the kept ids are
    made anew once, the new ones are not (the turn's loop ends: the turn fails as
    Botpress's error), and, the new ones refused the same way, the refusal was not about
    the kept ids: they are kept, and no WARNING says they were made anew (one says the
    new ones failed too). The next turn, Botpress well again, goes on with them. Before,
    the kept ids were dropped for the new ones, after a WARNING "made anew"."""
    url, app = botpress
    conv = bp_engine(url)
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    before = await conv.store.get(ctx().key)
    assert before is not None
    app.state.calls.clear()
    app.state.listen_refusal = status
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline.botpress"):
        await pipeline_error(conv, f"Botpress answered listen with HTTP {status}", "again")
    calls = [(m, p.rsplit("/", 1)[-1] if m == "GET" else p) for m, p, _ in app.state.calls]
    anew = [("POST", "/users")] if status != 404 else []  # 404: the conversation alone
    assert calls == [("GET", "listen"), *anew, ("POST", "/conversations"), ("GET", "listen")]
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.botpress"]
    assert not any("made anew" in line for line in said)
    what = "conversation" if status == 404 else "user and conversation"
    assert (
        f"Botpress answered listen with HTTP {status} for the session's kept {what}, and the "
        "new ones failed too: kept (the refusal was not about them)"
    ) in said
    session = await conv.store.get(ctx().key)
    assert session is not None
    for name in ("userId", "userKey", "conversationId"):
        assert session.pipeline_state[name] == before.pipeline_state[name]
    app.state.listen_refusal = None
    app.state.calls.clear()
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    assert [m for m, _, _ in app.state.calls] == ["GET", "POST"]  # the kept ids, no new ones
    await conv.pipeline.aclose()


async def test_why_botpress_refused_goes_to_the_log_its_key_hidden(
    botpress: tuple[str, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """A non-2xx answer to a call or to listen: the fixed text for the client, the same
    with the body's start in the log (WARNING), the session's x-user-key hidden. Before,
    the body was not read: nothing told the operator why."""
    url, app = botpress
    conv = bp_engine(url)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(
            conv, "Botpress answered POST /messages with HTTP 500", "boom"
        )
        app.state.listen_refusal = 503
        await pipeline_error(conv, "Botpress answered listen with HTTP 503", "hi")
    assert "internal error" not in str(events[-1])
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert lines == [
        'Botpress answered POST /messages with HTTP 500: {"message":"internal error"}',
        'Botpress answered listen with HTTP 503: {"message":"listen is down for '
        'maintenance (x-user-key ***)"}',
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    "key", ["clé-é", "key\nx-injected: 1", "key\x00", " key", "k" * 4097], ids=repr
)
async def test_a_user_key_no_header_can_carry_is_refused_and_not_kept(
    botpress: tuple[str, FastAPI], key: str
) -> None:
    """A key ``POST /users`` answers that is no usable header value (past ASCII, a
    control character, too long: a broken server or proxy) fails the turn as Botpress's
    error, and is not kept: the next turn makes another user and is answered. Before, it
    was kept (durable state) and sent as ``x-user-key``: every later turn of the session
    failed, unexpectedly (UnicodeEncodeError) or as a broken connection (h11's
    LocalProtocolError)."""
    url, app = botpress
    conv = bp_engine(url)
    app.state.user_key = key
    await pipeline_error(conv, "Botpress created a user whose key is not a usable header", "hi")
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert "userKey" not in session.pipeline_state
    app.state.user_key = None
    assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    assert [p for _, p, _ in app.state.calls].count("/users") == 2
    await conv.pipeline.aclose()


async def test_a_kept_user_key_no_header_can_carry_is_dropped_and_the_user_made_anew(
    botpress: tuple[str, FastAPI],
) -> None:
    """A session that kept a user key no header can carry (stored before the check) gets
    a new user and conversation on its next turn, which is answered; before, every turn
    of it failed."""
    url, app = botpress
    conv = bp_engine(url)
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    async with conv.store.open(ctx().key, lease_s=5, wait_s=5) as txn:
        session = txn.session
        assert session is not None
        kept_conversation = session.pipeline_state["conversationId"]
        session.pipeline_state["userKey"] = "caf\u00e9\n"
        txn.save(session, session.timeout_s)
    assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    after = await conv.store.get(ctx().key)
    assert after is not None
    assert usable_key(after.pipeline_state["userKey"])
    assert after.pipeline_state["conversationId"] != kept_conversation
    assert [p for _, p, _ in app.state.calls].count("/users") == 2
    await conv.pipeline.aclose()


async def test_a_wrong_webhook_id_does_not_make_the_kept_user_anew(
    botpress: tuple[str, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """A session that kept a user and no conversation (its first turn failed after making
    the user), then every call 404 (a wrong webhook id: the integration deleted, the id
    changed): ``POST /conversations`` is 404 as for a user Botpress no longer knows, so
    the user is set aside and made anew, which fails too (``POST /users`` 404). The turn
    fails naming that call, the kept user is put back (the 404 was not about it), and no
    WARNING says it was made anew. Before, a WARNING "... kept user and conversation:
    made anew" came first, the error said only "HTTP 404", and the kept user was
    dropped: the session's next turn, the webhook back, made another user."""
    url, app = botpress
    conv = bp_engine(url)
    app.state.conversation_refusal = 503
    await pipeline_error(conv, "Botpress answered POST /conversations with HTTP 503", "hi")
    kept = await conv.store.get(ctx().key)
    assert kept is not None
    user_key = kept.pipeline_state["userKey"]
    app.state.conversation_refusal = None
    app.state.webhook_gone = True
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline.botpress"):
        await pipeline_error(conv, "Botpress answered POST /users with HTTP 404", "again")
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.botpress"]
    assert not any("made anew" in line for line in said)
    assert (
        "Botpress answered POST /conversations with HTTP 404 for the session's kept user and "
        "conversation, and the new ones failed too: kept (the refusal was not about them)"
    ) in said
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state["userKey"] == user_key
    app.state.webhook_gone = False
    assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    assert [p for m, p, _ in app.state.calls if m == "POST"].count("/users") == 2
    after = await conv.store.get(ctx().key)
    assert after is not None
    assert after.pipeline_state["userKey"] == user_key
    await conv.pipeline.aclose()
