"""Barge-in without false stops (issue 16 item 3), the call engine's decision table, pure:
speech over the bot pauses it (PausePlayback); a backchannel, a filler or noise resumes it
(ResumePlayback, nothing cleared); a word that is no backchannel, or voiced speech longer
than any backchannel, clears it (Interrupt) and the next input says what was heard.

The speech stage's verdicts (onset, voiced length) and the listener's transcripts are
given by hand here (the real VAD and recognizer run in test_barge_in_calls.py); audio
time advances by 20 ms of inbound silence per step.
"""

from __future__ import annotations

from typing import Any

import pytest

from adapters.twilio.protocol import TwilioCall
from gateway.events import (
    HEARD,
    INTERRUPTED,
    UNHEARD,
    BinaryEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
)
from gateway.io.call import call_config
from gateway.protocol.actions import (
    CancelListening,
    EndSession,
    FeedAudio,
    StartListening,
    StartTurn,
)
from gateway.protocol.call import (
    MAX_JOINED_CHARS,
    MAX_WAITING_INPUTS,
    CallConfig,
    InputsDropped,
    InputsUnanswered,
    Interrupt,
    PausePlayback,
    Play,
    Playout,
    ResumePlayback,
    State,
    spoken_words,
)
from gateway.settings import Settings
from gateway.speech.endofturn import content_words
from tests.adapters.twilio.test_protocol import CALL, CONNECTED, START, STOP, dtmf, mark, media
from tests.conftest import state_of

SILENCE = b"\xff" * 160
SECOND = b"\x00" * 8000  # one second of μ-law answer


def started(**config: Any) -> TwilioCall:
    call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True, **config))
    call.receive(CONNECTED)
    [turn] = call.receive(START)
    assert isinstance(turn, StartTurn)
    return call


def say_item(call: TwilioCall, item: str | ResponseItem, audio: bytes = SECOND) -> Play:
    """The running turn says one item (``item``, or an item of that text): its audio
    queued, its mark not echoed."""
    if isinstance(item, str):
        item = ResponseItem(text=item)
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    [play] = call.turn_event(BinaryEvent(data=audio))
    assert isinstance(play, Play)
    return play


def frames(call: TwilioCall, n: int, *, onset: int | None = None, voiced: int = 0) -> list[Any]:
    """``n`` inbound frames (20 ms each) with the stage's verdict after each: speech since
    audio time ``onset`` (None: nobody speaks), voiced for ``voiced`` ms more per frame
    up to the frame's end. The actions, FeedAudio left out."""
    out: list[Any] = []
    for _ in range(n):
        [feed] = call.receive(media(SILENCE))
        assert isinstance(feed, FeedAudio)
        voiced_ms = 0 if onset is None else min(call.now_ms - onset, voiced)
        started = onset is not None and call.now_ms - onset == 160
        out += call.voice(onset, started=started, voiced_ms=voiced_ms)
    return out


def hold(call: TwilioCall) -> int:
    """The caller starts speaking over the bot: 160 ms of speech pauses it. The onset."""
    frames(call, 10)
    onset = call.now_ms
    actions = frames(call, 8, onset=onset, voiced=10_000)  # 160 ms of speech
    assert [type(a) for a in actions] == [PausePlayback, StartListening]
    assert call.state is State.HOLDING
    return onset


def interrupted_in_the_second_item(call: TwilioCall) -> StartTurn:
    """The running turn has queued two items of audio (the first 1 s, the second 2 s): the
    first's mark ("1") comes back after 1 s of the caller's silence, the caller then barges
    in (360 ms into the second) and says ``what``, which interrupts; the turn ends.
    Returns the next turn (its input's attributes: what was heard)."""
    frames(call, 50)  # 1 s
    call.receive(mark("1"))
    hold(call)  # 360 ms into the 2 s second item
    assert isinstance(call.heard("final", "what")[0], Interrupt)
    call.turn_event(ResponseEvent(response=Response()))
    [turn] = call.turn_finished()
    assert isinstance(turn, StartTurn)
    return turn


def heard_in_the_second_item(call: TwilioCall, heard: str, unheard: str) -> None:
    """:func:`interrupted_in_the_second_item`: the next input's attributes say it was
    interrupted, ``heard`` and ``unheard``, and nothing else."""
    turn = interrupted_in_the_second_item(call)
    assert turn.input.attributes == {INTERRUPTED: True, HEARD: heard, UNHEARD: unheard}


@pytest.mark.parametrize(
    ("interim", "final"),
    [
        ("uh huh", "uh huh"),
        ("yeah", "yeah"),
        ("mm", "mm hmm"),
        ("okay", "okay"),
        ("", "yes"),
        ("", ""),  # noise: nothing recognised
        ("um", "um okay"),  # a filler
    ],
)
def test_backchannels_and_noise_pause_and_resume_the_bot(interim: str, final: str) -> None:
    call = started()
    say_item(call, "Welcome to the shop. How can I help you today?")
    onset = hold(call)
    actions = call.interim(interim) if interim else []
    # to 720 ms after the onset: 450 ms voiced, then 270 ms quiet
    actions += frames(call, 28, onset=onset, voiced=450)
    assert actions == []
    # 300 ms quiet without a content word: the audio resumes before the final
    assert frames(call, 2, onset=onset, voiced=450) == [ResumePlayback()]
    assert call.state is State.BOT
    assert frames(call, 20) == []  # the speech ended
    assert call.heard("final" if final else "silence", final, 0.9) == []  # judged: no stop
    assert call.state is State.BOT
    assert call.interruption is None
    # the answer plays on: its mark comes back and the caller has the floor
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    assert call.receive(mark("1")) == []
    assert state_of(call) is State.CALLER


