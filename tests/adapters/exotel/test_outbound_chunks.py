"""Exotel's outbound chunks across the pieces of one answer (pure: the codec and the call
engine). Exotel takes chunks of a multiple of 320 bytes, at least 3.2 KB (CARRIERS.md
"Exotel"): each streamed piece (a sentence) used to be padded to that on its own, so up
to 200 ms (L16 8 kHz) or 400 ms (μ-law) of silence fell between the sentences of one
answer, and the padding was not counted as audio played. Now a piece's tail is carried
into the next piece's first chunk and only the turn's last audio is padded, counted."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import pytest

from adapters.exotel.protocol import (
    CHUNK_UNIT,
    MIN_CHUNK,
    ExotelCodec,
    mark_message,
    whole_chunks,
)
from gateway.callcodec import MediaFormat
from gateway.events import (
    HEARD,
    UNHEARD,
    BinaryEvent,
    ErrorEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
)
from gateway.protocol.actions import StartListening, StartTurn
from gateway.protocol.call import (
    CallAction,
    CallConfig,
    CarrierCall,
    Interrupt,
    Play,
    PlayTail,
    Speak,
)
from gateway.speech.audio import Pcm, pcm_to_mulaw
from tests.adapters.carrier_audio import tone
from tests.adapters.exotel.test_protocol import SID, START, media, start

ENCODINGS = [("audio/x-raw", 8000), ("audio/x-mulaw", 8000), ("audio/x-raw", 16000)]
IDS = ["slin-8k", "mulaw-8k", "slin-16k"]


def payloads(frames: Sequence[str | bytes]) -> list[bytes]:
    """The audio of Exotel ``media`` messages, in order."""
    out = []
    for frame in frames:
        message = json.loads(frame)
        assert message["event"] == "media", message
        out.append(base64.b64decode(message["media"]["payload"]))
    return out


def padded_once(n_bytes: int, chunk_bytes: int) -> int:
    """Bytes sent for ``n_bytes`` of audio in Exotel chunks padded only at the end: the
    whole chunks it fills (:func:`whole_chunks`), then the rest padded to a last chunk
    (a multiple of 320 bytes, at least 3.2 KB)."""
    chunks, rest = whole_chunks(b"\0" * n_bytes, chunk_bytes)
    padded = max(MIN_CHUNK, -(-len(rest) // CHUNK_UNIT) * CHUNK_UNIT) if rest else 0
    return sum(map(len, chunks)) + padded


def started_call(encoding: str, rate: int, **config: Any) -> CarrierCall:
    codec = ExotelCodec()
    call = CarrierCall(
        codec, None, CallConfig(key_allowed=lambda key: True, channel="exotel", **config)
    )
    call.receive('{"event":"connected"}')
    actions = call.receive(start(str(rate), encoding, "8" if "mulaw" in encoding else "16"))
    assert any(isinstance(a, StartTurn) for a in actions)
    return call


def piece(pcm: Pcm, file_type: str) -> bytes:
    """``pcm`` as the turn engine streams it for the call's speech request."""
    return pcm_to_mulaw(pcm) if file_type == "mulaw" else pcm.data


def plays(actions: Sequence[CallAction]) -> list[Play | PlayTail]:
    """``actions``, all audio to send (a Play, or a turn's tail)."""
    assert all(isinstance(a, Play | PlayTail) for a in actions), actions
    return [a for a in actions if isinstance(a, Play | PlayTail)]


def test_the_codec_carries_a_piece_s_tail_into_the_next_piece() -> None:
    """Two pieces whose lengths are no multiple of 320 bytes: the wire audio is the first
    piece then the second, back to back, padded once at the end; the ms reported are
    those of the bytes sent, padding included."""
    codec = ExotelCodec()
    codec.receive_text(START)  # slin 8 kHz
    fmt = MediaFormat("L16", 8000)
    first, second = tone(440, 251, 8000), tone(660, 333, 8000)  # 4016 and 5328 bytes
    sent: list[bytes] = []
    total_ms = 0
    for pcm in (first, second):
        frames, ms = codec.carry(pcm)
        sent += payloads(frames)
        total_ms += ms
    frames, ms = codec.flush()
    assert len(frames) == 1  # the tail, padded
    sent += payloads(frames)
    total_ms += ms
    wire = b"".join(sent)
    audio = first.data + second.data
    assert wire[: len(audio)] == audio  # no silence between the pieces
    assert set(wire[len(audio) :]) == {0}  # the padding: at the end only
    # 9344 bytes: 9280 in whole units, the last 64 padded to a chunk of 3.2 KB
    assert len(wire) == padded_once(len(audio), codec.chunk_bytes) == 9280 + 3200
    assert all(len(p) % CHUNK_UNIT == 0 and len(p) >= MIN_CHUNK for p in sent)
    assert total_ms == fmt.duration_ms(len(wire)) == 780  # the padding counted
    assert codec.flush() == ([], 0)  # nothing held any more


