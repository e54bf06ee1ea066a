"""Helpers of the turn engine tests: a turn context, the texts of a turn, an engine."""

from __future__ import annotations

from typing import Any

from gateway.conversation import Conversation, TurnContext
from gateway.events import ResponseItemEvent, TurnEvent
from gateway.pipeline import make_pipeline
from gateway.sessions import MemorySessionStore, SessionStore
from gateway.settings import Settings


def ctx(session_id: str = "s1", **fields: Any) -> TurnContext:
    """A TurnContext of channel ``test`` and app ``app`` (``fields`` as TurnContext takes)."""
    return TurnContext(channel="test", session_id=session_id, app_key="app", **fields)


def texts(events: list[TurnEvent]) -> list[str]:
    """The texts of the ResponseItem events of a turn."""
    return [e.response_item.text or "" for e in events if isinstance(e, ResponseItemEvent)]


def engine(store: SessionStore | None = None, **overrides: Any) -> Conversation:
    """A turn engine over ``store`` (memory by default) with Settings ``overrides``."""
    settings = Settings().model_copy(update=overrides)
    return Conversation(store or MemorySessionStore(), make_pipeline(settings), settings)
