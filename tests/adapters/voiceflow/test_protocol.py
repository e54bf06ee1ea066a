"""The Voiceflow protocol without I/O: state table, payloads, actions, traces, sessionKeys."""

from __future__ import annotations

import json
from typing import Any

import engineio
import engineio.async_drivers.asgi as asgi_driver
import jwt
import pytest

from adapters.voiceflow.protocol import (
    ACTION_SEND,
    ANSWER_TOO_LONG_TEXT,
    CLIENT_START,
    DISCONNECT,
    MAX_ID,
    MAX_QUEUED_ACTIONS,
    SESSION_CREATE,
    SOUND_SCHEMES,
    TRANSITIONS,
    ActionBody,
    CheckSession,
    ClientConfig,
    ConnectionStateMachine,
    Emit,
    SessionCheck,
    SessionKeys,
    StartTurn,
    State,
    TraceWriter,
    VoiceflowConnection,
    action_input,
    engine_io_cors_headers,
    engine_io_headers,
    engine_io_origin_refused,
    error,
    kept_answer,
    kept_emits,
    lost_answer,
    parse_client_start,
    slate,
    status,
)
from gateway.conversation import TurnRejected
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    TtsConfig,
)
from gateway.protocol import ProtocolError
from gateway.speech.service import TtsRequest
from gateway.ssml import ssml_to_text
from gateway.turn import STORE_LOCK_LOST_TEXT, STORE_UNSAVED_TEXT
from tests.conftest import state_of

SECRET = "protocol-test-secret-0123456789abcdef"
NOW = 1_750_000_000.0
USER, PROJECT = "test@test.com", "6939bedf69c7ce5ee7a108ed"

SPEC_CLIENT_START = {  # spec "client.start", "Example Call" (its TypeScript as JSON)
    "userID": "test@test.com",
    "projectID": "6939bedf69c7ce5ee7a108ed",
    "authorization": "VF.DM...",
    "config": {"completionEvents": True},
}


def connection(**kwargs: Any) -> VoiceflowConnection:
    ids = iter(f"session-{n}" for n in range(1, 100))
    mids = iter(f"generated-{n}" for n in range(1, 100))
    return VoiceflowConnection(
        keys=kwargs.pop("keys", SessionKeys(SECRET, 3600)),
        project_allowed=kwargs.pop("project_allowed", bool),
        clock=kwargs.pop("clock", lambda: NOW),
        new_id=lambda: next(ids),
        new_message_id=lambda: next(mids),
        **kwargs,
    )


def emitted(actions: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    assert all(isinstance(a, Emit) for a in actions), actions
    return [(a.event, a.data) for a in actions]


def ready(conn: VoiceflowConnection, **start: Any) -> str:
    """client.start + session.create; the sessionKey."""
    conn.receive(CLIENT_START, [{"userID": USER, "projectID": PROJECT, **start}])
    [(event, data)] = emitted(conn.receive(SESSION_CREATE, [{}]))
    assert event == "session.created"
    key: str = data["sessionKey"]
    return key


def send(conn: VoiceflowConnection, action: dict[str, Any], mid: str = "m") -> StartTurn:
    accepted, start = conn.receive(ACTION_SEND, [{"action": action, "messageID": mid}])
    assert emitted([accepted]) == [("action.status", {"status": "accepted", "messageID": mid})]
    assert isinstance(start, StartTurn)
    return start


def item(**fields: Any) -> ResponseItemEvent:
    return ResponseItemEvent(response_item=ResponseItem(**fields))


# ------------------------------------------------------------ state table


def test_the_transition_table() -> None:
    # the spec's "Initialization sequence" and "Action Lifecycle" are paths in the table
    machine = ConnectionStateMachine()
    path = [CLIENT_START, SESSION_CREATE, ACTION_SEND, "ResponseItem", "Response", "TurnFinished"]
    states = [machine.feed(event) for event in path]
    assert states == [State.STARTED, State.READY, State.RUNNING] + [State.RUNNING] * 2 + [
        State.READY
    ]
    for state in State:  # a disconnect is legal everywhere; mid-action the answer is kept
        mid_action = state in (State.RUNNING, State.ENDING)
        after = State.DETACHED if mid_action else State.CLOSED
        assert TRANSITIONS[(state, DISCONNECT)] is after
    with pytest.raises(ProtocolError) as refused:
        ConnectionStateMachine().feed(ACTION_SEND)
    assert (refused.value.expected, refused.value.got) == ("client.start", ACTION_SEND)
    running = ConnectionStateMachine()
    for event in (CLIENT_START, SESSION_CREATE, ACTION_SEND):
        running.feed(event)
    for event in (ACTION_SEND, CLIENT_START, SESSION_CREATE):
        assert not running.allows(event)
        assert running.refusal(event)[0] == "action-running"


# --------------------------------------------------------------- payloads


def test_the_spec_client_start_example_parses() -> None:
    start = parse_client_start(SPEC_CLIENT_START)
    assert (start.user_id, start.project_id, start.authorization) == (USER, PROJECT, "VF.DM...")
    assert start.config.completion_events is True
    assert start.config.audio_events is False
    assert start.session_key is None
    assert parse_client_start({**SPEC_CLIENT_START, "config": None}).config == ClientConfig()


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (None, "object payload"),
        ("text", "object payload"),
        ({"projectID": PROJECT}, "userID"),
        ({"userID": "", "projectID": PROJECT}, "userID"),
        ({"userID": 12, "projectID": PROJECT}, "userID"),
        (
            {"userID": USER, "projectID": PROJECT, "config": {"userTimezone": "Nowhere/City"}},
            "time zone",
        ),
        (
            {"userID": USER, "projectID": PROJECT, "config": {"audioEncoding": "audio/ogg"}},
            "audioEncoding",
        ),
        ({"userID": USER, "projectID": PROJECT, "sessionKey": "x" * 5000}, "sessionKey"),
    ],
)
def test_invalid_client_start_payloads_name_the_field(payload: Any, words: str) -> None:
    with pytest.raises(ProtocolError) as invalid:
        parse_client_start(payload)
    assert words in invalid.value.text


@pytest.mark.parametrize("field", ["completionEvents", "audioEvents"])
@pytest.mark.parametrize("value", ["yes", "true", "on", 1, 0, 0.0, None, [], {}])
def test_config_booleans_are_json_booleans_only(field: str, value: Any) -> None:
    """``config.completionEvents`` and ``config.audioEvents`` are ``boolean`` in the spec:
    pydantic's lax bool took ``"yes"``, ``"on"``, ``"true"``, ``1`` and ``0.0`` as booleans.
    Now anything but ``true``/``false`` refuses the start in Voiceflow's error form, naming
    the field."""
    payload = {"userID": USER, "projectID": PROJECT, "config": {field: value}}
    with pytest.raises(ProtocolError) as invalid:
        parse_client_start(payload)
    assert invalid.value.text.startswith("Invalid client.start: ")
    assert f"config.{field}" in invalid.value.text
    assert "boolean" in invalid.value.text
    for flag in (True, False):
        start = parse_client_start({**payload, "config": {field: flag}})
        assert start.config.model_dump(by_alias=True)[field] is flag


def test_tts_requests_follow_the_audio_config() -> None:
    """The sounds the socket sends beside the speech (http(s)) are ``played``: the speech
    leaves their fallback out (test_socket.py::test_the_gateway_s_speech_does_not_say_the_fallback_of_a_sound_it_sends)."""
    played = SOUND_SCHEMES
    assert ClientConfig().tts() is None
    assert ClientConfig(audioEvents=True).tts() == TtsRequest("links", "mp3", played)
    assert ClientConfig(audioEvents=True, audioEncoding="audio/x-mulaw").tts() == TtsRequest(
        "links", "mulaw", played
    )
    assert ClientConfig(audioEvents=True, audioEncoding="audio/pcm").tts() == TtsRequest(
        "links", "wav", played
    )


# ----------------------------------------------------------- session keys