def test_a_partial_behind_the_speech_does_not_resume_the_bot() -> None:
    """ "wait, | I want to change my order" with a recognizer behind the caller: 300 ms
    after "wait" the partial is still empty, but it has not heard "wait" yet (heard_to_ms
    before the voiced end), so the bot stays paused; the words then interrupt it. Once the
    recognizer has heard the speech and it holds no content word, the bot resumes."""
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    voiced_end = onset + 200

    def behind(n: int, heard_to_ms: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            [feed] = call.receive(media(SILENCE))
            assert isinstance(feed, FeedAudio)
            voiced = min(call.now_ms - onset, 200)
            out += call.voice(onset, started=False, voiced_ms=voiced, heard_to_ms=heard_to_ms)
        return out

    # 200 ms voiced, then 340 ms of the comma's quiet; the recognizer is at the onset
    assert behind(10 + 17, onset) == []
    assert call.state is State.HOLDING
    [interrupt] = call.interim("wait i want to change")
    assert isinstance(interrupt, Interrupt)
    # the same speech, recognised up to its voiced end and holding no content word: resume
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    voiced_end = onset + 200
    assert behind(10 + 14, onset) == []
    assert behind(1, voiced_end) == [ResumePlayback()]


def test_a_word_that_is_no_backchannel_interrupts_at_once() -> None:
    call = started()
    say_item(call, "Your order of two pizzas will arrive in thirty minutes.", SECOND * 3)
    call.receive(media(SILENCE))  # audio time passes while it plays
    onset = hold(call)
    assert frames(call, 5, onset=onset, voiced=10_000) == []
    assert call.interim("okay") == []  # a backchannel
    assert call.interim("okay wait") == []  # one content word: the final decides
    [interrupt] = call.interim("okay wait i want to change")
    assert isinstance(interrupt, Interrupt)
    assert call.state is State.HEARING
    assert call.marks.outstanding == 0
    # the turn's rest is dropped; the utterance's final text is the next input
    assert call.turn_event(BinaryEvent(data=SECOND)) == []
    assert call.turn_finished() == []
    [turn] = call.heard("final", "okay wait i want to change my order")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "okay wait i want to change my order"
    attributes = turn.input.attributes
    assert attributes[INTERRUPTED] is True
    # paused 380 ms into the 3 s item: the whole words of its first 13% were heard
    assert attributes[HEARD] == "Your"
    assert attributes[UNHEARD] == "order of two pizzas will arrive in thirty minutes."


def test_a_final_text_that_is_no_backchannel_interrupts() -> None:
    call = started()
    say_item(call, "Hello.")
    hold(call)
    actions = call.heard("final", "stop")
    assert [type(a) for a in actions] == [Interrupt]  # the turn still runs: the input waits
    assert call.pending == "stop"
    call.turn_event(ResponseEvent(response=Response()))
    [turn] = call.turn_finished()
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "stop"
    assert turn.input.attributes[INTERRUPTED] is True


def test_speech_longer_than_any_backchannel_interrupts_without_words() -> None:
    call = started(barge_in_max_backchannel_ms=800)
    say_item(call, "Hello.")
    onset = hold(call)
    actions = frames(call, 40, onset=onset, voiced=10_000)
    interrupts = [a for a in actions if isinstance(a, Interrupt)]
    assert len(interrupts) == 1
    assert call.state is State.HEARING
    assert call.voiced_ms >= 800


def test_voiced_length_not_trailing_silence_counts() -> None:
    """A 450 ms backchannel followed by the endpointer's 700 ms of trailing silence lasts
    1150 ms since its onset: not voiced long enough to interrupt."""
    call = started(barge_in_max_backchannel_ms=800)
    say_item(call, "Hello.")
    onset = hold(call)
    assert frames(call, 50, onset=onset, voiced=450) == [ResumePlayback()]
    assert call.state is State.BOT


def test_the_backchannel_list_is_configurable() -> None:
    call = started(barge_in_backchannels=("gotcha",))
    say_item(call, "Hello.", SECOND * 5)
    hold(call)
    assert call.heard("final", "gotcha", 0.9) == [ResumePlayback()]
    hold(call)
    actions = call.heard("final", "okay", 0.9)  # not listed here
    assert isinstance(actions[0], Interrupt)


def test_low_confidence_guesses_and_function_words_do_not_interrupt() -> None:
    """What pocketsphinx makes of Piper's "uh huh" ("up", 0.01) and "mm hmm" ("and hum",
    "in the")."""
    call = started()
    say_item(call, "Hello.", SECOND * 5)
    for text, confidence in (("up", 0.01), ("and hum", 0.9), ("in the", 0.55)):
        hold(call)
        assert call.interim(text) == []
        assert call.heard("final", text, confidence) == [ResumePlayback()], text
    hold(call)
    assert isinstance(call.heard("final", "stop", 0.5)[0], Interrupt)


def test_below_the_minimum_speech_nothing_happens() -> None:
    call = started(barge_in_min_speech_ms=300)
    say_item(call, "Hello.")
    frames(call, 5)
    assert frames(call, 14, onset=call.now_ms, voiced=10_000) == []
    assert call.state is State.BOT


def test_without_holding_speech_interrupts_at_once() -> None:
    call = started(barge_in_max_backchannel_ms=0)
    say_item(call, "Hello.")
    frames(call, 5)
    actions = frames(call, 8, onset=call.now_ms, voiced=10_000)
    assert [type(a) for a in actions] == [Interrupt, StartListening]
    assert call.state is State.HEARING


def test_a_key_while_holding_interrupts_and_is_the_input() -> None:
    """A key over the paused bot cuts it off; the utterance held is heard out (no
    CancelListening) and judged as speech over the bot: a backchannel is no input, the
    key is (with what was heard of the bot). Before, the utterance was cancelled."""
    call = started()
    say_item(call, "Hello there.")
    hold(call)
    actions = call.receive(dtmf("4"))
    assert [type(a) for a in actions] == [Interrupt]
    assert call.state is State.HEARING
    assert call.heard("final", "uh huh", 0.9) == []  # a backchannel: the key is the input
    call.turn_event(ResponseEvent(response=Response()))
    [turn] = call.turn_finished()  # the key's turn once the interrupted one ends
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "4"
    assert turn.input.attributes[INTERRUPTED] is True
    assert call.waiting == ()


def test_the_session_ending_while_holding_says_its_last_words() -> None:
    call = started()
    say_item(call, "Goodbye.")
    hold(call)
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    actions = call.turn_finished()
    assert [type(a) for a in actions] == [CancelListening, ResumePlayback, InputsUnanswered, Play]
    assert actions[2] == InputsUnanswered("session ended", 0, listening=True)  # for the log
    assert call.state is State.ENDING
    assert call.heard("final", "wait") == []  # too late: ignored


def test_a_recognizer_failure_while_holding_resumes() -> None:
    call = started()
    say_item(call, "Hello.")
    hold(call)
    assert call.listener_failed() == [ResumePlayback()]
    assert call.state is State.BOT


def test_the_stream_ending_while_holding_cancels_the_listener() -> None:
    call = started()
    say_item(call, "Hello.")
    hold(call)
    actions = call.connection_lost()
    assert isinstance(actions[0], CancelListening)


def test_after_a_resume_a_new_onset_holds_again() -> None:
    call = started()
    say_item(call, "Hello, this is a long answer.", SECOND * 5)
    hold(call)
    assert frames(call, 30) == []  # the speech ended: its final decides
    assert call.heard("final", "yeah") == [ResumePlayback()]
    hold(call)
    [interrupt] = call.interim("hold on please wait")
    assert isinstance(interrupt, Interrupt)


def test_speaking_on_after_an_early_resume_holds_again_and_is_judged() -> None:
    call = started()
    say_item(call, "Hello, this is a long answer.", SECOND * 5)
    onset = hold(call)
    assert frames(call, 15, onset=onset, voiced=160) == [ResumePlayback()]
    # the same speech goes on (the endpointer has not ended it): paused again, same utterance
    assert frames(call, 1, onset=onset, voiced=10_000) == [PausePlayback()]
    assert call.state is State.HOLDING
    [interrupt, *_] = call.heard("final", "yeah but no", 0.8)
    assert isinstance(interrupt, Interrupt)


def test_speech_ended_by_a_pause_within_a_sentence_is_not_resumed_before_its_final() -> None:
    """ "hold on, | that is not what I asked": the endpointer ends the speech at the comma
    (the short end of turn, 250 ms) before the 300 ms of quiet, the partial a function word
    ("although"). The bot stays paused until the final: one with content words clears it
    with no resume in between (the caller never hears the bot over them); a backchannel's
    final resumes it."""
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    assert call.interim("although") == []
    assert frames(call, 7, onset=onset, voiced=300) == []  # "hold on": 300 ms voiced
    assert frames(call, 12, onset=onset, voiced=300) == []  # 240 ms of the comma's quiet
    assert frames(call, 10) == []  # the endpointer ended the speech: no resume, no clear
    assert call.state is State.HOLDING
    actions = call.heard("final", "all gone", 0.8)
    assert [type(a) for a in actions] == [Interrupt]
    assert ResumePlayback() not in actions
    # a backchannel ended the same way resumes at its final
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    assert frames(call, 19, onset=onset, voiced=300) == []
    assert frames(call, 10) == []
    assert call.heard("final", "uh huh", 0.9) == [ResumePlayback()]
    assert call.state is State.BOT
    assert call.interruption is None


def test_a_late_final_that_is_an_interruption_still_interrupts() -> None:
    call = started()
    say_item(call, "Hello, this is a long answer.", SECOND * 5)
    onset = hold(call)
    assert frames(call, 15, onset=onset, voiced=160) == [ResumePlayback()]  # 300 ms quiet
    assert frames(call, 20) == []  # the speech ended
    actions = call.heard("final", "wait", 0.6)
    assert [type(a) for a in actions] == [Interrupt]
    assert call.state is State.BOT  # the input waits for the interrupted turn
    assert call.pending == "wait"


def test_the_bot_finishing_while_judging_makes_the_utterance_an_input() -> None:
    call = started()
    say_item(call, "Hello.")
    call.turn_event(ResponseEvent(response=Response()))
    call.turn_finished()
    onset = hold(call)
    assert frames(call, 15, onset=onset, voiced=160) == [ResumePlayback()]  # 300 ms quiet
    assert call.receive(mark("1")) == []  # the bot's audio ended
    assert call.state is State.HEARING
    [turn] = call.heard("final", "yeah", 0.9)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "yeah"  # on the caller's floor an answer


# ------------------------------------------------------------------ heard text


def test_playout_heard_text_from_marks_and_time() -> None:
    out = Playout()
    for text, ms in (("First item.", 1000), ("Second item is longer than that.", 2000)):
        out.item(text)
        out.queued(text[:5], ms, 0)
    out.item("Third.")
    out.queued("3", 500, 0)
    out.echoed("First", 1000)
    # 1 s into the second item's 2 s: about half of its characters
    assert out.cut(2000) == ("First item. Second item is", "longer than that. Third.")
    assert out.cut(5000) == ("", "")  # forgotten


def test_playout_streamed_speech_counts_the_chunks_of_an_item() -> None:
    out = Playout()
    out.item("one two three four five six seven eight")
    out.queued("1", 1000, 0)  # the first sentence's audio
    out.queued("2", 1000, 0)  # the second's
    out.done()  # the item's audio is complete
    out.echoed("1", 1000)
    assert out.cut(1000) == ("one two three four", "five six seven eight")


def test_playout_an_item_still_being_synthesized_is_not_all_heard() -> None:
    """Issue 16: the first piece of an item may be its first clause alone
    (GATEWAY_TTS_FIRST_CLAUSE_CHARS): an interruption before the rest of its audio came
    has heard a share of that clause, not the same share of the whole item's text."""
    out = Playout()
    out.item("Thank you for calling about order 5. It left.")
    out.queued("1", 600, 0)  # "Thank you"; the rest is being synthesized
    assert out.cut(400) == ("Thank", "you for calling about order 5. It left.")
    out.item("Okay, done. Ticket 3.")
    out.queued("2", 700, 0)  # "Okay,"
    out.echoed("2", 700)  # the clause played out, the rest is still coming
    assert out.cut(800) == ("Okay,", "done. Ticket 3.")
    # the call's own rate, once its complete items tell it: 100 ms a character
    out.item("a" * 40)
    out.queued("3", 4000, 0)
    out.item("one two three four five six")  # 27 characters: at least 2.7 s of audio
    out.queued("4", 1000, 4000)
    out.echoed("3", 4000)
    assert out.cut(5000) == ("a" * 40 + " one two", "three four five six")


def test_playout_a_pause_delays_what_plays() -> None:
    out = Playout()
    out.item("one two three four")
    out.queued("1", 1000, 0)
    out.done()
    out.paused(5000)  # held for 5 s at the start
    assert out.cut(5500) == ("one two", "three four")


def test_playout_late_and_unknown_echoes_are_ignored() -> None:
    out = Playout()
    out.item("one")
    out.queued("1", 1000, 0)
    out.echoed("9", 100)
    assert out.cut(0) == ("", "one")


def test_heard_counts_whole_items_whose_marks_came_back() -> None:
    call = started()
    say_item(call, "First sentence.", SECOND)
    say_item(call, "Second sentence here.", SECOND * 2)
    heard_in_the_second_item(call, "First sentence.", "Second sentence here.")


def test_heard_counts_an_item_with_ssml_whose_text_begins_with_a_hash() -> None:
    """An item with SSML is speech whatever its text (gateway.events.is_command): the
    ``#1 hit`` of a voice agent's ``<speak>#1 hit</speak>`` is what the caller heard; a
    command item (``#volume``, no SSML) is no speech. Before, the item with SSML counted as
    a command: ``heard`` was empty though its audio had played."""
    call = started()
    hit = ResponseItem(text="#1 hit", ssml="<speak>#1 hit</speak>")
    say_item(call, hit, SECOND)
    command = ResponseItem(text="#volume", code="up", repeatable=False)
    assert call.turn_event(ResponseItemEvent(response_item=command)) == []
    say_item(call, "Second sentence here.", SECOND * 2)
    heard_in_the_second_item(call, "#1 hit", "Second sentence here.")


@pytest.mark.parametrize(
    "ssml",
    [
        '<speak>Tom &amp; Jerry <break time="300ms"/>are <emphasis>here</emphasis>.</speak>',
        "<speak>Tom & Jerry are <emphasis>here.</speak>",  # not well-formed: read leniently
    ],
)
def test_heard_counts_an_item_of_ssml_without_text(ssml: str) -> None:
    """An item with ``ssml`` and no text is speech (its SSML is said): its words (those
    gateway.ssml reads, as on a screen) are what the caller heard. Before, the call
    counted its text, none: ``heard`` was empty though its audio had played."""
    call = started()
    say_item(call, ResponseItem(ssml=ssml), SECOND)
    say_item(call, "Second sentence here.", SECOND * 2)
    heard_in_the_second_item(call, "Tom & Jerry are here.", "Second sentence here.")


def test_an_item_of_ssml_without_text_cut_off_is_split_at_its_words() -> None:
    """The item of SSML playing at the cut is split as a text item is: the whole words of
    the share of its words' characters its played audio covers (its Response not come,
    it is still taken to last at least 60 ms a character, Playout: 360 ms of 63 x 60 ms
    is 6 characters, "One tw", so "One"), the rest unheard. Before, neither held any of
    its words."""
    call = started()
    say_item(call, "First sentence.", SECOND)
    ssml = (
        '<speak>One two <break time="1s"/>three four five <s>six seven eight</s> '
        "nine ten eleven twelve.</speak>"
    )
    say_item(call, ResponseItem(ssml=ssml), SECOND * 2)
    heard_in_the_second_item(
        call, "First sentence. One", "two three four five six seven eight nine ten eleven twelve."
    )


def test_the_words_of_an_item_said_or_not() -> None:
    """:func:`spoken_words`: the text whenever there is one (``#1 hit`` with SSML too),
    else the SSML's words; none for a command or an item with neither."""
    assert spoken_words(ResponseItem(text="  Hello there. ", ssml="<speak>Hi</speak>")) == (
        "Hello there."
    )
    assert spoken_words(ResponseItem(text="#1 hit", ssml="<speak>#1 hit</speak>")) == "#1 hit"
    assert spoken_words(ResponseItem(text=" ", ssml="<speak>Hi <desc>x</desc></speak>")) == "Hi"
    assert spoken_words(ResponseItem(ssml="<speak>a < b</speak>")) == "a < b"
    assert spoken_words(ResponseItem(text="#volume", code="up")) == ""
    assert spoken_words(ResponseItem()) == ""


# ------------------------------------------------------------------ words and settings


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("uh huh yeah", []),
        ("m h m", []),  # a recognizer spelling a hum
        ("and hum", []),
        ("in the", []),  # function words only
        ("okay wait", ["wait"]),
        ("hold on", ["hold"]),
        ("wait i want to change my order", ["wait", "change", "order"]),
    ],
)
def test_content_words(text: str, found: list[str]) -> None:
    assert content_words(text) == found


