"""Barge-in without false stops over real calls (issue 16 item 3): real WebSocket, the
Twilio harness at real time both ways (60 ms send-ahead as deployed), Piper speech and
generated noise through the real VAD and pocketsphinx, a user core over HTTP
(tests/adapters/twilio/barge.py).

- Backchannels ("uh-huh", "yeah", "mm hmm", "okay") and noise (white-noise bursts, a
  cough-like burst) over the bot: no ``clear``, no input reaches the core, and every
  frame of the greeting is played (the paused audio resumed where it stopped).
- "wait, I want to change my order" over the bot: the bot falls silent for the caller
  while the caller speaks (~300 ms of the onset: bench/barge_in.py), ``clear`` follows,
  nothing of the greeting is sent after it, and the core's
  next input carries ``interrupted`` / ``heard`` / ``unheard``.
"""

from __future__ import annotations

from typing import Any

from gateway.events import HEARD, INTERRUPTED, UNHEARD
from gateway.speech.service import SpeechService
from gateway.speech.tts import PiperSynthesizer
from tests.adapters.twilio.barge import (
    BACKCHANNELS,
    GREETING,
    INTERRUPTION,
    QUIET_AFTER,
    InterruptionRun,
    backchannels_call,
    interruption_call,
    noises,
    spoken,
)
from tests.adapters.twilio.harness import FRAME

SEND_AHEAD_FRAMES = 3
"""The bot's audio the phone holds ahead (barge.py's gateway: twilio_send_ahead_ms 60)."""


def heard_its_first_words(attributes: dict[str, Any]) -> None:
    """The input after an interruption 1.5 s into the greeting says so, and what was
    heard: the greeting's first words, not its first item whole; the rest unheard."""
    assert attributes[INTERRUPTED] is True, attributes
    whole = " ".join(GREETING)
    heard, unheard = attributes[HEARD], attributes[UNHEARD]
    assert heard, attributes
    assert whole.startswith(heard), attributes
    assert len(heard) < len(GREETING[0]), attributes
    assert f"{heard} {unheard}" == whole, attributes


def cleared_while_the_caller_spoke(run: InterruptionRun, interruption: bytes) -> None:
    """The clear came once the speech was judged a real interruption (1 s of it voiced,
    GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS, or two content words in its interim transcript
    first), while the caller still spoke: fewer of their speech's frames had been sent
    when it arrived than the speech has (its 1.2 s of quiet after not counted). Counted
    in frames, not the clock (was: < 3 s of onset, a wall-clock bound): the gateway
    decides on each frame as it comes, and the harness, on the same event loop, sends a
    frame before the gateway can answer it, so a loaded machine slows both alike; a clear
    made only at the speech's final (the end of the caller's turn), or held back, comes
    after every frame of it.

    When the endpointer ended the speech at its comma ("wait," | "I want to ...", two
    inputs, the first a word: see :class:`InterruptionRun`), the first part was too
    short to be judged by its length and its final decides: then the clear comes before
    that input reaches the core, when the recognizer (another process, slowed by load)
    is done. (Here: 50 of the speech's 94 frames, alone and beside other tests; a clear
    held back 1.5 s in the gateway came at 126, 2.5 s after the onset, which the old
    3 s bound let pass.)"""
    speech_frames = (len(interruption) - QUIET_AFTER) // FRAME
    if len(run.inputs[0].split()) > 2:  # one utterance ("wait," alone is one word)
        assert 0 < run.clear_frames < speech_frames, (run, speech_frames)
    assert run.clear_before_input, run


