"""The tentative end of an utterance (issue 16, GATEWAY_END_OF_TURN_TENTATIVE_MS) with real
speech (Piper -> WebRTC VAD -> pocketsphinx in its worker process): the recognizer's
final search runs during the trailing silence, its result is the final one, and speech
resuming after it takes it back, one utterance."""

from __future__ import annotations

import pytest

from gateway.settings import Settings
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer, TentativeEnd
from gateway.speech.types import Heard
from tests.speech import FRAME, MULAW8, normalise, phone_corpus, quiet, wer


@pytest.fixture(scope="module")
def said(piper: object) -> dict[str, bytes]:
    return phone_corpus(
        piper, ("play some music please", "book a table for two", "what is the weather like today")
    )


async def recognise(recognizer: PocketsphinxRecognizer, audio: bytes) -> str:
    stream = await recognizer.open_stream(MULAW8)
    for i in range(0, len(audio), 480):
        await stream.feed(audio[i : i + 480])
    return (await stream.finish()).text


async def test_the_tentative_result_is_the_final_one_and_feeding_takes_it_back(
    recognizer: PocketsphinxRecognizer, said: dict[str, bytes]
) -> None:
    first = quiet(200) + said["play some music please"] + quiet(150)
    rest = said["book a table for two"] + quiet(300)
    whole = await recognise(recognizer, first + rest)
    alone = await recognise(recognizer, first)

    stream = await recognizer.open_stream(MULAW8)
    assert isinstance(stream, TentativeEnd)
    for i in range(0, len(first), 480):
        await stream.feed(first[i : i + 480])
    tentative = await stream.end_tentatively()
    assert tentative.is_final
    assert tentative.text == alone
    assert (await stream.end_tentatively()).text == alone  # again: the same result
    final = await stream.finish()  # nothing fed since: at once, no second search
    # the held result (its confidence too); what the search saved is bench/first_audio_cpu.py's
    # to measure, not a bound of this test's clock (0.5 s: a loaded machine's stall)
    assert (final.text, final.confidence) == (alone, tentative.confidence)

    stream = await recognizer.open_stream(MULAW8)
    for i in range(0, len(first), 480):
        await stream.feed(first[i : i + 480])
    assert (await stream.end_tentatively()).text == alone
    for i in range(0, len(rest), 480):  # the caller goes on: one utterance
        await stream.feed(rest[i : i + 480])
    assert (await stream.finish()).text == whole  # as if it had never ended

    history = await recognise(recognizer, said["book a table for two"])
    assert history  # the decoders have heard other audio since: results do not change
    assert await recognise(recognizer, first + rest) == whole

    stream = await recognizer.open_stream(MULAW8)
    await stream.feed(first)
    await stream.end_tentatively()
    await stream.cancel()  # a tentatively ended stream is released cleanly
    assert stream.closed


async def hear_inline(
    recognizer: PocketsphinxRecognizer, audio: bytes, tentative_ms: int | None
) -> tuple[list[Heard], SpeechStage]:
    options = ListenOptions(
        interim=False,
        silence_timeout_ms=None,
        trailing_silence_ms=700,
        end_of_turn_short_ms=Settings().end_of_turn_short_ms,  # the default
        tentative_end_ms=tentative_ms,
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


async def test_a_complete_utterance_ends_with_the_tentative_result(
    recognizer: PocketsphinxRecognizer, said: dict[str, bytes]
) -> None:
    audio = quiet(300) + said["what is the weather like today"] + quiet(1000)
    finals, stage = await hear_inline(recognizer, audio, 120)
    plain, _ = await hear_inline(recognizer, audio, None)
    assert stage.tentative_ends == 1
    [final] = finals
    assert final.text == stage.partial  # the tentative result (it became the partial)
    assert wer([("what is the weather like today", final.text)]) <= 0.4, final.text
    assert [h.at_ms for h in finals] == [h.at_ms for h in plain]  # ended as without it


async def test_speech_after_a_tentative_end_takes_it_back_one_utterance(
    recognizer: PocketsphinxRecognizer, said: dict[str, bytes]
) -> None:
    """ "play some music please" reads complete (the short silence applies); the caller
    pauses 220 ms (the tentative end comes at 120 ms) and goes on: one final with both
    halves, the same text as without the tentative end (the recognizer searches it
    again from the same state)."""
    audio = (
        quiet(300)
        + said["play some music please"]
        + quiet(220)
        + said["book a table for two"]
        + quiet(1000)
    )
    finals, stage = await hear_inline(recognizer, audio, 120)
    plain, _ = await hear_inline(recognizer, audio, None)
    assert stage.tentative_ends >= 1, stage.partial  # the pause was ended tentatively
    assert len(finals) == 1, finals
    text = normalise(finals[0].text)
    assert text == normalise(plain[0].text)
    assert set(text.split()) & {"music", "please"}, text
    assert set(text.split()) & {"book", "table"}, text
