"""Speech over a transfer's announcement, the call engine's rule, pure (module doc of
gateway/protocol/call.py, step 7): the core's transfer stands once its turn asked for
it, whether the caller cut the turn off before or after its transfer item came; the
caller's words and keys over the announcement get no turn (InputsUnanswered, logged by
the runner at DEBUG). The real call: tests/adapters/test_carrier_calls.py
``test_words_over_a_transfer_announcement_are_dropped_and_logged_the_transfer_goes_on``.
"""

from __future__ import annotations

from adapters.twilio.protocol import TwilioCall
from gateway.events import Response, ResponseEvent, ResponseItemEvent, transfer_item
from gateway.protocol.actions import CancelListening, EndSession, StartTurn
from gateway.protocol.call import MACHINE, InputsUnanswered, Interrupt, Play, State, Transfer
from tests.adapters.twilio.test_barge_in import finish_turn, frames, hold, say_item, started
from tests.adapters.twilio.test_protocol import CALL, STOP, dtmf, mark
from tests.conftest import state_of


def transfer_turn(call: TwilioCall) -> None:
    """The running turn says "Transferring you now." then asks for a transfer."""
    say_item(call, "Transferring you now.", b"\x00" * 24_000)
    item = transfer_item("+15550100", reason="agent")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []


def test_words_over_a_transfer_announcement_are_dropped_the_transfer_goes_on() -> None:
    """The caller speaks over "Transferring you now." and the words interrupt it: the
    transfer the core asked for still happens (the turn is the core's, as a session it
    ended stays ended), so the words get no turn (the person the call goes to hears the
    caller): the utterance is cancelled and InputsUnanswered says so for the runner's
    DEBUG log; the final mark then asks the carrier for the transfer."""
    call = started()
    transfer_turn(call)
    onset = hold(call)
    assert Interrupt in [type(a) for a in frames(call, 60, onset=onset, voiced=10_000)]
    assert call.state is State.HEARING
    actions = finish_turn(call)
    assert [type(a) for a in actions] == [CancelListening, InputsUnanswered, Play]
    assert actions[1] == InputsUnanswered("transfer", 0, listening=True)
    assert state_of(call) is State.ENDING
    assert call.heard("final", "no wait", 0.9) == []  # too late: ignored
    final = actions[2]
    assert isinstance(final, Play)
    assert final.final
    [transfer] = call.receive(mark("end-2"))
    assert isinstance(transfer, Transfer)
    assert transfer.target == "+15550100"


def test_words_and_keys_waiting_at_a_transfer_are_counted_as_unanswered() -> None:
    """Words over the announcement whose final came (they wait for the turn) and a key:
    dropped at the transfer, both counted (no utterance open)."""
    call = started()
    transfer_turn(call)
    hold(call)
    assert [type(a) for a in call.heard("final", "no wait", 0.9)] == [Interrupt]
    assert [type(a) for a in call.receive(dtmf("0"))] == [Interrupt]
    assert list(call.waiting) == ["no wait", "0"]
    actions = finish_turn(call)
    assert [type(a) for a in actions] == [InputsUnanswered, Play]
    assert actions[0] == InputsUnanswered("transfer", 2, listening=False)
    assert call.waiting == ()


def test_a_transfer_with_nothing_of_the_caller_s_drops_nothing() -> None:
    """No speech, no keys over the announcement: no InputsUnanswered (nothing to log)."""
    call = started()
    transfer_turn(call)
    assert [type(a) for a in finish_turn(call)] == [Play]


def test_a_transfer_item_after_the_caller_cut_the_announcement_off_still_transfers() -> None:
    """The caller interrupts "Transferring you now." before the turn's transfer item came
    (its announcement still being synthesized): the core's transfer stands all the same,
    as when the item had come (no race with the synthesis), and the words get no turn
    (InputsUnanswered). Before, the item was dropped with the turn's rest: the transfer
    did not happen and the words were the next input, or the transfer happened and they
    were dropped, depending on which came first."""
    call = started()
    say_item(call, "Transferring you now.", b"\x00" * 24_000)
    hold(call)
    assert [type(a) for a in call.heard("final", "no wait", 0.9)] == [Interrupt]
    item = transfer_item("+15550100", reason="agent")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    actions = finish_turn(call)
    assert [type(a) for a in actions] == [InputsUnanswered, Play]
    assert actions[0] == InputsUnanswered("transfer", 1, listening=False)
    [transfer] = call.receive(mark("end-2"))
    assert transfer == Transfer(CALL, "+15550100", "agent")


