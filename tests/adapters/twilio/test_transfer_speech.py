"""The caller's speech once a transfer's (or farewell's) turn finished, the call engine's
rule, pure (module doc of gateway/protocol/call.py, step 7): the caller's audio is still
fed to the speech stage in ENDING and TRANSFERRING (audio time goes on), so

- words said while the transfer's last audio plays or while the carrier is asked are
  heard and kept for the transfer's result, as the words over the announcement: after a
  refusal they reach the core after ``#transfer-failed``; once it happened they are
  dropped, said in InputsUnanswered;
- the utterance being heard when the transfer's turn finishes is heard out, not cut off;
- speech going on at a refusal is heard as speech over the bot, from its real onset;
- speech after a farewell's turn finished is not recognised (nobody would answer it) but
  counted in InputsUnanswered ("session ended").

A stream lost (no ``stop``) while the carrier is asked reports its inputs with the reason
``"stream closed"``, one the carrier's ``stop`` ended then ``"stream stopped"`` (the
transfer's result is unknown then either way), not ``"transfer"``.

The speech stage's verdicts and the listener's transcripts are given by hand (as in
test_barge_in.py); audio time advances 20 ms per inbound frame.
"""

from __future__ import annotations

from typing import Any

from adapters.twilio.protocol import TwilioCall
from gateway.events import TRANSFER_FAILED, Response, ResponseEvent
from gateway.protocol.actions import CancelListening, EndSession, StartListening, StartTurn
from gateway.protocol.call import (
    MACHINE,
    HangUp,
    InputsUnanswered,
    Interrupt,
    PausePlayback,
    Play,
    ResumePlayback,
    State,
    Transfer,
)
from tests.adapters.twilio.test_barge_in import finish_turn, frames, hold, say_item, started
from tests.adapters.twilio.test_protocol import CALL, STOP, dtmf, mark
from tests.adapters.twilio.test_transfer_barge_in import next_input, transfer_turn
from tests.conftest import state_of


def types(actions: list[Any]) -> list[type]:
    return [type(a) for a in actions]


def asked(call: TwilioCall) -> None:
    """The transfer's turn finished and its final mark came back: the carrier is asked."""
    [transfer] = call.receive(mark("end-2"))
    assert transfer == Transfer(CALL, "+15550100", "agent")
    assert state_of(call) is State.TRANSFERRING


def speak(call: TwilioCall, n: int = 40) -> tuple[int, list[Any]]:
    """The caller speaks for ``n`` frames from now (voiced throughout), then is quiet for
    10: the onset and the actions."""
    onset = call.now_ms
    actions = frames(call, n, onset=onset, voiced=10_000)
    return onset, actions + frames(call, 10)


# ------------------------------------------------------------ while the carrier is asked


def test_words_said_while_the_carrier_is_asked_are_answered_after_a_refusal() -> None:
    """The caller says "hello are you there" while the carrier is asked for the transfer:
    the speech is heard (StartListening from its onset) and its words wait for the
    transfer's result; the carrier refuses, so ``#transfer-failed`` goes to the core first,
    then the words, each its turn. Before, no audio was fed in TRANSFERRING (no FeedAudio,
    audio time stood still) and the words were lost without a trace."""
    call = started()
    transfer_turn(call)
    assert types(finish_turn(call)) == [Play]
    asked(call)
    onset, actions = speak(call)
    [start] = actions
    assert isinstance(start, StartListening)
    assert start.from_ms is not None
    assert start.from_ms < onset  # from its onset (with the preroll)
    assert call.heard("final", "hello are you there", 0.9) == []
    assert call.waiting == ("hello are you there",)
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert next_input(call) == "hello are you there"
    assert finish_turn(call) == []
    assert state_of(call) is State.CALLER


