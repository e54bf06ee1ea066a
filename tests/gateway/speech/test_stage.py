"""The speech stage with real speech (Piper audio -> one WebRTC VAD pass -> pocketsphinx):
onsets at once, utterances opened at an onset with their preroll, queued and inline
recognition, idle, stop, backpressure, and many utterances on one stream."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.speech.audio import AudioFormat, Pcm, pcm_to_mulaw, resample, silence
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.types import Heard
from tests.conftest import unless_hung
from tests.speech import normalise, padded, wer

MULAW8 = AudioFormat("MULAW", 8000)
PCM16 = AudioFormat("LINEAR16", 16000)
FRAME = 160  # 20 ms of 8 kHz μ-law, as Twilio sends it
QUIET = b"\xff" * FRAME


def call_stage(recognizer: PocketsphinxRecognizer, **options: int | bool | None) -> SpeechStage:
    """A stage as a phone call makes it: 20 ms frames, no silence timeout, a preroll."""
    return SpeechStage(
        recognizer,
        MULAW8,
        ListenOptions(interim=False, silence_timeout_ms=None, **options),  # type: ignore[arg-type]
        frame_ms=20,
        keep_ms=1000,
        batch_ms=60,
    )


def once(stage: SpeechStage) -> bool:
    """Whether the stage's endpointer classified every whole 20 ms frame heard, once."""
    return stage.classified_ms == stage.now_ms // 20 * 20


def phone(pcm: Pcm) -> bytes:
    return pcm_to_mulaw(resample(pcm, 8000))