def test_a_transfer_item_of_a_turn_running_when_the_caller_hung_up_is_not_carried_out() -> None:
    """The caller hangs up while the turn runs (it is discarded) and words wait: a
    transfer item then is not taken (nobody to transfer), the words still reach the
    core before the end."""
    call = started()
    say_item(call, "Transferring you now.", b"\x00" * 24_000)
    hold(call)
    assert [type(a) for a in call.heard("final", "no wait", 0.9)] == [Interrupt]
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    item = transfer_item("+15550100", reason="agent")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    assert call.transfer is None
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "no wait"


def test_a_transfer_item_after_an_answering_machine_was_detected_is_not_carried_out() -> None:
    """An outbound call's turn says "Connecting you to an agent." and an answering
    machine is detected (``#machine`` cuts the turn off) before the turn's transfer item
    came: the machine cut the turn off, not the caller, so the transfer is not carried out
    (the person would be handed a voicemail) and ``#machine`` is the next input (the core
    leaves its message or hangs up). Before, since the transfer of a discarded turn is
    taken (for the caller's barge-in), the transfer stood and ``#machine`` was dropped."""
    call = started()
    say_item(call, "Connecting you to an agent.", b"\x00" * 24_000)
    assert [type(a) for a in call.machine_answered("machine_start")] == [Interrupt]
    item = transfer_item("+15550100", reason="agent")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    assert call.transfer is None
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == MACHINE
    assert turn.input.attributes == {"answeredBy": "machine_start"}
    assert call.state is State.BOT


def test_an_answering_machine_detected_after_the_transfer_item_cancels_the_transfer() -> None:
    """As above, the machine detected after the transfer item came (its announcement still
    playing): the same outcome, no race with the synthesis. Before, the transfer stood and
    ``#machine`` was dropped at the turn's end."""
    call = started()
    transfer_turn(call)
    assert [type(a) for a in call.machine_answered("machine_end_beep")] == [Interrupt]
    assert call.transfer is None
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == MACHINE
    assert call.state is State.BOT


def test_an_answering_machine_detected_once_the_transfer_turn_finished_changes_nothing() -> None:
    """Once the transfer's turn finished (ENDING: its last audio plays) the call is handed
    over: a machine result then is ignored (as any once the call ends)."""
    call = started()
    transfer_turn(call)
    [final] = finish_turn(call)
    assert isinstance(final, Play)
    assert call.machine_answered("machine_start") == []
    [transfer] = call.receive(mark("end-2"))
    assert transfer == Transfer(CALL, "+15550100", "agent")


def test_words_over_a_transfer_announcement_reach_the_core_when_the_caller_hangs_up() -> None:
    """The caller interrupts "Transferring you now." after its transfer item came, then
    hangs up before the turn finished: the transfer cannot happen any more (nobody to hand
    over), so the words waiting reach the core before the end, as when the item comes
    after the hang-up (test_a_transfer_item_of_a_turn_running_when_the_caller_hung_up_is_not_carried_out):
    not a race with the item. Before, they were dropped without a word (no turn, no
    InputsUnanswered) when the item came first."""
    call = started()
    transfer_turn(call)
    hold(call)
    assert [type(a) for a in call.heard("final", "no wait", 0.9)] == [Interrupt]
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "no wait"
    assert call.transfer is None
    assert finish_turn(call) == []  # its answer is not played; nothing more


def test_a_transfer_turn_that_also_ended_the_session_drops_the_words_at_a_hang_up() -> None:
    """As above, but the transfer's turn also ended the session: the core ended it, so the
    words get no turn (module doc step 6), as before."""
    call = started()
    transfer_turn(call)
    hold(call)
    call.heard("final", "no wait", 0.9)
    call.receive(STOP)
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    assert call.turn_finished() == [InputsUnanswered("session ended", 1)]  # (DEBUG log)
    assert call.waiting == ()


def test_words_waiting_at_a_hang_up_during_a_farewell_are_said_unanswered() -> None:
    """The caller speaks over the core's farewell (its words wait), then hangs up before
    the turn finished: the core ended the session, so the words get no turn, said in
    InputsUnanswered ("session ended") for the runner's DEBUG log, as for the same words
    when the caller stays on the line. Before, they were dropped without a trace."""
    call = started()
    say_item(call, "Goodbye.")
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    hold(call)
    assert [type(a) for a in call.heard("final", "wait one more thing", 0.9)] == [Interrupt]
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    assert call.turn_finished() == [InputsUnanswered("session ended", 1)]
    assert call.waiting == ()
    assert call.drop_waiting() == 0
