"""Speech over a transfer's announcement, the call engine's rule, pure (module doc of
gateway/protocol/call.py, step 7): the core's transfer stands once its turn asked for
it, whether the caller cut the turn off before or after its transfer item came; the
caller's words and keys over the announcement wait for the transfer's result: they get
no turn once it happened (InputsUnanswered, logged by the runner at DEBUG), and are
answered after ``#transfer-failed`` when the carrier refused it. Inputs dropped because
the core ended the session (a hang-up during its farewell, keys pressed while its last
audio plays) are said likewise. The real call: tests/adapters/test_carrier_calls.py
``test_words_over_a_transfer_announcement_are_dropped_and_logged_the_transfer_goes_on``.
"""

from __future__ import annotations

from adapters.twilio.protocol import TwilioCall
from gateway.events import (
    TRANSFER_FAILED,
    Response,
    ResponseEvent,
    ResponseItemEvent,
    transfer_item,
)
from gateway.protocol.actions import EndSession, StartTurn
from gateway.protocol.call import (
    MACHINE,
    MAX_WAITING_INPUTS,
    HangUp,
    InputsDropped,
    InputsUnanswered,
    Interrupt,
    Play,
    State,
    Transfer,
)
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
    caller). The utterance being heard when the turn finishes is heard out (its words
    kept for the transfer's result: test_transfer_speech.py); once the carrier took the
    call, InputsUnanswered says they were dropped, for the runner's DEBUG log."""
    call = started()
    transfer_turn(call)
    onset = hold(call)
    assert Interrupt in [type(a) for a in frames(call, 60, onset=onset, voiced=10_000)]
    assert call.state is State.HEARING
    [final] = finish_turn(call)
    assert isinstance(final, Play)
    assert final.final
    assert state_of(call) is State.ENDING
    assert call.heard("final", "no wait", 0.9) == []  # kept for the transfer's result
    [transfer] = call.receive(mark("end-2"))
    assert isinstance(transfer, Transfer)
    assert transfer.target == "+15550100"
    unanswered, end = call.transfer_finished(True)
    assert unanswered == InputsUnanswered("transfer", 1)
    assert isinstance(end, EndSession)


def test_words_and_keys_waiting_at_a_transfer_are_counted_as_unanswered() -> None:
    """Words over the announcement whose final came (they wait for the turn) and a key:
    kept until the transfer's result, dropped once the carrier took it, both counted (no
    utterance open). Before, they were dropped when the turn finished (the transfer not
    yet asked)."""
    call = started()
    transfer_turn(call)
    hold(call)
    assert [type(a) for a in call.heard("final", "no wait", 0.9)] == [Interrupt]
    assert [type(a) for a in call.receive(dtmf("0"))] == [Interrupt]
    assert list(call.waiting) == ["no wait", "0"]
    assert [type(a) for a in finish_turn(call)] == [Play]
    assert list(call.waiting) == ["no wait", "0"]  # the transfer's result decides
    [transfer] = call.receive(mark("end-2"))
    assert isinstance(transfer, Transfer)
    unanswered, end = call.transfer_finished(True)
    assert unanswered == InputsUnanswered("transfer", 2, listening=False)
    assert isinstance(end, EndSession)
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
    assert [type(a) for a in finish_turn(call)] == [Play]
    [transfer] = call.receive(mark("end-2"))
    assert transfer == Transfer(CALL, "+15550100", "agent")
    unanswered, _ = call.transfer_finished(True)
    assert unanswered == InputsUnanswered("transfer", 1, listening=False)


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
    over: a machine result then leaves the transfer alone (no action; kept for a refusal:
    test_transfer_speech.py)."""
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


# ------------------------------------------------------------ the transfer's result decides


def over_the_announcement(call: TwilioCall) -> None:
    """The caller says "no wait" over a transfer's announcement (its final came: the
    words wait), presses 0, the turn finishes and its final mark asks for the transfer."""
    transfer_turn(call)
    hold(call)
    assert [type(a) for a in call.heard("final", "no wait", 0.9)] == [Interrupt]
    assert [type(a) for a in call.receive(dtmf("0"))] == [Interrupt]
    assert [type(a) for a in finish_turn(call)] == [Play]
    [transfer] = call.receive(mark("end-2"))
    assert transfer == Transfer(CALL, "+15550100", "agent")
    assert state_of(call) is State.TRANSFERRING


def next_input(call: TwilioCall) -> str:
    """The running turn (no audio) finishes: the input of the turn that starts next."""
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    return turn.input.text


def test_words_and_keys_over_the_announcement_are_answered_after_a_refused_transfer() -> None:
    """The carrier refuses the transfer: the caller is still on the line, so what they
    said and pressed over the announcement is answered, after ``#transfer-failed`` (the
    core learns first that it is still in charge), each its own turn in the order said.
    Before, they were dropped when the transfer's turn finished: the caller's "no wait"
    and 0 got no answer though nobody took the call."""
    call = started()
    over_the_announcement(call)
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert turn.input.attributes["error"] == "busy"
    assert turn.input.attributes["interrupted"] is True  # the input after the cut
    assert list(call.waiting) == ["no wait", "0"]
    assert next_input(call) == "no wait"
    assert next_input(call) == "0"
    assert finish_turn(call) == []
    assert state_of(call) is State.CALLER


def test_inputs_kept_for_a_transfer_are_dropped_when_its_stream_stops() -> None:
    """The carrier's transfer ends the stream (its ``stop`` before the API's answer): the
    transfer was asked, so the inputs kept for a refusal get no turn, said once (the
    stream stopped: the transfer's result is not known yet)."""
    call = started()
    over_the_announcement(call)
    unanswered, end = call.receive(STOP)
    assert unanswered == InputsUnanswered("stream stopped", 2)
    assert isinstance(end, EndSession)
    assert call.waiting == ()
    assert call.transfer_finished(True) == []  # late: nothing more


def test_inputs_kept_for_a_transfer_reach_the_core_when_the_caller_hangs_up_before_it() -> None:
    """The caller hangs up while the transfer's last audio plays (ENDING: the carrier not
    asked yet): the transfer never happens, so the words and keys waiting reach the core
    before the end, as at a hang-up while the turn runs (step 7)."""
    call = started()
    transfer_turn(call)
    hold(call)
    call.heard("final", "no wait", 0.9)
    assert [type(a) for a in finish_turn(call)] == [Play]
    turn, end = call.receive(STOP)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "no wait"
    assert isinstance(end, EndSession)
    assert finish_turn(call) == []  # its answer is not played; nothing more


def test_keys_being_collected_over_the_announcement_are_one_input_after_a_refusal() -> None:
    """``collect`` mode: keys still being collected when the transfer's turn finished
    are an input then (as the pause would have made them), answered after
    ``#transfer-failed``; keys pressed while the carrier is asked join them."""
    call = started(dtmf_mode="collect")
    transfer_turn(call)
    for key in "12":
        call.receive(dtmf(key))
    assert [type(a) for a in finish_turn(call)] == [Play]
    assert list(call.waiting) == ["12"]
    call.receive(mark("end-2"))
    for key in "34":  # while the carrier is asked: collected
        assert call.receive(dtmf(key)) == []
    [turn] = call.transfer_finished(False, "no answer")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert list(call.waiting) == ["12", "34"]


def test_an_utterance_heard_at_the_transfer_s_turn_end_is_an_input_after_a_refusal() -> None:
    """The utterance being heard when the transfer's turn finished is heard out (the
    caller's audio is still fed while the transfer is under way), its words kept: a
    refusal gives the core ``#transfer-failed``, then them. Before, the utterance was cut
    off then and its words never recognised."""
    call = started()
    transfer_turn(call)
    onset = hold(call)
    frames(call, 60, onset=onset, voiced=10_000)
    assert [type(a) for a in finish_turn(call)] == [Play]
    frames(call, 10)  # the caller stops speaking
    assert call.heard("final", "no wait", 0.9) == []
    call.receive(mark("end-2"))
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert call.waiting == ("no wait",)


def test_keys_pressed_without_end_while_a_transfer_is_asked_stay_bounded() -> None:
    """Bad input: a stream pressing keys without end while the carrier is asked keeps at
    most MAX_WAITING_INPUTS of them (the oldest dropped, InputsDropped for the WARNING
    log), as any inputs waiting."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    call.receive(mark("end-2"))
    drops = [a for _ in range(MAX_WAITING_INPUTS + 4) for a in call.receive(dtmf("7"))]
    assert drops == [InputsDropped(inputs=1)] * 4
    assert call.waiting == ("7",) * MAX_WAITING_INPUTS
    unanswered, _ = call.transfer_finished(True)
    assert unanswered == InputsUnanswered("transfer", MAX_WAITING_INPUTS)


# ------------------------------------------------------------ the core's farewell


def farewell(call: TwilioCall) -> None:
    """The running turn says "Goodbye." and ends the session; it finishes (ENDING)."""
    say_item(call, "Goodbye.")
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    [final] = call.turn_finished()
    assert isinstance(final, Play)
    assert final.final
    assert state_of(call) is State.ENDING


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


def test_keys_pressed_while_a_farewell_plays_out_are_said_unanswered_at_the_hang_up() -> None:
    """Keys pressed once the farewell's turn finished (its last audio playing): they get
    no turn, said once with the hang-up (no action per key). Before, ignored without a
    trace."""
    call = started()
    farewell(call)
    for key in "90":
        assert call.receive(dtmf(key)) == []
    unanswered, hang_up = call.receive(mark("end-2"))
    assert unanswered == InputsUnanswered("session ended", 2)
    assert hang_up == HangUp(CALL)
    assert call.receive(STOP) == []  # said once


def test_keys_pressed_while_a_farewell_plays_out_are_said_unanswered_at_a_stop() -> None:
    """As above, the caller hanging up before the final mark came (``collect`` mode: a
    key being collected counts as one input)."""
    call = started(dtmf_mode="collect")
    farewell(call)
    assert call.receive(dtmf("9")) == []
    assert call.receive(STOP) == [InputsUnanswered("session ended", 1)]
    assert call.final_mark_overdue() == []


def test_a_farewell_with_no_key_pressed_after_it_hangs_up_alone() -> None:
    """No key after the farewell: the hang-up alone (nothing to log), also when the final
    mark is overdue."""
    call = started()
    farewell(call)
    assert call.final_mark_overdue() == [HangUp(CALL)]
