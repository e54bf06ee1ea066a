"""Flowstorm Socket V2, sans I/O: configuration, request bodies, and answers on the wire.

Spec: shared/specs/flowstorm-socket-v2.md; decisions in shared/DESIGN.md ("Where
the specs are silent"): JSON streams are newline-delimited both ways, the reader
also accepts objects written back to back, and event types are the short names.

- :func:`parse_config` reads the configuration table of the spec from headers
  (``X-Key`` ...) or query parameters (``key`` ...), the header winning.
- :class:`JsonEventReader` splits an ``application/json`` body into V2 client
  events as its bytes arrive (bounded per event); :class:`RequestStream` checks
  their order with the table :data:`TRANSITIONS`.
- :func:`text_input` reads a ``text/plain`` body (in the charset :func:`text_charset`
  finds declared, else as its byte order mark says, else UTF-8); :func:`text_lines` and
  :func:`json_lines` write turn events in the plain-text line format
  (``<``, ``#``, ``!``, ``.``, ``~``) or as NDJSON.
- Audio (spec "Audio/Video formats"): :func:`decode_audio_file` turns a whole
  ``audio/wav``, ``audio/mpeg`` or ``audio/basic`` body into raw audio for the
  recognizer; :class:`WavStreamReader` reads a WAV header off a streamed body.
- The bus messages of a streaming recognition (spec "Audio/Video input
  streaming"): the PUT publishes them on the session's topic
  (:func:`recognizing_message`, :func:`interim_message`, :func:`done_message`),
  the parallel GET turns them into its answer with :class:`RecognitionFollower`.

Decisions where the spec is silent:

- ``audio/basic`` is raw audio in the request's ``sttEncoding`` (LINEAR16:
  16-bit signed little-endian; MULAW: G.711 u-law, one byte a sample) at its
  ``sttSampleRate`` (Hz), mono, no header. WAV and MP3 carry their own rate. Raw audio
  (``audio/basic``, BinaryEvent data) that begins with a WAV or MP3 file's header is
  refused naming the content type to send it as (:func:`check_not_a_file`).
- Every turn's items get TTS links (``audio``, absolute URLs under
  ``/file/tts/``; format ``ttsFileType``), as the spec's plain-text example
  shows. A ``tts`` value (header ``X-Tts``, query ``tts``; V1's name) of
  ``None`` turns them off; ``RequiredLinks`` is the default.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import json
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from adapters.flowstorm.events import V2_CLIENT_EVENT, RecognizedInputEvent, V2ClientEvent
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Input,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    Transcript,
    TurnEvent,
    is_command,
)
from gateway.protocol import (
    MAX_ID_CHARS,
    MAX_JSON_DEPTH,
    Expected,
    ProtocolError,
    StateMachine,
    check_language_tag,
    check_time_zone,
    clipped,
    load_json,
    strict_flag,
    validate_event,
)
from gateway.speech.audio import (
    STREAMING_WAV_SIZE,
    AudioFormat,
    AudioFormatError,
    Pcm,
    audioop,
    decode_mp3,
    decode_wav,
    mp3_duration_s,
)
from gateway.ssml import SsmlBound, loose_text, ssml_to_text

SESSION_COOKIE = "flowstorm-session-id"
NDJSON = "application/x-ndjson"
TEXT = "text/plain; charset=utf-8"

TEXT_TYPES = frozenset({"text/plain", "plain/text"})  # the spec's "plain/text" is a typo
JSON_TYPES = frozenset({"application/json", NDJSON, "application/jsonl"})

AudioContainer = Literal["raw", "wav", "mp3"]
AUDIO_CONTAINERS: Final[Mapping[str, AudioContainer]] = {
    "audio/basic": "raw",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
}
"""Audio content types (spec "Audio/Video formats") and what their bodies hold."""
ACCEPTED_TYPES = (
    "text/plain, application/json, or audio: audio/basic (raw sttEncoding at sttSampleRate), "
    "audio/wav or audio/mpeg"
)


class ClientConfig(BaseModel):
    """The V2 configuration values of one request (spec table "Configuration").

    Immutable: requests with the same configuration headers and query may share one
    (adapters/flowstorm/v2/routes.py keeps those of recent requests). A field's alias is
    its name in the spec (camelCase: the query parameter, V1's ``config`` name)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    key: str | None = None
    """The application key; one over MAX_ID_CHARS characters is refused by the route (as an
    unknown key: 403), whether or not GATEWAY_APP_KEYS is set."""
    device_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    """At most MAX_ID_CHARS characters (as the push API's ``target.deviceId``), else 400."""
    locale: str = "en-US"
    time_zone: str = "Europe/Prague"
    stt_mode: Literal["SingleUtterance"] = "SingleUtterance"
    stt_model: Literal["General"] = "General"
    stt_sample_rate: int = 16000
    stt_encoding: Literal["LINEAR16", "MULAW"] = "LINEAR16"
    tts_file_type: Literal["mp3", "wav"] = "mp3"
    send_response_items: bool = True
    video_file: Literal[False] = False
    tts: Literal["RequiredLinks", "None"] = "RequiredLinks"
    realtime: bool = False

    @property
    def speech_links(self) -> bool:
        """Whether items get TTS links (``tts`` is not ``None``)."""
        return self.tts != "None"

    def raw_format(self) -> AudioFormat:
        """The format of raw (``audio/basic``, BinaryEvent) audio: sttEncoding at sttSampleRate.

        Raises ProtocolError naming ``sttSampleRate`` when the rate is not one the
        recognizer takes (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000 Hz).
        """
        try:
            return AudioFormat(self.stt_encoding, self.stt_sample_rate)
        except AudioFormatError as exc:
            raise ProtocolError(f"invalid sttSampleRate: {exc}") from None

    def session_config(self) -> dict[str, Any]:
        """The values stored with the session for the speech path, with V1's camelCase names.

        V1's Init ``config`` uses the same names (``sttSampleRate``, ``ttsFileType``...),
        so a session that moves between the sockets keeps one vocabulary.
        """
        return self.model_dump(by_alias=True, exclude=_NOT_STORED)


_NOT_STORED: Final = {"key", "device_id", "locale", "time_zone", "realtime"}
"""The fields :meth:`ClientConfig.session_config` leaves out (the turn's context has them)."""
_PARAM_OF_FIELD: Final = {name: to_camel(name) for name in ClientConfig.model_fields}

CONFIG_SOURCES: Final = tuple(
    (name, None if name == "realtime" else f"x-{param.lower()}", param)
    for name, param in _PARAM_OF_FIELD.items()
    if name != "locale"
)
"""(field, request header, query parameter) of each configuration value: the parameter is
the field's camelCase name (``sttSampleRate``), the header ``X-`` and that name (matched in
any case; ``realtime`` has none) and wins. The locale comes from Accept-Language."""

_BOOLEAN_FIELDS = frozenset({"send_response_items", "video_file", "realtime"})
_CANONICAL_VALUES: Final[Mapping[str, Mapping[str, str]]] = {
    "tts": {"requiredlinks": "RequiredLinks", "none": "None"},
    "stt_encoding": {"linear16": "LINEAR16", "mulaw": "MULAW"},
    "tts_file_type": {"mp3": "mp3", "wav": "wav"},
    "stt_mode": {"singleutterance": "SingleUtterance"},
    "stt_model": {"general": "General"},
}
"""Configuration values read in any case (as V1 reads them), by field: lower-case value ->
the spelling stored and used. Others are left as sent (and refused by the model)."""
_ONLY_VALUE: Final[Mapping[str, tuple[str | bool, str]]] = {
    "stt_mode": ("SingleUtterance", "the gateway recognises one utterance per request"),
    "stt_model": ("General", "the offline recognizer has one general model"),
    "video_file": (False, "the gateway answers with audio links, never video"),
}
"""Spec configuration values the gateway reads but can honour with one value only (the
spec's default; a string in the spelling of :data:`_CANONICAL_VALUES`, so in any case):
(that value, why). Any other value is refused naming both."""
_FIELD_OF_HEADER: Final = {header: name for name, header, _ in CONFIG_SOURCES if header}
_FIELD_OF_PARAM: Final = {param.lower(): name for name, _, param in CONFIG_SOURCES}
"""Configuration field by query parameter name in lower case (names match in any case)."""
_KNOWN_PARAMS: Final = ", ".join(param for _, _, param in CONFIG_SOURCES)


_NO_QUERY_FORM: Final = frozenset({"locale"})
"""Spec configuration values that have no query parameter (the locale comes from
Accept-Language): named in the query, refused rather than ignored, since the client
means to set one and would silently get the default."""


def _no_query_form(param: str) -> ProtocolError:
    """The 400 of a spec configuration value given as a query parameter it has not
    (:data:`_NO_QUERY_FORM`)."""
    return ProtocolError(
        f"Unknown query parameter {clipped(param)} (the locale comes from the "
        f"Accept-Language header): the parameters are {_KNOWN_PARAMS} (names in any case)."
    )


def ignored_params(query: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The query parameter names :func:`parse_config` ignores: none of the configuration
    table's (in any case), as sent, each once in their first order (``_`` of a browser's or
    jQuery's cache buster, ``utm_source`` of analytics...). Pure."""
    names: dict[str, None] = {}
    for param, _ in query.items() if isinstance(query, Mapping) else query:
        lower = param.lower()
        if lower not in _FIELD_OF_PARAM and lower.strip() not in _NO_QUERY_FORM:
            names.setdefault(param)
    return tuple(names)


def _squeezed(name: str) -> str:
    """``name`` in lower case, letters and digits only (``sample_rate``: ``samplerate``)."""
    return "".join(c for c in name.lower() if c.isalnum())


_SQUEEZED_PARAMS: Final = {_squeezed(param): param for _, _, param in CONFIG_SOURCES}


def misspelt_param(name: str) -> str | None:
    """The configuration query parameter (as the spec's table spells it) that ``name``, a
    name :func:`parse_config` ignores, most likely misspells, or None: the same letters and
    digits in any case (``time_zone``, ``device-id``), or, for four or more of them,
    difflib's closest name (ratio 0.8: ``sampleRate`` and ``sample_rate`` of
    ``sttSampleRate``, ``sttEncodng``). A cache buster (``_``, ``ts``) or ``utm_*`` gives
    None. The route warns of such a name, whose value the client meant to set and whose
    default it gets instead. Pure."""
    squeezed = _squeezed(name)
    if squeezed in _SQUEEZED_PARAMS:
        return _SQUEEZED_PARAMS[squeezed]
    if len(squeezed) < 4:
        return None
    close = difflib.get_close_matches(squeezed, list(_SQUEEZED_PARAMS), n=1, cutoff=0.8)
    return _SQUEEZED_PARAMS[close[0]] if close else None


def parse_config(
    headers: Mapping[str, str], query: Mapping[str, str] | Iterable[tuple[str, str]]
) -> ClientConfig:
    """The ClientConfig of a request; ``headers`` keys and ``query`` parameter names (a
    mapping, or the (name, value) pairs in their order, repeats included) are matched
    case-insensitively (``sttsamplerate=8000`` is ``sttSampleRate``).

    Raises ProtocolError (400) naming the first invalid value (for example
    ``sttSampleRate=abc``), and naming the accepted value when ``sttMode``,
    ``sttModel`` or ``videoFile`` asks for what the gateway cannot do (only
    ``SingleUtterance``, ``General`` and false are served), naming a ``timeZone``
    that is no key of the IANA time zone database, and naming an ``sttSampleRate``
    the recognizer does not take (:meth:`ClientConfig.raw_format`: ``-5``,
    ``10000000``), in every request, whether or not it carries raw audio (as every
    other value: the spec has the client send its configuration with every request). ``sttMode``,
    ``sttModel``, ``sttEncoding``, ``ttsFileType`` and ``tts`` are read in any case and
    kept in the spec's spelling (``mulaw`` -> ``MULAW``, ``WAV`` -> ``wav``). The locale
    is the Accept-Language tag of the highest weight (see :func:`_preferred_language`).
    An empty value is no value (the spec's default, or the query parameter's when the
    header's is empty). A missing key is not an error here: the route decides (it
    answers 401). A query parameter whose name is none of the spec's table (nor ``tts``,
    ``sendResponseItems``, ``videoFile``, ``realtime``) is ignored, its value unread
    (a cache buster ``_=1733600000000``, ``utm_source``, a misspelt ``sampleRate``: the
    route logs their names, :func:`ignored_params`, warning of misspellings,
    :func:`misspelt_param`), except ``locale``, a value of the
    table that has no query parameter (refused naming Accept-Language and the known
    names). A known name given twice (in any case) with two values is refused.
    """
    found: dict[str, str] = {}
    language = ""
    for header, raw in headers.items():
        lower = header.lower()
        if lower in _FIELD_OF_HEADER:
            if raw:  # an empty value is none: the query parameter's applies
                found.setdefault(_FIELD_OF_HEADER[lower], raw)
        elif lower == "accept-language":
            language = raw
    queried: dict[str, str] = {}
    for param, raw in query.items() if isinstance(query, Mapping) else query:
        name = _FIELD_OF_PARAM.get(param.lower())
        if name is None:
            if param.strip().lower() in _NO_QUERY_FORM:
                raise _no_query_form(param)
            continue  # no configuration value: ignored (ignored_params names it)
        if not raw:  # (``timeZone=``: the default)
            continue
        if queried.setdefault(name, raw) != raw:
            raise ProtocolError(
                f"{_PARAM_OF_FIELD[name]} is given twice in the query, with two values."
            )
        found.setdefault(name, raw)
    values: dict[str, Any] = {}
    for name, raw in found.items():
        param = _PARAM_OF_FIELD[name]
        value: str | bool | None
        if name in _BOOLEAN_FIELDS:
            if (value := strict_flag(raw)) is None:
                why = "must be one of 1/yes/true or 0/no/false"
                raise ProtocolError(f"{param} {why}, not {clipped(raw)}")
        else:  # a value of _CANONICAL_VALUES in its spelling, others as sent
            value = _CANONICAL_VALUES.get(name, {}).get(raw.strip().lower(), raw.strip())
        if name in _ONLY_VALUE and value != _ONLY_VALUE[name][0]:
            accepted, why = _ONLY_VALUE[name]
            shown = str(accepted).lower() if isinstance(accepted, bool) else accepted
            raise ProtocolError(
                f"{param}={clipped(raw)} is not supported: {why} (accepted: {shown})."
            )
        values[name] = value
    if "time_zone" in values:  # the session's zone, handed to the core: an IANA key
        values["time_zone"] = check_time_zone(values["time_zone"], what="invalid timeZone")
    if language and (locale := _preferred_language(language)):
        values["locale"] = locale
    try:
        config = ClientConfig.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "configuration"
        raise ProtocolError(f"invalid {_PARAM_OF_FIELD.get(field, field)}: {err['msg']}") from None
    config.raw_format()  # sttSampleRate: a rate the recognizer takes, in every request
    return config


_QVALUE: Final = re.compile(r"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")
"""A weight's value (RFC 9110 section 12.4.2): 0 to 1, at most three decimals."""


def _weighted(header: str) -> Iterator[tuple[str, float]]:
    """The elements of a comma-separated list with weights (Accept, Accept-Language: RFC 9110
    section 12.4.2), stripped, each with its ``q`` (1 when absent, 0 when not a valid weight)."""
    for part in header.split(","):
        element, *params = part.split(";")
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                weight = float(value) if _QVALUE.fullmatch(value := value.strip()) else 0.0
        yield element.strip(), weight


def _preferred_language(header: str) -> str | None:
    """The language tag of an Accept-Language header with the highest weight (RFC 9110
    sections 12.4.2 and 12.5.4; ``q`` 1 when absent), the first of equal ones.

    ``*`` and tags of ``q=0`` (not acceptable) are never chosen; an element whose ``q`` is
    not a valid weight (``q=high``, ``q=2``) or whose tag is no language tag
    (:func:`gateway.protocol.check_language_tag`) is skipped. None when no tag remains.
    """
    best: tuple[float, str] | None = None
    for tag, weight in _weighted(header):
        if tag and tag != "*" and weight > 0 and (best is None or weight > best[0]):
            with contextlib.suppress(ProtocolError):  # no language tag: skipped
                best = (weight, check_language_tag(tag))
    return best[1] if best else None


_JSON_RANGES: Final = frozenset({"application/json", "application/x-ndjson", "application/*"})
"""Accept media ranges that ask for the NDJSON answer."""


def plain_accepted(accept: str | None) -> bool:
    """Whether a ``GET /client`` answers in the plain-text line format: its Accept header
    (RFC 9110 section 12.5.1) names ``text/plain`` with a weight above 0 and ranks it
    before every JSON range (``application/json``, ``application/x-ndjson``,
    ``application/*``): a higher ``q``, or an equal one and listed first. Else NDJSON,
    the default (no header, ``*/*``, ``text/*``; the ``application/json, text/plain,
    */*`` of axios and browsers' fetch wrappers). A ``q`` that is no valid weight
    counts as 0."""
    weighted = enumerate(_weighted((accept or "").lower()))
    ranks = [(weight, -index, media) for index, (media, weight) in weighted]
    plain = max((rank[:2] for rank in ranks if rank[2] == "text/plain"), default=(0.0, 0))
    json_best = max((rank[:2] for rank in ranks if rank[2] in _JSON_RANGES), default=(0.0, 0))
    return plain[0] > 0 and plain > json_best


# ------------------------------------------------------------- request bodies


_BOM: Final = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark some writers put first (Windows editors, PowerShell): no
text, ignored at the start of a body (RFC 8259 section 8.1 allows it of a JSON reader)."""


_NO_CHARSETS: Final = frozenset(
    {"undefined", "unicode-escape", "raw-unicode-escape", "idna", "punycode"}
)
"""Python text codecs that are no charset of a body: ``undefined`` refuses everything, the
escape codecs turn backslashes into other characters, IDNA and Punycode are host names."""


def _text_codec(charset: str) -> str | None:
    """The Python codec name of ``charset`` when it is a text encoding, else None
    (unknown names, ``base64``/``zlib`` and the like, :data:`_NO_CHARSETS`)."""
    if charset == "utf-8":  # the usual case: no lookup
        return charset
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError):
        return None
    # (what bytes.decode goes by: a codec that is no text encoding is refused before it runs)
    return info.name if info._is_text_encoding and info.name not in _NO_CHARSETS else None


def text_charset(content_type: str | None) -> str | None:
    """The charset a ``text/plain`` body is decoded with: the ``charset`` parameter of its
    Content-Type (RFC 9110 section 8.3; case-insensitive, quoted or not), None when none
    is declared (:func:`text_input` then lets a byte order mark decide, else UTF-8). The
    name is returned as declared.

    Raises ProtocolError with status 415 naming a charset that is no text encoding known
    here (``charset=klingon``; ``base64`` and the like are no text encodings either).
    """
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() != "charset":
            continue
        charset = value.strip().strip('"').strip()
        if _text_codec(charset) is None:
            raise ProtocolError(
                f"Unsupported charset {clipped(charset)} of the text/plain body: send UTF-8, or "
                "declare a charset known here (e.g. iso-8859-1, windows-1252).",
                status=415,
            )
        return charset
    return None


_BYTE_ORDERED: Final[Mapping[str, tuple[bytes, ...]]] = {
    "utf-16": (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE),
    "utf-32": (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE),
}
"""Codecs whose byte order only a byte order mark tells, with their marks. Without one
RFC 2781 section 4.3 says big-endian, Python decodes in the machine's order: either
garbles the other's text, so such a body is refused (declare utf-16le/-be)."""
_SNIFFED: Final = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
"""The byte order marks that decide the encoding of a body that declares none, and that
encoding (WHATWG Encoding, "BOM sniff" in "decode": UTF-8, UTF-16LE, UTF-16BE only)."""
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters no user's text has (tab, line feed and carriage return aside): in a
body decoded as UTF-8 or a single-byte charset, NUL is the sign of UTF-16 or UTF-32."""


def text_input(body: bytes, charset: str | None = None) -> Input:
    """The Input of a ``text/plain`` body in ``charset`` (as :func:`text_charset` gives it;
    a leading byte order mark ignored). With no charset declared (None) a byte order mark
    decides (:data:`_SNIFFED`: UTF-8, UTF-16LE or UTF-16BE, as WHATWG Encoding's "decode"),
    else the body is UTF-8. ProtocolError: status 415 when ``charset`` is no
    text encoding known here, 400 when the body is not text in it (also: ``utf-16`` or
    ``utf-32`` without a byte order mark, :data:`_BYTE_ORDERED`; control characters other
    than tab and line breaks, :data:`_CONTROL`, e.g. UTF-16 sent as UTF-8) or is empty."""
    if charset is None:
        charset = next((name for mark, name in _SNIFFED if body.startswith(mark)), "utf-8")
    if (codec := _text_codec(charset)) is None:
        raise ProtocolError(
            f"Unsupported charset {clipped(charset)} of the text/plain body.", status=415
        )
    shown = "UTF-8" if codec == "utf-8" else clipped(charset, quote=False)
    if (marks := _BYTE_ORDERED.get(codec)) and body and not body.startswith(marks):
        raise ProtocolError(
            f"The text/plain body in {shown} has no byte order mark: declare "
            f"charset={codec}le or {codec}be, or begin the body with its byte order mark."
        )
    try:
        text = body.decode(codec).removeprefix("\ufeff").strip()
    except UnicodeError:
        raise ProtocolError(f"The text/plain body is not {shown} text.") from None
    if found := _CONTROL.search(text):
        hint = " (UTF-16 or UTF-32? declare its charset)" if found.group() == "\0" else ""
        raise ProtocolError(
            f"The text/plain body is not {shown} text: it has the control character "
            f"U+{ord(found.group()):04X}{hint}."
        )
    if not text:
        raise ProtocolError("The text/plain body is empty: send the user's text.")
    return Input.of(text)


_EVENT_TYPES: Final = "Input, Log, Binary or InputStreamClose"
"""The V2 client events a JSON body may hold, as an Error names them."""
_WHITESPACE: Final = frozenset(b" \t\r\n")
_STRUCTURE: Final = re.compile(rb'["\\{}\[\]]')
_IN_STRING: Final = re.compile(rb'["\\]')


class JsonEventReader:
    """Reads V2 client events off a JSON body as its bytes arrive (bytes in, events out).

    The body is JSON objects one per line (NDJSON), written back to back, or
    inside top-level arrays (``[{...},{...}]``); whitespace between them, and a
    UTF-8 byte order mark at the body's start, are ignored. :meth:`feed` returns
    every event completed by the bytes given; :meth:`close` says the body ended.
    Memory stays bounded: at most one unfinished event is kept.

    Bounds (bytes of JSON text; None: unbounded): ``max_event_bytes`` for any one
    event, ``max_text_bytes`` for all events but ``Binary`` together (Binary
    events carry audio, bounded by the caller in decoded bytes). Past a bound:
    ProtocolError with status 413.

    Raises ProtocolError (status 400) for bytes that are not UTF-8 JSON objects
    (naming the byte offset in the body), JSON out of
    :func:`gateway.protocol.load_json`'s bounds (an event nested deeper than
    MAX_JSON_DEPTH is refused as soon as its bytes say so), unknown or invalid
    events, and for a body that ends inside an event. A line that is no JSON (an
    unfinished event whose lines so far are no JSON prefix) is refused as soon as the
    following lines show it (:meth:`_check_lines`), not at the body's end.
    """

    def __init__(
        self, *, max_event_bytes: int | None = None, max_text_bytes: int | None = None
    ) -> None:
        self.max_event_bytes = max_event_bytes
        self.max_text_bytes = max_text_bytes
        self.text_bytes = 0
        """JSON bytes of the non-Binary events read so far."""
        self.events = 0
        """Events read so far."""
        self._buf = bytearray()
        self._base = 0  # body offset of self._buf[0]
        self._pos = 0  # scan position in self._buf
        self._start: int | None = None  # start of the unfinished value in self._buf
        self._depth = 0
        self._in_string = False
        self._in_array = False
        self._bom_checked = False
        self._checked = 0  # bytes of the unfinished event when its lines were last checked

    def feed(self, data: bytes) -> list[V2ClientEvent]:
        """Take the next bytes of the body; the events they complete, in order."""
        self._buf += data
        out: list[V2ClientEvent] = []
        buf = self._buf
        if not self._bom_checked:  # the body's first bytes: a byte order mark is no value
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return out  # the rest of it (or of the first value) has not arrived
            self._bom_checked = True
            if buf.startswith(_BOM):
                del buf[: len(_BOM)]
                self._base = len(_BOM)
        while True:
            if self._start is None and not self._value_start():
                break
            if not self._scan():
                break
            assert self._start is not None
            raw = bytes(buf[self._start : self._pos])
            offset = self._base + self._start
            self._start = None
            self._checked = 0
            out.extend(self._events(raw, offset))
        self._compact()
        limit, start = self.max_event_bytes, self._start
        if start is not None and limit is not None and len(self._buf) - start > limit:
            raise ProtocolError(f"A JSON event is larger than {limit} bytes.", status=413)
        if start is not None and b"\n" in data and len(self._buf) - start >= 2 * self._checked:
            self._check_lines()
        return out

    def _check_lines(self) -> None:
        """Raise ProtocolError when the unfinished event's lines so far are no JSON prefix.

        A line of an NDJSON body that is not JSON (``{bad``, a string cut by its
        newline) leaves an event that never ends: the events after it would go into it
        unseen (a realtime stream's audio lost until a timeout took the turn as
        silence). Its complete lines are parsed (tokens other than strings end at a
        line's end; a raw newline is no string character), and a syntax error before
        their end is raised at once, as :func:`load_json` names it. Done when the
        event has doubled in size since its last check: linear in all.
        """
        assert self._start is not None
        pending = self._buf[self._start :]
        self._checked = len(pending)
        lines = bytes(pending[: pending.rfind(b"\n") + 1])
        try:
            text = lines.decode("utf-8")
        except UnicodeDecodeError:
            return  # named when the event ends (load_json)
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            cut = exc.msg.startswith("Invalid control character")  # a raw newline in a string
            if cut or exc.pos < len(text.rstrip()):
                where = self._base + self._start + len(text[: exc.pos].encode("utf-8"))
                why = "Invalid control character in a string" if cut else exc.msg
                raise ProtocolError(f"Malformed JSON at byte {where}: {why}.") from None
        except ValueError:
            return  # a bound load_json names when the event ends

    def close(self) -> None:
        """The body ended; ProtocolError when it ended inside an event."""
        if self._start is not None:
            raise ProtocolError(
                f"Malformed JSON at byte {self._base + len(self._buf)}: "
                "the body ends inside an event."
            )

    def _value_start(self) -> bool:
        """Skip to the next value; True when one starts at ``self._pos``."""
        buf = self._buf
        while self._pos < len(buf):
            c = buf[self._pos]
            if c in _WHITESPACE:
                self._pos += 1
            elif c == ord("{"):
                self._start = self._pos
                return True
            elif c == ord("[") and not self._in_array:
                self._in_array = True
                self._pos += 1
            elif self._in_array and c in (ord(","), ord("]")):
                self._in_array = c == ord(",")
                self._pos += 1
            else:
                where = self._base + self._pos
                if c >= 0x80:
                    raise ProtocolError("The JSON body is not UTF-8.")
                raise ProtocolError(
                    f"Each event must be a JSON object: got {chr(c)!r} at byte {where}."
                )
        return False

    def _scan(self) -> bool:
        """Advance through the value that started; True when it is complete."""
        buf = self._buf
        while True:
            m = (_IN_STRING if self._in_string else _STRUCTURE).search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return False
            c = m.group()
            if self._in_string and c == b"\\":
                if m.end() >= len(buf):  # the escaped character has not arrived
                    self._pos = m.start()
                    return False
                self._pos = m.end() + 1
                continue
            self._pos = m.end()
            if c == b'"':  # a string's start or end
                self._in_string = not self._in_string
            elif c in (b"{", b"["):
                self._depth += 1
                if self._depth > MAX_JSON_DEPTH:  # load_json's bound, told before the end
                    raise ProtocolError(
                        f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels."
                    )
            else:
                self._depth -= 1
                if self._depth == 0:
                    return True

    def _compact(self) -> None:
        keep = self._start if self._start is not None else self._pos
        if keep:
            del self._buf[:keep]
            self._base += keep
            self._pos -= keep
            if self._start is not None:
                self._start = 0

    def _events(self, raw: bytes, offset: int) -> list[V2ClientEvent]:
        value = load_json(raw, what="The JSON body", offset=offset)
        event = validate_event(V2_CLIENT_EVENT, value, expected=_EVENT_TYPES, what="Each event")
        self.events += 1
        if not isinstance(event, BinaryEvent):
            self.text_bytes += len(raw)
            limit = self.max_text_bytes
            if limit is not None and self.text_bytes > limit:
                raise ProtocolError(f"The JSON events are larger than {limit} bytes.", status=413)
        return [event]


class StreamState(StrEnum):
    """Where a V2 request body is: before input, streaming audio, closed, done."""

    START = "start"
    AUDIO = "audio"
    AUDIO_CLOSED = "audio-closed"
    DONE = "done"


TRANSITIONS: dict[tuple[StreamState, str], StreamState] = {
    **{(state, "Log"): state for state in StreamState},  # Logs anywhere
    (StreamState.START, "Input"): StreamState.DONE,
    (StreamState.START, "Binary"): StreamState.AUDIO,
    (StreamState.AUDIO, "Binary"): StreamState.AUDIO,
    (StreamState.AUDIO, "InputStreamClose"): StreamState.AUDIO_CLOSED,
    (StreamState.AUDIO_CLOSED, "Input"): StreamState.DONE,
}
"""The order of events in one PUT body: ``Log* (Input | Binary+ (InputStreamClose Log* Input)?)``
with Logs anywhere after. The body may end in START (Logs only), AUDIO (the audio
is the input) or DONE; not in AUDIO_CLOSED (the Input is missing)."""

_OUT_OF_ORDER = "Event out of order"
_EXPECTED = {
    StreamState.START: Expected(_OUT_OF_ORDER, "Input, Binary or Log"),
    StreamState.AUDIO: Expected(_OUT_OF_ORDER, "Binary, InputStreamClose or Log"),
    StreamState.AUDIO_CLOSED: Expected(_OUT_OF_ORDER, "Input or Log"),
    StreamState.DONE: Expected(_OUT_OF_ORDER, "Log (one Input per request)"),
}


class RequestStream:
    """Checks the order of one PUT body's events against :data:`TRANSITIONS` (the kit's
    StateMachine, fed the events' ``type``)."""

    def __init__(self) -> None:
        self.machine = StateMachine(TRANSITIONS, StreamState.START, _EXPECTED)

    @property
    def state(self) -> StreamState:
        """Where the body is."""
        return self.machine.state

    def feed(self, event: V2ClientEvent) -> StreamState:
        """Advance with ``event``; raises ProtocolError when the table forbids it."""
        return self.machine.feed(event.type)


# ------------------------------------------------------------------ audio

FILE_CHUNK_MS: Final = 1000
"""Audio handed to the recognizer at a time when a whole file is recognised."""


def decode_audio_file(
    kind: str, body: bytes, config: ClientConfig, *, max_audio_s: float
) -> tuple[AudioFormat, bytes]:
    """The raw audio of a whole ``audio/*`` body: its format and samples, for a speech stage.

    ``audio/wav`` (RIFF/WAVE integer PCM or 8-bit G.711 μ-law/A-law, mono or stereo, any
    supported rate: :func:`gateway.speech.audio.decode_wav`) and
    ``audio/mpeg`` (MP3) come out as LINEAR16 at the file's own rate;
    ``audio/basic`` is raw ``sttEncoding`` at ``sttSampleRate`` and comes out
    as it is. Pure but CPU-bound for long MP3s (run it off the event loop).

    Raises ProtocolError: status 400 naming the expected format when the body is
    not valid audio of its type (truncated WAV, MP3 without frames, LINEAR16 of
    an odd number of bytes, empty, a WAV or MP3 file sent as ``audio/basic``), 413
    when it holds more than ``max_audio_s`` seconds (GATEWAY_MAX_AUDIO_S; an MP3 is
    measured from its frames' headers before it is decoded), 415 for a content type
    that is not audio.
    """
    container = AUDIO_CONTAINERS.get(kind)
    if container is None:
        raise ProtocolError(f"{clipped(kind)} is not an audio content type.", status=415)
    if not body:
        raise ProtocolError(f"The {kind} body is empty: send the user's audio.")
    if container == "raw":
        fmt = config.raw_format()
        check_raw_audio(fmt, body, what=kind, max_audio_s=max_audio_s)
        return fmt, body
    try:
        if container == "mp3":  # measured first: decoding takes ~40 times its size
            _check_seconds(mp3_duration_s(body), max_audio_s)
        pcm: Pcm = decode_wav(body) if container == "wav" else decode_mp3(body)
    except AudioFormatError as exc:
        raise ProtocolError(f"The {kind} body is not valid audio: {exc}.") from None
    fmt, data = AudioFormat("LINEAR16", pcm.sample_rate), pcm.data
    _check_duration(fmt, data, max_audio_s)
    return fmt, data


FILE_HEAD_BYTES: Final = 12
"""Bytes at the start of raw audio that :func:`check_not_a_file` looks at."""


def check_not_a_file(head: bytes, *, what: str) -> None:
    """Raise ProtocolError (400) when raw audio (``what``: where it came from, e.g.
    ``audio/basic``) begins as an audio file does: a RIFF/WAVE header (WAV) or an ID3v2
    tag (MP3), naming the content type to send it as. Raw audio has no header: such a file
    would be recognised as samples (its header, and all of an MP3 or of a WAV at another
    rate, as noise). ``head``: the first :data:`FILE_HEAD_BYTES` bytes (or all, if fewer).
    Audio whose first samples happen to spell these is not real audio."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        kind, content_type = "WAV", "audio/wav"
    elif head[:3] == b"ID3" and head[3:4] in (b"\x02", b"\x03", b"\x04"):
        kind, content_type = "MP3", "audio/mpeg"
    else:
        return
    raise ProtocolError(
        f"The {what} audio is a {kind} file, not raw audio (sttEncoding at sttSampleRate, "
        f"no header): send it as {content_type}."
    )


def check_raw_audio(fmt: AudioFormat, data: bytes, *, what: str, max_audio_s: float) -> None:
    """Check raw audio (``what``: where it came from, e.g. ``audio/basic``) before recognition.

    Raises ProtocolError: 400 for an audio file sent as raw audio
    (:func:`check_not_a_file`) or LINEAR16 of an odd number of bytes (naming
    sttEncoding and sttSampleRate), 413 for more than ``max_audio_s`` seconds.
    """
    check_not_a_file(data[:FILE_HEAD_BYTES], what=what)
    if len(data) % fmt.sample_width:
        raise ProtocolError(
            f"The {what} audio is not valid: expected {fmt.encoding} "
            f"({fmt.sample_width * 8}-bit samples) at "
            f"{fmt.sample_rate} Hz (sttEncoding, sttSampleRate): {len(data)} bytes is not a "
            "whole number of samples."
        )
    _check_duration(fmt, data, max_audio_s)


def _check_duration(fmt: AudioFormat, data: bytes, max_audio_s: float) -> None:
    _check_seconds(fmt.duration_ms(len(data)) / 1000, max_audio_s)


def _check_seconds(seconds: float, max_audio_s: float) -> None:
    if seconds > max_audio_s:
        raise ProtocolError(
            f"The audio is {seconds:.1f} s long: expected at most {max_audio_s:g} s of audio "
            "in one utterance.",
            status=413,
        )


def audio_chunks(fmt: AudioFormat, data: bytes, ms: int = FILE_CHUNK_MS) -> list[bytes]:
    """``data`` in slices of ``ms`` milliseconds of ``fmt`` (the last may be shorter)."""
    size = max(fmt.bytes_for_ms(ms), fmt.sample_width)
    return [data[i : i + size] for i in range(0, len(data), size)]


_WAV_ALAW: Final = 6
"""WAVE_FORMAT_ALAW: 8-bit G.711 A-law samples, decoded to LINEAR16 as they come."""
_WAV_ENCODINGS: Final[Mapping[tuple[int, int], Literal["LINEAR16", "MULAW"]]] = {
    (1, 16): "LINEAR16",  # WAVE_FORMAT_PCM, 16-bit samples
    (7, 8): "MULAW",  # WAVE_FORMAT_MULAW, 8-bit samples
    (_WAV_ALAW, 8): "LINEAR16",  # WAVE_FORMAT_ALAW, 8-bit samples: decoded (WavStreamReader.decode)
}
"""(WAV format tag, bits a sample) -> the encoding of the samples the speech stage gets,
for those read here."""
_WAV_EXTENSIBLE = 0xFFFE
_WAV_MAX_HEADER = 64 * 1024


class WavStreamReader:
    """Reads a streamed WAV (``audio/wav`` with ``realtime=1``) as its bytes arrive.

    :meth:`feed` returns the audio samples in the bytes given (none while the
    header is still arriving), as they are in the body; :meth:`decode` makes them
    samples of :attr:`format`, known once the ``fmt `` chunk was read. Accepted: mono
    16-bit integer PCM (LINEAR16), 8-bit G.711 u-law (MULAW) or 8-bit G.711 A-law
    (WAVE_FORMAT_ALAW 6, decoded to LINEAR16: the speech stage takes no A-law) at a
    supported rate, plain or WAVE_FORMAT_EXTENSIBLE, as gateway.speech.audio.decode_wav
    takes them in a whole file. A ``data`` size of 0 or >= 0x7FFF0000 (what
    recorders write when they do not know the length, e.g. ``arecord``) means
    "to the end of the body"; otherwise bytes after the data chunk are ignored.

    Raises ProtocolError (400) naming the expected format: not RIFF/WAVE, another
    sample format, more than one channel, an unsupported rate, no ``fmt `` chunk
    before ``data``, a header longer than 64 KiB, or (:meth:`close`) a body that ended
    inside its header.
    """

    EXPECTED: Final = "a mono 16-bit PCM, 8-bit u-law or 8-bit A-law WAV stream (RIFF/WAVE)"

    def __init__(self) -> None:
        self.format: AudioFormat | None = None
        self._alaw = False  # the body's samples are A-law (decode: to LINEAR16)
        self._buf = bytearray()
        self._riff = False
        self._header = 0
        self._data_left: int | None = None  # bytes of audio still to come; None: to the end
        self._in_data = False

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(
            f"The audio/wav stream is not valid audio: expected {self.EXPECTED}: {why}."
        )

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the body; the audio samples among them."""
        if self._in_data:
            return self._audio(data)
        self._buf += data
        self._header += len(data)
        buf = self._buf
        if not self._riff:
            if len(buf) < 12:
                return b""
            if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
                raise self._fail("no RIFF/WAVE header")
            self._riff = True
            del buf[:12]
        while len(buf) >= 8:
            chunk_id, size = bytes(buf[:4]), struct.unpack_from("<I", buf, 4)[0]
            if chunk_id == b"data":
                if self.format is None:
                    raise self._fail("the data chunk comes before the fmt chunk")
                del buf[:8]
                self._in_data = True
                self._data_left = None if size == 0 or size >= STREAMING_WAV_SIZE else size
                rest = bytes(buf)
                buf.clear()
                return self._audio(rest)
            # a chunk of an odd size is followed by a pad byte; the header is bounded
            # (_WAV_MAX_HEADER), so a chunk is kept until it has arrived
            if chunk_id == b"fmt ":
                if len(buf) < 8 + size:
                    break
                self.format = self._parse_fmt(bytes(buf[8 : 8 + size]))
            elif len(buf) < 8 + size + (size & 1):  # any other: skipped whole
                break
            del buf[: 8 + size + (size & 1)]
        if self._header > _WAV_MAX_HEADER:
            raise self._fail(f"no audio data in the first {_WAV_MAX_HEADER} bytes")
        return b""

    def close(self) -> None:
        """The body ended. Raises ProtocolError (400) when it ended inside the header: some
        bytes came but no ``data`` chunk began (a truncated WAV). An empty body is no
        error here (a realtime body that sent nothing is silence, as a raw one)."""
        if self._header and not self._in_data:
            why = "no RIFF/WAVE header" if not self._riff else "no data chunk"
            raise self._fail(f"truncated header: the body ended after {self._header} bytes, {why}")

    def decode(self, samples: bytes) -> bytes:
        """``samples`` returned by :meth:`feed` (the body's bytes, one or two a sample)
        as samples of :attr:`format`: A-law bytes become LINEAR16 (two bytes each,
        ``audioop.alaw2lin``: a byte is a sample, so any slice decodes on its own); the
        others are returned as they are."""
        return audioop.alaw2lin(samples, 2) if self._alaw else samples

    def _audio(self, data: bytes) -> bytes:
        if self._data_left is None:
            return data
        data = data[: self._data_left]
        self._data_left -= len(data)
        return data

    def _parse_fmt(self, chunk: bytes) -> AudioFormat:
        if len(chunk) < 16:
            raise self._fail("the fmt chunk is too short")
        tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", chunk)
        if tag == _WAV_EXTENSIBLE and len(chunk) >= 26:
            tag = struct.unpack_from("<H", chunk, 24)[0]
        if channels != 1:
            raise self._fail(f"{channels} channels")
        encoding = _WAV_ENCODINGS.get((tag, bits))
        if encoding is None:
            raise self._fail(f"sample format {tag} with {bits}-bit samples")
        self._alaw = tag == _WAV_ALAW
        try:
            return AudioFormat(encoding, rate)
        except AudioFormatError as exc:
            raise self._fail(str(exc)) from None


# ------------------------------------------------------------- recognition bus

BusMessage = dict[str, Any]
DoneResult = Literal["final", "silence", "text", "logs", "error", "cancelled"]


def recognizing_message(rid: str) -> BusMessage:
    """A recognition ``rid`` is running (the PUT publishes it retained, as a heartbeat)."""
    return {"type": "recognizing", "id": rid}


def interim_message(rid: str, text: str, confidence: float) -> BusMessage:
    """An interim transcript of recognition ``rid`` (``confidence`` 0..1)."""
    return {"type": "interim", "id": rid, "text": text, "confidence": confidence}


def done_message(
    rid: str,
    result: DoneResult,
    *,
    text: str = "",
    confidence: float = 0.0,
    error: ErrorEvent | None = None,
) -> BusMessage:
    """Recognition ``rid`` ended: ``final`` (with ``text``), ``silence``, ``text`` (the
    client switched to typing), ``logs`` (the body held Log events only: no turn),
    ``error`` (with the ErrorEvent the PUT answers) or ``cancelled`` (the client went
    away)."""
    message: BusMessage = dict(type="done", id=rid, result=result, text=text, confidence=confidence)
    if error is not None:
        message["error"] = {"text": error.text, "source": error.source}
    return message


def recognized_event(text: str, confidence: float, *, final: bool) -> RecognizedInputEvent:
    """The RecognizedInputEvent of a transcript (``confidence`` 0..1)."""
    transcript = Transcript(text=text, confidence=confidence)
    return RecognizedInputEvent(input=Input(transcript=transcript), is_final=final)


class RecognitionFollower:
    """What a ``GET /client`` answers, from the bus messages of its session's topic.

    Before any recognition is seen the follower *waits*; a ``recognizing``
    heartbeat (or any message of a recognition) makes it *follow* that
    recognition id (a newer ``recognizing`` id takes over: the older one was
    left behind by a PUT that died); ``interim`` messages become interim
    RecognizedInputEvents (repeated texts dropped); ``done`` ends it, with the
    final RecognizedInputEvent, or the ErrorEvent of a failed recognition.
    Messages of other ids and of unknown shapes are ignored.
    """

    def __init__(self) -> None:
        self.following: str | None = None
        self.done = False
        self._last = ""

    def feed(self, message: BusMessage) -> list[RecognizedInputEvent | ErrorEvent]:
        """The events to send for one bus message (see the class doc)."""
        kind, rid = message.get("type"), message.get("id")
        text = str(message.get("text") or "").strip()
        if self.done or not isinstance(rid, str):
            return []
        if kind == "recognizing" or self.following is None:  # a newer heartbeat takes over
            self.following = rid
        elif rid != self.following:
            return []
        if kind == "interim":
            if not text or text == self._last:
                return []
            self._last = text
            return [recognized_event(text, _confidence(message), final=False)]
        if kind != "done":
            return []
        self.done = True
        result = message.get("result")
        if result == "final" and text:
            return [recognized_event(text, _confidence(message), final=True)]
        error = message.get("error")
        if result == "error" and isinstance(error, dict):
            why = error.get("text") or "Recognition failed."
            source = error.get("source") or "gateway"
            return [ErrorEvent(text=str(why), source=str(source))]
        return []


def _confidence(message: BusMessage) -> float:
    value = message.get("confidence")
    return float(value) if isinstance(value, int | float) else 0.0


# ------------------------------------------------------------------ answers


def json_lines(event: TurnEvent | RecognizedInputEvent, *, send_items: bool) -> bytes:
    """One turn event as NDJSON bytes ('' for events V2 does not carry).

    With ``send_items`` (the default of sendResponseItems) items go out as
    ResponseItem events and the Response carries no items; without it, only
    the Response goes out, with all items. SessionStarted/SessionEnded are not
    V2 events (the cookie carries the session).
    """
    if isinstance(event, ResponseItemEvent) and not send_items:
        return b""
    if isinstance(event, ResponseEvent) and send_items:
        response = event.response.model_copy(update={"items": ()})
        event = ResponseEvent(response=response, seq=event.seq)
    if isinstance(event, ResponseItemEvent | ResponseEvent | ErrorEvent | RecognizedInputEvent):
        return (event.wire_json() + "\n").encode()
    return b""


def _one_line(text: str) -> str:
    return " ".join(text.split())


_ITEM_PROPS: Final = ("audio", "video", "image", "code", "background")
"""The ResponseItem fields a ``#`` line shows, in this order."""


def _ssml_speech(ssml: str) -> str:
    """The words ``ssml`` says: its spoken text, or the words of SSML that is not
    well-formed as the gateway's TTS reads it (``<speak>Tom & Jerry</speak>``)."""
    spoken = ssml_to_text(ssml)
    return spoken if spoken is not None else loose_text(ssml)


def item_lines(item: ResponseItem, bound: SsmlBound | None = None) -> str:
    """The ``#`` and ``<`` lines of one response item (spec "Plain text"). The speech text
    of an item without ``text`` is its ``ssml``'s spoken text (markup dropped:
    :func:`gateway.ssml.ssml_to_text`; SSML that is not well-formed read leniently,
    :func:`gateway.ssml.loose_text`), which its TTS link says, as other channels show it
    (:func:`gateway.ssml.display_text`). A command item (:func:`gateway.events.is_command`:
    a ``#command`` text, no ``ssml``) has no ``<`` line; an item with ``ssml`` has one
    whatever its words (``#1 hit``). With ``bound``, its answer's
    (:class:`gateway.ssml.SsmlBound`: the SSML of all the answer's items read up to one
    bound, in order), only as much of that SSML as the answer still reads: a later item
    past the bound has no ``<`` line. Without it, all of this item's SSML is read (an
    answer of many such items held the event loop for seconds: 30 of 30 KB, 4 s)."""
    out = []
    props = [f"{name}={value}" for name in _ITEM_PROPS if (value := getattr(item, name))]
    if props:
        out.append(f"# ({', '.join(_one_line(p) for p in props)})\n")
    ssml = item.ssml
    if ssml and not item.text and bound is not None:
        ssml = bound.read(ssml).ssml
    text = _one_line(item.text or (ssml and _ssml_speech(ssml)) or "")
    if text and not is_command(item):
        voice = item.tts_config.name if item.tts_config and item.tts_config.name else None
        out.append(f"< [{voice}] {text}\n" if voice else f"< {text}\n")
    return "".join(out)


def text_lines(event: TurnEvent | RecognizedInputEvent, bound: SsmlBound | None = None) -> str:
    """One turn event in the plain-text line format ('' for events it does not show).

    ``<`` speech text (with the voice in brackets when known), ``#`` other item
    properties, ``!`` an error as ``source: text``, ``.`` the session ended,
    ``~`` an interim recognition result (GET). ``bound``: the SSML bound of the answer
    the event is part of (:func:`item_lines`; one :class:`gateway.ssml.SsmlBound` for
    all the events of one answer).
    """
    if isinstance(event, ResponseItemEvent):
        return item_lines(event.response_item, bound)
    if isinstance(event, ResponseEvent):
        return ".\n" if event.response.session_ended else ""
    if isinstance(event, ErrorEvent):
        return f"! {event.source}: {_one_line(event.text)}\n"
    if isinstance(event, RecognizedInputEvent):
        return f"~ {_one_line(event.input.text)}\n"
    return ""


def pushed_lines(event: ResponseEvent, *, plain: bool, send_items: bool) -> bytes:
    """A pushed Response (gateway/push.py: ``Response {items, sessionEnded: false}``, its
    ``seq`` set) as the lines of a GET or at the head of a PUT's answer, written as a
    turn's: NDJSON with ``send_items`` is the ResponseItem events, then the Response with
    empty items (both with the push's ``seq``); without it the Response with its items;
    plain text is the items' ``<``/``#`` lines."""
    events: list[ResponseItemEvent | ResponseEvent] = [
        ResponseItemEvent(response_item=item, seq=event.seq) for item in event.response.items
    ]
    events.append(event)
    bound = SsmlBound()  # one push is one answer
    return b"".join(answer_line(e, plain=plain, send_items=send_items, bound=bound) for e in events)


def cookie_max_age(events: Sequence[TurnEvent], default_s: int) -> int | None:
    """The ``Max-Age`` (s) of the ``flowstorm-session-id`` cookie of a turn answered whole
    (``events``: all of its events), so the client keeps the id as long as the session is
    kept (spec "Session ID"): None when the turn ended the session (its SessionEnded: the
    session is deleted, the cookie is to be cleared), else the time the turn's Response
    keeps it (:meth:`gateway.events.Response.kept_s`: its ``sessionTimeout``, or the
    ``sleepTimeout``/``sessionTimeout`` of an ended session kept asleep, or ``default_s``,
    GATEWAY_SESSION_TIMEOUT_S), and ``default_s`` after an Error."""
    max_age = default_s
    for event in events:
        if isinstance(event, SessionEndedEvent):
            return None
        if isinstance(event, ResponseEvent):
            max_age = event.response.kept_s(default_s)
    return max_age


def answer_line(
    event: TurnEvent | RecognizedInputEvent,
    *,
    plain: bool,
    send_items: bool = True,
    bound: SsmlBound | None = None,
) -> bytes:
    """One event as an answer in the request's format writes it: :func:`text_lines` when
    ``plain`` (``bound``: its answer's SSML bound, one for all the answer's events), else
    :func:`json_lines` (an ErrorEvent alone is a whole refusal's body; the items' SSML is
    passed on, not read)."""
    if plain:
        return text_lines(event, bound).encode()
    return json_lines(event, send_items=send_items)