def test_words_said_while_the_carrier_is_asked_are_said_unanswered_once_it_took_the_call() -> None:
    """As above, the carrier takes the call: the words get no turn (the person the call
    goes to hears the caller), counted in InputsUnanswered."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    speak(call)
    call.heard("final", "hello are you there", 0.9)
    unanswered, end = call.transfer_finished(True)
    assert unanswered == InputsUnanswered("transfer", 1)
    assert isinstance(end, EndSession)


def test_an_utterance_open_when_the_carrier_took_the_call_is_cancelled_and_said() -> None:
    """The caller still speaks when the carrier takes the call: the listener is cancelled
    and InputsUnanswered says an utterance was being heard."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    frames(call, 20, onset=call.now_ms, voiced=10_000)
    unanswered, end, cancel = call.transfer_finished(True)
    assert isinstance(cancel, CancelListening)
    assert cancel.stream == call.stream
    assert unanswered == InputsUnanswered("transfer", 0, listening=True)
    assert isinstance(end, EndSession)


def test_words_whose_final_comes_after_a_refusal_wait_after_transfer_failed() -> None:
    """The caller's speech while the carrier is asked ended before the refusal, its final
    comes after it: the words still wait after ``#transfer-failed`` (said while the
    transfer was asked; not a race with the recognizer), whose answer is not cut off."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    speak(call)
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert state_of(call) is State.BOT
    assert call.heard("final", "hello are you there", 0.9) == []  # the turn runs: it waits
    assert call.waiting == ("hello are you there",)
    say_item(call, "Sorry, nobody is free.")  # the answer to #transfer-failed plays out
    assert finish_turn(call) == []
    [words] = call.receive(mark("3"))
    assert isinstance(words, StartTurn)
    assert words.input.text == "hello are you there"
    assert "interrupted" not in words.input.attributes


def test_speech_going_on_at_a_refusal_is_speech_over_the_bot_from_its_onset() -> None:
    """The caller speaks while the carrier is asked and goes on as it refuses: the
    utterance (open since its onset) is speech over the bot's floor now, held and judged
    as any: a real interruption, its words the input after ``#transfer-failed``. Before,
    the speech kept the onset it had when audio time stood still, older than the bot's
    floor, so nothing of it was heard until the caller's next speech."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    onset = call.now_ms
    [start] = frames(call, 20, onset=onset, voiced=10_000)
    assert isinstance(start, StartListening)
    turn, pause = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert isinstance(pause, PausePlayback)
    assert state_of(call) is State.HOLDING
    actions = frames(call, 40, onset=onset, voiced=10_000)  # voiced past any backchannel
    assert types(actions) == [Interrupt]
    assert state_of(call) is State.HEARING
    frames(call, 10)
    assert call.heard("final", "I need to speak to someone now", 0.9) == []
    [words] = finish_turn(call)  # #transfer-failed's turn (cut off) finishes
    assert isinstance(words, StartTurn)
    assert words.input.text == "I need to speak to someone now"
    assert words.input.attributes["interrupted"] is True


def test_a_key_pressed_during_speech_going_on_at_a_refusal_comes_after_its_words() -> None:
    """The caller speaks while the carrier is asked, presses 0 mid-sentence and goes on as
    the carrier refuses: the utterance is speech over the bot's floor now with a key
    pressed during it, as a key over the paused bot (module doc step 5): the bot is cut
    off, the utterance heard out and judged as speech over it, its words the input before
    the key (the order said). Before, the key was released at the refusal and waited
    ahead of the words: the core got "0" before "I need the sales team"."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    onset = call.now_ms
    frames(call, 20, onset=onset, voiced=10_000)
    assert call.receive(dtmf("0")) == []
    turn, cut = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert isinstance(cut, Interrupt)
    assert call.waiting == ()  # the key waits for the words
    frames(call, 20, onset=onset, voiced=10_000)
    frames(call, 10)
    assert call.heard("final", "I need the sales team", 0.9) == []
    assert list(call.waiting) == ["I need the sales team", "0"]
    assert next_input(call) == "I need the sales team"
    assert next_input(call) == "0"


def test_a_backchannel_with_a_key_pressed_at_a_refusal_leaves_the_key_alone() -> None:
    """As above, the speech is "uh huh": the key cut the bot off (no ResumePlayback for the
    backchannel), and judged as speech over the bot the "uh huh" is no input; the key is,
    after ``#transfer-failed``."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    onset = call.now_ms
    frames(call, 20, onset=onset, voiced=10_000)
    call.receive(dtmf("0"))
    call.transfer_finished(False, "busy")
    frames(call, 10)
    assert call.heard("final", "uh huh", 0.9) == []
    assert call.waiting == ("0",)
    assert next_input(call) == "0"


