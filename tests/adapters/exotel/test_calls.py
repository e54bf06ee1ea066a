"""Exotel's own refusals (the behaviours every carrier shares, calls and refusals, are in
tests/adapters/test_carrier_calls.py): with no credentials configured every stream is
refused; a start in a format the gateway cannot take is closed."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from adapters.exotel.protocol import CHUNK_UNIT, MIN_CHUNK
from gateway.events import ResponseItem
from gateway.metrics import REGISTRY
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from tests.adapters.carriers import (
    OVERSIZED_PARAMS,
    Scripted,
    closed_with,
    session_of,
    upgrade_status,
)
from tests.adapters.exotel.harness import CARRIER, KEY, TOKEN, ExotelHarness, basic
from tests.adapters.twilio.helpers import twilio_gateway, until
from tests.conftest import refused_port, served
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"
"""What the caller says (the corpus': tests/adapters/test_carrier_calls.py's)."""


async def test_without_credentials_configured_every_stream_is_refused(
    speech: SpeechService,
) -> None:
    async with twilio_gateway(speech) as gw:
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        assert await upgrade_status(url, basic()) == 403


async def test_a_stream_with_more_than_one_authorization_header_is_refused(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """The right Basic credentials beside wrong ones (either order) are refused 403 before
    the upgrade, none of them looked at: only the first header was read, so right-then-wrong
    was let in. One right header still is."""
    right = basic()["Authorization"]
    wrong = basic(token="wrong")["Authorization"]
    async with CARRIER.gateway(speech) as (gw, _):
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream?sample-rate=8000"
        for pair in ([right, wrong], [wrong, right], [right, right]):
            headers = [("Authorization", value) for value in pair]
            with caplog.at_level(logging.INFO):
                assert await upgrade_status(url, headers) == 403, pair  # type: ignore[arg-type]
        assert any("more than one Authorization header" in r.getMessage() for r in caplog.records)
        assert await upgrade_status(url, basic()) == 101


@pytest.mark.parametrize(
    ("media_format", "named"),
    [
        ({"encoding": "audio/x-alaw", "sample_rate": "8000"}, "Unsupported Exotel encoding"),
        ({"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "8"}, "8-bit samples"),
        ({"encoding": "audio/x-raw", "sample_rate": "7000"}, "Unsupported sample rate 7000"),
        # G.711 μ-law is 8 kHz (the extension's audio/x-mulaw;rate=8000): a 16 or 24 kHz
        # μ-law start was taken, its audio decoded at a rate it is not in
        (
            {"encoding": "audio/x-mulaw", "sample_rate": "16000", "bit_rate": "8"},
            "Unsupported sample rate 16000 Hz of Exotel's audio/x-mulaw: expected 8000",
        ),
        (
            {"encoding": "audio/x-mulaw;rate=8000", "sample_rate": "24000"},
            "Unsupported sample rate 24000 Hz of Exotel's audio/x-mulaw: expected 8000",
        ),
        # raw/slin is 8, 16 or 24 kHz (the URL's sample-rate): 48 kHz was taken
        (
            {"encoding": "audio/x-raw", "sample_rate": "48000", "bit_rate": "16"},
            "Unsupported sample rate 48000 Hz of Exotel's raw audio: expected 8000, 16000 or 24000",
        ),
    ],
    ids=["alaw", "8-bit", "7000", "mulaw-16k", "mulaw-24k", "raw-48k"],
)
async def test_a_start_in_a_format_the_gateway_cannot_take_is_closed_1003(
    speech: SpeechService, media_format: dict[str, str], named: str
) -> None:
    """A start whose media_format the gateway cannot take is closed at once with 1003
    (unsupported data), the reason saying what; no turn is run."""
    async with CARRIER.gateway(speech) as (gw, _):
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream?sample-rate=8000"
        start = {
            "stream_sid": "stream-1",
            "call_sid": "call-1",
            "custom_parameters": {"appKey": "exotel"},
            "media_format": media_format,
        }
        frames = [
            json.dumps({"event": "connected"}),
            json.dumps({"event": "start", "sequence_number": "1", "start": start}),
        ]
        code, reason = await closed_with(url, frames, basic())
        assert code == 1003
        assert named in reason
        assert not gw.core.turns


async def test_an_invalid_start_is_closed_at_once_naming_the_fault(speech: SpeechService) -> None:
    """A start the gateway cannot read (an empty call_sid) is no call: the stream is
    closed at once with 1008, the reason naming the fault (not after the start timeout,
    as if no start had come); no turn is run."""
    async with CARRIER.gateway(speech) as (gw, _):
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream?sample-rate=8000"
        start = {
            "stream_sid": "stream-1",
            "call_sid": "",
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"},
        }
        frames = [
            json.dumps({"event": "connected"}),
            json.dumps({"event": "start", "sequence_number": "1", "start": start}),
        ]
        code, reason = await closed_with(url, frames, basic(), within_s=30)
        # closed for its start (the reason names it), not by the start's timeout
        assert code == 1008
        assert "call_sid and stream_sid must not be empty" in reason
        assert not gw.core.turns


async def test_calls_through_a_redis_outage_are_one_warning_not_two_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exotel streams are admitted by their credentials, so calls still come while the
    gateway's Redis refuses connections (their turns are refused). Each call logged two
    WARNINGs of its own (``call control from other instances is lost``, ``the session
    was not ended``); now the outage is the breaker's WARNING and the first call's, the
    rest DEBUG."""
    down = f"redis://127.0.0.1:{refused_port()}/0"  # nothing listens there
    media_format = {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}
    async with served(redis_url=down, exotel_api_key=KEY, exotel_api_token=SecretStr(TOKEN)) as url:
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        for _ in range(3):
            sid = uuid.uuid4().hex
            start = {"stream_sid": sid, "call_sid": sid, "custom_parameters": {"appKey": "exotel"}}
            start["media_format"] = media_format
            stop = {"call_sid": sid, "reason": "callended"}
            frames = [
                json.dumps({"event": "connected"}),
                json.dumps(
                    {"event": "start", "sequence_number": "1", "stream_sid": sid, "start": start}
                ),
                json.dumps(
                    {"event": "stop", "sequence_number": "2", "stream_sid": sid, "stop": stop}
                ),
            ]
            code, _ = await closed_with(
                f"ws://{urlsplit(url).netloc}/exotel/stream", frames, basic()
            )
            assert code == 1000
        for _ in range(100):  # the third call's end
            if sum("was not ended" in r.getMessage() for r in caplog.records) == 3:
                break
            await asyncio.sleep(0.05)
    lost = [r for r in caplog.records if "call control from other" in r.getMessage()]
    not_ended = [r for r in caplog.records if "was not ended" in r.getMessage()]
    assert [r.levelno for r in lost] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert [r.levelno for r in not_ended] == [logging.DEBUG] * 3  # the same outage
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["gateway.breaker", "gateway.call"], [
        r.getMessage() for r in warnings
    ]  # before: 1 + 6


