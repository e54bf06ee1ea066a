"""What a turn starts from and how it is refused: the turn engine's values, without the engine.

Pure (standard library, the core event models and the speech stage's value types):
sans-I/O ``protocol.py`` modules build a :class:`TurnContext`, answer a
:class:`TurnRejected` and propose ids with :func:`new_session_id` without loading the
turn engine, its stores or the speech service (DESIGN.md, "Rules of the house").
:mod:`gateway.conversation`, which runs turns, re-exports these names.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.events import LogEntry
from gateway.speech.types import TtsRequest

__all__ = ["RejectReason", "TurnContext", "TurnRejected", "new_session_id"]

RejectReason = Literal["session-not-found", "session-foreign", "session-busy", "store-unavailable"]


class TurnRejected(Exception):
    """The turn could not start; raised by the first ``anext`` of a turn's events.

    ``reason`` is one of ``session-not-found`` (the session is unknown or has
    expired and the adapter did not allow creating it), ``session-foreign`` (it
    belongs to another application key), ``session-busy`` (another turn held
    its lock for longer than GATEWAY_LOCK_WAIT_S) and ``store-unavailable``.
    Adapters answer it in their protocol's form (for example HTTP 404 / 403 /
    409 / 503 with an ErrorEvent of source ``session`` or ``gateway``).
    """

    def __init__(self, reason: RejectReason, text: str) -> None:
        super().__init__(text)
        self.reason: RejectReason = reason
        self.text = text

    @property
    def source(self) -> str:
        """The ErrorEvent source for this rejection."""
        return "gateway" if self.reason == "store-unavailable" else "session"


@dataclass(frozen=True)
class TurnContext:
    """What an adapter knows about the client when it starts a turn.

    The session key is ``namespace:session_id`` (namespace defaults to the
    channel), so ids proposed by clients of one channel cannot reach sessions
    of another. ``create`` allows a turn to start an unknown session. ``config``
    is the client's channel configuration, stored with the session;
    ``attributes`` are client attributes merged into the session's; ``logs``
    are client log entries to store with it. ``tts`` asks for each item's speech:
    an audio link in the item, or the encoded audio as a BinaryEvent after it.
    ``outbox`` journals the turn's items, Response, Error and SessionEnded in the
    session's outbox (gateway/outbox.py): each gets a sequence number (``seq``) and
    can be delivered again to a client that lost its connection.
    """

    channel: str
    session_id: str
    app_key: str
    namespace: str | None = None
    device_id: str | None = None
    locale: str | None = None
    time_zone: str | None = None
    create: bool = True
    config: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    logs: Sequence[LogEntry] = ()
    tts: TtsRequest | None = None
    outbox: bool = False

    @property
    def key(self) -> str:
        """The store key of the session."""
        return f"{self.namespace or self.channel}:{self.session_id}"


def new_session_id() -> str:
    """A fresh, unguessable session id (UUID4 text)."""
    return str(uuid.uuid4())
