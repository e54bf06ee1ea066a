"""Values a client sends that need a check or a coercion: dates, time zones, flags, numbers.

:func:`parse_timestamp`, :func:`check_time_zone` and :func:`check_language_tag` treat
dates, IANA zone names and language tags as input to validate (ProtocolError).
:func:`flag`, :func:`strict_flag`, :func:`integer` and :func:`text` read loosely typed
configuration values (a Flowstorm ``config`` object, query parameters, Twilio's
stringly numbers) and never raise; :func:`key_valid` checks a key a client sends;
:func:`media_type` reads the media type of a Content-Type (a request's, a core's
answer's, a carrier's encoding); :func:`clipped` is how an error text or a log line quotes
a value a client sent.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import re
import reprlib
import zoneinfo
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Final, TypeGuard

from gateway.protocol.errors import ProtocolError

TRUE_WORDS: Final = frozenset({"1", "yes", "true", "on"})
"""Words read as true (lower case, stripped)."""
FALSE_WORDS: Final = frozenset({"0", "no", "false", "off"})
"""Words read as false by :func:`strict_flag`."""
CLIPPED_CHARS: Final = 64
"""How many characters of a client's value :func:`clipped` quotes."""

_REPR: Final = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = CLIPPED_CHARS + 2  # bounded work for a container's repr


def clipped(value: object, limit: int = CLIPPED_CHARS, *, quote: bool = True) -> str:
    """``repr(value)`` for an error text or a log line, cut to ``limit`` characters of the
    value with ``…`` after a cut: a client's value (an unknown event name, a session
    id, a key) is quoted without being copied back whole (a 1 MB name gives a short
    text). A string's first ``limit`` characters are quoted (``'abc'…``; escapes can
    make the quote longer, at most 10 characters per character), or given as they are
    with ``quote=False`` (``abc…``, for texts that name a value unquoted); any other
    value's repr (:mod:`reprlib`: bounded work for a big container) is cut after
    ``limit`` characters. Never raises."""
    if isinstance(value, str):
        cut = "…" if len(value) > limit else ""
        return (repr(value[:limit]) if quote else value[:limit]) + cut
    try:
        text = _REPR.repr(value)
    except Exception:  # an int past sys.get_int_max_str_digits, a failing __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"


def flag(value: object) -> bool:
    """A loosely typed JSON flag: a bool as is, a number when not 0, a string in
    :data:`TRUE_WORDS` (any case, stripped); anything else is False."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return isinstance(value, str) and value.strip().lower() in TRUE_WORDS


def strict_flag(raw: str) -> bool | None:
    """A flag written as a word (a header or query parameter): True for
    :data:`TRUE_WORDS`, False for :data:`FALSE_WORDS`, None for anything else."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


MAX_ID_CHARS: Final = 256
"""Longest id a client may give (characters): a device id or an application key, which
become part of store keys (the device index: gateway/outbox.py) and go into logs. The push
API (gateway/push.py) takes a target's ``sessionId``, ``appKey`` and ``deviceId`` up to
this long, so a channel that refuses a longer one never stores a device it cannot push to."""

MAX_INTEGER_DIGITS: Final = 100
"""The longest string of digits :func:`integer` reads (as load_json's MAX_NUMBER_CHARS
bounds a JSON number): a longer one is None, never an int conversion (past 4,300 digits
``int()`` raises ValueError)."""


def finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite JSON number: an int or float, not a bool, neither
    ``NaN`` nor an infinity (which Python's and PyJWT's JSON parsers take), nor an int too
    large for a float (past about 1.8e308: ``10**400`` parsed from 401 digits, which would
    raise OverflowError in any arithmetic with a float): a JWT claim's NumericDate, a
    request's ``time``, a timeout. Never raises."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the largest float
        return False


def integer(value: object) -> int | None:
    """An integral JSON number (or a string of ASCII digits, stripped, at most
    :data:`MAX_INTEGER_DIGITS` long) as int, else None.

    Booleans are not numbers here; ``3.0`` is 3, ``3.5`` is None.
    """
    if isinstance(value, str):  # first: carriers send their numbers as strings
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= MAX_INTEGER_DIGITS:
            return int(digits)
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def text(value: object) -> str | None:
    """A non-empty string as is, anything else None."""
    return value if isinstance(value, str) and value else None


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value without its parameters, lower case and
    stripped (``"Text/Plain; charset=UTF-8"`` -> ``"text/plain"``; RFC 9110 section
    8.3.1); ``""`` for None or an empty value. Never raises."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class KeyDigests:
    """The SHA-256 digests (32 bytes each) of configured keys (API or admin keys, metrics
    tokens), computed once, in the keys' order: what :func:`key_valid` compares a sent
    key with. Built by :class:`gateway.settings.Settings` for each key setting, so a check
    hashes only the key sent. False (``len`` 0) for no keys. Immutable; pure; never
    raises for ``str`` keys.
    """

    __slots__ = ("digests",)

    digests: tuple[bytes, ...]

    def __init__(self, keys: Iterable[str]) -> None:
        self.digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)

    def __len__(self) -> int:
        return len(self.digests)

    def __repr__(self) -> str:  # never the digests: a digest is a key to test guesses against
        return f"KeyDigests(<{len(self.digests)} keys>)"


