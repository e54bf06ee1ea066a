"""Plivo Audio Streams, sans I/O: the wire codec and the answer XML.

Spec: shared/specs/CARRIERS.md "Plivo Audio Streams" (Plivo's stream SDK types,
pipecat's serializer, plivo-python ``StreamElement``).

Plivo -> gateway (text frames, JSON)::

    {"event":"start","sequenceNumber":0,"start":{"callId","streamId","accountId",
     "tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}},
     "extra_headers":"<json string>"}
    {"event":"media","sequenceNumber":n,"streamId":"…","media":{"track":"inbound",
     "timestamp":"<ms>","chunk":1,"payload":"<base64>"}}
    {"event":"dtmf",…,"dtmf":{"track":"inbound","digit":"5","timestamp":"…"}}
    {"event":"playedStream",…,"name":"<checkpoint>"}   {"event":"clearedAudio",…}
    {"event":"stop",…}

gateway -> Plivo: ``{"event":"playAudio","media":{"contentType":"audio/x-mulaw",
"sampleRate":8000,"payload":…},"streamId":…}``, ``{"event":"checkpoint","streamId":…,
"name":…}`` (answered by ``playedStream``), ``{"event":"clearAudio","streamId":…}``
(answered by ``clearedAudio``). Plivo queues ``playAudio`` and plays it in order.

Encodings: ``audio/x-mulaw`` at 8 kHz and ``audio/x-l16`` at 8/16 kHz (taken as
little-endian: [unverified], as pipecat sends it).

``extraHeaders``: Plivo's ``<Stream>`` reference
(https://docs.plivo.com/docs/voice/xml/audiostream, "extraHeaders (string)") allows
"Key-value pairs … Example: test1=12,test2=123 Max length: 512 bytes. Only characters
[A-Z], [a-z], [0-9] allowed." (its Audio Streaming protocol reference,
https://www.plivo.com/docs/voice-agents/audio-streaming/concepts/audio-streaming-reference,
shows them back in ``start`` as ``"extra_headers": "userId=12345;sessionId=abc-xyz"``).
What Plivo does with another character (drops it, drops the pair, refuses the XML) is
[unverified]: so the gateway sends only letters and digits. A value that is not
letters and digits only (a ``+E.164`` number, a SIP URI, an app key with ``-`` or
``.``) goes as ``<key>B32=<its UTF-8 in base32, RFC 4648, without padding>``
(:func:`extra_headers_attribute`), decoded back under ``<key>`` on the stream's start
(:func:`extra_headers`).
"""

from __future__ import annotations

import base64
import binascii
import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Final

from gateway.callcodec import (
    Cleared,
    EventHandler,
    JsonCarrierCodec,
    MediaFormat,
    Played,
    Started,
    UnsupportedMediaFormat,
    WireFrame,
    b64,
    bounded_params,
    get_int,
    get_object,
    get_params,
    get_str,
)
from gateway.protocol import ProtocolError, clipped, load_json, media_type

CARRIER: Final = "plivo"
MULAW: Final = "audio/x-mulaw"
L16: Final = "audio/x-l16"
MULAW_RATE: Final = 8000
"""The one rate (Hz) of Plivo's μ-law (``audio/x-mulaw;rate=8000``)."""
L16_RATES: Final = (8000, 16000)
"""The rates (Hz) of Plivo's L16 (``audio/x-l16;rate=8000|16000``)."""
MAX_EXTRA_HEADERS_BYTES: Final = 512
"""The longest ``extraHeaders`` attribute Plivo takes (bytes; its ``<Stream>`` reference)."""
ENCODED_SUFFIX: Final = "B32"
"""The suffix of an ``extraHeaders`` key whose value is base32 (module doc)."""


def media_format(content_type: str, sample_rate: int) -> MediaFormat:
    """The wire format of a Plivo content type (``audio/x-mulaw`` or ``audio/x-l16``).

    A ``;rate=`` suffix is ignored (``sample_rate`` rules). Plivo's formats are
    ``audio/x-mulaw;rate=8000`` and ``audio/x-l16;rate=8000|16000`` (CARRIERS.md "Plivo
    Audio Streams"). Raises UnsupportedMediaFormat for another type or rate (μ-law at
    any rate but 8000 Hz, L16 at any but 8000 or 16000 Hz, too).
    """
    kind = media_type(content_type)
    if kind == MULAW:
        if sample_rate != MULAW_RATE:
            raise UnsupportedMediaFormat(
                f"Unsupported sample rate {sample_rate} Hz of Plivo's {MULAW}: "
                f"expected {MULAW_RATE}"
            )
        return MediaFormat("PCMU", sample_rate)
    if kind == L16:
        if sample_rate not in L16_RATES:
            raise UnsupportedMediaFormat(
                f"Unsupported sample rate {sample_rate} Hz of Plivo's {L16}: "
                f"expected {' or '.join(map(str, L16_RATES))}"
            )
        return MediaFormat("L16", sample_rate)
    raise UnsupportedMediaFormat(
        f"Unsupported Plivo encoding {content_type[:80]!r}: expected {MULAW} or {L16}"
    )


