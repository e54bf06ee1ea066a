"""The pure kit every adapter's sans-I/O ``protocol.py`` is built from.

- :mod:`~gateway.protocol.errors` — :class:`RemoteProtocolError` (alias
  :data:`ProtocolError`: the peer's mistake) and :class:`LocalProtocolError` (ours),
  as in h11's ``_util.py``; :class:`~gateway.protocol.errors.RequestVerificationError` (a
  request that failed a channel's verification) is imported from there;
- :mod:`~gateway.protocol.load` — :func:`load_json` (bounded JSON), :func:`validate`
  and :func:`validate_event` (JSON -> a protocol's models, one ProtocolError);
- :mod:`~gateway.protocol.values` — dates, time zones, the flag/int/text
  coercion of loosely typed configuration values, key checks, media types and
  :func:`clipped` (a client's value quoted in an error or a log line, bounded);
- :mod:`~gateway.protocol.state` — :class:`StateMachine`, one transition table per
  protocol (h11's ``_state.py``);
- :mod:`~gateway.protocol.actions` — the shared action vocabulary (Send, Close,
  StartTurn, StartListening ...), imported from there.

A ``protocol.py`` imports only the standard library, pydantic, the core event
models (gateway/events.py), this kit and the pure modules gateway/turn.py,
gateway/speech/types.py, gateway/speech/audio.py, gateway/speech/vad.py and
gateway/ssml.py, never the turn engine, speech service or stores, not even for
type hints (tests/test_protocol_purity.py).
"""

from gateway.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from gateway.protocol.load import (
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    UnsafeValue,
    guarded_decoder,
    invalid,
    invalid_field,
    json_depth,
    load_json,
    validate,
    validate_event,
)
from gateway.protocol.state import Expected, StateMachine, Transitions, event_name
from gateway.protocol.values import (
    FALSE_WORDS,
    MAX_ID_CHARS,
    SEVERAL_CREDENTIALS,
    TRUE_WORDS,
    KeyDigests,
    SeveralCredentials,
    check_language_tag,
    check_time_zone,
    clipped,
    finite_number,
    flag,
    integer,
    key_valid,
    media_type,
    parse_timestamp,
    sole_credentials,
    strict_flag,
    text,
)

__all__ = [
    "FALSE_WORDS",
    "MAX_ID_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "SEVERAL_CREDENTIALS",
    "TRUE_WORDS",
    "Expected",
    "KeyDigests",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "SeveralCredentials",
    "StateMachine",
    "Transitions",
    "UnsafeValue",
    "check_language_tag",
    "check_time_zone",
    "clipped",
    "event_name",
    "finite_number",
    "flag",
    "guarded_decoder",
    "integer",
    "invalid",
    "invalid_field",
    "json_depth",
    "key_valid",
    "load_json",
    "media_type",
    "parse_timestamp",
    "sole_credentials",
    "strict_flag",
    "text",
    "validate",
    "validate_event",
]