def test_the_settings_name_the_backchannels_and_the_bound() -> None:
    settings = Settings(barge_in_backchannels="Gotcha, right ,", barge_in_max_backchannel_ms=900)
    assert settings.barge_in_backchannels == ("gotcha", "right")
    config = call_config(settings, "telnyx")
    assert config.barge_in_backchannels == ("gotcha", "right")
    assert config.barge_in_max_backchannel_ms == 900
    assert content_words("gotcha", config.barge_in_backchannels) == []


# ------------------------------------------------------------------ speech before a final


def end_then_speak_again(call: TwilioCall, onset: int) -> int:
    """The held utterance (from ``onset``) is voiced 300 ms and ended by the endpointer;
    80 ms later, before its final came, the caller speaks again for 200 ms: that speech's
    onset. Nothing is decided meanwhile (only the first utterance's final decides)."""
    assert frames(call, 15, onset=onset, voiced=300) == []
    assert frames(call, 4) == []  # the endpointer ended it
    assert call.state is State.HOLDING
    again = call.now_ms
    assert frames(call, 10, onset=again, voiced=10_000) == []  # not judged as the first
    assert call.state is State.HOLDING
    return again


def test_speech_begun_before_the_final_that_clears_the_bot_is_heard_next() -> None:
    """ "wait" over the bot, a pause the endpointer ends it at, then "I want to change my
    order" before the recognizer's final of "wait" came (a recognizer behind the caller):
    that final clears the bot and is the next input; the second speech is then heard
    from its onset (its own StartListening, preroll included) as speech over the bot's
    next turn. Its words interrupt that turn and are the input after it. Before, the
    second speech started no listening: its words were never recognised."""
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []  # the greeting's audio plays on
    onset = hold(call)
    again = end_then_speak_again(call, onset)
    actions = call.heard("final", "wait", 0.9)
    assert [type(a) for a in actions] == [Interrupt, StartTurn, PausePlayback, StartListening]
    turn, listen = actions[1], actions[3]
    assert isinstance(turn, StartTurn)
    assert isinstance(listen, StartListening)
    assert turn.input.text == "wait"
    assert turn.input.attributes[INTERRUPTED] is True
    assert listen.from_ms == again - 300  # the second speech from its onset (the preroll)
    assert listen.stream == call.stream
    assert call.state is State.HOLDING  # over the answer to "wait" (not played yet)
    [interrupt] = call.interim("i want to change my order")
    assert isinstance(interrupt, Interrupt)
    assert call.turn_event(BinaryEvent(data=SECOND)) == []  # the answer to "wait": dropped
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    [second] = call.heard("final", "i want to change my order", 0.9)
    assert isinstance(second, StartTurn)
    assert second.input.text == "i want to change my order"
    assert second.input.attributes[INTERRUPTED] is True


