"""The Twilio protocol, sans I/O: golden messages of the Twilio docs, the state table, DTMF,
marks, and whole call flows driven with real speech (no sockets)."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.twilio.protocol import (
    CallConfig,
    Connected,
    Dtmf,
    EndSession,
    Mark,
    Media,
    Start,
    StartTurn,
    State,
    Stop,
    TwilioCall,
    busy_twiml,
    clear_message,
    mark_message,
    media_message,
    parse_message,
    twiml,
)
from gateway.callcodec import InvalidStart
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
)
from gateway.protocol import ProtocolError
from gateway.protocol.actions import CancelListening, Close, FeedAudio, StartListening
from gateway.protocol.call import (
    TRANSITIONS,
    CallStateMachine,
    DtmfCollector,
    HangUp,
    InputsUnanswered,
    Interrupt,
    MarkBook,
    Play,
    Speak,
)
from gateway.speech.audio import AudioFormat, Pcm
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.turn import TurnRejected
from tests.adapters.twilio.helpers import phone
from tests.conftest import state_of

CALL = "CA" + "a" * 32
STREAM = "MZ" + "b" * 32

# The examples of Twilio's "Media Streams - WebSocket Messages" (numbers are strings).
CONNECTED = '{"event": "connected", "protocol": "Call", "version": "1.0.0"}'
START = json.dumps(
    {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "0" * 32,
            "streamSid": STREAM,
            "callSid": CALL,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"from": "+15550100", "appKey": "app", "locale": "en-US"},
        },
        "streamSid": STREAM,
    }
)
MEDIA = json.dumps(
    {
        "event": "media",
        "sequenceNumber": "3",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "5",
            "payload": "no+JhoaJjpzSHxAKBgYJ",
        },
        "streamSid": STREAM,
    }
)
DTMF = json.dumps(
    {
        "event": "dtmf",
        "streamSid": STREAM,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
)
MARK = json.dumps(
    {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM, "mark": {"name": "my label"}}
)
STOP = json.dumps(
    {
        "event": "stop",
        "sequenceNumber": "5",
        "stop": {"accountSid": "AC" + "0" * 32, "callSid": CALL},
        "streamSid": STREAM,
    }
)


def test_golden_inbound_messages_parse_into_typed_events() -> None:
    assert isinstance(parse_message(CONNECTED), Connected)
    start = parse_message(START)
    assert isinstance(start, Start)
    assert start.sequence_number == 1
    assert start.start.call_sid == CALL
    assert start.start.stream_sid == STREAM
    assert start.start.media_format.sample_rate == 8000
    assert start.start.custom_parameters["appKey"] == "app"
    media = parse_message(MEDIA)
    assert isinstance(media, Media)
    assert (media.chunk, media.timestamp, media.sequence_number) == (1, 5, 3)
    assert media.payload == base64.b64decode("no+JhoaJjpzSHxAKBgYJ")
    dtmf = parse_message(DTMF)
    assert isinstance(dtmf, Dtmf)
    assert dtmf.dtmf.digit == "1"
    mark = parse_message(MARK)
    assert isinstance(mark, Mark)
    assert mark.mark.name == "my label"
    stop = parse_message(STOP)
    assert isinstance(stop, Stop)
    assert stop.stop.call_sid == CALL


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "Malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"event": "hello"}', "expected connected, start, media, dtmf, mark or stop, got 'hello'"),
        ('{"no": "event"}', "got None"),
        ('{"event": "media", "media": {"payload": "%%%"}}', "not base64"),
        ('{"event": "media", "media": {"payload": 5}}', "media.payload"),
        ('{"event": "media"}', "media: expected an object"),
        ('{"event": "dtmf", "dtmf": {"digit": "X"}}', "dtmf.digit"),
        (
            '{"event": "start", "start": {"streamSid": "MZ1"}}',
            "Invalid start message: start.callSid",
        ),
        ('{"event": "mark", "mark": {}}', "mark.name"),
    ],
)
def test_bad_frames_are_protocol_errors(text: str, says: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_message(text)
    assert says in err.value.text


def test_outbound_messages() -> None:
    assert json.loads(media_message(STREAM, b"\xff\x00")) == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": base64.b64encode(b"\xff\x00").decode()},
    }
    assert json.loads(mark_message(STREAM, "7")) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": "7"},
    }
    assert json.loads(clear_message(STREAM)) == {"event": "clear", "streamSid": STREAM}


def test_twiml_connects_a_stream_with_parameters_and_hangs_up_after() -> None:
    xml = twiml(
        "wss://gw.example.com/twilio/stream/TOKEN",
        "https://gw.example.com/twilio/status",
        {"from": "+15550100", "appKey": "app"},
    )
    root = ET.fromstring(xml)
    assert [child.tag for child in root] == ["Connect", "Hangup"]
    stream = root.find("./Connect/Stream")
    assert stream is not None
    assert stream.attrib == {
        "url": "wss://gw.example.com/twilio/stream/TOKEN",
        "statusCallback": "https://gw.example.com/twilio/status",
        "statusCallbackMethod": "POST",
    }
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    assert params == {"from": "+15550100", "appKey": "app"}


def test_busy_twiml_says_the_text_and_hangs_up() -> None:
    xml = busy_twiml("Lines <busy> & full\x07.")
    assert xml.startswith("<?xml")
    root = ET.fromstring(xml)  # the text is escaped, the control character dropped
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root[0].text == "Lines <busy> & full."


def test_the_state_table() -> None:
    for state in State:
        assert TRANSITIONS[(state, "stop")] is State.CLOSED
        assert TRANSITIONS[(state, "disconnect")] is State.CLOSED
    machine = CallStateMachine()
    with pytest.raises(ProtocolError) as err:
        machine.feed("media")
    assert err.value.expected == "connected or start"
    assert err.value.got == "media"
    assert machine.state is State.AWAIT_CONNECTED
    assert machine.feed("connected") is State.AWAIT_START
    with pytest.raises(ProtocolError, match="expected start, got dtmf"):
        machine.feed("dtmf")
    assert machine.feed("start") is State.BOT
    with pytest.raises(ProtocolError):
        machine.feed("start")  # one start per stream
    assert machine.feed("session-end") is State.ENDING
    assert machine.feed("media") is State.ENDING
    assert machine.feed("final-mark") is State.CLOSED
    assert machine.feed("media") is State.CLOSED  # late frames are ignored


def test_dtmf_digits_and_collection() -> None:
    digit = DtmfCollector("digit", 2000)
    assert [digit.press(d, 0) for d in "1#*"] == ["1", "#", "*"]
    collect = DtmfCollector("collect", 2000)
    assert collect.press("#", 0) is None  # nothing collected: no input
    assert collect.press("4", 0) is None
    assert collect.press("2", 500) is None
    assert collect.poll(2400) is None
    assert collect.press("#", 2400) == "42"
    assert collect.press("7", 3000) is None
    assert collect.poll(4999) is None
    assert collect.poll(5000) == "7"  # 2 s of audio after the last key
    assert not collect.collecting
    capped = DtmfCollector("collect", 2000, max_digits=3)
    assert [capped.press(d, 0) for d in "1234"] == [None, None, "123", None]
    assert capped.press("#", 0) == "4"


def test_dtmf_collected_keys_are_flushed_at_the_end() -> None:
    collect = DtmfCollector("collect", 2000)
    assert collect.flush() is None  # nothing collected
    collect.press("4", 0)
    collect.press("2", 100)
    assert collect.flush() == "42"  # no '#', no pause: the keys all the same
    assert not collect.collecting
    assert collect.flush() is None


def test_marks_settle_in_order_and_are_forgotten_at_a_clear() -> None:
    book = MarkBook()
    one, two, end = book.new(), book.new(), book.new(final=True)
    assert (one, two, end) == ("1", "2", "end-3")
    assert book.echo(two) is False  # settles "1" too
    assert book.outstanding == 1
    assert book.echo(one) is None  # already settled
    assert book.echo(end) is True
    book.new()
    book.forget()
    assert book.outstanding == 0
    assert book.echo("4") is None


# ------------------------------------------------------------------ call flows


SILENCE = b"\xff" * 160


def media(payload: bytes) -> str:
    return json.dumps(
        {
            "event": "media",
            "streamSid": STREAM,
            "media": {"track": "inbound", "payload": base64.b64encode(payload).decode()},
        }
    )


def mark(name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": STREAM, "mark": {"name": name}})


def dtmf(digit: str) -> str:
    return json.dumps({"event": "dtmf", "streamSid": STREAM, "dtmf": {"digit": digit}})


def started(**config: Any) -> TwilioCall:
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: key != "banned", **config))
    assert call.receive(CONNECTED) == []
    [turn] = call.receive(START)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "#intro"
    return call


STAGES: dict[TwilioCall, SpeechStage] = {}
PREROLLS: dict[TwilioCall, bytes] = {}
"""The audio each call's latest StartListening handed the recognizer first (kept before the
onset)."""
RECOGNIZERS: list[PocketsphinxRecognizer] = []


@pytest.fixture(autouse=True)
def _stages(recognizer: PocketsphinxRecognizer) -> Iterator[None]:
    """Each call gets a speech stage as routes.py makes it (only its VAD runs here)."""
    RECOGNIZERS[:] = [recognizer]
    yield
    STAGES.clear()
    PREROLLS.clear()


def stage_of(call: TwilioCall) -> SpeechStage:
    """The call's speech stage: the one endpointer of the call, as routes.py makes it."""
    if call not in STAGES:
        options = ListenOptions(interim=False, silence_timeout_ms=None)
        STAGES[call] = SpeechStage(
            RECOGNIZERS[0], AudioFormat("MULAW", 8000), options, frame_ms=20, keep_ms=call.keep_ms
        )
    return STAGES[call]


