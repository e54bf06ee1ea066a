"""Adaptive end of turn (issue 16): the pure completeness rules over a table of utterances
and the speech stage with real speech (Piper -> WebRTC VAD -> pocketsphinx):
utterances that pause mid-phrase reach the result as one, complete ones end sooner."""

from __future__ import annotations

import asyncio

import pytest

from gateway.settings import Settings
from gateway.speech.audio import AudioFormat, Pcm, pcm_to_mulaw, resample, silence
from gateway.speech.endofturn import RuleEndOfTurn
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.types import Heard
from tests.speech import normalise, wer

MULAW8 = AudioFormat("MULAW", 8000)
FRAME = 160  # 20 ms of 8 kHz μ-law

COMPLETE = [
    "yes",
    "no thanks",
    "play some music please",
    "what is the weather like today",
    "tell me about this place",
    "i would like to book a table",
    "i am thirty",
    "that's all",
    # "no", "yes", "okay" alone are whole answers; a lead-in followed by more is complete
    "no",
    "okay",
    "wait i want to change my order",
    "Wait, I want to change my order.",
    "i can't wait",
    "wait a minute",
    "hold on to it",
]
INCOMPLETE = [
    "",
    "i would like to",
    "my number is four five",
    "book a table for",
    "um",
    "so uh",
    "can you tell me the",
    "i want",
    "the weather in",
    "and",
    "a table for two",  # "for" may be a misheard "four": a delay, never a cut
    "can you send it to",
    # homophones of an open ending: pocketsphinx's reading of "can you send it to" at the
    # pause of "can you send it to | my office please" (bench/first_audio.py)
    "they need and it too",
    "can you send it two",
    "a table four",
    # lead-ins: openers almost always followed by more ("wait, | I want to change my order")
    "wait",
    "Wait,",
    "hold on",
    "hang on",
    "hold up",
    "actually",
    "oh wait",
    "no wait",
    "No, hang on.",
    "okay hold on",
    "um wait",
    "wait wait",
]


@pytest.mark.parametrize("text", COMPLETE)
def test_complete_utterances(text: str) -> None:
    assert RuleEndOfTurn().complete(text, 1000)


@pytest.mark.parametrize("text", INCOMPLETE)
def test_utterances_ending_mid_phrase_or_on_a_filler(text: str) -> None:
    assert not RuleEndOfTurn().complete(text, 1000)


def test_numbers_keep_the_long_silence() -> None:
    assert not RuleEndOfTurn().complete("my number is four five six seven", 2000)


def test_homophones_of_open_endings_are_configurable() -> None:
    """ "me too" waits the long silence by default (a delay, never a cut); without the
    homophones it reads complete."""
    assert not RuleEndOfTurn().complete("me too", 500)
    assert RuleEndOfTurn(homophones={}).complete("me too", 500)
    assert RuleEndOfTurn().complete("i want three", 500)  # not a homophone of an open ending


def test_lead_ins_are_configurable() -> None:
    """Without lead-ins "wait" reads complete (the short silence ends the turn at it)."""
    assert RuleEndOfTurn(lead_ins=()).complete("wait", 500)
    assert RuleEndOfTurn(lead_ins=("listen",)).complete("wait", 500)
    assert not RuleEndOfTurn(lead_ins=("listen",)).complete("no listen", 500)


def test_min_words() -> None:
    assert not RuleEndOfTurn(min_words=2).complete("yes", 300)
    assert RuleEndOfTurn(min_words=2).complete("yes please", 300)


# ------------------------------------------------------------------ real speech


@pytest.fixture(scope="module")
def phrases(piper: PiperSynthesizer) -> dict[str, Pcm]:
    texts = {
        "i would like to",
        "book a table for two",
        "my number is four five",
        "six seven eight",
        "can you send it to",
        "my office please",
        "wait",
        "i want to change my order",
        "wait, i want to change my order",
        "yes",
        "play some music please",
        "what is the weather like today",
    }

    async def synthesize() -> dict[str, Pcm]:
        return {t: await piper.synthesize(t) for t in texts}

    return asyncio.run(synthesize())


def phone(pcm: Pcm) -> bytes:
    return pcm_to_mulaw(resample(pcm, 8000))


def quiet(ms: int) -> bytes:
    return pcm_to_mulaw(silence(ms, 8000))


async def hear(
    recognizer: PocketsphinxRecognizer,
    audio: bytes,
    short_ms: int | None,
    long_ms: int = 700,
    tentative_ms: int | None = None,
    floor: int = 0,
    end_of_turn: RuleEndOfTurn | None = None,
) -> tuple[list[str], list[int]]:
    """Feed ``audio`` frame by frame (inline) to stages opened one after the other (judged
    by ``end_of_turn``, None: the default rules); the finals' texts and each final's delay
    after its end of speech (ms of audio)."""
    options = ListenOptions(
        interim=False,
        silence_timeout_ms=None,
        trailing_silence_ms=long_ms,
        end_of_turn_short_ms=short_ms,
        tentative_end_ms=tentative_ms,
        energy_floor=floor,
    )
    texts: list[str] = []
    delays: list[int] = []
    stage = SpeechStage(recognizer, MULAW8, options, frame_ms=20, end_of_turn=end_of_turn)
    await stage.start()
    for i in range(0, len(audio), FRAME):
        for heard in await stage.feed(audio[i : i + FRAME]):
            if heard.kind == "final":
                texts.append(normalise(heard.text))
                delays.append(stage.now_ms - heard.at_ms)
        if stage.done:
            stage.listen()
            await stage.start()
    await stage.cancel()
    return texts, delays


DEFAULTS = Settings()


