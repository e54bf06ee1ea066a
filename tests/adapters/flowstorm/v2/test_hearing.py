"""The streamed PUT body's protocol, sans I/O (adapters/flowstorm/v2/hearing.py): chunks and
the speech stage's events in, actions and the outcome out, the wall clock passed in."""

from __future__ import annotations

import json

import pytest

from adapters.flowstorm.v2.hearing import (
    NOTHING_SAID_TEXT,
    STREAM,
    UTTERANCE_LOST_TEXT,
    Publish,
    RecognizeFile,
    Restarting,
    StreamedBody,
)
from adapters.flowstorm.v2.protocol import ClientConfig
from gateway.protocol import ProtocolError
from gateway.protocol.actions import CancelListening, FeedAudio, FinishListening, StartListening
from gateway.speech.audio import AudioFormat
from gateway.speech.types import Heard
from tests.adapters.flowstorm.v2.helpers import binary_line

PCM16 = AudioFormat("LINEAR16", 16000)
INPUT = json.dumps({"type": "Input", "input": {"transcript": {"text": "hello"}}}) + "\n"
CLOSE = '{"type":"InputStreamClose"}\n'


def body(*, realtime: bool, container: str | None = "raw", **bounds: float) -> StreamedBody:
    return StreamedBody(
        ClientConfig(realtime=realtime),
        container,  # type: ignore[arg-type]
        rid="r1",
        now=100.0,
        max_audio_bytes=64_000,
        max_body_bytes=4096,
        max_audio_s=2.0,
        silence_timeout_ms=5000,
        done_retain_s=30.0,
        **bounds,
    )


def run(streamed: StreamedBody, chunk: bytes, now: float) -> list[object]:
    streamed.receive(chunk, now)
    actions: list[object] = []
    while (step := streamed.step(now)) is not None:
        actions += step
    return actions


def test_realtime_audio_goes_to_the_stage_and_its_final_result_decides() -> None:
    streamed = body(realtime=True)
    assert streamed.timeout(100.0) == pytest.approx(6.0)  # silence timeout + 1 s grace
    [start, feed] = run(streamed, b"\x00\x01" * 800, 100.1)
    assert start == StartListening(STREAM, PCM16, interim=True)
    assert feed == FeedAudio(STREAM, b"\x00\x01" * 800)
    assert run(streamed, b"\x00\x02" * 10, 100.1) == [FeedAudio(STREAM, b"\x00\x02" * 10)]
    assert streamed.heard(Heard("speech_started", at_ms=50)) == []
    assert streamed.timeout(100.5) == pytest.approx(1.6)  # 2 s after the last chunk
    [interim] = streamed.heard(Heard("interim", "hel", 0.5))
    assert isinstance(interim, Publish)
    assert interim.message["type"] == "interim"
    assert not interim.done
    [done] = streamed.heard(Heard("final", " hello there ", 0.9, 800))
    assert isinstance(done, Publish)
    assert done.done
    assert done.retain_s == 30.0
    assert (done.message["result"], done.message["text"]) == ("final", "hello there")
    assert streamed.decided
    outcome = streamed.outcome()
    assert outcome.input is not None
    assert outcome.input.text == "hello there"
    assert [e.input.text for e in outcome.prefix] == ["hello there"]
    assert run(streamed, b"\x00\x00" * 100, 100.6) == []  # decided: the rest is dropped


def test_a_stall_after_speech_finishes_the_utterance_and_quiet_is_silence() -> None:
    streamed = body(realtime=True, stall_s=0.5)
    run(streamed, b"\x00\x00" * 800, 100.0)
    streamed.heard(Heard("speech_started"))
    assert streamed.timeout(100.2) == pytest.approx(0.3)
    assert streamed.timed_out() == [FinishListening(STREAM)]
    quiet = body(realtime=True, no_speech_grace_s=0.0)
    run(quiet, b"\x00\x00" * 800, 100.0)
    cancel, done = quiet.timed_out()
    assert cancel == CancelListening(STREAM)
    assert isinstance(done, Publish)
    assert done.message["result"] == "silence"
    outcome = quiet.outcome()
    assert outcome.input is not None
    assert outcome.input.text == "#silence"