def speak(call: TwilioCall, audio: bytes) -> list[Any]:
    """Feed 20 ms frames of ``audio`` as routes.py does (each FeedAudio to the call's speech
    stage, its verdict to TwilioCall.voice); every other action, with the frame index."""
    out = []
    stage = stage_of(call)
    for i in range(0, len(audio), 160):
        for action in call.receive(media(audio[i : i + 160])):
            assert isinstance(action, FeedAudio)
            assert action.stream == call.stream  # the latest utterance's number
            started = bool(stage.hear(action.data))
            actions = call.voice(stage.onset_ms, started=started)
            for listen in actions:
                if isinstance(listen, StartListening):
                    assert listen.from_ms is not None
                    stage.listen(listen.from_ms)
                    PREROLLS[call] = stage.recent(listen.from_ms)
            out += [(i // 160, a) for a in actions]
    return out


def answer(call: TwilioCall, audio: bytes = b"\x00" * 1600, *, ended: bool = False) -> list[Any]:
    """The running turn answers one item with ``audio`` and ends."""
    actions = call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="hi")))
    actions += call.turn_event(BinaryEvent(data=audio))
    actions += call.turn_event(ResponseEvent(response=Response(session_ended=ended)))
    return actions + call.turn_finished()


def test_start_makes_the_session_of_the_call() -> None:
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True))
    [turn] = call.receive(START)  # `connected` is optional
    assert isinstance(turn, StartTurn)
    ctx = turn.ctx
    assert (ctx.channel, ctx.key, ctx.app_key) == ("twilio", f"twilio:{CALL}", "app")
    assert (ctx.device_id, ctx.locale) == ("+15550100", "en-US")
    assert ctx.tts is not None
    assert (ctx.tts.mode, ctx.tts.file_type) == ("audio", "mulaw")
    assert call.state is State.BOT


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"callSid": "CA" + "f" * 32}, 1008),  # not the call of the token
        ({"mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}}, 1003),
        ({"customParameters": {"appKey": "banned"}}, 1008),
    ],
)
def test_a_start_that_does_not_fit_closes_the_stream(change: dict[str, Any], code: int) -> None:
    message = json.loads(START)
    message["start"].update(change)
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: key != "banned"))
    [close] = call.receive(json.dumps(message))
    assert isinstance(close, Close)
    assert close.code == code
    assert call.closed