@pytest.mark.parametrize(
    ("short_ms", "tentative_ms", "floor"),
    [
        (300, None, 0),
        (300, 120, 50),
        (
            DEFAULTS.end_of_turn_short_ms,
            DEFAULTS.end_of_turn_tentative_ms,
            DEFAULTS.vad_energy_floor,
        ),
    ],
)
@pytest.mark.parametrize(
    ("first", "rest"),
    [
        ("i would like to", "book a table for two"),
        ("my number is four five", "six seven eight"),
        ("can you send it to", "my office please"),  # the recognizer hears "...it too"
        ("wait", "i want to change my order"),  # an interruption's lead-in (LEAD_INS)
    ],
)
async def test_a_pause_mid_phrase_does_not_cut_the_utterance(
    recognizer: PocketsphinxRecognizer,
    phrases: dict[str, Pcm],
    first: str,
    rest: str,
    short_ms: int,
    tentative_ms: int | None,
    floor: int,
) -> None:
    """With and without the tentative end and the VAD's energy floor, and with the
    defaults (GATEWAY_END_OF_TURN_SHORT_MS, GATEWAY_END_OF_TURN_TENTATIVE_MS,
    GATEWAY_VAD_ENERGY_FLOOR)."""
    audio = quiet(300) + phone(phrases[first]) + quiet(450) + phone(phrases[rest]) + quiet(1200)
    texts, _ = await hear(recognizer, audio, short_ms, tentative_ms=tentative_ms, floor=floor)
    assert len(texts) == 1, texts  # one input, not cut at the pause
    assert wer([(f"{first} {rest}", texts[0])]) <= 0.4, texts  # pocketsphinx errs a little
    said = set(texts[0].split())
    assert said & set(first.split()), texts  # both halves are in it
    assert said & set(rest.split()), texts
    cut, _ = await hear(recognizer, audio, 300, long_ms=300)  # a fixed short silence cuts it
    assert len(cut) == 2, cut


async def test_an_interruption_is_not_cut_at_its_lead_in_s_comma(
    recognizer: PocketsphinxRecognizer, phrases: dict[str, Pcm]
) -> None:
    """Piper's "wait, I want to change my order" (its own pause at the comma), with
    the default listening settings: one input. Without lead-ins (:data:`LEAD_INS`) the
    partial "wait" reads complete and the short silence ends the turn at the comma."""
    text = "wait, i want to change my order"
    audio = quiet(300) + phone(phrases[text]) + quiet(1200)
    defaults = (
        DEFAULTS.end_of_turn_short_ms,
        DEFAULTS.vad_trailing_silence_ms,
        DEFAULTS.end_of_turn_tentative_ms,
        DEFAULTS.vad_energy_floor,
    )
    texts, _ = await hear(recognizer, audio, *defaults)
    assert len(texts) == 1, texts  # one input
    said = texts[0].split()
    assert said[0] == "wait", texts
    assert "change" in said, texts
    cut, _ = await hear(recognizer, audio, *defaults, end_of_turn=RuleEndOfTurn(lead_ins=()))
    assert len(cut) == 2, cut
    assert cut[0] == "wait", cut


async def test_complete_utterances_end_sooner(
    recognizer: PocketsphinxRecognizer, phrases: dict[str, Pcm]
) -> None:
    for text in ("yes", "play some music please", "what is the weather like today"):
        audio = quiet(300) + phone(phrases[text]) + quiet(1200)
        fixed_texts, fixed = await hear(recognizer, audio, None)
        short_texts, short = await hear(recognizer, audio, 300)
        tentative_texts, tentative = await hear(recognizer, audio, 300, tentative_ms=120)
        assert len(fixed_texts) == len(short_texts) == len(tentative_texts) == 1
        assert tentative_texts == short_texts  # the tentative end's result is the final one
        assert fixed[0] >= 700
        assert short[0] < fixed[0] - 200, (text, short, fixed)
        assert tentative[0] == short[0], (text, tentative, short)


async def test_a_lagging_recognizer_s_stale_partial_does_not_cut_a_phrase(
    recognizer: PocketsphinxRecognizer, phrases: dict[str, Pcm]
) -> None:
    """Queued mode (a call's): the partial "play some music please" reads complete, but the
    caller goes on ("book a table for two") and pauses 450 ms while the recognizer has not
    heard it yet (a loaded machine: the audio arrives faster than it is recognised). The
    partial is stale, so the long silence applies and the pause does not end the turn."""
    options = ListenOptions(
        interim=False, silence_timeout_ms=None, trailing_silence_ms=700, end_of_turn_short_ms=300
    )
    stage = SpeechStage(recognizer, MULAW8, options, frame_ms=20, keep_ms=1000, batch_ms=60)
    stage.listen()
    finals: list[Heard] = []

    async def report(heard: Heard) -> None:
        finals.append(heard)

    task = asyncio.create_task(stage.run(report))
    try:
        audio = quiet(300) + phone(phrases["play some music please"]) + quiet(100)
        for i in range(0, len(audio), FRAME):  # at the recognizer's pace: it keeps up
            stage.hear(audio[i : i + FRAME])
            await asyncio.sleep(0.005)
        for _ in range(500):
            if stage.trailing_silence_ms == 300:
                break
            await asyncio.sleep(0.02)
        assert stage.trailing_silence_ms == 300, stage.partial  # complete and fresh
        burst = phone(phrases["book a table for two"]) + quiet(450)
        for i in range(0, len(burst), FRAME):  # faster than it can be recognised
            stage.hear(burst[i : i + FRAME])
        assert stage.onset_ms is not None  # the 450 ms pause did not end the speech
        assert stage.trailing_silence_ms == 700
        assert not [h for h in finals if h.kind == "final"]
    finally:
        stage.stop()
        await asyncio.gather(task, return_exceptions=True)