async def test_backchannels_and_noise_do_not_stop_the_bot(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    sounds = {text: await spoken(piper, text) for text in BACKCHANNELS}
    sounds.update(noises())
    run = await backchannels_call(speech, sounds)
    assert run.clears == 0, run
    assert run.inputs == ["#intro"], run  # nothing said over the bot became an input
    assert run.frames == run.expected_frames, run  # the whole greeting, nothing lost
    assert len(run.sounds) == len(sounds)
    paused = [s for s in run.sounds if s.paused_s is not None]
    assert {s.name for s in paused} >= set(BACKCHANNELS), run  # each was heard (paused)
    # the bot goes on after each sound by itself: backchannels_call waits for its audio
    # to flow again before the caller's next sound (a 30 s hang guard), and each
    # backchannel's pause was ended by the gateway's resume (300 ms of quiet, or the
    # sound's final) meanwhile, not by a turn (the only input is the intro) or the
    # call's end. How soon is bench/barge_in.py's figure, not checked here (the harness
    # shares the gateway's event loop: a loaded CI machine took 1.51 s for a cough whose
    # pause itself came 1.7 s late). (Only the backchannels: a gap in a noise's frames
    # may be a stall of the loaded loop, which no resume ends.)
    for sound in run.sounds:
        if sound.name in BACKCHANNELS:
            assert sound.resumes >= 1, sound


async def test_a_real_interruption_silences_the_bot_while_the_caller_speaks_and_says_what_was_heard(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    # the bot falls silent for the caller while they speak (paused at ~160 ms of speech,
    # the phone plays out the 60 ms it holds: ~300 ms after the onset on a quiet
    # machine). That figure is a wall-clock one, and the harness shares the gateway's
    # event loop: in CI dry runs on the 2-core machine calls came in at ~580 ms (the
    # bot's frames went on until the clear), even the better of two; bench/barge_in.py
    # measures it (onset -> silent, its distribution). Here: silent before the caller is
    # done (barge-in, not an answer after their turn), counted in the caller's frames,
    # not the clock (was: silent_s < the speech's length in seconds, a wall-clock bound):
    # the bot's last frame before the pause came while fewer of the speech's frames had
    # been sent than it has, less the send-ahead the phone still plays (60 ms, 3 frames).
    # These figures keep pace with the caller's audio under load: the pause at 160 ms
    # of it (8 frames), the clear at 1 s of it voiced (50 frames,
    # GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS) unless two content words came first; the
    # speech has 94 (cleared_while_the_caller_spoke).
    #
    # What a loaded machine slows down is the CPU work in other processes: the
    # utterance's final (pocketsphinx) and the answer's Piper audio. The test waited
    # 20 s for the core's input and 20 s more for the answer's first audio (to show that
    # nothing of the greeting came after the clear), and failed there under load (five
    # calls and a busy process on one core: the final 8-9 s after the speech ended, the
    # answer's audio 5 s after that, up to 23 s in all). The greeting's rest would follow
    # the clear within its send-ahead, so now no frame may come between the clear and the
    # core's input, and only that input is waited for (barge.py INPUT_WAIT_S, a hang guard).
    #
    # The caller's words may also reach the core as two inputs: under load (a -n 2 run
    # beside other tests) the endpointer ended the speech at the comma ("wait," read as
    # complete: the short end of turn), "wait" was the input that cleared the bot and "I
    # want to change my order" speech over its answer, the next input ('change' in
    # 'wait' failed). Which happens depends on when the interim transcripts come, so
    # the check is on the words of the inputs after the intro, and the greeting's heard
    # text on the first of them
    interruption = await spoken(piper, INTERRUPTION)
    run = await interruption_call(speech, interruption, after_s=1.5, last_word="change")
    speech_frames = (len(interruption) - QUIET_AFTER) // FRAME
    assert 0 <= run.pause_frames < speech_frames - SEND_AHEAD_FRAMES, (run, speech_frames)
    # and the pause silenced it, not the clear (which comes at 1 s of speech voiced, or
    # at two content words: well after the pause at 160 ms, 8 frames, plus what it held)
    assert run.pause_frames + SEND_AHEAD_FRAMES < run.clear_frames, run
    assert run.pause_s <= run.silent_s
    cleared_while_the_caller_spoke(run, interruption)
    assert run.frames_after_clear == 0, run  # nothing of the greeting after the clear
    assert "change" in run.answer_input, run
    heard_its_first_words(run.attributes)


async def test_an_interrupted_greeting_of_ssml_without_text_says_what_was_heard(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    """A core that answers in SSML items only (no ``text``): the input after the
    interruption says which of their words the caller heard, and the rest, as for text
    items. Before, an item without text counted no words: ``heard`` and ``unheard`` were
    both empty though the greeting's audio had played."""
    interruption = await spoken(piper, INTERRUPTION)
    run = await interruption_call(speech, interruption, after_s=1.5, ssml=True)
    cleared_while_the_caller_spoke(run, interruption)
    heard_its_first_words(run.attributes)
