"""Flowstorm Socket V1 protocol, sans I/O: golden frames of the spec in, actions out."""

from __future__ import annotations

import itertools
import json
from typing import Any, Final

import pytest

from adapters.flowstorm.events import RequestEvent
from adapters.flowstorm.v1.protocol import (
    ANSWER_LOST_TEXT,
    AUDIO_IDLE_MARGIN_MS,
    CLOSE_POLICY,
    CLOSE_RESTART,
    CLOSE_TOO_BIG,
    ENDED_SESSION_LOGS,
    HANDED_BACK_ENDED_LOGS,
    REQUEST_REFUSED_TEXT,
    RESTART_REASON,
    STREAM_REFUSED_TEXT,
    STT_SAMPLE_RATES,
    TRANSITIONS,
    UTTERANCE_LOST_TEXT,
    Action,
    CancelListening,
    CheckSession,
    Close,
    ConnectionStateMachine,
    DropLogs,
    FeedAudio,
    FinishListening,
    Follow,
    Missed,
    Send,
    SendBytes,
    StartListening,
    StartTurn,
    State,
    StoreLogs,
    V1Connection,
    missed_event,
    parse_event,
)
from gateway.conversation import TurnRejected
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    LogEntry,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    Transcript,
)
from gateway.protocol import LocalProtocolError, ProtocolError
from gateway.speech.audio import AudioFormat, AudioFormatError
from gateway.speech.service import TtsRequest
from gateway.speech.stage import AudioLimitExceeded
from gateway.speech.stt import RecognitionError, RecognizerBusy
from gateway.speech.types import Heard
from gateway.ssml import SSML_ANSWER_MAX_CHARS
from tests.adapters.flowstorm.v1.helpers import (
    SPEC,
    SPEC_INIT,
    SPEC_KEY,
    SPEC_REQUEST,
    SPEC_RESPONSE,
    SPEC_RESPONSE_ENDED,
    SPEC_SESSION_ID,
    init_frame,
    input_frame,
    request_frame,
    spec_examples,
)
from tests.conftest import state_of


def _ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"generated-{next(counter)}"


def connection(
    key_allowed: Any = True, *, max_frame_bytes: int = 10_000, silence_timeout_ms: int = 5000
) -> V1Connection:
    """A connection whose generated session ids are ``generated-1``, ``generated-2``..."""
    return V1Connection(
        key_allowed,
        max_frame_bytes=max_frame_bytes,
        new_id=_ids(),
        silence_timeout_ms=silence_timeout_ms,
    )


def frames(actions: list[Action]) -> list[dict[str, Any]]:
    """The JSON of the Send actions (all actions must be Send)."""
    assert all(isinstance(a, Send) for a in actions), actions
    return [json.loads(a.text) for a in actions if isinstance(a, Send)]


def one_error(actions: list[Action], *words: str, source: str = "client") -> str:
    """The text of the single Error frame in ``actions`` (which must contain ``words``)."""
    [frame] = frames(actions)
    assert frame["type"] == "Error"
    assert frame["source"] == source
    for word in words:
        assert word.lower() in frame["text"].lower(), frame["text"]
    text: str = frame["text"]
    return text


def send(conn: V1Connection, frame: Any) -> list[Action]:
    """Feed ``frame`` as a JSON text frame."""
    return conn.receive_text(json.dumps(frame))


def start(conn: V1Connection, frame: Any) -> StartTurn:
    """Feed a Request/Input frame that must start a turn."""
    [action] = send(conn, frame)
    assert isinstance(action, StartTurn), action
    return action


def ready(conn: V1Connection | None = None, **config: Any) -> V1Connection:
    """A connection that has accepted Init with ``config``."""
    conn = conn or connection()
    assert frames(send(conn, init_frame(**config))) == [{"type": "Ready"}]
    return conn


def answered(conn: V1Connection, response: Response, *, new: str | None = None) -> list[Action]:
    """Feed one successful turn's events (SessionStarted when ``new``, Response,
    SessionEnded when it ends the session, the turn's end); all actions, not only frames."""
    sent: list[Action] = []
    if new:
        sent += conn.turn_event(SessionStartedEvent(session_id=new))
    sent += conn.turn_event(ResponseEvent(response=response))
    if response.session_ended:
        sent += conn.turn_event(SessionEndedEvent())
    return sent + conn.turn_finished()


def finish_turn(conn: V1Connection, response: Response, *, new: str | None = None) -> list[Any]:
    """Feed the engine's events of one successful turn (:func:`answered`); the frames sent."""
    return frames(answered(conn, response, new=new))


# ------------------------------------------------------------------- golden


def test_the_golden_frames_are_the_specs_examples() -> None:
    assert SPEC.exists(), f"{SPEC} is missing: shared/ must sit beside the repository"
    examples = spec_examples()
    for golden in (SPEC_INIT, SPEC_REQUEST, SPEC_RESPONSE, SPEC_RESPONSE_ENDED):
        assert json.loads(golden) in examples


def test_spec_init_is_answered_ready() -> None:
    conn = connection(lambda key: key == SPEC_KEY)
    assert frames(conn.receive_text(SPEC_INIT)) == [{"type": "Ready"}]
    assert conn.state is State.IDLE
    assert conn.init is not None
    assert conn.init.device_id == "standalone_3C22FBBBAD22"


def test_spec_request_starts_a_turn_of_the_proposed_session() -> None:
    conn = connection()
    conn.receive_text(SPEC_INIT)
    [action] = conn.receive_text(SPEC_REQUEST)
    assert isinstance(action, StartTurn)
    ctx, input_ = action.ctx, action.input
    assert (ctx.channel, ctx.namespace) == ("flowstorm_v1", "flowstorm")
    assert ctx.key == f"flowstorm:{SPEC_SESSION_ID}"
    assert ctx.app_key == SPEC_KEY
    assert ctx.device_id == "standalone_3C22FBBBAD22"
    assert (ctx.locale, ctx.time_zone) == ("en", "Europe/Prague")
    assert ctx.create
    assert dict(ctx.config) == json.loads(SPEC_INIT)["config"]
    assert dict(ctx.attributes) == {"clientType": "standalone:1.0.0-SNAPSHOT"}
    assert input_.text == "#intro"
    assert input_.action == "#intro"
    assert (input_.locale, input_.zone_id) == ("en_US", "Europe/Prague")
    assert conn.state is State.TURN


def test_a_turn_stores_only_the_v1_settings_of_the_init_config() -> None:
    """TurnContext.config (merged into the session's by every turn) holds the V1 settings
    of Init ``config`` (PROTOCOL-NOTES.md) with scalar values; unknown properties and
    values no setting has (lists, objects, strings over MAX_ID_CHARS) stay the
    connection's, as the settings the connection reads from them (sendResponseItems)."""
    conn = connection(max_frame_bytes=100_000)
    config = {
        "locale": "en",
        "sttSampleRate": 8000,
        "returnSsml": False,
        "test": None,
        "sendResponseItems": True,
        "voice": "v" * 257,
        "stt": {"nested": [1, 2]},
        "padding": "x" * 50_000,
    }
    [ready] = conn.receive_text(json.dumps({"type": "Init", "key": "k", "config": config}))
    assert frames([ready]) == [{"type": "Ready"}]
    [action] = conn.receive_text(json.dumps(request_frame("hi", "s1")))
    assert isinstance(action, StartTurn)
    assert dict(action.ctx.config) == {
        "locale": "en",
        "sttSampleRate": 8000,
        "returnSsml": False,
        "test": None,
        "sendResponseItems": True,
    }
    assert conn.init is not None
    assert conn.init.config["padding"] == "x" * 50_000


def test_an_input_confidence_out_of_0_to_1_is_an_error_and_nothing_changes() -> None:
    """A Request's or Input's ``transcript.confidence`` (and its alternatives') out of 0..1
    was handed to the core as sent; now it is the client's Error naming it, no turn
    starts, and a valid input goes on."""
    conn = connection()
    conn.receive_text(SPEC_INIT)
    for frame in (input_frame("hi"), request_frame("hi")):
        inner = frame["input"] if frame["type"] == "Input" else frame["request"]["input"]
        inner["transcript"]["confidence"] = -0.5
        [error] = frames(conn.receive_text(json.dumps(frame)))
        assert error == {
            "type": "Error",
            "text": "input.transcript.confidence must be from 0 to 1, not -0.5.",
            "source": "client",
        }
        inner["transcript"]["confidence"] = 0.7
        inner["alternatives"] = [{"text": "high", "confidence": 3}]
        [error] = frames(conn.receive_text(json.dumps(frame)))
        assert error["text"] == "input.alternatives.0.confidence must be from 0 to 1, not 3.0."
        assert conn.state is State.IDLE
    frame = input_frame("hi")
    frame["input"]["transcript"]["confidence"] = 0.7
    [action] = conn.receive_text(json.dumps(frame))
    assert isinstance(action, StartTurn)
    assert action.input.transcript.confidence == 0.7


def test_an_unavailable_confidence_of_minus_1_is_read_as_not_given() -> None:
    """Android's recognizer gives -1 for "an unavailable confidence score"
    (SpeechRecognizer.CONFIDENCE_SCORES); a client passing it on got the Error of a
    confidence out of 0..1, which ends its session. -1 is read as not given (1.0, the
    spec's default), in the transcript and each alternative; others are kept as sent."""
    conn = connection()
    conn.receive_text(SPEC_INIT)
    frame = input_frame("hi")
    frame["input"]["transcript"]["confidence"] = -1
    frame["input"]["alternatives"] = [
        {"text": "high", "confidence": -1},
        {"text": "hay", "confidence": 0.25},
    ]
    [action] = conn.receive_text(json.dumps(frame))
    assert isinstance(action, StartTurn)
    assert action.input.transcript.confidence == 1.0
    assert action.input.transcript.text == "hi"
    assert [(a.text, a.confidence) for a in action.input.alternatives] == [
        ("high", 1.0),
        ("hay", 0.25),
    ]


