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
    backchannels_call,
    interruption_call,
    noises,
    spoken,
)


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
    # measures it (onset -> silent, its distribution). Here: silent within the speech's
    # own length of its onset (not counting the 1.2 s of quiet after it: before, the
    # bound counted it), before the caller is done: barge-in, not an answer after their
    # turn (a wide margin over a loaded machine's lag). These figures keep pace with the
    # caller's audio under load: the pause at 160 ms of it, the clear at 1 s of it voiced
    # (GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS) unless two content words came first; ~0.2 s
    # and ~0.98 s in every loaded run here.
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
    speech_s = (len(interruption) - QUIET_AFTER) / 8000  # μ-law at 8 kHz: a byte a sample
    run = await interruption_call(speech, interruption, after_s=1.5, last_word="change")
    assert run.silent_s < speech_s, (run, speech_s)
    assert run.pause_s <= run.silent_s
    assert run.clear_s < 3.0, run  # clear once judged a real interruption
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
    assert run.clear_s < 3.0, run
    heard_its_first_words(run.attributes)