# ------------------------------------------------------------ at the transfer's turn end


def test_an_utterance_heard_when_the_transfer_s_turn_finishes_is_heard_out() -> None:
    """The caller's words cut off the announcement and are still being heard when the
    transfer's turn finishes: the utterance is heard out (no CancelListening) and its
    words are kept for the transfer's result; refused, they are answered after
    ``#transfer-failed``. Before, the utterance was cancelled then and its words lost."""
    call = started()
    transfer_turn(call)
    onset = hold(call)
    assert Interrupt in types(frames(call, 60, onset=onset, voiced=10_000))
    assert state_of(call) is State.HEARING
    assert types(finish_turn(call)) == [Play]  # no CancelListening, nothing unanswered
    frames(call, 10, onset=onset, voiced=10_000)  # the caller goes on (fed, heard)
    frames(call, 10)
    assert call.heard("final", "no wait I changed my mind", 0.9) == []
    assert call.waiting == ("no wait I changed my mind",)
    asked(call)
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    assert next_input(call) == "no wait I changed my mind"


def test_speech_held_when_the_transfer_s_turn_finishes_is_judged_a_backchannel_dropped() -> None:
    """Speech over the announcement being judged when its turn finishes: the announcement
    is said all the same (ResumePlayback) and the utterance heard out, judged as speech
    over the bot: "okay" is a backchannel, no input; a refusal gives ``#transfer-failed``
    alone."""
    call = started()
    transfer_turn(call)
    hold(call)
    assert types(finish_turn(call)) == [ResumePlayback, Play]
    frames(call, 10)
    assert call.heard("final", "okay", 0.9) == []
    assert call.waiting == ()
    asked(call)
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert finish_turn(call) == []
    assert state_of(call) is State.CALLER


def test_a_backchannel_begun_over_the_announcement_s_rest_is_judged_when_heard_later() -> None:
    """Speech over the announcement is heard out after its turn finished; while its final
    is awaited the caller says "okay" over the announcement's rest, and that final comes
    only once the carrier is asked: the "okay" (heard from its onset then) began over the
    bot's audio, so it is judged as speech over it, a backchannel, no input. Before, it
    was judged by when it was opened (TRANSFERRING: not over the bot), so after a refusal
    the core got "no wait I want sales okay"."""
    call = started()
    transfer_turn(call)
    onset = hold(call)
    assert types(finish_turn(call)) == [ResumePlayback, Play]
    frames(call, 20, onset=onset, voiced=10_000)
    frames(call, 10)  # the speech ended: its final is awaited
    okay = call.now_ms
    assert frames(call, 15, onset=okay, voiced=10_000) == []  # "okay", over the rest
    asked(call)
    frames(call, 5, onset=okay, voiced=10_000)
    frames(call, 10)
    [start] = call.heard("final", "no wait I want sales", 0.9)
    assert isinstance(start, StartListening)  # the "okay", from its onset
    assert start.from_ms is not None
    assert start.from_ms < okay
    assert call.heard("final", "okay", 0.9) == []
    assert call.waiting == ("no wait I want sales",)
    call.transfer_finished(False, "busy")
    assert next_input(call) == "no wait I want sales"
    assert finish_turn(call) == []