def test_session_keys() -> None:
    keys = SessionKeys(SECRET, ttl_s=60)
    token = keys.issue(session_id="s1", project_id=PROJECT, user_id=USER, now=NOW)
    check = keys.verify(token, project_id=PROJECT, user_id=USER, now=NOW + 59)
    assert (check.session_id, check.problem, check.active_since) == ("s1", None, None)
    # older than its lifetime: its session must have been active since (the store says)
    for later in (60, 86_400 * 3):
        check = keys.verify(token, project_id=PROJECT, user_id=USER, now=NOW + later)
        assert (check.session_id, check.problem) == ("s1", None)
        assert check.active_since == NOW + later - 60
    assert "exp" not in jwt.decode(token, options={"verify_signature": False})

    def problem(
        token: str | None, *, project: str = PROJECT, user: str = USER, at: float = NOW
    ) -> str | None:
        result = keys.verify(token, project_id=project, user_id=user, now=at)
        assert result.session_id is None
        return result.problem

    # a key of an earlier version, with its fixed exp: refused from then on (RFC 7519)
    claims = jwt.decode(token, options={"verify_signature": False})
    legacy = jwt.encode({**claims, "exp": int(NOW) + 60}, SECRET, algorithm="HS256")
    assert keys.verify(legacy, project_id=PROJECT, user_id=USER, now=NOW + 59).problem is None
    assert problem(legacy, at=NOW + 60) == "expired"
    no_iat = jwt.encode({k: v for k, v in claims.items() if k != "iat"}, SECRET, "HS256")
    assert problem(no_iat) == "malformed"
    assert problem(token, project="other") == "foreign"
    assert problem(token, user="mallory") == "foreign"
    other = SessionKeys("x" * 32, 60).issue(
        session_id="s1", project_id=PROJECT, user_id=USER, now=NOW
    )
    assert problem(other) == "forged"
    head, body, signature = token.split(".")
    tampered = f"{head}.{body[:-2]}AA.{signature}"
    assert problem(tampered) in ("forged", "malformed")
    assert problem("not-a-jwt") == "malformed"
    assert problem(None) == "missing"
    with pytest.raises(ValueError, match="32"):
        SessionKeys("short", 60)


def test_a_session_key_older_than_its_max_age_is_refused() -> None:
    """``max_age_s`` (GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S) bounds a key's age from its
    ``iat`` whatever its session's activity (``too-old``); 0 is no limit."""
    week = 7 * 86_400
    token = SessionKeys(SECRET, 60).issue(
        session_id="s1", project_id=PROJECT, user_id=USER, now=NOW
    )
    limited = SessionKeys(SECRET, ttl_s=60, max_age_s=week)
    young = limited.verify(token, project_id=PROJECT, user_id=USER, now=NOW + week - 1)
    assert (young.session_id, young.problem) == ("s1", None)
    assert young.active_since == NOW + week - 1 - 60  # its session must be active still
    for later in (week, week + 1, 10 * week):
        old = limited.verify(token, project_id=PROJECT, user_id=USER, now=NOW + later)
        assert (old.session_id, old.problem) == (None, "too-old")
    unlimited = SessionKeys(SECRET, ttl_s=60, max_age_s=0)
    assert (
        unlimited.verify(token, project_id=PROJECT, user_id=USER, now=NOW + 50 * week).session_id
        == "s1"
    )


def test_a_session_key_issued_in_the_future_is_refused() -> None:
    """A key whose ``iat`` lies ahead of the checking instance's clock (issued by an
    instance whose clock runs ahead) aged from that future time: ``max_age_s`` and
    ``ttl_s`` were out-waited by as much as that clock was ahead (a key of an instance a
    month ahead resumed its session for a month and a week). Now it is refused
    (``premature``) beyond :attr:`SessionKeys.MAX_SKEW_S` of skew; within it, it is valid."""
    week, month = 7 * 86_400, 30 * 86_400
    keys = SessionKeys(SECRET, ttl_s=60, max_age_s=week)
    ahead = keys.issue(session_id="s1", project_id=PROJECT, user_id=USER, now=NOW + month)
    for later in (0, 8 * 86_400, month - 600):  # all but the first over a week after
        check = keys.verify(ahead, project_id=PROJECT, user_id=USER, now=NOW + later)
        assert (check.session_id, check.problem) == (None, "premature"), later
    skewed = keys.issue(session_id="s1", project_id=PROJECT, user_id=USER, now=NOW + 300)
    check = keys.verify(skewed, project_id=PROJECT, user_id=USER, now=NOW)
    assert (check.session_id, check.problem, check.active_since) == ("s1", None, None)
    assert SessionKeys.MAX_SKEW_S == 300  # the skew tolerated, as the README says


def test_a_connection_ends_its_session_when_its_key_reaches_the_max_age() -> None:
    """The key's max age was checked at client.start only. Now a ready connection whose
    key (made by its session.create, or the one its client.start resumed the session with:
    its ``iat`` skewed ahead counts from then) has reached ``max_age_s`` answers its next
    client event with ``session.ended {reason: "session_key_expired"}`` first (an unknown
    event too: its error follows); client.start and session.create start anew without it;
    0 is no limit; a younger key goes on."""
    now = [NOW]
    limited = SessionKeys(SECRET, ttl_s=60, max_age_s=100)
    conn = connection(keys=limited, clock=lambda: now[0])
    ready(conn)  # its key issued at NOW
    now[0] = NOW + 99.5
    send(conn, {"type": "text", "payload": "young"}, "m1")
    assert conn.turn_finished()  # completed
    now[0] = NOW + 100
    answer = emitted(conn.receive("nonsense", [{}]))
    assert answer[0] == ("session.ended", {"reason": "session_key_expired"})
    assert [(event, data["code"]) for event, data in answer[1:]] == [("error", "unknown-event")]
    assert conn.state is State.STARTED
    assert conn.session_id is None
    assert conn.key_aged_out() == []  # told once
    assert emitted(conn.receive(SESSION_CREATE, [{}]))[0][0] == "session.created"  # anew
    now[0] = NOW + 150
    send(conn, {"type": "text", "payload": "new key"}, "m2")  # its new key is 50 s old
    # resumed with a key issued 10 s ahead of this clock (within the skew): aged from then
    ahead = limited.issue(session_id="s9", project_id=PROJECT, user_id=USER, now=NOW + 10)
    resumed = connection(keys=limited, clock=lambda: now[0])
    now[0] = NOW
    [check] = resumed.receive(
        CLIENT_START, [{"userID": USER, "projectID": PROJECT, "sessionKey": ahead}]
    )
    assert isinstance(check, CheckSession)
    assert emitted(resumed.session_checked("found"))[0][1] == {"newSessionRequired": False}
    now[0] = NOW + 109
    send(resumed, {"type": "text", "payload": "young"}, "m1")
    assert resumed.turn_finished()
    now[0] = NOW + 110
    ended, rejected = emitted(resumed.receive(ACTION_SEND, [{"action": {"type": "launch"}}]))
    assert ended == ("session.ended", {"reason": "session_key_expired"})
    assert (rejected[1]["status"], rejected[1]["reason"]) == ("rejected", "no-session")
    # a new client.start with the old key: refused as at any time (not ended twice)
    again = resumed.receive(
        CLIENT_START, [{"userID": USER, "projectID": PROJECT, "sessionKey": ahead}]
    )
    assert emitted(again) == [("client.started", {"newSessionRequired": True})]
    unlimited = connection(keys=SessionKeys(SECRET, ttl_s=60, max_age_s=0), clock=lambda: now[0])
    now[0] = NOW
    ready(unlimited)
    now[0] = NOW + 10 * 365 * 86_400
    send(unlimited, {"type": "text", "payload": "years later"})


# ------------------------------------------------------- actions -> Input


@pytest.mark.parametrize(
    ("action", "text"),
    [
        ({"type": "launch", "payload": {"persona": "p"}}, "#intro"),
        ({"type": "launch"}, "#intro"),
        ({"type": "text", "payload": "Hello, how are you?"}, "Hello, how are you?"),
        ({"type": "intent", "payload": {"intent": {"name": "order"}}}, "#order"),
        (
            {"type": "intent", "payload": {"intent": {"name": "order"}, "query": "a pizza"}},
            "a pizza",
        ),
        ({"type": "event", "payload": {"event": {"name": "event_name"}}}, "#event_name"),
        ({"type": "no-reply"}, "#silence"),
        ({"type": "path-x1y2", "payload": {"label": "Yes"}}, "Yes"),
        ({"type": "path-x1y2", "payload": {}}, "#path-x1y2"),
        ({"type": "path-x1y2"}, "#path-x1y2"),
        (
            {"type": "action", "payload": {"label": "Open", "actions": [{"type": "open_url"}]}},
            "Open",
        ),
        ({"type": "action"}, "#action"),
        # general requests (any other type): a custom action's path, a button of such a type
        ({"type": "done"}, "#done"),
        ({"type": "6580a1b2c3", "payload": {"label": "Pay now"}}, "Pay now"),
        ({"type": "path-", "payload": {}}, "#path-"),
    ],
)
def test_action_table(action: dict[str, Any], text: str) -> None:
    body = ActionBody.model_validate(action)
    input_ = action_input(body)
    assert input_.text == text
    seen = input_.attributes["voiceflowAction"]
    assert seen["type"] == action["type"]
    if action["type"] == "text":
        assert "payload" not in seen  # the payload is the transcript
    else:
        assert seen["payload"] == action.get("payload")
    if action["type"] != "intent":
        assert input_.attributes["intent"] is None
        assert input_.classes == ()


