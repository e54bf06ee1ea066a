"""Logging of the gateway: plain text for people, or one JSON object per line for machines.

``GATEWAY_LOG_FORMAT=json`` writes each record as one line with ``time`` (ISO 8601
UTC), ``level``, ``logger``, ``message``, ``request_id`` (when serving a request)
and the structured fields a record carries, such as the turn engine's
``channel``, ``session``, ``turn``, ``latency_ms``, ``outcome`` and
``error_source``. ``GATEWAY_LOG_LEVEL`` sets the level.

Credentials never reach the log:

- A session id is the bearer credential of Flowstorm V1/V2 clients, so logs name
  a session by :func:`session_ref`: its namespace and a keyed hash of the id
  (HMAC-SHA256, 16 hex digits, keyed by GATEWAY_LOG_HASH_KEY or else the master
  key's ``log-session-ref`` key, gateway.secrets). The same session gets the same
  reference on every line (and on every instance sharing the key), but the
  reference cannot be turned back into the id. A record field named
  ``session_id`` is replaced by ``session`` (its reference) in both formats.
- The access log (uvicorn.access), and uvicorn's lines of WebSocket requests
  (uvicorn.error, at INFO whether the access log is on or not), are filtered by
  :class:`RedactQuery`: the values
  of credential query parameters (``key``, ``appKey``, ``token``, ``secret``, ``password``,
  ``authorization``, ``signature``, ``sessionKey``, ...) are written as ``***``, and so
  are the session id in the path of the admin API's session view
  (``/v1/sessions/***``) and the stream token in a carrier's stream path
  (``/twilio/stream/***``). At DEBUG, the websockets library's lines there (each frame,
  each handshake header) are filtered by :class:`RedactWebSocketDebug`: a data frame is
  named by its type and size, a credential header's value written ``***``.
- A TTS file id (``/file/tts/{id}.{ext}``) is a capability: whoever has the link gets
  the audio of what the bot said to someone. Every line names it by its first 8
  characters and ``…`` (:func:`tts_ref`: ``/file/tts/2438f3b6….mp3``), the access log,
  the gateway's own lines naming a request's path (:func:`logged_path`) and those of the
  file route alike: enough to tell files apart and match a link someone reports,
  while the 56 hex digits left out (224 bits) are not to be guessed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal

from gateway.pipeline.base import REQUEST_ID

# and uvicorn's ``color_message``: its message template with ANSI colour codes, for its
# own coloured console formatter; the JSON line has the message already
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",
}

_random_key = secrets.token_bytes(32)
_hash_key: Callable[[], bytes] = lambda: _random_key  # noqa: E731


def set_hash_key(key: str | Callable[[], bytes] | None) -> None:
    """Key :func:`session_ref`: GATEWAY_LOG_HASH_KEY, a function giving the key when it
    is needed (the master key's derived key, which may change once at startup), or
    None (random per process)."""
    global _hash_key
    if callable(key):
        _hash_key = key
    else:
        fixed = key.encode() if key else secrets.token_bytes(32)
        _hash_key = lambda: fixed  # noqa: E731


def session_ref(key: str) -> str:
    """How logs name a session: ``namespace:h-<16 hex digits>`` for a key ``namespace:id``.

    The digits are the first 64 bits of HMAC-SHA256(GATEWAY_LOG_HASH_KEY, id); a key
    without a namespace gives just ``h-<digits>``.
    """
    return _session_ref(_hash_key(), key)


@functools.lru_cache(maxsize=1024)
def _session_ref(hash_key: bytes, key: str) -> str:
    """:func:`session_ref` of ``key`` under ``hash_key``, cached: a session's turns each
    log its reference (an HMAC, about 16k instructions); keyed on the hash key too, so
    a key adopted later (the master key's, read from Redis) gives the new reference."""
    namespace, sep, session_id = key.rpartition(":") if ":" in key else ("", "", key)
    inner, outer = _hmac_states(hash_key)
    inner = inner.copy()
    inner.update(session_id.encode())
    outer = outer.copy()
    outer.update(inner.digest())
    return f"{namespace}{sep}h-{outer.digest()[:8].hex()}"


class SessionRef:
    """:func:`session_ref` of ``key`` as a record field, made only when a formatter turns
    it into text (``str()``: the JSON format's ``session``, a ``%(session)s`` format):
    the text format does not show the fields, so a turn's line costs no HMAC there."""

    __slots__ = ("_text", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = session_ref(self.key)
        return self._text

    __repr__ = __str__


@functools.lru_cache(maxsize=4)
def _hmac_states(key: bytes) -> tuple[Any, Any]:
    """SHA-256 after HMAC's inner and outer padded keys (RFC 2104): an HMAC is then two
    hash copies, half the cost of ``hmac.new`` (which pads the key each time)."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return (
        hashlib.sha256(key.translate(hmac.trans_36)),
        hashlib.sha256(key.translate(hmac.trans_5C)),
    )


def _redact_fields(record: logging.LogRecord) -> None:
    session_id = record.__dict__.pop("session_id", None)
    if session_id is not None:
        record.__dict__.setdefault("session", session_ref(str(session_id)))


class RedactFields(logging.Filter):
    """Replaces a record's ``session_id`` field by ``session`` (:func:`session_ref`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_fields(record)
        return True


CREDENTIAL_PARAMETERS = (
    "key",
    "appkey",
    "apikey",
    "api_key",
    "token",
    "access_token",
    "secret",
    "password",
    "authorization",
    "signature",
    "sessionkey",
    "session_id",
    "sessionid",
    "sid",
)
"""Query parameters (case-insensitive) whose values :class:`RedactQuery` hides."""

_CREDENTIAL = re.compile(r"(?i)([?&;](?:" + "|".join(CREDENTIAL_PARAMETERS) + r")=)[^&;#\s\"]*")
CREDENTIAL_QUERY: Final = _CREDENTIAL
"""The credential query parameters :func:`redact_query` hides (group 1: ``?name=``; the
rest of a match: the value), for :func:`gateway.pipeline.base.hide_url_secrets`."""


SESSION_VIEW_PATH = "/v1/sessions/"
"""The admin API's session view, whose id is the rest of the path up to its query (``/``
and all, as the view takes it)."""
STREAM_PATHS = ("/twilio/stream/", "/vonage/stream/", "/plivo/stream/")
"""The carriers' media streams, whose next segment is a stream token."""
CREDENTIAL_PATHS = (SESSION_VIEW_PATH, *STREAM_PATHS)
"""Paths followed by a credential (the admin API's session view: a session id, the rest
of the path; the carriers' media streams: a stream token, the next segment): written as
``***`` by :func:`redact_query`."""

_CREDENTIAL_PATH = re.compile(
    f"({re.escape(SESSION_VIEW_PATH)})"
    + r"[^?#\s\"]+|("
    + "|".join(re.escape(p) for p in STREAM_PATHS)
    + r")[^/?#;\s\"]+"
)


TTS_PATH = "/file/tts/"
"""The path of the TTS files, whose next segment is a file's id (a capability) and
extension: written by :func:`tts_ref` in :func:`redact_query` and :func:`logged_path`."""

TTS_REF_CHARS = 8
"""How many characters of a TTS file id the log shows (:func:`tts_ref`)."""

_TTS_FILE = re.compile(re.escape(TTS_PATH) + r"([^/?#;\s\"]+)")
_TTS_EXT = re.compile(r"[A-Za-z0-9]{1,5}")


def tts_ref(file_id: str) -> str:
    """How logs name a TTS file id (a capability: whoever has it gets the file): its
    first :data:`TTS_REF_CHARS` characters then ``…`` (``2438f3b6…``); a shorter text
    (no id) as it is. Pure; never raises."""
    if len(file_id) <= TTS_REF_CHARS:
        return file_id
    return file_id[:TTS_REF_CHARS] + "…"


def _tts_file_ref(match: re.Match[str]) -> str:
    name = match[1]
    stem, dot, ext = name.rpartition(".")
    if not dot or not _TTS_EXT.fullmatch(ext):  # no extension a file has: all of it cut
        stem, dot, ext = name, "", ""
    return f"{TTS_PATH}{tts_ref(stem)}{dot}{ext}"


def _redact_tts_ids(text: str) -> str:
    """``text`` with the id of every :data:`TTS_PATH` path written as :func:`tts_ref`
    does, its extension kept (``/file/tts/2438f3b6….mp3``)."""
    return _TTS_FILE.sub(_tts_file_ref, text) if TTS_PATH in text else text


def _hidden_credential(match: re.Match[str]) -> str:
    """A :data:`CREDENTIAL_PATHS` path's match with its credential written ``***``."""
    return (match[1] or match[2]) + "***"


def _redact_credentials(text: str) -> str:
    """``text`` with the values of credential query parameters, and the credential of a
    :data:`CREDENTIAL_PATHS` path, replaced by ``***``."""
    if "/v1/sessions/" in text or "/stream/" in text:
        text = _CREDENTIAL_PATH.sub(_hidden_credential, text)
    if "=" not in text:  # no parameter at all (most arguments of an access line)
        return text
    return _CREDENTIAL.sub(r"\1***", text)


def redact_query(text: str) -> str:
    """``text`` with the values of credential query parameters, and the session id of a
    :data:`CREDENTIAL_PATHS` path, replaced by ``***``, and the id of a TTS file's path
    (:data:`TTS_PATH`) cut as :func:`tts_ref` cuts it."""
    return _redact_tts_ids(_redact_credentials(text))


LOGGED_PATH_CHARS = 200
"""How many characters of a request's path :func:`logged_path` keeps."""

_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
"""Characters :func:`logged_path` writes as they are (with letters and digits)."""


def logged_path(path: str) -> str:
    """A request's (decoded) ``path`` as the gateway's own lines name it (an admin
    refusal, an unhandled error): :func:`redact_query`'s redaction (a TTS file id cut
    after the encoding, so its ``…`` stays one character), then every other character
    than ASCII letters, digits and ``/:@!$&'()*+,;=-._~%`` percent-encoded (UTF-8),
    then cut to :data:`LOGGED_PATH_CHARS` characters with ``…`` after a cut.

    The path is the client's: decoded, ``%1b[31m`` is an ESC that recoloured or
    rewrote the operator's terminal in the text format, and nothing bounded its length
    (a WARNING line of tens of kB for anyone without a key).
    """
    quoted = _redact_tts_ids(urllib.parse.quote(_redact_credentials(path), safe=_PATH_SAFE))
    return quoted if len(quoted) <= LOGGED_PATH_CHARS else quoted[:LOGGED_PATH_CHARS] + "…"


class RedactQuery(logging.Filter):
    """Hides credential query values (and :data:`CREDENTIAL_PATHS` segments, and all but
    the start of TTS file ids) in uvicorn's access and WebSocket request records (see
    module doc).

    uvicorn.access records carry ``(client, method, path with query, http version,
    status)`` as ``args``; the path (and any string argument) is redacted.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


_DATA_OPCODES: Final = frozenset({"TEXT", "BINARY", "CONT"})
"""The WebSocket frames that carry a message's data (RFC 6455 section 5.6)."""
_CREDENTIAL_HEADER = re.compile(r"auth|cookie|key|token|secret|signature|session", re.IGNORECASE)
"""Header names whose values :class:`RedactWebSocketDebug` hides (``Authorization``,
``Cookie``, ``Set-Cookie``, ``X-Twilio-Signature``, an ``X-Api-Key``...)."""


class RedactWebSocketDebug(logging.Filter):
    """Hides what the websockets library's DEBUG lines (on ``uvicorn.error``, the logger
    uvicorn gives it) carry of a client's credentials and words: a data frame's line
    (``< TEXT '{"type": "Init", "key": ...}' [115 bytes]``) becomes its type and size
    (``< TEXT [115 bytes]``), and a handshake header whose name :data:`_CREDENTIAL_HEADER`
    matches (``< cookie: ...``, ``< authorization: ...``) has its value written ``***``.
    Control frames (``CLOSE 1000 (OK)``, pings) and other headers are left as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.DEBUG or not isinstance(record.args, tuple):
            return True
        if record.msg in ("< %s", "> %s") and len(record.args) == 1:
            frame = record.args[0]
            opcode = getattr(getattr(frame, "opcode", None), "name", None)
            data = getattr(frame, "data", None)
            if opcode in _DATA_OPCODES and isinstance(data, bytes | bytearray | memoryview):
                record.msg = record.msg[:2] + "%s [%d bytes]"
                record.args = (opcode, len(data))
        elif record.msg in ("< %s: %s", "> %s: %s") and len(record.args) == 2:
            name = record.args[0]
            if isinstance(name, str) and _CREDENTIAL_HEADER.search(name):
                record.args = (name, "***")
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line (see module doc); exceptions go in ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        _redact_fields(record)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if request_id := REQUEST_ID.get():
            entry["request_id"] = request_id
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record``: what a caller passed in ``extra`` (not None),
    without logging's own attributes."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_") and value is not None
    }


_BARE_VALUE = re.compile(r"[^\s\"=\\]+")


def logfmt(fields: dict[str, Any]) -> str:
    """``fields`` as logfmt pairs: `` channel=alexa session=default:1f2e... turn=3``
    (a leading space before each pair; a value with a space, ``"``, ``=`` or a
    backslash, or an empty one, in double quotes with ``"`` and ``\\`` escaped, and a
    line break written ``\\n``, so one record stays one line)."""
    texts = [str(value) for value in fields.values()]
    # the usual line (a turn's) needs no quotes: told by a few string scans of all the
    # values at once; whitespace other than a space is never printable
    joined = "".join(texts)
    if (
        "" in texts
        or not joined.isprintable()
        or " " in joined
        or '"' in joined
        or "=" in joined
        or "\\" in joined
    ):
        texts = [_pair_value(text) for text in texts]
    return "".join([f" {key}={text}" for key, text in zip(fields, texts, strict=True)])


def _pair_value(text: str) -> str:
    """``text`` as a logfmt value: as it is, or quoted (see :func:`logfmt`)."""
    if _BARE_VALUE.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


class _TextFormatter(logging.Formatter):
    """logging's Formatter, its default ``asctime`` (``2026-01-31 12:00:00,123``, local
    time) formatted once a second instead of once a line; the record's structured
    fields (those the JSON format has as keys: a turn's ``channel``, ``session``,
    ``turn``, ``latency_ms``, ``outcome``, ``error_source``) and the ``request_id``
    follow the message as logfmt pairs (:func:`logfmt`), before a traceback."""

    _second = -1
    _text = ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        if request_id := REQUEST_ID.get():
            fields["request_id"] = request_id
        return line + logfmt(fields) if fields else line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return f"{self._text},{int(record.msecs):03d}"


QUIET_LIBRARIES = ("httpx", "httpcore", "twilio.http_client")
"""Loggers kept at WARNING whatever GATEWAY_LOG_LEVEL says: their request lines carry the
URLs of the gateway's calls to cores and carriers, with credentials in them (twilio's
client logs nine INFO lines a request)."""


SOCKETIO_LOGGERS = ("socketio.server", "engineio.server")
"""The server loggers of python-socketio and python-engineio (the Voiceflow socket.io
endpoint): they log ERROR and above only (:func:`socketio_logger`)."""


def socketio_logger(name: str) -> logging.Logger:
    """The logger ``name`` (one of :data:`SOCKETIO_LOGGERS`) made the gateway's: no
    handler of its own, its records propagate to the root logger's handler (the format
    and redaction filters of :func:`configure_logging`), level ERROR (or the root's
    level when that is higher).

    Given to python-socketio's server as ``logger=``/``engineio_logger=``: with
    ``False`` instead, python-socketio and python-engineio (``base_server.py``) set the
    logger, when its level is unset, to ERROR and attach a bare stderr StreamHandler of
    their own, so each of their lines was written twice, once not in the gateway's
    format and unredacted. Handlers already attached (a server made earlier in the
    process with ``False``) are removed. ERROR is the level python-socketio gives it
    for ``False``, kept: its INFO lines carry each packet's data (sessionKeys, API
    keys), and its WARNINGs are each about one request of a peer (an unsupported
    method, an emit to a client that left, an event for a namespace it did not join),
    lines a client can repeat at will, naming Engine.IO sids; the gateway logs the
    peer faults it cares about itself. Called by both :func:`configure_logging` and
    the server's constructor, so the order of the two does not matter.
    """
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(max(logging.ERROR, logging.getLogger().getEffectiveLevel()))
    if not any(isinstance(f, _RedactEngineIoSids) for f in logger.filters):
        logger.addFilter(_RedactEngineIoSids())
    return logger


def masked_number(number: str) -> str:
    """A caller's or callee's phone number as the log shows it: its last 4 digits, every
    digit before them ``*`` (``+15550100`` -> ``+****0100``; anything else kept as it is,
    so ``client:alice`` or ``sip:...`` stays readable). A phone number is personal
    data: the log names the call by its id, the digits only help tell calls apart."""
    digits = sum(ch.isdigit() for ch in number)
    hidden = digits - 4
    out = []
    for ch in number:
        if ch.isdigit() and hidden > 0:
            out.append("*")
            hidden -= 1
        else:
            out.append(ch)
    return "".join(out)


ENGINE_IO_NAMESPACE = "engine.io"
"""The namespace of an Engine.IO session id's reference in the log
(:func:`engine_io_ref`)."""


def engine_io_ref(sid: str) -> str:
    """An Engine.IO session id as the log names it: ``engine.io:h-<16 hex>``
    (:func:`session_ref`). A long-polling client's sid is its credential: whoever has
    it can poll that session's packets and post packets into it (python-engineio
    binds it to nothing else), so it is never written as it is."""
    return session_ref(f"{ENGINE_IO_NAMESPACE}:{sid}")


_INVALID_SESSION = re.compile(r"Invalid session (\S+)")


class _RedactEngineIoSids(logging.Filter):
    """python-engineio's ``Invalid session <sid>`` (an ERROR once a process, then INFO;
    the sid the client sent, maybe a live session of another instance) with the sid's
    :func:`engine_io_ref` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "Invalid session " in record.msg:
            record.msg = _INVALID_SESSION.sub(
                lambda m: f"Invalid session {engine_io_ref(m[1])}", record.msg
            )
        return True