def test_speech_begun_before_the_final_of_a_backchannel_holds_the_bot_on() -> None:
    """ "yeah", ended, then "hold on what about the drinks" before the final of "yeah":
    that final is no interruption, but the bot is not resumed over the caller speaking
    again (it was, until that speech held it anew): it stays paused and the new speech
    is heard from its onset and judged; its words interrupt."""
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    again = end_then_speak_again(call, onset)
    [listen] = call.heard("final", "yeah", 0.9)
    assert isinstance(listen, StartListening)
    assert listen.from_ms == again - 300
    assert call.state is State.HOLDING
    assert frames(call, 5, onset=again, voiced=10_000) == []
    [interrupt] = call.interim("hold on what about the drinks")
    assert isinstance(interrupt, Interrupt)
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []  # the interrupted turn is over
    [turn] = call.heard("final", "hold on what about the drinks", 0.9)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "hold on what about the drinks"
    assert turn.input.attributes[INTERRUPTED] is True
    # a backchannel after a backchannel: the bot resumes once that one is judged
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    again = end_then_speak_again(call, onset)
    assert [type(a) for a in call.heard("final", "yeah", 0.9)] == [StartListening]
    assert frames(call, 25, onset=again, voiced=200) == [ResumePlayback()]
    assert call.state is State.BOT