@pytest.mark.parametrize(("confidence", "score"), [(None, 1.0), (0, 0.0), (0.4, 0.4)])
def test_an_intents_confidence_is_its_score(confidence: float | None, score: float) -> None:
    """The Intent class's score is the action's confidence, also when it is 0 (no
    confidence at all); 1.0 only when none is given."""
    payload: dict[str, Any] = {"intent": {"name": "order"}}
    if confidence is not None:
        payload["confidence"] = confidence
    input_ = action_input(ActionBody(type="intent", payload=payload))
    assert [(c.type, c.score) for c in input_.classes] == [("Intent", score)]


def test_intent_classes_and_entities() -> None:
    body = ActionBody(
        type="intent",
        payload={
            "intent": {"name": "order"},
            "entities": [{"name": "size", "value": "large"}, {"name": "count", "value": 2}],
            "confidence": 0.7,
        },
    )
    input_ = action_input(body)
    assert [(c.type, c.name, c.score) for c in input_.classes] == [
        ("Intent", "order", 0.7),
        ("Entity", "size", 1.0),
        ("Entity", "count", 1.0),
    ]
    assert input_.attributes["intent"] == {
        "name": "order",
        "entities": {"size": "large", "count": 2},
    }


@pytest.mark.parametrize(
    ("action", "unknown"),
    [
        ({"type": "text", "payload": ""}, False),
        ({"type": "text", "payload": 5}, False),
        ({"type": "intent", "payload": "order"}, False),
        ({"type": "intent", "payload": {"intent": {"name": "two words"}}}, False),
        ({"type": "intent", "payload": {"intent": {"name": "x"}, "confidence": 3}}, False),
        ({"type": "event", "payload": {}}, False),
        ({"type": "path-x", "payload": {"label": 7}}, False),
        ({"type": "done", "payload": {"label": ["x"]}}, False),
        ({"type": "two words"}, True),
        ({"type": "x" * 129}, True),
    ],
)
def test_invalid_actions(action: dict[str, Any], unknown: bool) -> None:
    with pytest.raises(ProtocolError) as invalid:
        action_input(ActionBody.model_validate(action))
    assert (invalid.value.got is not None) is unknown


# ------------------------------------------------------ items -> traces


def writer(**config: Any) -> TraceWriter:
    return TraceWriter(ClientConfig.model_validate(config), lambda: 1000, lambda: "slate-1")


def text(message: str) -> dict[str, Any]:
    """A ``text`` trace's payload: the Slate document (id "slate-1") and the plain message."""
    return {
        "slate": {"id": "slate-1", "content": [{"children": [{"text": message}]}]},
        "message": message,
    }


def shapes(traces: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    assert all(t["time"] == 1000 for t in traces)
    return [(t["type"], t.get("payload")) for t in traces]


def test_sounds_heard_once_and_their_fallback_not_shown() -> None:
    """Each http(s) ``<audio>`` of an item's SSML is a sound the client plays once: its own
    ``speak {type: "audio"}`` trace, unless (audioEvents) the core's recording sent with
    the words plays it already; an ``<audio>`` nested in one of those is its fallback
    (played only when that sound cannot be), as its words are: neither sent nor shown.
    The gateway's own TTS link (``tts_links``) says words only: the sounds still go."""
    ssml = (
        '<speak>Hear <audio src="https://x/a.mp3">an a <audio src="https://x/b.mp3"/>'
        '</audio> and <audio src="soundbank://s/c">a c</audio> now</speak>'
    )
    words, a = "Hear and a c now", {"type": "audio", "message": "", "src": "https://x/a.mp3"}
    config = ClientConfig(audioEvents=True)
    own = TraceWriter(config, lambda: 1000, tts_links="https://gw/file/tts/")
    linked = ResponseItem(ssml=ssml, audio="https://gw/file/tts/1.mp3")
    assert shapes(own.item(linked)) == [
        ("speak", {"type": "message", "message": words, "src": "https://gw/file/tts/1.mp3"}),
        ("speak", a),
    ]
    recorded = ResponseItem(text="Hear an a and a c now", ssml=ssml, audio="https://core/r.mp3")
    assert ssml_to_text(ssml) == recorded.text  # its SSML's words: shown as such
    assert shapes(own.item(recorded)) == [
        ("speak", {"type": "message", "message": words, "src": "https://core/r.mp3"})
    ]
    assert shapes(writer().item(recorded)) == [("text", text(words)), ("speak", a)]
    authored = recorded.model_copy(update={"text": "Listen!"})  # a text of its own
    assert shapes(writer().item(authored)) == [("text", text("Listen!")), ("speak", a)]


def test_text_speak_and_visual_traces() -> None:
    plain = writer()
    assert shapes(plain.item(ResponseItem(text="Hi", image="https://x/i.png"))) == [
        ("text", text("Hi")),
        ("visual", {"visualType": "image", "image": "https://x/i.png"}),
    ]
    assert shapes(plain.item(ResponseItem(ssml="<speak>Hi <break/> there</speak>"))) == [
        ("text", text("Hi there"))
    ]
    assert shapes(plain.item(ResponseItem(audio="https://x/a.mp3"))) == [
        ("speak", {"type": "audio", "message": "", "src": "https://x/a.mp3"})
    ]
    assert plain.item(ResponseItem(video="https://x/v.mp4")) == []
    assert plain.close() == []

    voice = writer(audioEvents=True)
    spoken = ResponseItem(
        text="Hi", audio="https://gw/file/tts/1.mp3", tts_config=TtsConfig(name="joe")
    )
    assert shapes(voice.item(spoken)) == [
        (
            "speak",
            {
                "type": "message",
                "message": "Hi",
                "src": "https://gw/file/tts/1.mp3",
                "voice": "joe",
            },
        )
    ]
    assert shapes(voice.item(ResponseItem(text="No audio"))) == [
        ("speak", {"type": "message", "message": "No audio"})
    ]


def test_completion_chunks() -> None:
    chunks = writer(completionEvents=True)
    out = chunks.item(ResponseItem(text="One."))
    out += chunks.item(ResponseItem(text="Two."))
    out += chunks.item(ResponseItem(text="Three.", image="https://x/i.png"))
    out += chunks.item(ResponseItem(text="Four."))
    out += chunks.close()
    assert chunks.close() == []
    assert shapes(out) == [
        ("completion", {"state": "start"}),
        ("completion", {"state": "content", "content": "One."}),
        ("completion", {"state": "content", "content": " Two."}),
        ("completion", {"state": "content", "content": " Three."}),
        ("completion", {"state": "end"}),
        ("visual", {"visualType": "image", "image": "https://x/i.png"}),
        ("completion", {"state": "start"}),
        ("completion", {"state": "content", "content": "Four."}),
        ("completion", {"state": "end"}),
    ]


def test_code_carries_buttons_traces_and_custom_actions() -> None:
    plain = writer()
    code = {
        "buttons": [
            "Yes",
            {"name": "No", "request": {"type": "path-no", "payload": {"label": "No"}}},
            {"name": "Maybe"},
            {"name": ""},
            {"name": "Broken", "request": {"type": ""}},
            42,
        ],
        "traces": [
            {"type": "cardV2", "payload": {"title": "T"}},
            {"payload": "no type"},
            {"type": "end"},  # the gateway's own: from the Response only
            {"type": "text", "payload": "no slate"},
            {"type": "two words"},
            {"type": "x" * 129},
        ],
    }
    assert shapes(plain.item(ResponseItem(text="Pick", code=json.dumps(code)))) == [
        ("text", text("Pick")),
        (
            "choice",
            {
                "buttons": [
                    {"name": "Yes", "request": {"type": "text", "payload": "Yes"}},
                    {"name": "No", "request": {"type": "path-no", "payload": {"label": "No"}}},
                    {"name": "Maybe", "request": {"type": "text", "payload": "Maybe"}},
                ]
            },
        ),
        ("cardV2", {"title": "T"}),
    ]
    # a Flowstorm client command becomes a Voiceflow custom action trace
    assert shapes(plain.item(ResponseItem(text="#open_url", code='{"url": "https://x"}'))) == [
        ("open_url", {"url": "https://x"})
    ]
    assert shapes(plain.item(ResponseItem(text="#beep", code="loud"))) == [("beep", "loud")]
    # a command item's code is the JSON of its value (gateway.pipeline.cores.command_item)
    assert shapes(plain.item(ResponseItem(text="#open_menu", code='"main"'))) == [
        ("open_menu", "main")
    ]
    assert shapes(plain.item(ResponseItem(text="#count", code="3"))) == [("count", 3)]
    assert shapes(plain.item(ResponseItem(text="#ping", code="null"))) == [("ping", None)]
    assert plain.item(ResponseItem(text="#nothing")) == []
    assert plain.item(ResponseItem(text="Hi", code="not for voiceflow")) == [
        {"type": "text", "payload": text("Hi"), "time": 1000}
    ]


def test_text_traces_carry_a_slate_document_beside_the_message() -> None:
    """``TextTraceDTO`` (npm @voiceflow/dtos-interact) requires ``payload.slate``; Voiceflow's
    UIs render it. One paragraph per line; each trace's document gets its own id."""
    ids = iter(["a", "b"])
    lines = TraceWriter(ClientConfig(), lambda: 1000, lambda: next(ids))
    [first] = lines.item(ResponseItem(text="Line one.\nLine two."))
    assert first["payload"] == {
        "slate": {
            "id": "a",
            "content": [
                {"children": [{"text": "Line one."}]},
                {"children": [{"text": "Line two."}]},
            ],
        },
        "message": "Line one.\nLine two.",
    }
    [second] = lines.item(ResponseItem(text="Again"))
    assert second["payload"]["slate"]["id"] == "b"
    assert slate("x", "z") == {"id": "z", "content": [{"children": [{"text": "x"}]}]}
    # the default ids are unique
    plain = TraceWriter(ClientConfig(), lambda: 1000)
    made = {plain.item(ResponseItem(text="Hi"))[0]["payload"]["slate"]["id"] for _ in range(3)}
    assert len(made) == 3


# ------------------------------------------------------------ connection


def test_a_whole_conversation() -> None:
    conn = connection()
    assert emitted(conn.receive(CLIENT_START, [SPEC_CLIENT_START])) == [
        ("client.started", {"newSessionRequired": True})
    ]
    [(event, created)] = emitted(conn.receive(SESSION_CREATE, []))  # no payload at all
    assert event == "session.created"
    check = SessionKeys(SECRET, 3600).verify(
        created["sessionKey"], project_id=PROJECT, user_id=USER, now=NOW
    )
    assert check.session_id == "session-1"

    start = send(conn, {"type": "launch", "payload": {}}, "m1")
    assert start.input.text == "#intro"
    ctx = start.ctx
    assert (ctx.key, ctx.app_key, ctx.device_id, ctx.channel) == (
        "voiceflow:session-1",
        PROJECT,
        USER,
        "voiceflow",
    )
    assert ctx.create is True
    assert ctx.config == {
        "userID": USER,
        "projectID": PROJECT,
        "completionEvents": True,
        "audioEvents": False,
    }
    assert conn.state is State.RUNNING
    assert conn.running_message_id == "m1"

    assert conn.turn_event(SessionStartedEvent(session_id="session-1")) == []
    chunks = emitted(conn.turn_event(item(text="Hello.")))
    assert [d["trace"]["payload"]["state"] for _, d in chunks] == ["start", "content"]
    assert all(d["messageID"] == "m1" for _, d in chunks)
    assert conn.turn_event(BinaryEvent(data=b"x")) == []
    [(_, end)] = emitted(conn.turn_event(ResponseEvent(response=Response())))
    assert end["trace"]["payload"] == {"state": "end"}
    assert emitted(conn.turn_finished()) == [
        ("action.status", {"status": "completed", "messageID": "m1"})
    ]
    assert state_of(conn) is State.READY

    # the session exists now: a later text action does not create one
    assert send(conn, {"type": "text", "payload": "bye"}, "m2").ctx.create is False
    traces = emitted(conn.turn_event(ResponseEvent(response=Response(session_ended=True))))
    assert [d["trace"]["type"] for _, d in traces] == ["end"]
    assert conn.turn_event(SessionEndedEvent()) == []
    assert state_of(conn) is State.ENDING
    assert emitted(conn.turn_finished()) == [
        ("action.status", {"status": "completed", "messageID": "m2"}),
        ("session.ended", {"reason": "end_of_diagram"}),
    ]
    assert (conn.state, conn.session_id) == (State.STARTED, None)
    [rejected] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "launch"}}]))
    assert rejected[1]["reason"] == "no-session"
    assert rejected[1]["messageID"] == "generated-1"