def test_a_key_pressed_while_the_caller_speaks_after_the_turn_comes_after_the_words() -> None:
    """A key pressed while the caller speaks during the transfer request comes after the
    utterance's words (they began first), each its own input after a refusal."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    onset = call.now_ms
    frames(call, 20, onset=onset, voiced=10_000)
    assert call.receive(dtmf("0")) == []
    frames(call, 10)
    assert call.waiting == ()  # the key waits for the words
    call.heard("final", "operator", 0.9)
    assert state_of(call) is State.TRANSFERRING
    assert list(call.waiting) == ["operator", "0"]
    call.transfer_finished(False, "busy")
    assert next_input(call) == "operator"
    assert next_input(call) == "0"


# ------------------------------------------------------------ an answering machine


def test_a_machine_detected_while_the_carrier_is_asked_is_told_after_a_refusal() -> None:
    """An outbound call's transfer is asked; the callee's voicemail greeting is heard
    meanwhile (an utterance opened), then the answering-machine result comes: the greeting
    is no caller's words (the utterance is cancelled, no more speech is heard), and once
    the carrier refused the transfer the core gets ``#machine`` after
    ``#transfer-failed`` (it leaves its message or hangs up). Before, the result was
    ignored and the greeting's words reached the core as the caller's input after
    ``#transfer-failed``; ``#machine`` never came."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    onset = call.now_ms
    [start] = frames(call, 20, onset=onset, voiced=10_000)
    assert isinstance(start, StartListening)
    assert call.machine_answered("machine_end_beep") == [CancelListening(start.stream)]
    assert call.heard("final", "hi you have reached john leave a message", 0.9) == []
    _, actions = speak(call)  # more of the greeting: not heard
    assert actions == []
    assert call.waiting == ()
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == TRANSFER_FAILED
    [machine] = finish_turn(call)
    assert isinstance(machine, StartTurn)
    assert machine.input.text == MACHINE
    assert machine.input.attributes == {"answeredBy": "machine_end_beep"}
    assert finish_turn(call) == []
    assert call.waiting == ()


def test_a_machine_detected_while_the_announcement_ends_leaves_the_transfer_alone() -> None:
    """The result comes while the transfer's announcement plays out (its turn finished):
    the transfer is still asked (the call is handed over), the words over the
    announcement are dropped (the machine's); taken, nothing more; a key pressed is a
    person's and stays, before ``#machine``, when the carrier refuses."""
    call = started()
    transfer_turn(call)
    hold(call)
    call.heard("final", "hi you have reached", 0.9)
    finish_turn(call)
    assert call.waiting == ("hi you have reached",)
    call.receive(dtmf("5"))
    assert call.machine_answered("machine_start") == []
    assert call.waiting == ("5",)
    asked(call)
    call.transfer_finished(False, "busy")
    assert next_input(call) == "5"
    assert next_input(call) == MACHINE


# ------------------------------------------------------------ the farewell


def test_speech_after_a_farewell_s_turn_finished_is_counted_not_recognised() -> None:
    """Speech while the farewell's last audio plays opens no listener (nobody would
    answer it: no recognition), but it is said at the hang-up, in InputsUnanswered
    ("session ended"). Before, it was not fed nor logged at all."""
    call = started()
    say_item(call, "Goodbye.")
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    [final] = call.turn_finished()
    assert isinstance(final, Play)
    _, actions = speak(call)
    assert actions == []  # not recognised
    _, actions = speak(call)
    assert actions == []
    unanswered, hang_up = call.receive(mark("end-2"))
    assert unanswered == InputsUnanswered("session ended", 0, utterances=2)
    assert hang_up == HangUp(CALL)


def test_speech_after_a_farewell_is_said_at_a_stop_too() -> None:
    call = started()
    say_item(call, "Goodbye.")
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    call.turn_finished()
    speak(call)
    assert call.receive(STOP) == [InputsUnanswered("session ended", 0, utterances=1)]


# ------------------------------------------------------------ the stream ended while asked


