"""How the call tests count the answers a call has heard (tests/adapters/twilio/helpers.py,
:func:`answers_heard`): by each turn's marks, a turn cut by a barge-in at its clear."""

from __future__ import annotations

from tests.adapters.carrier_harness import Received
from tests.adapters.twilio.helpers import answers_heard


def wire(*events: str, cleared: tuple[str, ...] = ()) -> list[Received]:
    """Marks by name and clears (``clear``, finding ``cleared`` unplayed), in order."""
    return [
        Received(0.0, "clear", cleared=cleared) if e == "clear" else Received(0.0, "mark", name=e)
        for e in events
    ]


def test_an_answer_is_heard_once_all_its_marks_came_back() -> None:
    received = wire("1", "2", "3")
    assert answers_heard([2, 1], received, ["1"]) == 0
    assert answers_heard([2, 1], received, ["1", "2"]) == 1
    assert answers_heard([2, 1], received, ["1", "2", "3"]) == 2
    assert answers_heard([2, 2], received, ["1", "2", "3"]) == 1  # its last mark not sent yet


def test_an_answer_cut_by_a_barge_in_is_heard_at_the_clear() -> None:
    """The intro counted 4 marks (its audio after the cut discarded): 2 were sent, then the
    clear; the answer to the interruption follows."""
    for echoed in (["1"], ["1", "2"]):  # a carrier that drops the cleared marks, or Twilio
        received = wire("1", "2", "clear", "3", cleared=("2",))
        assert answers_heard([4], received, echoed) == 1
        assert answers_heard([4, 1], received, echoed) == 1
        assert answers_heard([4, 1], received, [*echoed, "3"]) == 2


def test_a_clear_after_all_of_an_answer_was_sent_cuts_its_playout() -> None:
    received = wire("1", "2", "clear", "3", cleared=("2",))
    assert answers_heard([2, 1], received, ["1"]) == 1
    assert answers_heard([2, 1], received, ["1", "3"]) == 2


def test_a_clear_before_the_next_answer_s_first_mark_cuts_that_answer() -> None:
    """The first answer played out; the second was cut before any of its audio was sent."""
    received = wire("1", "2", "clear", "3")
    assert answers_heard([2, 3, 1], received, ["1", "2"]) == 2
    assert answers_heard([2, 3, 1], received, ["1", "2", "3"]) == 3