def test_an_unsupported_format_s_close_reason_quotes_the_peer_s_values_cut_short() -> None:
    """The 1003 reason names the format that came, each value cut short (clipped), so it
    fits a close frame (123 bytes) and its log line stays short whatever the peer sent.
    Before, a 50,000-character encoding was copied whole into the reason (and the
    WARNING line of the close), and the close frame's cut lost the rate and channels."""
    message = json.loads(START)
    message["start"]["mediaFormat"] = {
        "encoding": "audio/x-" + "e" * 50_000,
        "sampleRate": int("9" * 90),
        "channels": 2,
    }
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True))
    [close] = call.receive(json.dumps(message))
    assert isinstance(close, Close)
    assert close.code == 1003
    assert len(close.reason.encode()) <= 123, close.reason
    assert close.reason.startswith("expected audio/x-mulaw at 8000 Hz mono, got 'audio/x-eee")
    assert close.reason.endswith(" x2")


UNREADABLE_STARTS = [
    pytest.param({"callSid": ""}, "start.callSid", id="empty-callSid"),
    pytest.param({"callSid": None}, "start.callSid", id="null-callSid"),
    pytest.param({"streamSid": ""}, "start.streamSid", id="empty-streamSid"),
    pytest.param({"streamSid": ["MZ1"]}, "start.streamSid", id="list-streamSid"),
    pytest.param({"mediaFormat": None}, "start.mediaFormat", id="null-mediaFormat"),
    pytest.param({"mediaFormat": {"encoding": "audio/x-mulaw"}}, "sampleRate", id="no-rate"),
    pytest.param({"customParameters": {"appKey": ["app"]}}, "customParameters", id="params"),
]