def test_an_idle_session_that_expired_ends_with_inactivity_timeout() -> None:
    """The spec's "End" (the session ending "can also occur because of timeouts"): the
    connection says how long its idle session lives in the store, and when the store let
    it go, ``session.ended {reason: "inactivity_timeout"}``; then it needs a new one."""
    conn = connection(session_timeout_s=600)
    assert conn.idle_timeout_s() is None  # no session
    ready(conn)
    assert conn.idle_timeout_s() is None  # made, not yet in the store: nothing to expire
    assert conn.session_timed_out() == []
    send(conn, {"type": "launch"}, "m1")
    assert conn.idle_timeout_s() is None  # an action runs
    assert conn.session_timed_out() == []
    conn.turn_event(ResponseEvent(response=Response(session_timeout=90)))
    conn.turn_finished()
    assert conn.idle_timeout_s() == 90  # the core's sessionTimeout
    assert conn.idle_context() is not None
    assert conn.idle_context().key == "voiceflow:session-1"  # type: ignore[union-attr]
    send(conn, {"type": "text", "payload": "hi"}, "m2")
    conn.turn_event(ResponseEvent(response=Response()))
    conn.turn_finished()
    assert conn.idle_timeout_s() == 600  # else GATEWAY_SESSION_TIMEOUT_S
    assert emitted(conn.session_timed_out()) == [
        ("session.ended", {"reason": "inactivity_timeout"})
    ]
    assert state_of(conn) is State.STARTED
    assert (conn.session_id, conn.idle_timeout_s(), conn.idle_context()) == (None, None, None)
    [(_, rejected)] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "text"}}]))
    assert rejected["reason"] == "no-session"
    # a session resumed by its key: its age is not known here, the store is asked at once
    key = SessionKeys(SECRET, 3600).issue(
        session_id="old", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    conn.receive(CLIENT_START, [{"userID": USER, "projectID": PROJECT, "sessionKey": key}])
    assert conn.idle_timeout_s() is None  # the store is asked whether it has it ...
    conn.session_checked("found")
    assert conn.idle_timeout_s() == 0  # ... and when it does, when it lets it go


def test_resuming_with_a_key_and_the_create_rule() -> None:
    key = SessionKeys(SECRET, 3600).issue(
        session_id="old", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    conn = connection()
    [check] = conn.receive(
        CLIENT_START, [{"userID": USER, "projectID": PROJECT, "sessionKey": key}]
    )
    assert isinstance(check, CheckSession)  # the store is asked whether the session goes on
    assert (check.ctx.key, check.ctx.app_key, check.ctx.create) == ("voiceflow:old", PROJECT, False)
    assert emitted(conn.session_checked("found")) == [
        ("client.started", {"newSessionRequired": False})
    ]
    assert conn.session_id == "old"
    start = send(conn, {"type": "text", "payload": "hi"})
    assert start.ctx.create is False  # a resumed session must exist ...
    conn.turn_rejected(TurnRejected("session-busy", "busy"))
    assert send(conn, {"type": "launch"}).ctx.create is True  # ... but launch may start it


@pytest.mark.parametrize(("found", "required"), [("found", False), ("stale", True)])
def test_a_key_older_than_its_lifetime_resumes_a_session_active_within_it(
    found: SessionCheck, required: bool
) -> None:
    """A key older than GATEWAY_VOICEFLOW_SESSION_KEY_TTL_S answered ``newSessionRequired:
    true`` at once, however active its session: the store is now asked whether the
    session was active since (``active_since``): ``found`` resumes it, ``stale`` (idle
    for longer) requires a new session, as for a session the store let go."""
    key = SessionKeys(SECRET, 3600).issue(
        session_id="old", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    conn = connection(clock=lambda: NOW + 7200)  # two hours after: the key is 1 h past
    [check] = conn.receive(
        CLIENT_START, [{"userID": USER, "projectID": PROJECT, "sessionKey": key}]
    )
    assert isinstance(check, CheckSession)
    assert (check.ctx.key, check.active_since) == ("voiceflow:old", NOW + 7200 - 3600)
    assert emitted(conn.session_checked(found)) == [
        ("client.started", {"newSessionRequired": required})
    ]
    assert conn.session_id == (None if required else "old")
    fresh = connection()  # a key within its lifetime: any session the store has
    [check] = fresh.receive(
        CLIENT_START, [{"userID": USER, "projectID": PROJECT, "sessionKey": key}]
    )
    assert isinstance(check, CheckSession)
    assert check.active_since is None


START_WITH_KEY = {"userID": USER, "projectID": PROJECT}


@pytest.mark.parametrize("found", ["not-found", "foreign"])
def test_a_valid_key_of_a_session_the_store_does_not_have_requires_a_new_session(
    found: SessionCheck,
) -> None:
    """A valid sessionKey of a session the store does not have (it expired, or it never
    had a turn) answered ``newSessionRequired: false``, and the client was told
    ``session.ended`` soon after: now the connection asks the store first and a new
    session is required, which session.create makes."""
    key = SessionKeys(SECRET, 3600).issue(
        session_id="old", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    conn = connection()
    [check] = conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    assert isinstance(check, CheckSession)
    assert conn.state is State.STARTING
    # nothing else is taken until client.started is sent
    [(_, rejected)] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "launch"}}]))
    assert rejected["reason"] == "not-started"
    [(event, data)] = emitted(conn.receive(SESSION_CREATE, [{}]))
    assert (event, data["code"]) == ("error", "not-started")
    assert emitted(conn.session_checked(found)) == [
        ("client.started", {"newSessionRequired": True})
    ]
    assert (conn.state, conn.session_id, conn.idle_timeout_s()) == (State.STARTED, None, None)
    [(_, rejected)] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "launch"}}]))
    assert rejected["reason"] == "no-session"
    [(event, data)] = emitted(conn.receive(SESSION_CREATE, [{}]))
    assert event == "session.created"
    assert data["sessionKey"] != key
    assert conn.session_id == "session-1"
    assert send(conn, {"type": "text", "payload": "hi"}).ctx.create is True