def test_over_the_paused_bot_speech_ended_long_before_a_backchannel_s_final_resumes_it() -> None:
    """ "yeah" over the bot, ended; a short speech begun and ended before its final; that
    final ("yeah": no interruption) comes more than ``keep_ms`` after the short speech
    ended (a recognizer far behind): the bot resumes rather than staying silent for a
    second final (as before; on the caller's floor, or after an input, such speech is
    heard however late: test_speech_over_before_a_final_later_than_the_kept_audio_...).
    Heard soon enough, it holds the bot on."""
    for late, held in ((0, True), (2, False)):
        call = started()
        say_item(call, "Thank you for calling the pizza shop.", SECOND * 10)
        onset = hold(call)
        again = end_then_speak_again(call, onset)
        assert frames(call, 2) == []  # the short speech ended
        frames(call, late * call.keep_ms // 20)  # keep_ms: 2.45 s
        actions = call.heard("final", "yeah", 0.9)
        if held:
            assert [type(a) for a in actions] == [StartListening], actions
            assert call.state is State.HOLDING
            assert isinstance(actions[0], StartListening)
            assert actions[0].from_ms == again - 300
        else:
            assert actions == [ResumePlayback()], actions
            assert call.state is State.BOT


def test_speech_begun_before_the_final_on_the_caller_s_floor_is_heard_over_the_answer() -> None:
    """On the caller's floor: "I want a pizza", ended, then "with extra cheese" before its
    final came. The final is the input; the speech after it was begun after the first
    utterance's end, so it is speech over the bot's answer (paused and judged, its own
    StartListening from its onset), not lost because it began before the final came."""
    call = caller_s_floor()
    frames(call, 5)
    onset = call.now_ms
    actions = frames(call, 8, onset=onset, voiced=10_000)
    assert [type(a) for a in actions] == [StartListening]
    assert state_of(call) is State.HEARING
    assert frames(call, 40, onset=onset, voiced=600) == []
    assert frames(call, 4) == []  # ended
    again = call.now_ms
    assert frames(call, 10, onset=again, voiced=10_000) == []
    actions = call.heard("final", "i want a pizza", 0.9)
    assert [type(a) for a in actions] == [StartTurn, PausePlayback, StartListening]
    turn, listen = actions[0], actions[2]
    assert isinstance(turn, StartTurn)
    assert isinstance(listen, StartListening)
    assert turn.input.text == "i want a pizza"
    assert listen.from_ms == again - 300
    assert call.state is State.HOLDING
    # the same when the first utterance was noise: the speech after it is the utterance
    call = caller_s_floor()
    frames(call, 5)
    onset = call.now_ms
    frames(call, 8, onset=onset, voiced=10_000)
    assert frames(call, 10, onset=onset, voiced=200) == []
    assert frames(call, 4) == []
    again = call.now_ms
    assert frames(call, 10, onset=again, voiced=10_000) == []
    [listen] = call.heard("silence", "")
    assert isinstance(listen, StartListening)
    assert listen.from_ms == again - 300
    assert call.state is State.HEARING
    [turn] = call.heard("final", "with extra cheese", 0.9)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "with extra cheese"


def test_speech_confirmed_only_after_the_final_is_speech_over_the_answer() -> None:
    """The second speech began after the first utterance's end but the endpointer
    confirms its onset only after that utterance's final came (150 ms of voice): it is
    speech over the answer all the same (the bot's floor counts from the utterance's
    end, not from its final), not ignored as speech begun before the bot's turn."""
    call = caller_s_floor()
    frames(call, 5)
    onset = call.now_ms
    frames(call, 8, onset=onset, voiced=10_000)
    assert frames(call, 20, onset=onset, voiced=300) == []
    assert frames(call, 2) == []  # ended
    again = call.now_ms
    assert frames(call, 4) == []  # speaking again, not confirmed yet
    [turn] = call.heard("final", "i want a pizza", 0.9)
    assert isinstance(turn, StartTurn)
    actions = frames(call, 4, onset=again, voiced=10_000)  # confirmed: 160 ms of speech
    assert [type(a) for a in actions] == [PausePlayback, StartListening]
    listen = actions[1]
    assert isinstance(listen, StartListening)
    assert listen.from_ms == again - 300


def test_a_bot_cut_off_twice_before_it_spoke_again_keeps_what_was_heard() -> None:
    """The greeting is cut off by "wait" while its turn still runs (the input waits for
    it), and the speech begun before that final interrupts again: the bot said nothing
    in between, so the next input carries what was heard of the greeting, not an empty
    ``heard`` of the second cut."""
    call = started()
    say_item(call, "Your order of two pizzas will arrive in thirty minutes.", SECOND * 3)
    onset = hold(call)
    end_then_speak_again(call, onset)
    actions = call.heard("final", "wait", 0.9)
    assert [type(a) for a in actions] == [Interrupt, PausePlayback, StartListening]
    heard = call.interruption
    assert heard is not None
    assert heard[HEARD] == "Your"
    [interrupt] = call.interim("i want to change my order")
    assert isinstance(interrupt, Interrupt)
    assert call.interruption == heard
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    [turn] = call.heard("final", "i want to change my order", 0.9)
    assert isinstance(turn, StartTurn)
    assert turn.input.attributes == heard


# ------------------------------------------------------------------ speech over before a final


def speak_and_end(call: TwilioCall, ms: int = 200) -> tuple[int, int]:
    """Before the final of the utterance listened to came, the caller says something
    short (``ms`` of voice, "no wait") and the endpointer ends it too: its onset and end
    (audio ms). Nothing is decided meanwhile (only that final decides)."""
    assert frames(call, 4) == []
    onset = call.now_ms
    assert frames(call, ms // 20, onset=onset, voiced=10_000) == []
    assert frames(call, 1) == []  # the endpointer ended it
    end = call.now_ms
    assert frames(call, 10) == []
    return onset, end


def caller_s_floor(**config: Any) -> TwilioCall:
    """A call (``config``: CallConfig fields) whose greeting "Hello." played out (its turn
    ended, its mark came back): the caller's floor."""
    call = started(**config)
    say_item(call, "Hello.")
    finish_turn(call)
    assert call.receive(mark("1")) == []
    assert state_of(call) is State.CALLER
    return call


def hear_and_end(call: TwilioCall) -> None:
    """On the caller's floor: an utterance (StartListening), voiced 300 ms, ended by the
    endpointer; its final has not come."""
    frames(call, 5)
    onset = call.now_ms
    assert [type(a) for a in frames(call, 8, onset=onset, voiced=10_000)] == [StartListening]
    assert frames(call, 12, onset=onset, voiced=300) == []
    assert frames(call, 4) == []  # ended
    assert state_of(call) is State.HEARING


def test_speech_over_before_the_final_on_the_caller_s_floor_is_heard_over_the_answer() -> None:
    """ "yes", ended, then "no wait" begun AND ended before the final of "yes" came (a
    recognizer a whole short phrase behind): that final is the input, and "no wait" is
    speech over its answer all the same: heard from its onset to its end (the stage's
    kept audio: StartListening ``until_ms``), judged, and its words interrupt the answer
    and are the input after it. Before, nothing listened to it: the caller's words never
    reached the core (only speech still going on at the final was heard)."""
    call = caller_s_floor()
    hear_and_end(call)
    again, end = speak_and_end(call)
    actions = call.heard("final", "yes", 0.9)
    assert [type(a) for a in actions] == [StartTurn, PausePlayback, StartListening]
    turn, listen = actions[0], actions[2]
    assert isinstance(turn, StartTurn)
    assert isinstance(listen, StartListening)
    assert turn.input.text == "yes"
    assert listen.from_ms == again - 300  # from its onset (the preroll) ...
    assert listen.until_ms == end  # ... to its end: it is over
    assert call.state is State.HOLDING
    assert frames(call, 20) == []  # judged by its final alone
    [interrupt] = call.heard("final", "no wait", 0.9)
    assert isinstance(interrupt, Interrupt)
    assert call.turn_event(BinaryEvent(data=SECOND)) == []  # the answer to "yes": dropped
    call.turn_event(ResponseEvent(response=Response()))
    [second] = call.turn_finished()
    assert isinstance(second, StartTurn)
    assert second.input.text == "no wait"
    assert second.input.attributes[INTERRUPTED] is True
    # a backchannel over before the final lets the answer play
    call = caller_s_floor()
    hear_and_end(call)
    speak_and_end(call)
    assert [type(a) for a in call.heard("final", "yes", 0.9)] == [
        StartTurn,
        PausePlayback,
        StartListening,
    ]
    assert call.heard("final", "uh huh", 0.9) == [ResumePlayback()]
    assert call.state is State.BOT


def test_speech_over_before_a_wordless_final_is_the_next_utterance() -> None:
    """The first utterance was noise (its final holds no words): the short speech the
    caller began and ended before that final is the next utterance, heard from its
    onset to its end, and its text the input."""
    call = caller_s_floor()
    hear_and_end(call)
    again, end = speak_and_end(call)
    [listen] = call.heard("silence", "")
    assert isinstance(listen, StartListening)
    assert (listen.from_ms, listen.until_ms) == (again - 300, end)
    assert call.state is State.HEARING
    [turn] = call.heard("final", "no wait", 0.9)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "no wait"


def test_speech_over_before_the_final_of_a_backchannel_holds_the_bot_on() -> None:
    """Over the bot: "yeah", ended, then "no wait" begun and ended before the final of
    "yeah": that final is no interruption, but the bot stays paused while "no wait" is
    recognised (from its onset to its end) and judged; its words clear the bot and are
    the input. Before, the bot resumed and "no wait" was never recognised."""
    call = started()
    say_item(call, "Thank you for calling the pizza shop.", SECOND * 3)
    onset = hold(call)
    assert frames(call, 15, onset=onset, voiced=300) == []
    assert frames(call, 4) == []  # the endpointer ended "yeah"
    again, end = speak_and_end(call)
    assert call.state is State.HOLDING
    [listen] = call.heard("final", "yeah", 0.9)
    assert isinstance(listen, StartListening)
    assert (listen.from_ms, listen.until_ms) == (again - 300, end)
    assert call.state is State.HOLDING
    actions = call.heard("final", "no wait", 0.9)
    assert [type(a) for a in actions] == [Interrupt]
    call.turn_event(ResponseEvent(response=Response()))
    [turn] = call.turn_finished()
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "no wait"
    assert turn.input.attributes[INTERRUPTED] is True


def test_speeches_over_before_a_final_are_heard_as_one_utterance() -> None:
    """Two short phrases, each begun and ended before the final of the utterance heard,
    and a third one going on when that final comes: heard as one utterance, from the
    first one's onset (the speech that goes on ends it; its words are joined)."""
    call = caller_s_floor()
    hear_and_end(call)
    first, _ = speak_and_end(call)
    _, end = speak_and_end(call)
    [listen] = call.heard("silence", "")
    assert isinstance(listen, StartListening)
    assert (listen.from_ms, listen.until_ms) == (first - 300, end)
    # the same with speech going on at the final: until its end, not a given time
    call = caller_s_floor()
    hear_and_end(call)
    first, _ = speak_and_end(call)
    again = call.now_ms
    assert frames(call, 3, onset=again, voiced=10_000) == []  # 60 ms so far
    [listen] = call.heard("silence", "")
    assert isinstance(listen, StartListening)
    assert (listen.from_ms, listen.until_ms) == (first - 300, None)


def test_speech_over_before_a_final_later_than_the_kept_audio_is_still_heard() -> None:
    """A final later than ``keep_ms`` after the short speech ended: the stage keeps that
    speech's audio from its onset until the next utterance opens (SpeechStage ``_pin``),
    so it is still heard, from its onset to its end. Before, the engine let it go (the
    stage kept only the last ``keep_ms``, 2.45 s: a recognizer that far behind, a
    loaded machine, lost the caller's quick "no wait")."""
    call = caller_s_floor()
    hear_and_end(call)
    onset, end = speak_and_end(call)
    frames(call, 2 * call.keep_ms // 20)
    actions = call.heard("final", "yes", 0.9)
    assert [type(a) for a in actions] == [StartTurn, PausePlayback, StartListening]
    listen = actions[2]
    assert isinstance(listen, StartListening)
    assert (listen.from_ms, listen.until_ms) == (onset - 300, end)  # over the answer
    assert call.state is State.HOLDING


# ------------------------------------------------------------------ inputs that wait


def waiting_words(call: TwilioCall, text: str) -> None:
    """``text`` interrupts the bot for real while its turn still runs: the input waits
    for that (interrupted) turn to finish."""
    hold(call)
    actions = call.heard("final", text, 0.9)
    assert [type(a) for a in actions] == [Interrupt]
    assert call.state is State.BOT
    assert call.turn is not None


def test_words_said_while_words_wait_reach_the_core_as_one_input() -> None:
    """ "Book a table for two" cuts the greeting off; before its turn could start (the
    greeting's turn still runs), "at seven" interrupts again. The core hears both, as one
    input in the order said, with what was heard of the greeting. Before, the second
    replaced the first: the core heard only "at seven"."""
    call = started()
    say_item(call, "Your order of two pizzas will arrive in thirty minutes.", SECOND * 3)
    waiting_words(call, "book a table for two")
    heard = call.interruption
    assert heard is not None
    waiting_words(call, "at seven")
    assert list(call.waiting) == ["book a table for two at seven"]
    call.turn_event(ResponseEvent(response=Response()))
    [turn] = call.turn_finished()
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "book a table for two at seven"
    assert turn.input.attributes == heard
    assert list(call.waiting) == []


def test_an_interruption_without_words_does_not_replace_words_waiting() -> None:
    """Words wait; the caller then speaks over the silent bot longer than any backchannel
    but nothing is recognised: that gives no ``#fallback`` over the words (the words are
    the input to answer)."""
    call = started()
    say_item(call, "Hello, this is a long answer.", SECOND * 5)
    waiting_words(call, "i want a pizza")
    onset = hold(call)
    actions = frames(call, 50, onset=onset, voiced=10_000)
    assert Interrupt in [type(a) for a in actions]
    assert call.state is State.HEARING
    assert call.heard("silence", "") == []
    assert list(call.waiting) == ["i want a pizza"]
    call.turn_event(ResponseEvent(response=Response()))
    [turn] = call.turn_finished()
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "i want a pizza"


def finish_turn(call: TwilioCall) -> list[Any]:
    call.turn_event(ResponseEvent(response=Response()))
    return call.turn_finished()


def test_keys_are_an_input_of_their_own_in_the_order_pressed() -> None:
    """Keys are the core's keys ("5" a menu choice): never joined to words or to other
    keys. Words wait, then "5" is pressed, then more words are said: three turns, in the
    order said, each once the one before finished. Before, the key replaced the words
    (and the words after it the key)."""
    call = started()
    say_item(call, "Press 5 for the menu.", SECOND * 3)
    waiting_words(call, "book a table")
    actions = call.receive(dtmf("5"))
    assert [type(a) for a in actions] == [Interrupt]
    assert list(call.waiting) == ["book a table", "5"]
    waiting_words(call, "for two")
    assert list(call.waiting) == ["book a table", "5", "for two"]
    texts = []
    for _ in range(3):
        [turn] = finish_turn(call)
        assert isinstance(turn, StartTurn)
        texts.append(turn.input.text)
    assert texts == ["book a table", "5", "for two"]
    assert finish_turn(call) == []
    assert state_of(call) is State.CALLER


def test_keys_pressed_ahead_each_reach_the_core() -> None:
    """``digit`` mode, no barge-in: keys pressed while the bot speaks are each an input,
    in the order pressed (typed ahead of a menu); ``collect`` mode: each collected run
    (up to ``#``) is one. Before, only the last key (run) reached the core."""
    call = started(barge_in=False)
    say_item(call, "Press 1 for sales, 2 for support.")
    for key in "12":
        assert call.receive(dtmf(key)) == []
    assert list(call.waiting) == ["1", "2"]
    assert [a.input.text for a in finish_turn(call)] == []  # the audio still plays
    [turn] = call.receive(mark("1"))
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "1"
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "2"
    call = started(barge_in=False, dtmf_mode="collect")
    say_item(call, "Your account number, then the hash key.")
    for key in "12#34#":
        assert call.receive(dtmf(key)) == []
    assert list(call.waiting) == ["12", "34"]


def test_keys_whose_pause_ends_while_the_bot_speaks_wait_for_its_floor() -> None:
    """``collect`` mode, no barge-in (the one way keys are still being collected while the
    bot has the floor: with barge-in a key cuts the bot off, and ``#machine`` now takes
    the keys being collected): 1, 2 pressed over the bot's answer, no ``#``; their pause
    (2 s) ends while the answer still plays: "12" is an input then (the pause made it),
    the bot is not cut off, and it waits for the bot's floor: its turn starts once the
    answer's turn finished and its audio played, then the caller's floor."""
    call = started(barge_in=False, dtmf_mode="collect")
    say_item(call, "Your account number, then the hash key.", SECOND * 5)
    for key in "12":
        assert call.receive(dtmf(key)) == []
    assert call.dtmf.collecting
    assert frames(call, 99) == []  # 1.98 s: still collected
    assert call.waiting == ()
    assert frames(call, 1) == []  # the pause ends over the bot: no Interrupt, no turn
    assert call.state is State.BOT
    assert not call.dtmf.collecting
    assert list(call.waiting) == ["12"]
    assert finish_turn(call) == []  # the answer's audio still plays
    [turn] = call.receive(mark("1"))
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "12"
    assert INTERRUPTED not in turn.input.attributes  # nothing was cut off
    assert finish_turn(call) == []
    assert state_of(call) is State.CALLER


def test_inputs_waiting_when_the_caller_hangs_up_each_reach_the_core() -> None:
    """Words wait and keys are being collected (``collect`` mode, no ``#`` yet) when the
    caller hangs up: the words' turn, then the keys', both before the session ends.
    Before, the keys replaced the words."""
    call = started(dtmf_mode="collect")
    say_item(call, "Your account number, then the hash key.", SECOND * 3)
    waiting_words(call, "my account number is")
    actions = call.receive(dtmf("4"))
    assert [type(a) for a in actions] == [Interrupt]  # the keys are collected
    assert call.receive(dtmf("2")) == []
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    assert list(call.waiting) == ["my account number is", "42"]
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "my account number is"
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "42"
    assert finish_turn(call) == []


def test_keys_being_collected_go_before_the_words_said_after_them() -> None:
    """``collect`` mode: words wait, the caller presses 4, 2 (cutting the bot off) and,
    before ``#`` or the pause, says more words: three inputs in the order the caller made
    them, the keys committed when the words are, as the pause would have made them.
    Before, the new words were joined to the words waiting and the keys came after both
    (once the pause passed)."""
    call = started(dtmf_mode="collect")
    say_item(call, "Your account number, then the hash key.", SECOND * 3)
    waiting_words(call, "my account number is")
    assert [type(a) for a in call.receive(dtmf("4"))] == [Interrupt]
    assert call.receive(dtmf("2")) == []
    assert state_of(call) is State.CALLER
    onset = call.now_ms
    assert [type(a) for a in frames(call, 8, onset=onset, voiced=10_000)] == [StartListening]
    assert frames(call, 4) == []  # ended, well within the keys' pause (2 s)
    assert call.heard("final", "sorry it is wrong", 0.9) == []
    assert list(call.waiting) == ["my account number is", "42", "sorry it is wrong"]
    texts = []
    for _ in range(3):
        [turn] = finish_turn(call)
        assert isinstance(turn, StartTurn)
        texts.append(turn.input.text)
    assert texts == ["my account number is", "42", "sorry it is wrong"]
    frames(call, 200)  # past the keys' pause: nothing more comes of them
    assert finish_turn(call) == []


def test_keys_being_collected_on_the_caller_s_floor_are_the_input_before_words() -> None:
    """``collect`` mode, the caller's floor, no turn running: 1, 2 pressed, then words
    before ``#`` or the pause: the keys' turn starts at once, the words wait for it.
    Before, the words' turn started and the keys came after it."""
    call = caller_s_floor_collecting()
    onset = call.now_ms
    assert [type(a) for a in frames(call, 8, onset=onset, voiced=10_000)] == [StartListening]
    assert frames(call, 4) == []
    keys_then_words(call, "operator please")


def test_inputs_waiting_at_a_hang_up_are_dropped_when_the_running_turn_ends_the_session() -> None:
    """Keys wait behind the running turn as the caller hangs up, and that turn ends the
    session: they get no turn and wait no longer (none is left for the runner's end to
    drop and log as outlasting GATEWAY_LOCK_WAIT_S: gateway/io/call.py ``end_session``).
    Before, they stayed waiting, dropped only there, logged as if the turns had been too
    slow."""
    call = started(barge_in=False)
    say_item(call, "Press 1 for sales, 2 for support.")
    for key in "12":
        assert call.receive(dtmf(key)) == []
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    # said for the runner's DEBUG log (test_transfer_barge_in.py, "session ended")
    assert call.turn_finished() == [InputsUnanswered("session ended", 2)]
    assert call.waiting == ()
    assert call.drop_waiting() == 0


def test_words_waiting_go_after_a_hash_alone() -> None:
    """``collect`` mode: a key cuts the bot off while words wait, but it is ``#`` alone
    (no keys): the words' turn comes when the running turn finished, not after the
    silence timeout."""
    call = started(dtmf_mode="collect")
    say_item(call, "Hello.", SECOND * 3)
    waiting_words(call, "i want a pizza")
    assert [type(a) for a in call.receive(dtmf("#"))] == [Interrupt]
    assert call.state is State.BOT
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "i want a pizza"


def test_words_joined_are_bounded_the_oldest_dropped_first() -> None:
    """Words joined while they wait keep at most MAX_JOINED_CHARS: the oldest whole words
    go first (the newest utterance is kept whole), said in InputsDropped for the log."""
    call = started()
    say_item(call, "Hello.", SECOND * 3)
    first = " ".join(f"one{i:03}" for i in range(150))  # 150 words, 1049 characters
    second = " ".join(f"two{i:03}" for i in range(150))
    waiting_words(call, first)
    hold(call)
    actions = call.heard("final", second, 0.9)
    assert [type(a) for a in actions] == [Interrupt, InputsDropped]
    [joined] = call.waiting
    assert len(joined) <= MAX_JOINED_CHARS
    assert joined.endswith(" " + second)
    kept = joined[: -len(second) - 1].split()
    assert kept == first.split()[-len(kept) :]  # whole words, the newest of the first
    assert len(joined) > MAX_JOINED_CHARS - 8  # no more dropped than need be
    dropped = actions[1]
    assert dropped == InputsDropped(chars=len(first) + 1 + len(second) - len(joined))
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == joined


def test_inputs_waiting_are_bounded_the_oldest_dropped_first() -> None:
    """At most MAX_WAITING_INPUTS inputs wait (keys typed ahead without end): the oldest
    goes first, said in InputsDropped."""
    call = started(barge_in=False)
    say_item(call, "Hello.")
    keys = "1234567890*1234567"
    for key in keys[:MAX_WAITING_INPUTS]:
        assert call.receive(dtmf(key)) == []
    assert call.receive(dtmf(keys[MAX_WAITING_INPUTS])) == [InputsDropped(inputs=1)]
    assert call.waiting == tuple(keys[1 : MAX_WAITING_INPUTS + 1])


def test_keys_whose_pause_ends_while_the_caller_speaks_go_before_the_words() -> None:
    """``collect`` mode, the caller's floor: 1, 2 pressed, then the caller speaks longer
    than the rest of the pause (2 s): the keys are an input when the pause ends, the
    utterance is heard out (not cancelled) and its words are the input after them; the
    keys' turn waits for the utterance's end (the bot does not answer over the caller).
    Before, the pause cancelled the utterance: its words were lost."""
    call = caller_s_floor_collecting()
    onset = call.now_ms
    actions = frames(call, 150, onset=onset, voiced=10_000)  # 3 s of speech
    assert [type(a) for a in actions] == [StartListening]  # no CancelListening, no turn
    assert state_of(call) is State.HEARING
    assert list(call.waiting) == ["12"]
    assert frames(call, 4) == []  # ended
    keys_then_words(call, "i need help with my account")


def test_keys_whose_pause_ends_while_the_caller_speaks_go_after_a_wordless_utterance() -> None:
    """As above, but nothing is recognised (a cough): the keys' turn starts then."""
    call = caller_s_floor_collecting()
    onset = call.now_ms
    assert [type(a) for a in frames(call, 150, onset=onset, voiced=10_000)] == [StartListening]
    assert frames(call, 4) == []
    [turn] = call.heard("silence", "")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "12"
    assert call.waiting == ()


def caller_s_floor_collecting() -> TwilioCall:
    """``collect`` mode, the caller's floor, 1 and 2 pressed (no ``#``, the pause runs)."""
    call = caller_s_floor(dtmf_mode="collect")
    for key in "12":
        assert call.receive(dtmf(key)) == []
    assert state_of(call) is State.CALLER
    return call


def keys_then_words(call: TwilioCall, words: str) -> None:
    """:func:`caller_s_floor_collecting`'s caller, speaking, is heard saying ``words``:
    the keys ("12") are the input at once, the words wait and are the input after it."""
    [turn] = call.heard("final", words, 0.9)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "12"
    assert list(call.waiting) == [words]
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == words


def test_keys_being_collected_when_a_machine_is_detected_go_before_it() -> None:
    """``collect`` mode: 1, 2 pressed (no ``#`` or pause yet), then an answering machine
    is detected: a human pressed the keys, so they are an input of their own first (as
    words committed while keys are collected: the pause would have made them), then
    ``#machine``; the pause later gives nothing. Before, ``#machine``'s turn started and
    the keys, still collected, came after it (their pause ending while the bot held for
    speech over the machine's message)."""
    call = caller_s_floor_collecting()
    [turn] = call.machine_answered("machine_start")
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "12"
    assert list(call.waiting) == ["#machine"]
    assert frames(call, 150) == []  # past the keys' pause: nothing more comes of them
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "#machine"
    assert turn.input.attributes == {"answeredBy": "machine_start"}
    assert call.waiting == ()


def test_a_fallback_waiting_at_a_hang_up_gets_no_turn() -> None:
    """A ``#fallback`` (an interruption with no words) waits behind the interrupted turn as
    the caller hangs up: no turn (nobody is left to answer it, and it carries nothing of
    the caller's). Before, it got a (muted) turn after the caller was gone."""
    call = started()
    say_item(call, "Hello, this is a long answer.", SECOND * 5)
    onset = hold(call)
    assert Interrupt in [type(a) for a in frames(call, 50, onset=onset, voiced=10_000)]
    assert call.heard("silence", "") == []
    assert list(call.waiting) == ["#fallback"]
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    assert finish_turn(call) == []
    assert call.waiting == ()


def test_a_machine_waiting_at_a_hang_up_gets_no_turn_keys_after_it_do() -> None:
    """``#machine`` waits behind the turn it silenced, a key after it, as the caller hangs
    up: the key is the caller's and reaches the core, ``#machine`` gets no turn. Before,
    it got a (muted) turn first."""
    call = started(barge_in=False)
    say_item(call, "Hello, this is a long answer.", SECOND * 5)
    assert [type(a) for a in call.machine_answered("machine_start")] == [Interrupt]
    assert call.receive(dtmf("5")) == []
    assert list(call.waiting) == ["#machine", "5"]
    [end] = call.receive(STOP)
    assert isinstance(end, EndSession)
    [turn] = finish_turn(call)
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "5"
    assert finish_turn(call) == []


def test_speech_begun_before_a_wordless_final_is_heard_over_the_keys_answer() -> None:
    """``collect`` mode: 1, 2 pressed, a cough outlasts the keys' pause (the keys wait), it
    ends, and the caller says "no wait" before the cough's (wordless) final came: the
    keys' turn starts at that final and "no wait" is speech over its answer, heard from
    its onset to its end (the bot's floor counts from the cough's end, as for a final
    with words). Before, the floor counted from the final: "no wait" began before it, so
    it was neither heard over the answer nor after it (the caller's words were lost)."""
    call = caller_s_floor_collecting()
    onset = call.now_ms
    assert [type(a) for a in frames(call, 150, onset=onset, voiced=10_000)] == [StartListening]
    assert list(call.waiting) == ["12"]
    assert frames(call, 4) == []  # the cough ended
    again, end = speak_and_end(call)
    actions = call.heard("silence", "")
    assert [type(a) for a in actions] == [StartTurn, PausePlayback, StartListening]
    turn, listen = actions[0], actions[2]
    assert isinstance(turn, StartTurn)
    assert isinstance(listen, StartListening)
    assert turn.input.text == "12"
    assert (listen.from_ms, listen.until_ms) == (again - 300, end)
    [interrupt] = call.heard("final", "no wait", 0.9)
    assert isinstance(interrupt, Interrupt)
    call.turn_event(ResponseEvent(response=Response()))
    [second] = call.turn_finished()
    assert isinstance(second, StartTurn)
    assert second.input.text == "no wait"
