"""Keys (DTMF) pressed while the caller speaks, the call engine's rules, pure (module doc
of gateway/protocol/call.py, "Inputs that wait"): the utterance open when a key comes is
heard out, its words an input; the keys are inputs of their own, after the words (the
words began first: the order the caller used). ``collect`` mode keeps collecting. Also
the keys of an answering machine's call (``#machine``) and what a transfer's (or a
farewell's) end drops.

The speech stage's verdicts and the listener's transcripts are given by hand, as in
test_barge_in.py (the real VAD and recognizer: test_barge_in_calls.py).
"""

from __future__ import annotations

from typing import Any

from adapters.twilio.protocol import TwilioCall
from gateway.events import INTERRUPTED
from gateway.protocol.actions import CancelListening, EndSession, StartListening, StartTurn
from gateway.protocol.call import (
    MAX_WAITING_INPUTS,
    InputsDropped,
    Interrupt,
    ResumePlayback,
    State,
)
from tests.adapters.twilio.test_barge_in import (
    finish_turn,
    frames,
    hold,
    say_item,
    started,
)
from tests.adapters.twilio.test_protocol import STOP, dtmf, mark
from tests.conftest import state_of


def speaking(**config: Any) -> tuple[TwilioCall, int]:
    """The caller's floor (no turn runs), then the caller speaks: an utterance is open
    (HEARING, no final yet). The call and the speech's onset."""
    call = started(**config)
    say_item(call, "How can I help?")
    assert finish_turn(call) == []
    assert call.receive(mark("1")) == []
    assert state_of(call) is State.CALLER
    onset = call.now_ms
    assert [type(a) for a in frames(call, 10, onset=onset, voiced=10_000)] == [StartListening]
    assert call.state is State.HEARING
    return call, onset


def texts(actions: list[Any]) -> list[str]:
    return [a.input.text for a in actions if isinstance(a, StartTurn)]


def test_a_key_pressed_while_the_caller_speaks_comes_after_the_words() -> None:
    """``digit`` mode: "I want to talk to" ... 5 pressed mid-sentence ... "sales": the
    utterance is heard out (no CancelListening), its words are the input and the key the
    one after them, each its own turn. Before, the key cancelled the utterance: its
    words were lost and only "5" reached the core."""
    call, onset = speaking()
    assert call.receive(dtmf("5")) == []  # no CancelListening, no turn over the caller
    assert call.state is State.HEARING
    assert frames(call, 20, onset=onset, voiced=10_000) == []  # the caller speaks on
    assert frames(call, 5) == []  # ended
    assert texts(call.heard("final", "i want to talk to sales", 0.9)) == ["i want to talk to sales"]
    assert list(call.waiting) == ["5"]
    assert texts(finish_turn(call)) == ["5"]
    assert finish_turn(call) == []
    assert call.receive(mark("2")) == []
    assert state_of(call) is State.CALLER


def test_keys_pressed_during_a_wordless_utterance_are_the_inputs() -> None:
    """``digit`` mode: 1, 2 pressed while a cough is heard (nothing recognised): the keys
    are the inputs, in the order pressed, once the utterance is over (the bot does not
    answer over the caller). Before, the first key cancelled the utterance."""
    call, _ = speaking()
    assert call.receive(dtmf("1")) == []
    assert call.receive(dtmf("2")) == []
    assert frames(call, 5) == []
    assert texts(call.heard("silence", "")) == ["1"]
    assert list(call.waiting) == ["2"]
    assert texts(finish_turn(call)) == ["2"]


def test_a_listener_failure_after_a_key_pressed_while_speaking_leaves_the_key() -> None:
    """The recognizer fails on the utterance a key was pressed in: the key is the input
    (``#fallback``, "no words came", never waits beside an input)."""
    call, _ = speaking()
    assert call.receive(dtmf("7")) == []
    assert texts(call.listener_failed()) == ["7"]
    assert call.waiting == ()


