"""Which audio of an utterance reaches the recognizer: trailing silence past a tail is held.

The recognizer's cost grows with the audio it is given (pocketsphinx searches every
frame; bench/carrier_calls.py's stand-in burns a fixed CPU time per second fed). The
endpointer already knows where the caller's speech went silent, and an utterance that
ends does so after ``trailing_silence_ms`` (700 ms by default) of such silence: the
recognizer needs only the first part of it (its final search closes the last word on
a short run of silence: the tentative end, issue 16, takes the final result after
120 ms of it). So once ``tail_ms`` of trailing silence has been given to the
recognizer, the audio after it is *held* rather than fed (issue 12):

* the speech **ends** in that silence: the held audio is dropped, the recognizer
  finishes on what it was given (speech, and ``tail_ms`` of silence after it);
* the caller **speaks again** (the endpointer's last voiced frame moved): the held
  audio is *released*, fed before the new audio, so the recognizer is given exactly
  the audio it would have been given without holding: one utterance, the same search.

:func:`feed_step` is the decision, pure and table-tested
(tests/gateway/speech/test_hold.py); :class:`~gateway.speech.stage.SpeechStage` carries
it out per batch of audio, and holds the audio after a tentative end the same way.
All times are audio time (ms since the stream start).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

__all__ = ["FeedStep", "feed_step"]

FeedStep: TypeAlias = Literal["feed", "hold", "release", "drop"]
"""``feed`` the batch; ``hold`` it back; ``release``: feed the held audio, then the batch;
``drop`` the held audio and the batch (the speech ended in the held silence)."""


def feed_step(
    *,
    held_voiced_ms: int | None,
    speaking: bool,
    in_speech: bool,
    ends: bool,
    last_voiced_ms: int,
    start_ms: int,
    tail_ms: int | None,
) -> FeedStep:
    """What to do with the next batch of an utterance's audio (module doc).

    Args:
        held_voiced_ms: while audio is held: the endpointer's ``last_voiced_ms`` when the
            holding began (None: nothing is held).
        speaking: speech started in the utterance.
        in_speech: the endpointer is in speech now (not ended).
        ends: the batch carries the endpointer's end of that speech.
        last_voiced_ms: the end of the endpointer's last voiced frame now.
        start_ms: where the batch begins in the stream.
        tail_ms: trailing silence given to the recognizer before holding (None: never
            hold; audio held after a tentative end is still released or dropped).

    Returns:
        The :data:`FeedStep`. Nothing is held before speech started (leading silence is
        the recognizer's to hear) or within ``tail_ms`` of the last voiced frame; a batch
        past the tail that ends the speech is dropped (nothing held: only the batch).
    """
    if held_voiced_ms is not None:
        if last_voiced_ms != held_voiced_ms:
            return "release"  # voice again: the silence was a pause in the utterance
        return "drop" if ends else "hold"
    if (
        tail_ms is not None
        and speaking
        and (in_speech or ends)
        and start_ms - last_voiced_ms >= tail_ms
    ):
        return "drop" if ends else "hold"  # past the tail: silence the recognizer needs not
    return "feed"