def test_inputs_kept_for_a_transfer_are_said_stream_closed_when_the_socket_drops() -> None:
    """Our socket drops (no ``stop``) while the carrier is asked: the transfer's result is
    not known (the carrier may still refuse it), and the stream is gone, so the kept
    inputs get no turn; the reason says the stream closed, not that the call was
    transferred. A refusal after that changes nothing."""
    call = started()
    transfer_turn(call)
    hold(call)
    call.heard("final", "no wait", 0.9)
    finish_turn(call)
    asked(call)
    unanswered, end = call.connection_lost()
    assert unanswered == InputsUnanswered("stream closed", 1)
    assert isinstance(end, EndSession)
    assert call.transfer_finished(False, "busy") == []


def test_inputs_kept_for_a_transfer_are_said_stream_stopped_at_the_carrier_s_stop() -> None:
    """The carrier's ``stop`` comes while it is asked for the transfer, before its answer:
    its transfer ends the stream so, but so does the caller hanging up, after which the
    carrier refuses the transfer. The kept inputs get no turn (the stream is over), and
    the reason says the stream stopped, not that the call was transferred: the
    transfer's result is not known then (the runner logs it on its own). Before, the
    reason was ``"transfer"`` ("the call is transferred") whatever the carrier answered."""
    call = started()
    transfer_turn(call)
    hold(call)
    call.heard("final", "no wait", 0.9)
    finish_turn(call)
    asked(call)
    frames(call, 20, onset=call.now_ms, voiced=10_000)  # the caller still speaks
    unanswered, end, cancel = call.receive(STOP)
    assert unanswered == InputsUnanswered("stream stopped", 1, listening=True)
    assert isinstance(end, EndSession)
    assert isinstance(cancel, CancelListening)
    assert call.transfer_finished(False, "the caller hung up") == []  # nothing more
    assert call.closed


def test_speech_just_begun_at_a_refusal_is_speech_over_the_bot_from_its_onset() -> None:
    """The caller starts speaking just before the carrier refuses (too short yet to be
    heard): once long enough it is speech over the bot's floor, heard from its onset
    (StartListening from before the refusal)."""
    call = started()
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    onset = call.now_ms
    assert frames(call, 4, onset=onset, voiced=10_000) == []  # 80 ms
    [turn] = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    pause, start = frames(call, 4, onset=onset, voiced=10_000)
    assert isinstance(pause, PausePlayback)
    assert isinstance(start, StartListening)
    assert start.from_ms is not None
    assert start.from_ms < onset  # from its onset, not from the refusal


def test_speech_going_on_at_a_refusal_interrupts_at_once_where_the_bot_cannot_pause() -> None:
    """Barge-in without judging (GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS=0; Plivo and Exotel,
    which cannot pause, judge while the bot plays on: test_call_unpaced.py): the speech going
    on at the refusal cuts the bot off at once, its utterance heard on (no second
    StartListening)."""
    call = started(barge_in_max_backchannel_ms=0)
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    frames(call, 20, onset=call.now_ms, voiced=10_000)
    turn, cut = call.transfer_finished(False, "busy")
    assert isinstance(turn, StartTurn)
    assert isinstance(cut, Interrupt)
    assert state_of(call) is State.HEARING
    frames(call, 10)
    assert call.heard("final", "is anybody there", 0.9) == []
    assert next_input(call) == "is anybody there"


def test_keys_collected_while_the_carrier_is_asked_end_at_their_pause() -> None:
    """``collect`` mode: audio time goes on while the carrier is asked, so the pause after
    keys ends them there as anywhere: two inputs, each its turn after a refusal."""
    call = started(dtmf_mode="collect")
    transfer_turn(call)
    finish_turn(call)
    asked(call)
    for key in "12":
        call.receive(dtmf(key))
    frames(call, 110)  # 2.2 s: past the 2 s pause
    assert call.waiting == ("12",)
    for key in "34":
        call.receive(dtmf(key))
    call.transfer_finished(False, "busy")
    assert list(call.waiting) == ["12", "34"]
