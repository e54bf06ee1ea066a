"""A stream whose start (Vonage: ``websocket:connected``) is in a media format the gateway
cannot take is closed at once with 1003 (unsupported data) by the shared call engine
(gateway/protocol/call.py CarrierCall over each carrier's codec), the reason the codec's
text, not dropped as a bad frame to wait for a start that never comes; once the stream
has started, such a start is a second start: a ProtocolError, and the call goes on. (Over
a real WebSocket: tests/adapters/<carrier>/test_calls.py; Twilio's own call: its
tests/adapters/twilio/test_protocol.py.)"""

from __future__ import annotations

import pytest

from adapters.exotel.protocol import ExotelCodec
from adapters.plivo.protocol import PlivoCodec
from adapters.telnyx.protocol import TelnyxCodec
from adapters.vonage.protocol import VonageCodec
from gateway.callcodec import CarrierCodec
from gateway.protocol import ProtocolError
from gateway.protocol.actions import Close, StartTurn
from gateway.protocol.call import CLOSE_UNSUPPORTED, CallConfig, CarrierCall, State
from tests.adapters.exotel import test_protocol as exotel
from tests.adapters.plivo import test_protocol as plivo
from tests.adapters.telnyx import test_protocol as telnyx
from tests.adapters.vonage import test_protocol as vonage

CASES = [
    ("telnyx", TelnyxCodec, telnyx.start("G722", 16000), telnyx.START, "Unsupported Telnyx"),
    ("telnyx", TelnyxCodec, telnyx.start("PCMU", 7000), telnyx.START, "Unsupported sample rate"),
    ("plivo", PlivoCodec, plivo.start("audio/x-alaw"), plivo.START, "Unsupported Plivo"),
    # Plivo's μ-law is audio/x-mulaw;rate=8000 only (a 16 kHz μ-law start was taken)
    (
        "plivo",
        PlivoCodec,
        plivo.start("audio/x-mulaw", 16000),
        plivo.START,
        "Unsupported sample rate 16000 Hz",
    ),
    # Plivo's L16 is audio/x-l16;rate=8000|16000 only (a 24 kHz L16 start was taken)
    (
        "plivo",
        PlivoCodec,
        plivo.start("audio/x-l16", 24000),
        plivo.start("audio/x-l16", 16000),
        "Unsupported sample rate 24000 Hz",
    ),
    ("exotel", ExotelCodec, exotel.start(bits="8"), exotel.START, "Unsupported Exotel audio"),
    (
        "vonage",
        VonageCodec,
        vonage.CONNECTED.replace("16000", "44100"),
        vonage.CONNECTED,
        "Unsupported Vonage rate 44100",
    ),
]


def call_of(channel: str, codec: CarrierCodec) -> CarrierCall:
    """A call of ``channel`` over ``codec``, admitted for no call in particular."""
    return CarrierCall(codec, None, CallConfig(key_allowed=lambda key: True, channel=channel))


@pytest.mark.parametrize(
    ("channel", "codec", "bad", "good", "named"),
    CASES,
    ids=[
        "telnyx-g722",
        "telnyx-7000",
        "plivo-alaw",
        "plivo-mulaw-16k",
        "plivo-l16-24k",
        "exotel-8-bit",
        "vonage-44100",
    ],
)
def test_a_start_in_a_format_the_gateway_cannot_take_closes_the_call_1003(
    channel: str, codec: type[CarrierCodec], bad: str, good: str, named: str
) -> None:
    call = call_of(channel, codec())
    (close,) = call.receive(bad)
    assert isinstance(close, Close)
    assert close.code == CLOSE_UNSUPPORTED == 1003
    assert close.reason.startswith(named)
    assert (call.state, call.info) == (State.CLOSED, None)

    started = call_of(channel, codec())
    assert any(isinstance(a, StartTurn) for a in started.receive(good))
    with pytest.raises(ProtocolError):
        started.receive(bad)  # a second start: dropped (the runner logs it)
    assert started.state is State.BOT
    assert started.info is not None
