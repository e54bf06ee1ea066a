"""What every text-framed carrier codec (Telnyx, Plivo, Exotel) refuses alike: each frame
of its BAD_FRAMES (tests/adapters/<carrier>/test_protocol.py) is a ProtocolError naming
the fault; media before ``start`` and binary frames are ProtocolErrors; audio, a mark or
a clear asked of a codec whose stream has not started (Vonage: not connected) is a
LocalProtocolError, and so is none of them once it has; a second start is a ProtocolError
that leaves the first start's format, call and stream as they were."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from adapters.vonage.protocol import VonageCodec
from gateway.callcodec import InvalidStart, Media
from gateway.protocol import LocalProtocolError, ProtocolError
from gateway.protocol.actions import Close
from gateway.protocol.call import CallConfig, CarrierCall
from tests.adapters.carrier_audio import tone
from tests.adapters.exotel import test_protocol as exotel
from tests.adapters.plivo import test_protocol as plivo
from tests.adapters.telnyx import test_protocol as telnyx
from tests.adapters.vonage import test_protocol as vonage

CODECS = {"telnyx": telnyx, "plivo": plivo, "exotel": exotel}
MEDIA = {"telnyx": b"\xff" * 160, "plivo": b"\xff" * 160, "exotel": b"\0" * 320}
SECOND_START = {
    "telnyx": lambda: telnyx.start("L16", 16000),
    "plivo": lambda: plivo.start("audio/x-l16", 16000),
    "exotel": lambda: exotel.start("16000"),
}
"""Each codec's start in another format than its ``started()``'s."""


@pytest.mark.parametrize(
    ("golden", "frame", "text"),
    [
        pytest.param(module, frame, text, id=f"{name}-{i}")
        for name, module in CODECS.items()
        for i, (frame, text) in enumerate(module.BAD_FRAMES)
    ],
)
def test_bad_frames_are_protocol_errors(golden: ModuleType, frame: str, text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        golden.started().receive_text(frame)


@pytest.mark.parametrize("name", list(CODECS))
def test_order_errors(name: str) -> None:
    golden = CODECS[name]
    codec = golden.started().__class__()
    with pytest.raises(ProtocolError, match="media before start"):
        codec.receive_text(golden.media(MEDIA[name]))
    with pytest.raises(ProtocolError, match="text frames only"):
        codec.receive_binary(MEDIA[name])
    for ask in (lambda: codec.audio(tone(440, 20, 8000)), lambda: codec.mark("1"), codec.clear):
        with pytest.raises(LocalProtocolError, match=rf"{name}: \w+ before the stream started"):
            ask()
    started = golden.started()
    assert started.audio(tone(440, 20, 8000))
    assert started.mark("1")
    assert started.clear()


@pytest.mark.parametrize("name", list(CODECS))
def test_a_second_start_changes_nothing(name: str) -> None:
    """A second start (here in another format) is refused before the codec takes any of
    it: the stream's audio is still decoded as the first start said, so a call whose
    engine drops the frame goes on hearing its caller."""
    golden = CODECS[name]
    codec = golden.started()
    before = (codec.media_format, codec.outbound_format, codec.call_id, codec.stream_id)
    with pytest.raises(ProtocolError, match="expected one start, got a second one"):
        codec.receive_text(SECOND_START[name]())
    assert (codec.media_format, codec.outbound_format, codec.call_id, codec.stream_id) == before
    heard = codec.receive_text(golden.media(MEDIA[name]))
    assert isinstance(heard, Media)
    assert heard.pcm.sample_rate == 8000


def test_vonage_outbound_before_connected() -> None:
    """Vonage's stream starts with ``websocket:connected``: nothing goes out before it."""
    codec = VonageCodec()
    for ask in (lambda: codec.audio(tone(440, 20, 16000)), lambda: codec.mark("1"), codec.clear):
        with pytest.raises(LocalProtocolError, match=r"vonage: \w+ before the stream started"):
            ask()
    started = vonage.connected()
    assert json.loads(started.mark("1")) == {"action": "notify", "payload": {"name": "1"}}
    assert json.loads(started.clear()) == {"action": "clear"}


UNREADABLE_STARTS = [
    pytest.param(name, frame, text, id=f"{name}-{i}")
    for name, module in CODECS.items()
    for i, (frame, text) in enumerate(module.BAD_FRAMES)
    if frame.startswith('{"event":"start"')
] + [
    pytest.param(
        "vonage",
        '{"event":"websocket:connected","from":"447700900000"}',
        "content-type: field required",
        id="vonage",
    )
]


@pytest.mark.parametrize(("name", "frame", "text"), UNREADABLE_STARTS)
def test_a_start_that_cannot_be_read_closes_the_call_1008(name: str, frame: str, text: str) -> None:
    """A start the codec cannot read (a field missing or invalid) before the stream
    started is an InvalidStart: the call engine closes at once with 1008 naming the fault
    (no call can be served on the stream; waiting for another start only delays it)."""
    codec = VonageCodec() if name == "vonage" else CODECS[name].started().__class__()
    call = CarrierCall(codec, None, CallConfig(key_allowed=lambda key: True, channel=name))
    with pytest.raises(InvalidStart, match=text):
        codec.receive_text(frame)
    (close,) = call.receive(frame)
    assert isinstance(close, Close)
    assert close.code == 1008
    assert text in close.reason
    assert call.closed