async def test_a_nested_custom_parameter_s_long_name_is_cut_in_the_close_and_log(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A start whose custom parameter under a 3,000-character name is an object is
    closed with 1008 naming custom_parameters; the name is cut in the log line (it was
    copied whole into the WARNING, and the close reason)."""
    async with CARRIER.gateway(speech) as (gw, _):
        caplog.set_level(logging.INFO, "gateway")
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream?sample-rate=8000"
        start = {
            "stream_sid": "stream-1",
            "call_sid": "call-1",
            "custom_parameters": {"k" * 3000: {"nested": 1}},
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"},
        }
        frames = [
            json.dumps({"event": "connected"}),
            json.dumps({"event": "start", "sequence_number": "1", "start": start}),
        ]
        code, reason = await closed_with(url, frames, basic(), within_s=10)
        assert code == 1008
        assert reason.startswith("Invalid start: custom_parameters: kkk"), reason
        assert reason.endswith("…: expected a string"), reason
        assert not gw.core.turns
    closing = [r.getMessage() for r in caplog.records if "closing (1008)" in r.getMessage()]
    assert closing
    assert all(len(line) < 300 for line in closing), [len(line) for line in closing]


def open_streams() -> float:
    """The gateway's open Exotel streams (``gateway_connections{channel="exotel"}``)."""
    value = REGISTRY.get_sample_value("gateway_connections", {"channel": "exotel"})
    return value or 0.0


async def test_a_call_sid_s_second_stream_stays_registered_when_the_first_ends() -> None:
    """Two streams of one call_sid (Exotel reusing it, a reconnect): the channel's
    registry holds the later one; the earlier one ending removed the entry by call id,
    the later stream's included, and now removes only its own."""
    async with CARRIER.gateway(None) as (gw, _):
        calls = gw.app.state.exotel.calls
        async with ExotelHarness.dial(gw.url) as first:
            sid = first.call_sid
            assert await until(lambda: sid in calls, 10.0)
            runner = calls[sid]
            async with ExotelHarness.dial(gw.url, begin=False) as second:
                second.call_sid = second.call_id = sid
                await second.begin()
                assert await until(lambda: calls.get(sid) not in (None, runner), 10.0)
                later = calls[sid]
                both = open_streams()
                await first.stop()
                # the gauge drops as the first runner's serve() ends, with no await
                # before its registry clean-up: seen lower, the clean-up has run
                assert await until(lambda: open_streams() == both - 1, 20.0), open_streams()
                assert calls.get(sid) is later
                await second.stop()
                assert await until(lambda: not calls, 10.0), calls


async def test_custom_parameters_cannot_replace_the_caller_and_callee(
    speech: SpeechService,
) -> None:
    """The start's ``from`` and ``to`` are the caller and callee (the session's device and
    config): custom parameters named ``from``, ``to``, ``direction`` (an outbound call's
    data) are left out. They replaced the carrier's numbers, and ``direction`` made an
    inbound call an outbound one."""
    spoofed = {"appKey": "exotel", "from": "+15550666", "to": "+15550777", "direction": "outbound"}
    async with (
        CARRIER.gateway(speech) as (gw, _),
        ExotelHarness.dial(gw.url, params=spoofed) as call,
    ):
        await gw.wait_turns(1)
        session = await session_of(gw, f"exotel:{call.call_sid}")
        assert session is not None
        assert session.app_key == "exotel"  # not an identity: still taken
        assert session.device_id == "09999900000"  # the start's from
        assert (session.config["from"], session.config["to"]) == ("09999900000", "08000000000")
        assert "direction" not in session.config


async def test_the_stream_urls_app_key_wins_over_a_custom_parameter(speech: SpeechService) -> None:
    """The applet URL's ``appKey`` query parameter names the call's application: it was not
    read, the start's ``custom_parameters`` ``appKey`` deciding alone (another one than the
    URL's moved the call to another application). The start's is still taken when the URL
    has none (README: Exotel)."""
    async with CARRIER.gateway(speech) as (gw, _):
        base = f"ws://{urlsplit(gw.url).netloc}/exotel/stream?sample-rate=8000"
        cases = (("&appKey=sales", "sales"), ("", "from-custom"))
        for turns, (query, expected) in enumerate(cases, 1):
            params = {"appKey": "from-custom"}
            async with ExotelHarness.opened(base + query, params, headers=basic()) as call:
                await gw.wait_turns(turns)
                session = await session_of(gw, f"exotel:{call.call_sid}")
                assert session is not None
                assert session.app_key == expected, query


async def test_a_key_whose_duration_is_no_integer_reaches_the_core(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``dtmf`` message whose ``duration`` is not an integer (a word, empty, a fraction:
    informational, the gateway uses none of it) is the key all the same, as a Vonage key's
    duration is and Twilio's: each key reaches the core. Such a key was dropped as an
    invalid frame (a WARNING), the caller's press lost."""
    caplog.set_level(logging.INFO)
    async with CARRIER.gateway(speech) as (gw, _), ExotelHarness.dial(gw.url) as call:
        await gw.wait_turns(1)  # #intro
        for digit, duration in (("1", "long"), ("2", ""), ("3", 100.5)):
            dtmf = {"digit": digit, "duration": duration}
            await call.send({"event": "dtmf", "stream_sid": call.stream_sid, "dtmf": dtmf})
        assert await until(lambda: gw.core.inputs()[1:4] == ["1", "2", "3"], 30), gw.core.inputs()
    dropped = [r.getMessage() for r in caplog.records if "frame dropped" in r.getMessage()]
    assert not dropped, dropped


@pytest.mark.parametrize(("params", "fault"), OVERSIZED_PARAMS)
async def test_custom_parameters_beyond_bounds_close_the_stream_1008(
    params: dict[str, str], fault: str
) -> None:
    """Too many custom parameters, a name or value too long, or too many characters in
    all: the start is refused (1008 naming custom_parameters and the fault); they were
    taken whole into the call's parameters."""
    async with CARRIER.gateway(None) as (gw, _):
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream?sample-rate=8000"
        start = {
            "stream_sid": "stream-1",
            "call_sid": "call-1",
            "custom_parameters": {"appKey": "exotel", **params},
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"},
        }
        frames = [
            json.dumps({"event": "connected"}),
            json.dumps({"event": "start", "sequence_number": "1", "start": start}),
        ]
        code, reason = await closed_with(url, frames, basic(), within_s=10)
        assert code == 1008
        assert reason.startswith("Invalid start: custom_parameters: "), reason
        assert fault in reason, reason
        assert not gw.core.turns


async def test_an_answer_s_sentences_reach_the_caller_back_to_back(
    speech: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer of two items (each its own streamed piece of speech, their lengths no
    multiple of Exotel's 320-byte unit): the caller receives the pieces' audio back to
    back, silence only after the last (the chunk rule applied once). Each piece's last
    chunk was padded to 3.2 KB, so up to 200 ms of silence fell between the sentences."""
    pieces: list[bytes] = []  # the speech the turn engine streamed (slin 8 kHz: the wire's)
    audio_chunks = speech.audio_chunks

    async def chunks(
        item: ResponseItem, file_type: Any, *, played: tuple[str, ...] = ()
    ) -> AsyncIterator[bytes]:
        async for chunk in audio_chunks(item, file_type, played=played):
            pieces.append(chunk)
            yield chunk

    monkeypatch.setattr(speech, "audio_chunks", chunks)
    answer = [ResponseItem(text="Welcome to the museum."), ResponseItem(text="How can I help?")]
    core = Scripted({"#intro": answer})
    async with CARRIER.gateway(speech) as (gw, _):
        gw.app.state.gateway.conversation.pipeline = core
        async with ExotelHarness.dial(gw.url) as call:
            await gw.wait_answers(call, 1)
            audio = b"".join(pieces)  # all synthesized: the turn ended
            # the answer's tail (after its last mark) may still be on its way
            await call.wait_for(
                lambda: sum(len(r.payload) for r in call.media_frames()) >= len(audio)
            )
            wire = b"".join(r.payload for r in call.media_frames())
    assert [i.text for i in core.inputs] == ["#intro"]
    assert len(pieces) >= 2, [len(p) for p in pieces]
    assert any(len(p) % CHUNK_UNIT for p in pieces[:-1]), [len(p) for p in pieces]
    assert wire[: len(audio)] == audio  # back to back: no silence between the pieces
    assert set(wire[len(audio) :]) <= {0}  # the padding, at the end only
    assert len(wire) - len(audio) < MIN_CHUNK


class L16Harness(ExotelHarness):
    """A stream of the extension's ``audio/L16;rate=16000``: the start states its rate in
    the encoding only (no ``sample_rate``)."""

    rate = 16000
    media_format: ClassVar[dict[str, str]] = {"encoding": "audio/L16;rate=16000", "bit_rate": "16"}


class SilentRateHarness(ExotelHarness):
    """A 16 kHz stream whose start states no rate (``audio/x-raw``, no ``sample_rate``):
    the URL's ``sample-rate=16000`` does."""

    rate = 16000
    media_format: ClassVar[dict[str, str]] = {"encoding": "audio/x-raw"}


@pytest.mark.parametrize(
    ("harness", "query"),
    [(L16Harness, ""), (SilentRateHarness, "?sample-rate=16000")],
    ids=["encoding-rate", "url-sample-rate"],
)
async def test_a_start_stating_its_rate_in_the_encoding_is_served_at_that_rate(
    speech: SpeechService, corpus: dict[str, Pcm], harness: type[ExotelHarness], query: str
) -> None:
    """A start of ``audio/L16;rate=16000`` without ``sample_rate`` (CARRIERS.md
    "Exotel", the extension's formats), or of no rate at all on a URL of
    ``sample-rate=16000``, is served at 16 kHz: the bot's audio goes out in chunks of
    200 ms at 16 kHz (6400 bytes) and lasts as long as the intro's speech, and the
    caller's 16 kHz speech is recognised. It was read as 8 kHz: 3200-byte chunks, and
    the caller's audio decoded at half its rate (not recognised)."""
    async with CARRIER.gateway(speech) as (gw, _):
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream{query}"
        async with harness.opened(url, {"appKey": "exotel"}, headers=basic()) as call:
            await gw.wait_answers(call, 1)
            frames = call.media_frames()
            assert len(frames[0].payload) == 6400  # 200 ms of 16 kHz PCM16
            assert 3.0 < call.seconds(frames) < 9.0  # the intro's two sentences, at 16 kHz
            call.say(corpus[SENTENCE])
            await gw.wait_turns(2)
            heard = gw.core.turns[1][0]
            assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard


@pytest.mark.parametrize(
    ("query", "named"),
    [("?sample-rate=16000", "16000 Hz"), ("?sample-rate=16k", "'16k', no rate")],
    ids=["16000", "no-rate"],
)
async def test_a_url_sample_rate_the_start_disagrees_with_is_logged_naming_both(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, query: str, named: str
) -> None:
    """A start stating 8000 Hz on a stream whose URL asks for ``sample-rate=16000`` (or a
    value that is no rate) is served at the start's 8 kHz (its 3200-byte chunks: the start
    describes the audio that follows) and the disagreement is logged at WARNING, once for
    the call, naming both rates and the one served (it was silent: a misconfigured
    applet's calls, misheard if the start were wrong, left nothing to go by). A URL
    agreeing with the start logs nothing."""
    async with CARRIER.gateway(speech) as (gw, _):
        base = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        with caplog.at_level(logging.WARNING, logger="gateway.exotel"):
            async with ExotelHarness.opened(
                base + query, {"appKey": "exotel"}, headers=basic()
            ) as call:
                await gw.wait_answers(call, 1)
                assert len(call.media_frames()[0].payload) == 3200  # 200 ms at 8 kHz
            async with ExotelHarness.opened(
                base + "?sample-rate=8000", {"appKey": "exotel"}, headers=basic()
            ) as agreeing:
                await gw.wait_answers(agreeing, 1)
    lines = [r for r in caplog.records if r.name == "gateway.exotel"]
    assert [r.levelno for r in lines] == [logging.WARNING]
    assert lines[0].getMessage() == (
        f"exotel call {call.call_sid}: the stream URL's sample-rate ({named}) disagrees "
        "with the start's media_format (8000 Hz): served at the start's 8000 Hz; if the "
        "caller is not understood or sounds too fast or slow, make the Voicebot applet's "
        "URL sample-rate and its stream's rate the same"
    )
