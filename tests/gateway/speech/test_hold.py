"""What the recognizer is given of an utterance's trailing silence (gateway/speech/hold.py,
issue 12): the pure decision as a table, then the speech stage carrying it out with real
speech through the real recognizer (Piper -> WebRTC VAD -> pocketsphinx)."""

from __future__ import annotations

import pytest

from gateway.speech.hold import FeedStep, feed_step
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.types import Heard
from tests.speech import FRAME, MULAW8, phone_corpus, quiet, wer

TAIL = 300

# held_voiced_ms, speaking, in_speech, ends, last_voiced_ms, start_ms, tail_ms -> step
CASES: list[tuple[str, int | None, bool, bool, bool, int, int, int | None, FeedStep]] = [
    ("voice goes on", None, True, True, False, 1000, 1000, TAIL, "feed"),
    ("silence within the tail", None, True, True, False, 1000, 1240, TAIL, "feed"),
    ("silence at the tail", None, True, True, False, 1000, 1300, TAIL, "hold"),
    ("silence past the tail", None, True, True, False, 1000, 1660, TAIL, "hold"),
    ("no tail: all is fed", None, True, True, False, 1000, 1660, None, "feed"),
    ("before speech started: leading silence", None, False, False, False, 0, 4000, TAIL, "feed"),
    ("speech over (not this batch's end)", None, True, False, False, 1000, 1660, TAIL, "feed"),
    ("the end within the tail", None, True, False, True, 1000, 1240, TAIL, "feed"),
    ("the end past the tail, nothing held", None, True, False, True, 1000, 1660, TAIL, "drop"),
    ("held: still silent", 1000, True, True, False, 1000, 1720, TAIL, "hold"),
    ("held: the speech ends", 1000, True, False, True, 1000, 1720, TAIL, "drop"),
    ("held: voice again", 1000, True, True, False, 1400, 1360, TAIL, "release"),
    ("held: voice again in a later batch", 1000, True, True, False, 2100, 1360, TAIL, "release"),
    ("held after a tentative end, no tail", 1000, True, True, False, 1000, 1120, None, "hold"),
    ("tentative end, then voice", 1000, True, True, False, 1200, 1180, None, "release"),
    ("tentative end, then the end", 1000, True, False, True, 1000, 1300, None, "drop"),
]


@pytest.mark.parametrize(
    ("held", "speaking", "in_speech", "ends", "voiced", "start", "tail", "step"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_feed_step(
    held: int | None,
    speaking: bool,
    in_speech: bool,
    ends: bool,
    voiced: int,
    start: int,
    tail: int | None,
    step: FeedStep,
) -> None:
    assert (
        feed_step(
            held_voiced_ms=held,
            speaking=speaking,
            in_speech=in_speech,
            ends=ends,
            last_voiced_ms=voiced,
            start_ms=start,
            tail_ms=tail,
        )
        == step
    )


@pytest.fixture(scope="module")
def said(piper: object) -> dict[str, bytes]:
    return phone_corpus(
        piper, ("book a table for", "two people tonight", "what is the weather like today")
    )


async def hear(
    recognizer: PocketsphinxRecognizer, audio: bytes, tail_ms: int | None
) -> tuple[list[Heard], SpeechStage]:
    """The finals of ``audio`` heard by a call's stage (20 ms frames, the long trailing
    silence only), and the stage."""
    options = ListenOptions(
        interim=False, silence_timeout_ms=None, trailing_silence_ms=700, silence_tail_ms=tail_ms
    )
    stage = SpeechStage(recognizer, MULAW8, options, frame_ms=20)
    await stage.start()
    finals: list[Heard] = []
    for i in range(0, len(audio), FRAME):
        finals += [h for h in await stage.feed(audio[i : i + FRAME]) if h.kind == "final"]
        if stage.done:
            break
    if not stage.done:
        await stage.cancel()
    return finals, stage


async def test_the_silence_past_the_tail_is_not_recognised_and_the_result_stands(
    recognizer: PocketsphinxRecognizer, said: dict[str, bytes]
) -> None:
    audio = quiet(300) + said["what is the weather like today"] + quiet(1500)
    held, stage = await hear(recognizer, audio, TAIL)
    fed_all, all_stage = await hear(recognizer, audio, None)
    [final] = held
    [plain] = fed_all
    assert final.at_ms == plain.at_ms  # the same end, at the same audio time
    assert wer([("what is the weather like today", final.text)]) <= 0.4, final.text
    assert wer([(plain.text, final.text)]) <= 0.2, (plain.text, final.text)
    # audio time counts the held silence; the recognizer was given the speech and the
    # tail after it (up to a 20 ms frame more), not the whole 700 ms that ended it
    assert stage.audio_ms == all_stage.audio_ms
    assert all_stage.recognised_ms == all_stage.audio_ms
    spoken = stage.audio_ms - 700  # preroll, speech, up to its last voiced frame
    assert spoken + TAIL <= stage.recognised_ms <= spoken + TAIL + 20, stage.recognised_ms


async def test_speech_after_a_long_pause_releases_the_held_silence_one_utterance(
    recognizer: PocketsphinxRecognizer, said: dict[str, bytes]
) -> None:
    """A 500 ms pause (past the tail, within the 700 ms end): the held silence is fed
    before the words after it, so the final is the one heard without holding."""
    audio = (
        quiet(300)
        + said["book a table for"]
        + quiet(500)
        + said["two people tonight"]
        + quiet(1000)
    )
    held, stage = await hear(recognizer, audio, TAIL)
    fed_all, _ = await hear(recognizer, audio, None)
    [final] = held
    [plain] = fed_all
    assert final.text == plain.text  # the same audio, in the same order: the same search
    assert final.at_ms == plain.at_ms
    # all of the pause was given (released), only the silence after the end was not
    spoken = stage.audio_ms - 700
    assert spoken + TAIL <= stage.recognised_ms <= spoken + TAIL + 20, stage.recognised_ms


async def test_a_recognizer_far_behind_the_endpointer_still_skips_the_silence(
    recognizer: PocketsphinxRecognizer, said: dict[str, bytes]
) -> None:
    """Queued mode, the whole phrase heard before the recognizer takes any of it (a loaded
    machine): each batch is judged on the endpointer's state when it was heard, so the
    silence past the tail is skipped all the same, and the final is the inline one."""
    audio = quiet(300) + said["what is the weather like today"] + quiet(1500)
    [inline], _ = await hear(recognizer, audio, TAIL)
    options = ListenOptions(
        interim=False, silence_timeout_ms=None, trailing_silence_ms=700, silence_tail_ms=TAIL
    )
    stage = SpeechStage(recognizer, MULAW8, options, frame_ms=20, batch_ms=60)
    stage.listen()
    for i in range(0, len(audio), FRAME):
        stage.hear(audio[i : i + FRAME])
    reported: list[Heard] = []

    async def report(heard: Heard) -> None:
        reported.append(heard)

    await stage.run(report)
    assert stage.result is not None
    assert (stage.result.kind, stage.result.text) == ("final", inline.text)
    assert stage.result.at_ms == inline.at_ms
    spoken = stage.audio_ms - 700
    assert spoken + TAIL <= stage.recognised_ms <= spoken + TAIL + 60, stage.recognised_ms
