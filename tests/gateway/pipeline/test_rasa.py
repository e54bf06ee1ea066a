"""The Rasa core against a real (fake) Rasa REST channel on a free port
(tests/gateway/pipeline/fake_rasa.py): streamed and whole answers, state, rich items,
the end of a conversation, failures, and a whole Flowstorm V2 conversation."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.events import (
    Input,
    ResponseEvent,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    transfer_target,
)
from gateway.metrics import REGISTRY
from gateway.turn import TurnContext
from tests.conftest import gateway
from tests.gateway.pipeline.fake_rasa import ATTACHMENTS
from tests.gateway.turns import (
    ctx,
    engine,
    failed_session,
    items,
    pipeline_error,
    said,
    streamed,
    texts,
    v2_put,
)


async def test_one_session_id_on_two_channels_is_two_rasa_conversations(
    rasa: tuple[str, FastAPI],
) -> None:
    """The sender is the session's key (``<channel>:<id>``): a client of another channel
    that proposes the same session id (a Flowstorm V1 client chooses its own) gets its
    own tracker, and never reads the slots of the first channel's conversation."""
    url, app = rasa
    conv = engine(pipeline=f"rasa+{url}")
    await conv.turn(ctx(), Input.of("my name is ada")).collect()
    other = TurnContext(channel="other", session_id="s1", app_key="app")
    assert texts(await conv.turn(other, Input.of("what is my name")).collect()) == [
        "You are a stranger."
    ]
    assert texts(await conv.turn(ctx(), Input.of("what is my name")).collect()) == ["You are Ada."]
    assert [r["sender"] for r in app.state.requests] == ["test:s1", "other:s1", "test:s1"]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_multi_turn_conversation_with_state_and_buttons(
    rasa: tuple[str, FastAPI], stream: bool
) -> None:
    url, app = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream)
    intro = await conv.turn(ctx(), Input.of("#intro")).collect()
    assert isinstance(intro[0], SessionStartedEvent)
    item = next(e.response_item for e in intro if isinstance(e, ResponseItemEvent))
    assert item.text == "Hey! How are you?"
    assert json.loads(item.code or "") == {
        "buttons": [
            {"name": "great", "request": {"type": "text", "payload": "/mood_great"}},
            {"name": "sad", "request": {"type": "text", "payload": "/mood_unhappy"}},
        ]
    }
    # saying a button's title sends its payload
    assert texts(await conv.turn(ctx(), Input.of("Great")).collect()) == ["Great, carry on!"]
    await conv.turn(ctx(), Input.of("my name is ada")).collect()
    assert texts(await conv.turn(ctx(), Input.of("what is my name")).collect()) == ["You are Ada."]
    sent = app.state.requests
    assert [r["message"] for r in sent] == [
        "/greet",
        "/mood_great",
        "my name is ada",
        "what is my name",
    ]
    assert {r["sender"] for r in sent} == {"test:s1"}  # the session key is the sender
    assert len({r["_peer"] for r in sent}) == 1  # one kept-alive connection for every turn
    assert sent[0]["metadata"] == {"channel": "test", "appKey": "app", "locale": "en-US", "turn": 1}
    assert sent[3]["metadata"]["turn"] == 4
    assert all(r["_query"].get("stream") == ("true" if stream else None) for r in sent)
    await conv.pipeline.aclose()


