"""The built-in demo dialogue: shows that the whole path from channel to core works."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Self

from gateway.events import (
    ERROR,
    FALLBACK,
    INTRO,
    SILENCE,
    TRANSFER_FAILED,
    Input,
    Response,
    ResponseItem,
)
from gateway.pipeline.base import PipelineOutput
from gateway.sessions import Session
from gateway.settings import Settings

_NAME_IS = re.compile(r"\bmy name is\s+(?P<name>[^\W\d_][\w' -]{0,60})", re.IGNORECASE)
_ASK_NAME = re.compile(r"\bwhat(?:'s| is) my name\b", re.IGNORECASE)
_STOP = re.compile(r"^\W*(?:stop|exit|quit)\W*$", re.IGNORECASE)
_FAREWELL = re.compile(
    r"(?:^|[^\w'])(?P<bye>good\s*bye|bye(?:[\s-]*bye)?|see\s+you(?:\s+later)?|farewell)"
    r"(?:\s+(?:now|then|for\s+now|for\s+today|everyone|all|then\s+bye))?\W*$",
    re.IGNORECASE,
)
_NEGATED = re.compile(r"\b(?:not|never|don't|do\s+not|didn't|can't|won't)\s+(?:say\s+)?$", re.I)


def is_farewell(text: str) -> bool:
    """Whether ``text`` ends the conversation: a farewell at the end of the utterance.

    Speech recognisers add words, so "goodbye", "okay goodbye", "thanks, bye",
    "bye bye now" and "alright see you later" all end it (a farewell word, then
    at most a filler such as now/then/for now, then only punctuation), as do the
    commands "stop", "exit" and "quit" said alone. A farewell not at the end
    ("goodbye is a sad word") or negated ("don't say goodbye") does not.
    """
    if _STOP.match(text):
        return True
    match = _FAREWELL.search(text)
    return match is not None and not _NEGATED.search(text[: match.start("bye")])


_HELP = re.compile(r"^\W*help\W*$", re.IGNORECASE)

_ACTION_REPLIES = {
    SILENCE: "Are you still there? Say something.",
    ERROR: "Sorry, something went wrong. Try again.",
    FALLBACK: "Sorry, I did not get that. Say it again.",
    TRANSFER_FAILED: "Sorry, I could not put you through. How else can I help?",
}
"""What the demo answers to the actions it knows (but ``#intro``, which greets)."""


class DemoPipeline:
    """A small dialogue, the embedded default (GATEWAY_PIPELINE=demo).

    - ``#intro`` greets in two items (so item streaming shows);
    - ``my name is X`` stores X in ``session.attributes["name"]``;
      ``what is my name`` answers it on a later turn;
    - a farewell at the end of the utterance ("goodbye", "okay goodbye", "thanks,
      bye", "bye bye now"; :func:`is_farewell`) or ``stop`` ends the session
      (sessionEnded=true);
    - ``#silence`` re-prompts, ``#error`` apologises, ``#fallback`` asks again,
      ``#transfer-failed`` apologises that nobody could be put through,
      ``help`` explains; any other text is answered with what the user said.
    """

    name = "demo"

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The demo (``spec`` is ``demo``; nothing to configure)."""
        return cls()

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        text = input.text.strip()
        action = input.action
        name = session.attributes.get("name")
        if action == INTRO:
            greeting = f"Welcome back, {name}." if name else "Hello, I am the gateway demo bot."
            yield ResponseItem(text=greeting)
            yield Response(
                items=[ResponseItem(text="Tell me your name, or say anything, and I will answer.")]
            )
            return
        ended = False
        if action:  # "" is no action: words that begin with "#" (Input.said)
            reply = _ACTION_REPLIES.get(action, f"I do not know the action {action}.")
        elif is_farewell(text):
            reply, ended = (f"Goodbye, {name}!" if name else "Goodbye!"), True
        elif match := _NAME_IS.search(text):
            new_name = match["name"].strip(" .!?'").title()
            session.attributes["name"] = new_name
            reply = f"Nice to meet you, {new_name}."
        elif _ASK_NAME.search(text):
            reply = f"Your name is {name}." if name else "I do not know your name yet."
        elif _HELP.match(text):
            reply = "Say 'my name is' and your name, ask 'what is my name', or say goodbye."
        else:
            reply = f"You said: {text}"
        yield Response(items=[ResponseItem(text=reply)], session_ended=ended)

    async def aclose(self) -> None:
        return None
