"""Phone calls of every carrier while the gateway's own session store fails: at a turn's
save once its answer had begun (its item's audio went out), then at a turn's load.

Whole calls over a real WebSocket on a real uvicorn server (tests/adapters/carriers.py),
real speech, the gateway's Redis real but behind the proxy of
tests/gateway/redis_proxy.py (``reply_dropper``), cut off while the core answers the
intro. The caller hears the answer's audio, then the error text
(GATEWAY_VOICE_ERROR_TEXT); the call goes on (no hang-up, the stream open); a key
pressed while Redis is still cut off is a turn that cannot take its session: the error
text again, the core not asked. The log blames the session store, never the core (the
turn's error source ``gateway``, no ``pipeline`` error). An audit: no carrier needed a
fix (gateway/protocol/call.py speaks the error text for any Error or refusal).
"""

from __future__ import annotations

import logging

import pytest

from gateway.io.call import CallRunner
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from tests.adapters.carriers import Carrier
from tests.adapters.test_carrier_calls import ALL, SpeaksWhenReleased, each
from tests.adapters.twilio.helpers import until
from tests.gateway.redis_proxy import ReplyDropper

SORRY = Settings().voice_error_text


@each(ALL)
async def test_a_store_that_fails_saving_a_calls_answer_says_the_error_text_and_goes_on(
    carrier: Carrier,
    speech: SpeechService,
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "gateway.conversation")
    proxy, url = reply_dropper
    synthesized: list[str] = []  # what the call engine had spoken (its own texts)
    original = CallRunner._synthesize

    async def synthesize(self: CallRunner, text: str) -> bytes | None:
        synthesized.append(text)
        return await original(self, text)

    monkeypatch.setattr(CallRunner, "_synthesize", synthesize)
    async with carrier.gateway(speech, redis_url=url, redis_prefix=redis_prefix) as (gw, _):
        core = SpeaksWhenReleased(fail=False)
        gw.app.state.gateway.conversation.pipeline = core
        async with carrier.dial(gw.url, mic_speed=4.0) as call:
            assert await until(lambda: core.inputs == ["#intro"], 10), core.inputs
            proxy.cut()
            core.finish.set()
            assert await until(lambda: synthesized == [SORRY], 20), synthesized
            heard = len(call.media_frames())
            assert await until(lambda: len(call.media_frames()) > heard, 10)  # said
            assert call.closed_at is None  # the call goes on
            # still cut off: a key press's turn cannot take its session; the same
            await call.dtmf("5")
            assert await until(lambda: synthesized == [SORRY, SORRY], 20), synthesized
            assert core.inputs == ["#intro"]  # it never reached the core
            assert call.closed_at is None
            proxy.restore()
            await call.stop()
            await call.wait_for(lambda: call.closed_at is not None)
    turns = [r for r in caplog.records if r.name == "gateway.conversation"]
    blamed = [r.getMessage() for r in turns if "in a turn of" in r.getMessage()]
    assert blamed, [r.getMessage() for r in turns]
    assert all("session store unavailable" in m for m in blamed)
    ends = [getattr(r, "error_source", None) for r in turns if r.getMessage() == "turn error"]
    assert ends == ["gateway"]  # the store's (the gateway's), never the core's
    refused = [r.getMessage() for r in turns if r.getMessage() == "turn rejected"]
    assert len(refused) == 1