async def test_rich_items_transfer_and_end_of_conversation(rasa: tuple[str, FastAPI]) -> None:
    url, _ = rasa
    conv = engine(pipeline=f"rasa+{url}/")
    picture = await conv.turn(ctx(), Input.of("picture")).collect()
    items = [e.response_item for e in picture if isinstance(e, ResponseItemEvent)]
    assert [(i.text, i.image) for i in items] == [
        ("Here is a cat.", None),
        (None, "https://example.com/cat.png"),
    ]
    agent = await conv.turn(ctx(), Input.of("agent")).collect()
    items = [e.response_item for e in agent if isinstance(e, ResponseItemEvent)]
    assert items[0].text == "Connecting you."
    assert transfer_target(items[1]) == ("+15551234567", "asked for a person")
    bye = await conv.turn(ctx(), Input.of("bye")).collect()
    assert texts(bye) == ["Bye!", "See you soon."]  # Rasa split the text on the blank line
    final = bye[-2]
    assert isinstance(final, ResponseEvent)
    assert final.response.session_ended is True
    assert isinstance(bye[-1], SessionEndedEvent)
    assert await conv.store.get(ctx().key) is None
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_custom_text_without_ssml_is_said(rasa: tuple[str, FastAPI], stream: bool) -> None:
    """``custom {"end_session": true, "text": "Bye"}`` ended the session without a word:
    a custom's ``text`` was read only as the written form of its ``ssml``. Alone it is
    said, before the session ends."""
    url, _ = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream)
    bye = await conv.turn(ctx(), Input.of("farewell")).collect()
    assert [(i.text, i.ssml) for i in items(bye)] == [("Bye", None)]
    final = bye[-2]
    assert isinstance(final, ResponseEvent)
    assert final.response.session_ended is True
    assert isinstance(bye[-1], SessionEndedEvent)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_transfer_without_a_target_is_a_warning_and_the_turn_goes_on(
    rasa: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``custom {"transfer": {"reason"}}`` names no target: it was handed to the client
    as the command item ``#custom`` without a word in the log. As every core's handoff
    without a target: the turn's items go out, no transfer (nor a ``#custom`` of it),
    one WARNING naming Rasa, and the turn ends normally."""
    url, _ = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream)
    caplog.set_level(logging.WARNING)
    events = await conv.turn(ctx(), Input.of("nobody")).collect()
    assert isinstance(events[-1], ResponseEvent), events
    assert not events[-1].response.session_ended
    assert texts(events) == ["Connecting you.", "Please hold on."]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "Rasa asked for a transfer without a target and no handoff target is configured "
        "(the custom names none); not handed off"
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_bare_url_attachment_is_the_media_its_extension_names(
    rasa: tuple[str, FastAPI], stream: bool
) -> None:
    """An ``attachment`` that is a bare http(s) URL (or an untyped ``{payload: {src|url}}``)
    was always taken for audio: a picture or a PDF was "played". Now its path's extension
    says which media field it fills (the query is not read); a document, a URL without an
    extension, one that is not http(s) or has a malformed host is the command item
    ``#attachment`` with it as code; a typed one keeps its type."""
    url, _ = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream)
    got = items(await conv.turn(ctx(), Input.of("files")).collect())
    assert [(i.audio, i.image, i.video) for i in got[:3]] == [
        ("https://cdn.example.com/song.MP3", None, None),
        (None, "https://cdn.example.com/cat.png?name=x.pdf", None),
        (None, None, "https://cdn.example.com/clip.mp4"),
    ]
    links = got[3:7]
    assert [i.text for i in links] == ["#attachment"] * 4
    assert [(i.audio, i.image, i.video) for i in links] == [(None, None, None)] * 4
    assert [json.loads(i.code or "") for i in links] == ATTACHMENTS[3:7]
    assert [(i.audio, i.image, i.video) for i in got[7:]] == [
        (None, "https://cdn.example.com/dog.jpg", None),
        ("https://cdn.example.com/voice.ogg", None, None),
        ("https://cdn.example.com/voice", None, None),
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_carousel_elements_without_buttons_are_plain_text(
    rasa: tuple[str, FastAPI], stream: bool
) -> None:
    """Rasa sends each element of a carousel as ``title : subtitle`` with its buttons, an
    element without any as ``"buttons": []``: that item offered the empty quick replies
    ``{"buttons": []}`` as its code; now it is the text alone."""
    url, app = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream)
    got = items(await conv.turn(ctx(), Input.of("carousel")).collect())
    assert [i.text for i in got] == ["Margherita : tomato", "Funghi : mushrooms"]
    assert json.loads(got[0].code or "") == {
        "buttons": [{"name": "Order", "request": {"type": "text", "payload": "/order"}}]
    }
    assert got[1].code is None
    # the element's button can still be said
    assert texts(await conv.turn(ctx(), Input.of("order")).collect()) == ["intent order"]
    assert app.state.requests[-1]["message"] == "/order"
    await conv.pipeline.aclose()


