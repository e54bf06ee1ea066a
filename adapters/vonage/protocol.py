"""Vonage Voice API WebSocket (linear16), sans I/O: the wire codec and the NCCO answer.

Spec: shared/specs/CARRIERS.md "Vonage Voice API WebSocket (linear16)" (Vonage's
"WebSockets" guide).

Vonage -> gateway:

- the first **text** frame ``{"event":"websocket:connected","content-type":
  "audio/l16;rate=16000", …headers of the NCCO endpoint…}``: a
  :class:`~gateway.callcodec.Started` (Vonage has no other start);
- then **binary** frames of 16-bit signed little-endian mono PCM, about 20 ms each
  (640 bytes at 16 kHz, 320 at 8 kHz);
- text events ``websocket:cleared`` (a clear done), ``websocket:notify`` (a notify's
  payload, echoed once the audio before it played), ``websocket:dtmf`` (``digit`` or
  ``dtmf.digit``: the field is [unverified]).

gateway -> Vonage: **binary** frames of 20 ms of the same format (paced: Vonage
buffers at most 3072 messages), text ``{"action":"clear"}`` and
``{"action":"notify","payload":{"name":…}}``.

The call is identified by a header the NCCO endpoint sets (:data:`CALL_HEADER`,
the call's UUID from the answer webhook), echoed in ``websocket:connected``. A
``websocket:connected`` without it, with a header value longer than 256 characters
(the NCCO's are at most 128; a ``from`` becomes the session's device), or with headers
beyond the custom parameters' bounds (more than 32, a name longer than 256 characters,
more than 8192 in all: gateway/callcodec.py ``params_fault``) cannot start the call:
:class:`~gateway.callcodec.InvalidStart` (closed 1008, the reason naming the field or
the fault).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from gateway.callcodec import (
    MAX_PARAMS,
    CallEvent,
    Cleared,
    Digit,
    EventHandler,
    JsonCarrierCodec,
    Media,
    MediaFormat,
    Played,
    Started,
    UnsupportedMediaFormat,
    WireFrame,
    bounded_params,
    get_digit,
    get_object,
    get_str,
)
from gateway.protocol import ProtocolError

CARRIER: Final = "vonage"
RATES: Final = (8000, 16000, 24000)
"""``audio/l16;rate=`` values Vonage offers (24 kHz per the Python SDK, PR #342)."""
CALL_HEADER: Final = "call_uuid"
"""The NCCO header that carries the call's UUID into ``websocket:connected``."""
MAX_QUEUED: Final = 3072
"""Messages Vonage buffers."""

_CONTENT_TYPE: Final = re.compile(r"\s*audio/l16\s*;\s*rate\s*=\s*(\d{4,5})\s*", re.IGNORECASE)
_RESERVED: Final = frozenset({"event", "content-type"})


def content_type(sample_rate: int) -> str:
    """``audio/l16;rate=<sample_rate>``. Raises UnsupportedMediaFormat for a rate not in RATES."""
    if sample_rate not in RATES:
        raise UnsupportedMediaFormat(
            f"Unsupported Vonage rate {sample_rate}: expected one of {', '.join(map(str, RATES))}"
        )
    return f"audio/l16;rate={sample_rate}"


def parse_content_type(value: str) -> MediaFormat:
    """The format of a ``content-type`` such as ``audio/l16;rate=16000`` (little-endian).

    Raises UnsupportedMediaFormat for another type or rate.
    """
    match = _CONTENT_TYPE.fullmatch(value)
    if match is None:
        raise UnsupportedMediaFormat(
            f"Unsupported Vonage content-type {value[:80]!r}: expected audio/l16;rate="
            + "|".join(map(str, RATES))
        )
    rate = int(match[1])
    content_type(rate)
    return MediaFormat("L16", rate)


class VonageCodec(JsonCarrierCodec):
    """One Vonage WebSocket (see the module doc); a :class:`~gateway.callcodec.CarrierCodec`.

    The audio goes out in the inbound format (Vonage plays what it streams).
    """

    carrier: str = CARRIER
    title: str = "Vonage"
    realtime: bool = True
    max_queued: int | None = MAX_QUEUED
    start_event: str = "websocket:connected"

    def __init__(self, frame_ms: int = 20) -> None:
        super().__init__(frame_ms=frame_ms)
        self.headers: dict[str, str] = {}

    def handlers(self) -> Mapping[str, EventHandler]:
        """Vonage's text events (module doc)."""
        return {
            "websocket:connected": self._connected,
            "websocket:cleared": lambda f: Cleared(),
            "websocket:notify": _notified,
            "websocket:dtmf": _dtmf,
        }

    def _connected(self, frame: dict[str, Any]) -> Started:
        where = "websocket:connected message"
        if self._format is not None:
            raise ProtocolError(f"Invalid {where}: the stream is already connected")
        fmt = parse_content_type(get_str(frame, "content-type", where))
        headers: dict[str, str] = {}
        for key, value in frame.items():
            if key in _RESERVED:
                continue
            if len(headers) == MAX_PARAMS:  # before converting a flood of them
                raise ProtocolError(f"Invalid {where}: headers: more than {MAX_PARAMS} parameters")
            if isinstance(value, str | int) and not isinstance(value, bool):
                headers[key] = get_str(frame, key, where)  # at most 256 characters
            elif isinstance(value, float):
                headers[key] = str(value)
        bounded_params(headers, f"{where}: headers")
        if not headers.get(CALL_HEADER):
            raise ProtocolError(
                f"Invalid {where}: {CALL_HEADER}: field required (the NCCO endpoint's header)"
            )
        self.headers = headers
        return self.begin(
            Started(
                call_id=headers[CALL_HEADER],
                stream_id="",
                media_format=fmt,
                caller=headers.get("from", ""),
                callee=headers.get("to", ""),
                parameters=headers,
            )
        )

    def receive_binary(self, data: bytes) -> CallEvent:
        """A binary frame: the caller's audio (16-bit LE PCM). Raises ProtocolError before
        ``websocket:connected``, for an odd length or more than 2 s of audio."""
        if self._format is None:
            raise ProtocolError("Invalid Vonage audio frame: audio before websocket:connected")
        return Media(self._format.decode(bytes(data), "Vonage audio frame"))

    def audio_frame(self, fmt: MediaFormat, payload: bytes) -> WireFrame:
        """A binary frame: the wire audio as it is."""
        return payload

    def mark(self, name: str) -> WireFrame:
        """``{"action":"notify","payload":{"name":…}}``: echoed as ``websocket:notify``.
        LocalProtocolError before ``websocket:connected``."""
        self.started_format("notify")
        return notify_message(name)

    def clear(self) -> WireFrame:
        """``{"action":"clear"}``. LocalProtocolError before ``websocket:connected``."""
        self.started_format("clear")
        return CLEAR


def _notified(frame: dict[str, Any]) -> Played:
    payload = get_object(frame, "payload", "websocket:notify message")
    return Played(get_str(payload, "name", "websocket:notify message: payload"))


def _dtmf(frame: dict[str, Any]) -> Digit:
    body = frame.get("dtmf")
    source = body if isinstance(body, dict) else frame
    return Digit(get_digit(source, "websocket:dtmf message"), _duration(source))


def _duration(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("duration")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def notify_message(name: str) -> str:
    """``{"action":"notify","payload":{"name":…}}``."""
    return json.dumps({"action": "notify", "payload": {"name": name}})


CLEAR: Final = '{"action":"clear"}'
"""Vonage drops the audio it holds and answers ``websocket:cleared``."""


def ncco(
    uri: str,
    *,
    sample_rate: int = 16000,
    call_uuid: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The answer URL's NCCO: connect the call to the gateway's WebSocket::

        [{"action":"connect","endpoint":[{"type":"websocket","uri":"wss://…",
          "content-type":"audio/l16;rate=16000","headers":{"call_uuid":"…", …}}]}]

    ``call_uuid`` goes in :data:`CALL_HEADER` so ``websocket:connected`` names the call.
    Raises UnsupportedMediaFormat for a rate Vonage does not offer.
    """
    all_headers = dict(headers or {})
    if call_uuid is not None:
        all_headers[CALL_HEADER] = call_uuid
    endpoint: dict[str, Any] = {
        "type": "websocket",
        "uri": uri,
        "content-type": content_type(sample_rate),
    }
    if all_headers:
        endpoint["headers"] = all_headers
    return [{"action": "connect", "endpoint": [endpoint]}]