def test_a_clear_drops_the_audio_held_back() -> None:
    codec = ExotelCodec()
    codec.receive_text(START)
    frames, _ = codec.carry(tone(440, 251, 8000))
    assert len(frames) == 1
    codec.clear()
    assert codec.flush() == ([], 0)


def test_audio_alone_is_still_padded_whole() -> None:
    """``audio`` (the CarrierCodec face): the piece in chunks, the last padded."""
    codec = ExotelCodec()
    codec.receive_text(START)
    sent = payloads(codec.audio(tone(440, 251, 8000)))
    assert [len(p) for p in sent] == [3840, 3200]
    assert codec.flush() == ([], 0)


@pytest.mark.parametrize(("encoding", "rate"), ENCODINGS, ids=IDS)
def test_an_answer_s_pieces_go_out_back_to_back_padded_once_and_counted(
    encoding: str, rate: int
) -> None:
    """The call engine plays an answer of two streamed pieces (lengths no multiple of the
    chunk): the media messages hold the pieces back to back, silence only after the last,
    sent at the Response; the Plays' ``audio_ms`` (the runner's played-until estimate and
    the heard/unheard split) add up to the audio sent, padding included. Before, each
    piece's last chunk was padded to 3.2 KB (up to 200 ms of silence between the
    sentences, 400 ms in μ-law), its padding not counted."""
    call = started_call(encoding, rate)
    codec = call.codec
    assert isinstance(codec, ExotelCodec)
    fmt = codec.outbound_format
    assert fmt is not None
    file_type = call.tts.file_type
    first, second = tone(440, 251, rate), tone(660, 333, rate)
    actions: list[CallAction] = []
    actions += call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="One. Two.")))
    actions += call.turn_event(BinaryEvent(data=piece(first, file_type)))
    actions += call.turn_event(BinaryEvent(data=piece(second, file_type)))
    actions += call.turn_event(ResponseEvent(response=Response()))
    played = plays(actions)
    wire = b"".join(p for play in played for p in payloads(play.messages))
    audio = fmt.encode(first) + fmt.encode(second)
    assert wire[: len(audio)] == audio  # no silence between the pieces
    assert set(wire[len(audio) :]) == set(fmt.silence)  # padded once, at the end
    assert len(wire) == padded_once(len(audio), codec.chunk_bytes)
    assert len(wire) - len(audio) < MIN_CHUNK
    assert sum(p.audio_ms for p in played) == int(fmt.duration_ms(len(wire)))
    # a mark per piece, as on every carrier; the tail after the last one, unmarked
    assert [type(p) for p in played] == [Play, Play, PlayTail]
    assert all(not p.final for p in played if isinstance(p, Play))
    assert call.marks.outstanding == 2


def test_the_tail_goes_out_before_the_error_text_and_after_it() -> None:
    """A turn that fails after a piece: the piece's tail is sent (padded) before the
    error text is said; the error text's own audio is padded at its end."""
    call = started_call("audio/x-raw", 8000)
    codec = call.codec
    assert isinstance(codec, ExotelCodec)
    first = tone(440, 251, 8000)
    played = plays(call.turn_event(BinaryEvent(data=first.data)))
    error = call.turn_event(ErrorEvent(text="boom", source="test"))
    assert isinstance(error[-1], Speak)
    played += plays(error[:-1])
    assert codec.held == b""
    said = tone(660, 333, 8000)
    played += plays(call.spoken(said.data))
    assert codec.held == b""
    sizes = [len(p) for play in played for p in payloads(play.messages)]
    assert sum(sizes) == padded_once(len(first.data), 3200) + padded_once(len(said.data), 3200)
    assert sum(p.audio_ms for p in played) == sum(sizes) // 16


def test_an_interruption_drops_the_tail() -> None:
    """Speech over the bot that cuts it off (here at once: GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS
    =0; by default Exotel's bot plays on while the speech is judged, and is cleared once it
    is a real interruption): the tail held back is not sent after the clear."""
    call = started_call("audio/x-raw", 8000, barge_in_max_backchannel_ms=0)
    codec = call.codec
    assert isinstance(codec, ExotelCodec)
    call.turn_event(BinaryEvent(data=tone(440, 251, 8000).data))
    assert codec.held
    for n in range(20):  # 400 ms of the caller's audio
        call.receive(media(b"\0\0" * 160, n + 3))
    over = call.voice(100, started=True, voiced_ms=300)  # the caller speaks over the bot
    assert [type(a) for a in over][:1] == [Interrupt]
    assert codec.held == b""
    assert call.turn_event(ResponseEvent(response=Response())) == []


