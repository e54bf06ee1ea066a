"""What voice-assistant channels share: a turn bounded by the platform's deadline, and speech.

Voice platforms (Alexa, Google Assistant, Dialogflow) call the gateway as a webhook
and wait a fixed time for one JSON answer; nothing streams. So an adapter:

- runs the turn with :func:`run_turn`, which collects the turn's events until the
  platform's deadline and otherwise reports the turn as *late*. A late turn is not
  cancelled: it runs in its own task (gateway/conversation.py), finishes and saves
  the session, and the adapter answers a graceful "still working" prompt instead
  of letting the platform time out;
- turns the Response's items into speech with :func:`speech_ssml` (SSML when an
  item has it, its text escaped otherwise, https audio links as ``<audio src>``)
  and display text with :func:`display_text`, both within a character budget,
  truncated at a sentence or word boundary (:func:`truncate_text`), with the SSML
  kept well-formed. These are pure and live in :mod:`gateway.ssml` (re-exported
  here), so the adapters' protocols import them without the turn engine.

Nothing here knows a channel; the adapters map these results onto their wire.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.conversation import Conversation, TurnContext, TurnRejected
from gateway.events import (
    ErrorEvent,
    Input,
    Response,
    ResponseEvent,
    SessionEndedEvent,
    SessionStartedEvent,
)
from gateway.logs import session_ref
from gateway.ssml import (  # defined there: the Alexa and Google protocols import them
    ELLIPSIS,
    display_text,
    item_ssml,
    speech_ssml,
    ssml_to_text,
    truncate_text,
)

__all__ = [
    "ELLIPSIS",
    "TurnOutcome",
    "display_text",
    "end_session",
    "item_ssml",
    "run_turn",
    "speech_ssml",
    "ssml_to_text",
    "truncate_text",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnOutcome:
    """How a turn ended, as far as the platform's deadline let the adapter see.

    Exactly one of ``response``, ``error``, ``rejected`` is set, or none when
    ``late``. ``session_ended`` is True when the engine ended (deleted) the
    session; ``session_started`` when the turn created it.
    """

    response: Response | None = None
    error: ErrorEvent | None = None
    rejected: TurnRejected | None = None
    late: bool = False
    session_started: bool = False
    session_ended: bool = False


async def run_turn(
    conversation: Conversation, ctx: TurnContext, input: Input, deadline_s: float
) -> TurnOutcome:
    """Run one turn and wait for its end at most ``deadline_s`` seconds.

    Returns a :class:`TurnOutcome`: the Response, the ErrorEvent (the pipeline or
    the gateway failed), the TurnRejected (the turn could not start), or
    ``late=True`` when the deadline passed first. A late turn keeps running in
    its own task and saves the session; only the waiting stops. Never raises for
    the turn's own failures.
    """
    stream = conversation.turn(ctx, input)
    started = ended = False
    response: Response | None = None
    error: ErrorEvent | None = None
    try:
        async with asyncio.timeout(max(deadline_s, 0.0)):
            async for event in stream:
                if isinstance(event, SessionStartedEvent):
                    started = True
                elif isinstance(event, ResponseEvent):
                    response = event.response
                elif isinstance(event, ErrorEvent):
                    error = event
                elif isinstance(event, SessionEndedEvent):
                    ended = True
    except TurnRejected as exc:
        return TurnOutcome(rejected=exc)
    except TimeoutError:
        return TurnOutcome(late=True, session_started=started)
    if response is None and error is None:  # defensive: the engine always ends a turn
        error = ErrorEvent(text="The turn ended without a response.", source="gateway")
    return TurnOutcome(response=response, error=error, session_started=started, session_ended=ended)


_ENDING: set[asyncio.Task[bool]] = set()  # ends still running past their caller's wait


async def end_session(conversation: Conversation, ctx: TurnContext, wait_s: float) -> bool | None:
    """End ``ctx``'s session (the platform closed it), waiting at most ``wait_s`` seconds.

    Returns what :meth:`Conversation.end` returned (True if the session existed),
    or None when it failed (logged at WARNING) or is still waiting for the session's
    lock (a late turn holds it): then it goes on in the background and finishes on
    its own, so the platform's request never waits past its deadline and the store
    is never interrupted mid-write.
    """
    task = asyncio.create_task(conversation.end(ctx), name=f"end {session_ref(ctx.key)}")
    _ENDING.add(task)
    task.add_done_callback(_ended)
    try:
        async with asyncio.timeout(max(wait_s, 0.0)):
            return await asyncio.shield(task)
    except TimeoutError:
        log.info("ending session %s goes on in the background", session_ref(ctx.key))
    except Exception as exc:  # the store is down or the session busy: it expires anyway
        log.warning("could not end session %s: %r", ctx.key, exc)
    return None


def _ended(task: asyncio.Task[bool]) -> None:
    _ENDING.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("could not end session %s: %r", task.get_name().removeprefix("end "), exc)
