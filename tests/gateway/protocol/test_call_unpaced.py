"""Barge-in on a carrier that is sent each answer at once (Plivo, Exotel: the codec is not
``realtime``, so the bot cannot be paused), pure: speech over the bot is judged as on a
paced carrier (module doc step 4), but the bot plays on meanwhile (no PausePlayback, no
ResumePlayback). A cough or a backchannel does not cut it off; a real interruption clears
it once judged, and what the caller heard counts to the clear (the audio went on).

Before, such a carrier's bot was cleared at once by any speech over it lasting
``barge_in_min_speech_ms``: a cough cut the answer off and the core got ``#fallback``.
The speech stage's verdicts and the transcripts are given by hand (the real VAD and
recognizer over real calls: tests/adapters/test_carrier_calls.py, the cough tests).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from adapters.exotel.protocol import ExotelCodec
from adapters.plivo.protocol import PlivoCodec
from gateway.callcodec import CarrierCodec
from gateway.events import (
    FALLBACK,
    HEARD,
    INTERRUPTED,
    BinaryEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    transfer_item,
)
from gateway.protocol.actions import FeedAudio, StartListening, StartTurn
from gateway.protocol.call import (
    CallConfig,
    CarrierCall,
    Interrupt,
    Play,
    State,
    Transfer,
)
from tests.conftest import state_of

CALL = "4f7d4d48-4f2f-11ee-9b4b-0242ac120002"


class Wire:
    """One unpaced carrier's frames for these tests: its start, 20 ms of inbound quiet
    (PCM at 8 kHz, as the wire carries it), a mark's echo."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name

    def codec(self) -> CarrierCodec:
        return PlivoCodec() if self.name == "plivo" else ExotelCodec()

    def start(self) -> str:
        if self.name == "plivo":
            start = {
                "callId": CALL,
                "streamId": "s-1",
                "accountId": "MAXXXXXXXXXXXXXXXXXX",
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
            }
            extra = json.dumps({"appKey": "demo"})
            return json.dumps({"event": "start", "start": start, "extra_headers": extra})
        start = {
            "call_sid": CALL,
            "stream_sid": "s-1",
            "account_sid": "exotel-account",
            "from": "09876543210",
            "to": "08012345678",
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
            "custom_parameters": {"appKey": "demo"},
        }
        return json.dumps({"event": "start", "sequence_number": "1", "start": start})

    def quiet(self) -> str:
        if self.name == "plivo":
            payload = base64.b64encode(b"\xff" * 160).decode()
            media = {"track": "inbound", "timestamp": "0", "chunk": 1, "payload": payload}
            return json.dumps({"event": "media", "streamId": "s-1", "media": media})
        payload = base64.b64encode(b"\x00" * 320).decode()
        media = {"chunk": "1", "timestamp": "0", "payload": payload}
        return json.dumps({"event": "media", "stream_sid": "s-1", "media": media})

    def mark(self, name: str) -> str:
        if self.name == "plivo":
            return json.dumps({"event": "playedStream", "streamId": "s-1", "name": name})
        return json.dumps({"event": "mark", "stream_sid": "s-1", "mark": {"name": name}})


WIRES = [Wire("plivo"), Wire("exotel")]


def started(wire: Wire, **config: Any) -> CarrierCall:
    call = CarrierCall(wire.codec(), None, CallConfig(key_allowed=lambda key: True, **config))
    assert not call.codec.realtime  # sent each answer at once: cannot be paused
    actions = call.receive(wire.start())
    assert any(isinstance(a, StartTurn) for a in actions), actions
    return call


def seconds(call: CarrierCall, n: int) -> bytes:
    """``n`` seconds of the answer's audio as the call asks for it (μ-law for Plivo's
    PCMU wire, 16-bit PCM at 8 kHz for Exotel's L16)."""
    per_second = 8000 if call.tts.file_type == "mulaw" else 16000
    return b"\x00" * per_second * n


def say_item(call: CarrierCall, text: str, n: int = 1) -> Play:
    """The running turn says one item, ``n`` s long (its audio sent, its mark not echoed)."""
    assert call.turn_event(ResponseItemEvent(response_item=ResponseItem(text=text))) == []
    [play] = call.turn_event(BinaryEvent(data=seconds(call, n)))
    assert isinstance(play, Play)
    return play


def frames(
    call: CarrierCall, wire: Wire, n: int, *, onset: int | None = None, voiced: int = 0
) -> list[Any]:
    """``n`` inbound frames (20 ms each), the stage's verdict after each (speech since
    ``onset``, voiced up to ``voiced`` ms of it). The actions, FeedAudio left out."""
    out: list[Any] = []
    for _ in range(n):
        [feed] = call.receive(wire.quiet())
        assert isinstance(feed, FeedAudio)
        voiced_ms = 0 if onset is None else min(call.now_ms - onset, voiced)
        started = onset is not None and call.now_ms - onset == 160
        out += call.voice(onset, started=started, voiced_ms=voiced_ms)
    return out


