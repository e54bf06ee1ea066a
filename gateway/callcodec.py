"""The carrier-neutral face of a phone call's media stream, sans I/O (issue 14).

Spec: shared/specs/CARRIERS.md ("Comparison summary", "Design hint") and
PROTOCOL-NOTES.md "Twilio Media Streams". Every carrier streams a call's audio over
one WebSocket in a shape close to Twilio's; what differs is the wire codec. A
:class:`CarrierCodec` turns one carrier's inbound frames into :data:`CallEvent` s and
the call engine's outputs (audio, marks, clear) into that carrier's frames, so one
call engine (barge-in, marks, DTMF, pacing, hang-up after the last word) can drive
any carrier. Carriers' codecs live in ``adapters/<carrier>/protocol.py``.

What a codec must allow (CARRIERS.md "Design hint"):

- **text and binary frames**: :data:`WireFrame` is ``str`` (a text frame) or
  ``bytes`` (a binary frame); :meth:`CarrierCodec.receive_text` and
  :meth:`CarrierCodec.receive_binary` take either (Vonage sends binary audio after
  a first text frame);
- **handshakes**: a carrier's opening message (Twilio/Telnyx/Exotel ``connected``)
  is a :class:`Connected`; the message that names the call and its media format
  (``start``, or Vonage's ``websocket:connected``) is a :class:`Started`, after which
  :attr:`CarrierCodec.media_format` is known. Both carry ``reply``: frames the
  engine sends at once in answer (empty for the carriers here; a protocol such as
  Genesys AudioHook answers ``open`` with ``opened``);
- **pacing**: :attr:`CarrierCodec.realtime` True means the sender must pace the
  audio frames at real time (the carrier plays what arrives and its queue is
  small or unknown); False means the carrier buffers what it is sent and plays it
  in order, so frames may go out as fast as they are made.
  :attr:`CarrierCodec.max_queued` is the carrier's documented queue limit in
  messages (Vonage: 3072), None when unknown.

**Audio inside the gateway is 16-bit signed little-endian PCM** (:class:`Pcm`, with
its rate); :class:`MediaFormat` converts to and from the wire's G.711 μ-law
(``PCMU``), A-law (``PCMA``) or 16-bit linear (``L16``, little- or big-endian).

Bad input raises :class:`~gateway.protocol.ProtocolError` with a text naming the
frame and field (:class:`UnsupportedMediaFormat` for a media format the gateway
cannot take: the engine closes with 1003 then). Using a codec in the wrong order
(audio out before the call started) is our bug: LocalProtocolError.

:class:`JsonCarrierCodec` holds what the JSON carriers' codecs share (Telnyx, Plivo,
Exotel, Vonage): the format state, the ``event`` -> handler table, the common
``media``/``dtmf``/``mark``/``stop`` messages and the outbound framing; each carrier
gives only its wire specifics.

Request verification (webhooks, WebSocket upgrades) refuses with
:class:`VerificationRefused`, whose ``status`` the routes answer with.

This module is pure: standard library, ``audioop`` and the pure gateway modules
(tests/test_protocol_purity.py's rules apply).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

from gateway.protocol import LocalProtocolError, ProtocolError, clipped, integer, load_json
from gateway.speech.audio import SUPPORTED_RATES, AudioFormatError, Pcm, audioop, resample

__all__ = [
    "CALL_PARAMETERS",
    "DTMF_DIGITS",
    "MAX_PARAMS",
    "MAX_PARAMS_CHARS",
    "MAX_PARAM_NAME_CHARS",
    "MAX_PARAM_VALUE_CHARS",
    "CallEvent",
    "CarrierCodec",
    "CarrierError",
    "ChunkingCodec",
    "Cleared",
    "Connected",
    "Digit",
    "EventHandler",
    "InvalidStart",
    "JsonCarrierCodec",
    "Media",
    "MediaFormat",
    "Played",
    "Started",
    "Stopped",
    "UnsupportedMediaFormat",
    "VerificationRefused",
    "WireEncoding",
    "WireFrame",
]

WireFrame: TypeAlias = str | bytes
"""One WebSocket message: ``str`` is a text frame, ``bytes`` a binary frame."""

WireEncoding: TypeAlias = Literal["PCMU", "PCMA", "L16"]
"""G.711 μ-law, G.711 A-law (one byte per sample), 16-bit linear PCM (two bytes)."""

DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")
"""The keys a caller can press (A-D on some phones)."""

MAX_MEDIA_MS: Final = 2000
"""Longest inbound audio message accepted (carriers send 20 ms to a few hundred ms)."""

_SILENCE: Final[dict[str, bytes]] = {"PCMU": b"\xff", "PCMA": b"\xd5", "L16": b"\x00\x00"}


class UnsupportedMediaFormat(ProtocolError):
    """A stream whose media format the gateway cannot take (encoding, rate, channels).

    The call engine closes the stream with 1003 (unsupported data) for it.
    """


class InvalidStart(ProtocolError):
    """The message that would start the stream (``start``; Vonage's
    ``websocket:connected``) cannot be read: no call can be served on the stream. The
    call engine closes it with 1008 at once, the reason this text."""


class VerificationRefused(Exception):
    """A carrier request (webhook, WebSocket upgrade) that must be refused.

    ``reason`` says why (for the log, and the problem body's ``detail``); ``status``
    is the HTTP status to answer with: 401 when the credentials are missing
    (unsigned) or, for a bearer token, invalid (RFC 6750 section 3.1); 403 when they
    are present but wrong, forged or expired (a carrier's own signature scheme), or
    valid but not for this resource. ``challenge`` is the ``WWW-Authenticate`` value
    the answer carries: required on every 401 (RFC 9110 section 11.6.1), the scheme
    of the credentials the carrier sends; on a 403 only where the scheme defines one
    (RFC 6750 ``error="insufficient_scope"``).
    """

    def __init__(self, reason: str, *, status: int = 403, challenge: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.challenge = challenge

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the answer: ``WWW-Authenticate`` when there is a ``challenge``."""
        if self.challenge is not None:
            return {"WWW-Authenticate": self.challenge}
        return {}


# ------------------------------------------------------------------ signed webhooks' retries

RETRY_WINDOW_S: Final = 60
"""How long (s) after a signed answer webhook's first request the same request again (the
same signature, method, path, query and body) is taken for the carrier's retry of a webhook
whose answer it did not get (timed out, the connection lost) and answered again, the same
(:func:`gateway.io.call.use_signature_for_request`). Vonage retries an answer webhook
twice, then its fallback answer URL twice, each attempt given 3 s to connect and 5 s to
answer (Vonage Voice API "Troubleshooting", "Timeouts"): 32 s at most; Telnyx retries a
webhook its URL did not answer within its ``webhook_timeout_seconds`` (Telnyx "Receiving
Webhooks": duplicate webhooks), then its failover URL; Plivo's retries [unverified: no
page found on whether Plivo sends the same answer request again before its fallback URL]
are taken to come as soon. Later, the same request is a replay (a captured request sent
again) and refused."""


def request_key(method: str, path: str, query: str, body: bytes) -> str:
    """The hex SHA-256 naming the request a signature came with: its ``method``
    (upper-cased), ``path``, raw ``query`` string (as sent: a retry sends the same URL) and
    ``body``, each length-prefixed (no two requests share a key by shifting bytes between
    parts). What a signature does not sign (a Vonage JWT: the query and the method) is
    bound to it so."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), query.encode(), bytes(body)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def stream_nonce(key: str) -> str:
    """The one-time id (hex, 16 characters) of the stream token the answer to the signed
    webhook whose replay ``key`` is given carries (``CallTokens.issue(nonce=)``): the same
    for the first request and its retries, so that one stream of the call is admitted
    however many times it is answered."""
    return hashlib.sha256(f"stream:{key}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------ media format


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """The audio format on a carrier's wire: ``encoding``, ``sample_rate`` Hz, mono.

    ``big_endian`` applies to ``L16`` (Telnyx sends network byte order, RFC 2586;
    Vonage, Plivo and Exotel little-endian). Raises UnsupportedMediaFormat for an
    unknown encoding, a rate outside :data:`~gateway.speech.audio.SUPPORTED_RATES`
    or other than one channel.
    """

    encoding: WireEncoding
    sample_rate: int
    big_endian: bool = False
    channels: int = 1

    def __post_init__(self) -> None:
        if self.encoding not in _SILENCE:
            raise UnsupportedMediaFormat(
                f"Unsupported audio encoding {clipped(self.encoding)}: expected PCMU, PCMA or L16"
            )
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or rate not in SUPPORTED_RATES:
            raise UnsupportedMediaFormat(
                f"Unsupported sample rate {clipped(rate)} Hz for {self.encoding}: expected one of "
                + ", ".join(map(str, SUPPORTED_RATES))
            )
        if self.channels != 1:
            raise UnsupportedMediaFormat(f"Unsupported audio: {self.channels} channels, not mono")

    @property
    def sample_width(self) -> int:
        """Bytes per sample: 2 for L16, 1 for G.711."""
        return 2 if self.encoding == "L16" else 1

    def bytes_for_ms(self, ms: int) -> int:
        """Bytes of ``ms`` milliseconds of audio in this format."""
        return self.sample_rate * ms // 1000 * self.sample_width

    def duration_ms(self, n_bytes: int) -> float:
        """Milliseconds of audio in ``n_bytes`` bytes of this format."""
        return n_bytes / self.sample_width * 1000 / self.sample_rate

    @property
    def silence(self) -> bytes:
        """One sample of silence in this encoding (0xFF μ-law, 0xD5 A-law, 0 linear)."""
        return _SILENCE[self.encoding]

    def decode(self, payload: bytes, what: str = "media payload") -> Pcm:
        """The wire bytes ``payload`` as PCM at :attr:`sample_rate`.

        Raises ProtocolError (naming ``what``) for L16 of an odd length or audio
        longer than :data:`MAX_MEDIA_MS`.
        """
        if len(payload) > self.bytes_for_ms(MAX_MEDIA_MS):
            raise ProtocolError(
                f"Invalid {what}: {len(payload)} bytes is more than {MAX_MEDIA_MS} ms "
                f"of {self.encoding} at {self.sample_rate} Hz"
            )
        if self.encoding == "PCMU":
            return Pcm(audioop.ulaw2lin(payload, 2), self.sample_rate)
        if self.encoding == "PCMA":
            return Pcm(audioop.alaw2lin(payload, 2), self.sample_rate)
        if len(payload) % 2:
            raise ProtocolError(
                f"Invalid {what}: {len(payload)} bytes is not a whole number of 16-bit samples"
            )
        data = audioop.byteswap(payload, 2) if self.big_endian else bytes(payload)
        return Pcm(data, self.sample_rate)

    def encode(self, pcm: Pcm) -> bytes:
        """``pcm`` (any supported rate) in this format: resampled, then encoded."""
        data = resample(pcm, self.sample_rate).data
        if self.encoding == "PCMU":
            return audioop.lin2ulaw(data, 2)
        if self.encoding == "PCMA":
            return audioop.lin2alaw(data, 2)
        return audioop.byteswap(data, 2) if self.big_endian else data

    def frames(self, audio: bytes, frame_ms: int) -> list[bytes]:
        """Wire bytes ``audio`` cut into frames of ``frame_ms`` ms, the last one padded
        with silence. Raises AudioFormatError if a frame is not whole samples."""
        size = self.bytes_for_ms(frame_ms)
        if size <= 0 or self.sample_rate * frame_ms % 1000:
            raise AudioFormatError(f"{frame_ms} ms at {self.sample_rate} Hz is not whole samples")
        out = [audio[i : i + size] for i in range(0, len(audio), size)]
        if out and len(out[-1]) < size:
            tail = out[-1]
            out[-1] = tail + self.silence * ((size - len(tail)) // self.sample_width)
        return out


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Connected:
    """The carrier's opening message (``connected``): nothing is known yet.

    ``reply``: frames to send in answer, in order (see the module doc).
    """

    version: str = ""
    reply: tuple[WireFrame, ...] = ()


@dataclass(frozen=True, slots=True)
class Started:
    """The stream's call: who, which stream, what audio.

    ``call_id`` is the carrier's call identifier (Twilio ``callSid``, Telnyx
    ``call_control_id``, Plivo ``callId``, Exotel ``call_sid``; Vonage: the header the
    NCCO set, see adapters/vonage); ``stream_id`` the stream's (empty when the
    carrier has none); ``caller``/``callee`` the numbers when the carrier says them;
    ``parameters`` the custom parameters or headers the answer document set;
    ``reply`` frames to send in answer, in order (see the module doc).
    """

    call_id: str
    stream_id: str
    media_format: MediaFormat
    caller: str = ""
    callee: str = ""
    account_id: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    reply: tuple[WireFrame, ...] = ()


@dataclass(frozen=True, slots=True)
class Media:
    """A chunk of call audio, decoded: ``pcm`` (16-bit LE) at the stream's rate.

    ``track`` is ``inbound`` for the caller's voice (``outbound`` when a carrier
    echoes the gateway's own track); ``timestamp_ms`` the carrier's stream time when
    it gives one; ``sequence`` its message number when it gives one.
    """

    pcm: Pcm
    track: str = "inbound"
    timestamp_ms: int | None = None
    sequence: int | None = None


@dataclass(frozen=True, slots=True)
class Digit:
    """The caller pressed ``digit`` (one of :data:`DTMF_DIGITS`); ``duration_ms`` when known."""

    digit: str
    duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Played:
    """The audio sent before the mark ``name`` has played (or was cleared): Twilio/
    Telnyx/Exotel ``mark``, Plivo ``playedStream``, Vonage ``websocket:notify``."""

    name: str


@dataclass(frozen=True, slots=True)
class Cleared:
    """The carrier acknowledged a clear (Plivo ``clearedAudio``, Vonage ``websocket:cleared``)."""


@dataclass(frozen=True, slots=True)
class Stopped:
    """The stream ended (the call hung up or the stream was stopped)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class CarrierError:
    """The carrier reported an error on the stream (Telnyx ``error``); the call goes on."""

    code: str
    title: str = ""
    detail: str = ""


