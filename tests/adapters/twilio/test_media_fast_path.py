"""The inbound ``media`` fast path (``media_audio``) against the full parser
(``parse_message``): on every frame, good or hostile, the fast path either steps aside
(None) or gives exactly the full parser's track and μ-law bytes, and it never accepts a
frame the full parser refuses."""

from __future__ import annotations

import base64
import json

import pytest

from adapters.twilio.protocol import MAX_MEDIA_BYTES, Media, media_audio, parse_message
from gateway.protocol import ProtocolError

SID = "MZ" + "0" * 32
AUDIO = bytes(range(160))
B64 = base64.b64encode(AUDIO).decode()


def frame(media: object, **top: object) -> str:
    return json.dumps({"event": "media", "streamSid": SID, "media": media, **top})


GOOD = [
    frame({"track": "inbound", "chunk": "1", "timestamp": "20", "payload": B64}),
    frame({"payload": B64}),  # no track: inbound
    frame({"track": 7, "payload": B64}),  # a track that is not a string: inbound
    frame({"track": "outbound", "payload": B64}),
    " " + frame({"payload": B64}),  # whitespace: the full parser's
    frame({"payload": B64}) + "\n",
    frame({"payload": B64}, note="caf\u00e9"),  # non-ASCII: the full parser's
    json.dumps({"event": "media", "media": {"payload": B64}}, indent=1),
    frame({"track": "inbound", "payload": B64}).replace("inbound", "inb\\u006fund"),  # escape
    frame({"payload": base64.b64encode(b"\xff" * MAX_MEDIA_BYTES).decode()}),  # big: full
]

BAD = [
    frame({"payload": "not base64!"}),
    frame({"payload": 12}),
    frame({"payload": None}),
    frame({"track": "inbound"}),  # no payload
    frame("a string"),
    frame([1, 2]),
    json.dumps({"event": "media", "streamSid": SID}),  # no media
    frame({"payload": base64.b64encode(b"\xff" * (MAX_MEDIA_BYTES + 1)).decode()}),
    frame({"payload": base64.b64encode(b"\xff" * (MAX_MEDIA_BYTES + 2)).decode()}),
    frame({"payload": base64.b64encode(b"\xff" * (MAX_MEDIA_BYTES + 3)).decode()}),
    frame({"payload": B64}) + "garbage",  # trailing data
    frame({"payload": B64}) + frame({"payload": B64}),  # two objects
    frame({"payload": B64})[:-1] + ',"sequenceNumber":NaN}',  # not JSON
    frame({"payload": B64})[:-1] + ',"sequenceNumber":' + "9" * 5000 + "}",  # huge number
    '{"event":"media","media":' + "[" * 5000 + "]" * 5000 + "}",  # deep nesting
    frame({"payload": B64})[:-1],  # cut short
    "[" + frame({"payload": B64}) + "]",  # not an object
    frame({"payload": "not base64!"})[:-2] + ',"payload":"' + B64 + '"}}',  # a key twice
    "",
]


@pytest.mark.parametrize("text", GOOD)
def test_good_frames_read_the_same_on_both_paths(text: str) -> None:
    message = parse_message(text)
    assert isinstance(message, Media)
    fast = media_audio(text)
    if fast is not None:  # the fast path may leave any frame to the full parser
        assert fast == (message.track, message.payload)
    assert message.payload in (AUDIO, b"\xff" * MAX_MEDIA_BYTES)


def test_the_plain_frame_takes_the_fast_path() -> None:
    assert media_audio(GOOD[0]) == ("inbound", AUDIO)
    assert media_audio(GOOD[2]) == ("inbound", AUDIO)


@pytest.mark.parametrize("text", BAD)
def test_frames_the_full_parser_refuses_are_never_taken_by_the_fast_path(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_message(text)
    assert media_audio(text) is None


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "1"}}),
        json.dumps({"event": "stop", "streamSid": SID, "stop": {"callSid": "CA1"}}),
        json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "5"}}),
        json.dumps({"event": "hello"}),
    ],
)
def test_other_events_go_to_the_full_parser(text: str) -> None:
    assert media_audio(text) is None