def test_switching_to_text_cancels_listening_and_the_input_is_the_outcome() -> None:
    streamed = body(realtime=True, container=None)
    actions = run(streamed, (binary_line(b"\x00\x00" * 160) + CLOSE).encode(), 101.0)
    start, feed, cancel, done = actions
    assert isinstance(start, StartListening)
    assert isinstance(feed, FeedAudio)
    assert cancel == CancelListening(STREAM)
    assert isinstance(done, Publish)
    assert done.message["result"] == "text"
    assert streamed.timeout(101.0) == pytest.approx(60.0)  # TEXT_WAIT_S for the Input
    assert not streamed.decided
    assert run(streamed, INPUT.encode(), 102.0) == []  # "done" was published once
    assert streamed.decided  # the Input ends a realtime body: no wait for the body's end
    outcome = streamed.outcome()
    assert outcome.input is not None
    assert outcome.input.text == "hello"


def test_a_realtime_input_decides_at_once_and_what_follows_is_dropped() -> None:
    """The spec's realtime flow ends with the Input: it decides (the turn runs at once, as
    for a final result), with the Logs before it; what follows (a Log in its chunk, later
    chunks) is dropped, and :meth:`StreamedBody.drop` says so once (white space and audio
    after a final result: never)."""
    log_line = json.dumps({"type": "Log", "entries": [{"text": "early"}]}) + "\n"
    streamed = body(realtime=True, container=None)
    [done] = run(streamed, (log_line + INPUT + log_line).encode(), 100.5)
    assert isinstance(done, Publish)
    assert done.message["result"] == "text"
    assert streamed.decided
    outcome = streamed.outcome()
    assert outcome.input is not None
    assert outcome.input.text == "hello"
    assert [entry.text for entry in outcome.logs] == ["early"]  # the Log after it: dropped
    assert streamed.drop() is True  # the Log left in the Input's chunk
    assert streamed.drop(INPUT.encode()) is False  # said once
    assert [entry.text for entry in outcome.logs] == ["early"]
    spaced = body(realtime=True, container=None)
    run(spaced, INPUT.encode(), 100.5)
    assert spaced.drop() is False
    assert spaced.drop(b"\n \r\n") is False  # white space is nothing
    assert spaced.drop(binary_line(b"\x00\x00").encode()) is True
    heard = body(realtime=True)
    run(heard, b"\x00\x01" * 800, 100.0)
    heard.heard(Heard("final", "hello", 0.9))
    assert heard.drop(b"\x00\x01" * 800) is False  # the mic's tail after a final result
    file = body(realtime=False, container=None)  # not realtime: the Input decides at the end
    assert run(file, INPUT.encode(), 100.0) == []
    assert not file.decided
    assert file.ended() == []
    assert file.decided


def test_no_input_after_input_stream_close_is_a_408() -> None:
    streamed = body(realtime=True, container=None, text_wait_s=1.0)
    run(streamed, (binary_line(b"\x00\x00" * 160) + CLOSE).encode(), 100.0)
    with pytest.raises(ProtocolError) as caught:
        streamed.timed_out()
    assert caught.value.status == 408


def test_json_audio_without_realtime_is_recognised_whole_at_the_end() -> None:
    streamed = body(realtime=False, container=None)
    assert streamed.timeout(100.0) is None  # no wall-clock bound
    lines = binary_line(b"\x00\x00" * 800) + binary_line(b"\x00\x00" * 800)
    assert run(streamed, lines.encode(), 100.0) == []
    [recognize] = streamed.ended()
    assert recognize == RecognizeFile(b"\x00\x00" * 1600, PCM16)
    assert streamed.heard(Heard("final", "hi", 0.8)) == []  # nothing to publish
    outcome = streamed.outcome()
    assert outcome.input is not None
    assert outcome.input.text == "hi"


def test_too_much_audio_is_a_413() -> None:
    streamed = body(realtime=True)
    with pytest.raises(ProtocolError) as caught:
        run(streamed, b"\x00" * 64_002, 100.0)
    assert caught.value.status == 413


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"RIFF\x24\x7d", "after 6 bytes, no RIFF/WAVE header"),
        (b"RIFF\x24\x7d\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00", "after 22 bytes, no data chunk"),
    ],
)
def test_a_realtime_wav_body_that_ends_inside_its_header_is_a_400(head: bytes, why: str) -> None:
    streamed = body(realtime=True, container="wav")
    assert run(streamed, head, 100.1) == []
    with pytest.raises(ProtocolError) as err:
        streamed.ended()
    assert err.value.status == 400
    assert err.value.text == (
        "The audio/wav stream is not valid audio: expected a mono 16-bit PCM, 8-bit u-law or "
        f"8-bit A-law WAV stream (RIFF/WAVE): truncated header: the body ended {why}."
    )
    assert not streamed.decided  # no #silence turn on a broken body


