"""Telnyx Media Streaming over WebSocket, sans I/O: the wire codec and the TeXML answer.

Spec: shared/specs/CARRIERS.md "Telnyx Media Streaming (Call Control or TeXML)"
(Telnyx's "Stream call media over WebSocket" and the TeXML ``<Stream>`` verb).

Telnyx -> gateway (text frames, JSON)::

    {"event":"connected","version":"1.0.0"}
    {"event":"start","sequence_number":"1","stream_id":"…","start":{"call_control_id":"v3:…",
     "from":"+1…","to":"+1…","media_format":{"encoding":"PCMU","sample_rate":8000,"channels":1}}}
    {"event":"media","sequence_number":"…","stream_id":"…","media":{"track":"inbound",
     "chunk":"…","timestamp":"…","payload":"<base64 RTP payload, no header>"}}
    {"event":"dtmf","dtmf":{"digit":"1"}}    {"event":"mark","mark":{"name":"…"}}
    {"event":"error", …}                     {"event":"stop", …}

gateway -> Telnyx: ``{"event":"media","media":{"payload":…}}`` (RTP bidirectional
mode: 20 ms frames of the bidirectional codec, paced), ``{"event":"mark","mark":
{"name":…}}``, ``{"event":"clear"}``.

Encodings: PCMU, PCMA (8 kHz only: a start at another rate is refused) and L16
(8000, 16000 or 24000 Hz, the rates Telnyx streams at: CARRIERS.md "Enable",
``stream_bidirectional_sampling_rate``; a start at another rate is refused),
**L16 big-endian** (network byte order, RFC 2586): byte-swapped both ways.
G722, OPUS and AMR-WB are refused (UnsupportedMediaFormat): the answers ask for a codec
the gateway speaks (TeXML ``codec``, Call Control ``stream_codec``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Final

from gateway.callcodec import (
    CarrierError,
    Connected,
    EventHandler,
    JsonCarrierCodec,
    MediaFormat,
    Started,
    UnsupportedMediaFormat,
    WireEncoding,
    WireFrame,
    b64,
    get_int,
    get_object,
    get_str,
)
from gateway.protocol import ProtocolError, clipped

CARRIER: Final = "telnyx"
CODECS: Final[dict[str, WireEncoding]] = {"PCMU": "PCMU", "PCMA": "PCMA", "L16": "L16"}
"""``media_format.encoding`` values the gateway takes (case-insensitive)."""


G711_RATE: Final = 8000
"""The one sample rate (Hz) of PCMU and PCMA (G.711: 8 kHz, RFC 3551 section 4.5.14)."""
L16_RATES: Final = (8000, 16000, 24000)
"""The sample rates (Hz) of Telnyx's L16: the rates Telnyx streams at (CARRIERS.md
"Telnyx", "Enable": ``stream_bidirectional_sampling_rate`` 8000/16000/24000)."""


def media_format(encoding: str, sample_rate: int) -> MediaFormat:
    """The wire format of a Telnyx ``encoding`` name at ``sample_rate`` Hz; L16 is
    big-endian at :data:`L16_RATES`; PCMU and PCMA are 8 kHz (:data:`G711_RATE`).

    Raises UnsupportedMediaFormat for another encoding (G722, OPUS, AMR-WB) or rate
    (PCMU or PCMA at any but 8000 Hz, L16 at any but 8000, 16000 or 24000 Hz: its audio
    would be decoded at a rate Telnyx does not stream, not the one it is in).
    """
    wire = CODECS.get(encoding.upper())
    if wire is None:
        raise UnsupportedMediaFormat(
            f"Unsupported Telnyx encoding {clipped(encoding)}: expected PCMU, PCMA or L16"
        )
    if wire != "L16" and sample_rate != G711_RATE:
        raise UnsupportedMediaFormat(
            f"Unsupported sample rate {clipped(sample_rate)} Hz of Telnyx's {wire}: "
            f"expected {G711_RATE}"
        )
    if wire == "L16" and sample_rate not in L16_RATES:
        raise UnsupportedMediaFormat(
            f"Unsupported sample rate {clipped(sample_rate)} Hz of Telnyx's L16: expected "
            + ", ".join(map(str, L16_RATES[:-1]))
            + f" or {L16_RATES[-1]}"
        )
    return MediaFormat(wire, sample_rate, big_endian=wire == "L16")


BIDIRECTIONAL: Final = media_format("PCMU", 8000)
"""The bidirectional codec the gateway's answers ask Telnyx for (:func:`texml`'s
``bidirectionalCodec``/``bidirectionalSamplingRate``, :func:`stream_fields`'
``stream_bidirectional_codec``/``_sampling_rate``): the format the gateway's audio goes
out in (:class:`TelnyxCodec`'s ``outbound``), whatever the start's ``media_format``."""


class TelnyxCodec(JsonCarrierCodec):
    """One Telnyx stream (see the module doc); a :class:`~gateway.callcodec.CarrierCodec`.

    ``outbound``: the bidirectional codec the answer asked for
    (``bidirectionalCodec``/``bidirectionalSamplingRate``: the gateway's answers ask for
    :data:`BIDIRECTIONAL`); None: the inbound format.
    ``frame_ms``: audio per outbound ``media`` message (20 ms, as RTP).
    """

    carrier: str = CARRIER
    title: str = "Telnyx"
    realtime: bool = True

    def handlers(self) -> Mapping[str, EventHandler]:
        """Telnyx's events (module doc)."""
        return {
            "connected": lambda f: Connected(
                get_str(f, "version", "connected message", default="")
            ),
            "start": self._start,
            "media": lambda f: self.media_event(f, "sequence_number"),
            "dtmf": self.dtmf_event,
            "mark": self.mark_event,
            "error": _error,
            "stop": self.stop_event,
        }

    @property
    def call_control_id(self) -> str:
        """The stream's ``call_control_id`` (after ``start``)."""
        return self.call_id

    def _start(self, frame: dict[str, Any]) -> Started:
        where = "start message"
        start = get_object(frame, "start", where)
        fmt_obj = get_object(start, "media_format", where)
        rate = get_int(fmt_obj, "sample_rate", where)  # missing: 8000; 0 is unsupported
        fmt = media_format(get_str(fmt_obj, "encoding", where), 8000 if rate is None else rate)
        channels = get_int(fmt_obj, "channels", where)
        if channels is not None and channels != 1:
            raise UnsupportedMediaFormat(f"Unsupported Telnyx audio: {channels} channels")
        stream_id = get_str(frame, "stream_id", where, default="") or get_str(
            start, "stream_id", where, default=""
        )
        call_control_id = get_str(start, "call_control_id", where)
        if not call_control_id:
            raise ProtocolError(f"Invalid {where}: call_control_id: must not be empty")
        return self.begin_start(start, fmt, call_control_id, stream_id, "user_id")

    # -------------------------------------------------------------- outbound

    def audio_frame(self, fmt: MediaFormat, payload: bytes) -> WireFrame:
        """``{"event":"media","media":{"payload":…}}``."""
        return media_message(payload)

    def mark(self, name: str) -> WireFrame:
        """``{"event":"mark","mark":{"name":…}}``. LocalProtocolError before the start
        (the frames carry no stream id, which may be empty: the format tells)."""
        self.started_format("mark")
        return mark_message(name)

    def clear(self) -> WireFrame:
        """``{"event":"clear"}``. LocalProtocolError before the start."""
        self.started_format("clear")
        return CLEAR


ERROR_FIELD_CHARS: Final[dict[str, int]] = {"code": 64, "title": 128, "detail": 200}
"""How many characters of each field of an ``error`` frame are kept; a longer value is
cut with ``…`` (the frame is kept, so the log line names the carrier's code)."""


def _error(frame: dict[str, Any]) -> CarrierError:
    """Telnyx ``error``: its fields ([unverified] shape) under ``payload`` or ``error``.

    Never raises: each field is a string, a number or anything else (its repr), ``""``
    when missing, cut to :data:`ERROR_FIELD_CHARS` characters (``clipped``, unquoted).
    """
    body = frame.get("payload")
    if not isinstance(body, dict):
        body = frame.get("error")
    if not isinstance(body, dict):
        body = frame
    fields = {key: _error_text(body.get(key), limit) for key, limit in ERROR_FIELD_CHARS.items()}
    return CarrierError(**fields)


def _error_text(value: object, limit: int) -> str:
    """An ``error`` field as text of at most ``limit`` characters (and ``…``): a string as
    is, another value (a number, an object) by its repr; None gives ``""``."""
    if value is None:
        return ""
    return clipped(value if isinstance(value, str) else clipped(value, limit), limit, quote=False)


def media_message(payload: bytes) -> str:
    """``{"event":"media","media":{"payload":<base64>}}`` (pipecat sends no stream_id)."""
    return f'{{"event":"media","media":{{"payload":"{b64(payload)}"}}}}'


def mark_message(name: str) -> str:
    """``{"event":"mark","mark":{"name":…}}``: echoed when the audio before it has played."""
    return json.dumps({"event": "mark", "mark": {"name": name}})


CLEAR: Final = '{"event":"clear"}'
"""Telnyx drops the audio it holds."""


# ------------------------------------------------------------------ answers


def texml(
    stream_url: str,
    *,
    codec: str | None = BIDIRECTIONAL.encoding,
    bidirectional_codec: str = BIDIRECTIONAL.encoding,
    bidirectional_sampling_rate: int = BIDIRECTIONAL.sample_rate,
    status_callback: str | None = None,
) -> str:
    """The TeXML answer that connects the call to the gateway's stream::

        <?xml version="1.0" encoding="UTF-8"?>
        <Response><Connect><Stream url="wss://…" codec="PCMU" bidirectionalMode="rtp"
            bidirectionalCodec="PCMU" bidirectionalSamplingRate="8000"
            statusCallback="https://…" statusCallbackMethod="POST"/></Connect></Response>

    ``status_callback``: where Telnyx POSTs the stream's events (``StreamEvent``
    ``stream-started``/``stream-stopped``/``stream-error``, the TeXML stream webhook,
    https://developers.telnyx.com/api-reference/callbacks/texml-stream); None leaves
    both attributes out. That the ``<Stream>`` verb takes ``statusCallback`` and
    ``statusCallbackMethod`` is read from Telnyx's TeXML ``Streams`` REST resource
    (``status_callback``, ``status_callback_method``: telnyx-ruby
    ``Texml::Accounts::CallStreamsJsonParams``) and TwiML's ``<Stream>``, which TeXML
    follows [unverified for the verb itself: its page was not read].

    ``codec`` sets the inbound codec, PCMU by default: without it Telnyx streams the
    call's own codec (``default``), which for an HD SIP or WebRTC caller is G722, OPUS
    or AMR-WB, a start the gateway refuses (1003). None leaves it out. The
    bidirectional codec is :data:`BIDIRECTIONAL` by default. Raises
    UnsupportedMediaFormat for either codec the gateway cannot take.
    """
    media_format(bidirectional_codec, bidirectional_sampling_rate)  # raises if unsupported
    if codec is not None:
        media_format(codec, 16000 if codec.upper() == "L16" else 8000)
    response = ET.Element("Response")
    stream = ET.SubElement(ET.SubElement(response, "Connect"), "Stream")
    stream.set("url", stream_url)
    if codec is not None:
        stream.set("codec", codec)
    stream.set("bidirectionalMode", "rtp")
    stream.set("bidirectionalCodec", bidirectional_codec)
    stream.set("bidirectionalSamplingRate", str(bidirectional_sampling_rate))
    if status_callback:
        stream.set("statusCallback", status_callback)
        stream.set("statusCallbackMethod", "POST")
    body = ET.tostring(response, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>' + body


def stream_fields(
    stream_url: str,
    *,
    stream_codec: str | None = BIDIRECTIONAL.encoding,
    codec: str = BIDIRECTIONAL.encoding,
    sampling_rate: int = BIDIRECTIONAL.sample_rate,
    auth_token: str | None = None,
) -> dict[str, Any]:
    """The Call Control ``dial``/``answer``/``streaming_start`` fields that open the
    stream (CARRIERS.md "Enable"): ``stream_url``, ``stream_track`` ``inbound_track``,
    ``stream_codec`` (the inbound codec), ``stream_bidirectional_mode`` ``rtp``, its
    codec and sampling rate, and ``stream_auth_token`` when given (sent as is; the
    gateway's stream route does not read it, see :func:`adapters.telnyx.control.dial`).

    ``stream_codec`` is PCMU by default, as :func:`texml`'s ``codec``: left out, Telnyx
    streams the call's own codec (``default``; Telnyx's ``streaming_start``/``dial``
    reference: PCMU, PCMA, G722, OPUS, AMR-WB, L16 or ``default``), which for an HD
    SIP or WebRTC party is G722, OPUS or AMR-WB, a start the gateway refuses (1003).
    None leaves it out. The bidirectional codec is :data:`BIDIRECTIONAL` by default.
    Raises UnsupportedMediaFormat as :func:`texml`."""
    media_format(codec, sampling_rate)
    if stream_codec is not None:
        media_format(stream_codec, 16000 if stream_codec.upper() == "L16" else 8000)
    fields: dict[str, Any] = {
        "stream_url": stream_url,
        "stream_track": "inbound_track",
    }
    if stream_codec is not None:
        fields["stream_codec"] = stream_codec
    fields |= {
        "stream_bidirectional_mode": "rtp",
        "stream_bidirectional_codec": codec,
        "stream_bidirectional_sampling_rate": sampling_rate,
    }
    if auth_token:
        fields["stream_auth_token"] = auth_token
    return fields