@pytest.mark.parametrize("golden", [SPEC_RESPONSE, SPEC_RESPONSE_ENDED])
def test_spec_response_is_sent_as_on_the_wire(golden: str) -> None:
    conn = connection()
    conn.receive_text(SPEC_INIT)
    conn.receive_text(SPEC_REQUEST)
    conn.turn_event(SessionStartedEvent(session_id=SPEC_SESSION_ID))  # a new session
    event = ResponseEvent.model_validate_json(golden)
    [sent] = frames(conn.turn_event(event))

    def without_nulls(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_nulls(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [without_nulls(v) for v in value]
        return value

    expected = without_nulls(json.loads(golden))
    # the gateway writes every Response field; the spec's example leaves defaults out
    expected["response"] |= {"attributes": {}, "logs": [], "sessionTimeout": 0}
    assert sent == expected


def test_parse_event_reads_every_v1_client_event() -> None:
    assert parse_event(SPEC_INIT).type == "Init"
    request = parse_event(SPEC_REQUEST)
    assert isinstance(request, RequestEvent)
    assert request.request.session_id == SPEC_SESSION_ID
    assert parse_event('{"type":"RequestEvent","request":{"input":{"transcript":{"text":"x"}}}}')
    for kind in ("Input", "Log", "InputAudioStreamOpen", "InputAudioStreamClose"):
        body = {"type": kind, "input": {"transcript": {"text": "x"}}, "unknown": 1}
        assert parse_event(json.dumps(body)).type == kind
    assert parse_event('{"type":"InputAudioStreamCancel"}').type == "InputAudioStreamCancel"


# --------------------------------------------------------------- the flow


def test_a_whole_conversation() -> None:
    conn = ready(connection())
    first = start(conn, request_frame("#intro", "s-1"))
    assert first.ctx.session_id == "s-1"
    assert finish_turn(conn, Response(items=[ResponseItem(text="Hi")]), new="s-1") == [
        {"type": "SessionStarted", "sessionId": "s-1"},
        {
            "type": "Response",
            "response": {
                "items": [{"text": "Hi", "confidence": 1.0, "repeatable": True}],
                "attributes": {},
                "logs": [],
                "sessionEnded": False,
                "sleepTimeout": 0,
                "sessionTimeout": 0,
            },
        },
    ]
    assert conn.session_id == "s-1"
    assert conn.state is State.IDLE

    # later turns stay in the connection's session
    assert start(conn, request_frame("my name is Tomas")).ctx.session_id == "s-1"
    finish_turn(conn, Response())
    assert start(conn, input_frame("what is my name")).ctx.session_id == "s-1"
    finish_turn(conn, Response())

    # the session ends: SessionEnded goes out and the id is forgotten
    start(conn, request_frame("bye"))
    sent = finish_turn(conn, Response(session_ended=True))
    assert [f["type"] for f in sent] == ["Response", "SessionEnded"]
    assert sent[1] == {"type": "SessionEnded"}
    assert conn.session_id is None

    # the next Request without sessionId starts a new session
    assert start(conn, request_frame("#intro")).ctx.session_id == "generated-1"


def test_a_proposed_session_id_switches_the_connections_session() -> None:
    conn = ready(connection())
    start(conn, input_frame("#intro"))
    finish_turn(conn, Response(), new="generated-1")
    assert conn.session_id == "generated-1"
    assert start(conn, input_frame("hello", "other")).ctx.session_id == "other"
    finish_turn(conn, Response())  # existing session: no SessionStarted
    assert conn.session_id == "other"
    assert start(conn, request_frame("again")).ctx.session_id == "other"


def test_a_connections_first_session_is_announced_even_when_it_exists() -> None:
    # flowstorm-socket-v1.md "Communication Flow": the server accepts the proposed
    # sessionId or sets another, "in both cases it will send BotEvent.SessionStarted";
    # Flowstorm's server sent it on the first Request of every connection, so a client
    # that reconnects (or moves from another device) into its session gets it too, and
    # `resumed` tells it the gateway still had the session (no `resumed`: created anew)
    conn = ready(connection(), tts="RequiredStreaming")
    start(conn, request_frame("#intro", "kept"))
    assert finish_turn(conn, Response()) == [
        {"type": "SessionStarted", "sessionId": "kept", "resumed": True},
        {
            "type": "Response",
            "response": {
                "items": [],
                "attributes": {},
                "logs": [],
                "sessionEnded": False,
                "sleepTimeout": 0,
                "sessionTimeout": 0,
            },
        },
    ]
    # the connection's later turns in it are not announced again
    start(conn, input_frame("hello"))
    sent = finish_turn(conn, Response(session_ended=True))
    assert [f["type"] for f in sent] == ["Response", "SessionEnded"]
    # after SessionEnded the connection has no session: the next one is announced,
    # before the first frame of its turn (here the speech of an item)
    start(conn, request_frame("#intro", "spoken"))
    assert conn.turn_event(ResponseItemEvent(response_item=ResponseItem(text="hi"))) == [
        Send('{"type":"SessionStarted","sessionId":"spoken","resumed":true}')
    ]
    assert conn.turn_event(BinaryEvent(data=b"ID3")) == [SendBytes(b"ID3")]
    # a new session's SessionStarted (the engine's) goes out once, without `resumed`
    start_again = ready(connection())
    start(start_again, request_frame("#intro", "new"))
    created = finish_turn(start_again, Response(), new="new")
    assert [f["type"] for f in created] == ["SessionStarted", "Response"]
    assert created[0] == {"type": "SessionStarted", "sessionId": "new"}


def test_response_items_go_out_only_with_send_response_items() -> None:
    item = ResponseItemEvent(response_item=ResponseItem(text="one"))
    quiet = ready(connection())
    start(quiet, request_frame("#intro"))
    quiet.turn_event(SessionStartedEvent(session_id="generated-1"))
    assert quiet.turn_event(item) == []

    chatty = ready(connection(), sendResponseItems=True)
    start(chatty, request_frame("#intro"))
    chatty.turn_event(SessionStartedEvent(session_id="generated-1"))
    assert frames(chatty.turn_event(item)) == [
        {
            "type": "ResponseItem",
            "responseItem": {"text": "one", "confidence": 1.0, "repeatable": True},
        }
    ]
    # the items went out as ResponseItems: the Response carries none (as V2's), or the
    # 2022 web client, which shows both, shows every message twice (PROTOCOL-NOTES.md)
    done = ResponseEvent(response=Response(items=[ResponseItem(text="one")], session_ended=True))
    [response] = frames(chatty.turn_event(done))
    assert response["response"]["items"] == []
    assert response["response"]["sessionEnded"] is True  # the rest is kept
    assert chatty.turn_over
    # without sendResponseItems the Response carries all items
    [response] = frames(quiet.turn_event(done))
    assert [i["text"] for i in response["response"]["items"]] == ["one"]


def test_init_config_and_device_are_passed_to_the_turn() -> None:
    conn = ready(connection(), locale="cs", zoneId="Europe/Prague", sttSampleRate=8000, tts="None")
    ctx = start(conn, request_frame("hi", deviceId="phone-1")).ctx
    assert ctx.device_id == "phone-1"
    assert (ctx.locale, ctx.time_zone) == ("cs", "Europe/Prague")
    assert ctx.config["sttSampleRate"] == 8000
    assert ctx.config["tts"] == "None"
    conn.turn_event(ResponseEvent(response=Response()))
    conn.turn_finished()
    assert start(conn, input_frame("hi")).ctx.device_id == "test-device"  # Init's deviceId


def test_the_engine_rejecting_a_turn_answers_an_error_and_keeps_the_session() -> None:
    conn = ready(connection())
    start(conn, request_frame("#intro", "mine"))
    finish_turn(conn, Response(), new="mine")
    start(conn, request_frame("hi", "foreign"))
    rejected = TurnRejected("session-foreign", "Session foreign belongs to another application.")
    text = one_error(conn.turn_rejected(rejected), "another application", source="session")
    assert text == rejected.text
    assert conn.state is State.IDLE
    assert conn.session_id == "mine"
    busy = TurnRejected("store-unavailable", "The session store is unavailable.")
    start(conn, request_frame("hi"))
    one_error(conn.turn_rejected(busy), "unavailable", source="gateway")


def test_a_stream_proposing_another_session_is_checked_before_it_is_heard() -> None:
    """An InputAudioStreamOpen proposing a session other than the connection's asks the
    I/O for its owner first ([CheckSession], nothing changed: no stream open); another
    application's is refused as its turn would be, before any StartListening; one that is
    no other's (or not known: the store did not answer) opens. The connection's own
    session, or none proposed, opens at once (no store read on the normal path)."""
    conn = ready(connection())
    start(conn, request_frame("#intro", "mine"))
    finish_turn(conn, Response(), new="mine")
    [check] = send(conn, {"type": "InputAudioStreamOpen", "sessionId": "foreign"})
    assert isinstance(check, CheckSession)
    assert check.ctx.session_id == "foreign"
    assert conn.state is State.IDLE
    refused = conn.session_checked(check, "foreign")
    text = one_error(refused, "another application", source="session")
    assert text == TurnRejected.foreign("foreign").text
    assert conn.state is State.IDLE
    assert conn.receive_bytes(b"\0\0" * 160) == []  # its audio is ignored
    for found in ("found", "not-found", None):
        opened = conn.session_checked(check, found)
        assert isinstance(opened[0], StartListening)
        assert frames(opened[1:]) == [{"type": "InputAudioStreamOpen"}]
        send(conn, {"type": "InputAudioStreamCancel"})
    for own in ({"sessionId": "mine"}, {}):
        opened = send(conn, {"type": "InputAudioStreamOpen", **own})
        assert isinstance(opened[0], StartListening)
        send(conn, {"type": "InputAudioStreamCancel"})


def test_an_engine_error_ends_the_turn() -> None:
    conn = ready(connection())
    start(conn, request_frame("hi", "s"))
    conn.turn_event(SessionStartedEvent(session_id="s"))
    [error] = frames(conn.turn_event(ErrorEvent(text="core down", source="pipeline")))
    assert error == {"type": "Error", "text": "core down", "source": "pipeline"}
    assert conn.turn_over
    conn.turn_finished()
    assert conn.state is State.IDLE
    assert conn.session_id == "s"


# ------------------------------------------------------------------ key check


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (init_frame("wrong"), ["unknown application key", "wrong"]),
        ({"type": "Init", "config": {}}, ["missing"]),
        (init_frame(""), ["missing"]),
        # the key is checked first: an invalid sessionId does not make it an Error alone
        ({**init_frame("wrong"), "sessionId": "has space"}, ["unknown application key"]),
        ({"type": "Init", "config": {}, "sessionId": "x" * 300}, ["missing"]),
    ],
)
def test_an_unknown_or_missing_key_is_an_error_then_close_1008(
    frame: dict[str, Any], words: list[str]
) -> None:
    conn = connection(lambda key: key == "right")
    actions = send(conn, frame)
    assert len(actions) == 2
    one_error(actions[:1], *words)
    close = actions[1]
    assert isinstance(close, Close)
    assert close.code == CLOSE_POLICY
    assert conn.state is State.CLOSED
    assert send(conn, request_frame("hi")) == []  # nothing more is read


def test_key_allowed_may_be_a_bool() -> None:
    assert frames(send(connection(True), init_frame("any"))) == [{"type": "Ready"}]
    refused = send(connection(False), init_frame("any"))
    assert isinstance(refused[-1], Close)
    assert isinstance(send(connection(True), init_frame(""))[-1], Close)