def test_an_empty_realtime_wav_body_is_silence_as_a_raw_one() -> None:
    streamed = body(realtime=True, container="wav")
    [done] = streamed.ended()
    assert isinstance(done, Publish)
    assert done.message["result"] == "silence"
    heard = streamed.outcome().input
    assert heard is not None
    assert heard.text == "#silence"


# ------------------------------------------------------------- a graceful shutdown


def test_draining_finishes_the_utterance_being_heard_and_its_final_decides() -> None:
    streamed = body(realtime=True)
    run(streamed, b"\x00\x01" * 800, 100.0)
    streamed.heard(Heard("speech_started"))
    assert streamed.server_draining(100.5, 108.0) == [FinishListening(STREAM)]
    assert streamed.timeout(100.5) == pytest.approx(1.5)  # the stall bound comes first
    assert streamed.server_draining(100.6, 108.0) == []  # once
    [done] = streamed.heard(Heard("final", "hello", 0.9))
    assert isinstance(done, Publish)
    assert done.message["result"] == "final"
    outcome = streamed.outcome()
    assert outcome.input is not None
    assert outcome.input.text == "hello"


def test_draining_a_stream_where_nothing_was_said_gives_no_silence_turn() -> None:
    streamed = body(realtime=True)
    run(streamed, b"\x00\x00" * 800, 100.0)  # no speech started
    assert streamed.server_draining(100.5, 108.0) == [FinishListening(STREAM)]
    for nothing in (Heard("silence"), Heard("final", "  ", 0.1)):
        with pytest.raises(Restarting) as refused:
            streamed.heard(nothing)
        assert refused.value.text == NOTHING_SAID_TEXT
    assert not streamed.decided
    before_audio = body(realtime=True)
    with pytest.raises(Restarting) as refused:
        before_audio.server_draining(100.5, 108.0)
    assert refused.value.text == NOTHING_SAID_TEXT


def test_draining_without_time_or_past_the_deadline_is_the_lost_utterance() -> None:
    streamed = body(realtime=True)
    run(streamed, b"\x00\x01" * 800, 100.0)
    streamed.heard(Heard("speech_started"))
    with pytest.raises(Restarting) as refused:
        streamed.server_draining(100.5, 100.5)
    assert refused.value.text == UTTERANCE_LOST_TEXT
    cut = body(realtime=True)
    run(cut, b"\x00\x01" * 800, 100.0)
    assert cut.server_draining(100.5, 101.0) == [FinishListening(STREAM)]
    with pytest.raises(Restarting) as refused:  # its result did not come by 101.0
        cut.drain_expired()
    assert refused.value.text == UTTERANCE_LOST_TEXT
    with pytest.raises(Restarting) as refused:
        cut.timed_out()
    assert refused.value.text == UTTERANCE_LOST_TEXT
    with pytest.raises(Restarting) as refused:  # no audio came
        body(realtime=True).drain_expired()
    assert refused.value.text == NOTHING_SAID_TEXT


def test_draining_changes_nothing_but_a_realtime_utterance() -> None:
    assert body(realtime=False).server_draining(100.5, 108.0) == []
    decided = body(realtime=True)
    run(decided, b"\x00\x01" * 800, 100.0)
    decided.heard(Heard("final", "hello", 0.9))
    assert decided.server_draining(100.5, 108.0) == []
    typing = body(realtime=True, container=None)
    run(typing, (binary_line(b"\x00\x01" * 800) + CLOSE).encode(), 100.0)  # switched to text
    assert not typing.hearing_audio
    assert typing.server_draining(100.5, 108.0) == []


def test_a_wav_header_split_over_realtime_chunks_is_refused() -> None:
    """Realtime raw audio is checked for a file's header over its first bytes whatever its
    chunks: a RIFF/WAVE header arriving 4 bytes at a time is refused once it is whole (the
    bytes before it were audio for all the body could tell)."""
    header = b"RIFF\x24\x7d\x00\x00WAVEfmt "
    streamed = body(realtime=True)
    assert len(run(streamed, header[:4], 100.0)) == 2  # StartListening, FeedAudio
    run(streamed, header[4:8], 100.1)
    with pytest.raises(ProtocolError) as refused:
        run(streamed, header[8:], 100.2)
    assert refused.value.text.startswith("The audio/basic audio is a WAV file, not raw audio")
    plain = body(realtime=True)  # audio that is no file's goes on past its first 12 bytes
    assert len(run(plain, b"\x00\x01" * 3, 100.0)) == 2
    assert run(plain, b"RIFF\x00\x00\x00\x00WAVE", 100.1) == [
        FeedAudio(STREAM, b"RIFF\x00\x00\x00\x00WAVE")
    ]