def content_type(fmt: MediaFormat) -> str:
    """Plivo's name of ``fmt``'s encoding (``audio/x-mulaw`` or ``audio/x-l16``)."""
    if fmt.encoding == "PCMU":
        return MULAW
    if fmt.encoding == "L16" and not fmt.big_endian:
        return L16
    raise UnsupportedMediaFormat(f"Plivo streams no {fmt.encoding}")


def _plain(text: str) -> bool:
    """Whether ``text`` is letters and digits (ASCII) only: what Plivo's ``extraHeaders``
    allow (module doc)."""
    return text.isascii() and text.isalnum()


def extra_headers_attribute(headers: Mapping[str, str]) -> str:
    """The ``extraHeaders`` attribute of ``headers``: ``k1=v1,k2=v2`` of letters and digits
    only, as Plivo allows (module doc). A value of letters and digits goes as is; any other
    (empty too) as ``<key>B32=<base32 of its UTF-8, no padding>``, which
    :func:`extra_headers` decodes.

    Raises ValueError for a key that is not letters and digits, or one ending in
    ``B32``, and when the attribute would be longer than :data:`MAX_EXTRA_HEADERS_BYTES`.
    """
    pairs = []
    for key, value in headers.items():
        if not _plain(key) or key.endswith(ENCODED_SUFFIX):
            raise ValueError(f"extraHeaders keys are letters and digits, not *B32: {key!r}")
        if _plain(value):
            pairs.append(f"{key}={value}")
        else:
            encoded = base64.b32encode(value.encode("utf-8")).decode("ascii").rstrip("=")
            pairs.append(f"{key}{ENCODED_SUFFIX}={encoded}")
    attribute = ",".join(pairs)
    if len(attribute) > MAX_EXTRA_HEADERS_BYTES:
        raise ValueError(
            f"extraHeaders would be {len(attribute)} bytes: Plivo takes at most "
            f"{MAX_EXTRA_HEADERS_BYTES}"
        )
    return attribute


def _decoded(headers: dict[str, str], where: str) -> dict[str, str]:
    """``headers`` with each ``<key>B32`` pair decoded to ``<key>`` (module doc). Raises
    ProtocolError naming the key (cut) when its value is no base32 of UTF-8 text."""
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not key.endswith(ENCODED_SUFFIX) or key == ENCODED_SUFFIX:
            out.setdefault(key, value)
            continue
        try:
            padded = value + "=" * (-len(value) % 8)
            text = base64.b32decode(padded, casefold=True).decode("utf-8")
        except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
            name = clipped(key, quote=False)
            raise ProtocolError(f"Invalid {where}: {name} is not base32 of UTF-8 text") from None
        out[key.removesuffix(ENCODED_SUFFIX)] = text
    return out


def extra_headers(value: Any) -> dict[str, str]:
    """``extra_headers`` of ``start``: a JSON object encoded as a string (as the Plivo
    stream SDK types it), an object, or the XML's ``extraHeaders`` pairs: ``k1=v1;k2=v2``
    (as Plivo's Audio Streaming reference shows them in ``start``) or ``k1=v1,k2=v2``
    (as the attribute sets them). A ``<key>B32`` pair is decoded to ``<key>``
    (:func:`extra_headers_attribute`; it wins over a plain ``<key>``).

    Bounded as custom parameters are (gateway/callcodec.py ``params_fault``). Raises
    ProtocolError for anything else, too much, or a ``<key>B32`` value that is not base32
    of UTF-8 text (the text naming ``extra_headers``).
    """
    where = "start message: extra_headers"
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                headers = load_json(text, what="The extra_headers")
            except ProtocolError as exc:  # its own text: "Malformed JSON at character 1…"
                raise ProtocolError(f"Invalid {where}: {exc.text}") from None
            return _decoded(get_params(headers, where), where)
        items = text.replace(";", ",").split(",")
        pairs = [item.split("=", 1) for item in items if item.strip()]
        if all(len(pair) == 2 for pair in pairs):
            found = {key.strip(): val.strip() for key, val in pairs}
            return _decoded(bounded_params(found, where), where)
        raise ProtocolError(f"Invalid {where}: expected a JSON object or k=v pairs")
    return _decoded(get_params(value, where), where)