def speech_over_the_bot(call: CarrierCall, wire: Wire) -> int:
    """160 ms of speech over the bot: it is heard (StartListening) and judged (HOLDING),
    and the bot is not paused (nor cleared). The onset."""
    frames(call, wire, 10)
    onset = call.now_ms
    actions = frames(call, wire, 8, onset=onset, voiced=10_000)
    assert [type(a) for a in actions] == [StartListening], actions  # no PausePlayback
    assert call.state is State.HOLDING
    return onset


@pytest.mark.parametrize("wire", WIRES, ids=str)
@pytest.mark.parametrize(
    ("interim", "final"),
    [("", ""), ("uh huh", "uh huh"), ("", "the")],
    ids=["cough", "backchannel", "function word"],
)
def test_a_cough_or_a_backchannel_over_the_bot_does_not_cut_it_off(
    wire: Wire, interim: str, final: str
) -> None:
    call = started(wire)
    say_item(call, "Welcome to the shop. How can I help you today?", 3)
    onset = speech_over_the_bot(call, wire)
    actions = call.interim(interim) if interim else []
    # 350 ms voiced (a cough's burst), then quiet: judged, nothing to resume
    actions += frames(call, wire, 40, onset=onset, voiced=350)
    assert actions == [], actions
    assert call.state is State.BOT
    assert frames(call, wire, 20) == []  # the speech ended
    assert call.heard("final" if final else "silence", final, 0.9) == []
    assert call.state is State.BOT
    assert call.interruption is None
    # the answer played on: its mark comes back and the caller has the floor, no input
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    assert call.receive(wire.mark("1")) == []
    assert state_of(call) is State.CALLER
    assert call.waiting == ()


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_a_real_interruption_clears_the_bot_once_judged(wire: Wire) -> None:
    """Two content words clear it; what the caller heard counts up to the clear, not the
    onset: the bot played on while the speech was judged."""
    call = started(wire)
    say_item(call, "Your order of two pizzas will arrive in thirty minutes.", 3)
    onset = speech_over_the_bot(call, wire)
    assert frames(call, wire, 40, onset=onset, voiced=10_000) == []  # judged: plays on
    assert call.interim("wait") == []  # one content word: not yet
    actions = call.interim("wait i want to change")
    assert [type(a) for a in actions] == [Interrupt], actions  # no ResumePlayback before
    assert call.state is State.HEARING
    assert call.turn_event(BinaryEvent(data=seconds(call, 1))) == []  # the rest is dropped
    assert call.turn_finished() == []
    [turn] = call.heard("final", "wait i want to change my order")
    assert isinstance(turn, StartTurn)
    assert turn.input.attributes[INTERRUPTED] is True
    # cleared 1.16 s into the 3 s item (heard 39%): more than the 160 ms at the onset
    assert turn.input.attributes[HEARD] == "Your order of two", turn.input.attributes


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_speech_longer_than_any_backchannel_clears_without_words(wire: Wire) -> None:
    call = started(wire, barge_in_max_backchannel_ms=800)
    say_item(call, "Hello there.", 3)
    onset = speech_over_the_bot(call, wire)
    actions = frames(call, wire, 40, onset=onset, voiced=10_000)
    assert [type(a) for a in actions] == [Interrupt], actions
    assert call.state is State.HEARING
    # no words came: the caller cut the bot off, so it must answer (#fallback)
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    [turn] = call.heard("silence", "")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == FALLBACK


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_the_answer_ending_while_a_cough_is_judged_gives_the_caller_the_floor(wire: Wire) -> None:
    """The bot plays on while judged, so its last mark may come back meanwhile: the bot
    has nothing more to say once the speech is judged no interruption, so the utterance
    is the caller's (as on a paced carrier whose bot finished while judging); no words:
    no input, the caller's floor."""
    call = started(wire)
    say_item(call, "Hello.")
    onset = speech_over_the_bot(call, wire)
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    assert call.receive(wire.mark("1")) == []  # played out while the caller coughed
    assert call.state is State.HOLDING
    actions = frames(call, wire, 40, onset=onset, voiced=300) + frames(call, wire, 5)
    assert actions == []
    assert state_of(call) is State.HEARING  # the bot is done: the cough's final decides
    assert call.heard("silence", "") == []
    assert state_of(call) is State.CALLER
    assert call.waiting == ()


