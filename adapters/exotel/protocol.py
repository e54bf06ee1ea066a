"""Exotel Voicebot applet stream, sans I/O: the wire codec.

Spec: shared/specs/CARRIERS.md "Exotel" (Exotel's AgentStream "WebSocket protocol"
and "Stream and Voicebot applet" pages, pipecat's serializer). There is no answer
document: the Voicebot applet is configured in Exotel's App Bazaar with the
gateway's ``wss://`` URL (``?sample-rate=8000|16000|24000``).

Exotel -> gateway (text frames, JSON)::

    {"event":"connected"}
    {"event":"start","sequence_number":"1","stream_sid":"MZ…","start":{"stream_sid",
     "call_sid","account_sid","from","to","custom_parameters":{…},
     "media_format":{"encoding":"audio/x-raw","sample_rate":"8000","bit_rate":"16"}}}
    {"event":"media","sequence_number":"3","stream_sid":"…","media":{"chunk":"2",
     "timestamp":"200","payload":"<base64 PCM16LE>"}}   (with the extension guide's
     ``both`` tracks, ``media.track`` says ``inbound`` or ``outbound``: the bot's own
     voice, not heard; no track: ``inbound``)
    {"event":"dtmf",…,"dtmf":{"digit":"5","duration":"100"}}
    {"event":"mark",…,"mark":{"name":…}}    {"event":"stop",…}

gateway -> Exotel: ``{"event":"media","stream_sid":…,"media":{"payload":…}}`` in
**chunks of a multiple of 320 bytes, 3.2 KB to 100 KB** (Exotel buffers them; the
pieces of one answer back to back, only its end padded: :class:`ExotelCodec`),
``{"event":"mark","stream_sid":…,"mark":{"name":…}}``, ``{"event":"clear",
"stream_sid":…}``. Hang up by closing the socket (the next applet runs).

Audio: raw 16-bit little-endian mono (``audio/x-raw``, "slin"), 8 kHz by default
(16 or 24 kHz by the URL's ``sample-rate``); the beta extension's ``audio/x-mulaw`` is
taken too, at 8 kHz only (G.711: a μ-law start at another rate is refused, 1003). The
rate is the start's own statement (``media_format.sample_rate`` or the encoding's
``;rate=``, which must agree), else the URL's ``sample-rate``, else 8000 Hz
(:func:`start_format`). A start that states a rate other than the URL's ``sample-rate``
is served at the start's rate (the start describes the audio that follows; the URL only
asks for a rate, which the applet may not honour), and the disagreement is told
(:func:`url_disagreement`, :attr:`ExotelCodec.rate_disagreement`: the route logs it at
WARNING), so a misconfigured applet is seen, not guessed at.
Byte order: Exotel's "Working with the Stream and Voicebot Applet"
(https://developer.exotel.com/docs/agentstream/stream-voicebot-applet, "Audio Format")
says "All audio payloads are sent as raw/slin (16-bit, 8kHz, mono PCM little-endian)
encoded in base64", both ways (the bot's media is played as sent). The beta extension
guide (https://developer.exotel.com/docs/agentstream/stream-voicebot-extension) names
``audio/L16;rate=8000|16000`` "Raw linear PCM" without a byte order: taken as the same
little-endian slin [unverified; RFC 3551's L16 is big-endian].
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from gateway.callcodec import (
    Connected,
    EventHandler,
    JsonCarrierCodec,
    MediaFormat,
    Started,
    UnsupportedMediaFormat,
    WireFrame,
    b64,
    get_int,
    get_object,
    get_str,
)
from gateway.protocol import ProtocolError, clipped, media_type
from gateway.speech.audio import Pcm

CARRIER: Final = "exotel"
CHUNK_UNIT: Final = 320
"""Outbound chunks are a multiple of this many bytes."""
MIN_CHUNK: Final = 3200
"""Smallest outbound chunk (bytes): 200 ms of 8 kHz PCM16."""
MAX_CHUNK: Final = 100_000
"""Largest outbound chunk (bytes)."""

_RAW: Final = frozenset({"audio/x-raw", "raw", "slin", "audio/l16", "pcm"})
MULAW: Final = "audio/x-mulaw"
RAW_RATES: Final = (8000, 16000, 24000)
"""Sample rates (Hz) of Exotel's raw/slin audio: the stream URL's ``sample-rate`` (and
the extension's ``audio/L16;rate=8000|16000``)."""
MULAW_RATE: Final = 8000
"""The one sample rate (Hz) of the extension's ``audio/x-mulaw;rate=8000`` (G.711)."""


def media_format(encoding: str, sample_rate: int) -> MediaFormat:
    """The wire format of an Exotel ``media_format.encoding`` at ``sample_rate`` Hz.

    ``audio/x-raw`` (slin) is 16-bit little-endian (module doc: Exotel's words; its
    extension's ``audio/L16`` too, [unverified]) at :data:`RAW_RATES`;
    ``audio/x-mulaw`` G.711 μ-law at :data:`MULAW_RATE` only (CARRIERS.md "Exotel",
    "Audio"). Raises UnsupportedMediaFormat for another encoding or rate (μ-law at any
    rate but 8000 Hz, raw at any but 8000, 16000 or 24000 Hz, too).
    """
    kind = media_type(encoding)
    if kind in _RAW:
        if sample_rate not in RAW_RATES:
            raise UnsupportedMediaFormat(
                f"Unsupported sample rate {clipped(sample_rate)} Hz of Exotel's raw audio: "
                "expected " + ", ".join(map(str, RAW_RATES[:-1])) + f" or {RAW_RATES[-1]}"
            )
        return MediaFormat("L16", sample_rate)
    if kind == MULAW:
        if sample_rate != MULAW_RATE:
            raise UnsupportedMediaFormat(
                f"Unsupported sample rate {clipped(sample_rate)} Hz of Exotel's {MULAW}: "
                f"expected {MULAW_RATE}"
            )
        return MediaFormat("PCMU", sample_rate)
    raise UnsupportedMediaFormat(
        f"Unsupported Exotel encoding {encoding[:80]!r}: expected audio/x-raw or audio/x-mulaw"
    )


def stated_rate(encoding: str) -> int | None:
    """The ``rate`` parameter of an Exotel ``media_format.encoding`` (the extension's
    ``audio/L16;rate=16000``, ``audio/x-mulaw;rate=8000``) in Hz; None without one.

    Parameter names are case-insensitive, a value may be quoted (RFC 9110 section 5.6.6).
    Raises UnsupportedMediaFormat for a rate that is no whole number of Hz, or stated
    twice differently.
    """
    rates: set[int] = set()
    for param in encoding.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() != "rate":
            continue
        digits = value.strip().strip('"')
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
            raise UnsupportedMediaFormat(
                f"Unsupported Exotel encoding {clipped(encoding)}: its rate is no "
                "whole number of Hz"
            )
        rates.add(int(digits))
    if len(rates) > 1:
        raise UnsupportedMediaFormat(
            f"Unsupported Exotel encoding {clipped(encoding)}: it states two rates"
        )
    return rates.pop() if rates else None


def url_rate(value: str | None) -> int | None:
    """The stream URL's ``sample-rate`` query parameter (``8000|16000|24000``, CARRIERS.md
    "Exotel": the rate the applet streams raw/slin at) in Hz; None when the URL has none.

    Raises UnsupportedMediaFormat for a value that is no whole number of Hz (the rate
    itself is checked by :func:`media_format`).
    """
    if value is None:
        return None
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
        raise UnsupportedMediaFormat(
            f"Unsupported sample-rate {clipped(value)} of the Exotel stream URL: expected "
            + ", ".join(map(str, RAW_RATES[:-1]))
            + f" or {RAW_RATES[-1]}"
        )
    return int(digits)


def start_format(
    encoding: str, sample_rate: int | None, url_sample_rate: str | None = None
) -> MediaFormat:
    """The wire format of a start's ``media_format`` (``encoding``, ``sample_rate`` Hz or
    None when missing) on a stream whose URL has ``sample-rate=url_sample_rate`` (or None).

    The rate is the start's own statement: ``sample_rate``, or the encoding's ``rate``
    parameter (:func:`stated_rate`); both must agree. Without either, the URL's
    ``sample-rate`` (what the applet was told to stream at), else 8000 Hz (Exotel's
    default). Raises UnsupportedMediaFormat (the call engine closes the stream 1003) for a
    rate or encoding :func:`media_format` refuses, or a ``sample_rate`` and ``rate``
    parameter that disagree.
    """
    named = stated_rate(encoding)
    if sample_rate is not None:
        fmt = media_format(encoding, sample_rate)
        if named is not None and named != sample_rate:
            media_format(encoding, named)  # an unsupported rate is named as such first
            raise UnsupportedMediaFormat(
                f"Exotel's start disagrees on its sample rate: media_format.sample_rate "
                f"{sample_rate} Hz, encoding {clipped(encoding)}"
            )
        return fmt
    if named is not None:
        return media_format(encoding, named)
    from_url = url_rate(url_sample_rate)
    return media_format(encoding, 8000 if from_url is None else from_url)


def url_disagreement(served_rate: int, url_sample_rate: str | None) -> str | None:
    """What to tell of a start that stated its rate (``served_rate`` Hz, the call's) on a
    stream whose URL has ``sample-rate=url_sample_rate``: None when the URL has none or
    the same rate; else a sentence naming both rates, the one the call is served at (the
    start's) and what to fix (the applet's URL, or the rate of the audio it streams). A URL
    value that is no rate (:func:`url_rate` refuses it) is named as such. Never raises."""
    if url_sample_rate is None:
        return None
    try:
        asked = url_rate(url_sample_rate)
    except UnsupportedMediaFormat:
        asked = None
    if asked == served_rate:
        return None
    named = f"{asked} Hz" if asked is not None else f"{clipped(url_sample_rate)}, no rate"
    return (
        f"the stream URL's sample-rate ({named}) disagrees with the start's "
        f"media_format ({served_rate} Hz): served at the start's {served_rate} Hz; "
        "if the caller is not understood or sounds too fast or slow, make the Voicebot "
        "applet's URL sample-rate and its stream's rate the same"
    )


def _check_chunk(chunk_bytes: int) -> None:
    """Raises ValueError for a ``chunk_bytes`` outside Exotel's chunk rule."""
    if chunk_bytes % CHUNK_UNIT or not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
        raise ValueError(
            f"an Exotel chunk is a multiple of {CHUNK_UNIT} bytes from {MIN_CHUNK} to "
            f"{MAX_CHUNK}, not {chunk_bytes}"
        )


def whole_chunks(audio: bytes, chunk_bytes: int) -> tuple[list[bytes], bytes]:
    """``audio`` as the chunks it fills without padding, and the rest.

    The chunks are ``chunk_bytes`` long but the last, which is at least
    :data:`MIN_CHUNK` (what is short of it joins the one before, or borrows from it
    when both would outgrow :data:`MAX_CHUNK`); all are multiples of
    :data:`CHUNK_UNIT`. The rest is shorter than :data:`CHUNK_UNIT`, or all of
    ``audio`` when it is shorter than :data:`MIN_CHUNK`. Raises ValueError for a
    ``chunk_bytes`` outside the rule."""
    _check_chunk(chunk_bytes)
    whole = len(audio) // CHUNK_UNIT * CHUNK_UNIT
    if whole < MIN_CHUNK:
        return [], audio
    body = audio[:whole]
    out = [body[i : i + chunk_bytes] for i in range(0, whole, chunk_bytes)]
    if len(out) > 1 and len(out[-1]) < MIN_CHUNK:
        short = len(out[-1])
        if chunk_bytes + short <= MAX_CHUNK:
            out[-2:] = [out[-2] + out[-1]]
        else:  # the one before gives what the last lacks (it stays >= MIN_CHUNK)
            cut = whole - MIN_CHUNK
            out[-2:] = [body[whole - short - chunk_bytes : cut], body[cut:]]
    return out, audio[whole:]


def chunks(audio: bytes, chunk_bytes: int, silence: bytes) -> list[bytes]:
    """``audio`` cut into chunks of ``chunk_bytes``; the last one padded with
    ``silence`` to a multiple of :data:`CHUNK_UNIT` and at least :data:`MIN_CHUNK`
    (Exotel's rule). Raises ValueError for a ``chunk_bytes`` outside the rule."""
    _check_chunk(chunk_bytes)
    out = [audio[i : i + chunk_bytes] for i in range(0, len(audio), chunk_bytes)]
    if out:
        tail = out[-1]
        size = max(MIN_CHUNK, -(-len(tail) // CHUNK_UNIT) * CHUNK_UNIT)
        out[-1] = tail + silence * ((size - len(tail)) // len(silence))
    return out


class ExotelCodec(JsonCarrierCodec):
    """One Exotel Voicebot stream (see the module doc); a
    :class:`~gateway.callcodec.CarrierCodec` and a
    :class:`~gateway.callcodec.ChunkingCodec`.

    ``chunk_ms``: audio per outbound ``media`` message (200 ms: 3200 bytes at 8 kHz,
    the smallest chunk Exotel takes); the byte size is rounded to the chunk rule.
    ``url_sample_rate``: the stream URL's ``sample-rate`` (:func:`start_format`).

    The call engine sends each piece of an answer with :meth:`carry` (whole chunks; the
    rest, under 320 bytes, or all of what is held when under 3.2 KB, held back for the
    next piece's first chunk) and :meth:`flush` at the end of the turn's audio (the rest
    padded to 3.2 KB): only the answer's end is padded, not each piece's (which put up
    to 200 ms of silence, 400 ms in μ-law, between its sentences).
    """

    carrier: str = CARRIER
    title: str = "Exotel"
    realtime: bool = False

    def __init__(self, chunk_ms: int = 200, url_sample_rate: str | None = None) -> None:
        super().__init__(frame_ms=0)
        self.chunk_ms = chunk_ms
        self.url_sample_rate = url_sample_rate
        """The stream URL's ``sample-rate`` query parameter as sent (None: the URL has
        none): the rate of a start that states none itself (:func:`start_format`)."""
        self.rate_disagreement: str | None = None
        """Set by a start that states a rate other than :attr:`url_sample_rate`
        (:func:`url_disagreement`'s sentence; the call is served at the start's rate);
        None otherwise. The route logs it."""
        self.held = b""
        """Wire audio held back by :meth:`carry` (less than a chunk), sent by the next
        :meth:`carry` or :meth:`flush`, dropped by :meth:`clear`."""
        self.sent_bytes = 0
        """Wire audio sent by :meth:`carry` and :meth:`flush` (padding included)."""

    def handlers(self) -> Mapping[str, EventHandler]:
        """Exotel's events (module doc)."""
        return {
            "connected": lambda f: Connected(),
            "start": self._start,
            "media": lambda f: self.media_event(f, "sequence_number"),
            "dtmf": lambda f: self.dtmf_event(f, duration=True),
            "mark": self.mark_event,
            "stop": self.stop_event,
        }

    @property
    def chunk_bytes(self) -> int:
        """Bytes per outbound chunk: :attr:`chunk_ms` of the format, by the chunk rule."""
        size = self.started_format("chunk size").bytes_for_ms(self.chunk_ms)
        size = size // CHUNK_UNIT * CHUNK_UNIT
        return min(max(size, MIN_CHUNK), MAX_CHUNK // CHUNK_UNIT * CHUNK_UNIT)

    def _start(self, frame: dict[str, Any]) -> Started:
        where = "start message"
        start = get_object(frame, "start", where)
        fmt_obj = get_object(start, "media_format", where)
        bits = get_int(fmt_obj, "bit_rate", where)
        encoding = get_str(fmt_obj, "encoding", where, default="audio/x-raw")
        sample_rate = get_int(fmt_obj, "sample_rate", where)  # 0 is unsupported
        fmt = start_format(encoding, sample_rate, self.url_sample_rate)
        if fmt.encoding == "L16" and bits not in (None, 16):
            raise UnsupportedMediaFormat(f"Unsupported Exotel audio: {bits}-bit samples")
        if sample_rate is not None or stated_rate(encoding) is not None:
            self.rate_disagreement = url_disagreement(fmt.sample_rate, self.url_sample_rate)
        call_sid = get_str(start, "call_sid", where)
        stream_sid = get_str(start, "stream_sid", where, default="") or get_str(
            frame, "stream_sid", where
        )
        if not call_sid or not stream_sid:
            raise ProtocolError(f"Invalid {where}: call_sid and stream_sid must not be empty")
        return self.begin_start(start, fmt, call_sid, stream_sid, "account_sid")

    def audio(self, pcm: Pcm) -> list[WireFrame]:
        """``pcm`` as ``media`` messages by Exotel's chunk rule (the stream's format), the
        last padded: :meth:`carry` then :meth:`flush`."""
        carried, _ = self.carry(pcm)
        flushed, _ = self.flush()
        return carried + flushed

    def carry(self, pcm: Pcm) -> tuple[list[WireFrame], int]:
        """The audio :attr:`held` back, then ``pcm``, as ``media`` messages of the whole
        chunks they fill (:func:`whole_chunks`), and their ms; the rest is held back.
        LocalProtocolError before the start."""
        fmt = self.started_format("audio")
        out, self.held = whole_chunks(self.held + fmt.encode(pcm), self.chunk_bytes)
        return self._sent(fmt, out)

    def flush(self) -> tuple[list[WireFrame], int]:
        """The audio :attr:`held` back as one ``media`` message, padded with silence to
        the chunk rule (:func:`chunks`), and its ms, padding included; ``([], 0)`` when
        nothing is held."""
        if not self.held:
            return [], 0
        fmt = self.started_format("audio")
        out, self.held = chunks(self.held, self.chunk_bytes, fmt.silence), b""
        return self._sent(fmt, out)

    def _sent(self, fmt: MediaFormat, payloads: list[bytes]) -> tuple[list[WireFrame], int]:
        """``payloads`` as ``media`` messages, and their ms: the whole ms of all audio sent
        so far less those before them (no rounding drift at 24 kHz, where a unit of 320
        bytes is 6.67 ms)."""
        before = self.sent_bytes
        self.sent_bytes += sum(map(len, payloads))
        ms = int(fmt.duration_ms(self.sent_bytes)) - int(fmt.duration_ms(before))
        return [self.audio_frame(fmt, payload) for payload in payloads], ms

    def audio_frame(self, fmt: MediaFormat, payload: bytes) -> WireFrame:
        """``{"event":"media","stream_sid":…,"media":{"payload":…}}``."""
        return media_message(self.stream_id, payload)

    def mark(self, name: str) -> WireFrame:
        """``{"event":"mark","stream_sid":…,"mark":{"name":…}}``."""
        return mark_message(self.started_stream("mark"), name)

    def clear(self) -> WireFrame:
        """``{"event":"clear","stream_sid":…}``; the audio :attr:`held` back is dropped
        with what Exotel holds."""
        frame = clear_message(self.started_stream("clear"))
        self.held = b""
        return frame


def media_message(stream_sid: str, payload: bytes) -> str:
    """``{"event":"media","stream_sid":…,"media":{"payload":<base64>}}``."""
    return (
        f'{{"event":"media","stream_sid":{json.dumps(stream_sid)},'
        f'"media":{{"payload":"{b64(payload)}"}}}}'
    )


def mark_message(stream_sid: str, name: str) -> str:
    """``{"event":"mark","stream_sid":…,"mark":{"name":…}}``."""
    return json.dumps({"event": "mark", "stream_sid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """``{"event":"clear","stream_sid":…}``."""
    return json.dumps({"event": "clear", "stream_sid": stream_sid})