def test_a_session_whose_first_action_runs_here_goes_on() -> None:
    """The store has no session before its first turn saves it: a second connection of
    this instance resuming it while that turn runs (``session_busy``) is told it goes on."""
    key = SessionKeys(SECRET, 3600).issue(
        session_id="first", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    busy = {"voiceflow:first"}
    conn = connection(session_busy=busy.__contains__)
    conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    assert emitted(conn.session_checked("not-found")) == [
        ("client.started", {"newSessionRequired": False})
    ]
    busy.clear()
    conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    assert emitted(conn.session_checked("not-found")) == [
        ("client.started", {"newSessionRequired": True})
    ]


def test_a_session_whose_first_action_runs_on_another_instance_goes_on() -> None:
    """The store's ``creating`` (not saved yet, a turn holds its lock: its first action
    runs, on any instance) resumes the session; it answered ``newSessionRequired: true``
    on every instance but the one running that action."""
    key = SessionKeys(SECRET, 3600).issue(
        session_id="first", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    conn = connection()
    conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    assert emitted(conn.session_checked("creating")) == [
        ("client.started", {"newSessionRequired": False})
    ]
    assert (conn.state, conn.session_id, conn.idle_timeout_s()) == (State.READY, "first", 0)
    assert send(conn, {"type": "text", "payload": "hi"}).ctx.create is False


@pytest.mark.parametrize("failure", ["store-unavailable", "gateway-error"])
def test_a_store_that_cannot_answer_for_a_key_is_an_error_and_client_start_again_works(
    failure: SessionCheck,
) -> None:
    key = SessionKeys(SECRET, 3600).issue(
        session_id="old", project_id=PROJECT, user_id=USER, now=NOW - 10
    )
    conn = connection()
    conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    [(event, data)] = emitted(conn.session_checked(failure))
    assert (event, data["code"]) == ("error", failure)
    assert "client.start again" in data["error"]
    assert (conn.state, conn.session_id) == (State.STARTED, None)
    [check] = conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    assert isinstance(check, CheckSession)
    assert emitted(conn.session_checked("found")) == [
        ("client.started", {"newSessionRequired": False})
    ]
    assert conn.session_id == "old"
    # an answer that comes after the connection closed is nothing to say
    conn.receive(CLIENT_START, [{**START_WITH_KEY, "sessionKey": key}])
    conn.connection_lost()
    assert conn.session_checked("found") == []
    assert conn.state is State.CLOSED


def test_engine_rejections() -> None:
    conn = connection()
    ready(conn)
    send(conn, {"type": "text", "payload": "hi"}, "m1")
    assert emitted(conn.turn_rejected(TurnRejected("session-busy", "Busy."))) == [
        (
            "action.status",
            {"status": "rejected", "messageID": "m1", "reason": "session-busy", "detail": "Busy."},
        )
    ]
    assert conn.state is State.READY
    send(conn, {"type": "text", "payload": "hi"}, "m2")
    gone = emitted(conn.turn_rejected(TurnRejected("session-not-found", "Gone.")))
    assert gone[0][1]["reason"] == "session-not-found"
    assert gone[1] == ("session.ended", {"reason": "session_expired"})
    assert (conn.state, conn.session_id) == (State.STARTED, None)


# ------------------------------------------------- actions sent while one runs


def queue(conn: VoiceflowConnection, text: str, mid: str) -> None:
    """An action.send while an action runs: accepted alone (its turn comes later)."""
    out = conn.receive(
        ACTION_SEND, [{"action": {"type": "text", "payload": text}, "messageID": mid}]
    )
    assert emitted(out) == [("action.status", {"status": "accepted", "messageID": mid})]


def test_actions_sent_while_one_runs_are_queued_and_run_in_order() -> None:
    """Spec "Action Lifecycle": sending while an action runs "is supported": each is
    accepted at once and started, in order, when the one before it has ended (its
    ``completed`` first), its traces under its own messageID."""
    conn = connection()
    ready(conn)
    first = send(conn, {"type": "launch"}, "m1")
    queue(conn, "two", "m2")
    queue(conn, "three", "m3")
    assert conn.queued_message_ids == ["m2", "m3"]
    assert conn.state is State.RUNNING
    assert conn.idle_timeout_s() is None  # not idle while actions wait
    assert conn.pushed([ResponseItem(text="push")]) == []  # pushes wait for the queue
    out = conn.turn_event(item(text="one"))
    assert {a.data["messageID"] for a in out if isinstance(a, Emit)} == {"m1"}
    conn.turn_event(ResponseEvent(response=Response(items=[])))
    *done, second = conn.turn_finished()
    assert emitted(done)[-1] == ("action.status", {"status": "completed", "messageID": "m1"})
    assert isinstance(second, StartTurn)
    assert (second.message_id, second.input.transcript.text) == ("m2", "two")
    assert second.ctx.key == first.ctx.key
    assert conn.state is State.RUNNING
    assert conn.running_message_id == "m2"
    out = conn.turn_event(item(text="answer two"))
    assert [a.data["messageID"] for a in out if isinstance(a, Emit)] == ["m2"]
    # a failed action does not stop the queue
    conn.turn_event(ErrorEvent(source="pipeline", text="The core failed."))
    *done, third = conn.turn_finished()
    assert emitted(done)[-1] == (
        "action.status",
        {"status": "completed", "messageID": "m2", "reason": "error"},
    )
    assert isinstance(third, StartTurn)
    assert third.message_id == "m3"
    # nor does a turn the engine refuses (another instance holds the session)
    queue(conn, "four", "m4")
    *done, fourth = conn.turn_rejected(TurnRejected("session-busy", "Busy."))
    assert emitted(done)[0][1]["reason"] == "session-busy"
    assert isinstance(fourth, StartTurn)
    assert fourth.message_id == "m4"
    conn.turn_event(ResponseEvent(response=Response(items=[])))
    out = conn.turn_finished()
    assert emitted(out)[-1][1] == {"status": "completed", "messageID": "m4"}
    assert (conn.state, conn.queued_message_ids) == (State.READY, [])
    assert conn.idle_timeout_s() is not None


def test_the_queue_is_bounded() -> None:
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m0")
    for n in range(MAX_QUEUED_ACTIONS):
        queue(conn, f"q{n}", f"m{n + 1}")
    over = conn.receive(
        ACTION_SEND, [{"action": {"type": "text", "payload": "x"}, "messageID": "x"}]
    )
    [(event, data)] = emitted(over)
    assert (event, data["status"], data["messageID"], data["reason"]) == (
        "action.status",
        "rejected",
        "x",
        "too-many-actions",
    )
    # a malformed one while an action runs is rejected at once, not queued
    [(_, data)] = emitted(conn.receive(ACTION_SEND, [{"action": "launch", "messageID": "bad"}]))
    assert (data["status"], data["reason"]) == ("rejected", "malformed-action")
    assert len(conn.queued_message_ids) == MAX_QUEUED_ACTIONS
    *_, nxt = conn.turn_finished()
    assert isinstance(nxt, StartTurn)
    assert nxt.message_id == "m1"
    queue(conn, "room again", "m9")  # one left the queue: room for one more


def test_the_queue_bounds_the_payload_it_holds() -> None:
    """The queued actions' payloads together are at most ``max_queued_chars`` characters
    of JSON (GATEWAY_MAX_BODY_BYTES): one over is rejected ``too-many-actions`` and not
    queued; a smaller one still fits, and room comes back as the queue runs."""
    conn = connection(max_queued_chars=100)
    ready(conn)
    send(conn, {"type": "launch"}, "m0")
    queue(conn, "x" * 90, "m1")  # 92 characters: '"' + 90 + '"'
    over = conn.receive(ACTION_SEND, [{"action": {"type": "text", "payload": "y" * 9}}])
    [(_, data)] = emitted(over)
    assert (data["status"], data["reason"]) == ("rejected", "too-many-actions")
    assert "100 characters" in data["detail"]
    queue(conn, "z" * 6, "m2")  # 8 more: 100 together
    assert conn.queued_message_ids == ["m1", "m2"]
    assert conn.state is State.RUNNING
    *_, nxt = conn.turn_finished()
    assert isinstance(nxt, StartTurn)
    assert nxt.message_id == "m1"
    queue(conn, "w" * 90, "m3")  # m1 left the queue: room for as much again


@pytest.mark.parametrize("how", ["end_of_diagram", "session_expired"])
def test_queued_actions_are_rejected_when_the_session_ends(how: str) -> None:
    """The running action ends the session (the core: ``end_of_diagram``; the store no
    longer has it: ``session_expired``): each queued action is rejected ``no-session``
    after ``session.ended``, no turn runs for it, and the connection needs a new session."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "text", "payload": "bye"}, "m1")
    queue(conn, "two", "m2")
    if how == "end_of_diagram":
        conn.turn_event(ResponseEvent(response=Response(items=[], session_ended=True)))
        conn.turn_event(SessionEndedEvent())
        assert conn.state is State.ENDING
        queue(conn, "three", "m3")  # the client does not know yet
        out = emitted(conn.turn_finished())
    else:
        queue(conn, "three", "m3")
        out = emitted(conn.turn_rejected(TurnRejected("session-not-found", "Gone.")))
    ended = out.index(("session.ended", {"reason": how}))
    rejected = out[ended + 1 :]
    assert [(d["status"], d["messageID"], d["reason"]) for _, d in rejected] == [
        ("rejected", "m2", "no-session"),
        ("rejected", "m3", "no-session"),
    ]
    assert (conn.state, conn.queued_message_ids) == (State.STARTED, [])


def test_queued_actions_are_dropped_when_the_connection_closes() -> None:
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    queue(conn, "two", "m2")
    conn.connection_lost()
    assert conn.queued_message_ids == []


def test_a_server_restart_hands_back_the_next_action_and_rejects_the_others() -> None:
    """Spec "server.restart": ``action`` is the "optional action to replay after
    reconnection". The queued actions were dropped without a word (the client had their
    ``accepted`` and never heard of them again); now the next one that would have run
    goes back in ``server.restart`` as the client sent it (diagramID and time too), each
    later one is rejected ``server-restart`` before that, and none runs here; the running
    action ends as usual."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    sent = {
        "type": "intent",
        "payload": {"intent": {"name": "order"}},
        "diagramID": "d1",
        "time": 17,
    }
    out = conn.receive(ACTION_SEND, [{"action": sent, "messageID": "m2"}])
    assert emitted(out) == [("action.status", {"status": "accepted", "messageID": "m2"})]
    queue(conn, "three", "m3")
    queue(conn, "four", "m4")
    told = emitted(conn.server_restart())
    text = "The server is restarting: this action was not run; send it again after reconnecting."
    assert told == [
        (
            "action.status",
            {"status": "rejected", "messageID": m, "reason": "server-restart", "detail": text},
        )
        for m in ("m3", "m4")
    ] + [("server.restart", {"action": sent})]
    assert conn.queued_message_ids == []
    # an action sent after server.restart, before the connection closes, is not queued
    out = conn.receive(
        ACTION_SEND, [{"action": {"type": "text", "payload": "late"}, "messageID": "m5"}]
    )
    [(_, late)] = emitted(out)
    assert (late["status"], late["messageID"], late["reason"]) == (
        "rejected",
        "m5",
        "server-restart",
    )
    finished = conn.turn_finished()  # no StartTurn: nothing left to run
    assert emitted(finished) == [("action.status", {"status": "completed", "messageID": "m1"})]


