"""What every adapter's sans-I/O protocol code shares: the protocol errors, the one
JSON loader, and the checks of dates and time zones a client sends.

Each protocol keeps its state machine as a table (state, message) -> next state
in its own ``protocol.py`` (the style of h11's ``_state.py``); a message the table
does not allow raises ProtocolError naming what was expected and what came.

Errors, as in h11's ``_util.py``: :class:`RemoteProtocolError` (alias
:data:`ProtocolError`, the name protocol code raises) is the peer's mistake and is
answered in the protocol's own form; :class:`LocalProtocolError` is ours (a state
the code should never reach, an action asked of a protocol object in the wrong
state) and is not caught as the peer's, so it surfaces as a server error.

A ``protocol.py`` imports only the standard library, pydantic, the core event
models (gateway/events.py), this module and the pure modules gateway/turn.py,
gateway/speech/types.py, gateway/speech/audio.py, gateway/speech/vad.py and
gateway/ssml.py, never the turn engine, speech service or stores, not even for
type hints (tests/test_protocol_purity.py).

Every JSON a client sends (a V1 frame, a V2 body event, a Twilio frame, an
Alexa/Google/Dialogflow body, a socket.io packet) is parsed by :func:`load_json`,
which bounds size, nesting depth and number length *before* the standard
library's parser runs, so hostile input (thousands of nested brackets, integers
of thousands of digits, ``NaN``, lone surrogates) becomes a ProtocolError, never a
RecursionError, ValueError or a crash further on. :func:`parse_timestamp` and
:func:`check_time_zone` treat dates and IANA zone names as input to validate.
"""

from __future__ import annotations

import functools
import json
import math
import re
import zoneinfo
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, Final, TypeVar

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


def _naming(text: str, expected: str | None, got: str | None) -> str:
    """``text``, followed by what the state machine expected and what came when both are known."""
    if expected is not None and got is not None:
        return f"{text}: expected {expected}, got {got}"
    return text


class RemoteProtocolError(Exception):
    """The peer broke its protocol: malformed, unknown, out of order or oversized input.

    Raised under its alias :data:`ProtocolError`. ``text`` is a message fit for the
    client; ``expected``/``got`` name the state machine's expectation when the
    message came out of order; ``status`` is the HTTP status an HTTP-based protocol
    answers with (400 unless said).
    """

    def __init__(
        self,
        text: str,
        *,
        expected: str | None = None,
        got: str | None = None,
        status: int = 400,
    ) -> None:
        text = _naming(text, expected, got)
        super().__init__(text)
        self.text = text
        self.expected = expected
        self.got = got
        self.status = status


ProtocolError = RemoteProtocolError
"""The name protocol code raises and routes catch for the peer's mistakes."""


class LocalProtocolError(Exception):
    """We broke the protocol: our own bug, or a state the protocol object should not reach.

    For example an action asked of a connection in a state its table does not
    allow. Not a :class:`RemoteProtocolError`: handlers that answer the peer's
    mistakes do not catch it, so it surfaces as a server error (HTTP 500, WebSocket
    close 1011) and is logged. ``expected``/``got`` as for RemoteProtocolError.
    """

    def __init__(self, text: str, *, expected: str | None = None, got: str | None = None) -> None:
        text = _naming(text, expected, got)
        super().__init__(text)
        self.text = text
        self.expected = expected
        self.got = got


def validate_event(adapter: TypeAdapter[T], value: object, *, expected: str, what: str) -> T:
    """Validate a decoded JSON value as one of a protocol's client events.

    ``adapter`` is the protocol's discriminated union (for example
    ``adapters.flowstorm.events.V1_CLIENT_EVENT``); ``expected`` lists its type names for
    the error; ``what`` names the unit for a non-object ("A frame", "Each event").
    Raises ProtocolError for a non-object, an unknown ``type`` (naming what was
    expected and what came) and an invalid event (naming the field).
    """
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {type(value).__name__}.")
    kind = value.get("type")
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise ProtocolError("Unknown event type", expected=expected, got=repr(kind)) from None
        where = ".".join(str(p) for p in err["loc"][1:])
        raise ProtocolError(f"Invalid {kind} event: {where}: {err['msg']}") from None


