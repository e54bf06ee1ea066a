"""Speech helpers for tests of every channel: the Piper corpus, padding and word error rate."""

from __future__ import annotations

import asyncio

from gateway.speech.audio import AudioFormat, Pcm, pcm_to_mulaw, resample, silence

SENTENCES = (
    "tell me about this place",
    "what is the weather like today",
    "play some music please",
    "i would like to book a table for two",
)
"""Reference transcripts (lower case, no punctuation) of the shared Piper corpus."""


def word_errors(reference: str, hypothesis: str) -> int:
    """Levenshtein distance between the word sequences (substitutions, insertions, deletions)."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row = row, [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (r != h))
    return row[-1]


def wer(pairs: list[tuple[str, str]]) -> float:
    """Corpus word error rate: total word errors / total reference words."""
    errors = sum(word_errors(ref, hyp) for ref, hyp in pairs)
    return errors / sum(len(ref.split()) for ref, _ in pairs)


def normalise(text: str) -> str:
    """Lower case, letters, digits and spaces only: how transcripts are compared."""
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


def padded(pcm: Pcm, before_ms: int = 300, after_ms: int = 1200) -> Pcm:
    """``pcm`` with silence before and after (enough trailing silence to end an utterance)."""
    rate = pcm.sample_rate
    return Pcm(silence(before_ms, rate).data + pcm.data + silence(after_ms, rate).data, rate)


MULAW8 = AudioFormat("MULAW", 8000)
"""A phone call's audio: 8 kHz μ-law."""
FRAME = 160
"""Bytes of one 20 ms frame of :data:`MULAW8`."""


def phone(pcm: Pcm) -> bytes:
    """``pcm`` as a phone call carries it: 8 kHz μ-law bytes."""
    return pcm_to_mulaw(resample(pcm, 8000))


def quiet(ms: int) -> bytes:
    """``ms`` of silence as 8 kHz μ-law bytes."""
    return pcm_to_mulaw(silence(ms, 8000))


def phone_corpus(piper: object, texts: tuple[str, ...]) -> dict[str, bytes]:
    """Each of ``texts`` spoken by ``piper`` (a PiperSynthesizer), as :func:`phone` audio;
    run outside an event loop (a module fixture's)."""
    from gateway.speech.tts import PiperSynthesizer

    assert isinstance(piper, PiperSynthesizer)

    async def synthesize() -> dict[str, bytes]:
        return {t: phone(await piper.synthesize(t)) for t in texts}

    return asyncio.run(synthesize())