def test_without_judging_speech_over_the_bot_still_clears_at_once() -> None:
    """GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS=0 keeps the old behaviour on every carrier."""
    wire = WIRES[0]
    call = started(wire, barge_in_max_backchannel_ms=0)
    say_item(call, "Hello.")
    frames(call, wire, 5)
    actions = frames(call, wire, 8, onset=call.now_ms, voiced=10_000)
    assert [type(a) for a in actions] == [Interrupt, StartListening]  # nothing paused


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_speech_ended_long_before_a_backchannel_s_final_is_heard_as_the_bot_plays_on(
    wire: Wire,
) -> None:
    """ "yeah" over the bot, ended; "no wait" begun and ended before its final; that final
    ("yeah": no interruption) comes more than ``keep_ms`` after "no wait" ended (a
    recognizer far behind). A paced carrier's bot, paused all that time, resumes and lets
    "no wait" go (test_barge_in.py ..._resumes_it: holding it on would keep it silent for
    a second final); this bot was never paused, so nothing is lost by judging "no wait":
    it is heard from its onset (the stage keeps it) and judged over the bot. Before, it
    was let go as on a paced carrier: the caller's words never reached the core."""
    call = started(wire)
    say_item(call, "Thank you for calling the pizza shop, how can I help you?", 10)
    onset = speech_over_the_bot(call, wire)
    assert frames(call, wire, 15, onset=onset, voiced=300) == []
    assert frames(call, wire, 4) == []  # the endpointer ended it: its final decides
    again = call.now_ms
    assert frames(call, wire, 10, onset=again, voiced=10_000) == []  # "no wait"
    end = call.now_ms
    assert frames(call, wire, 2) == []
    frames(call, wire, 2 * call.keep_ms // 20)  # the final comes late
    assert call.state is State.HOLDING
    actions = call.heard("final", "yeah", 0.9)
    assert [type(a) for a in actions] == [StartListening], actions
    [listen] = actions
    assert isinstance(listen, StartListening)
    assert (listen.from_ms, listen.until_ms) == (again - 300, end + 20)
    assert call.state is State.HOLDING
    # its words are a real interruption: the bot is cleared, the words the next input
    [cut] = call.heard("final", "no wait", 0.9)
    assert isinstance(cut, Interrupt)
    assert call.waiting == ("no wait",)


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_long_noise_judged_once_the_answer_played_out_is_no_fallback(wire: Wire) -> None:
    """The bot plays on while speech over it is judged, so its answer may play out
    meanwhile (its last mark back); the speech then goes on past any backchannel (a TV,
    a long breath) with no words. Nothing of the bot was cut off (it had finished), so
    the wordless speech is no input, as the same noise on the caller's floor: the core
    gets no ``#fallback`` (its answer would be "sorry, I did not catch that" to nobody).
    Before, judged an interruption once voiced that long, it counted as the caller
    cutting the bot off, and a wordless final gave ``#fallback``."""
    call = started(wire)
    say_item(call, "Hello.")
    onset = speech_over_the_bot(call, wire)
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    assert call.receive(wire.mark("1")) == []  # played out while the caller is judged
    assert call.state is State.HOLDING
    frames(call, wire, 60, onset=onset, voiced=10_000)  # past any backchannel
    frames(call, wire, 5)
    assert state_of(call) is State.HEARING
    assert call.heard("silence", "") == []
    assert state_of(call) is State.CALLER
    assert call.waiting == ()
    assert call.interruption is None


def transfer_asked(call: CarrierCall, wire: Wire) -> None:
    """The running turn says "Transferring you now." and asks for a transfer; its turn
    finishes, its audio plays out: the carrier is asked."""
    say_item(call, "Transferring you now.")
    item = transfer_item("+15550100", reason="agent")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    call.turn_event(ResponseEvent(response=Response()))
    [final] = call.turn_finished()
    assert isinstance(final, Play)
    assert call.receive(wire.mark("1")) == []
    [transfer] = call.receive(wire.mark("end-2"))
    assert isinstance(transfer, Transfer)
    assert call.state is State.TRANSFERRING


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_speech_held_when_a_transfer_s_turn_finishes_resumes_nothing(wire: Wire) -> None:
    """Speech over the transfer's announcement is judged when its turn finishes: the
    announcement played on, so nothing is resumed (no ResumePlayback: the carrier's
    ``resume`` is no message it knows), only the final mark is sent."""
    call = started(wire)
    say_item(call, "Transferring you now.", 3)
    item = transfer_item("+15550100", reason="agent")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    speech_over_the_bot(call, wire)
    call.turn_event(ResponseEvent(response=Response()))
    [final] = call.turn_finished()
    assert isinstance(final, Play)
    assert final.final
    assert call.state is State.ENDING


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_speech_going_on_at_a_refusal_is_judged_as_the_bot_plays_on(wire: Wire) -> None:
    """The caller speaks while the carrier is asked and goes on as it refuses: speech over
    the bot's answer to ``#transfer-failed``, judged while that answer plays (no
    PausePlayback), and cleared once voiced past any backchannel."""
    call = started(wire)
    transfer_asked(call, wire)
    onset = call.now_ms
    [start] = frames(call, wire, 20, onset=onset, voiced=10_000)
    assert isinstance(start, StartListening)
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert call.state is State.HOLDING
    say_item(call, "Sorry, nobody is free right now.", 3)
    actions = frames(call, wire, 40, onset=onset, voiced=10_000)
    assert [type(a) for a in actions] == [Interrupt], actions
    assert state_of(call) is State.HEARING