@pytest.mark.parametrize(("change", "named"), UNREADABLE_STARTS)
def test_a_start_that_cannot_be_read_closes_the_stream_1008(
    change: dict[str, Any], named: str
) -> None:
    """A first start the gateway cannot read is no call: closed at once with 1008 naming
    the field, as the other carriers' (CarrierCall's InvalidStart). Before, it was dropped
    as a bad frame and the stream waited for the start timeout."""
    message = json.loads(START)
    message["start"].update(change)
    with pytest.raises(InvalidStart, match=re.escape(named)):
        parse_message(json.dumps(message))
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True))
    assert call.receive(CONNECTED) == []
    [close] = call.receive(json.dumps(message))
    assert isinstance(close, Close)
    assert close.code == 1008
    assert named in close.reason
    assert call.closed


def test_an_unreadable_second_start_is_a_dropped_frame() -> None:
    """Once the stream started, a bad start is a bad frame (raised, the call goes on)."""
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True))
    call.receive(START)
    message = json.loads(START)
    message["start"]["callSid"] = ""
    with pytest.raises(ProtocolError, match=r"start\.callSid"):
        call.receive(json.dumps(message))
    assert call.state is State.BOT
    assert not call.closed


def test_each_items_audio_is_played_and_marked_then_the_caller_has_the_floor() -> None:
    call = started(frame_ms=20)
    [play] = answer(call, b"\x01" * 1000)
    assert isinstance(play, Play)
    assert len(play.messages) == 7  # 1000 bytes -> 6 frames of 160 + 1 padded
    payloads = [base64.b64decode(json.loads(m)["media"]["payload"]) for m in play.messages]
    assert {len(p) for p in payloads} == {160}
    assert payloads[-1].endswith(b"\xff")  # padded with μ-law silence
    assert json.loads(play.mark)["mark"]["name"] == "1"
    assert play.audio_ms == 140
    assert call.state is State.BOT  # its audio still plays
    assert call.receive(mark("1")) == []
    assert state_of(call) is State.CALLER


def test_frames_of_40_ms() -> None:
    call = started(frame_ms=40)
    [play] = answer(call, b"\x01" * 640)
    assert len(play.messages) == 2


def test_silence_gives_the_silence_turn(corpus: dict[str, Pcm]) -> None:
    call = started(silence_timeout_ms=1000)
    answer(call)
    call.receive(mark("1"))
    actions = speak(call, SILENCE * 60)
    turns = [(i, a) for i, a in actions if isinstance(a, StartTurn)]
    assert [(i, a.input.text) for i, a in turns] == [(49, "#silence")]  # after 1000 ms of audio


def test_speech_on_the_callers_floor_is_heard_and_becomes_the_input(
    corpus: dict[str, Pcm],
) -> None:
    call = started()
    answer(call)
    call.receive(mark("1"))
    speech = phone(corpus["play some music please"])
    actions = speak(call, SILENCE * 10 + speech)
    listen = [(i, a) for i, a in actions if isinstance(a, StartListening)]
    [(at, _)] = listen
    assert 10 + 7 <= at <= 10 + 12  # 150 ms of voice after the onset at frame 10
    assert len(PREROLLS[call]) >= (at - 10 + 1) * 160  # the onset is in the preroll
    assert [a for i, a in actions if i > at] == []  # the rest only feeds the stage
    assert call.state is State.HEARING
    [turn] = call.heard("final", "play some music please")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "play some music please"
    assert state_of(call) is State.BOT


