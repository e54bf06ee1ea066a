"""What every adapter's sans-I/O protocol code shares: the one ProtocolError.

Each protocol keeps its state machine as a table (state, message) -> next state
in its own ``protocol.py`` (the style of h11's ``_state.py``); a message the table
does not allow raises ProtocolError naming what was expected and what came.
"""

from __future__ import annotations


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