def configure_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    """Route the root logger (and uvicorn's) to stderr in ``fmt`` at ``level``: no record
    below ``level`` is written, whatever logger it comes from.

    Access log lines and uvicorn's WebSocket request lines go through
    :class:`RedactQuery`, every line through
    :class:`RedactFields` (see the module doc); :data:`QUIET_LIBRARIES` log only
    warnings, :data:`SOCKETIO_LOGGERS` only errors, through the root's handler alone
    (:func:`socketio_logger`). Records do not look up the caller's
    file, line, thread or process (none of the formats shows them): the logging
    HOWTO's "Optimization" settings, which take a line per turn and uvicorn's access
    line from about 40 to 16 µs each.
    """
    logging._srcfile = None  # no sys._getframe walk per record (logging HOWTO)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    # the level holds for every logger's records, also those of loggers with a level
    # of their own (QUIET_LIBRARIES at WARNING, a filter that changes a record's level)
    handler.setLevel(level.upper())
    handler.addFilter(RedactFields())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn.error too: uvicorn logs each WebSocket request there at INFO, access log on
    # or off ('"WebSocket /socket?key=..." [accepted]', '/twilio/stream/<token>')
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuery) for f in logger.filters):
            logger.addFilter(RedactQuery())
    # and there, at DEBUG, the websockets library writes each frame and handshake header
    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RedactWebSocketDebug) for f in error_log.filters):
        error_log.addFilter(RedactWebSocketDebug())
    # httpx and httpcore log every request at INFO (DEBUG) with its whole URL: a core's
    # token in the query (Rasa's ``token``), a session id (a credential) in the path
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SOCKETIO_LOGGERS:  # the app (its socket.io server) may be made before
        socketio_logger(name)