# ------------------------------------------------------------------ bad input


def test_a_request_before_init_is_an_error_and_init_still_works() -> None:
    conn = connection()
    one_error(send(conn, request_frame("hi")), "expected Init, got Request")
    assert conn.receive_bytes(b"\x00\x01") == []  # no stream open: ignored (Flowstorm's server)
    one_error(send(conn, {"type": "Log", "entries": []}), "expected Init")
    assert conn.state is State.AWAIT_INIT
    ready(conn)
    start(conn, request_frame("hi"))


def test_a_second_init_is_an_error() -> None:
    conn = ready(connection())
    one_error(
        send(conn, init_frame()), "expected Request, Input, Log or InputAudioStreamOpen, got Init"
    )
    assert conn.state is State.IDLE


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"type": "Request",', ["Malformed JSON at character"]),
        ("[1, 2]", ["must be a JSON object", "list"]),
        ('"Init"', ["must be a JSON object", "str"]),
        ('{"type": "Hello"}', ["Unknown event type", "'Hello'"]),
        ('{"no": "type"}', ["Unknown event type", "None"]),
        ('{"type": "Request"}', ["Invalid Request event", "request"]),
        ('{"type": "Request", "request": {"input": {}}}', ["transcript"]),
        ('{"type": "Init", "config": 5}', ["Invalid Init event", "config"]),
        ("[" * 100_000, ["nested deeper than 64 levels"]),
    ],
)
def test_malformed_unknown_and_invalid_frames_are_errors(text: str, words: list[str]) -> None:
    conn = ready(connection(max_frame_bytes=1_000_000))
    one_error(conn.receive_text(text), *words)
    assert conn.state is State.IDLE
    start(conn, request_frame("still works"))


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (request_frame("hi", "has space"), ["sessionId", "whitespace"]),
        (request_frame("hi", "x" * 300), ["sessionId", "longer than"]),
        (request_frame("   "), ["empty"]),
        (request_frame("hi", appKey="another"), ["appKey"]),
    ],
)
def test_invalid_requests_are_errors_and_start_no_turn(
    frame: dict[str, Any], words: list[str]
) -> None:
    conn = ready(connection())
    one_error(send(conn, frame), *words)
    assert conn.state is State.IDLE
    start(conn, request_frame("hi", appKey="test-key"))


@pytest.mark.parametrize("payload", ["x" * 101, "ž" * 51])
def test_an_oversized_text_frame_closes_1009(payload: str) -> None:
    conn = ready(connection(max_frame_bytes=100))
    [close] = conn.receive_text(payload)
    assert isinstance(close, Close)
    assert close.code == CLOSE_TOO_BIG
    assert conn.state is State.CLOSED
    assert conn.receive_text("{}") == []


def test_too_many_frames_is_an_error_then_close_1008_while_listening_too() -> None:
    """The I/O counts the frames (gateway.io.websocket.FrameRate); the protocol answers a
    client over the limit with an Error of source ``client`` and the close 1008, in any
    state (here an utterance is being heard), and is closed: nothing more is taken."""
    conn = ready()
    send(conn, {"type": "InputAudioStreamOpen"})
    error, close = conn.too_many_frames("at most 5 frames at once and 1 a second")
    text = "Too many frames: at most 5 frames at once and 1 a second."
    assert frames([error]) == [{"type": "Error", "text": text, "source": "client"}]
    assert close == Close(CLOSE_POLICY, text)
    assert conn.state is State.CLOSED
    assert conn.receive_bytes(b"\x00\x00") == []
    assert conn.too_many_frames("again") == []
    [cancel] = conn.connection_lost()  # the utterance is dropped as the socket goes
    assert isinstance(cancel, CancelListening)


def test_an_oversized_binary_frame_closes_1009() -> None:
    conn = ready(connection(max_frame_bytes=100))
    [close] = conn.receive_bytes(b"\x00" * 101)
    assert isinstance(close, Close)
    assert close.code == CLOSE_TOO_BIG


def test_a_frame_at_the_limit_is_read() -> None:
    frame = json.dumps(request_frame("hi " * 50))  # longer than the Init frame
    conn = ready(connection(max_frame_bytes=len(frame)))
    [action] = conn.receive_text(frame)
    assert isinstance(action, StartTurn)


def test_a_request_while_a_turn_runs_is_refused() -> None:
    conn = ready(connection())
    start(conn, request_frame("first", "s"))
    for frame in (request_frame("second"), input_frame("second")):
        one_error(send(conn, frame), "turn of this connection is still running", "got")
    conn.turn_event(ResponseEvent(response=Response()))
    # until its stream ended the turn counts as running
    one_error(send(conn, input_frame("third")), "still running")
    conn.turn_finished()
    start(conn, input_frame("third"))


# ------------------------------------------------------------------- logs


def entries(n: int, start_at: int = 0) -> list[dict[str, Any]]:
    """``n`` log entries with texts ``log <i>``."""
    return [{"time": 1, "level": "INFO", "text": f"log {i}"} for i in range(start_at, start_at + n)]


def test_logs_before_a_session_are_buffered_and_go_with_the_next_turn() -> None:
    conn = ready(connection())
    assert send(conn, {"type": "Log", "entries": entries(3)}) == []
    ctx = start(conn, request_frame("#intro")).ctx
    assert [e.text for e in ctx.logs] == ["log 0", "log 1", "log 2"]
    assert conn.buffered_logs == ()


def test_the_log_buffer_is_bounded() -> None:
    conn = ready(V1Connection(True, max_frame_bytes=100_000, log_buffer=100))
    send(conn, {"type": "Log", "entries": entries(150)})
    logs = start(conn, request_frame("#intro")).ctx.logs
    assert len(logs) == 100
    assert logs[0].text == "log 50"


def test_the_log_buffer_keeps_no_more_text_than_a_session_would() -> None:
    """The buffer held up to ``log_buffer`` entries whole: 100 Log frames of a MiB each
    before the first turn (or while the store is slow) were 100 MiB on one connection,
    of which the session keeps GATEWAY_MAX_LOG_CHARS. Entries are cut as the session cuts
    them (LogEntry.bounded) and the oldest go first once the text passes ``log_chars``."""
    conn = ready(V1Connection(True, max_frame_bytes=100_000, log_buffer=100, log_chars=1000))
    fat = {"time": "t" * 5000, "level": "L" * 5000, "text": "x" * 5000}
    for n in range(10):
        send(conn, {"type": "Log", "entries": [fat, {"text": f"{n}" * 300}]})
    logs = start(conn, request_frame("#intro")).ctx.logs
    assert sum(len(e.text) for e in logs) <= 1000
    # the last frame's fat entry (its text cut to 1000) and "9"s pass 1000 together
    assert [e.text for e in logs] == ["9" * 300]
    assert all(len(e.level) <= 64 and len(str(e.time)) <= 64 for e in logs)


def test_logs_with_a_session_are_stored_with_it() -> None:
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    [store] = send(conn, {"type": "LogEvent", "entries": entries(2)})
    assert isinstance(store, StoreLogs)
    assert store.ctx.key == "flowstorm:s"
    assert store.ctx.app_key == "test-key"
    assert [e.text for e in store.entries] == ["log 0", "log 1"]
    assert send(conn, {"type": "Log", "entries": []}) == []


def test_logs_during_a_turn_are_stored_when_it_ends() -> None:
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    assert send(conn, {"type": "Log", "entries": entries(1)}) == []
    conn.turn_event(SessionStartedEvent(session_id="s"))
    conn.turn_event(ResponseEvent(response=Response()))
    [store] = conn.turn_finished()
    assert isinstance(store, StoreLogs)
    assert store.ctx.session_id == "s"


def test_logs_not_stored_wait_for_the_next_turn() -> None:
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    [store] = send(conn, {"type": "Log", "entries": entries(1)})
    assert isinstance(store, StoreLogs)
    conn.logs_not_stored(store.entries, "s")
    assert conn.buffered_logs == (LogEntry(time=1, text="log 0"),)
    assert [e.text for e in start(conn, input_frame("hi")).ctx.logs] == ["log 0"]


def test_logs_during_a_turn_that_ends_the_session_are_dropped_not_kept() -> None:
    """Entries that came while the turn ending their session ran waited for a session,
    and went with the next turn, into the next session. They are dropped with a reason
    (the session is deleted); entries sent after the end go with the next turn."""
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    start(conn, input_frame("bye"))
    assert send(conn, {"type": "Log", "entries": entries(2)}) == []
    conn.turn_event(ResponseEvent(response=Response(session_ended=True)))
    conn.turn_event(SessionEndedEvent())
    assert send(conn, {"type": "Log", "entries": entries(1, start_at=2)}) == []  # (still its)
    assert conn.turn_finished() == [DropLogs("s", 3, ENDED_SESSION_LOGS)]
    assert conn.buffered_logs == ()
    send(conn, {"type": "Log", "entries": entries(1, start_at=3)})  # after the end: no session
    assert [e.text for e in start(conn, input_frame("hi")).ctx.logs] == ["log 3"]


def test_logs_not_stored_go_to_their_own_session_never_the_next_ones() -> None:
    """Entries whose write failed (the store busy or down) waited for the next turn,
    whatever its session. Handed back with their session, they go with that session's
    next turn, or are stored with it (StoreLogs) before a turn of another session."""
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    [store] = send(conn, {"type": "Log", "entries": entries(1)})
    assert isinstance(store, StoreLogs)
    conn.logs_not_stored(store.entries, "s")
    assert conn.buffered_logs == (LogEntry(time=1, text="log 0"),)
    [again, turn] = send(conn, request_frame("hi", "other"))  # the client moves on
    assert isinstance(again, StoreLogs)
    assert (again.ctx.key, [e.text for e in again.entries]) == ("flowstorm:s", ["log 0"])
    assert isinstance(turn, StartTurn)
    assert turn.ctx.logs == ()
    assert len(conn.buffered_logs) == 0  # stored with their session