CallEvent: TypeAlias = (
    Connected | Started | Media | Digit | Played | Cleared | Stopped | CarrierError
)
"""What a codec makes of one inbound frame."""


# ------------------------------------------------------------------ the interface


@runtime_checkable
class CarrierCodec(Protocol):
    """One call's stream codec for one carrier (stateful: it learns the stream's id
    and media format from :class:`Started`).

    Attributes: ``carrier`` (its name, ``"telnyx"``), ``realtime`` (the sender paces
    audio at real time), ``frame_ms`` (audio per outbound frame; 0 when the codec
    sets its own chunk sizes, as Exotel's), ``max_queued`` (the carrier's queue
    limit in messages, None if unknown).
    """

    carrier: str
    realtime: bool
    frame_ms: int
    max_queued: int | None

    @property
    def media_format(self) -> MediaFormat | None:
        """The stream's inbound format once started, else None."""
        ...

    @property
    def outbound_format(self) -> MediaFormat | None:
        """The format the gateway's audio goes out in once started, else None."""
        ...

    def receive_text(self, text: str) -> CallEvent:
        """The event of one inbound text frame. Raises ProtocolError (malformed JSON,
        unknown event, invalid field, media before the start)."""
        ...

    def receive_binary(self, data: bytes) -> CallEvent:
        """The event of one inbound binary frame. Raises ProtocolError where the
        carrier sends no binary frames, or for audio of the wrong size."""
        ...

    def audio(self, pcm: Pcm) -> list[WireFrame]:
        """``pcm`` (any rate) as the frames to send, in order: encoded in
        :attr:`outbound_format` and framed the carrier's way."""
        ...

    def mark(self, name: str) -> WireFrame:
        """A marker the carrier echoes as :class:`Played` once the audio before it played."""
        ...

    def clear(self) -> WireFrame:
        """Drop the audio the carrier holds (barge-in)."""
        ...


