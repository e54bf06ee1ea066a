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
  kept well-formed.

Nothing here knows a channel; the adapters map these results onto their wire.
"""

from __future__ import annotations

import asyncio
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from gateway.conversation import Conversation, TurnContext, TurnRejected
from gateway.events import (
    ErrorEvent,
    Input,
    Response,
    ResponseEvent,
    ResponseItem,
    SessionEndedEvent,
    SessionStartedEvent,
)
from gateway.logs import session_ref

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

ELLIPSIS = "…"
"""Appended where text was cut at a word boundary."""

_SPEAK_OPEN = "<speak>"
_SPEAK_CLOSE = "</speak>"


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


# ---------------------------------------------------------------- truncation

_SENTENCE_END = re.compile(r"[.!?…。！？](?:[\"')\]]*)(?=\s)")


def truncate_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters at a sensible boundary.

    Text that fits is returned unchanged. Otherwise the cut is at the last
    sentence end (``.``, ``!``, ``?``...) when that keeps at least half of the
    budget, else at the last word boundary followed by ``…``, else (one huge
    word) a hard cut followed by ``…``. Returns ``""`` for a budget under 1.
    """
    if len(text) <= max_chars:
        return text
    if max_chars < 1:
        return ""
    window = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return text[: ends[-1]].rstrip()
    room = max_chars - len(ELLIPSIS)
    if room < 1:
        return text[:max_chars]
    cut = text[: room + 1]
    space = cut.rfind(" ")
    if space >= room // 2:
        return cut[:space].rstrip(" ,;:-") + ELLIPSIS
    return text[:room] + ELLIPSIS


def _truncate_escaped(text: str, budget: int) -> str:
    """The escaped form of ``text`` cut (sensibly, before escaping) to fit ``budget`` chars."""
    limit = budget
    while limit > 0:
        escaped = escape(truncate_text(text, limit))
        if len(escaped) <= budget:
            return escaped
        limit -= max(1, len(escaped) - budget)
    return ""


# ---------------------------------------------------------------------- SSML


def ssml_to_text(ssml: str) -> str | None:
    """The spoken text of an SSML fragment or document, or None when it is not well-formed."""
    inner = _strip_speak(ssml)
    try:
        root = ET.fromstring(f"{_SPEAK_OPEN}{inner}{_SPEAK_CLOSE}")
    except ET.ParseError:
        return None
    return " ".join("".join(root.itertext()).split())


def _strip_speak(ssml: str) -> str:
    text = ssml.strip()
    if text.startswith("<speak") and text.endswith(_SPEAK_CLOSE):
        start = text.find(">")
        if start != -1:
            return text[start + 1 : -len(_SPEAK_CLOSE)]
    return text


def _is_command(item: ResponseItem) -> bool:
    return bool(item.text and item.text.strip().startswith("#"))


def item_ssml(item: ResponseItem, *, audio_https_only: bool = True) -> str:
    """One item as an SSML fragment (no ``<speak>``), ``""`` when it says nothing.

    The item's ``ssml`` when it is well-formed, else its ``text`` escaped;
    ``#command`` items say nothing; an ``audio`` URL becomes ``<audio src="..."/>``
    (only https URLs when ``audio_https_only``, as Alexa requires).
    """
    parts: list[str] = []
    if item.ssml and ssml_to_text(item.ssml) is not None:
        parts.append(_strip_speak(item.ssml).strip())
    elif item.text and not _is_command(item):
        parts.append(escape(item.text.strip()))
    if item.audio and (item.audio.startswith("https://") or not audio_https_only):
        parts.append(f"<audio src={quoteattr(item.audio)}/>")
    return " ".join(p for p in parts if p)


def speech_ssml(
    items: Sequence[ResponseItem], max_chars: int, *, audio_https_only: bool = True
) -> str | None:
    """The items' speech as one ``<speak>`` document of at most ``max_chars`` characters.

    Items are joined in order (see :func:`item_ssml`). When the next fragment
    does not fit, its spoken text is cut at a sentence/word boundary
    (:func:`truncate_text`) and escaped, and nothing after it is said, so the
    document is always well-formed. Returns None when no item says anything.
    """
    budget = max_chars - len(_SPEAK_OPEN) - len(_SPEAK_CLOSE)
    out: list[str] = []
    used = 0
    for item in items:
        fragment = item_ssml(item, audio_https_only=audio_https_only)
        if not fragment:
            continue
        sep = 1 if out else 0
        if used + sep + len(fragment) <= budget:
            out.append(fragment)
            used += sep + len(fragment)
            continue
        spoken = ssml_to_text(fragment) or ""
        cut = _truncate_escaped(spoken, budget - used - sep)
        if cut:
            out.append(cut)
        break
    if not out:
        return None
    return _SPEAK_OPEN + " ".join(out) + _SPEAK_CLOSE


def display_text(items: Sequence[ResponseItem], max_chars: int) -> str:
    """The items' text for a screen or card: texts (or SSML's spoken text) joined by spaces.

    ``#command`` items are skipped; the result is cut by :func:`truncate_text`.
    """
    parts: list[str] = []
    for item in items:
        if item.text and not _is_command(item):
            parts.append(" ".join(item.text.split()))
        elif item.ssml:
            spoken = ssml_to_text(item.ssml)
            if spoken:
                parts.append(spoken)
    return truncate_text(" ".join(p for p in parts if p), max_chars)