def test_noise_on_the_callers_floor_is_ignored() -> None:
    call = started()
    answer(call)
    call.receive(mark("1"))
    call.receive(dtmf("1"))  # digit mode: an input
    answer(call)
    call.receive(mark("2"))
    call.machine.state = State.HEARING  # as if a listener were open
    assert call.heard("silence", "") == []
    assert call.state is State.CALLER


def test_barge_in_interrupts_the_bot_after_the_minimum_speech(corpus: dict[str, Pcm]) -> None:
    # without holding (GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS=0): any speech interrupts at once
    call = started(barge_in_min_speech_ms=300, barge_in_max_backchannel_ms=0)
    call.turn_event(BinaryEvent(data=b"\x00" * 40_000))  # 5 s of answer, still playing
    speech = phone(corpus["tell me about this place"])
    actions = speak(call, SILENCE * 10 + speech)
    interrupts = [(i, a) for i, a in actions if isinstance(a, Interrupt)]
    [(at, interrupt)] = interrupts
    assert json.loads(interrupt.clear) == {"event": "clear", "streamSid": STREAM}
    assert 10 + 14 <= at <= 10 + 18  # 300 ms of speech, not 150
    assert isinstance(actions[actions.index((at, interrupt)) + 1][1], StartListening)
    # the rest of the interrupted turn is dropped; its end lets the caller's input run
    assert call.turn_event(BinaryEvent(data=b"\x00" * 800)) == []
    assert call.turn_event(ResponseEvent(response=Response())) == []
    assert call.heard("final", "tell me about this place") == []  # waits for the turn
    [turn] = call.turn_finished()
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "tell me about this place"


def test_an_interruption_without_words_is_answered_with_fallback(corpus: dict[str, Pcm]) -> None:
    call = started()
    answer(call)  # mark 1 not echoed yet: the bot speaks
    speak(call, phone(corpus["tell me about this place"])[:8000])
    assert call.state is State.HEARING
    [turn] = call.heard("silence", "")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "#fallback"


def test_without_barge_in_speech_over_the_bot_is_not_heard(corpus: dict[str, Pcm]) -> None:
    call = started(barge_in=False)
    answer(call)
    actions = speak(call, phone(corpus["tell me about this place"]))
    assert actions == []
    assert call.state is State.BOT


def test_a_key_interrupts_the_bot_and_becomes_the_input() -> None:
    call = started()
    answer(call)  # playing
    actions = call.receive(dtmf("3"))
    assert isinstance(actions[0], Interrupt)
    assert isinstance(actions[1], StartTurn)
    assert actions[1].input.text == "3"


def test_without_barge_in_a_key_waits_for_the_bots_audio() -> None:
    call = started(barge_in=False)
    answer(call)
    assert call.receive(dtmf("3")) == []
    [turn] = call.receive(mark("1"))
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "3"


def test_a_failed_turn_is_spoken() -> None:
    call = started(error_text="Oops.")
    assert call.turn_event(ErrorEvent(text="core down", source="pipeline")) == [Speak("Oops.")]
    [play] = call.spoken(b"\x00" * 800)
    assert isinstance(play, Play)
    assert call.turn_finished() == []
    assert call.receive(mark("1")) == []
    assert call.state is State.CALLER


def test_the_end_waits_for_the_final_mark_then_hangs_up() -> None:
    call = started()
    play, final = answer(call, ended=True)
    assert isinstance(play, Play)
    assert not play.final
    assert isinstance(final, Play)
    assert final.final
    assert final.messages == ()
    assert json.loads(final.mark)["mark"]["name"] == "end-2"
    assert call.state is State.ENDING
    assert call.receive(dtmf("1")) == []  # no more input (no turn)
    assert call.receive(mark("1")) == []
    # the key gets no turn: said once, with the hang-up (the runner's DEBUG log)
    assert call.receive(mark("end-2")) == [InputsUnanswered("session ended", 1), HangUp(CALL)]
    assert call.closed
    assert call.receive(STOP) == []  # the core ended the session: nothing to end


def test_stop_ends_the_session() -> None:
    call = started()
    answer(call)
    call.receive(mark("1"))
    call.machine.state = State.HEARING  # as if a listener were open
    actions = call.receive(STOP)
    assert isinstance(actions[0], CancelListening)
    assert isinstance(actions[1], EndSession)
    assert call.closed
    assert call.connection_lost() == []  # once