def test_collect_mode_keys_finished_while_speaking_come_after_the_words() -> None:
    """``collect`` mode: 1, 2, # pressed while the caller speaks: "12" is one input, after
    the utterance's words. Before, the first key cancelled the utterance."""
    call, _ = speaking(dtmf_mode="collect")
    for key in "12#":
        assert call.receive(dtmf(key)) == []
    assert call.state is State.HEARING
    assert frames(call, 5) == []
    assert texts(call.heard("final", "my account number is", 0.9)) == ["my account number is"]
    assert list(call.waiting) == ["12"]
    assert texts(finish_turn(call)) == ["12"]


def test_collect_mode_keys_still_collected_at_the_final_keep_collecting_the_words_wait() -> None:
    """``collect`` mode: "my account number is" and 1, 2 pressed while saying it; the final
    comes before ``#`` or the pause: the words wait on the caller's floor (no turn while
    the caller types), 3 and ``#`` finish the keys: the words' turn, then "123". The
    collection is not cut at the final. Before, the first key cancelled the utterance."""
    call, _ = speaking(dtmf_mode="collect")
    for key in "12":
        assert call.receive(dtmf(key)) == []
    assert frames(call, 5) == []
    assert call.heard("final", "my account number is", 0.9) == []
    assert state_of(call) is State.CALLER
    assert list(call.waiting) == ["my account number is"]
    assert frames(call, 50) == []  # within the keys' pause (2 s): the caller types on
    assert call.receive(dtmf("3")) == []
    assert texts(call.receive(dtmf("#"))) == ["my account number is"]
    assert list(call.waiting) == ["123"]
    assert texts(finish_turn(call)) == ["123"]


def test_collect_mode_keys_still_collected_at_the_final_end_with_their_pause() -> None:
    """As above, the keys ended by their pause (2 s) instead of ``#``."""
    call, _ = speaking(dtmf_mode="collect")
    assert call.receive(dtmf("4")) == []
    assert frames(call, 5) == []
    assert call.heard("final", "my pin is", 0.9) == []
    assert texts(frames(call, 100)) == ["my pin is"]
    assert list(call.waiting) == ["4"]


def test_keys_begun_before_an_utterance_and_finished_in_it_still_go_first() -> None:
    """``collect`` mode: 1 pressed on the caller's floor, the caller speaks, 2 and ``#``
    pressed while speaking: the keys began before the words, so "12" goes first (the
    rule for keys collected when words come), the words after."""
    call = started(dtmf_mode="collect")
    say_item(call, "How can I help?")
    finish_turn(call)
    call.receive(mark("1"))
    assert call.receive(dtmf("1")) == []
    onset = call.now_ms
    assert [type(a) for a in frames(call, 10, onset=onset, voiced=10_000)] == [StartListening]
    assert call.receive(dtmf("2")) == []
    assert call.receive(dtmf("#")) == []  # done while the caller speaks: waits for the end
    assert list(call.waiting) == ["12"]
    assert frames(call, 5) == []
    assert texts(call.heard("final", "that is my code", 0.9)) == ["12"]
    assert list(call.waiting) == ["that is my code"]


def test_a_key_while_holding_lets_a_real_interruption_be_the_input_before_it() -> None:
    """Speech over the bot ("wait I need the billing team") pauses it, a key is pressed
    while it is held: the key cuts the bot off, the utterance is heard out and, being a
    real interruption, is the input (with what was heard of the bot), the key after it.
    Before, the key cancelled the utterance: its words were lost."""
    call = started()
    say_item(call, "Press 1 for sales, 2 for support.", b"\x00" * 24_000)
    onset = hold(call)
    actions = call.receive(dtmf("2"))
    assert [type(a) for a in actions] == [Interrupt]
    assert frames(call, 10, onset=onset, voiced=10_000) == []
    assert frames(call, 5) == []
    assert call.heard("final", "wait i need the billing team", 0.9) == []  # the turn runs
    assert list(call.waiting) == ["wait i need the billing team", "2"]
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "wait i need the billing team"
    assert turn.input.attributes[INTERRUPTED] is True
    assert texts(finish_turn(call)) == ["2"]