def test_logs_handed_back_after_their_session_ended_never_go_into_a_new_one_of_its_id() -> None:
    """Entries whose write failed (busy) were handed back tagged with their session ``s``
    and waited for its next turn, also when a turn had ended ``s`` meanwhile: a client
    that later reused the id ``s`` had them stored in that new session. Now a write made
    before ``s`` ended that comes back afterwards is dropped (DropLogs, the I/O logs it);
    one made in the new life of ``s`` is kept for it as before."""
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    [store] = send(conn, {"type": "Log", "entries": entries(1)})
    assert isinstance(store, StoreLogs)
    start(conn, input_frame("bye"))  # the write waits for the lock of this turn
    conn.turn_event(ResponseEvent(response=Response(session_ended=True)))
    conn.turn_event(SessionEndedEvent())
    assert conn.turn_finished() == []  # s ended
    # then the write is answered busy: the entry comes back, of the ended s
    dropped = conn.logs_not_stored(store.entries, "s", store.life)
    assert dropped == [DropLogs("s", 1, HANDED_BACK_ENDED_LOGS)]
    assert conn.buffered_logs == ()
    turn = start(conn, request_frame("hi", "s"))  # the client reuses the id: a new session
    assert turn.ctx.logs == ()  # before: ("log 0",)
    finish_turn(conn, Response())
    [late] = send(conn, {"type": "Log", "entries": entries(1, start_at=1)})
    assert isinstance(late, StoreLogs)
    assert conn.logs_not_stored(late.entries, "s", late.life) == []  # the new s's: kept
    assert [e.text for e in start(conn, input_frame("again")).ctx.logs] == ["log 1"]


def test_logs_handed_back_while_idle_keep_their_order_and_the_newest() -> None:
    """Entries whose write found the connection's session expired while it was idle
    (a6578c7: kept for its next turn) were put before those already waiting, which
    were older (every entry sent while idle goes in a write of its own, in order): the
    next turn stored them newest first, and once LOG_BUFFER entries waited, each new
    one was the one dropped. Handed back with no turn running they now go after the
    waiting ones (the oldest dropped); during a turn, before those that came in it."""
    conn = ready(V1Connection(True, max_frame_bytes=10_000, silence_timeout_ms=5000, log_buffer=3))
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    for i in range(4):  # each write answered not-found: the session expired
        [store] = send(conn, {"type": "Log", "entries": entries(1, start_at=i)})
        assert isinstance(store, StoreLogs)
        conn.logs_not_stored(store.entries, "s")
    assert [e.text for e in conn.buffered_logs] == ["log 1", "log 2", "log 3"]
    turn = start(conn, input_frame("hi"))
    assert [e.text for e in turn.ctx.logs] == ["log 1", "log 2", "log 3"]
    finish_turn(conn, Response())  # (nothing waits)
    [late] = send(conn, {"type": "Log", "entries": entries(1, start_at=4)})
    assert isinstance(late, StoreLogs)
    start(conn, input_frame("again"))  # its write is answered busy while a turn runs
    send(conn, {"type": "Log", "entries": entries(1, start_at=5)})  # came in the turn
    conn.logs_not_stored(late.entries, "s")
    assert [e.text for e in conn.buffered_logs] == ["log 4", "log 5"]


def test_logs_of_a_rejected_turn_keep_their_session() -> None:
    """A turn the engine refused (busy, store down, foreign) never took its session on.
    The entries that went with it were handed back as of no session, so the next turn,
    of another session, stored them; and entries sent while it ran counted as sent in
    its session, which was never made: their write found none, and they were dropped
    as an ended session's. Now those that went with it keep their session (or none),
    and those sent while it ran count as sent in the connection's."""
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    finish_turn(conn, Response(), new="s")
    [store] = send(conn, {"type": "Log", "entries": entries(1)})
    assert isinstance(store, StoreLogs)
    conn.logs_not_stored(store.entries, "s")  # the store was busy: they wait, s's
    assert [e.text for e in start(conn, input_frame("hi")).ctx.logs] == ["log 0"]  # in s
    conn.turn_rejected(TurnRejected("session-busy", "The session is busy."))
    [store, turn] = send(conn, request_frame("hi", "other"))  # the client moves on
    assert isinstance(store, StoreLogs)  # s's entry goes to s, not to the other session
    assert (store.ctx.key, [e.text for e in store.entries]) == ("flowstorm:s", ["log 0"])
    assert isinstance(turn, StartTurn)
    assert turn.ctx.logs == ()
    # the first turn of a connection, refused: no session was made
    conn = ready(connection())
    send(conn, {"type": "Log", "entries": entries(1)})  # before any session
    assert [e.text for e in start(conn, input_frame("hi")).ctx.logs] == ["log 0"]
    send(conn, {"type": "Log", "entries": entries(1, start_at=1)})  # while it runs
    conn.turn_rejected(TurnRejected("store-unavailable", "The session store is unavailable."))
    assert conn.session_id is None
    again = start(conn, input_frame("hi"))  # a new session (a new id): both go with it
    assert again.ctx.session_id != "generated-1"
    assert [e.text for e in again.ctx.logs] == ["log 0", "log 1"]


def test_a_lost_connection_stores_its_buffered_logs() -> None:
    conn = ready(connection())
    start(conn, request_frame("#intro", "s"))
    send(conn, {"type": "Log", "entries": entries(1)})
    conn.turn_event(SessionStartedEvent(session_id="s"))
    [store] = conn.connection_lost()
    assert isinstance(store, StoreLogs)
    assert conn.state is State.CLOSED
    fresh = ready(connection())
    send(fresh, {"type": "Log", "entries": entries(1)})
    assert fresh.connection_lost() == []  # no session to store them in


# ------------------------------------------------------------- state table


def test_the_state_machine_names_what_was_expected_and_what_came() -> None:
    machine = ConnectionStateMachine()
    with pytest.raises(ProtocolError) as err:
        machine.feed("Request")
    assert (err.value.expected, err.value.got) == ("Init", "Request")
    assert machine.state is State.AWAIT_INIT
    assert machine.feed("Init") is State.IDLE
    assert machine.feed("Request") is State.TURN
    with pytest.raises(ProtocolError, match="still running"):
        machine.feed("Input")
    assert machine.feed("Response") is State.TURN_ENDING
    assert machine.feed("SessionEnded") is State.TURN_ENDING
    assert machine.feed("TurnFinished") is State.IDLE


def test_the_table_lets_nothing_but_connection_lost_happen_when_closed() -> None:
    closed = {event for (state, event) in TRANSITIONS if state is State.CLOSED}
    assert closed == {"ConnectionLost"}
    # every open state can be closed by an oversized frame
    for state in State:
        if state is not State.CLOSED:
            assert TRANSITIONS[(state, "Oversized")] is State.CLOSED


def test_a_turn_event_without_a_turn_is_a_protocol_error() -> None:
    conn = ready(connection())
    with pytest.raises(LocalProtocolError):  # the gateway's own mistake, not the client's
        conn.turn_event(ResponseEvent(response=Response()))


# ------------------------------------------------------------------- audio


def state(conn: V1Connection) -> State:
    """The connection's state (read through a call: it changes under mypy's narrowing)."""
    return conn.state


def send_open(conn: V1Connection, **frame: Any) -> list[Action]:
    """Feed InputAudioStreamOpen (with ``frame`` fields); its actions, a CheckSession of
    the session it proposes answered ``found`` (the session is no other application's)."""
    actions = send(conn, {"type": "InputAudioStreamOpen", **frame})
    if len(actions) == 1 and isinstance(check := actions[0], CheckSession):
        actions = conn.session_checked(check, "found")
    return actions


def opened(conn: V1Connection, **frame: Any) -> StartListening:
    """Feed InputAudioStreamOpen (with ``frame`` fields); its StartListening (the ack follows)."""
    start, ack = send_open(conn, **frame)
    assert isinstance(start, StartListening), start
    assert frames([ack]) == [{"type": "InputAudioStreamOpen"}]
    assert state(conn) is State.LISTENING
    return start


def test_an_audio_stream_starts_listening_with_the_init_config() -> None:
    conn = ready(connection(silence_timeout_ms=4000))
    start = opened(conn)
    assert start.fmt == AudioFormat("LINEAR16", 16000)  # PROTOCOL-NOTES default
    assert (start.interim, start.silence_timeout_ms) == (False, 4000)  # the gateway's default
    assert start.idle_timeout_ms == 4000 + AUDIO_IDLE_MARGIN_MS

    conn = ready(
        sttSampleRate=44100, sttInterimResults=True, silenceTimeout=1500, sttMode="singleUtterance"
    )
    start = opened(conn)
    assert start.fmt == AudioFormat("LINEAR16", 44100)
    assert (start.interim, start.silence_timeout_ms) == (True, 1500)
    assert conn.receive_bytes(b"\x01\x02" * 10) == [FeedAudio(start.stream, b"\x01\x02" * 10)]


@pytest.mark.parametrize("rate", STT_SAMPLE_RATES)
def test_every_v1_sample_rate_is_accepted(rate: int) -> None:
    assert opened(ready(sttSampleRate=rate)).fmt.sample_rate == rate


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"sttSampleRate": 12000}, ["sttSampleRate", "8000, 16000, 22050, 44100, 48000", "12000"]),
        ({"sttSampleRate": True}, ["sttSampleRate", "True"]),
        ({"silenceTimeout": 0}, ["silenceTimeout", "got 0"]),
        ({"silenceTimeout": 10**9}, ["silenceTimeout"]),
        ({"sttMode": 3}, ["sttMode"]),
    ],
)
def test_unsupported_audio_settings_are_an_error_at_open(
    config: dict[str, Any], words: list[str]
) -> None:
    conn = ready(**config)
    one_error(send(conn, {"type": "InputAudioStreamOpen"}), "Unsupported audio input", *words)
    assert state(conn) is State.IDLE
    start(conn, request_frame("text still works"))


def test_interim_results_go_out_only_when_asked_for() -> None:
    quiet = ready()
    stream = opened(quiet).stream
    assert quiet.heard(stream, Heard("speech_started")) == []
    assert quiet.heard(stream, Heard("interim", "tell me")) == []
    chatty = ready(sttInterimResults="true")
    stream = opened(chatty).stream
    assert frames(chatty.heard(stream, Heard("interim", "tell me"))) == [
        {"type": "Recognized", "text": "tell me", "isFinal": False}
    ]
    assert chatty.state is State.LISTENING


def test_the_final_result_is_recognized_and_starts_the_turn() -> None:
    conn = ready(tts="RequiredLinks")
    stream = opened(conn, sessionId="spoken").stream
    recognized, turn = conn.heard(stream, Heard("final", "tell me about this place", 0.8))
    assert frames([recognized]) == [
        {"type": "Recognized", "text": "tell me about this place", "isFinal": True}
    ]
    assert isinstance(turn, StartTurn)
    assert turn.input.transcript == Transcript(text="tell me about this place", confidence=0.8)
    assert turn.ctx.session_id == "spoken"
    assert turn.ctx.tts == TtsRequest("links", "mp3")
    # the client still streams until it sees Recognized: that audio is dropped
    assert state(conn) is State.TURN_DRAINING
    assert conn.receive_bytes(b"\x00\x00" * 160) == []
    assert send(conn, {"type": "InputAudioStreamClose"}) == []
    assert state(conn) is State.TURN
    # the proposed session becomes the connection's when the engine takes the turn on
    assert conn.session_id is None
    finish_turn(conn, Response(), new="spoken")
    assert conn.session_id == "spoken"
    assert start(conn, input_frame("and now text")).ctx.session_id == "spoken"