def test_a_lost_connection_ends_the_session() -> None:
    call = started()
    [end] = call.connection_lost()
    assert isinstance(end, EndSession)
    assert end.ctx.key == f"twilio:{CALL}"


@pytest.mark.parametrize("end", ["stop", "lost"])
def test_keys_collected_when_the_stream_ends_are_the_input_of_a_last_turn(end: str) -> None:
    call = started(dtmf_mode="collect")
    answer(call)
    call.receive(mark("1"))  # the caller's floor
    assert call.receive(dtmf("1")) == []
    assert call.receive(dtmf("2")) == []  # no '#', no pause yet
    actions = call.receive(STOP) if end == "stop" else call.connection_lost()
    turn, ending = actions
    assert isinstance(turn, StartTurn)
    assert isinstance(ending, EndSession)
    assert turn.input.text == "12"
    assert call.turn is not None
    assert call.turn.discarded  # nothing of it is played
    assert call.turn_finished() == []  # the session is ended already: nothing more
    assert call.connection_lost() == []


@pytest.mark.parametrize("end", ["stop", "lost"])
def test_keys_collected_behind_a_running_turn_wait_for_it_at_the_end(end: str) -> None:
    call = started(dtmf_mode="collect", barge_in=False)
    assert call.receive(dtmf("7")) == []  # the intro's turn runs
    actions = call.receive(STOP) if end == "stop" else call.connection_lost()
    assert [type(a) for a in actions] == [EndSession]  # the runner waits for turns first
    # the intro's turn finished: the keys' turn
    turns = [a.input.text for a in answer(call) if isinstance(a, StartTurn)]
    assert turns == ["7"]


def test_keys_collected_behind_a_turn_that_ends_the_session_are_dropped() -> None:
    call = started(dtmf_mode="collect", barge_in=False)
    assert call.receive(dtmf("7")) == []
    assert [type(a) for a in call.connection_lost()] == [EndSession]
    # the core ended the session: no turn after it
    assert not [a for a in answer(call, ended=True) if isinstance(a, StartTurn)]


@pytest.mark.parametrize("playing", [False, True], ids=["caller's floor", "over the bot"])
def test_a_hash_alone_in_collect_mode_leaves_the_silence_timeout_running(playing: bool) -> None:
    # '#' with no keys before it is no input; it used to stop the silence timeout for good
    # (the call sat in dead air until the caller spoke or hung up: Twilio streams silence)
    call = started(dtmf_mode="collect", silence_timeout_ms=1000)
    answer(call)
    if not playing:
        assert call.receive(mark("1")) == []  # the caller's floor
    pressed = call.receive(dtmf("#"))
    assert [type(a) for a in pressed] == ([Interrupt] if playing else [])  # no input
    assert call.state is State.CALLER
    actions = speak(call, SILENCE * 60)
    turns = [(i, a.input.text) for i, a in actions if isinstance(a, StartTurn)]
    assert turns == [(49, "#silence")]  # 1000 ms of audio after the key


@pytest.mark.parametrize("end", ["stop", "lost"])
def test_the_turn_running_when_the_stream_ends_is_not_played(end: str) -> None:
    """The caller hangs up (the carrier's stop; its socket stays open a moment) or the
    connection is lost while the intro's turn runs: that turn finishes (the runner's
    EndSession waits for it, so the core saves) but nothing of it is played, no mark is
    sent, and its error text is not synthesized, as for the last input's turn."""
    call = started()
    actions = call.receive(STOP) if end == "stop" else call.connection_lost()
    assert [type(a) for a in actions] == [EndSession]
    assert call.turn is not None
    assert call.turn.discarded  # as the last input's turn: its output is dropped
    assert call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="hi"))) == []
    assert call.turn_event(BinaryEvent(data=b"\x00" * 1600)) == []  # no Play: no media, no mark
    assert call.turn_event(ErrorEvent(text="core down", source="pipeline")) == []  # no Speak
    assert call.spoken(b"\x00" * 800) == []
    assert call.turn_event(ResponseEvent(response=Response())) == []
    assert call.turn_finished() == []  # no final mark, nothing more
    assert call.connection_lost() == []


@pytest.mark.parametrize("end", ["stop", "lost"])
def test_a_turn_refused_after_the_stream_ended_is_not_spoken(end: str) -> None:
    call = started()
    call.receive(STOP) if end == "stop" else call.connection_lost()
    refused = TurnRejected("session-busy", "Another turn of this session is still running.")
    assert call.turn_rejected(refused) == []  # no Speak of the error text
    assert call.turn_finished() == []