class PlivoCodec(JsonCarrierCodec):
    """One Plivo stream (see the module doc); a :class:`~gateway.callcodec.CarrierCodec`.

    ``frame_ms``: audio per ``playAudio`` message. ``outbound``: the format played
    back (None: the inbound format).
    """

    carrier: str = CARRIER
    title: str = "Plivo"
    realtime: bool = False

    def handlers(self) -> Mapping[str, EventHandler]:
        """Plivo's events (module doc)."""
        return {
            "start": self._start,
            "media": lambda f: self.media_event(f, "sequenceNumber"),
            "dtmf": self.dtmf_event,
            "playedStream": lambda f: Played(get_str(f, "name", "playedStream message")),
            "clearedAudio": lambda f: Cleared(),
            "stop": self.stop_event,
        }

    def _start(self, frame: dict[str, Any]) -> Started:
        where = "start message"
        start = get_object(frame, "start", where)
        fmt_obj = get_object(start, "mediaFormat", where)
        rate = get_int(fmt_obj, "sampleRate", where)  # missing: 8000; 0 is unsupported
        fmt = media_format(get_str(fmt_obj, "encoding", where), 8000 if rate is None else rate)
        call_id = get_str(start, "callId", where)
        stream_id = get_str(start, "streamId", where)
        if not call_id or not stream_id:
            raise ProtocolError(f"Invalid {where}: callId and streamId must not be empty")
        headers = extra_headers(frame.get("extra_headers"))
        return self.begin(
            Started(
                call_id=call_id,
                stream_id=stream_id,
                media_format=fmt,
                caller=headers.get("from", ""),
                callee=headers.get("to", ""),
                account_id=get_str(start, "accountId", where, default=""),
                parameters=headers,
            )
        )

    def audio_frame(self, fmt: MediaFormat, payload: bytes) -> WireFrame:
        """A ``playAudio`` message of ``payload``."""
        return play_audio_message(self.stream_id, content_type(fmt), fmt.sample_rate, payload)

    def mark(self, name: str) -> WireFrame:
        """``{"event":"checkpoint","streamId":…,"name":…}``."""
        return checkpoint_message(self.started_stream("checkpoint"), name)

    def clear(self) -> WireFrame:
        """``{"event":"clearAudio","streamId":…}``."""
        return clear_audio_message(self.started_stream("clearAudio"))


def play_audio_message(stream_id: str, kind: str, sample_rate: int, payload: bytes) -> str:
    """``{"event":"playAudio","media":{"contentType":…,"sampleRate":…,"payload":…},"streamId":…}``."""
    return (
        '{"event":"playAudio","media":{"contentType":'
        f'{json.dumps(kind)},"sampleRate":{int(sample_rate)},"payload":"{b64(payload)}"}},'
        f'"streamId":{json.dumps(stream_id)}}}'
    )


def checkpoint_message(stream_id: str, name: str) -> str:
    """``{"event":"checkpoint","streamId":…,"name":…}``: answered by ``playedStream``."""
    return json.dumps({"event": "checkpoint", "streamId": stream_id, "name": name})


def clear_audio_message(stream_id: str) -> str:
    """``{"event":"clearAudio","streamId":…}``: answered by ``clearedAudio``."""
    return json.dumps({"event": "clearAudio", "streamId": stream_id})


def answer_xml(
    stream_url: str,
    *,
    content_type: str = "audio/x-mulaw;rate=8000",
    extra: Mapping[str, str] | None = None,
    status_callback_url: str | None = None,
) -> str:
    """The answer URL's XML: stream the call both ways to the gateway::

        <?xml version="1.0" encoding="UTF-8"?><Response><Stream bidirectional="true"
          keepCallAlive="true" contentType="audio/x-mulaw;rate=8000">wss://…</Stream></Response>

    ``extra`` becomes ``extraHeaders="k1=v1,k2=v2"`` (echoed in ``start.extra_headers``),
    letters and digits only (:func:`extra_headers_attribute`: other values base32; a key
    that is not letters and digits, or too long an attribute, is a ValueError).
    """
    response = ET.Element("Response")
    stream = ET.SubElement(response, "Stream")
    stream.set("bidirectional", "true")
    stream.set("keepCallAlive", "true")
    stream.set("contentType", content_type)
    if extra:
        stream.set("extraHeaders", extra_headers_attribute(extra))
    if status_callback_url:
        stream.set("statusCallbackUrl", status_callback_url)
        stream.set("statusCallbackMethod", "POST")
    stream.text = stream_url
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")