# ------------------------------------------------------------------------ JSON

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of arrays/objects :func:`load_json` accepts by default (the
protocols' own messages nest at most 6 deep; user attributes get the rest)."""

MAX_NUMBER_CHARS: Final = 100
"""Longest JSON number (characters, sign and exponent included) :func:`load_json`
accepts by default: far below Python's 4,300-digit int conversion limit, far above
any real id, count or timestamp."""

# A JSON string, or the rest of the text from an opening quote that is never closed:
# every alternative always matches, so one pass is linear (possessive quantifiers,
# no backtracking). Replacing the strings by "" leaves only structure and numbers.
_STRING: Final = re.compile(r'"(?:[^"\\]++|\\(?:.|\Z))*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]++")
_BRACKET_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}
# A \uD800-\uDFFF escape or a raw surrogate may be a lone surrogate (not encodable as UTF-8).
_SURROGATE: Final = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


@functools.lru_cache(maxsize=8)
def _long_number(max_chars: int) -> re.Pattern[str]:
    """A run of number characters longer than ``max_chars`` (outside strings)."""
    return re.compile(rf"[-+0-9.eE]{{{max_chars + 1}}}")


def _structure(text: str) -> str:
    """``text`` with every string replaced by ``""`` (an unclosed one runs to the end)."""
    return _STRING.sub('""', text) if '"' in text else text


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, found without recursion.

    Linear time, in C but for a running sum over the brackets: strings are removed
    by one regex pass (brackets inside strings do not count), then everything but
    brackets. For malformed text the figure is an estimate; the parser's own error
    follows.
    """
    return _depth(_structure(text))


def _depth(structure: str) -> int:
    if structure.count("[") + structure.count("{") == 0:
        return 0
    brackets = _NOT_BRACKET.sub("", structure)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def load_json(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int | None = None,
    max_depth: int = MAX_JSON_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
    what: str = "The JSON",
    unit: str | None = None,
    offset: int = 0,
) -> Any:
    """The value of one JSON text a client sent (RFC 8259), within bounds.

    ``data`` is UTF-8 bytes or an already decoded str (a WebSocket text frame).
    Bounds: ``max_bytes`` of UTF-8 (None: unbounded), ``max_depth`` nested
    arrays/objects, ``max_number_chars`` characters per number. Depth and number
    length are checked before the standard library's parser runs, in linear time
    and without recursion (one regex pass removes the strings, then the brackets
    are summed and long runs of number characters searched), so the parser never
    recurses deeper than ``max_depth`` and no int conversion of a 4,300-digit
    literal is ever attempted.

    ``what`` names the text in errors ("The body", "The frame"); error positions are
    counted in ``unit`` ("byte" for bytes, "character" for str unless given) from
    ``offset`` (the text's place in a longer stream).

    Raises:
        ProtocolError: status 413 when larger than ``max_bytes``; status 400 when
            not UTF-8, malformed (naming the position), nested deeper than
            ``max_depth``, holding a number longer than ``max_number_chars`` or not
            finite (``NaN``, ``Infinity``, ``1e999``), or a string with a lone
            UTF-16 surrogate (``"\\ud800"``). Nothing else.
    """
    if isinstance(data, str):
        text = data
        if max_bytes is not None and len(text) > max_bytes // 4:
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > max_bytes:
                raise ProtocolError(f"{what} is larger than {max_bytes} bytes.", status=413)
        unit = unit or "character"
    else:
        if max_bytes is not None and len(data) > max_bytes:
            raise ProtocolError(f"{what} is larger than {max_bytes} bytes.", status=413)
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                f"{what} is not UTF-8: bad byte at byte {offset + exc.start}."
            ) from None
        unit = unit or "byte"
    structure = _structure(text)
    if _depth(structure) > max_depth:
        raise ProtocolError(f"{what} is nested deeper than {max_depth} levels.")
    if len(structure) > max_number_chars and _long_number(max_number_chars).search(structure):
        raise ProtocolError(f"{what} holds a number longer than {max_number_chars} characters.")

    def real(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ProtocolError(f"{what} holds a number out of range: {literal[:20]}.")
        return value

    def constant(name: str) -> Any:
        raise ProtocolError(f"{what} holds {name}, which is not JSON.")

    try:
        value = json.loads(text, parse_float=real, parse_constant=constant)
    except json.JSONDecodeError as exc:
        where = exc.pos if unit == "character" else len(text[: exc.pos].encode("utf-8", "replace"))
        raise ProtocolError(f"Malformed JSON at {unit} {offset + where}: {exc.msg}.") from None
    except (ValueError, RecursionError, OverflowError):  # bounds above make these unreachable
        raise ProtocolError(f"{what} is not acceptable JSON.") from None
    if _SURROGATE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{what} holds a lone UTF-16 surrogate.") from None
    return value


# ---------------------------------------------------------------- dates, zones


def parse_timestamp(raw: object, *, what: str = "timestamp") -> datetime:
    """An ISO 8601 date-time a client sent, as an aware UTC datetime.

    A value without an offset is taken as UTC. Raises ProtocolError (400) for a
    non-string, an unparsable text, and a moment that is not representable in UTC
    (``0001-01-01T00:00:00+01:00``, ``9999-12-31T23:59:59-01:00``).
    """
    if not isinstance(raw, str):
        raise ProtocolError(f"{what} must be an ISO 8601 string, not {type(raw).__name__}.")
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ProtocolError(f"{what} is not ISO 8601: {raw[:40]!r}.") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ProtocolError(f"{what} is out of range: {raw[:40]!r}.") from None


@functools.cache
def _zone_keys() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_time_zone(name: str, *, what: str = "time zone") -> str:
    """``name`` when it is a key of the IANA time zone database here, else ProtocolError.

    Validated as input: the key must be one :func:`zoneinfo.available_timezones`
    lists (so a directory such as ``America``, a path, or a file of the database
    that is not a zone is refused without being opened), and must load. Raises
    ProtocolError (400); never the OSError/ValueError family zoneinfo raises.
    """
    keys = _zone_keys()
    if (keys and name not in keys) or len(name) > 255:
        raise ProtocolError(f"{what}: unknown IANA time zone {name[:64]!r}.")
    try:
        zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError):
        raise ProtocolError(f"{what}: unknown IANA time zone {name[:64]!r}.") from None
    return name
