"""JSON a client sends, loaded within bounds and validated into a protocol's models.

Every JSON a client sends (a V1 frame, a V2 body event, a Twilio frame, an
Alexa/Google/Dialogflow body, a socket.io packet) is parsed by :func:`load_json`,
which bounds size, nesting depth and number length *before* the standard
library's parser runs, so hostile input (thousands of nested brackets, integers
of thousands of digits, ``NaN``, lone surrogates) becomes a ProtocolError, never a
RecursionError, ValueError or a crash further on. The decoded value becomes a
protocol's model through :func:`validate` (one model) or :func:`validate_event`
(a union of events told apart by ``type``); both turn pydantic's ValidationError
into the one ProtocolError naming the field.
"""

from __future__ import annotations

import functools
import json
import math
import re
from itertools import accumulate
from typing import Any, Final, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway.protocol.errors import ProtocolError
from gateway.protocol.values import clipped

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def invalid(
    exc: ValidationError, what: str, *, skip: int = 0, prefix: str = "", empty: str = ""
) -> ProtocolError:
    """The ProtocolError (400) for the first error of ``exc``: ``Invalid <what>: <where>: <msg>``.

    ``where`` is the error's location joined with dots, its first ``skip`` parts
    left out (1 for a discriminated union's tag), after ``prefix`` (``payload``);
    ``empty`` stands for an empty location (``body``); with neither the text is
    ``Invalid <what>: <msg>``.
    """
    where, msg = _first_error(exc, skip)
    where = f"{prefix}.{where}" if prefix and where else prefix or where or empty
    return ProtocolError(f"Invalid {what}: {where}: {msg}" if where else f"Invalid {what}: {msg}")


def invalid_field(exc: ValidationError) -> str:
    """Why data did not validate, for a log line: the first field that failed and the
    reason (``response.sessionEnded: Input should be a valid boolean``; the reason alone
    for the data as a whole), never the values (stored or pushed data is a client's
    content)."""
    where, msg = _first_error(exc, 0)
    return f"{where}: {msg}" if where else msg


def _first_error(exc: ValidationError, skip: int) -> tuple[str, str]:
    """The location (joined with dots, its first ``skip`` parts left out) and message of
    ``exc``'s first error, without its input. A part of the location may be a client's key
    (a slot name, a parameter name): each is given :func:`clipped` (unquoted), so a key of
    200,000 characters does not come back whole in the answer and the log line."""
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(clipped(str(part), quote=False) for part in err["loc"][skip:])
    return where, err["msg"]


@overload
def validate(
    model: type[M], value: object, *, what: str, skip: int = 0, prefix: str = "", empty: str = ""
) -> M: ...


@overload
def validate(
    model: TypeAdapter[T],
    value: object,
    *,
    what: str,
    skip: int = 0,
    prefix: str = "",
    empty: str = "",
) -> T: ...


def validate(
    model: type[BaseModel] | TypeAdapter[Any],
    value: object,
    *,
    what: str,
    skip: int = 0,
    prefix: str = "",
    empty: str = "",
) -> Any:
    """``value`` (decoded JSON) validated as ``model`` (a pydantic model or TypeAdapter).

    Raises ProtocolError (400) from :func:`invalid` (``what``, ``skip``, ``prefix``,
    ``empty`` as there) when it does not validate.
    """
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(value)
        return model.model_validate(value)
    except ValidationError as exc:
        raise invalid(exc, what, skip=skip, prefix=prefix, empty=empty) from None


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
            got = clipped(kind)
            raise ProtocolError("Unknown event type", expected=expected, got=got) from None
        raise invalid(exc, f"{kind} event", skip=1) from None


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


_NUMBER_CHARS: Final = b"-+0123456789.eE"
_NUMBER_MARKS: Final = bytes(1 if byte in _NUMBER_CHARS else 0 for byte in range(256))
"""``bytes.translate`` table: a number character (ASCII) -> 1, any other byte -> 0."""


def number_run(utf8: bytes, max_chars: int) -> bool:
    """Whether UTF-8 ``utf8`` holds a run of more than ``max_chars`` number characters
    (``-+0-9.eE``), strings included: the same answer as ``_long_number(max_chars)``
    searching the decoded text (every number character is ASCII, and no byte of a
    multi-byte UTF-8 sequence is ASCII), from one table lookup per byte and one
    substring search, instead of a regex match tried at every number character."""
    return b"\x01" * (max_chars + 1) in utf8.translate(_NUMBER_MARKS)


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


