"""The Dialogflow CX core against a real local CX (tests/gateway/pipeline/cx_server.py):
google-auth's service-account flow against the token endpoint (a key generated here), a
conversation with state, rich messages, the end, transfers, the streaming method, and
every kind of failure as a pipeline error."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

from gateway.conversation import Conversation, TurnContext
from gateway.events import (
    ErrorEvent,
    Input,
    ResponseEvent,
    ResponseItem,
    SessionEndedEvent,
    transfer_target,
)
from gateway.pipeline.base import PipelineConfigError, PipelineError
from gateway.pipeline.cores import core_json
from gateway.pipeline.dialogflow_cx import (
    DialogflowCxPipeline,
    JsonArrayReader,
    cx_session_id,
    language_code,
)
from gateway.sessions import MemorySessionStore, Session
from gateway.settings import Settings
from tests.conftest import gateway, serve
from tests.gateway.pipeline.cx_server import AGENT, EMAIL, make_cx_server
from tests.gateway.turns import ctx, failed_session, items, pipeline_error, said, texts, v2_put


def _key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    """A service account's RSA key (PKCS#8 PEM) and its public half."""
    return _key()


def key_file(tmp: Path, private: bytes, token_uri: str) -> str:
    """A service-account JSON key file as the Cloud console downloads it."""
    info = {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "0123456789abcdef",
        "private_key": private.decode(),
        "client_email": EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path = tmp / "service-account.json"
    path.write_text(json.dumps(info))
    return str(path)


@pytest.fixture
async def cx(keys: tuple[bytes, bytes], tmp_path: Path) -> AsyncIterator[tuple[Settings, FastAPI]]:
    """The CX server on a free port, and the settings of a gateway using it."""
    app = make_cx_server(keys[1])
    async with serve(app) as url:
        settings = Settings(
            pipeline=f"dialogflow-cx:{AGENT}",
            dialogflow_cx_credentials=key_file(tmp_path, keys[0], f"{url}/token"),
            dialogflow_cx_endpoint=url,
            dialogflow_cx_handoff_target="sip:desk@example.com",
        )
        yield settings, app


def engine(settings: Settings, **overrides: Any) -> Conversation:
    settings = settings.model_copy(update=overrides)
    pipe = DialogflowCxPipeline.from_url(settings.pipeline, settings)
    return Conversation(MemorySessionStore(), pipe, settings)


async def test_a_conversation_with_state_and_rich_messages(cx: tuple[Settings, FastAPI]) -> None:
    settings, app = cx
    conv = engine(settings)
    intro = items(await conv.turn(ctx(), Input.of("#intro")).collect())
    assert intro[0].text == "Welcome to the pizza shop."
    assert intro[1].ssml == "<speak>What would you <emphasis>like</emphasis>?</speak>"
    assert intro[1].text == "What would you like?"
    assert texts(await conv.turn(ctx(), Input.of("pizza")).collect()) == ["What size?"]
    large = items(await conv.turn(ctx(), Input.of("large")).collect())
    assert [i.text for i in large[:2]] == ["A large pizza.", "Anything else?"]
    assert large[2].code is not None
    assert json.loads(large[2].code)["richContent"][0][0]["type"] == "chips"
    assert [i.audio for i in large[3:]] == [
        "https://cdn.example.com/ding.mp3",
        "https://cdn.example.com/jingle.wav",  # the inline segment has no URL: no item
    ]
    again = await conv.turn(ctx(), Input.of("what did I order")).collect()
    assert texts(again) == ["A large pizza."]  # CX kept the session's parameters

    paths = [path for path, _ in app.state.requests]
    assert set(paths) == {f"/v3/{AGENT}/sessions/{cx_session_id('test:s1')}:detectIntent"}
    first = app.state.requests[0][1]
    assert first["queryInput"] == {"event": {"event": "WELCOME"}, "languageCode": "en-US"}
    assert first["queryParams"] == {"timeZone": "Europe/Prague"}
    assert app.state.requests[1][1]["queryInput"]["text"] == {"text": "pizza"}
    assert len(app.state.tokens) == 1  # one token, refreshed once, for every turn
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state["currentPage"] == "Confirm"
    assert session.pipeline_state["parameters"] == {"item": "pizza", "size": "large"}
    assert session.pipeline_state["session"] == cx_session_id("test:s1")
    await conv.pipeline.aclose()


async def test_audio_uris_that_are_not_http_urls_are_dropped_and_logged(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """CX's playAudio and mixedAudio URIs may be gs:// (Cloud Storage), which no phone call
    or client fetches: dropped, as every core's media URLs that are not http(s), and
    logged naming the field and the URI; the https segment and the text stay."""
    settings, _ = cx
    caplog.set_level(logging.WARNING, logger="gateway.pipeline.dialogflow_cx")
    conv = engine(settings)
    got = items(await conv.turn(ctx(), Input.of("cloud storage")).collect())
    assert [(i.text, i.audio) for i in got] == [
        ("Listen.", None),
        (None, "https://cdn.example.com/b.wav"),
    ]
    dropped = [r.getMessage() for r in caplog.records if "not an http(s) URL" in r.getMessage()]
    assert dropped == [
        "the Dialogflow CX core answered a playAudio audioUri that is not an http(s) URL: "
        "'gs://agent-bucket/ding.mp3'; dropped",
        "the Dialogflow CX core answered a mixedAudio segment uri that is not an http(s) URL: "
        "'gs://agent-bucket/a.wav'; dropped",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.getMessage() in dropped)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("streaming", [False, True])
async def test_variants_the_connector_does_not_know_are_logged_at_debug(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture, streaming: bool
) -> None:
    """ResponseMessage variants the connector does not know (``toolCall``, newer than
    it) give no item, and their names go to the log at DEBUG, one line for the turn,
    clipped; known fields (``responseType``, ``source``, ``conversationSuccess``) are
    not named. Before, they were dropped without a word."""
    settings, _ = cx
    caplog.set_level(logging.DEBUG, logger="gateway.pipeline.dialogflow_cx")
    conv = engine(settings, dialogflow_cx_streaming=streaming)
    assert texts(await conv.turn(ctx(), Input.of("news")).collect()) == ["The news."]
    lines = [r for r in caplog.records if "unknown types" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.DEBUG
    line = lines[0].getMessage()
    assert line.startswith(
        "the Dialogflow CX core sent ResponseMessage variants of unknown types ['toolCall', 'xxx"
    )
    assert line.endswith("; dropped")
    assert line.count("toolCall") == 1
    assert len(line) < 400
    assert not any(k in line for k in ("responseType", "source", "conversationSuccess"))
    caplog.clear()
    assert texts(await conv.turn(ctx(), Input.of("pizza")).collect()) == ["What size?"]
    assert not [r for r in caplog.records if "unknown types" in r.getMessage()]
    await conv.pipeline.aclose()


async def test_no_input_dtmf_and_language(cx: tuple[Settings, FastAPI]) -> None:
    settings, app = cx
    conv = engine(settings, dialogflow_cx_language="en")
    silence = await conv.turn(ctx(), Input.of("#silence")).collect()
    assert texts(silence) == ["Are you still there?"]
    phone = TurnContext(channel="twilio", session_id="CA" + "0" * 32, app_key="app")
    keys = await conv.turn(phone, Input.of("12#")).collect()
    assert texts(keys) == ["You pressed 12 then #."]
    typed = await conv.turn(ctx(), Input.of("12")).collect()  # digits typed in a chat: text
    assert texts(typed) == ["Sorry, I did not get that."]
    marked = await conv.turn(ctx(), Input.of("7", attributes={"dtmf": "7"})).collect()
    assert texts(marked) == ["You pressed 7 then nothing."]
    queries = [body["queryInput"] for _, body in app.state.requests]
    assert queries[0] == {"event": {"event": "sys.no-input-default"}, "languageCode": "en"}
    assert queries[1] == {"dtmf": {"digits": "12", "finishDigit": "#"}, "languageCode": "en"}
    assert queries[2] == {"text": {"text": "12"}, "languageCode": "en"}
    await conv.pipeline.aclose()


async def test_a_java_style_locale_is_sent_as_a_cx_language_code(
    cx: tuple[Settings, FastAPI],
) -> None:
    """A locale as Flowstorm V1 clients send it (``en_US``, Java's form) is sent as the
    CX language code ``en-US``: it went as it came, and CX refused every turn (400, a
    language code it does not know). A text over 256 characters (the API's limit) is
    cut to them."""
    settings, app = cx
    conv = engine(settings)
    said = await conv.turn(ctx(), Input.of("pizza", locale="en_US")).collect()
    assert texts(said) == ["What size?"]
    long = await conv.turn(ctx(), Input.of("x" * 300, locale="cs_CZ")).collect()
    assert texts(long) == ["Sorry, I did not get that."]
    queries = [body["queryInput"] for _, body in app.state.requests]
    assert [q["languageCode"] for q in queries] == ["en-US", "cs-CZ"]
    assert queries[1]["text"] == {"text": "x" * 256}
    assert [language_code(t) for t in ("en", "pt-BR", "zh_TW_#Hant", "en__POSIX")] == [
        "en",
        "pt-BR",
        "zh-TW",
        "en",
    ]
    await conv.pipeline.aclose()


async def test_end_interaction_ends_the_session(cx: tuple[Settings, FastAPI]) -> None:
    settings, _ = cx
    conv = engine(settings)
    events = await conv.turn(ctx(), Input.of("bye")).collect()
    assert texts(events) == ["Goodbye."]
    response = next(e for e in events if isinstance(e, ResponseEvent)).response
    assert response.session_ended
    assert isinstance(events[-1], SessionEndedEvent)
    await conv.pipeline.aclose()


@pytest.mark.parametrize(("streaming", "sse"), [(False, False), (True, False), (True, True)])
async def test_null_fields_are_taken_as_absent(
    cx: tuple[Settings, FastAPI], streaming: bool, sse: bool
) -> None:
    """proto3 JSON reads ``null`` as a field's default (for a message field: not set).
    ``responseMessages: null`` failed the turn ("responseMessages that are not a list of
    objects"); a ``payload: null`` was the item ``null``, an ``endInteraction: null``
    ended the session. Now a null field is an absent one: no messages, no variant. A
    ``null`` element of ``responseMessages`` failed the turn too ("responseMessages that
    are not a list of objects"): it is no message, skipped."""
    settings, app = cx
    app.state.sse = sse
    conv = engine(settings, dialogflow_cx_streaming=streaming)
    assert texts(await conv.turn(ctx(), Input.of("pizza")).collect()) == ["What size?"]
    silent = await conv.turn(ctx(), Input.of("nulls")).collect()
    assert isinstance(silent[-1], ResponseEvent)
    assert items(silent) == []
    got = await conv.turn(ctx(), Input.of("null fields")).collect()
    assert [(i.text, i.code, i.audio) for i in items(got)] == [("Hello.", None, None)]
    assert isinstance(got[-1], ResponseEvent)
    assert not got[-1].response.session_ended
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.pipeline_state == {"session": cx_session_id("test:s1")}
    assert texts(await conv.turn(ctx(), Input.of("large")).collect())[0] == "A large pizza."
    await conv.pipeline.aclose()


async def test_handoff_and_telephony_transfer_are_the_transfer_action(
    cx: tuple[Settings, FastAPI],
) -> None:
    settings, _ = cx
    conv = engine(settings)
    handoff = items(await conv.turn(ctx(), Input.of("agent")).collect())
    assert handoff[0].text == "Connecting you."
    assert transfer_target(handoff[1]) == ("sip:desk@example.com", "asked")
    call = items(await conv.turn(ctx(), Input.of("call sales")).collect())
    assert transfer_target(call[0]) == ("+15550001111", "telephonyTransferCall")
    await conv.pipeline.aclose()


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_handoff_without_a_target_is_not_performed_and_the_turn_goes_on(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture, streaming: bool
) -> None:
    """A ``liveAgentHandoff`` whose metadata names no target, with
    GATEWAY_DIALOGFLOW_CX_HANDOFF_TARGET unset, failed the turn after its items had gone
    out (the client saw "Connecting you." then an error). As the other cores' handoffs
    without a target: the turn's items go out, no transfer, one WARNING naming the core
    and the setting, and the turn ends normally. The same for a telephonyTransferCall
    without a number (which was a pipeline error too), the items after it kept."""
    settings, _ = cx
    conv = engine(settings, dialogflow_cx_handoff_target=None, dialogflow_cx_streaming=streaming)
    caplog.set_level(logging.WARNING)
    events = await conv.turn(ctx(), Input.of("agent")).collect()
    assert isinstance(events[-1], ResponseEvent), events
    assert not events[-1].response.session_ended
    assert texts(events) == ["Connecting you."]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "the Dialogflow CX core asked for a liveAgentHandoff without a target and no handoff "
        "target is configured (GATEWAY_DIALOGFLOW_CX_HANDOFF_TARGET is not set); not handed off"
    ]
    caplog.clear()
    events = await conv.turn(ctx(), Input.of("call nobody")).collect()
    assert isinstance(events[-1], ResponseEvent), events
    assert texts(events) == ["Dialling.", "Still here."]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert lines[0].startswith("the Dialogflow CX core asked for a telephonyTransferCall without")
    session = await conv.store.get(ctx().key)
    assert session is not None
    assert session.turn_count == 2  # both turns succeeded
    await conv.pipeline.aclose()


async def test_a_cx_session_id_is_36_hex_digits_of_the_session_key(
    cx: tuple[Settings, FastAPI],
) -> None:
    """The CX session id is 36 hex digits of the SHA-256 of the session's key, whatever
    the length of its id, and one session id on two channels is two CX sessions: a client
    of another channel that proposes the same id never gets the first one's parameters."""
    settings, app = cx
    conv = engine(settings)
    long_id = "flowstorm-" + "x" * 60
    events = await conv.turn(ctx(long_id), Input.of("pizza")).collect()
    assert texts(events) == ["What size?"]
    cx_id = cx_session_id(f"test:{long_id}")
    assert re.fullmatch(r"[0-9a-f]{36}", cx_id)
    assert cx_id == hashlib.sha256(f"test:{long_id}".encode()).hexdigest()[:36]
    assert app.state.requests[0][0] == f"/v3/{AGENT}/sessions/{cx_id}:detectIntent"
    await conv.turn(ctx(), Input.of("pizza")).collect()
    await conv.turn(ctx(), Input.of("large")).collect()
    other = TurnContext(channel="other", session_id="s1", app_key="app")
    asked = await conv.turn(other, Input.of("what did I order")).collect()
    assert texts(asked) == ["A regular nothing."]
    again = await conv.turn(ctx(), Input.of("what did I order")).collect()
    assert texts(again) == ["A large pizza."]
    assert cx_session_id("other:s1") != cx_session_id("test:s1")
    await conv.pipeline.aclose()


@pytest.mark.parametrize("sse", [False, True])
async def test_streaming_forwards_partial_messages_as_they_arrive(
    cx: tuple[Settings, FastAPI], sse: bool
) -> None:
    settings, app = cx
    app.state.gap_s = 1.0
    app.state.sse = sse
    pipe = DialogflowCxPipeline.from_url(
        settings.pipeline, settings.model_copy(update={"dialogflow_cx_streaming": True})
    )
    session = Session(id="s2", key="test:s2", channel="test", app_key="app")
    await _drain(pipe, session, "pizza")
    outputs = aiter(pipe.process(session, Input.of("large")))
    first = await anext(outputs)
    first_at = time.monotonic()
    assert isinstance(first, ResponseItem)
    assert first.text == "A large pizza."
    rest = [out async for out in outputs]
    assert app.state.final_at - first_at > 0.9  # the FINAL came a second after
    assert [getattr(o, "text", None) for o in rest[:2]] == ["Anything else?", None]
    assert len(rest) == 5  # the partial message is not repeated; 3 more items; the Response
    assert session.pipeline_state["currentPage"] == "Confirm"
    assert app.state.requests[-1][0].endswith(
        f"/sessions/{cx_session_id('test:s2')}:serverStreamingDetectIntent"
    )
    await pipe.aclose()


@pytest.mark.parametrize(
    ("sse", "close_array", "words"),
    [
        (True, False, "stream ended before its FINAL response"),
        (False, True, "stream ended before its FINAL response"),
        (False, False, "not a complete JSON array"),
    ],
)
async def test_a_stream_that_ends_before_its_final_response_fails_the_turn(
    cx: tuple[Settings, FastAPI], sse: bool, close_array: bool, words: str
) -> None:
    """A serverStreamingDetectIntent answer that stops after a PARTIAL response (the
    server or a proxy in front of it ended the body cleanly: an event stream has no end
    marker but the FINAL response) is the core's error, in every form: the session is
    kept, its page and parameters as before, not those of the half answer."""
    settings, app = cx
    app.state.sse = sse
    app.state.no_final = True
    app.state.close_array = close_array
    conv = engine(settings, dialogflow_cx_streaming=True)
    events = await pipeline_error(conv, words, "pizza")
    assert texts(events) == ["What size?"]  # the PARTIAL's message went out as it came
    session = await failed_session(conv, 0)
    assert "currentPage" not in session.pipeline_state
    await conv.pipeline.aclose()


async def _drain(pipe: DialogflowCxPipeline, session: Session, text: str) -> None:
    async for _ in pipe.process(session, Input.of(text)):
        pass


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("boom", "the Dialogflow CX core answered HTTP 500"),
        ("quota", "the Dialogflow CX core answered HTTP 429"),
        ("garbage", "not JSON"),
        ("shape", "responseMessages that are not a list"),
        # was "the core pipeline failed unexpectedly (TypeError)", an ERROR with a traceback
        ("segments", "the core answered a mixedAudio whose segments are no list"),
        ("slow", "did not answer within"),
    ],
)
async def test_core_failures_become_pipeline_errors(
    cx: tuple[Settings, FastAPI], text: str, words: str
) -> None:
    settings, app = cx
    app.state.slow_s = 1.0
    conv = engine(settings, turn_timeout_s=0.5)
    await pipeline_error(conv, words, text)
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("streaming", "sse", "text", "words"),
    [
        (False, False, "deep", "not JSON"),
        (False, False, "deep100", "not JSON"),
        (True, True, "deep", "not JSON"),
        (True, False, "deep", "nested deeper than 64 levels"),  # past the parser's limit
        (True, False, "deep100", "nested deeper than 64 levels"),  # within it
    ],
)
async def test_an_answer_nested_too_deep_is_a_pipeline_error(
    cx: tuple[Settings, FastAPI], streaming: bool, sse: bool, text: str, words: str
) -> None:
    """An answer nested deeper than any answer needs is the core's error, whatever the
    method and form: never a RecursionError, nor a session the store could not save."""
    settings, app = cx
    app.state.sse = sse
    conv = engine(settings, dialogflow_cx_streaming=streaming)
    await pipeline_error(conv, words, text)
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