@pytest.mark.parametrize(
    ("sent", "replayed"),
    [
        ({"type": "launch"}, {"type": "launch"}),
        (
            {"type": "text", "payload": "hi", "time": 1.5},
            {"type": "text", "payload": "hi", "time": 1.5},
        ),
        # fields the server cannot use as the spec types them are left out, never refused
        (
            {"type": "text", "payload": "hi", "diagramID": 7, "time": True, "extra": 1},
            {"type": "text", "payload": "hi"},
        ),
    ],
    ids=["type-only", "time", "unusable-fields"],
)
def test_a_server_restart_replays_the_action_as_it_came(
    sent: dict[str, Any], replayed: dict[str, Any]
) -> None:
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    out = conn.receive(ACTION_SEND, [{"action": sent, "messageID": "m2"}])
    assert emitted(out) == [("action.status", {"status": "accepted", "messageID": "m2"})]
    assert emitted(conn.server_restart()) == [("server.restart", {"action": replayed})]


def test_a_held_connection_starts_no_queued_action_and_queues_new_ones() -> None:
    """The graceful shutdown lets the running action end before server.restart (hold):
    its ``completed`` is answered, the action queued behind it does not start, and an
    action.send once nothing runs waits too (it started a turn at once); server.restart
    then hands back the first and rejects the other."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    queue(conn, "two", "m2")
    conn.hold()
    finished = conn.turn_finished()  # no StartTurn for m2
    assert emitted(finished) == [("action.status", {"status": "completed", "messageID": "m1"})]
    assert (conn.state, conn.running_message_id) == (State.READY, None)
    queue(conn, "three", "m3")  # accepted, no StartTurn though nothing runs
    assert conn.queued_message_ids == ["m2", "m3"]
    told = emitted(conn.server_restart())
    assert [event for event, _ in told] == ["action.status", "server.restart"]
    assert (told[0][1]["messageID"], told[0][1]["reason"]) == ("m3", "server-restart")
    assert told[1][1] == {"action": {"type": "text", "payload": "two"}}


def test_a_server_restart_tells_a_connection_once() -> None:
    """A second server_restart (the shutdown's own after the signal's, or two at once)
    gave a second ``server.restart {}`` after the one with the action to replay: a client
    keeping the last notice's action lost it. It says nothing more now."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    queue(conn, "two", "m2")
    sent = {"type": "text", "payload": "two"}
    assert emitted(conn.server_restart()) == [("server.restart", {"action": sent})]
    assert emitted(conn.server_restart()) == []
    idle = connection()
    ready(idle)
    assert emitted(idle.server_restart()) == [("server.restart", {})]
    assert emitted(idle.server_restart()) == []


def test_a_server_restart_with_nothing_queued_is_an_empty_notice() -> None:
    idle = connection()
    ready(idle)
    assert emitted(idle.server_restart()) == [("server.restart", {})]
    running = connection()
    ready(running)
    send(running, {"type": "launch"}, "m1")
    assert emitted(running.server_restart()) == [("server.restart", {})]
    assert running.running_message_id == "m1"  # its turn goes on


