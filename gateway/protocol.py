"""What every adapter's sans-I/O protocol code shares: the one ProtocolError.

Each protocol keeps its state machine as a table (state, message) -> next state
in its own ``protocol.py`` (the style of h11's ``_state.py``); a message the table
does not allow raises ProtocolError naming what was expected and what came.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


class ProtocolError(Exception):
    """A client broke its protocol: malformed, unknown, out of order or oversized input.

    ``text`` is a message fit for the client; ``expected``/``got`` name the
    state machine's expectation when the message came out of order; ``status``
    is the HTTP status an HTTP-based protocol answers with (400 unless said).
    """

    def __init__(
        self,
        text: str,
        *,
        expected: str | None = None,
        got: str | None = None,
        status: int = 400,
    ) -> None:
        if expected is not None and got is not None:
            text = f"{text}: expected {expected}, got {got}"
        super().__init__(text)
        self.text = text
        self.expected = expected
        self.got = got
        self.status = status


def validate_event(adapter: TypeAdapter[T], value: object, *, expected: str, what: str) -> T:
    """Validate a decoded JSON value as one of a protocol's client events.

    ``adapter`` is the protocol's discriminated union (for example
    ``gateway.events.V1_CLIENT_EVENT``); ``expected`` lists its type names for
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
