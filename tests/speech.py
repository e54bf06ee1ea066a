"""Speech helpers for tests of every channel: the Piper corpus, padding and word error rate."""

from __future__ import annotations

from gateway.speech.audio import Pcm, silence

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
