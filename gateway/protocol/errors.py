"""The protocol errors, as in h11's ``_util.py``: the peer's mistakes and our own.

:class:`RemoteProtocolError` (alias :data:`ProtocolError`, the name protocol code
raises) is the peer's mistake and is answered in the protocol's own form;
:class:`LocalProtocolError` is ours (a state the code should never reach, an action
asked of a protocol object in the wrong state) and is not caught as the peer's, so
it surfaces as a server error (HTTP 500, WebSocket close 1011) and is logged.
:class:`RequestVerificationError` is a request that failed a channel's verification (a
signature, a token, a certificate): the base of each verifier's own error, answered
by the webhook driver (gateway/io/webhook.py) with its ``status`` and ``headers``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Generic, TypeVar

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError", "RequestVerificationError"]


class _NamingError(Exception):
    """A protocol error: ``text``, followed by what the state machine expected and what
    came when both are known (``expected``/``got``)."""

    def __init__(self, text: str, *, expected: str | None = None, got: str | None = None) -> None:
        if expected is not None and got is not None:
            text = f"{text}: expected {expected}, got {got}"
        super().__init__(text)
        self.text = text
        self.expected = expected
        self.got = got


class RemoteProtocolError(_NamingError):
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
        super().__init__(text, expected=expected, got=got)
        self.status = status


ProtocolError = RemoteProtocolError
"""The name protocol code raises and routes catch for the peer's mistakes."""


class LocalProtocolError(_NamingError):
    """We broke the protocol: our own bug, or a state the protocol object should not reach.

    For example an action asked of a connection in a state its table does not
    allow. Not a :class:`RemoteProtocolError`: handlers that answer the peer's
    mistakes do not catch it, so it surfaces as a server error (HTTP 500, WebSocket
    close 1011) and is logged. ``expected``/``got`` as for RemoteProtocolError.
    """


_ReasonT = TypeVar("_ReasonT", bound=StrEnum)


class RequestVerificationError(Exception, Generic[_ReasonT]):
    """A request failed a channel's verification (its verifier raises a subclass).

    ``reason`` is which check failed (``_ReasonT``, the verifier's own StrEnum; its
    value is the problem body's ``reason``), ``message`` the explanation fit for the client (also
    ``str(exc)``), ``detail`` the underlying error (network, TLS, parser) for the log
    only, or None. The answer is :attr:`status` with :attr:`headers`: 400 and none
    unless a subclass says otherwise.
    """

    def __init__(self, reason: _ReasonT, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.message!r})"

    @property
    def status(self) -> int:
        """The HTTP status of the answer: 400 here."""
        return 400

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the answer (``WWW-Authenticate``, ``Retry-After``): none here."""
        return {}