def test_an_action_with_the_messageid_of_one_running_or_queued_is_rejected() -> None:
    """Two actions with one messageID: the second was queued, and the traces and statuses
    of both carried that one messageID, so the client could not tell them apart. It is
    rejected ``duplicate-message-id`` at once; the running and queued ones go on. A
    messageID may be used again once its action has ended; an action without one gets a
    generated messageID and is never a duplicate."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    queue(conn, "two", "m2")
    for mid in ("m1", "m2"):
        out = conn.receive(
            ACTION_SEND, [{"action": {"type": "text", "payload": "again"}, "messageID": mid}]
        )
        [(event, data)] = emitted(out)
        assert (event, data["status"], data["messageID"], data["reason"]) == (
            "action.status",
            "rejected",
            mid,
            "duplicate-message-id",
        )
        assert f"messageID {mid!r}" in data["detail"]
    out = conn.receive(
        ACTION_SEND, [{"action": {"type": "text", "payload": "three"}, "messageID": 7}]
    )
    assert emitted(out) == [("action.status", {"status": "accepted", "messageID": "7"})]
    for _ in range(2):  # without a messageID: the gateway makes one, a new one each time
        out = conn.receive(ACTION_SEND, [{"action": {"type": "text", "payload": "no id"}}])
        assert emitted(out)[0][1]["status"] == "accepted"
    assert conn.queued_message_ids == ["m2", "7", "generated-1", "generated-2"]
    assert conn.state is State.RUNNING
    *_, nxt = conn.turn_finished()  # m1 ends: m2 runs, m1 may be used again
    assert isinstance(nxt, StartTurn)
    assert nxt.message_id == "m2"
    queue(conn, "one again", "m1")
    assert conn.queued_message_ids == ["7", "generated-1", "generated-2", "m1"]
    out = conn.receive(
        ACTION_SEND, [{"action": {"type": "text", "payload": "x"}, "messageID": "7"}]
    )
    assert emitted(out)[0][1]["reason"] == "duplicate-message-id"  # a number's text too


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("", ""),
        ("m" * (MAX_ID + 1), "m" * MAX_ID),
        (1.5, "1.5"),
        (False, "false"),
        ([1, "a"], '[1,"a"]'),
        (b"id", ""),
    ],
    ids=["empty", "too-long", "float", "bool", "list", "bytes"],
)
def test_an_unusable_messageid_is_rejected_under_what_the_client_sent(
    sent: object, echoed: str
) -> None:
    """The rejection carried a made-up UUID (``generated-N``) the client could match to
    nothing it sent; now what it sent, cut to MAX_ID characters (another value's JSON
    text; bytes nothing). Bytes were taken as the text they hold, and the action run
    under a made-up messageID."""
    conn = connection()
    ready(conn)
    out = conn.receive(ACTION_SEND, [{"action": {"type": "launch"}, "messageID": sent}])
    [(event, data)] = emitted(out)
    assert (event, data["status"], data["reason"], data["messageID"]) == (
        "action.status",
        "rejected",
        "malformed-action",
        echoed,
    )
    assert conn.state is State.READY


def test_a_queued_action_waits_for_another_connection_of_the_session() -> None:
    """When the running action ends while another connection of this instance runs an
    action of the session (:attr:`session_busy`), the queued action is rejected
    ``action-running`` as one sent then would be; the next one is tried too."""
    busy: set[str] = set()
    conn = connection(session_busy=busy.__contains__)
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    queue(conn, "two", "m2")
    queue(conn, "three", "m3")
    busy.add("voiceflow:session-1")
    out = emitted(conn.turn_finished())
    assert [(d["messageID"], d["status"], d.get("reason")) for _, d in out] == [
        ("m1", "completed", None),
        ("m2", "rejected", "action-running"),
        ("m3", "rejected", "action-running"),
    ]
    assert conn.state is State.READY


@pytest.mark.parametrize(
    ("attributes", "ended", "timeout"),
    [
        ({"noReplyTimeoutMs": 7000}, False, 7),
        ({"noReplyTimeoutMs": 2500}, False, 2.5),
        ({"noReplyTimeoutMs": 7000}, True, None),  # the end trace instead
        ({}, False, None),
        ({"noReplyTimeoutMs": 0}, False, None),
        ({"noReplyTimeoutMs": "7000"}, False, None),
        ({"noReplyTimeoutMs": True}, False, None),
    ],
)
def test_a_no_reply_timeout_of_the_core_is_the_no_reply_trace(
    attributes: dict[str, Any], ended: bool, timeout: float | None
) -> None:
    conn = connection()
    ready(conn)
    send(conn, {"type": "launch"}, "m1")
    response = Response(attributes=attributes, session_ended=ended)
    out = [d["trace"] for _, d in emitted(conn.turn_event(ResponseEvent(response=response)))]
    expected = [{"type": "end", "time": int(NOW * 1000)}] if ended else []
    if timeout is not None:
        expected.append(
            {"type": "no-reply", "payload": {"timeout": timeout}, "time": int(NOW * 1000)}
        )
    assert out == expected
    if timeout is not None:
        assert type(out[0]["payload"]["timeout"]) is type(timeout)


def test_a_failed_turn() -> None:
    conn = connection()
    ready(conn, config={"completionEvents": True})
    send(conn, {"type": "text", "payload": "hi"}, "m1")
    conn.turn_event(item(text="partial"))
    out = emitted(conn.turn_event(ErrorEvent(text="The core failed.", source="pipeline")))
    assert out[0][1]["trace"]["payload"] == {"state": "end"}  # the open completion is closed
    assert out[1] == (
        "error",
        {"code": "pipeline-error", "error": "The core failed.", "messageID": "m1"},
    )
    assert emitted(conn.turn_finished()) == [
        ("action.status", {"status": "completed", "messageID": "m1", "reason": "error"})
    ]


@pytest.mark.parametrize(
    ("text", "source", "code"),
    [
        (STORE_UNSAVED_TEXT, "gateway", "store-unavailable"),
        (STORE_LOCK_LOST_TEXT, "gateway", "store-unavailable"),
        # the store's text under another source is no store failure: the source decides
        (STORE_UNSAVED_TEXT, "pipeline", "pipeline-error"),
        (STORE_UNSAVED_TEXT, "tts", "gateway-error"),
        # the gateway's other failures, and a text that merely mentions the store
        ("Internal gateway error.", "gateway", "gateway-error"),
        (STORE_UNSAVED_TEXT.upper(), "gateway", "gateway-error"),
        ("", "gateway", "gateway-error"),
    ],
)
def test_a_turn_the_store_failed_once_its_answer_began_is_store_unavailable(
    text: str, source: str, code: str
) -> None:
    """The engine's Error for the session store failing at the save (or losing the lock)
    once the action's traces went out is ``error {code: "store-unavailable"}`` (it was
    ``gateway-error``, a fault of the gateway's own); the core's stays ``pipeline-error``,
    every other Error ``gateway-error``."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "text", "payload": "hi"}, "m1")
    conn.turn_event(item(text="said"))
    out = emitted(conn.turn_event(ErrorEvent(text=text, source=source)))
    assert out[-1] == ("error", {"code": code, "error": text, "messageID": "m1"})
    assert emitted(conn.turn_finished()) == [
        ("action.status", {"status": "completed", "messageID": "m1", "reason": "error"})
    ]


def test_refusals_keep_the_connection_usable() -> None:
    busy: set[str] = set()
    conn = connection(
        api_keys=frozenset({"VF.DM.1"}),
        project_allowed=lambda p: p == PROJECT,
        session_busy=busy.__contains__,
    )
    [(event, data)] = emitted(conn.receive("session.create", [{}]))
    assert (event, data["code"]) == ("error", "not-started")
    [(event, data)] = emitted(conn.receive("bogus", []))
    assert (event, data["code"]) == ("error", "unknown-event")
    [(_, data)] = emitted(conn.receive(CLIENT_START, [{"userID": USER, "projectID": PROJECT}]))
    assert data["code"] == "unauthorized"
    start = {"userID": USER, "projectID": "other", "authorization": "VF.DM.1"}
    [(_, data)] = emitted(conn.receive(CLIENT_START, [start]))
    assert data["code"] == "forbidden-project"
    assert conn.state is State.CONNECTED
    ready(conn, authorization="VF.DM.1")
    # messageIDs: echoed (numbers as text) even from a malformed payload
    [(_, data)] = emitted(conn.receive(ACTION_SEND, [{"messageID": 7, "action": "launch"}]))
    assert (data["messageID"], data["reason"]) == ("7", "malformed-action")
    [(_, data)] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "fly away"}}]))
    assert (data["messageID"], data["reason"]) == ("generated-1", "unknown-action-type")
    busy.add("voiceflow:session-1")  # another connection runs an action of this session
    [(_, data)] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "launch"}}]))
    assert data["reason"] == "action-running"
    busy.clear()
    send(conn, {"type": "launch"})
    # another action while one runs is queued (spec "Action Lifecycle": supported) ...
    [(_, data)] = emitted(conn.receive(ACTION_SEND, [{"action": {"type": "launch"}}]))
    assert (data["status"], data["messageID"]) == ("accepted", "generated-3")
    # ... but client.start and session.create are not
    [(_, data)] = emitted(conn.receive(CLIENT_START, [{"userID": USER, "projectID": PROJECT}]))
    assert data["code"] == "action-running"
    [*_, queued] = conn.turn_finished()
    assert isinstance(queued, StartTurn)
    assert queued.message_id == "generated-3"
    conn.turn_finished()
    assert state_of(conn) is State.READY
    conn.connection_lost()
    assert state_of(conn) is State.CLOSED


# ------------------------------------------------------------ Engine.IO CORS

CORS_CONFIGS: list[Any] = [
    "*",
    ["https://a.example", "*"],
    "https://a.example",
    ["https://a.example", "https://b.example"],
    None,
    [],
]
"""python-engineio ``cors_allowed_origins`` values (the gateway's: ``*``, a list, None)."""

CORS_REQUESTS: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("GET", [(b"host", b"h.example")]),
    ("POST", [(b"host", b"h.example"), (b"origin", b"https://a.example")]),
    ("POST", [(b"host", b"h.example"), (b"origin", b"https://evil.example")]),
    ("POST", [(b"host", b"h.example"), (b"origin", b"")]),
    ("POST", [(b"origin", b"http://h.example")]),  # no Host
    (
        "OPTIONS",
        [
            (b"host", b"h.example"),
            (b"origin", b"https://b.example"),
            (b"access-control-request-headers", b"content-type"),
        ],
    ),
    ("GET", [(b"host", b"h.example:8080"), (b"origin", b"http://h.example:8080")]),
    ("GET", [(b"host", b"h.example"), (b"origin", b"https://h.example")]),
    (
        "POST",
        [
            (b"host", b"h.example"),
            (b"origin", b"https://gw.example"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"gw.example, proxy.internal"),
        ],
    ),
    (
        "GET",
        [
            (b"host", b"h.example"),
            (b"origin", b"https://h.example"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-proto", b"http"),  # repeated: joined with ","
        ],
    ),
    (
        "GET",
        [
            (b"host", b"h.example"),
            (b"origin", b"https://gw.example"),
            (b"x_forwarded_host", b"gw.example"),
            (b"x-forwarded-proto", b"https"),
        ],
    ),
    ("POST", [(b"host", b"h.example"), (b"origin", b"https://a.example"), (b"origin", b"x")]),
    ("POST", [(b"host", b"h.example"), (b"origin", b"https://a.\xffexample")]),  # not UTF-8
]
"""Requests (method, ASGI headers) for the CORS comparison."""