def test_silence_is_recognized_as_the_silence_action() -> None:
    conn = ready()
    stream = opened(conn).stream
    recognized, turn = conn.heard(stream, Heard("silence", at_ms=5000))
    assert frames([recognized]) == [{"type": "Recognized", "text": "#silence", "isFinal": True}]
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "#silence"
    assert turn.input.action == "#silence"


def test_closing_the_stream_finishes_the_utterance() -> None:
    conn = ready()
    stream = opened(conn).stream
    assert send(conn, {"type": "InputAudioStreamClose"}) == [FinishListening(stream)]
    assert state(conn) is State.FINISHING
    assert send(conn, {"type": "InputAudioStreamClose"}) == []  # idempotent
    assert conn.receive_bytes(b"\x00\x00") == []  # the stream is closed: ignored
    one_error(send(conn, {"type": "InputAudioStreamOpen"}), "being recognised")
    assert conn.audio_timeout(stream) == []  # already finishing
    _, turn = conn.heard(stream, Heard("final", "hello", 0.9))
    assert isinstance(turn, StartTurn)
    assert state(conn) is State.TURN  # the client's stream is closed already


def test_cancel_drops_the_utterance_and_its_late_results() -> None:
    conn = ready()
    stream = opened(conn).stream
    conn.receive_bytes(b"\x00\x00" * 160)
    assert send(conn, {"type": "InputAudioStreamCancel"}) == [CancelListening(stream)]
    assert state(conn) is State.IDLE
    # results the listener made before it noticed are ignored
    assert conn.heard(stream, Heard("final", "too late", 0.9)) == []
    assert conn.audio_failed(stream, RecognitionError("gone")) == []
    assert conn.audio_timeout(stream) == []
    assert send(conn, {"type": "InputAudioStreamCancel"}) == []  # nothing open: nothing to do
    # a new stream gets a new number
    assert opened(conn).stream != stream


@pytest.mark.parametrize(
    ("error", "source", "words"),
    [
        (
            AudioFormatError("expected LINEAR16 audio: got an odd number of bytes"),
            "client",
            ["odd"],
        ),
        (AudioLimitExceeded("expected at most 5 s of audio"), "client", ["at most 5 s"]),
        (RecognitionError("pocketsphinx failed: boom"), "stt", ["recognition failed", "boom"]),
        (
            RecognizerBusy("queue-full", 3, "Speech recognition is busy: try again in 3 s"),
            "stt",
            ["recognition is busy", "try again in 3 s", "utterance was dropped"],
        ),
    ],
)
def test_a_failed_utterance_is_an_error_and_the_connection_goes_on(
    error: Exception, source: str, words: list[str]
) -> None:
    conn = ready()
    stream = opened(conn).stream
    one_error(conn.audio_failed(stream, error), *words, source=source)
    assert state(conn) is State.DRAINING  # the client may still be streaming
    assert conn.receive_bytes(b"\x00\x00" * 160) == []
    opened(conn)  # a new utterance ends the old stream
    send(conn, {"type": "InputAudioStreamCancel"})
    start(conn, request_frame("text works"))


def test_the_wall_clock_guard_finishes_a_stream_the_client_stopped_feeding() -> None:
    conn = ready()
    stream = opened(conn).stream
    assert conn.audio_timeout(stream) == [FinishListening(stream)]
    assert state(conn) is State.LISTENING  # the client has not closed its stream
    conn.heard(stream, Heard("silence"))
    assert state(conn) is State.TURN_DRAINING


def test_typing_while_an_utterance_is_heard_drops_it_for_the_text() -> None:
    for close_first in (False, True):
        conn = ready()
        stream = opened(conn).stream
        if close_first:
            send(conn, {"type": "InputAudioStreamClose"})
        cancel, turn = send(conn, input_frame("typed"))
        assert cancel == CancelListening(stream)
        assert isinstance(turn, StartTurn)
        assert turn.input.text == "typed"
        assert conn.state is (State.TURN if close_first else State.TURN_DRAINING)
        assert conn.heard(stream, Heard("final", "spoken", 1.0)) == []


@pytest.mark.parametrize("frame", [b"", b"\x00\x00"], ids=["ping", "audio"])
def test_binary_frames_without_an_open_stream_are_ignored(frame: bytes) -> None:
    """The 2022 web client pings with an empty binary frame every 10 s and ends its
    session at any Error: Flowstorm's server ignored binary frames with no stream open
    (PROTOCOL-NOTES.md "Flowstorm Socket V1"), so does the gateway, in every state."""
    conn = connection()
    assert conn.receive_bytes(frame) == []  # before Init
    ready(conn)
    for _ in range(3):
        assert conn.receive_bytes(frame) == []
    assert state(conn) is State.IDLE
    start(conn, request_frame("hi"))
    assert conn.receive_bytes(frame) == []  # while a turn runs
    one_error(send(conn, {"type": "InputAudioStreamOpen"}), "turn of this connection is still")
    assert conn.receive_bytes(frame) == []
    assert state(conn) is State.TURN
    finish_turn(conn, Response(items=[ResponseItem(text="hello")]), new="s")
    assert conn.receive_bytes(frame) == []  # idle in a session
    assert send(conn, {"type": "InputAudioStreamClose"}) == []
    assert conn.session_id == "s"
    # an open stream takes audio again; an empty frame (the ping) is no audio
    stream = opened(conn).stream
    assert conn.receive_bytes(b"") == []
    assert conn.receive_bytes(b"\x00\x00") == [FeedAudio(stream, b"\x00\x00")]


def test_a_second_open_while_listening_is_an_error() -> None:
    conn = ready()
    opened(conn)
    one_error(send(conn, {"type": "InputAudioStreamOpen"}), "audio input stream is open")
    assert state(conn) is State.LISTENING


def test_an_invalid_session_id_with_the_stream_is_an_error() -> None:
    conn = ready()
    one_error(send(conn, {"type": "InputAudioStreamOpen", "sessionId": "a b"}), "sessionId")
    assert state(conn) is State.IDLE


def test_the_streams_session_defaults_to_the_connections() -> None:
    conn = ready()
    start(conn, request_frame("#intro", "mine"))
    finish_turn(conn, Response(), new="mine")
    stream = opened(conn).stream
    _, turn = conn.heard(stream, Heard("final", "hello", 0.5))
    assert isinstance(turn, StartTurn)
    assert turn.ctx.session_id == "mine"


@pytest.mark.parametrize(
    ("config", "tts"),
    [
        ({}, None),
        ({"tts": None}, None),
        ({"tts": "None", "ttsFileType": "wav"}, None),
        ({"tts": "RequiredLinks"}, TtsRequest("links", "mp3")),
        ({"tts": "RequiredStreaming", "ttsFileType": "mulaw"}, TtsRequest("audio", "mulaw")),
        ({"tts": "requiredstreaming", "ttsFileType": "WAV"}, TtsRequest("audio", "wav")),
    ],
)
def test_the_tts_config_goes_with_every_turn(
    config: dict[str, Any], tts: TtsRequest | None
) -> None:
    conn = ready(**config)
    assert start(conn, request_frame("hi")).ctx.tts == tts
    conn.turn_event(ResponseEvent(response=Response()))
    conn.turn_finished()
    stream = opened(conn).stream
    _, turn = conn.heard(stream, Heard("final", "hello", 0.5))
    assert isinstance(turn, StartTurn)
    assert turn.ctx.tts == tts


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"tts": "Always"}, ["config.tts", "None, RequiredLinks or RequiredStreaming", "Always"]),
        ({"tts": 1}, ["config.tts"]),
        ({"tts": "RequiredLinks", "ttsFileType": "ogg"}, ["config.ttsFileType", "'ogg'"]),
    ],
)
def test_an_invalid_tts_config_refuses_init(config: dict[str, Any], words: list[str]) -> None:
    conn = connection()
    one_error(send(conn, init_frame(**config)), "Invalid Init event", *words)
    assert state(conn) is State.AWAIT_INIT
    ready(conn)


@pytest.mark.parametrize(
    "config",
    [{"locale": 5}, {"locale": ["en"]}, {"zoneId": {"id": "Europe/Prague"}}, {"zoneId": True}],
)
def test_an_init_locale_or_zone_that_is_not_a_string_refuses_init(config: dict[str, Any]) -> None:
    """A ``config.locale`` or ``config.zoneId`` of another JSON type was accepted and
    silently dropped (the session ran in the default locale and time zone), while a string
    that is no language tag or time zone, and an input's locale of the wrong type, are an
    Error: it is an Error naming the setting and what came, and Init may come again."""
    conn = connection()
    [name] = config
    text = one_error(send(conn, init_frame(**config)), "Invalid Init event", f"config.{name}")
    assert repr(config[name]) in text
    assert state(conn) is State.AWAIT_INIT
    ready(conn, locale=None, zoneId="")  # null and empty: not set
    assert start(conn, request_frame("hi")).ctx.locale is None


@pytest.mark.parametrize("last_seq", [True, False, "5", "", 5.5, -1, [3], {"seq": 3}])
def test_an_init_last_seq_that_is_not_a_non_negative_integer_refuses_init(
    last_seq: Any,
) -> None:
    """``lastSeq: true`` and ``lastSeq: "5"`` were taken (pydantic's lax int: as 1 and 5),
    so a client's wrong-typed position resumed from a seq it never named. Like a
    wrong-typed ``config.locale``, anything but a non-negative JSON integer is an Error
    naming ``lastSeq`` and what came, and Init may come again."""
    conn = connection()
    frame = {**init_frame(), "sessionId": "s-1", "lastSeq": last_seq}
    text = one_error(send(conn, frame), "Invalid Init event", "lastSeq", "non-negative integer")
    assert text.endswith(f"got {last_seq!r}")
    assert state(conn) is State.AWAIT_INIT
    assert not conn.numbered
    for good, after in ((0, 0), (7, 7), (7.0, 7), (None, None)):  # JSON null: not sent
        conn = connection()
        actions = send(conn, {**init_frame(), "sessionId": "s-1", "lastSeq": good})
        assert [type(a) for a in actions] == [Send, Follow]
        follow = actions[-1]
        assert isinstance(follow, Follow)
        assert (follow.ctx.session_id, follow.after) == ("s-1", after)
        assert conn.numbered is (good is not None)


