"""The protocol errors, as in h11's ``_util.py``: the peer's mistakes and our own.

:class:`RemoteProtocolError` (alias :data:`ProtocolError`, the name protocol code
raises) is the peer's mistake and is answered in the protocol's own form;
:class:`LocalProtocolError` is ours (a state the code should never reach, an action
asked of a protocol object in the wrong state) and is not caught as the peer's, so
it surfaces as a server error (HTTP 500, WebSocket close 1011) and is logged.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


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