SEVERAL_CREDENTIALS: Final = "The request has more than one Authorization header: send exactly one."
"""Why a request with more than one ``Authorization`` header is refused (the problem
body's ``detail`` of every such refusal: admin API, /metrics, webhooks, carriers)."""


class SeveralCredentials(ValueError):
    """A request carried a credentials header (``Authorization``) more than once: which
    one counts is anyone's guess (a right one beside a wrong one is no proof), so none is
    looked at (RFC 6750 section 3.1: more than one credential is ``invalid_request``).
    Its message is :data:`SEVERAL_CREDENTIALS` (or the same for another header name)."""


def sole_credentials(values: Sequence[str], name: str = "Authorization") -> str | None:
    """The one value of the credentials header ``name`` given ``values``, all of its
    values in the request (Starlette's ``headers.getlist(name)``), or None when it is absent.

    Raises SeveralCredentials for more than one value, none of them looked at: each
    caller answers it in its protocol's own form (400 ``invalid_request`` with its Bearer
    challenge over HTTP; the admin API, switched off, 403; a WebSocket upgrade 403)."""
    if len(values) > 1:
        detail = SEVERAL_CREDENTIALS.replace("Authorization", name, 1)
        raise SeveralCredentials(detail)
    return values[0] if values else None


def key_valid(sent: str | None, keys: Collection[str] | KeyDigests) -> bool:
    """Whether ``sent`` is one of ``keys`` (an API or admin key, a metrics token; given as
    the keys, hashed here, or as their :class:`KeyDigests`, hashed once beforehand); never
    for no key sent or no keys at all.

    Constant time: ``sent`` is compared with every key, a match or not (no early exit, so
    the time does not tell which key matched, the first or a later one), each comparison
    ``hmac.compare_digest`` over SHA-256 digests (equal lengths: the time does not tell a
    key's length either). Pure; never raises.
    """
    if not sent or not keys:
        return False
    digests = keys if isinstance(keys, KeyDigests) else KeyDigests(keys)
    digest = hashlib.sha256(sent.encode()).digest()
    matched = False
    for key in digests.digests:
        matched |= hmac.compare_digest(digest, key)
    return matched


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


MAX_LANGUAGE_TAG: Final = 64
"""Characters a language tag may have (RFC 5646 section 4.4.1 bounds a tag without
extensions at 35; this leaves room for a ``-u-``/``-x-`` extension or two)."""
LANGUAGE_TAG_PATTERN: Final = (
    r"(?:[A-Za-z]{2,8}|[iIxX](?=[-_]))(?:-[A-Za-z0-9]{1,8}|__?#?[A-Za-z0-9]{1,8})*"
)
"""The regular expression of :data:`_LANGUAGE_TAG` (also in the OpenAPI documents)."""
_LANGUAGE_TAG: Final = re.compile(LANGUAGE_TAG_PATTERN)
"""A BCP 47 (RFC 5646) tag's syntax, loosely: a language of 2-8 letters (or ``i``/``x``
before subtags), then subtags of 1-8 letters or digits. ``_`` separates too, as Java's
``Locale.toString()`` writes (``en_US``; ``zh_TW_#Hant`` with a script or an extension
after ``_#``; ``en__POSIX``, ``__`` for an empty country)."""


def check_language_tag(tag: str, *, what: str = "locale") -> str:
    """``tag`` when it is a language tag (``en``, ``en-US``, ``zh-Hant-TW``, ``en_US``; see
    :data:`_LANGUAGE_TAG`) of at most :data:`MAX_LANGUAGE_TAG` characters.

    Syntax only: the subtags are not looked up in the IANA registry. Raises
    ProtocolError (400) naming ``what`` and (the first 64 characters of) ``tag``.
    """
    if len(tag) > MAX_LANGUAGE_TAG or not _LANGUAGE_TAG.fullmatch(tag):
        raise ProtocolError(
            f"{what} {tag[:64]!r} is not a language tag (BCP 47, e.g. en-US) of at most "
            f"{MAX_LANGUAGE_TAG} characters."
        )
    return tag


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
