"""One generic state machine for every protocol: a transition table, as h11's ``_state.py``.

A protocol writes its table once, in one place::

    TRANSITIONS: Transitions[State, str] = {
        (State.IDLE, "Request"): State.TURN,
        (State.TURN, "Response"): State.IDLE,
        ...
    }

and names, per state, what it expects there (:class:`Expected`), so that an event
the table does not allow raises an error naming what was expected and what came.
States are enum members (or classes); events are the protocol's names for what
may happen (wire message types, the turn engine's event types, the connection's
own pseudo-events), enum members or classes.

Whose mistake it is decides the error, as in h11: :meth:`StateMachine.feed` is for
what the peer sent (an illegal one raises :class:`RemoteProtocolError`, answered in
the protocol's own form); :meth:`StateMachine.advance` is for what our own code
does or observes (the turn engine's events, a listener's report, an action asked
of the protocol object): an illegal one is our bug and raises
:class:`LocalProtocolError`. Either way the state is unchanged after an error.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeAlias, TypeVar

from gateway.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Expected", "StateMachine", "Transitions", "event_name"]

S = TypeVar("S", bound=Hashable)
E = TypeVar("E", bound=Hashable)

Transitions: TypeAlias = Mapping[tuple[S, E], S]
"""(state, event) -> next state: every legal event of a protocol."""


@dataclass(frozen=True)
class Expected:
    """What a state expects: ``text`` says what is wrong ("Event out of order"),
    ``expected`` lists the events that would do ("Init")."""

    text: str
    expected: str


def event_name(event: Hashable) -> str:
    """How an event (or state) is named in errors: a class by its name, an enum member
    by its value, anything else by ``str``."""
    if isinstance(event, type):
        return event.__name__
    if isinstance(event, Enum):
        return str(event.value)
    return str(event)


class StateMachine(Generic[S, E]):
    """Where one connection (or request, or call) of a protocol is, checked against a table.

    ``transitions`` is the protocol's table; ``initial`` the first state;
    ``expected`` what each state expects (a state missing there is named as
    "Event out of order: expected nothing in state <state>"). Subclass it to give a
    protocol's machine its own name and defaults.
    """

    def __init__(
        self,
        transitions: Transitions[S, E],
        initial: S,
        expected: Mapping[S, Expected] | None = None,
    ) -> None:
        self.transitions = transitions
        self.expected: Mapping[S, Expected] = expected or {}
        self.state: S = initial

    def allows(self, event: E) -> bool:
        """Whether ``event`` is legal in the current state."""
        return (self.state, event) in self.transitions

    def _expectation(self) -> Expected:
        found = self.expected.get(self.state)
        if found is not None:
            return found
        return Expected(f"Event out of order in state {event_name(self.state)}", "nothing")

    def refused(self, event: E) -> RemoteProtocolError:
        """The RemoteProtocolError for ``event`` in the current state (not raised)."""
        why = self._expectation()
        return RemoteProtocolError(why.text, expected=why.expected, got=event_name(event))

    def check(self, event: E) -> None:
        """Raise :class:`RemoteProtocolError` (as :meth:`feed`) unless ``event`` is legal now."""
        if (self.state, event) not in self.transitions:
            raise self.refused(event)

    def feed(self, event: E) -> S:
        """Advance with ``event`` the peer sent; return the new state.

        Raises RemoteProtocolError (``expected``/``got`` set, from :data:`expected`)
        when the table does not allow it; the state is then unchanged.
        """
        new = self.transitions.get((self.state, event))
        if new is None:
            raise self.refused(event)
        self.state = new
        return new

    def advance(self, event: E) -> S:
        """Advance with ``event`` our own code caused or observed; return the new state.

        Raises LocalProtocolError (``expected``/``got`` set) when the table does
        not allow it: a bug of the gateway, not the peer's; the state is then
        unchanged.
        """
        new = self.transitions.get((self.state, event))
        if new is None:
            why = self._expectation()
            raise LocalProtocolError(
                f"{why.text} (the gateway's own step)", expected=why.expected, got=event_name(event)
            )
        self.state = new
        return new