@runtime_checkable
class ChunkingCodec(Protocol):
    """What a :class:`CarrierCodec` whose outbound chunks are long (Exotel's: at least
    200 ms) adds so that the pieces of one answer (its sentences, each its own
    :meth:`CarrierCodec.audio`) follow each other without silence between them: the
    call engine (gateway/protocol/call.py ``CarrierCall``) sends each piece with
    :meth:`carry`, which holds back the audio that does not fill a chunk and puts it at
    the head of the next piece's, and :meth:`flush` at the end of the turn's audio,
    which sends it padded with silence by the carrier's rule. The codec's ``clear``
    drops the audio held back (the carrier drops what it holds). Both return the frames
    and the milliseconds of audio in them, padding included: what the carrier plays."""

    def carry(self, pcm: Pcm) -> tuple[list[WireFrame], int]:
        """The audio held back, then ``pcm`` (any rate), as the whole chunks it fills
        (maybe none), and their ms; the rest is held back. LocalProtocolError before
        the start."""
        ...

    def flush(self) -> tuple[list[WireFrame], int]:
        """The audio held back, padded with silence to a chunk (``([], 0)`` when none is
        held), and its ms, padding included."""
        ...


# ------------------------------------------------------------------ JSON helpers


def load_frame(text: str | bytes, carrier: str) -> dict[str, Any]:
    """A text frame's JSON object (through :func:`gateway.protocol.load_json`).

    Raises ProtocolError for malformed JSON or a value that is not an object.
    """
    value = load_json(text, what=f"The {carrier} frame")
    if not isinstance(value, dict):
        raise ProtocolError(f"A {carrier} frame must be a JSON object, not {type(value).__name__}.")
    return value


