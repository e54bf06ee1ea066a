"""The call engine, sans I/O, around a transfer: the carrier asked only at the final mark,
no turn while it is asked (the caller's audio still heard, keys kept for its result), a
refusal giving the core ``#transfer-failed`` in the same session (the call goes on), an
acceptance ending the session."""

from __future__ import annotations

import base64
import json

from adapters.twilio.protocol import TwilioCall
from gateway.events import (
    TRANSFER_FAILED,
    BinaryEvent,
    Response,
    ResponseEvent,
    ResponseItemEvent,
    transfer_item,
)
from gateway.protocol.actions import EndSession, FeedAudio, StartTurn
from gateway.protocol.call import CallConfig, Play, State, Transfer
from tests.conftest import state_of

CALL = "CA" + "e" * 32
STREAM = "MZ" + "f" * 32


def frame(event: str, **body: object) -> str:
    return json.dumps({"event": event, "streamSid": STREAM, **body})


def start() -> str:
    return frame(
        "start",
        start={
            "accountSid": "AC" + "0" * 32,
            "streamSid": STREAM,
            "callSid": CALL,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"appKey": "app"},
        },
    )


def media() -> str:
    payload = base64.b64encode(b"\xff" * 160).decode()
    return frame("media", media={"track": "inbound", "payload": payload})


def transferring(*, core_ended: bool = False) -> TwilioCall:
    """A call whose #intro turn asked for a transfer, its final mark back."""
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: bool(key)))
    call.receive(start())
    call.turn_event(ResponseItemEvent(response_item=transfer_item("+15550123", reason="human")))
    call.turn_event(ResponseEvent(response=Response(session_ended=core_ended)))
    (final,) = call.turn_finished()
    assert isinstance(final, Play)
    assert final.final
    (transfer,) = call.receive(frame("mark", mark={"name": json.loads(final.mark)["mark"]["name"]}))
    assert transfer == Transfer(CALL, "+15550123", "human")
    assert call.state is State.TRANSFERRING
    return call


def test_no_turn_starts_while_the_carrier_is_asked_audio_is_fed_keys_kept() -> None:
    """The caller's audio still goes to the speech stage (their speech is heard and kept
    for the transfer's result: tests/adapters/twilio/test_transfer_speech.py), a key is
    kept for it (no action), an answering machine's result gives no action (kept for a
    refusal: test_transfer_speech.py)."""
    call = transferring()
    (feed,) = call.receive(media())
    assert isinstance(feed, FeedAudio)
    assert call.receive(frame("dtmf", dtmf={"digit": "5", "track": "inbound_track"})) == []
    assert call.waiting == ("5",)
    assert call.machine_answered("machine_start") == []
    assert call.state is State.TRANSFERRING


def test_a_refused_transfer_gives_the_core_transfer_failed_and_the_call_goes_on() -> None:
    call = transferring()
    (turn,) = call.transfer_finished(False, "the twilio API answered HTTP 503")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED == "#transfer-failed"
    assert turn.input.attributes == {
        "target": "+15550123",
        "reason": "human",
        "error": "the twilio API answered HTTP 503",
    }
    assert call.state is State.BOT
    assert call.transfer is None
    # the core's apology plays, then the caller has the floor in the same session
    (play,) = call.turn_event(BinaryEvent(data=_wav()))
    assert isinstance(play, Play)
    assert not play.final
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    call.receive(frame("mark", mark={"name": json.loads(play.mark)["mark"]["name"]}))
    assert state_of(call) is State.CALLER
    assert not call.session_over
    # a late answer of the carrier changes nothing
    assert call.transfer_finished(True) == []


def test_a_transfer_taken_ends_the_session_once() -> None:
    call = transferring()
    (end,) = call.transfer_finished(True)
    assert isinstance(end, EndSession)
    assert call.closed
    assert call.connection_lost() == []


def test_a_transfer_the_core_ended_the_session_with_is_not_ended_again() -> None:
    call = transferring(core_ended=True)
    assert call.transfer_finished(True) == []
    assert call.closed


def test_a_stream_that_stops_while_the_carrier_is_asked_ends_the_session() -> None:
    call = transferring()
    (end,) = call.receive(frame("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": CALL}))
    assert isinstance(end, EndSession)
    assert call.transfer_finished(False, "late") == []


def _wav() -> bytes:
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x10\x00" * 1600)
    return out.getvalue()