def test_a_judged_interruption_drops_the_tail() -> None:
    """By default Exotel's bot plays on while speech over it is judged; once the speech is
    a real interruption (GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS of voice) the bot is cleared
    and the tail held back is dropped with it, not sent at the turn's end."""
    call = started_call("audio/x-raw", 8000)
    codec = call.codec
    assert isinstance(codec, ExotelCodec)
    call.turn_event(BinaryEvent(data=tone(440, 251, 8000).data))
    assert codec.held
    actions: list[CallAction] = []
    for n in range(90):  # 1.8 s of the caller's audio, voice from the 10th frame on
        actions += call.receive(media(b"\0\0" * 160, n + 3))
        if n >= 10:
            actions += call.voice(200, started=n == 10, voiced_ms=(n - 10) * 20)
    assert [type(a) for a in actions if isinstance(a, StartListening | Interrupt)] == [
        StartListening,
        Interrupt,
    ]
    assert codec.held == b""
    assert call.turn_event(ResponseEvent(response=Response())) == []


@pytest.mark.parametrize(("encoding", "rate"), ENCODINGS, ids=IDS)
def test_a_short_sentence_held_back_whole_is_heard_as_its_own(encoding: str, rate: int) -> None:
    """An answer's first item is shorter than a chunk (held back whole, sent at the head of
    the next item's first chunk): once its mark came back and the caller cuts in a while
    into the next item, the first item counts as heard, its ms its own. Before, its Play
    counted the 0 ms sent with it and the next item's Play its audio: the first item had
    no audio, so none of it was heard ("Sure." unheard though it played)."""
    # cut off at once (GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS=0): by default the bot plays on
    # while the speech over it is judged
    call = started_call(encoding, rate, barge_in_max_backchannel_ms=0)
    file_type = call.tts.file_type
    per_ms = rate // 1000 * (1 if file_type == "mulaw" else 2)  # wire bytes
    short_ms = MIN_CHUNK // per_ms - 10  # under 3.2 KB: 190 ms (slin 8 kHz), 390 (μ-law), 90
    short, long = tone(440, short_ms, rate), tone(660, 1500, rate)
    first = call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="Sure.")))
    first += call.turn_event(BinaryEvent(data=piece(short, file_type)))
    (play,) = plays(first)
    assert isinstance(play, Play)
    assert play.messages == ()  # all of it held back
    text = "Your order ships tomorrow at noon."
    rest = call.turn_event(ResponseItemEvent(response_item=ResponseItem(text=text)))
    rest += call.turn_event(BinaryEvent(data=piece(long, file_type)))
    rest += call.turn_event(ResponseEvent(response=Response()))
    played = [play, *plays(rest)]
    fmt = call.codec.outbound_format
    assert fmt is not None
    wire = sum(len(p) for one in played for p in payloads(one.messages))
    assert sum(p.audio_ms for p in played) == int(fmt.duration_ms(wire))  # all counted once
    call.receive(mark_message(SID, "1"))  # nothing was before it: back at once
    for n in range(40):  # 800 ms of the caller's audio: the bot speaks on meanwhile
        call.receive(media(b"\0\0" * (rate // 50), n + 3))
    over = call.voice(400, started=True, voiced_ms=300)  # the caller speaks over the bot
    assert any(isinstance(a, Interrupt) for a in over)
    assert call.interruption is not None
    heard, unheard = call.interruption[HEARD], call.interruption[UNHEARD]
    assert heard.startswith("Sure. "), (heard, unheard)
    assert "Sure." not in unheard, (heard, unheard)
    assert unheard.endswith("at noon."), (heard, unheard)


@pytest.mark.parametrize(("encoding", "rate"), ENCODINGS, ids=IDS)
def test_a_sentence_still_held_back_at_a_judged_interruption_is_unheard(
    encoding: str, rate: int
) -> None:
    """An answer's first item is shorter than a chunk: held back whole for the next item,
    its mark sent at once (nothing before it: back at once). The caller speaks over the
    bot before the next item's speech came (a slow synthesis) and is judged a real interruption (the
    bot plays on meanwhile): the clear drops "Sure." unsent, so it counts as unheard.
    Before, its mark's echo (and the time passed while judged) counted it heard: the
    core was told the caller heard "Sure." though none of it was ever sent."""
    call = started_call(encoding, rate)
    short_ms = MIN_CHUNK // (rate // 1000 * (1 if "mulaw" in encoding else 2)) - 10
    first = call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="Sure.")))
    first += call.turn_event(BinaryEvent(data=piece(tone(440, short_ms, rate), call.tts.file_type)))
    (play,) = plays(first)
    assert isinstance(play, Play)
    assert play.messages == ()  # all of it held back
    text = "Your order ships tomorrow at noon."
    assert call.turn_event(ResponseItemEvent(response_item=ResponseItem(text=text))) == []
    call.receive(mark_message(SID, "1"))  # nothing was before it: back at once
    actions: list[CallAction] = []
    for n in range(90):  # 1.8 s of the caller's audio, voice from the 10th frame on
        actions += call.receive(media(b"\0\0" * (rate // 50), n + 3))
        if n >= 10:
            actions += call.voice(200, started=n == 10, voiced_ms=(n - 10) * 20)
    assert [type(a) for a in actions if isinstance(a, Interrupt)] == [Interrupt]
    assert call.interruption is not None
    assert call.interruption[HEARD] == "", call.interruption
    assert call.interruption[UNHEARD] == f"Sure. {text}", call.interruption