def test_streamed_speech_goes_out_as_binary_frames() -> None:
    conn = ready(tts="RequiredStreaming")
    start(conn, request_frame("#intro"))
    conn.turn_event(SessionStartedEvent(session_id="generated-1"))
    assert conn.turn_event(ResponseItemEvent(response_item=ResponseItem(text="hi"))) == []
    assert conn.turn_event(BinaryEvent(data=b"ID3 mp3")) == [SendBytes(b"ID3 mp3")]
    assert state(conn) is State.TURN


def test_a_lost_connection_cancels_the_utterance() -> None:
    conn = ready()
    stream = opened(conn).stream
    assert conn.connection_lost() == [CancelListening(stream)]
    assert conn.heard(stream, Heard("final", "late", 1.0)) == []


# --------------------------------------------------------------- sttMode Duplex


def duplex_opened(conn: V1Connection, **frame: Any) -> StartListening:
    """Feed InputAudioStreamOpen of a Duplex client; its StartListening (the ack follows)."""
    start, ack = send_open(conn, **frame)
    assert isinstance(start, StartListening), start
    assert frames([ack]) == [{"type": "InputAudioStreamOpen"}]
    assert state(conn) is State.DUPLEX
    return start


def said(conn: V1Connection, stream: int, text: str) -> StartTurn:
    """The final result ``text`` of utterance ``stream``: its Recognized and turn."""
    recognized, turn = conn.heard(stream, Heard("final", text, 0.9))
    assert frames([recognized]) == [{"type": "Recognized", "text": text, "isFinal": True}]
    assert isinstance(turn, StartTurn)
    assert turn.input.text == text
    return turn


def test_a_duplex_stream_carries_one_utterance_after_another() -> None:
    conn = ready(sttMode="Duplex", silenceTimeout=1500, sttInterimResults=True)
    first = duplex_opened(conn, sessionId="spoken")
    assert first.continuous
    assert first.interim
    assert first.silence_timeout_ms is None  # no #silence in Duplex
    assert first.idle_timeout_ms == 1500 + AUDIO_IDLE_MARGIN_MS
    audio = b"\x01\x02" * 160
    assert conn.receive_bytes(audio) == [FeedAudio(first.stream, audio)]
    turn = said(conn, first.stream, "tell me about this place")
    assert turn.ctx.session_id == "spoken"
    assert state(conn) is State.DUPLEX_TURN
    # the stream stays open while the turn runs: its audio is heard (for onsets)
    assert conn.receive_bytes(audio) == [FeedAudio(first.stream, audio)]
    *sent, second = answered(conn, Response(items=[ResponseItem(text="Hi")]), new="spoken")
    assert [f["type"] for f in frames(sent)] == ["SessionStarted", "Response"]
    assert isinstance(second, StartListening)  # the next utterance, on the same stream
    assert second.continuous
    assert second.stream != first.stream
    assert state(conn) is State.DUPLEX
    assert conn.receive_bytes(audio) == [FeedAudio(second.stream, audio)]
    assert said(conn, second.stream, "and the weather").ctx.session_id == "spoken"
    [third] = answered(conn, Response())[-1:]
    assert isinstance(third, StartListening)
    # nothing recognised: no #silence turn, no frame; the next utterance is listened for
    [fourth] = conn.heard(third.stream, Heard("silence", at_ms=5000))
    assert isinstance(fourth, StartListening)
    assert fourth.continuous
    [fifth] = conn.heard(fourth.stream, Heard("final", "", 0.0))
    assert isinstance(fifth, StartListening)
    assert state(conn) is State.DUPLEX
    # the wall-clock guard still finishes an utterance whose client stopped sending
    assert conn.audio_timeout(fifth.stream) == [FinishListening(fifth.stream)]


def test_closing_a_duplex_stream_finishes_its_last_utterance() -> None:
    conn = ready(sttMode="duplex")
    stream = duplex_opened(conn).stream
    assert send(conn, {"type": "InputAudioStreamClose"}) == [FinishListening(stream)]
    assert state(conn) is State.FINISHING
    assert conn.receive_bytes(b"\x00\x00") == []  # audio after Close: ignored
    cancel, *rest = conn.heard(stream, Heard("final", "goodbye", 0.9))
    assert cancel == CancelListening(stream)  # the stream's stage is dropped
    assert [type(a) for a in rest] == [Send, StartTurn]
    assert state(conn) is State.TURN
    assert [f["type"] for f in frames(answered(conn, Response()))] == ["SessionStarted", "Response"]
    assert state(conn) is State.IDLE  # no next utterance

    # closed with nothing said: no Recognized, no turn
    stream = duplex_opened(conn).stream
    send(conn, {"type": "InputAudioStreamClose"})
    assert conn.heard(stream, Heard("silence")) == [CancelListening(stream)]
    assert state(conn) is State.IDLE

    # closed while an utterance's turn runs: the turn goes on, the stream is over
    stream = duplex_opened(conn).stream
    said(conn, stream, "one")
    assert send(conn, {"type": "InputAudioStreamClose"}) == [CancelListening(stream)]
    assert state(conn) is State.TURN
    assert conn.receive_bytes(b"\x00\x00") == []
    assert [type(a) for a in answered(conn, Response())] == [Send]
    assert state(conn) is State.IDLE


def test_cancelling_a_duplex_stream_drops_it() -> None:
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    assert send(conn, {"type": "InputAudioStreamCancel"}) == [CancelListening(stream)]
    assert state(conn) is State.IDLE
    assert conn.heard(stream, Heard("final", "too late", 0.9)) == []
    assert conn.receive_bytes(b"\x00\x00") == []
    # during a turn
    stream = duplex_opened(conn).stream
    said(conn, stream, "one")
    assert send(conn, {"type": "InputAudioStreamCancel"}) == [CancelListening(stream)]
    assert state(conn) is State.TURN


def test_opening_an_open_duplex_stream_again_is_acknowledged() -> None:
    """The reference client forgets its Duplex stream without InputAudioStreamClose at any
    Error and opens it again at its next Response; Flowstorm's server kept its stream."""
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    again = send(conn, {"type": "InputAudioStreamOpen"})
    assert frames(again) == [{"type": "InputAudioStreamOpen"}]
    assert state(conn) is State.DUPLEX
    assert conn.receive_bytes(b"\x00\x00") == [FeedAudio(stream, b"\x00\x00")]  # the same one
    one_error(send(conn, {"type": "InputAudioStreamOpen", "sessionId": "x" * 300}), "sessionId")
    said(conn, stream, "one")
    moved = send_open(conn, sessionId="moved")
    assert frames(moved) == [{"type": "InputAudioStreamOpen"}]
    assert state(conn) is State.DUPLEX_TURN
    [following] = answered(conn, Response(), new="first")[-1:]
    assert isinstance(following, StartListening)
    # a turn adopted "first"; the proposed "moved" came before: the turn's session wins
    assert said(conn, following.stream, "two").ctx.session_id == "first"
    # a Request is still refused while the turn runs
    one_error(send(conn, request_frame("typed")), "still running")


def test_typing_on_a_duplex_stream_runs_the_text_and_listens_again() -> None:
    """Typed input drops the utterance being spoken, not the stream's stage: the stream
    stays open and is heard through the text turn, as through a spoken one (its stage
    was dropped with the utterance, and its audio with it until the turn ended)."""
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    cancel, turn = send(conn, input_frame("typed"))
    assert cancel == CancelListening(stream, hear_on=True)
    assert isinstance(turn, StartTurn)
    assert state(conn) is State.DUPLEX_TURN
    assert conn.receive_bytes(b"\0\0") == [FeedAudio(stream, b"\0\0")]  # heard
    [listen] = answered(conn, Response())[-1:]
    assert isinstance(listen, StartListening)
    assert listen.continuous
    assert listen.stream != stream
    assert conn.receive_bytes(b"\0\0") == [FeedAudio(listen.stream, b"\0\0")]
    # a rejected turn: its Error, and the stream goes on
    said(conn, listen.stream, "spoken")
    error, again = conn.turn_rejected(TurnRejected("session-busy", "The session is busy."))
    assert frames([error])[0]["type"] == "Error"
    assert isinstance(again, StartListening)
    assert again.continuous
    assert state(conn) is State.DUPLEX


def test_a_duplex_stream_ended_around_a_text_turn_drops_its_stage() -> None:
    # closed during a text turn: the stream's stage is dropped (no hear_on), no next utterance
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    send(conn, input_frame("typed"))
    assert send(conn, {"type": "InputAudioStreamClose"}) == [CancelListening(stream)]
    assert conn.receive_bytes(b"\0\0") == []
    assert not any(isinstance(a, StartListening) for a in answered(conn, Response()))
    assert state(conn) is State.IDLE
    # typed once the stream is closed, while its last utterance is finished: all dropped
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    assert send(conn, {"type": "InputAudioStreamClose"}) == [FinishListening(stream)]
    cancel, _ = send(conn, input_frame("typed"))
    assert cancel == CancelListening(stream)


def test_session_ended_and_audio_errors_end_a_duplex_stream() -> None:
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    said(conn, stream, "goodbye")
    sent = answered(conn, Response(session_ended=True), new="s")
    assert [type(a) for a in sent] == [Send, Send, Send, CancelListening]
    assert [f["type"] for f in frames(sent[:3])] == ["SessionStarted", "Response", "SessionEnded"]
    assert sent[-1] == CancelListening(stream)
    assert state(conn) is State.IDLE
    assert conn.receive_bytes(b"\x00\x00") == []  # the stream is over: ignored
    stream = duplex_opened(conn).stream  # the client opens it again
    error, cancel = conn.audio_failed(stream, AudioLimitExceeded("expected at most 5 s"))
    assert frames([error])[0]["source"] == "client"
    assert cancel == CancelListening(stream)
    assert state(conn) is State.DRAINING
    assert conn.receive_bytes(b"\x00\x00") == []
    stream = duplex_opened(conn).stream
    assert conn.connection_lost() == [CancelListening(stream)]