async def test_onsets_come_at_once_and_each_frame_is_classified_once(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    stage = call_stage(recognizer)
    audio = QUIET * 25 + phone(padded(corpus["tell me about this place"], 0, 1200))
    onsets: list[tuple[int, Heard]] = []
    for i in range(0, len(audio), FRAME):
        onsets += [(i // FRAME, h) for h in stage.hear(audio[i : i + FRAME])]
        assert once(stage)  # one VAD pass, frame by frame
    [(frame, onset)] = onsets
    assert onset.kind == "speech_started"
    assert 450 <= onset.at_ms <= 700  # after the 500 ms of quiet
    assert frame * 20 - onset.at_ms >= 140  # confirmed after min_speech_ms of voice
    assert stage.onset_ms is None  # the speech ended in the trailing quiet
    assert not stage.done  # no utterance was opened: nothing recognised


async def test_an_utterance_opened_at_the_onset_is_recognised_from_its_preroll(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    stage = call_stage(recognizer)
    audio = QUIET * 25 + phone(padded(corpus["play some music please"], 0, 1200))
    reported: list[Heard] = []

    async def report(heard: Heard) -> None:
        reported.append(heard)

    task: asyncio.Task[None] | None = None
    for i in range(0, len(audio), FRAME):
        if stage.hear(audio[i : i + FRAME]):  # the onset: listen from before it, as a call does
            assert stage.onset_ms is not None
            stage.listen(stage.onset_ms - 300)
            task = asyncio.create_task(stage.run(report))
        await asyncio.sleep(0)
    assert task is not None
    await asyncio.wait_for(task, 30)
    assert stage.result is not None
    assert stage.result.kind == "final"
    assert wer([("play some music please", normalise(stage.result.text))]) <= 0.34
    assert reported[-1] == stage.result
    assert once(stage)  # recognition ran no VAD of its own


async def test_two_utterances_on_one_stream(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    stage = call_stage(recognizer)
    texts = ["tell me about this place", "what is the weather like today"]
    finals: list[str] = []
    for text in texts:
        audio = QUIET * 10 + phone(padded(corpus[text], 0, 1200))
        task: asyncio.Task[None] | None = None
        for i in range(0, len(audio), FRAME):
            if stage.hear(audio[i : i + FRAME]) and task is None:
                assert stage.onset_ms is not None
                stage.listen(stage.onset_ms - 300)
                task = asyncio.create_task(stage.run(_nothing))
            await asyncio.sleep(0)
        assert task is not None
        await asyncio.wait_for(task, 30)
        assert stage.result is not None
        assert stage.result.kind == "final"
        finals.append(normalise(stage.result.text))
    assert wer(list(zip(texts, finals, strict=True))) <= 0.34
    assert once(stage)  # one endpointer for the whole stream


async def test_speech_over_already_is_recognised_from_the_kept_audio_to_its_end(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """``listen(from, until_ms=end)``: a phrase the endpointer ended before anyone
    listened (a call's caller speaking while the recognizer was behind) is recognised
    from the kept audio alone, up to its end, and ends there: the next phrase, begun
    before and going on after, is not in it."""
    stage = SpeechStage(
        recognizer,
        MULAW8,
        ListenOptions(interim=False, silence_timeout_ms=None),
        frame_ms=20,
        keep_ms=3000,
        batch_ms=60,
    )
    first = QUIET * 25 + phone(padded(corpus["play some music please"], 0, 1200))
    onset = end = None
    for i in range(0, len(first), FRAME):
        if stage.hear(first[i : i + FRAME]):
            onset = stage.onset_ms
        if onset is not None and end is None and stage.onset_ms is None:
            end = stage.now_ms  # the endpointer ended it
    assert onset is not None
    assert end is not None
    then = phone(padded(corpus["what is the weather like today"], 0, 1200))
    half = len(then) // 2 // FRAME * FRAME
    for i in range(0, half, FRAME):  # the next phrase begins
        stage.hear(then[i : i + FRAME])
    assert stage.onset_ms is not None
    stage.listen(onset - 300, until_ms=end)
    task = asyncio.create_task(stage.run(_nothing))
    for i in range(half, len(then), FRAME):  # heard, not recognised
        stage.hear(then[i : i + FRAME])
        await asyncio.sleep(0)
    await asyncio.wait_for(task, 30)
    assert stage.result is not None
    assert stage.result.kind == "final"
    assert wer([("play some music please", normalise(stage.result.text))]) <= 0.34
    assert "weather" not in stage.result.text
    assert stage.audio_ms == end - (onset - 300)


async def test_speech_begun_before_a_late_result_is_kept_until_the_next_utterance(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """An utterance ended (the endpointer's end) and its result has not come (the
    recognizer behind the caller); the caller says a phrase and goes quiet for 5 s, five
    times ``keep_ms``: the phrase's audio is still kept from before its onset, and the next
    utterance (``listen(from, until_ms=end)``) recognises it. Before, the stage kept only
    the last ``keep_ms`` (up to twice that): the phrase was gone, the result silence. Once
    that utterance opened, the ring keeps ``keep_ms`` again."""
    stage = call_stage(recognizer)
    first = QUIET * 25 + phone(padded(corpus["play some music please"], 0, 1200))
    stage.listen(at_onset=300)
    for i in range(0, len(first), FRAME):
        stage.hear(first[i : i + FRAME])
    assert stage.onset_ms is None  # the endpointer ended it; no result yet (no run)
    assert not stage.done
    then = phone(padded(corpus["what is the weather like today"], 0, 5000))
    onset = end = None
    for i in range(0, len(then), FRAME):
        if stage.hear(then[i : i + FRAME]):
            onset = stage.onset_ms
        if onset is not None and end is None and stage.onset_ms is None:
            end = stage.now_ms
    assert onset is not None
    assert end is not None
    assert stage.now_ms - onset > 5 * 1000  # far past keep_ms
    stage.stop()  # the first utterance's result came (or it was let go)
    stage.listen(onset - 300, until_ms=end)
    await asyncio.wait_for(stage.run(_nothing), 30)
    assert stage.result is not None
    assert stage.result.kind == "final"
    assert wer([("what is the weather like today", normalise(stage.result.text))]) <= 0.34
    for _ in range(150):  # 3 s more: the kept audio is bounded again
        stage.hear(QUIET)
    assert len(stage.recent(0)) <= 2 * MULAW8.bytes_for_ms(1000)


async def _nothing(heard: Heard) -> None:
    """A report that keeps nothing."""


async def test_inline_feed_gives_interim_and_final_results(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    speech = resample(padded(corpus["i would like to book a table for two"]), 16000)
    heard: list[Heard] = []
    async with SpeechStage(recognizer, PCM16, ListenOptions()) as stage:
        for i in range(0, len(speech.data), PCM16.bytes_for_ms(100)):
            heard += await stage.feed(speech.data[i : i + PCM16.bytes_for_ms(100)])
            if stage.done:
                break
    kinds = [h.kind for h in heard]
    assert kinds[0] == "speech_started"
    assert "interim" in kinds
    assert kinds[-1] == "final"
    assert wer([("i would like to book a table for two", normalise(heard[-1].text))]) <= 0.34


async def test_queued_mode_reports_idle_then_finishes_on_request(
    recognizer: PocketsphinxRecognizer,
) -> None:
    stage = SpeechStage(recognizer, PCM16, ListenOptions(), idle_timeout_ms=200)
    stage.listen()
    reported: list[Heard] = []

    async def report(heard: Heard) -> None:
        reported.append(heard)
        if heard.kind == "idle":
            stage.finish_soon()  # what V1's protocol asks for (FinishListening)

    started = time.monotonic()
    await stage.put(silence(300, 16000).data)
    await unless_hung(stage.run(report), "the stage's run")
    # not idle before its 200 ms (a lower bound; was also: < 5 s of wall clock): idle
    # reported, then the silence its finish asked for, in that order
    assert time.monotonic() - started >= 0.15
    assert [h.kind for h in reported] == ["idle", "silence"]
    assert stage.result == reported[-1]


async def test_no_speech_within_the_timeout_is_silence(
    recognizer: PocketsphinxRecognizer,
) -> None:
    stage = SpeechStage(recognizer, PCM16, ListenOptions(silence_timeout_ms=1000))
    heard: list[Heard] = []
    async with stage:
        for _ in range(30):
            heard += await stage.feed(silence(100, 16000).data)
            if stage.done:
                break
    assert [(h.kind, h.at_ms) for h in heard] == [("silence", 1000)]
    assert stage.audio_ms <= 1100


async def test_stop_ends_the_run_without_a_result_and_frees_the_recognizer(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    stage = SpeechStage(recognizer, PCM16, ListenOptions(), max_pending_ms=500)
    stage.listen()
    speech = resample(padded(corpus["tell me about this place"]), 16000).data
    run = asyncio.create_task(stage.run(_nothing))
    for i in range(0, PCM16.bytes_for_ms(800), PCM16.bytes_for_ms(100)):
        await stage.put(speech[i : i + PCM16.bytes_for_ms(100)])  # waits when 500 ms queue
    stage.stop()
    await asyncio.wait_for(run, 10)
    assert stage.result is None
    assert stage.cancelled  # the recognition stream was released
    await stage.put(speech[:3200])  # stopped: taken no more
    assert stage.done


async def test_unbound_lets_a_put_held_by_backpressure_take_its_chunk(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """A put waiting while ``max_pending_ms`` of audio waits for the recognizer (none is
    taken: no run yet) takes its chunk once the stage is unbound (a V1 socket's graceful
    shutdown reads the audio received before it finishes the utterance), and later puts
    do not wait: the final is of all of the audio."""
    sentence = "tell me about this place"
    stage = SpeechStage(recognizer, PCM16, ListenOptions(), max_pending_ms=500)
    stage.listen()
    speech = resample(padded(corpus[sentence]), 16000).data
    step = PCM16.bytes_for_ms(100)
    chunks = [speech[i : i + step] for i in range(0, len(speech), step)]
    for chunk in chunks[:5]:
        await stage.put(chunk)  # 500 ms queued
    held = asyncio.create_task(stage.put(chunks[5]))
    await asyncio.sleep(0.2)
    assert not held.done()  # backpressure
    stage.unbound()
    await asyncio.wait_for(held, 5)
    for chunk in chunks[6:]:
        await asyncio.wait_for(stage.put(chunk), 5)
    assert stage.now_ms == int(PCM16.duration_ms(len(speech)))  # all of it heard
    heard: list[Heard] = []

    async def report(event: Heard) -> None:
        heard.append(event)

    await asyncio.wait_for(stage.run(report), 60)
    [final] = [h for h in heard if h.kind == "final"]
    assert wer([(sentence, normalise(final.text))]) <= 0.34, final.text


async def test_an_utterance_listening_at_onset_is_recognised_from_the_next_voice_on(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """A Duplex stream's utterances (Flowstorm V1): opened before anyone speaks, fed only
    from the onset on (quiet holds no recognizer and never times out), and the next one
    opened from the report of the previous one's result."""
    stage = call_stage(recognizer)
    texts = ["tell me about this place", "what is the weather like today"]
    finals: list[str] = []
    runs: list[asyncio.Task[None]] = []
    ended = asyncio.Event()

    async def report(heard: Heard) -> None:
        if heard.kind == "final":
            finals.append(normalise(heard.text))
            ended.set()
            stage.listen(at_onset=300)  # the next utterance, while this run still reports
            runs.append(asyncio.create_task(stage.run(report)))

    stage.listen(at_onset=300)
    runs.append(asyncio.create_task(stage.run(report)))
    for text in texts:
        for _ in range(150):  # 3 s of quiet: nothing is recognised, nothing times out
            stage.hear(QUIET)
            await asyncio.sleep(0)
        assert stage.audio_ms == 0
        assert not stage.done
        audio = phone(padded(corpus[text], 0, 1200))
        for i in range(0, len(audio), FRAME):
            stage.hear(audio[i : i + FRAME])
            await asyncio.sleep(0)
        await asyncio.wait_for(ended.wait(), 30)
        ended.clear()
    await asyncio.wait_for(asyncio.gather(*runs[:-1]), 10)  # each run served its utterance
    assert wer(list(zip(texts, finals, strict=True))) <= 0.34
    assert not runs[-1].done()  # the third utterance waits for an onset
    stage.stop()
    await asyncio.wait_for(runs[-1], 10)

    # opened while someone speaks: recognised from the onset, with the audio kept
    speech = phone(padded(corpus["play some music please"], 0, 1200))
    for i in range(0, FRAME * 40, FRAME):  # the first 800 ms
        stage.hear(speech[i : i + FRAME])
    assert stage.onset_ms is not None
    stage.listen(at_onset=300)
    run = asyncio.create_task(stage.run(_nothing))
    for i in range(FRAME * 40, len(speech), FRAME):
        await stage.put(speech[i : i + FRAME])
    await asyncio.wait_for(run, 30)
    assert stage.result is not None
    assert wer([("play some music please", normalise(stage.result.text))]) <= 0.34


async def test_onset_heard_tells_whether_anything_was_said_in_the_open_utterance(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """What a graceful shutdown asks of an utterance it could not wait for (Flowstorm V1):
    whether its endpointer heard a voice onset in it, known as the audio is heard, however
    far the recognition is behind (no run here: nothing of it is recognised)."""
    stage = call_stage(recognizer)
    stage.listen()
    assert not stage.onset_heard  # no audio yet
    for _ in range(50):  # 1 s of quiet
        await stage.put(QUIET)
    assert not stage.onset_heard
    speech = phone(padded(corpus["play some music please"], 0, 1200))
    for i in range(0, len(speech), FRAME):
        await stage.put(speech[i : i + FRAME])
    assert stage.onset_heard
    assert stage.audio_ms == 0  # none of it recognised
    assert stage.onset_ms is None  # the speech is over
    stage.stop()
    # the next utterance (a Duplex stream's, at the next onset): its own onsets count
    stage.listen(at_onset=300)
    assert not stage.onset_heard
    for i in range(0, FRAME * 40, FRAME):  # the first 800 ms of the speech
        stage.hear(speech[i : i + FRAME])
    assert stage.onset_heard
    stage.listen(at_onset=300)  # opened while someone speaks: that speech is the utterance's
    assert stage.onset_heard
    stage.stop()


class _SlowRelease:
    """The real recognizer whose streams take ``release_s`` to be released, or until
    ``hold`` is set when given (a cloud recognizer's close is a round trip; pocketsphinx's
    waits for the decoding it does). ``releasing`` is set when a release begins,
    ``released`` when one has ended."""

    def __init__(
        self, inner: PocketsphinxRecognizer, release_s: float, hold: asyncio.Event | None = None
    ) -> None:
        self._inner = inner
        self._release_s = release_s
        self._hold = hold
        self.opened = asyncio.Event()
        self.releasing = asyncio.Event()
        self.released = asyncio.Event()

    async def open_stream(self, fmt: AudioFormat) -> object:
        stream = await self._inner.open_stream(fmt)
        self.opened.set()
        release_s, hold = self._release_s, self._hold
        releasing, released = self.releasing, self.released

        class Slow:
            async def cancel(self) -> None:
                releasing.set()
                if hold is not None:
                    await hold.wait()
                else:
                    await asyncio.sleep(release_s)
                await stream.cancel()
                released.set()

            def __getattr__(self, name: str) -> object:
                return getattr(stream, name)

        return Slow()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


async def test_an_utterance_opened_while_the_one_before_is_released_is_left_as_it_is(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """An utterance dropped while it is recognised (its run cancelled: Flowstorm V1's typed
    input on a Duplex stream) releases its recognition stream on the way out
    (SpeechStage.cancel), which may take a while; the stream's next utterance may be
    opened on the stage meanwhile (the V1 receive loop no longer waits for the release).
    The release then marked that next utterance cancelled and emptied its queue: it
    ended without a result. Now it is left as it is and recognised."""
    hold = asyncio.Event()  # the release ends when the test says
    slow = _SlowRelease(recognizer, release_s=0.0, hold=hold)
    stage = SpeechStage(slow, PCM16, ListenOptions(interim=False))  # type: ignore[arg-type]
    speech = resample(padded(corpus["tell me about this place"]), 16000).data
    chunk = PCM16.bytes_for_ms(100)
    stage.listen()
    dropped = asyncio.create_task(stage.run(_nothing))
    await stage.put(speech[: chunk * 10])
    async with asyncio.timeout(30):
        await slow.opened.wait()  # its recognition stream is open
    slow.opened.clear()
    stage.stop()
    dropped.cancel()  # not awaited: its release goes on
    await unless_hung(slow.releasing.wait(), "the release")  # (V1: the typed turn runs)
    stage.listen()  # the next utterance
    heard: list[Heard] = []

    async def report(event: Heard) -> None:
        heard.append(event)

    run = asyncio.create_task(stage.run(report))
    await stage.put(speech[:chunk])
    await unless_hung(slow.opened.wait(), "the next utterance's stream")  # it is heard
    hold.set()  # the release ends now, while the next utterance is heard
    await unless_hung(slow.released.wait(), "the release")
    for i in range(chunk, len(speech), chunk):
        await stage.put(speech[i : i + chunk])
    stage.finish_soon()
    await asyncio.wait_for(run, 30)
    assert dropped.cancelled()
    assert [h.kind for h in heard] == ["final"]  # before: none, the run ended cancelled
    assert wer([("tell me about this place", normalise(heard[0].text))]) <= 0.34


@pytest.mark.parametrize("turns", [0, 1])
async def test_an_utterance_opened_as_soon_as_the_one_before_is_dropped_frees_its_recognizer(
    corpus: dict[str, Pcm], turns: int
) -> None:
    """The caller of a dropped utterance need not wait for its release (SpeechStage.cancel;
    Flowstorm V1's typed input on a Duplex stream cancels the utterance's run and goes on):
    the next utterance may be opened on the stage at once, before the cancelled run has
    taken a step. The run then released nothing (its generation was no longer the
    stage's), so the dropped utterance's recognizer was never given back (with one
    decoder, no later utterance ever got one), and a release that began a loop turn later
    read the next utterance's state and marked it cancelled. Now the dropped stream is
    released and the next utterance recognised."""
    recognizer = PocketsphinxRecognizer(max_streams=1, isolation="thread", queue_wait_s=10)
    try:
        opening = _SlowRelease(recognizer, release_s=0.0)  # (tells when a stream is open)
        stage = SpeechStage(opening, PCM16, ListenOptions(interim=False))  # type: ignore[arg-type]
        speech = resample(padded(corpus["tell me about this place"]), 16000).data
        chunk = PCM16.bytes_for_ms(100)
        stage.listen()
        dropped = asyncio.create_task(stage.run(_nothing))
        await stage.put(speech[: chunk * 10])
        gate = recognizer._gate()
        async with asyncio.timeout(30):
            await opening.opened.wait()  # its recognition stream is open: the one decoder
        assert gate.held == 1
        await asyncio.sleep(1.0)  # it recognised what it had: it waits for more audio
        stage.stop()
        dropped.cancel()  # not awaited: the next utterance is opened at once
        for _ in range(turns):
            await asyncio.sleep(0)
        stage.listen()
        heard: list[Heard] = []

        async def report(event: Heard) -> None:
            heard.append(event)

        run = asyncio.create_task(stage.run(report))
        for i in range(0, len(speech), chunk):
            await stage.put(speech[i : i + chunk])
        stage.finish_soon()
        await asyncio.wait_for(run, 30)  # before: RecognizerBusy (0: never freed), no result (1)
        await asyncio.gather(dropped, return_exceptions=True)
        assert dropped.cancelled()
        assert [h.kind for h in heard] == ["final"]
        assert wer([("tell me about this place", normalise(heard[0].text))]) <= 0.34
        assert gate.held == 0  # both streams given back
    finally:
        await recognizer.aclose()