def test_a_key_after_an_early_resume_hears_the_utterance_out() -> None:
    """The bot resumed over a backchannel whose final is still to come (judging); a key
    then cuts the bot off: no CancelListening, the final judged as speech over the bot (a
    backchannel: no input), the key the input. Before, the utterance was cancelled."""
    call = started()
    say_item(call, "Welcome to the shop. How can I help you today?", b"\x00" * 24_000)
    onset = hold(call)
    frames(call, 28, onset=onset, voiced=450)
    assert frames(call, 2, onset=onset, voiced=450) == [ResumePlayback()]
    actions = call.receive(dtmf("9"))
    assert [type(a) for a in actions] == [Interrupt]
    assert call.state is State.HEARING
    assert call.heard("final", "okay", 0.9) == []
    assert call.waiting == ("9",)
    assert texts(finish_turn(call)) == ["9"]


def test_a_hash_alone_while_holding_cuts_the_bot_off_and_no_backchannel_is_an_input() -> None:
    """``collect`` mode: ``#`` alone over the paused bot with an "uh huh": the bot is cut
    off, nothing is an input (no ``#fallback`` for the backchannel), the caller's floor."""
    call = started(dtmf_mode="collect")
    say_item(call, "Hello there.")
    hold(call)
    assert [type(a) for a in call.receive(dtmf("#"))] == [Interrupt]
    assert call.heard("final", "uh huh", 0.9) == []
    assert finish_turn(call) == []
    assert state_of(call) is State.CALLER
    assert call.waiting == ()


def test_keys_held_while_speaking_are_bounded() -> None:
    """A stream sending endless keys while the caller speaks: at most MAX_WAITING_INPUTS
    are held for after the words (the oldest dropped, said in InputsDropped), and with
    the words at most MAX_WAITING_INPUTS inputs wait in all: the oldest input (here the
    words) dropped first, the engine's rule for every input waiting."""
    call, _ = speaking()
    keys = "1234567890*1234567"
    for key in keys[:MAX_WAITING_INPUTS]:
        assert call.receive(dtmf(key)) == []
    assert call.receive(dtmf(keys[MAX_WAITING_INPUTS])) == [InputsDropped(inputs=1)]
    actions = call.heard("final", "hello", 0.9)
    assert InputsDropped(inputs=1) in actions  # "hello" and 16 keys: the oldest goes
    assert texts(actions) == [keys[1]]
    assert call.waiting == tuple(keys[2 : MAX_WAITING_INPUTS + 1])


def test_keys_pressed_while_speaking_reach_the_core_when_the_caller_hangs_up() -> None:
    """1 pressed while speaking, then the caller hangs up before the final: the
    utterance is cancelled (no final will come) but the key is the caller's last input."""
    call, _ = speaking()
    assert call.receive(dtmf("1")) == []
    actions = call.receive(STOP)
    assert [type(a) for a in actions] == [StartTurn, CancelListening, EndSession]
    assert texts(actions) == ["1"]


def test_keys_waiting_when_a_machine_is_detected_are_kept_before_it() -> None:
    """Keys wait behind the bot's turn (no barge-in) when an answering machine is
    detected: a human pressed them, so they stay (words waiting, the machine's greeting,
    are dropped) and go before ``#machine``. Before, they were dropped with the words."""
    call = started(barge_in=False)
    say_item(call, "Hello, this is a long answer.", b"\x00" * 40_000)
    assert call.receive(dtmf("3")) == []
    assert list(call.waiting) == ["3"]
    assert [type(a) for a in call.machine_answered("machine_start")] == [Interrupt]
    assert list(call.waiting) == ["3", "#machine"]
    assert texts(finish_turn(call)) == ["3"]
    assert texts(finish_turn(call)) == ["#machine"]


def test_keys_pressed_while_a_machine_s_greeting_is_heard_go_before_machine() -> None:
    """``digit`` mode: 4 pressed while a greeting is heard, then the machine is detected:
    the utterance is cancelled (the machine's), the key (a human's) goes first."""
    call, _ = speaking()
    assert call.receive(dtmf("4")) == []
    actions = call.machine_answered("machine_end_beep")
    assert [type(a) for a in actions] == [CancelListening, StartTurn]
    assert texts(actions) == ["4"]
    assert list(call.waiting) == ["#machine"]