async def test_a_buttons_null_title_or_payload_is_taken_as_absent(
    rasa: tuple[str, FastAPI],
) -> None:
    """Rasa removes only a message's own null fields, not a button's: a domain's empty
    ``payload:`` comes as ``"payload": null``. That button's request was the text
    ``"null"`` (sent to Rasa when the user said its title), and a button whose title is
    null was named ``"None"``; now a null field is an absent one: the payload falls back
    to the title, the name to the payload."""
    url, app = rasa
    conv = engine(pipeline=f"rasa+{url}")
    got = items(await conv.turn(ctx(), Input.of("nullbuttons")).collect())
    assert json.loads(got[0].code or "") == {
        "buttons": [
            {"name": "Yes", "request": {"type": "text", "payload": "Yes"}},
            {"name": "/no", "request": {"type": "text", "payload": "/no"}},
        ]
    }
    await conv.turn(ctx(), Input.of("yes")).collect()
    assert app.state.requests[-1]["message"] == "Yes"
    await conv.pipeline.aclose()


async def test_stream_items_are_forwarded_as_they_arrive(rasa: tuple[str, FastAPI]) -> None:
    url, app = rasa
    conv = engine(pipeline=f"rasa+{url}")
    rest = await streamed(conv, app.state.release, "stream")
    assert texts(rest) == ["second"]
    assert isinstance(rest[-1], ResponseEvent)
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("text", "stream", "words"),
    [
        ("boom", True, "Rasa answered HTTP 500"),
        ("slow", True, "The core pipeline (rasa) did not answer within 0.5 s."),
        # reached, then dropped mid-answer: not "could not be reached"
        ("crash", True, "the connection to Rasa failed: RemoteProtocolError"),
        ("garbage", False, "Rasa answered invalid JSON"),
        ("object", False, "something else than an array"),
        ("badline", True, "Rasa streamed an invalid line"),
        # Rasa ends every line: one without its end was cut off (it was taken as whole)
        ("unended", True, "Rasa's stream ended inside a line (cut off)"),
        ("deep", False, "Rasa answered invalid JSON: the JSON is nested deeper than 64 levels"),
        ("deep", True, "Rasa streamed an invalid line: the JSON is nested deeper than 64 levels"),
        # another user's message (Rasa names the sender it answers): it was forwarded
        ("stranger", False, "Rasa sent a message for another recipient than the sender"),
        ("stranger", True, "Rasa sent a message for another recipient than the sender"),
    ],
)
async def test_core_failures_are_pipeline_errors_and_the_session_is_kept(
    rasa: tuple[str, FastAPI], text: str, stream: bool, words: str
) -> None:
    url, _ = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream, turn_timeout_s=0.5)
    await conv.turn(ctx(), Input.of("hello")).collect()
    failures = REGISTRY.get_sample_value("gateway_core_errors_total", {"core": "rasa"}) or 0
    await pipeline_error(conv, words, text)
    # counted by core name, timeouts too
    assert REGISTRY.get_sample_value("gateway_core_errors_total", {"core": "rasa"}) == failures + 1
    await failed_session(conv, 1)
    # the next turn goes on, and is no failure
    assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    assert REGISTRY.get_sample_value("gateway_core_errors_total", {"core": "rasa"}) == failures + 1
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_custom_ssml_whose_text_is_not_a_string_is_rasas_error(
    rasa: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``custom {"ssml", "text": 5}`` failed the item's validation inside the parser: the
    turn ended as "the core pipeline failed unexpectedly (ValidationError)" with an ERROR
    traceback. It is a malformed answer of Rasa's: a PipelineError naming Rasa, logged at
    WARNING, and the session goes on. A well-formed one is an item with both."""
    url, _ = rasa
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream)
    got = items(await conv.turn(ctx(), Input.of("spoken")).collect())
    assert [(i.text, i.ssml) for i in got] == [("Listen.", None), ("Hi!", "<speak>Hi!</speak>")]
    caplog.set_level(logging.WARNING)
    caplog.clear()
    await pipeline_error(conv, "Rasa sent a custom ssml whose text is not a string", "badssml")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await failed_session(conv, 1)
    assert texts(await conv.turn(ctx(), Input.of("again")).collect()) == ["You said: again"]
    await conv.pipeline.aclose()


async def test_token_and_error_turn(rasa: tuple[str, FastAPI]) -> None:
    url, app = rasa
    app.state.token = "s3cret"
    without = engine(pipeline=f"rasa+{url}")
    await pipeline_error(without, "HTTP 401", "hi")
    await without.pipeline.aclose()
    conv = engine(pipeline=f"rasa+{url}", rasa_token=SecretStr("s3cret"), error_turn=True)
    assert texts(await conv.turn(ctx("s2"), Input.of("hi")).collect()) == ["You said: hi"]
    # a failing turn runs #error, which Rasa gets as the intent /error
    assert texts(await conv.turn(ctx("s2"), Input.of("boom")).collect()) == ["intent error"]
    assert app.state.requests[-1]["_query"]["token"] == "s3cret"
    await conv.pipeline.aclose()


async def test_a_flowstorm_v2_text_conversation_through_rasa(rasa: tuple[str, FastAPI]) -> None:
    url, app = rasa
    async with (
        gateway(pipeline=f"rasa+{url}") as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        before = core_turns((await client.get("/metrics")).text, "rasa")
        first = await v2_put(client, "shop", "my name is grace")
        assert said(first.text) == ["Nice to meet you, Grace."]
        asked = await v2_put(client, "shop", "what is my name")
        assert said(asked.text) == ["You are Grace."]
        bye = await v2_put(client, "shop", "bye")
        assert said(bye.text) == ["Bye!", "See you soon."]
        assert bye.text.endswith("\n.\n")  # the session ended
        after = core_turns((await client.get("/metrics")).text, "rasa")
    senders = {r["sender"] for r in app.state.requests}
    assert len(senders) == 1  # one V2 session (its cookie) is one Rasa sender
    assert after - before == 3  # the core's latency, by core name


def core_turns(metrics: str, core: str) -> float:
    """The count of ``gateway_core_seconds{core}`` in a /metrics text (0 when absent)."""
    prefix = f'gateway_core_seconds_count{{core="{core}"}} '
    return sum(
        float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)
    )


@pytest.mark.parametrize("stream", [True, False])
async def test_why_rasa_refused_goes_to_the_log_bounded_and_redacted(
    rasa: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-2xx answer: the client gets the fixed "Rasa answered HTTP <status>", the
    log (WARNING) the same with the start of the body, on one line, cut, the token
    hidden. Before, the body was not read at all: nothing told the operator why."""
    url, app = rasa
    app.state.token = "s3cret-token"
    conv = engine(pipeline=f"rasa+{url}", rasa_stream=stream, rasa_token=SecretStr("s3cret-token"))
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(conv, "Rasa answered HTTP 500", "boom")
        await pipeline_error(conv, "Rasa answered HTTP 403", "leak")
    assert "internal" not in str(events[-1])
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert lines[0] == 'Rasa answered HTTP 500: {"error":"internal"}'
    assert lines[1].startswith("Rasa answered HTTP 403: denied token=*** xxx")
    assert "s3cret" not in lines[1]
    assert len(lines[1]) < 400
    await conv.pipeline.aclose()
