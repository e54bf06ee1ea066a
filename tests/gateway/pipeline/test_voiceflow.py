"""The Voiceflow core against a real (fake) Dialog Manager runtime on a free port
(tests/gateway/pipeline/fake_voiceflow.py), through the state interact endpoint and the
interact stream: state, traces mapped to items, the end, failures, a V2 conversation."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import SecretStr

from gateway.conversation import Conversation
from gateway.events import (
    Input,
    ResponseEvent,
    ResponseItem,
    SessionEndedEvent,
    transfer_target,
)
from gateway.ssml import SSML_ANSWER_MAX_CHARS
from gateway.turn import TurnContext
from tests.adapters.alexa.test_routes import envelope
from tests.adapters.google.requests import v3
from tests.conftest import gateway
from tests.gateway.core_app import cut_early
from tests.gateway.pipeline.fake_voiceflow import API_KEY, trace
from tests.gateway.turns import (
    ctx,
    engine,
    fails_then_recovers,
    items,
    pipeline_error,
    streamed,
    texts,
    v2_put,
)
from tests.loop_ticker import LoopTicker

KEY = SecretStr(API_KEY)


def vf_engine(url: str, stream: bool, spec: str = "voiceflow:", **more: Any) -> Conversation:
    """An engine whose core is the runtime at ``url``, streaming or not."""
    return engine(
        pipeline=spec,
        voiceflow_api_key=KEY,
        voiceflow_runtime_url=url,
        voiceflow_project_id="proj1" if stream else None,
        **more,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_conversation_state_and_traces_mapped(
    voiceflow: tuple[str, FastAPI], stream: bool
) -> None:
    url, app = voiceflow
    conv = vf_engine(url, stream, spec="voiceflow:development")
    launch = await conv.turn(ctx(), Input.of("#intro")).collect()
    got = items(launch)
    assert got[0].text == "Welcome to the pizza shop."
    assert (got[1].text, got[1].audio) == ("What size?", "https://cdn.example.com/tts/size.mp3")
    assert json.loads(got[2].code or "")["buttons"][0] == {
        "name": "Large",
        "request": {"type": "path-large", "payload": {"label": "Large", "actions": []}},
    }
    assert len(got) == 3  # the debug and no-reply traces give no item
    response = launch[-1]
    assert isinstance(response, ResponseEvent)
    assert response.response.attributes["noReplyTimeoutMs"] == 7000
    # saying a button's name follows its path
    large = items(await conv.turn(ctx(), Input.of("large")).collect())
    assert [(i.text, i.image) for i in large] == [
        ("A large pizza.", None),
        (None, "https://cdn.example.com/pizza.png"),
    ]
    asked = await conv.turn(ctx(), Input.of("what size")).collect()
    assert texts(asked) == ["You ordered a large pizza."]
    silent = await conv.turn(ctx(), Input.of("#silence")).collect()
    assert texts(silent) == ["Still there?"]
    sent = app.state.requests
    assert [r["action"] for r in sent] == [
        {"type": "launch"},
        {"type": "path-large", "payload": {"label": "Large", "actions": []}},
        {"type": "text", "payload": "what size"},
        {"type": "no-reply"},
    ]
    assert {r["_user"] for r in sent} == {"test:s1"}  # the session key, URL-quoted
    assert {r["_version"] for r in sent} == {"development"}
    assert sent[0]["config"] == {"tts": False, "stripSSML": False}  # (the SSML is read here)
    if stream:
        assert {r["_project"] for r in sent} == {"proj1"}
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_one_session_id_on_two_channels_is_two_voiceflow_users(
    voiceflow: tuple[str, FastAPI], stream: bool
) -> None:
    """The user id is the session's key (``<channel>:<id>``): a client of another channel
    that proposes the same session id gets its own Voiceflow state, never the variables
    of the first channel's conversation."""
    url, app = voiceflow
    conv = vf_engine(url, stream)
    await conv.turn(ctx(), Input.of("#intro")).collect()
    await conv.turn(ctx(), Input.of("large")).collect()
    other = TurnContext(channel="other", session_id="s1", app_key="app")
    asked = await conv.turn(other, Input.of("what size")).collect()
    assert texts(asked) == ["You ordered a no pizza."]
    assert texts(await conv.turn(ctx(), Input.of("what size")).collect()) == [
        "You ordered a large pizza."
    ]
    assert [r["_user"] for r in app.state.requests] == [
        "test:s1",
        "test:s1",
        "other:s1",
        "test:s1",
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_socket_clients_intent_and_event_reach_the_agent_as_they_came(
    voiceflow: tuple[str, FastAPI], stream: bool
) -> None:
    """An ``intent`` (with its entities) or ``event`` request of a Voiceflow socket client
    is sent to the Dialog Manager as it came; it was sent as ``{type: "<intent name>"}``,
    a general request that no agent step matches. On another channel the same attributes
    are not honoured."""
    url, app = voiceflow
    conv = vf_engine(url, stream)
    socket = TurnContext(channel="voiceflow", session_id="s1", app_key="app")
    intent = {
        "type": "intent",
        "payload": {
            "intent": {"name": "order_pizza"},
            "entities": [{"name": "size", "value": "large"}],
            "confidence": 0.8,
        },
    }
    said = Input.of("#order_pizza", attributes={"voiceflowAction": intent})
    assert texts(await conv.turn(socket, said).collect()) == [
        "Intent order_pizza with {'size': 'large'}."
    ]
    event = {"type": "event", "payload": {"event": {"name": "wake"}}}
    woke = Input.of("#wake", attributes={"voiceflowAction": event})
    assert texts(await conv.turn(socket, woke).collect()) == ["Event wake."]
    other = await conv.turn(
        ctx(), Input.of("#order_pizza", attributes={"voiceflowAction": intent})
    ).collect()
    assert texts(other) == ["unhandled order_pizza"]
    assert [r["action"] for r in app.state.requests] == [intent, event, {"type": "order_pizza"}]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_custom_action_transfer_and_end(voiceflow: tuple[str, FastAPI], stream: bool) -> None:
    url, _ = voiceflow
    conv = vf_engine(url, stream)
    agent = items(await conv.turn(ctx(), Input.of("agent")).collect())
    assert agent[0].text == "Transferring."
    assert transfer_target(agent[1]) == ("sip:agent@example.com", "human")
    bye = await conv.turn(ctx(), Input.of("bye")).collect()
    assert texts(bye) == ["Goodbye."]
    assert isinstance(bye[-2], ResponseEvent)
    assert bye[-2].response.session_ended
    assert isinstance(bye[-1], SessionEndedEvent)
    assert await conv.store.get(ctx().key) is None
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_handoff_without_a_target_is_a_warning_and_the_turn_goes_on(
    voiceflow: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``handoff`` custom action whose payload names no target was handed to the
    client as the command item ``#handoff`` without a word in the log. As every core's
    handoff without a target: the turn's items go out, no transfer (nor a command item
    of it), one WARNING naming Voiceflow, and the turn ends normally."""
    url, _ = voiceflow
    conv = vf_engine(url, stream)
    caplog.set_level(logging.WARNING)
    events = await conv.turn(ctx(), Input.of("nobody")).collect()
    assert isinstance(events[-1], ResponseEvent), events
    assert texts(events) == ["Transferring."]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "Voiceflow asked for a handoff custom action without a target and no handoff target "
        "is configured (the payload names none); not handed off"
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_traces_of_unknown_types_are_logged_at_debug(
    voiceflow: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Traces of a type the connector does not know and without paths (no custom
    action) give no item, and their types go to the log at DEBUG, one line for the
    turn, each once, clipped; ``debug`` (known, ignored) is not named. Before, they were
    dropped without a word."""
    url, _ = voiceflow
    caplog.set_level(logging.DEBUG, logger="gateway.pipeline.voiceflow")
    conv = vf_engine(url, stream)
    assert texts(await conv.turn(ctx(), Input.of("news")).collect()) == ["The news."]
    lines = [r for r in caplog.records if "unknown types" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.DEBUG
    line = lines[0].getMessage()
    assert line.startswith("Voiceflow sent traces of unknown types ['carouselV3', 'xxx")
    assert line.endswith("; dropped")
    assert line.count("carouselV3") == 1
    assert "debug" not in line
    assert len(line) < 400
    caplog.clear()
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    assert not [r for r in caplog.records if "unknown types" in r.getMessage()]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_audio_player_stream_trace_is_an_audio_item(
    voiceflow: tuple[str, FastAPI], stream: bool
) -> None:
    """A ``stream`` trace (the audio player step) gives its ``src`` as an audio item
    (CORES.md, the mapping's audio URL: ``stream.src``); it was dropped, the song lost."""
    url, _ = voiceflow
    conv = vf_engine(url, stream)
    got = items(await conv.turn(ctx(), Input.of("music")).collect())
    assert [(i.text, i.audio) for i in got] == [
        ("Here is a song.", None),
        (None, "https://cdn.example.com/song.mp3"),
    ]
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_speak_message_with_ssml_is_an_ssml_item_with_its_words_as_text(
    voiceflow: tuple[str, FastAPI], stream: bool
) -> None:
    """A voice agent's ``speak`` message carries SSML (CORES.md, the mapping's text / ssml:
    ``speak.message``): it is the item's ``ssml``, a ``<speak>`` document (wrapped when it
    was not; a bare ``&`` of a message written by hand escaped), and its words the item's
    ``text``, so voice assistants speak the markup and screens show the words. A message
    without SSML tags (``5 < 6 & 7 > 2``, HTML's ``<b>``) stays plain text. Before, the
    runtime was asked to strip the tags (``stripSSML``, as the fake runtime does too), so the
    markup was lost and the plain text mangled (``5  2``); a runtime that sent the tags had
    them read out and shown (the message was the item's text). A message of a sound alone
    is that audio item."""
    url, _ = voiceflow
    conv = vf_engine(url, stream)
    got = items(await conv.turn(ctx(), Input.of("voice")).collect())
    assert [(i.text, i.ssml) for i in got[:-1]] == [
        (
            "Hello there",
            '<speak><voice name="Joanna">Hello <emphasis level="strong">there</emphasis>'
            "</voice></speak>",
        ),
        ("Hi again", '<speak>Hi<break time="500ms"/>again</speak>'),
        ("Tom & Jerry are here.", "<speak>Tom &amp; Jerry<break/>are here.</speak>"),
        ("5 < 6 & 7 > 2", None),
        ("I <3 pizza & <b>pasta</b>", None),
    ]
    # a sound alone: an audio item, as a speak of type audio (before: SSML, no text or audio)
    assert got[-1] == ResponseItem(audio="https://cdn.example.com/chime.mp3")
    await conv.pipeline.aclose()


_MUCH_SSML: dict[str, Callable[[int], str]] = {
    # not well-formed (unclosed tags, read leniently: pure Python)
    "unclosed": lambda i: f"<speak>Word{i}. " + "<emphasis>" * 3_000 + "</speak>",
    # well-formed, 3,700 elements (parsed up to three times)
    "elements": lambda i: f"<speak>Word{i}. " + "<break/>" * 3_700 + "</speak>",
}
"""Messages of 30 KB of SSML each (``Word<i>.`` and markup)."""


async def _loop_time(conv: Conversation, said: str) -> tuple[float, list[ResponseItem]]:
    """The time the event loop (this test's: it serves the fake runtime and runs the
    turn) was held while ``conv`` answered ``said``: what a ticker of 5 ms lost, all its
    gaps together; and the turn's items."""
    async with LoopTicker(0.005) as ticker:
        await asyncio.sleep(0.02)
        events = await conv.turn(ctx(), Input.of(said)).collect()
        await asyncio.sleep(0.02)  # (the gap over the turn's last work, recorded)
    return ticker.lost_s, items(events)


@pytest.mark.parametrize("shape", sorted(_MUCH_SSML))
@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_of_much_ssml_is_read_up_to_a_bound_per_turn(
    voiceflow: tuple[str, FastAPI], stream: bool, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SSML of one turn's ``speak`` messages is read up to one bound for the whole
    answer (gateway.ssml.SsmlBound, as the webhooks and the Voiceflow socket read theirs:
    SSML_ANSWER_MAX_CHARS, 64 KiB, in order; of SSML not well-formed, read leniently,
    LOOSE_ANSWER_MAX_CHARS), before it is parsed, so a turn of 30 messages of 30 KB of
    SSML (900 KB, within GATEWAY_PIPELINE_MAX_RESPONSE_BYTES) holds the event loop
    (every connection's) about as long as a turn of 2 such messages and 28 of plain
    text (measured in the same run, so a loaded machine does not fail it); before, 8 to
    15 times as long (1 to 2 s here: each message parsed whole up to three times and
    read leniently whole). The first messages' words are said
    (the message at the bound its words read leniently, its markup lost), the later
    SSML-only ones give no item but for their ``src``; the text after them is said; one
    WARNING says the answer was cut."""
    url, app = voiceflow
    make = _MUCH_SSML[shape]
    late = "https://cdn.example.com/late.mp3"

    def answer(ssml: int) -> list[dict[str, Any]]:
        """30 messages of 30 KB, the first ``ssml`` of SSML, the others of plain text."""
        speaks = [
            trace(
                "speak",
                {
                    "type": "message",
                    "message": make(i) if i < ssml else f"Plain{i}. " + "word " * 6_000,
                    **({"src": late} if i == 29 else {}),
                },
            )
            for i in range(30)
        ]
        return [*speaks, trace("text", {"message": "The end."})]

    @app.post("/much/{rest:path}")
    async def much(rest: str, request: Request) -> Any:
        body = await request.json()
        traces = answer(2 if body["action"].get("payload") == "two" else 30)
        if not rest.endswith("/stream"):
            return traces

        async def events() -> AsyncIterator[bytes]:
            for t in traces:
                yield f"event: trace\ndata: {json.dumps(t)}\n\n".encode()
            yield b"event: end\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    conv = vf_engine(f"{url}/much", stream)
    baselines: list[float] = []
    helds: list[float] = []
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline.voiceflow"):
        for _ in range(3):  # (the least of three of each: a hiccup of the machine is not it)
            baseline, two = await _loop_time(conv, "two")
            held, got = await _loop_time(conv, "thirty")
            baselines.append(baseline)
            helds.append(held)
    await conv.pipeline.aclose()
    assert min(helds) < 3 * min(baselines) + 0.05, (helds, baselines)  # ~1x; before 8-15x
    assert [i.text for i in two[:2]] == ["Word0.", "Word1."]
    assert got[:2] == two[:2]  # within the bound, as before (the SSML of the first kept)
    assert got[0].ssml == make(0)
    # the message at the bound: its words read leniently if the lenient bound is left
    # (none for unclosed tags: the first two took it), its markup lost; later ones
    # only their src; the text after them
    cut = [ResponseItem(text="Word2.")] if shape == "elements" else []
    assert got[2:] == [*cut, ResponseItem(audio=late), ResponseItem(text="The end.")]
    assert sum(len(i.ssml or "") for i in got) <= SSML_ANSWER_MAX_CHARS
    lines = [r.getMessage() for r in caplog.records if "more SSML than one" in r.getMessage()]
    assert len(lines) == 3, lines  # one a turn of thirty (none for two: within the bound)
    assert "a message cut there (its words said, its markup left out)" in lines[0]
    assert "the SSML of 27 later messages left out" in lines[0]


@pytest.mark.parametrize(
    ("spec", "version"), [("voiceflow:", "production"), ("voiceflow:development", "development")]
)
async def test_the_interact_stream_runs_the_configured_environment(
    voiceflow: tuple[str, FastAPI], spec: str, version: str
) -> None:
    """The interact stream picks its environment by the ``environment`` query parameter
    (default ``development``), not by the ``versionID`` header: the gateway sent only the
    header, so with GATEWAY_VOICEFLOW_PROJECT_ID set every turn ran the development
    (draft) agent, whatever ``voiceflow:<versionID>`` or GATEWAY_VOICEFLOW_VERSION_ID said."""
    url, app = voiceflow
    conv = vf_engine(url, True, spec=spec)
    assert texts(await conv.turn(ctx(), Input.of("hi")).collect()) == ["You said: hi"]
    (sent,) = app.state.requests
    assert (sent["_environment"], sent["_version"]) == (version, version)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_completion_whose_end_never_comes_is_delivered_at_the_end_of_the_turn(
    voiceflow: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Streamed ``completion`` traces (start, content..., end) are one item at ``end``.
    One whose ``end`` never comes (the list of traces, or the stream, ends first) gives
    the text received as one item at the end of the turn, with one WARNING naming
    Voiceflow and the missing end; one cut by another ``start`` gives its text before
    the next. Before, the text received was dropped: the user heard nothing of it."""
    url, _ = voiceflow
    conv = vf_engine(url, stream)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline.voiceflow"):
        whole = await conv.turn(ctx(), Input.of("ask ai")).collect()
        assert texts(whole) == ["The large one."]
        assert not caplog.records  # a whole completion: no warning
        unended = await conv.turn(ctx(), Input.of("unended ai")).collect()
        assert texts(unended) == ["The large pizza is best."]
        assert isinstance(unended[-1], ResponseEvent)  # the turn ended normally
        twice = await conv.turn(ctx(), Input.of("twice ai")).collect()
        assert texts(twice) == ["First.", "Second."]
    ended = "the stream ended" if stream else "the list of traces ended"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"Voiceflow's completion had no end ({ended}); its 24 characters delivered as one item",
        ),
        (
            "WARNING",
            "Voiceflow's completion had no end (another began); its 6 characters delivered "
            "as one item",
        ),
    ]
    await conv.pipeline.aclose()


async def test_stream_traces_are_forwarded_as_they_arrive(voiceflow: tuple[str, FastAPI]) -> None:
    url, app = voiceflow
    conv = vf_engine(url, stream=True)
    rest = await streamed(conv, app.state.release, "stream")
    assert texts(rest) == ["second"]
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("said", "stream", "words"),
    [
        ("boom", False, "Voiceflow answered HTTP 500"),
        ("boom", True, "Voiceflow answered HTTP 500"),
        ("slow", False, "did not answer within"),
        ("slow", True, "did not answer within"),
        ("garbage", False, "Voiceflow answered invalid JSON"),
        ("object", False, "something else than a list of traces"),
        ("cut", True, "ended without its end event"),
        ("deep", False, "Voiceflow answered invalid JSON: the JSON is nested deeper than 64"),
        ("deep", True, "Voiceflow streamed an invalid trace: the JSON is nested deeper than 64"),
        # a no-reply timeout no int of ms holds (1e308 s): the core's error, named (it was
        # "the core pipeline failed unexpectedly (OverflowError)", an ERROR with a traceback)
        ("overflow", False, "Voiceflow's no-reply timeout is out of range"),
        # buttons or cards that are no array: the core's error, named (it was "the core
        # pipeline failed unexpectedly (TypeError)", an ERROR with a traceback)
        ("bad choice", False, "Voiceflow sent a choice whose buttons are not an array"),
        ("bad carousel", False, "Voiceflow sent a carousel whose cards are not an array"),
        ("bad card", False, "Voiceflow sent a card whose buttons are not an array"),
    ],
)
async def test_core_failures_are_pipeline_errors(
    voiceflow: tuple[str, FastAPI], said: str, stream: bool, words: str
) -> None:
    url, _ = voiceflow
    # shorter than the fake's 2 s ``slow`` answer, long enough for the good turns on a
    # loaded machine
    conv = vf_engine(url, stream, turn_timeout_s=1.5)
    assert await fails_then_recovers(conv, words, said) == ["You said: again"]
    await conv.pipeline.aclose()


async def test_a_slate_whose_children_are_no_array_gives_no_text(
    voiceflow: tuple[str, FastAPI],
) -> None:
    """A text trace's slate (read when it has no ``message``) whose block's ``children``
    are no array gives no text, as a ``content`` that is none does; it was "the core
    pipeline failed unexpectedly (TypeError)", an ERROR with a traceback."""
    url, _ = voiceflow
    conv = vf_engine(url, False)
    events = await conv.turn(ctx(), Input.of("bad slate")).collect()
    assert isinstance(events[-1], ResponseEvent), events
    assert items(events) == []
    await conv.pipeline.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_that_breaks_off_is_not_called_unreachable(
    voiceflow: tuple[str, FastAPI], stream: bool
) -> None:
    """A runtime that answered and dropped the connection mid-body: "the connection to
    Voiceflow failed" (a streamed trace before it still forwarded), not "could not be
    reached"."""
    url, app = voiceflow

    @app.post("/broken/{rest:path}")
    async def broken(rest: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            if rest.endswith("/stream"):
                yield b'event: trace\ndata: {"type": "text", "payload": {"message": "first"}}\n\n'
            else:
                yield b'[{"type": "text", "payload": {"message": "first"}}'
            raise ConnectionAbortedError("the runtime died mid-answer")  # uvicorn drops it

        kind = "text/event-stream" if rest.endswith("/stream") else "application/json"
        return StreamingResponse(body(), media_type=kind)

    conv = vf_engine(f"{url}/broken", stream)
    events = await pipeline_error(conv, "the connection to Voiceflow failed: RemoteProtocolError")
    assert texts(events) == (["first"] if stream else [])
    await conv.pipeline.aclose()


async def test_a_stream_cut_before_its_end_event_forwards_its_traces_and_fails(
    voiceflow: tuple[str, FastAPI],
) -> None:
    """An interact stream whose body ends without ``event: end``: the whole traces
    received were forwarded as they came, and the turn fails (an Error of source
    ``pipeline``), as every streaming core's cut answer does (Rasa's NDJSON cut inside a
    line, an OpenAI stream without finish_reason or [DONE], Dialogflow CX's without its
    FINAL response, the webhook core's stream without a Response): a cut answer is not
    taken for the whole one (the session's buttons and end would be the half answer's)."""
    url, _ = voiceflow
    conv = vf_engine(url, stream=True)
    events = await pipeline_error(conv, "Voiceflow's stream ended without its end event", "cut")
    assert texts(events) == ["You said: cut"]
    await conv.pipeline.aclose()


async def test_an_endless_line_of_the_stream_is_cut_at_the_bound(
    voiceflow: tuple[str, FastAPI],
) -> None:
    """An event stream's reader buffers a line until it ends: the stream's bytes are
    counted as they come (GATEWAY_PIPELINE_MAX_RESPONSE_BYTES), and the gateway stops
    reading."""
    url, app = voiceflow
    conv = vf_engine(url, True, pipeline_max_response_bytes=1_048_576, turn_timeout_s=20)
    await pipeline_error(conv, "Voiceflow's answer is larger than 1048576 bytes", "endless")
    await cut_early(app)
    await conv.pipeline.aclose()


async def test_a_wrong_key_is_a_pipeline_error(voiceflow: tuple[str, FastAPI]) -> None:
    url, _ = voiceflow
    conv = engine(
        pipeline="voiceflow:", voiceflow_api_key=SecretStr("VF.DM.wrong"), voiceflow_runtime_url=url
    )
    await pipeline_error(conv, "HTTP 401", "hi")
    await conv.pipeline.aclose()


async def test_a_flowstorm_v2_json_conversation_through_voiceflow(
    voiceflow: tuple[str, FastAPI],
) -> None:
    url, _ = voiceflow
    async with (
        gateway(
            pipeline="voiceflow:",
            voiceflow_api_key=KEY,
            voiceflow_runtime_url=url,
            voiceflow_project_id="p",
        ) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):

        async def put(text: str) -> list[dict[str, Any]]:
            body = json.dumps({"type": "Input", "input": {"transcript": {"text": text}}})
            answer = await v2_put(client, "pizza", body, "application/json")
            return [json.loads(line) for line in answer.text.splitlines() if line.strip()]

        intro = await put("#intro")
        assert [e["type"] for e in intro] == ["ResponseItem"] * 3 + ["Response"]
        assert intro[1]["responseItem"]["audio"] == "https://cdn.example.com/tts/size.mp3"
        small = await put("Small")
        assert small[0]["responseItem"]["text"] == "A small pizza."
        bye = await put("bye")
        assert bye[-1]["response"]["sessionEnded"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_why_voiceflow_refused_goes_to_the_log(
    voiceflow: tuple[str, FastAPI], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-2xx answer, streamed or not: "Voiceflow answered HTTP 500" for the client,
    the same with the body's start in the log (WARNING). Before, the body was not read."""
    url, _ = voiceflow
    conv = vf_engine(url, stream)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(conv, "Voiceflow answered HTTP 500", "boom")
    assert "internal" not in str(events[-1])
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert lines == ['Voiceflow answered HTTP 500: {"message":"internal"}']
    await conv.pipeline.aclose()


RECORDED_SPEECH = (
    '<speak><audio src="https://cdn.example.com/tts/ready.mp3"/> '
    '<audio src="https://cdn.example.com/tts/enjoy.mp3"/> Anything else? See you.</speak>'
)
"""What Alexa and Google say for the fake runtime's ``recorded`` speak traces
(fake_voiceflow.RECORDED): each https recording once, instead of its words; the words of
the messages whose recording they do not play (``data:``, ``http:``)."""


@pytest.mark.parametrize("channel", ["alexa", "google"])
async def test_a_speak_message_and_its_recording_are_heard_once_on_a_voice_assistant(
    voiceflow: tuple[str, FastAPI], channel: str
) -> None:
    """A voice agent's ``speak`` trace carries its words (``message``, text or SSML) and
    their recording (``src``, Voiceflow's TTS): the Voiceflow core makes one item of both,
    and Alexa and Google play the recording INSTEAD of saying the words
    (gateway.ssml.played_instead, the one rule of every voice channel); the words are still
    what a screen shows. A ``src`` they do not play (``data:``, ``http:``) leaves the words
    said. Before, they said the words and then played the recording: every sentence
    twice ("What size? What size?")."""
    url, _ = voiceflow
    settings: dict[str, Any] = {"alexa_verify": False, "google_verify": False}
    async with (
        gateway(
            pipeline="voiceflow:", voiceflow_api_key=KEY, voiceflow_runtime_url=url, **settings
        ) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        if channel == "alexa":

            async def turn(text: str | None) -> tuple[str, str | None]:
                kind = "LaunchRequest" if text is None else "IntentRequest"
                answer = await client.post("/alexa", json=envelope("S-rec", text=text, kind=kind))
                assert answer.status_code == 200, answer.text
                response = answer.json()["response"]
                return response["outputSpeech"]["ssml"], None

        else:

            async def turn(text: str | None) -> tuple[str, str | None]:
                intent = "actions.intent.MAIN" if text is None else "FreeText"
                answer = await client.post("/google", json=v3("S-rec", intent, text or ""))
                assert answer.status_code == 200, answer.text
                simple = answer.json()["prompt"]["firstSimple"]
                return simple["speech"], simple["text"]

        speech, shown = await turn(None)  # launch: a text, then "What size?" with its src
        size = '<audio src="https://cdn.example.com/tts/size.mp3"/>'
        assert speech == f"<speak>Welcome to the pizza shop. {size}</speak>"
        assert shown in (None, "Welcome to the pizza shop. What size?")
        speech, shown = await turn("recorded")
        assert speech == RECORDED_SPEECH
        assert shown in (None, "Your pizza is ready. Enjoy your meal. Anything else? See you.")