REFUSED = {
    "digits": "the core answered something that is not JSON: "
    "the JSON holds a number longer than 100 characters.",
    "nan": "the core answered something that is not JSON: the JSON holds NaN, which is not JSON.",
}


@pytest.mark.parametrize("said", ["digits", "nan"])
async def test_json_every_core_refuses_fails_the_turn_streamed_or_whole(
    cx: tuple[Settings, FastAPI], said: str
) -> None:
    """An answer holding a number of 5,000 digits or NaN (JSON core_json refuses) fails the
    turn with the same error whole, as a streamed array's element and as an event's data;
    a normal stream on the same pipeline still works."""
    settings, app = cx
    errors: list[str] = []
    for streaming, sse in ((False, False), (True, False), (True, True)):
        app.state.sse = sse
        conv = engine(settings, dialogflow_cx_streaming=streaming)
        events = await pipeline_error(conv, "not JSON", said, ctx(f"{said}-{streaming}-{sse}"))
        error = events[-1]
        assert isinstance(error, ErrorEvent)
        errors.append(error.text)
        if streaming:
            normal = await conv.turn(ctx(f"ok-{sse}"), Input.of("pizza")).collect()
            assert texts(normal) == ["What size?"]
        await conv.pipeline.aclose()
    assert errors == [errors[0]] * 3  # whole, streamed array, event stream
    assert errors[0] == REFUSED[said]  # naming what is wrong