class _NotJson(Exception):
    """A number or constant :func:`load_json` refuses; ``args[0]`` is the message with
    ``%s`` for the text's name."""


def _real(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _NotJson(f"%s holds a number out of range: {literal[:20]}.")
    return value


def _constant(name: str) -> Any:
    raise _NotJson(f"%s holds {name}, which is not JSON.")


def _duplicate(pairs: list[tuple[str, Any]]) -> str:
    """The first key of ``pairs`` (an object's members in order) that comes again."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""  # unreachable: called only when dict(pairs) lost a member


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's dict; _NotJson when a key comes twice (RFC 8259 §4: names SHOULD be
    unique; a later one would silently replace the earlier, e.g. a second ``type``)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        key = clipped(_duplicate(pairs)).replace("%", "%%")
        raise _NotJson(f"%s holds the key {key} more than once.")
    return value


class UnsafeValue(Exception):
    """Raised by a :func:`guarded_decoder`'s decoder (no arguments) at a number or constant
    that :func:`load_json` would refuse or check first: the text is then left to it."""


def _short_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise UnsafeValue
    return int(literal)


def _short_float(literal: str) -> float:
    value = float(literal)
    if len(literal) > MAX_NUMBER_CHARS or not math.isfinite(value):
        raise UnsafeValue
    return value


def _unsafe_constant(name: str) -> Any:
    raise UnsafeValue


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise UnsafeValue
    return value


def guarded_decoder() -> json.JSONDecoder:
    """A ``json.JSONDecoder`` (the standard library's C scanner) that raises UnsafeValue
    at a number of more than :data:`MAX_NUMBER_CHARS` characters, one that is not
    finite (``1e999``), ``NaN``/``Infinity`` and an object with a key twice: for fast
    paths that decode trusted-size text with one parse and leave anything
    :func:`load_json` refuses to it (which then gives the error). Depth, strings and
    surrogates are not its business: its callers bound those first."""
    return json.JSONDecoder(
        parse_int=_short_int,
        parse_float=_short_float,
        parse_constant=_unsafe_constant,
        object_pairs_hook=_unique_object,
    )


_DECODER: Final = json.JSONDecoder(
    parse_float=_real, parse_constant=_constant, object_pairs_hook=_object
)
"""One decoder for every load (``json.loads`` with arguments builds a new one per call)."""


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
            finite (``NaN``, ``Infinity``, ``1e999``), an object with a key twice
            (at any depth, naming the key, clipped: ``{"type": 1, "type": 2}`` would
            otherwise be read as its last member), or a string with a lone
            UTF-16 surrogate (``"\\ud800"``). Nothing else.
    """
    raw: bytes | None = None
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
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                f"{what} is not UTF-8: bad byte at byte {offset + exc.start}."
            ) from None
        unit = unit or "byte"
    # depth <= the opening brackets, and a long number outside the strings is a long
    # run of number characters in the whole text: only text that could break a bound
    # has its strings taken out (a regex pass) to be measured exactly
    if text.count("{") + text.count("[") > max_depth and _depth(_structure(text)) > max_depth:
        raise ProtocolError(f"{what} is nested deeper than {max_depth} levels.")
    if len(text) > max_number_chars:
        if raw is None:  # lone surrogates pass as 3 non-ASCII bytes: no number character
            raw = text.encode("utf-8", "surrogatepass")
        if number_run(raw, max_number_chars) and _long_number(max_number_chars).search(
            _structure(text)
        ):
            raise ProtocolError(f"{what} holds a number longer than {max_number_chars} characters.")
    try:
        value = _DECODER.decode(text)
    except _NotJson as exc:
        raise ProtocolError(exc.args[0] % what) from None
    except json.JSONDecodeError as exc:
        where = exc.pos if unit == "character" else len(text[: exc.pos].encode("utf-8", "replace"))
        raise ProtocolError(f"Malformed JSON at {unit} {offset + where}: {exc.msg}.") from None
    except (ValueError, RecursionError, OverflowError):  # bounds above make these unreachable
        raise ProtocolError(f"{what} is not acceptable JSON.") from None
    # a raw surrogate cannot come from UTF-8 bytes (the strict decoder refuses it)
    if (isinstance(data, str) or "\\u" in text) and _SURROGATE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{what} holds a lone UTF-16 surrogate.") from None
    return value