def get_object(obj: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    """``obj[key]`` as an object; ProtocolError naming ``where`` otherwise."""
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"Invalid {where}: {key}: expected an object")
    return value


def get_str(
    obj: Mapping[str, Any], key: str, where: str, *, default: str | None = None, max_len: int = 256
) -> str:
    """``obj[key]`` as a string (numbers accepted: carriers send ``"8000"`` and ``8000``).

    Missing: ``default``, or ProtocolError when None. Not a string or number, or
    longer than ``max_len``: ProtocolError naming ``where`` and the key.
    """
    value = obj.get(key)
    if value is None:
        if default is None:
            raise ProtocolError(f"Invalid {where}: {key}: field required")
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError(f"Invalid {where}: {key}: expected a string")
    text = str(value)
    if len(text) > max_len:
        raise ProtocolError(f"Invalid {where}: {key}: longer than {max_len} characters")
    return text


def get_int(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    """``obj[key]`` as an int (a decimal string accepted), None when missing.

    Raises ProtocolError for anything else.
    """
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    raise ProtocolError(f"Invalid {where}: {key}: expected an integer")


def get_digit(obj: Mapping[str, Any], where: str) -> str:
    """``obj["digit"]``, one of :data:`DTMF_DIGITS`; ProtocolError otherwise."""
    digit = get_str(obj, "digit", where)
    if digit not in DTMF_DIGITS:
        raise ProtocolError(f"Invalid {where}: digit: expected one of 0-9, *, #, A-D")
    return digit


MAX_PARAMS: Final = 32
"""Most custom parameters (or headers) a stream's start may carry: the gateway's own
answers set up to 7 (Twilio's TwiML), Exotel's applet up to 3."""
MAX_PARAM_NAME_CHARS: Final = 256
"""Longest name of a custom parameter (characters)."""
MAX_PARAM_VALUE_CHARS: Final = 4000
"""Longest value of a custom parameter (characters): an outbound call's ``attributes``
JSON travels in one (gateway/calls.py bounds it to 2000, the call engine reads up to
4000: gateway/protocol/call.py ``MAX_ATTRIBUTES_CHARS``)."""
MAX_PARAMS_CHARS: Final = 8192
"""Most characters of a start's custom parameters, names and values together."""

CALL_PARAMETERS: Final = frozenset(
    {"from", "to", "direction", "answeredBy", "attributes", "resumed"}
)
"""The parameters that say who the call is between and how it came about: the caller and
callee, ``direction`` ``outbound`` with its ``answeredBy`` and ``attributes``, and
``resumed`` (gateway/protocol/call.py ``RESUMED``: a call moved here at shutdown, its
session continued without ``#intro``). The gateway sets them itself where the carrier's
start does not say them (Twilio's TwiML ``<Parameter>`` s, Plivo's ``extraHeaders``,
Vonage's NCCO headers, Telnyx's ``client_state``; Telnyx's ``resumed`` only for a call
marked moved, adapters/telnyx/routes.py); a carrier's free-form ``custom_parameters``
(Telnyx, Exotel: set by whoever configured the stream, beside the start's own
``from``/``to``) never carry them (:meth:`JsonCarrierCodec.begin_start`)."""


_FAULT_NAME_CHARS: Final = 32
"""Characters of a parameter's name in :func:`params_fault`'s text (it becomes a close
reason, at most 123 bytes with the text before it)."""


def params_fault(params: Mapping[str, str]) -> str | None:
    """What is wrong with a start's custom parameters (already strings), or None when
    they are within bounds: at most :data:`MAX_PARAMS` of them, each name at most
    :data:`MAX_PARAM_NAME_CHARS` characters and each value
    :data:`MAX_PARAM_VALUE_CHARS`, :data:`MAX_PARAMS_CHARS` in all. The text names the
    parameter at fault, cut (:func:`~gateway.protocol.clipped`)."""
    if len(params) > MAX_PARAMS:
        return f"more than {MAX_PARAMS} parameters"
    total = 0
    for key, value in params.items():
        if len(key) > MAX_PARAM_NAME_CHARS:
            name = clipped(key, _FAULT_NAME_CHARS, quote=False)
            return f"a name longer than {MAX_PARAM_NAME_CHARS} characters: {name}"
        if len(value) > MAX_PARAM_VALUE_CHARS:
            name = clipped(key, _FAULT_NAME_CHARS, quote=False)
            return f"{name}: longer than {MAX_PARAM_VALUE_CHARS} characters"
        total += len(key) + len(value)
    if total > MAX_PARAMS_CHARS:
        return f"longer than {MAX_PARAMS_CHARS} characters in all"
    return None


def bounded_params(params: dict[str, str], where: str) -> dict[str, str]:
    """``params`` when within :func:`params_fault`'s bounds; ProtocolError naming
    ``where`` and the fault otherwise (a start refused: the call closed 1008)."""
    fault = params_fault(params)
    if fault is not None:
        raise ProtocolError(f"Invalid {where}: {fault}")
    return params


def get_params(value: Any, where: str) -> dict[str, str]:
    """Custom parameters: an object of strings (numbers and booleans as text), within
    :func:`params_fault`'s bounds.

    Raises ProtocolError for a non-object, a nested value (naming its key, cut:
    :func:`~gateway.protocol.clipped`), too many parameters, a name or value too long
    or too many characters in all.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"Invalid {where}: expected an object")
    if len(value) > MAX_PARAMS:  # before converting a flood of them
        raise ProtocolError(f"Invalid {where}: more than {MAX_PARAMS} parameters")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool):
            out[key] = "true" if item else "false"
        elif isinstance(item, str | int | float):
            out[key] = str(item)
        else:
            name = clipped(key, quote=False)  # the peer's: logged, and the close reason
            raise ProtocolError(f"Invalid {where}: {name}: expected a string")
    return bounded_params(out, where)


def b64_payload(obj: Mapping[str, Any], fmt: MediaFormat, where: str) -> bytes:
    """``obj["payload"]`` base64-decoded, bounded by :data:`MAX_MEDIA_MS` of ``fmt``.

    Raises ProtocolError for a missing or non-string payload, one too long, or one
    that is not base64.
    """
    payload = obj.get("payload")
    if not isinstance(payload, str):
        raise ProtocolError(f"Invalid {where}: payload: expected a base64 string")
    if len(payload) > fmt.bytes_for_ms(MAX_MEDIA_MS) * 4 // 3 + 4:
        raise ProtocolError(f"Invalid {where}: payload: more than {MAX_MEDIA_MS} ms of audio")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"Invalid {where}: payload is not base64") from None


def b64(data: bytes) -> str:
    """``data`` in base64 (ASCII text)."""
    return base64.b64encode(data).decode("ascii")


def not_started(carrier: str, what: str) -> LocalProtocolError:
    """The error for asking a codec for ``what`` before its stream started (our bug)."""
    return LocalProtocolError(f"{carrier}: {what} before the stream started")


# ------------------------------------------------------------------ the JSON carriers' base

EventHandler: TypeAlias = Callable[[dict[str, Any]], CallEvent]
"""What a codec makes of one decoded inbound JSON frame (an ``event``'s handler)."""


class JsonCarrierCodec:
    """What the carriers whose stream is JSON text frames share (Telnyx, Plivo, Exotel,
    Vonage): a :class:`CarrierCodec` but for the wire specifics a subclass gives.

    A subclass sets ``carrier`` (``"telnyx"``), ``title`` (``"Telnyx"``, in errors),
    ``realtime`` and ``max_queued``; :meth:`handlers` maps each ``event`` name to its
    handler, in the order the error for an unknown event lists them; it writes
    :meth:`audio_frame` (one outbound frame of wire audio), :meth:`mark` and
    :meth:`clear`. The stream's start handler calls :meth:`begin` with its
    :class:`Started`. ``outbound``: the format played back (None: the inbound one);
    ``frame_ms``: audio per outbound frame.
    """

    carrier: str = ""
    title: str = ""
    realtime: bool = True
    max_queued: int | None = None
    start_event: str = "start"
    """The ``event`` whose handler starts the stream (its :class:`Started`): a
    ProtocolError of it before the stream started is an :class:`InvalidStart`."""

    def __init__(self, outbound: MediaFormat | None = None, frame_ms: int = 20) -> None:
        self.frame_ms = frame_ms
        self._outbound = outbound
        self._format: MediaFormat | None = None
        self.stream_id = ""
        self.call_id = ""
        self._handlers = self.handlers()

    def handlers(self) -> Mapping[str, EventHandler]:
        """``event`` name -> handler of the frame (the subclass's table)."""
        raise NotImplementedError

    @property
    def media_format(self) -> MediaFormat | None:
        """The inbound format (after the stream's start)."""
        return self._format

    @property
    def outbound_format(self) -> MediaFormat | None:
        """The format of the gateway's audio (after the stream's start)."""
        return self._outbound or self._format

    @property
    def events(self) -> str:
        """The known ``event`` names as a list in prose (``a, b or c``)."""
        names = list(self._handlers)
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)

    # -------------------------------------------------------------- inbound

    def receive_text(self, text: str) -> CallEvent:
        """The event of one text frame, by its ``event``'s handler. Raises ProtocolError
        (malformed, unknown event, invalid field, media before the start);
        UnsupportedMediaFormat at the start, InvalidStart for a start (the
        :attr:`start_event`) that cannot be read."""
        frame = load_frame(text, self.title)
        event = frame.get("event")
        handler = self._handlers.get(event) if isinstance(event, str) else None
        if handler is None:
            raise ProtocolError(
                f"Unknown {self.title} event", expected=self.events, got=clipped(event)
            )
        try:
            return handler(frame)
        except UnsupportedMediaFormat:
            raise
        except ProtocolError as exc:
            if event == self.start_event and self._format is None:
                raise InvalidStart(exc.text) from None
            raise

    def receive_binary(self, data: bytes) -> CallEvent:
        """Binary frames are not the carrier's: ProtocolError (Vonage overrides)."""
        raise ProtocolError(f"{self.title} sends text frames only, got a binary frame")

    def begin(self, started: Started) -> Started:
        """Record ``started``'s format, call and stream; returns it.

        Raises ProtocolError when the stream has started already (a second start): the
        first start's format, call and stream are kept, so the call's audio goes on
        being decoded as the first start said (the call engine drops the frame)."""
        if self._format is not None:
            raise ProtocolError(
                f"Unexpected {self.title} start", expected="one start", got="a second one"
            )
        self._format, self.call_id = started.media_format, started.call_id
        self.stream_id = started.stream_id
        return started

    def begin_start(
        self, start: dict[str, Any], fmt: MediaFormat, call_id: str, stream_id: str, account: str
    ) -> Started:
        """:meth:`begin` with the :class:`Started` of a Twilio-shaped ``start`` object:
        ``from``, ``to``, the ``account`` key and ``custom_parameters`` (all optional).

        The custom parameters are bounded (:func:`get_params`); those named in
        :data:`CALL_PARAMETERS` are left out: the caller and callee are the start's own
        ``from`` and ``to`` (a custom ``from`` replaced them), and the direction and an
        outbound call's data are the gateway's (Telnyx's ``client_state``).
        Raises ProtocolError for a bad field."""
        where = "start message"
        params = get_params(start.get("custom_parameters"), "start: custom_parameters")
        return self.begin(
            Started(
                call_id=call_id,
                stream_id=stream_id,
                media_format=fmt,
                caller=get_str(start, "from", where, default=""),
                callee=get_str(start, "to", where, default=""),
                account_id=get_str(start, account, where, default=""),
                parameters={k: v for k, v in params.items() if k not in CALL_PARAMETERS},
            )
        )

    def media_event(self, frame: dict[str, Any], sequence_key: str, *, track: bool = True) -> Media:
        """``{"media":{"payload":<base64>,"track","timestamp"},<sequence_key>:n}`` as
        :class:`Media` (``track`` False: the carrier sends none). Raises ProtocolError
        before the start or for a bad ``media`` or ``payload`` (the audio).

        The other fields are informational (time here is the audio received), read as
        Twilio's are (adapters/twilio/protocol.py): a ``timestamp`` or sequence number
        that is no integer (a fraction, a date, empty) is None, a ``track`` that is not a
        string ``inbound``; none of them drops the caller's audio."""
        where = "media message"
        if self._format is None:
            raise ProtocolError(f"Invalid {where}: media before start")
        media = get_object(frame, "media", where)
        payload = b64_payload(media, self._format, where)
        kind = media.get("track", "inbound") if track else "inbound"
        return Media(
            pcm=self._format.decode(payload, where),
            track=kind if isinstance(kind, str) else "inbound",
            timestamp_ms=integer(media.get("timestamp")),
            sequence=integer(frame.get(sequence_key)),
        )

    @staticmethod
    def dtmf_event(frame: dict[str, Any], *, duration: bool = False) -> Digit:
        """``{"dtmf":{"digit":…[,"duration":ms]}}`` as :class:`Digit` (``duration``
        read when the carrier sends it). Raises ProtocolError for a bad ``dtmf`` or
        ``digit``; a ``duration`` that is no integer (informational, as Vonage's) is None:
        it does not drop the caller's key."""
        dtmf = get_object(frame, "dtmf", "dtmf message")
        ms = integer(dtmf.get("duration")) if duration else None
        return Digit(get_digit(dtmf, "dtmf message"), ms)

    @staticmethod
    def mark_event(frame: dict[str, Any]) -> Played:
        """``{"mark":{"name":…}}`` as :class:`Played`. Raises ProtocolError for a bad field."""
        return Played(get_str(get_object(frame, "mark", "mark message"), "name", "mark message"))

    @staticmethod
    def stop_event(frame: dict[str, Any]) -> Stopped:
        """``{"stop":{"reason":…}}`` (reason optional) as :class:`Stopped`."""
        stop = frame.get("stop")
        reason = stop.get("reason") if isinstance(stop, dict) else None
        return Stopped(reason if isinstance(reason, str) else "")

    # -------------------------------------------------------------- outbound

    def started_format(self, what: str) -> MediaFormat:
        """The inbound format, for an outbound ``what``; LocalProtocolError (our bug)
        before the start (the guard of carriers whose frames carry no stream id)."""
        if self._format is None:
            raise not_started(self.carrier, what)
        return self._format

    def started_stream(self, what: str) -> str:
        """The stream's id for an outbound ``what``; LocalProtocolError before the start."""
        if not self.stream_id:
            raise not_started(self.carrier, what)
        return self.stream_id

    def audio(self, pcm: Pcm) -> list[WireFrame]:
        """``pcm`` (any rate) as :attr:`frame_ms` frames of :attr:`outbound_format`,
        each made by :meth:`audio_frame`. LocalProtocolError before the start."""
        fmt = self.outbound_format
        if fmt is None:
            raise not_started(self.carrier, "audio")
        return [
            self.audio_frame(fmt, chunk) for chunk in fmt.frames(fmt.encode(pcm), self.frame_ms)
        ]

    def audio_frame(self, fmt: MediaFormat, payload: bytes) -> WireFrame:
        """One outbound frame holding the wire audio ``payload`` (of ``fmt``)."""
        raise NotImplementedError

    def mark(self, name: str) -> WireFrame:
        """A marker echoed as :class:`Played` once the audio before it played."""
        raise NotImplementedError

    def clear(self) -> WireFrame:
        """Drop the audio the carrier holds (barge-in)."""
        raise NotImplementedError