async def test_an_error_answer_that_echoes_the_token_reaches_only_the_log_redacted(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """A 403 whose Google error message holds the request's bearer token: the client sees
    the fixed text; the log has the status and the message, the token hidden."""
    settings, app = cx
    conv = engine(settings)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(conv, "the Dialogflow CX core answered HTTP 403", "leak")
    (token,) = app.state.tokens
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.text == "the Dialogflow CX core answered HTTP 403"
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("the Dialogflow CX core answered HTTP 403: Permission denied")
    assert "Bearer ***" in lines[0]
    assert "10.0.0.7" in lines[0]
    assert all(token not in r.getMessage() for r in caplog.records)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_compressed_answer_is_bounded_as_it_inflates(
    cx: tuple[Settings, FastAPI], streaming: bool
) -> None:
    """A gzip answer inflating to 100 MB fails the turn at the bound, both methods, and
    the gateway never holds much more than the bound of it (tracemalloc's peak)."""
    settings, _ = cx
    conv = engine(settings, dialogflow_cx_streaming=streaming)
    assert texts(await conv.turn(ctx(), Input.of("hello")).collect())  # the token, untraced
    tracemalloc.start()
    try:
        await pipeline_error(conv, "larger than 1048576 bytes", "bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1_048_576, f"{peak / 1_048_576:.1f} MB held"
    await conv.pipeline.aclose()


async def test_a_key_the_token_endpoint_rejects_is_a_pipeline_error(
    cx: tuple[Settings, FastAPI], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, app = cx
    stranger, _ = _key()  # signs the assertion with a key the server does not know
    token_uri = f"{settings.dialogflow_cx_endpoint}/token"
    other = tmp_path / "other"
    other.mkdir()
    conv = engine(settings, dialogflow_cx_credentials=key_file(other, stranger, token_uri))
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        events = await pipeline_error(conv, "the Dialogflow CX core has no access token", "pizza")
    # the token endpoint's own words go to the log only
    assert "invalid_grant" not in str(events[-1])
    assert any("invalid_grant" in r.getMessage() for r in caplog.records)
    assert not app.state.tokens
    assert not app.state.requests
    await conv.pipeline.aclose()


async def test_a_token_endpoint_redirect_is_not_followed_with_the_assertion(
    cx: tuple[Settings, FastAPI], keys: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A token endpoint that answers 307 to another host does not get the signed
    assertion (a credential, good for an access token for up to an hour) re-sent there:
    the turn is the core's error ("has no access token"), the session kept."""
    settings, app = cx
    elsewhere = make_cx_server(keys[1])
    async with serve(elsewhere) as other:
        app.state.token_redirect = f"{other.replace('127.0.0.1', 'localhost')}/token"
        conv = engine(settings)
        with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
            events = await pipeline_error(
                conv, "the Dialogflow CX core has no access token", "pizza"
            )
        assert "localhost" not in str(events[-1])
        assert any("redirect (HTTP 307)" in r.getMessage() for r in caplog.records)
        assert elsewhere.state.token_requests == 0
        assert not elsewhere.state.tokens
        await failed_session(conv, 0)
        await conv.pipeline.aclose()
    assert app.state.token_requests == 1
    assert not app.state.requests


@pytest.mark.parametrize(
    "body",
    [
        "<html>Sign in to the proxy</html>",
        "[1, 2]",
        '{"access_token": "ya29.half", "expires_in": "soon"}',
        '{"access_token": "ya29.half", "expires_in": [3600]}',
    ],
)
async def test_a_token_endpoint_answering_no_oauth_token_is_the_cores_error(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture, body: str
) -> None:
    """A token endpoint (or a proxy in front of it) answering 200 with something that is
    no OAuth token response: "has no access token", one WARNING naming it, no ERROR with
    a traceback blaming the gateway ("failed unexpectedly (TypeError)", as before)."""
    settings, app = cx
    app.state.token_body = body
    conv = engine(settings)
    with caplog.at_level(logging.WARNING):
        await pipeline_error(conv, "the Dialogflow CX core has no access token", "pizza")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.pipeline.cores"]
    assert len(lines) == 1
    assert "no access token: the token_uri answered without a usable access_token" in lines[0]
    assert not app.state.requests
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


@pytest.mark.parametrize("padding", ["spaces", "gzip", "gzip, gzip"])
async def test_the_token_endpoints_answer_is_bounded_as_every_cores(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture, padding: str
) -> None:
    """The token endpoint's answer is read up to GATEWAY_PIPELINE_MAX_RESPONSE_BYTES, a
    gzip one as it inflates, as every answer of a core: a token padded past the bound
    (2 MB of spaces; 100 MB of them in about 100 KB of gzip, or that gzip'ed again) is
    "has no access token", the bound named in the log, and the gateway held little of it
    (tracemalloc's peak). Before, requests read (and inflated) the whole body, and the
    padded token was taken. urllib3 inflates it, bounded per read only from 2.6 (2.7 for
    the last ways round it): with 2.5, "gzip, gzip" held about 220 MB."""
    settings, app = cx
    app.state.token_padding = padding
    conv = engine(settings)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
            await pipeline_error(conv, "the Dialogflow CX core has no access token", "pizza")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert any("larger than 1048576 bytes" in r.getMessage() for r in caplog.records)
    assert peak < 8 * 1_048_576, f"{peak / 1_048_576:.1f} MB held"
    assert not app.state.requests
    await failed_session(conv, 0)
    await conv.pipeline.aclose()


async def test_a_gzip_token_answer_is_taken(cx: tuple[Settings, FastAPI]) -> None:
    """The token request asks for ``gzip, deflate`` (requests' default): a token endpoint
    that answers gzip is read inflated, its token used."""
    settings, app = cx
    app.state.token_padding = "gzip alone"
    conv = engine(settings)
    assert texts(await conv.turn(ctx(), Input.of("pizza")).collect()) == ["What size?"]
    assert app.state.token_requests == 1
    await conv.pipeline.aclose()


async def test_a_token_refused_before_its_expiry_is_replaced_once(
    cx: tuple[Settings, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    """CX answers 401 to a token it no longer takes (revoked, or this host's clock is
    behind): the gateway drops it, fetches a fresh one and sends the turn once more (CX
    did not run it: it runs once). Before, the refused token was kept, and every turn
    failed with HTTP 401 until the token's expiry (up to an hour)."""
    settings, app = cx
    conv = engine(settings)
    assert texts(await conv.turn(ctx(), Input.of("pizza")).collect()) == ["What size?"]
    app.state.tokens.clear()  # CX no longer takes the token the gateway holds
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        large = texts(await conv.turn(ctx(), Input.of("large")).collect())
    assert [r.getMessage() for r in caplog.records if "401" in r.getMessage()] == [
        "the Dialogflow CX core refused its access token (HTTP 401): fetching another"
    ]
    assert large[:2] == ["A large pizza.", "Anything else?"]
    assert app.state.token_requests == 2
    assert [body["queryInput"]["text"]["text"] for _, body in app.state.requests] == [
        "pizza",
        "large",
    ]  # each turn ran once at CX
    again = texts(await conv.turn(ctx(), Input.of("what did I order")).collect())
    assert again == ["A large pizza."]
    assert app.state.token_requests == 2  # the fresh token is kept
    await conv.pipeline.aclose()


class _Unaccepted(set[str]):
    """Tokens the token endpoint issues and CX never takes (a key of another project)."""

    def add(self, token: str) -> None:
        pass


async def test_a_token_cx_never_takes_is_one_refresh_per_turn_not_a_loop(
    cx: tuple[Settings, FastAPI],
) -> None:
    """Every token refused: each turn fails with the 401 after one fresh token, the
    session kept, and the next turn tries one fresh token again."""
    settings, app = cx
    app.state.tokens = _Unaccepted()
    conv = engine(settings)
    await pipeline_error(conv, "the Dialogflow CX core answered HTTP 401", "pizza")
    await failed_session(conv, 0)
    assert app.state.token_requests == 2
    await pipeline_error(conv, "the Dialogflow CX core answered HTTP 401", "pizza")
    assert app.state.token_requests == 3
    assert not app.state.requests
    await conv.pipeline.aclose()


@pytest.mark.parametrize("streaming", [False, True])
async def test_an_answer_that_breaks_off_is_not_called_unreachable(
    cx: tuple[Settings, FastAPI], streaming: bool
) -> None:
    """An API that answered and dropped the connection mid-body: "the core's answer broke
    off" (a PARTIAL response's message before it still forwarded), not "could not be
    reached"."""
    settings, app = cx
    partial = {"queryResult": {"responseMessages": [{"text": {"text": ["first"]}}]}}

    @app.post("/broken/v3/{rest:path}")
    async def broken(rest: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield (b"[" if streaming else b"") + json.dumps(partial).encode()[:-1]
            if streaming:
                yield b', "responseType": "PARTIAL"}, {"queryResult": '
            raise ConnectionAbortedError("the API died mid-answer")  # uvicorn drops it

        return StreamingResponse(body(), media_type="application/json")

    endpoint = f"{settings.dialogflow_cx_endpoint}/broken"
    conv = engine(settings, dialogflow_cx_endpoint=endpoint, dialogflow_cx_streaming=streaming)
    events = await pipeline_error(
        conv, "the connection to the Dialogflow CX core failed: RemoteProtocolError"
    )
    assert texts(events) == (["first"] if streaming else [])
    await conv.pipeline.aclose()


async def test_a_streamed_event_cut_off_by_the_end_of_the_stream_is_discarded(
    cx: tuple[Settings, FastAPI],
) -> None:
    """An SSE event with no blank line after it when the stream ends is incomplete and
    discarded (WHATWG HTML, "Event stream interpretation"; gateway/pipeline/cores.py
    ``iter_sse``, the reader of every core): it was read as a whole DetectIntentResponse.
    Whole, the same event is the answer (tests/gateway/pipeline/test_sse.py: the others)."""
    settings, app = cx
    final = {"queryResult": {"responseMessages": [{"text": {"text": ["Cut off."]}}]}}
    app.state.cut_body = f"data: {json.dumps(final)}\n"

    @app.post("/cut/v3/{rest:path}")
    async def cut(rest: str) -> Response:
        return Response(app.state.cut_body, media_type="text/event-stream")

    endpoint = f"{settings.dialogflow_cx_endpoint}/cut"
    conv = engine(settings, dialogflow_cx_endpoint=endpoint, dialogflow_cx_streaming=True)
    await pipeline_error(conv, "the core's stream held no DetectIntentResponse")
    app.state.cut_body += "\n"
    assert texts(await conv.turn(ctx(), Input.of("hello")).collect()) == ["Cut off."]
    await conv.pipeline.aclose()


async def test_unreachable_api_is_a_pipeline_error(cx: tuple[Settings, FastAPI]) -> None:
    settings, _ = cx
    conv = engine(settings, dialogflow_cx_endpoint="http://127.0.0.1:1")
    await pipeline_error(conv, "could not be reached", "pizza")
    await conv.pipeline.aclose()


# ------------------------------------------------------------------ the streamed array

TRICKY = [
    {"queryResult": {"responseMessages": [{"text": {"text": ['a "quoted" ], } [{ text\\']}}]}},
    {"q": [[], {}, [[{"a": "\\\\"}]]], "n": -1.5e3, "t": True, "z": None, "s": "\u017e\n"},
    {},
]


def _read(pieces: list[str]) -> tuple[list[object], JsonArrayReader]:
    reader = JsonArrayReader()
    values = [v for piece in pieces for v in reader.feed(piece)]
    reader.finish()
    return values, reader


def _cut(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_the_array_reader_gives_the_elements_however_the_text_is_cut() -> None:
    """Strings holding brackets, quotes and escaped backslashes, nested arrays, every
    JSON value: the same elements whole, cut at every place, and character by character."""
    text = " [\n" + " ,\n".join(json.dumps(e, indent=1) for e in TRICKY) + "\n] \n"
    assert _read([text])[0] == TRICKY
    for at in range(len(text) + 1):
        assert _read([text[:at], text[at:]])[0] == TRICKY, at
    assert _read(list(text))[0] == TRICKY


def test_the_array_reader_is_linear_however_small_the_pieces() -> None:
    """A 1 MB answer in 16-character pieces (many elements, then one large element): each
    character is handed to the JSON decoder at most twice (the old reader re-parsed its
    whole buffer on every piece: about 60,000 times for the large element), and each
    element is decoded whole once."""
    message = {"text": {"text": ["x" * 90]}}
    many = [{"queryResult": {"responseMessages": [message] * 3}} for _ in range(2_000)]
    large = {"queryResult": {"responseMessages": [message] * 3_000}}
    for elements in (many, [large]):
        text = json.dumps(elements)
        values, reader = _read(_cut(text, 16))
        assert values == elements
        assert reader.read == len(text)
        assert reader.decoded <= 2 * reader.read
        assert reader.parses <= len(elements) + len(text) // 16 + 1
    whole = json.dumps(many)
    values, reader = _read([whole])  # in one piece: one parse per element, nothing scanned
    assert (reader.parses, reader.decoded) == (len(many), sum(len(json.dumps(e)) for e in many))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"a": 1}', "not a JSON array"),
        ("[{}", "not a complete JSON array"),
        ('[{"a": }]', "not a complete JSON array"),
        ("[{}] {}", "not a complete JSON array"),
        ("[{}] ,", "not a complete JSON array"),
        ("[nope]", "not a complete JSON array"),
        ("[" + "[" * 65 + "]" * 65 + "]", "nested deeper than 64 levels"),
        ("[" + "[" * 50_000 + "]" * 50_000 + "]", "nested deeper than 64 levels"),
    ],
)
def test_the_array_reader_refuses_what_is_not_a_json_array(text: str, words: str) -> None:
    for size in (len(text), 3):  # whole and in pieces
        with pytest.raises(PipelineError, match=words):
            _read(_cut(text, size))


@pytest.mark.parametrize(
    "value",
    [
        "1" * 5_000,
        "1" * 101,
        "-0." + "5" * 100,
        "NaN",
        "-Infinity",
        "1e999",
        '"\\ud800"',
        '["\\udfff", "]"]',
        '"\ud800"',  # the character itself (a stream whose charset is not UTF-8)
        '{"k": 1, "k": 2}',
    ],
    ids=[
        "digits5000",
        "digits101",
        "float102",
        "nan",
        "-inf",
        "1e999",
        "lone",
        "lone2",
        "raw",
        "dupkey",
    ],
)
def test_the_array_reader_refuses_what_core_json_refuses_as_a_whole_answer(value: str) -> None:
    """An element core_json refuses (a number longer than 100 characters, NaN, Infinity, a
    number out of range, a lone surrogate, escaped or not) fails with the error of the same JSON as a
    whole answer, whole and however it is cut; the elements before it are given."""
    element = '{"queryResult": {"responseMessages": []}, "p": ' + value + "}"
    with pytest.raises(ValueError, match="the JSON holds") as whole:
        core_json(element)
    expected = f"the core answered something that is not JSON: {whole.value}"
    text = "[{}, " + element + ", {}]"
    for size in (len(text), 7, 1):
        reader = JsonArrayReader()
        given: list[object] = []
        with pytest.raises(PipelineError) as streamed:
            for piece in _cut(text, size):
                given += reader.feed(piece)
        assert str(streamed.value) == expected, size
        assert given == [{}], size


def test_the_array_reader_takes_what_core_json_takes() -> None:
    """Numbers of 100 characters, a surrogate pair, escapes: the values core_json gives."""
    elements = [
        '{"n": ' + "9" * 100 + ', "f": -1.5e300, "z": -0.0}',
        '{"s": "\\ud83d\\ude00 \\u00e9 \\u003c"}',
        '["\\ud800\\udc00"]',
    ]
    text = "[" + ",".join(elements) + "]"
    expected = [core_json(e) for e in elements]
    for size in (len(text), 5, 1):
        assert _read(_cut(text, size))[0] == expected, size


def test_the_array_reader_gives_scalars_for_the_caller_to_refuse() -> None:
    for pieces in (["[1, {}]"], ["[-", "1"], ["[tr", "ue"], ['["a\\"', 'b"]']):
        reader = JsonArrayReader()
        first = next(v for piece in pieces for v in reader.feed(piece))
        assert not isinstance(first, dict)


@pytest.mark.parametrize("streaming_sse", [False, True])
async def test_a_large_streamed_answer_in_tiny_pieces_is_read_whole(
    cx: tuple[Settings, FastAPI], streaming_sse: bool
) -> None:
    """A FINAL response of 2,000 texts (about 100 KB) written 64 bytes at a time, as
    a JSON array and as server-sent events: every message arrives, in order."""
    settings, app = cx
    app.state.sse = streaming_sse
    app.state.piece = 64
    conv = engine(settings, dialogflow_cx_streaming=True)
    events = await conv.turn(ctx(), Input.of("long")).collect()
    assert texts(events) == ["Here it comes."] + [f"line {n} " + "y" * 30 for n in range(2_000)]
    await conv.pipeline.aclose()


async def test_a_final_response_after_many_partial_messages_is_read_in_linear_time(
    cx: tuple[Settings, FastAPI],
) -> None:
    """A stream of a PARTIAL response of n messages, then a FINAL one of n others: each
    FINAL message was looked for in the list of those forwarded (and taken out of it),
    so the turn took O(n^2): 16,000 each (1 MB) blocked the event loop for seconds,
    every other session stalled. Linear, not quadratic: 32x the messages take ~32x the
    time (50-60x measured on a loaded machine: allocation and parsing of the larger
    chunks; the list took 240x), so under 150x (wide of both). CPU time of this process
    (the server's share, linear, too), the best of a few."""
    settings, _ = cx
    settings = settings.model_copy(
        update={"dialogflow_cx_streaming": True, "pipeline_max_response_bytes": 4_194_304}
    )

    async def turn(count: int) -> float:
        """Seconds of CPU of one turn of ``count`` + ``count`` messages (a pipeline of its
        own: a connection kept from a turn that blocked the loop may be closed under it)."""
        pipe = DialogflowCxPipeline.from_url(settings.pipeline, settings)
        session = Session(id="s1", key="test:s1", channel="test", app_key="app")
        await pipe._token()  # the token fetched before: not part of the turn's time
        started = time.process_time()
        got = [out async for out in pipe.process(session, Input.of(f"halves {count}"))]
        spent = time.process_time() - started
        await pipe.aclose()
        said = [*[f"p{n}" for n in range(count)], *[f"f{n}" for n in range(count)]]
        assert [o.text for o in got[:-1] if isinstance(o, ResponseItem)] == said
        return spent

    small = min([await turn(500) for _ in range(5)])
    large = min([await turn(16_000) for _ in range(3)])
    assert large < 150 * small, (large, small)


# ------------------------------------------------------------------ from_url


async def test_from_url_endpoints_by_location(keys: tuple[bytes, bytes], tmp_path: Path) -> None:
    path = key_file(tmp_path, keys[0], "https://oauth2.googleapis.com/token")
    settings = Settings(dialogflow_cx_credentials=path, dialogflow_cx_environment="prod")
    regional = DialogflowCxPipeline.from_url(f"dialogflow-cx:{AGENT}", settings)
    assert regional.endpoint == "https://europe-west3-dialogflow.googleapis.com"
    session = Session(id="s1", key="k", channel="test", app_key="app")
    assert regional.session_path(session) == (
        f"{AGENT}/environments/prod/sessions/{cx_session_id('k')}"
    )
    world = DialogflowCxPipeline.from_url(
        "dialogflow-cx:projects/p/locations/global/agents/a", settings
    )
    assert world.endpoint == "https://dialogflow.googleapis.com"
    await regional.aclose()
    await world.aclose()


async def test_a_scheme_in_upper_case_is_the_same_core(cx: tuple[Settings, FastAPI]) -> None:
    """Schemes are case-insensitive (RFC 3986 section 3.1), and GATEWAY_PIPELINE's is read
    so when the core is chosen: ``DIALOGFLOW-CX:projects/...`` was then refused as no
    Dialogflow CX agent. It is that agent, and it answers."""
    settings, _ = cx
    conv = engine(settings, pipeline=f"DialogFlow-CX:{AGENT}")
    assert texts(await conv.turn(ctx(), Input.of("pizza")).collect()) == ["What size?"]
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("spec", "credentials", "setting"),
    [
        ("dialogflow-cx:projects/p/agents/a", "key", "GATEWAY_PIPELINE"),
        ("dialogflow-cx:projects/p/locations/l/agents/", "key", "GATEWAY_PIPELINE"),
        ("dialogflowcx:projects/p/locations/l/agents/a", "key", "GATEWAY_PIPELINE"),
        ("dialogflow-cx:projects/p/locations/l/agents/a", None, "GATEWAY_DIALOGFLOW_CX_CREDENTIALS"),
        ("dialogflow-cx:projects/p/locations/l/agents/a", "missing", "GATEWAY_DIALOGFLOW_CX_CREDENTIALS"),
        ("dialogflow-cx:projects/p/locations/l/agents/a", "not-json", "GATEWAY_DIALOGFLOW_CX_CREDENTIALS"),
        ("dialogflow-cx:projects/p/locations/l/agents/a", "no-key", "GATEWAY_DIALOGFLOW_CX_CREDENTIALS"),
    ],
)  # fmt: skip
def test_from_url_names_the_setting_to_fix(
    keys: tuple[bytes, bytes], tmp_path: Path, spec: str, credentials: str | None, setting: str
) -> None:
    path: str | None = None
    if credentials == "key":
        path = key_file(tmp_path, keys[0], "https://oauth2.googleapis.com/token")
    elif credentials == "missing":
        path = str(tmp_path / "nowhere.json")
    elif credentials == "not-json":
        (tmp_path / "bad.json").write_text("{not json")
        path = str(tmp_path / "bad.json")
    elif credentials == "no-key":
        (tmp_path / "user.json").write_text(json.dumps({"type": "authorized_user"}))
        path = str(tmp_path / "user.json")
    with pytest.raises(PipelineConfigError, match=setting):
        DialogflowCxPipeline.from_url(spec, Settings(dialogflow_cx_credentials=path))


def test_a_key_given_as_json_text_is_named_but_not_shown(keys: tuple[bytes, bytes]) -> None:
    """GATEWAY_DIALOGFLOW_CX_CREDENTIALS takes a file's path; given the key's JSON text
    instead (as other tools take it), the refusal quoted the value whole, twice (the
    path, then FileNotFoundError's text): the service account's private key went to
    stderr, the container's log. It is named, not shown."""
    secret = keys[0].decode().splitlines()[1]  # a line of the PEM private key
    text = json.dumps({"type": "service_account", "private_key": keys[0].decode()})
    with pytest.raises(PipelineConfigError, match="GATEWAY_DIALOGFLOW_CX_CREDENTIALS") as raised:
        DialogflowCxPipeline.from_url(
            f"dialogflow-cx:{AGENT}", Settings(dialogflow_cx_credentials=f" {text}")
        )
    assert "holds JSON text" in str(raised.value)
    assert secret not in str(raised.value)


async def test_concurrent_first_turns_share_one_token(cx: tuple[Settings, FastAPI]) -> None:
    settings, app = cx
    conv = engine(settings)
    results = await asyncio.gather(
        *(conv.turn(ctx(f"s{n}"), Input.of("pizza")).collect() for n in range(6))
    )
    assert all(texts(events) == ["What size?"] for events in results)
    assert len(app.state.tokens) == 1  # one refresh, under the lock, off the event loop
    assert len({path for path, _ in app.state.requests}) == 6
    await conv.pipeline.aclose()


async def test_a_token_endpoint_that_hangs_holds_one_refresh_not_one_per_turn(
    cx: tuple[Settings, FastAPI],
) -> None:
    """Each turn gave up at its timeout and released the lock while its refresh thread
    went on (google-auth waits 120 s); the next turn started another: threads of the
    default executor (audio decoding, speech encoding) filled with hung refreshes. The
    refresh is now shared and outlives the turns that wait for it."""
    settings, app = cx
    app.state.token_hold = asyncio.Event()
    conv = engine(settings, turn_timeout_s=0.3)
    for n in range(4):
        await pipeline_error(conv, "did not answer within", "pizza", ctx(f"h{n}"))
    assert app.state.token_requests == 1
    app.state.token_hold.set()  # the refresh that hung completes, and is used
    answers = []
    for n in range(20):  # (a turn that comes before it is done still times out)
        answers = texts(await conv.turn(ctx(f"r{n}"), Input.of("pizza")).collect())
        if answers:
            break
    assert answers == ["What size?"]
    assert app.state.token_requests == 1
    await conv.pipeline.aclose()


async def test_a_flowstorm_v2_text_conversation_through_dialogflow_cx(
    cx: tuple[Settings, FastAPI],
) -> None:
    """A whole conversation through a channel: V2 text PUTs, one CX session, state kept by CX."""
    settings, app = cx
    overrides: dict[str, Any] = {
        "pipeline": settings.pipeline,
        "dialogflow_cx_credentials": settings.dialogflow_cx_credentials,
        "dialogflow_cx_endpoint": settings.dialogflow_cx_endpoint,
    }
    async with gateway(**overrides) as base, httpx.AsyncClient(base_url=base) as client:
        intro = await v2_put(client, "shop", "#intro")
        assert said(intro.text) == ["Welcome to the pizza shop.", "What would you like?"]
        assert said((await v2_put(client, "shop", "pizza")).text) == ["What size?"]
        large = await v2_put(client, "shop", "large")
        assert said(large.text)[:2] == ["A large pizza.", "Anything else?"]
        again = await v2_put(client, "shop", "what did I order")
        assert said(again.text) == ["A large pizza."]
        bye = await v2_put(client, "shop", "bye")
        assert said(bye.text) == ["Goodbye."]
        assert bye.text.endswith("\n.\n")  # endInteraction ended the session
    sessions = {path for path, _ in app.state.requests}
    assert len(sessions) == 1  # one V2 session (its cookie) is one CX session