def test_the_table_covers_the_audio_states() -> None:
    # every state after Init takes Log; every state can lose its connection
    for state in State:
        assert TRANSITIONS[(state, "ConnectionLost")] is State.CLOSED
        if state not in (State.AWAIT_INIT, State.CLOSED):
            assert TRANSITIONS[(state, "Log")] is state
    # audio frames are legal exactly where the client's stream is open
    binary = {state for (state, event) in TRANSITIONS if event == "Binary"}
    assert binary == {
        State.LISTENING,
        State.DRAINING,
        State.TURN_DRAINING,
        State.TURN_ENDING_DRAINING,
        State.DUPLEX,
        State.DUPLEX_TURN,
        State.DUPLEX_TURN_ENDING,
    }
    # a stream opens only when no turn runs and no utterance is being heard
    opens = {state for (state, event) in TRANSITIONS if event == "InputAudioStreamOpen"}
    assert opens == {State.IDLE, State.DRAINING}
    # ... and a Duplex stream also again while it is open (acknowledged, nothing changes)
    duplex = {
        state: TRANSITIONS[(state, event)]
        for (state, event) in TRANSITIONS
        if event == "InputAudioStreamOpen (Duplex)"
    }
    assert duplex == {
        State.IDLE: State.DUPLEX,
        State.DRAINING: State.DUPLEX,
        State.DUPLEX: State.DUPLEX,
        State.DUPLEX_TURN: State.DUPLEX_TURN,
        State.DUPLEX_TURN_ENDING: State.DUPLEX_TURN_ENDING,
    }
    # a result ends an utterance in a turn
    for state in (State.LISTENING, State.FINISHING, State.DUPLEX):
        for event in ("Final", "Silence"):
            if (state, event) in TRANSITIONS:
                assert TRANSITIONS[(state, event)] in (
                    State.TURN,
                    State.TURN_DRAINING,
                    State.DUPLEX_TURN,
                )
    # ... except a Duplex one that heard nothing: no turn, the stream goes on (or ends)
    assert TRANSITIONS[(State.DUPLEX, "Silence (Duplex)")] is State.DUPLEX
    assert TRANSITIONS[(State.FINISHING, "Silence (Duplex)")] is State.IDLE
    assert (State.DUPLEX, "Silence") not in TRANSITIONS


# ------------------------------------------------------------------ outbox


def test_the_table_lets_the_outbox_out_between_turns_and_before_an_answer() -> None:
    outbox = {state for (state, event) in TRANSITIONS if event == "Outbox"}
    assert outbox == {
        State.IDLE,
        State.LISTENING,
        State.FINISHING,
        State.DRAINING,
        State.DUPLEX,
        State.TURN,
        State.TURN_DRAINING,
        State.DUPLEX_TURN,
    }
    for state in outbox:
        assert TRANSITIONS[(state, "Outbox")] is state


def test_a_pushed_session_end_gives_a_duplex_streams_next_utterances_a_new_session() -> None:
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn, sessionId="old").stream
    said(conn, stream, "hello")
    [listen] = answered(conn, Response(), new="old")[-1:]
    assert isinstance(listen, StartListening)
    ended = Missed(4, True, {"type": "SessionEnded"})
    assert frames(conn.deliver([ended])) == [{"type": "SessionEnded"}]
    assert state(conn) is State.DUPLEX  # the stream goes on ...
    assert said(conn, listen.stream, "again").ctx.session_id == "generated-1"  # ... anew


def test_a_pushed_responses_items_carry_the_push_seq() -> None:
    """A push is one outbox entry (gateway/push.py): with ``sendResponseItems`` its items
    go out as ResponseItem frames before the Response, and each carries the push's
    ``seq`` as V2's do. They went out without it: a client that lost its socket after
    some of them could not tell they were of that entry, and resuming from the last
    ``seq`` it saw got them again (shown twice)."""
    conn = connection()
    assert frames(send(conn, {**init_frame(sendResponseItems=True), "lastSeq": 0})) == [
        {"type": "Ready"}
    ]
    items = [{"text": "One."}, {"text": "Two."}]
    pushed = Missed(7, True, {"type": "Response", "response": {"items": items}})
    sent = frames(conn.deliver([pushed]))
    assert [(f["type"], f["seq"]) for f in sent] == [
        ("ResponseItem", 7),
        ("ResponseItem", 7),
        ("Response", 7),
    ]
    assert [f["responseItem"]["text"] for f in sent[:2]] == ["One.", "Two."]
    assert sent[-1]["response"]["items"] == []  # each item shown once
    # a replayed turn's item is its own entry, with its own seq
    replayed = Missed(8, False, {"type": "ResponseItem", "responseItem": {"text": "Hi"}})
    assert [f["seq"] for f in frames(conn.deliver([replayed]))] == [8]
    # a client that did not ask for seq (no lastSeq) gets none, on any frame
    plain = ready(sendResponseItems=True)
    assert all("seq" not in f for f in frames(plain.deliver([pushed])))


def test_an_outbox_entry_this_version_does_not_deliver_names_its_field() -> None:
    """missed_event: a readable entry's event with its seq; else ValueError naming the
    field that failed (never the content), and deliver skips it."""
    event = missed_event(Missed(2, False, {"type": "Error", "text": "t", "source": "s"}))
    assert isinstance(event, ErrorEvent)
    assert event.seq == 2
    with pytest.raises(ValueError, match=r"^type: not one of ResponseItem, Response, ") as exc:
        missed_event(Missed(3, False, {"type": "Secret"}))
    assert "Secret" not in str(exc.value)
    wrong = Missed(4, False, {"type": "Response", "response": "secret"})
    with pytest.raises(ValueError, match=r"^response: ") as exc:
        missed_event(wrong)
    assert "secret" not in str(exc.value)
    assert ready().deliver([wrong]) == []


def test_outbox_entries_wait_for_a_running_answer() -> None:
    pushed = Missed(3, True, {"type": "Response", "response": {"items": [{"text": "Hi"}]}})
    conn = ready()
    start(conn, request_frame("hello"))
    # the turn just started and has not answered: only what it missed, before it
    assert not conn.can_deliver()
    assert conn.deliver([pushed]) == []
    assert [f["type"] for f in frames(conn.deliver([pushed], before_turn=True))] == ["Response"]
    assert conn.state is State.TURN
    conn.turn_event(ResponseEvent(response=Response(items=[ResponseItem(text="Hello")])))
    assert state_of(conn) is State.TURN_ENDING  # the answer is out: nothing may come between
    assert not conn.can_deliver(before_turn=True)
    assert conn.deliver([pushed], before_turn=True) == []
    conn.turn_finished()
    [frame] = frames(conn.deliver([pushed]))
    assert frame["type"] == "Response"
    assert [item["text"] for item in frame["response"]["items"]] == ["Hi"]
    assert frame["response"].get("sessionEnded") in (None, False)
    assert state_of(conn) is State.IDLE


# ------------------------------------------------------- graceful shutdown


RESTARTED: Final = Close(CLOSE_RESTART, RESTART_REASON)


def test_a_restart_finishes_the_utterance_being_heard_and_answers_it_before_the_close() -> None:
    """At a graceful shutdown the utterance the user is saying is finished as the client's
    InputAudioStreamClose would finish it: its final result is recognised and its turn
    runs; audio the client still sends is dropped, no new utterance; the close comes after
    the answer, without an Error."""
    conn = ready()
    stream = opened(conn, sessionId="spoken").stream
    assert conn.receive_bytes(b"\x01\x00" * 160) == [FeedAudio(stream, b"\x01\x00" * 160)]
    assert conn.server_draining() == [FinishListening(stream)]
    assert state(conn) is State.FINISHING
    assert conn.hearing
    assert conn.receive_bytes(b"\x01\x00" * 160) == []  # after the finish: dropped
    assert conn.server_draining() == []  # once
    recognized, turn = conn.heard(stream, Heard("final", "tell me about this place", 0.8))
    assert frames([recognized]) == [
        {"type": "Recognized", "text": "tell me about this place", "isFinal": True}
    ]
    assert isinstance(turn, StartTurn)
    assert turn.ctx.session_id == "spoken"
    assert not conn.hearing
    assert conn.receive_bytes(b"\x01\x00" * 160) == []  # the turn runs: still dropped
    assert send(conn, {"type": "InputAudioStreamClose"}) == []  # the client's own: nothing
    finish_turn(conn, Response(items=(ResponseItem(text="You said it"),)), new="spoken")
    assert conn.server_restart(unanswered=False) == [RESTARTED]


def test_a_restart_finishes_a_silent_utterance_without_a_silence_turn() -> None:
    """The user said nothing and did not end the stream (the shutdown did): no made-up
    ``#silence`` turn moves the dialogue on, nor does an empty final; the close comes
    without an Error (nothing was lost). The client's own InputAudioStreamClose of such
    an utterance still gives the #silence turn (the protocol's rule)."""
    for result in (Heard("silence", at_ms=800), Heard("final", "", 0.0)):
        conn = ready()
        stream = opened(conn).stream
        assert conn.server_draining() == [FinishListening(stream)]
        assert conn.heard(stream, result) == []
        assert state(conn) is State.IDLE
        assert not conn.hearing
        assert conn.server_restart(unanswered=False) == [RESTARTED]
    conn = ready()
    stream = opened(conn).stream
    assert send(conn, {"type": "InputAudioStreamClose"}) == [FinishListening(stream)]
    recognized, turn = conn.heard(stream, Heard("silence", at_ms=800))
    assert frames([recognized]) == [{"type": "Recognized", "text": "#silence", "isFinal": True}]
    assert isinstance(turn, StartTurn)
    assert turn.input.action == "#silence"


def test_an_utterance_not_recognised_by_the_close_is_dropped_with_an_error() -> None:
    conn = ready()
    stream = opened(conn).stream
    assert conn.server_draining() == [FinishListening(stream)]
    cancel, error, close = conn.server_restart(unanswered=True)
    assert cancel == CancelListening(stream)
    text = one_error([error], source="gateway")
    assert text == UTTERANCE_LOST_TEXT
    assert "answer was not ready in time" in text  # as an unanswered turn's Error says
    assert text != ANSWER_LOST_TEXT  # but no turn goes on: nothing to resume
    assert close == RESTARTED
    # its result, late: stale, no turn
    assert conn.heard(stream, Heard("final", "too late", 0.9)) == []
    assert not conn.hearing
    assert conn.server_restart(unanswered=False) == [RESTARTED]


def test_an_utterance_in_which_nothing_was_said_not_recognised_by_the_close_gets_no_error() -> None:
    """The wait ended before the result of an utterance in which the endpointer heard no
    voice onset (``said`` False): a Duplex stream quiet while the bot spoke, a stream of
    silence, one opened just before the signal with no audio yet. Nothing the user said is
    lost, so no Error blames it ("say it again"): only the close, as when its silence came
    in time (no turn)."""
    for duplex in (False, True):
        conn = ready(sttMode="Duplex") if duplex else ready()
        stream = (duplex_opened if duplex else opened)(conn).stream
        assert conn.receive_bytes(b"\x00\x00" * 160) == [FeedAudio(stream, b"\x00\x00" * 160)]
        assert conn.server_draining() == [FinishListening(stream)]
        assert conn.hearing
        assert conn.server_restart(unanswered=True, said=False) == [
            CancelListening(stream),
            RESTARTED,
        ]
        assert not conn.hearing
        assert conn.heard(stream, Heard("silence", at_ms=320)) == []  # late: stale