@pytest.mark.parametrize("configured", CORS_CONFIGS)
@pytest.mark.parametrize("credentials", [True, False])
async def test_engine_io_cors_is_python_engineios(configured: Any, credentials: bool) -> None:
    """engine_io_cors_headers and engine_io_origin_refused agree with python-engineio's own
    CORS code (its ASGI environ of the same request, its private helpers) on every request."""
    eio = engineio.AsyncServer(
        async_mode="asgi", cors_allowed_origins=configured, cors_credentials=credentials
    )
    for method, raw in CORS_REQUESTS:
        scope = {"type": "http", "method": method, "path": "/", "query_string": b"", "headers": raw}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        environ = await asgi_driver.translate_request(scope, receive, None)
        origin = environ.get("HTTP_ORIGIN")
        allowed = eio._cors_allowed_origins(environ)
        refused = bool(
            configured != [] and origin and allowed is not None and origin not in allowed
        )
        headers = engine_io_headers(raw)
        assert engine_io_origin_refused(configured, headers) is refused, (method, raw)
        assert engine_io_cors_headers(configured, credentials, method, headers) == (
            eio._cors_headers(environ)
        ), (method, raw)


def test_an_action_whose_answer_is_lost_at_a_restart_is_answered_before_server_restart() -> None:
    """At a graceful shutdown, an action still running when the wait for it ran out got no
    status at all (its client waited for ``completed`` in vain). answer_lost ends it as a
    failed turn is ended: the open completion's end, ``error answer-lost`` and
    ``completed`` (``reason: "error"``); then server.restart as before. Nothing runs:
    ``[]``."""
    conn = connection()
    ready(conn, config={"completionEvents": True})
    send(conn, {"type": "launch"}, "m1")
    started = emitted(conn.turn_event(item(text="Half")))
    assert [data["trace"]["payload"]["state"] for _, data in started] == ["start", "content"]
    queue(conn, "two", "m2")
    conn.hold()
    told = emitted(conn.answer_lost())
    assert [event for event, _ in told] == ["action.trace", "error", "action.status"]
    assert told[0][1]["trace"]["payload"] == {"state": "end"}
    assert told[1][1]["code"] == "answer-lost"
    assert told[1][1]["messageID"] == "m1"
    assert told[2][1] == {"status": "completed", "messageID": "m1", "reason": "error"}
    assert conn.running_message_id is None
    assert emitted(conn.answer_lost()) == []
    assert emitted(conn.server_restart()) == [
        ("server.restart", {"action": {"type": "text", "payload": "two"}})
    ]
    idle = connection()
    ready(idle)
    assert emitted(idle.answer_lost()) == []


# ------------------------------------------------ answers kept for the next connection


def test_a_connection_gone_mid_action_formats_the_rest_of_its_answer_to_keep() -> None:
    """A client whose socket drops while its action runs lost the answer for good: the
    connection closed and the turn's events were not formatted any more. It is now
    ``detached``: the rest of the turn becomes the answer to keep (its traces and
    ``completed``, with the action's messageID; no ``session.ended``, which the next
    connection's client.start says its own way), read back as the same emits."""
    conn = connection()
    ready(conn)
    send(conn, {"type": "text", "payload": "hi"}, "first")
    queue(conn, "later", "queued")
    assert conn.answer_begun is False
    conn.turn_event(item(text="Hello"))  # went out before the drop: not kept
    assert conn.answer_begun is True
    assert conn.connection_lost() is True
    assert conn.state is State.DETACHED
    [refused] = conn.receive(ACTION_SEND, [{"action": {"type": "text", "payload": "x"}}])
    assert isinstance(refused, Emit)
    assert refused.data["reason"] == "unknown-event"  # nothing more is accepted
    kept = conn.turn_event(item(text="Bye."))
    kept += conn.turn_event(ResponseEvent(response=Response(session_ended=True)))
    kept += conn.turn_event(SessionEndedEvent())
    kept += conn.turn_finished()  # the queued action was dropped: no turn for it
    assert state_of(conn) is State.CLOSED
    answer = kept_answer(kept)
    emits = kept_emits([answer])
    assert [(e.event, e.data.get("messageID")) for e in emits] == [
        ("action.trace", "first"),
        ("action.trace", "first"),
        ("action.status", "first"),
    ]
    assert [e.data["trace"]["type"] for e in emits[:2]] == ["text", "end"]
    assert emits[2].data == {"status": "completed", "messageID": "first"}
    assert emits == [e for e in kept if isinstance(e, Emit)]  # as they would have gone out


def test_a_detached_connection_keeps_a_failure_or_a_rejection() -> None:
    conn = connection()
    ready(conn)
    send(conn, {"type": "text", "payload": "hi"}, "m1")
    conn.connection_lost()
    failed = conn.turn_event(ErrorEvent(text="Core down.", source="pipeline"))
    failed += conn.turn_finished()
    assert emitted(kept_emits([kept_answer(failed)])) == [
        ("error", {"code": "pipeline-error", "error": "Core down.", "messageID": "m1"}),
        ("action.status", {"status": "completed", "messageID": "m1", "reason": "error"}),
    ]
    conn = connection()
    ready(conn)
    send(conn, {"type": "text", "payload": "hi"}, "m2")
    conn.connection_lost()
    refused = conn.turn_rejected(TurnRejected("session-not-found", "Gone."))
    assert emitted(kept_emits([kept_answer(refused)])) == [
        (
            "action.status",
            {
                "status": "rejected",
                "messageID": "m2",
                "reason": "session-not-found",
                "detail": "Gone.",
            },
        )
    ]
    assert conn.state is State.CLOSED


def test_a_connection_gone_with_no_action_running_keeps_nothing() -> None:
    conn = connection()
    ready(conn)
    assert conn.connection_lost() is False
    assert conn.state is State.CLOSED


def test_kept_answers_read_back_in_order_and_skip_what_does_not_read() -> None:
    lost = lost_answer("big")
    assert emitted(kept_emits([lost])) == [
        ("error", {"code": "answer-lost", "error": ANSWER_TOO_LONG_TEXT, "messageID": "big"}),
        ("action.status", {"status": "completed", "messageID": "big", "reason": "error"}),
    ]
    other = kept_answer([Emit("action.status", {"status": "completed", "messageID": "m"})])
    junk = ["not json", "{}", '[["session.ended", {"reason": "x"}], ["x"], 5]', "[[1, 2]]"]
    assert emitted(kept_emits([lost, *junk, other]))[2:] == [
        ("action.status", {"status": "completed", "messageID": "m"})
    ]
    # only the events of an answer are kept
    assert kept_answer([Emit("session.ended", {"reason": "end_of_diagram"})]) == "[]"


def test_an_error_about_the_connections_own_packet_is_not_kept() -> None:
    """An ``error`` without ``messageID`` answers a packet of the connection that sent it
    (``invalid-payload``, ``unknown-event``, a refused handshake), not an action: it was
    kept with the answers held back behind a take of kept answers when that client left,
    and shown to the session's next connection. It is left out, and so is one an older
    version kept; an action's error (its messageID) is kept."""
    own = [
        error("invalid-payload", "Invalid packet: broken"),
        error("unknown-event", "Unknown event x."),
        Emit("error", {"code": "invalid-payload", "error": "x", "messageID": None}),
    ]
    action = [
        status("accepted", "m1"),
        error("pipeline-error", "The pipeline failed.", "m1"),
        status("completed", "m1", "error"),
    ]
    assert emitted(kept_emits([kept_answer([own[0], action[0], own[1], *action[1:], own[2]])])) == [
        ("action.status", {"status": "accepted", "messageID": "m1"}),
        ("error", {"code": "pipeline-error", "error": "The pipeline failed.", "messageID": "m1"}),
        ("action.status", {"status": "completed", "messageID": "m1", "reason": "error"}),
    ]
    assert kept_answer(own) == "[]"
    older = '[["error", {"code": "invalid-payload", "error": "x"}], ["error", {"code": 5}]]'
    assert kept_emits([older]) == []