@pytest.mark.parametrize("end", ["stop", "lost"])
def test_a_key_behind_the_turn_running_at_the_end_still_gets_its_turn(end: str) -> None:
    call = started(barge_in=False)
    assert call.receive(dtmf("7")) == []  # waits for the intro's turn
    call.receive(STOP) if end == "stop" else call.connection_lost()
    actions = answer(call)  # the intro's turn: nothing played
    assert not [a for a in actions if isinstance(a, Play | Speak)]
    [turn] = actions
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "7"
    assert call.turn is not None
    assert call.turn.discarded


@pytest.mark.parametrize(
    "frame", [START, MEDIA, DTMF, MARK, STOP], ids=lambda f: json.loads(f)["event"]
)
@pytest.mark.parametrize("sequence", ["x", "", "-1", "1.5", True, [1], {"n": 1}, 1.5])
def test_a_sequence_number_that_is_no_integer_is_read_as_none_by_every_event(
    frame: str, sequence: object
) -> None:
    """``sequenceNumber`` is informational: a value that is no integer is None on every
    event, as ``media`` read it (gateway.protocol.integer); a ``dtmf``, ``mark`` or
    ``stop`` with one was a ProtocolError (the key, the echo or the end dropped) and a
    ``start`` an InvalidStart (the call closed 1008)."""

    def sequence_of(number: object) -> int | None:
        value = json.loads(frame)
        value["sequenceNumber"] = number
        message = parse_message(json.dumps(value))
        assert type(message) is type(parse_message(frame))
        assert not isinstance(message, Connected)
        return message.sequence_number

    assert sequence_of(sequence) is None
    assert sequence_of("7") == sequence_of(7.0) == 7


def test_a_resumed_stream_continues_the_session_on_the_callers_floor_without_an_intro() -> None:
    """The stream of a call moved from an instance that shut down (``resumed`` 1, routes.py
    TwilioChannel.move_calls): no #intro turn, the caller has the floor and their next
    input is a turn of the same session; its end ends the session as any call's."""
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True, silence_timeout_ms=1000))
    start = json.loads(START)
    start["start"]["customParameters"]["resumed"] = "1"
    assert call.receive(json.dumps(start)) == []
    assert call.state is State.CALLER
    assert call.ctx is not None
    assert call.ctx.key == f"twilio:{CALL}"
    [turn] = call.receive(dtmf("5"))
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "5"
    assert turn.ctx.key == f"twilio:{CALL}"
    answer(call)
    assert [type(a) for a in call.receive(STOP)] == [EndSession]


@pytest.mark.parametrize("end", ["stop", "lost"])
def test_a_moved_calls_stream_end_leaves_its_session_open_and_drops_a_waiting_input(
    end: str,
) -> None:
    call = started(dtmf_mode="collect", barge_in=False)
    assert call.receive(dtmf("7")) == []  # keys behind the intro's turn
    assert call.move()
    actions = call.receive(STOP) if end == "stop" else call.connection_lost()
    assert actions == []  # no EndSession: the session goes on in the next stream
    assert call.turn is not None
    assert call.turn.discarded
    assert [a for a in answer(call) if isinstance(a, (StartTurn, EndSession))] == []
    assert not call.move()  # over: nothing to move


def test_no_turn_starts_for_a_moving_call_until_its_move_failed() -> None:
    call = started()
    answer(call)
    call.receive(mark("1"))  # the caller's floor
    assert call.move()
    assert call.receive(dtmf("4")) == []  # the input waits: nobody would hear its answer
    [turn] = call.move_failed()  # the call goes on here: the input's turn
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "4"


def test_a_call_whose_move_failed_ends_its_session_as_before() -> None:
    call = started()
    assert call.move()
    assert call.move_failed() == []  # still live: its stream's end will end the session
    assert [type(a) for a in call.connection_lost()] == [EndSession]
    moved = started()
    assert moved.move()
    assert moved.connection_lost() == []  # the stream closed before the move failed
    [end] = moved.move_failed()
    assert isinstance(end, EndSession)


def test_a_call_that_is_not_live_does_not_move() -> None:
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True))
    assert not call.move()  # not started
    ending = started()
    answer(ending, ended=True)  # the farewell plays: the call is ending
    assert ending.state is State.ENDING
    assert not ending.move()
