"""The kit's StateMachine: one table, the peer's mistakes vs our own, errors that name both sides."""

from __future__ import annotations

from enum import Enum

import pytest

from gateway.protocol import (
    Expected,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StateMachine,
    Transitions,
    event_name,
)


class Door(Enum):
    SHUT = "shut"
    OPEN = "open"
    GONE = "gone"


class Knock:
    """An event given as a class (h11's style)."""


class Push:
    """Another one."""


TABLE: Transitions[Door, type] = {
    (Door.SHUT, Knock): Door.SHUT,
    (Door.SHUT, Push): Door.OPEN,
    (Door.OPEN, Push): Door.SHUT,
}
EXPECTED = {
    Door.SHUT: Expected("The door is shut", "Knock or Push"),
    Door.OPEN: Expected("Open", "Push"),
}


def machine() -> StateMachine[Door, type]:
    return StateMachine(TABLE, Door.SHUT, EXPECTED)


def test_feed_follows_the_table() -> None:
    door = machine()
    assert door.allows(Knock)
    assert door.feed(Knock) is Door.SHUT
    assert door.feed(Push) is Door.OPEN
    assert door.state is Door.OPEN
    assert not door.allows(Knock)
    assert door.feed(Push) is Door.SHUT


def test_the_peers_illegal_event_is_a_remote_error_naming_expected_and_got() -> None:
    door = machine()
    door.feed(Push)
    with pytest.raises(RemoteProtocolError) as caught:
        door.feed(Knock)
    assert caught.value is not None
    assert (caught.value.expected, caught.value.got) == ("Push", "Knock")
    assert caught.value.text == "Open: expected Push, got Knock"
    assert caught.value.status == 400
    assert door.state is Door.OPEN  # unchanged
    with pytest.raises(ProtocolError, match="expected Push, got Knock"):
        door.check(Knock)
    assert door.refused(Knock).got == "Knock"


def test_our_own_illegal_step_is_a_local_error_not_the_peers() -> None:
    door = machine()
    door.feed(Push)
    with pytest.raises(LocalProtocolError) as caught:
        try:
            door.advance(Knock)
        except ProtocolError:  # a handler of the peer's mistakes does not take it
            pytest.fail("our own bug was taken for the peer's mistake")
    assert (caught.value.expected, caught.value.got) == ("Push", "Knock")
    assert "the gateway's own step" in caught.value.text
    assert door.state is Door.OPEN
    assert door.advance(Push) is Door.SHUT


def test_a_state_without_expectation_is_named() -> None:
    door: StateMachine[Door, str] = StateMachine({(Door.SHUT, "leave"): Door.GONE}, Door.SHUT)
    assert door.feed("leave") is Door.GONE
    with pytest.raises(RemoteProtocolError) as caught:
        door.feed("leave")
    assert caught.value.text == "Event out of order in state gone: expected nothing, got leave"


def test_event_names() -> None:
    assert event_name(Knock) == "Knock"
    assert event_name(Door.OPEN) == "open"
    assert event_name("media") == "media"