def speaks_again(call: TwilioCall, onset: int) -> int:
    """The utterance open since ``onset`` ends (the endpointer), then the caller speaks
    again before its final came (a recognizer behind the caller): 300 ms of that next
    speech. Its onset."""
    assert frames(call, 20, onset=onset, voiced=10_000) == []
    assert frames(call, 5) == []  # ended: its final is awaited
    again = call.now_ms
    assert frames(call, 15, onset=again, voiced=10_000) == []
    return again


def test_a_key_pressed_during_the_next_speech_comes_after_its_words() -> None:
    """ "i want" (its final late) ... "sales please" with 5 pressed during the second: the
    key comes after the words said with it, not between the two. The first final makes
    "i want" the input; the speech going on is speech over its answer, and a key over the
    bot is a real interruption: it is heard out at once (no pause to judge it), its words
    the input, 5 after them. Before, 5 was released with the first final: "i want", "5",
    "sales please"."""
    call, onset = speaking()
    again = speaks_again(call, onset)
    assert call.receive(dtmf("5")) == []
    actions = call.heard("final", "i want", 0.9)
    assert [type(a) for a in actions] == [StartTurn, Interrupt, StartListening]
    assert texts(actions) == ["i want"]
    assert call.waiting == ()  # 5 is held for the speech going on
    assert frames(call, 10, onset=again, voiced=10_000) == []
    assert frames(call, 5) == []
    assert call.heard("final", "sales please", 0.9) == []  # "i want"'s turn still runs
    assert list(call.waiting) == ["sales please", "5"]
    assert texts(finish_turn(call)) == ["sales please"]
    assert texts(finish_turn(call)) == ["5"]


def test_a_key_during_the_next_speech_after_a_wordless_utterance_comes_after_its_words() -> None:
    """A cough (no words), then "sales please" begun before the cough's result came, 5
    pressed during it: the cough is nothing, "sales please" is the next utterance and 5
    comes after it. Before, 5 was the input at the cough's result and "sales please" was
    heard as speech over the key's answer."""
    call, onset = speaking()
    again = speaks_again(call, onset)
    assert call.receive(dtmf("5")) == []
    assert [type(a) for a in call.heard("silence", "")] == [StartListening]
    assert call.state is State.HEARING
    assert call.waiting == ()
    assert frames(call, 10, onset=again, voiced=10_000) == []
    assert frames(call, 5) == []
    assert texts(call.heard("final", "sales please", 0.9)) == ["sales please"]
    assert list(call.waiting) == ["5"]


def test_keys_collected_during_the_next_speech_come_after_its_words() -> None:
    """``collect`` mode: "my number is" (its final late) ... "one two" with 1, 2 pressed
    during the second, ``#`` once its final is awaited: the words are one input (the
    caller's floor: they wait while the keys are collected, then join), "12" after them.
    Before, "12" went between the two utterances' words."""
    call, onset = speaking(dtmf_mode="collect")
    again = speaks_again(call, onset)
    for key in "12":
        assert call.receive(dtmf(key)) == []
    assert [type(a) for a in call.heard("final", "my number is", 0.9)] == [StartListening]
    assert call.state is State.HEARING  # the next speech, heard from its onset
    assert frames(call, 10, onset=again, voiced=10_000) == []
    assert frames(call, 5) == []
    assert call.receive(dtmf("#")) == []  # done while that speech is heard: held
    assert texts(call.heard("final", "one two", 0.9)) == ["my number is one two"]
    assert list(call.waiting) == ["12"]


def test_keys_of_the_next_speech_reach_the_core_when_the_caller_hangs_up() -> None:
    """3 pressed in the utterance, 4 in the speech after it, then the caller hangs up
    before the final: both keys reach the core, in the order pressed."""
    call, onset = speaking()
    assert call.receive(dtmf("3")) == []
    speaks_again(call, onset)
    assert call.receive(dtmf("4")) == []
    actions = call.receive(STOP)
    assert texts(actions) == ["3"]
    assert list(call.waiting) == ["4"]
    assert texts(finish_turn(call)) == ["4"]