def test_a_stream_opened_once_the_restart_began_is_refused_not_lost() -> None:
    """An InputAudioStreamOpen that comes after the shutdown began (the socket is about to
    close 1012) opens no stream: it is refused with an Error of source ``gateway`` saying
    the gateway restarts, as a turn too late to be answered is; not left open to be
    dropped at the close with the Error of an utterance lost ("say it again") though
    nothing was said. Its audio is ignored; the close comes alone."""
    idle = ready()
    assert idle.server_draining() == []
    # after a drained utterance's silence (no turn), and of a Duplex client alike
    silent = ready()
    stream = opened(silent).stream
    assert silent.server_draining() == [FinishListening(stream)]
    assert silent.heard(stream, Heard("silence", at_ms=400)) == []
    duplex = ready(sttMode="Duplex")
    stream = duplex_opened(duplex).stream
    assert duplex.server_draining() == [FinishListening(stream)]
    assert duplex.heard(stream, Heard("silence", at_ms=0)) == [CancelListening(stream)]
    for conn in (idle, silent, duplex):
        assert state(conn) is State.IDLE
        refused = send_open(conn, sessionId="elsewhere")  # no session check either
        assert one_error(refused, source="gateway") == STREAM_REFUSED_TEXT
        assert "restarting" in STREAM_REFUSED_TEXT
        assert state(conn) is State.IDLE
        assert not conn.hearing
        assert not conn.taking_audio
        assert conn.receive_bytes(b"\x01\x00" * 160) == []
        assert conn.server_restart(unanswered=False) == [RESTARTED]
    # while a turn still runs, an Open is out of order as ever (the client's error)
    conn = ready()
    start(conn, request_frame("hello"))
    assert conn.server_draining() == []
    one_error(send_open(conn), "turn", source="client")


def test_a_restart_changes_nothing_idle_or_while_a_turn_runs() -> None:
    conn = connection()
    assert conn.server_draining() == []  # before Init
    conn = ready()
    assert conn.server_draining() == []
    assert state(conn) is State.IDLE
    assert conn.server_restart(unanswered=False) == [RESTARTED]
    conn = ready()
    start(conn, request_frame("hello"))
    assert conn.server_draining() == []
    assert state(conn) is State.TURN
    error, close = conn.server_restart(unanswered=True)
    assert one_error([error], source="gateway") == ANSWER_LOST_TEXT
    assert close == RESTARTED
    # the client's stream after its utterance (draining): nothing is heard, nothing to do
    conn = ready()
    stream = opened(conn).stream
    conn.heard(stream, Heard("final", "hello", 0.9))
    assert conn.server_draining() == []
    assert state(conn) is State.TURN_DRAINING


def test_a_restart_finishes_a_duplex_utterance_and_ends_the_stream() -> None:
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    assert conn.server_draining() == [FinishListening(stream)]
    assert state(conn) is State.FINISHING
    assert conn.receive_bytes(b"\x01\x00" * 160) == []  # no next utterance
    ended, _, turn = conn.heard(stream, Heard("final", "hello", 0.9))
    assert ended == CancelListening(stream)  # the stream's stage is dropped
    assert isinstance(turn, StartTurn)
    assert not [a for a in answered(conn, Response()) if isinstance(a, StartListening)]
    assert state(conn) is State.IDLE  # no next utterance is listened for
    # nothing said (before a voice onset): no turn, as at InputAudioStreamClose
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    assert conn.server_draining() == [FinishListening(stream)]
    assert conn.heard(stream, Heard("silence", at_ms=0)) == [CancelListening(stream)]
    assert state(conn) is State.IDLE
    # while its turn runs: the stream ends, its next utterance is not listened for
    conn = ready(sttMode="Duplex")
    stream = duplex_opened(conn).stream
    said(conn, stream, "hello")
    assert state(conn) is State.DUPLEX_TURN
    assert conn.server_draining() == [CancelListening(stream)]
    assert state(conn) is State.TURN
    assert not [a for a in answered(conn, Response()) if isinstance(a, StartListening)]
    assert state(conn) is State.IDLE


def test_the_table_ends_an_open_stream_at_a_restart() -> None:
    restart = {state: TRANSITIONS[(state, e)] for (state, e) in TRANSITIONS if e == "Restart"}
    assert set(restart) == set(State) - {State.AWAIT_INIT, State.CLOSED}
    moved = {state: to for state, to in restart.items() if to is not state}
    assert moved == {
        State.LISTENING: State.FINISHING,
        State.DUPLEX: State.FINISHING,
        State.DUPLEX_TURN: State.TURN,
        State.DUPLEX_TURN_ENDING: State.TURN_ENDING,
    }


def test_a_request_once_the_restart_began_is_refused_not_run() -> None:
    """A ``Request`` or ``Input`` that comes once the shutdown began (the socket is about
    to close 1012), in every state: no turn is started (its answer could not reach the
    client); it is refused with an Error of source ``gateway`` saying the gateway restarts
    and the request was not run, so the client sends it again after reconnecting (as the
    Voiceflow adapter rejects an action then). Before, an idle socket's Request started a
    turn, and one the client sent just before the close got the close alone; one while a
    turn ran got the client's "a turn is still running". Nothing else changes: the close
    comes as it would."""
    idle = ready()
    assert idle.server_draining() == []
    listening = ready()
    stream = opened(listening, sessionId="spoken").stream
    assert listening.server_draining() == [FinishListening(stream)]  # FINISHING
    running = ready()
    start(running, request_frame("hello"))
    assert running.server_draining() == []
    for conn, before in ((idle, State.IDLE), (listening, State.FINISHING), (running, State.TURN)):
        for frame in (request_frame("what is my name"), input_frame("what is my name")):
            refused = send(conn, frame)
            assert one_error(refused, "restarting", "not run", source="gateway") == (
                REQUEST_REFUSED_TEXT
            )
            assert state(conn) is before
        # a malformed one is the client's error as ever (it would be after reconnecting)
        one_error(send(conn, {"type": "Request", "request": {}}), source="client")
        assert state(conn) is before
    # the utterance being finished is still answered (a typed Request no longer drops it)
    recognized, turn = listening.heard(stream, Heard("final", "tell me about it", 0.8))
    assert frames([recognized])[0]["text"] == "tell me about it"
    assert isinstance(turn, StartTurn)
    assert idle.server_restart(unanswered=False) == [RESTARTED]
    error, close = running.server_restart(unanswered=True)
    assert one_error([error], source="gateway") == ANSWER_LOST_TEXT
    assert close == RESTARTED


def test_a_request_after_the_close_decision_is_refused_also_before_init_was_drained() -> None:
    """A socket whose Init came only after the shutdown began (its drain found it not
    initialised: nothing to finish), and whose Request the I/O layer reads just before the
    close (what the client sent is read first): refused, not run."""
    conn = connection()
    assert conn.server_draining() == []
    assert frames(send(conn, init_frame())) == [{"type": "Ready"}]
    assert conn.server_restart(unanswered=False) == [RESTARTED]
    one_error(send(conn, request_frame("hello")), "restarting", source="gateway")


def test_an_invalid_request_during_the_restart_is_still_the_clients_error() -> None:
    """Once the shutdown began, a ``Request`` or ``Input`` the gateway would refuse on any
    instance (blank text, an invalid locale or session id, another application's
    ``appKey``, one before ``Init``) gets the client's Error as ever, not the restart's
    "send it again after reconnecting" (resent, it would only fail there). Before, every
    one of them past the parse got REQUEST_REFUSED_TEXT. No turn is started, no session id
    is generated for a refused one."""
    conn = ready()
    assert conn.server_draining() == []
    other_key = request_frame("hello")
    other_key["request"]["appKey"] = "another-application"
    bad_id = request_frame("hello", session_id="not a session id/..")
    for frame, words in (
        (request_frame("   "), ("empty",)),
        (input_frame(""), ("empty",)),
        (request_frame("hello", input={"transcript": {"text": "hi"}, "locale": "no tag!"}), ()),
        (other_key, ("appKey",)),
        (bad_id, ()),
        (input_frame("hello", session_id="not a session id/.."), ()),
    ):
        text = one_error(send(conn, frame), *words, source="client")
        assert text != REQUEST_REFUSED_TEXT
        assert state(conn) is State.IDLE
    # a valid one is refused, and the counter of generated ids was not touched meanwhile
    assert one_error(send(conn, request_frame("hello")), source="gateway") == REQUEST_REFUSED_TEXT
    assert conn._new_id() == "generated-1"
    # before Init (the close decision taken, the Init not read yet): the client's order error
    early = connection()
    assert early.server_draining() == []
    assert early.server_restart(unanswered=False) == [RESTARTED]
    one_error(send(early, request_frame("hello")), "Init", source="client")
    assert state(early) is State.AWAIT_INIT


@pytest.mark.parametrize("send_items", [False, True])
def test_an_item_with_only_ssml_goes_out_with_its_words_as_text(send_items: bool) -> None:
    # Flowstorm clients show an item's text: an item with only ssml went out without one
    # and was shown as nothing (the gateway's console, the 2022 web client). Now its text is
    # its SSML's words, as every channel shows them; its ssml goes as it is. An item with
    # ssml and a text, and a command item (a '#' text, no ssml), go out as they are. The
    # answer's SSML bound holds for all its items: one past it gets no words
    tail = "<speak>" + "x" * SSML_ANSWER_MAX_CHARS + "</speak>"
    items = [
        ResponseItem(text="#1 hit", ssml="<speak>#1 hit</speak>"),
        ResponseItem(
            ssml="<speak>Tom &amp; <break/>Jerry <audio src='https://a/b.mp3'>"
            "<desc>a dog</desc></audio>\x07!</speak>"
        ),
        ResponseItem(text="#open_menu", code='{"menu": "main"}'),
        ResponseItem(ssml=tail),
        ResponseItem(ssml="<speak>past the bound</speak>"),
    ]
    conn = ready(connection(), sendResponseItems=send_items)
    start(conn, request_frame("hi"))
    sent: list[dict[str, Any]] = []
    if send_items:
        for item in items:
            sent += frames(conn.turn_event(ResponseItemEvent(response_item=item)))
        out = [frame["responseItem"] for frame in sent if frame["type"] == "ResponseItem"]
    else:
        [response] = frames(answered(conn, Response(items=items)))[-1:]
        out = response["response"]["items"]
    assert [item.get("text") for item in out] == [
        "#1 hit",
        "Tom & Jerry !",
        "#open_menu",
        out[3]["text"],  # words read within the bound (leniently: it is cut there)
        None,
    ]
    assert set(out[3]["text"]) == {"x"}
    assert [item.get("ssml") for item in out] == [item.ssml for item in items]
