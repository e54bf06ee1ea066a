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

Then a session's lock lost during a call's turn (another holder's token in Redis, as
Voiceflow's test has it): the store's lock-lost Error, the error text heard, the call
going on, the other holder's lock and the other calls' sessions untouched; no carrier
needed a fix either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.events import ErrorEvent, Input, Response, ResponseItem, TurnEvent
from gateway.io.call import CallRunner
from gateway.protocol.call import CallAction, CarrierCall
from gateway.sessions import Session
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from gateway.turn import STORE_LOCK_LOST_TEXT, store_failed
from tests.adapters.carriers import Carrier, session_of
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


class HoldsOne:
    """A core answering every input at once with an item of text, but ``held`` (a key)
    only once ``release`` is set; the inputs it got in :attr:`inputs`."""

    name = "holds-one"

    def __init__(self, held: str) -> None:
        self.held = held
        self.inputs: list[str] = []
        self.release = asyncio.Event()

    async def process(self, session: Session, input: Input) -> AsyncIterator[Any]:
        self.inputs.append(input.text)
        if input.text == self.held:
            await self.release.wait()
        yield ResponseItem(text=f"You pressed {input.text}.")
        yield Response()

    async def aclose(self) -> None:
        pass


@each(ALL)
async def test_a_calls_session_lock_lost_during_its_turn_says_the_error_text_and_goes_on(
    carrier: Carrier,
    speech: SpeechService,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two calls, their intros answered and saved; the first call's key press is a turn
    the core holds, while its session's lock is taken by another (its lease ran out: here
    its token replaced in Redis). Its save finds the lock lost: the turn ends with the
    store's Error (source ``gateway``, STORE_LOCK_LOST_TEXT: :func:`gateway.turn.store_failed`),
    the caller hears the error text, the call goes on (a key pressed once the other
    holder is done is answered by the core), the log blames the store's lost lock (one
    ERROR), never the core. The other holder's lock is left alone; the other call's
    session is untouched (as saved after its intro) and its next key answered."""
    caplog.set_level(logging.DEBUG, "gateway")
    synthesized: list[str] = []  # what the call engine had spoken (its own texts)
    errors: list[ErrorEvent] = []  # the turns' Errors, as the call engine got them
    synthesize, turn_event = CallRunner._synthesize, CarrierCall.turn_event

    async def spoken(self: CallRunner, text: str) -> bytes | None:
        synthesized.append(text)
        return await synthesize(self, text)

    def seen(self: CarrierCall, event: TurnEvent) -> list[CallAction]:
        if isinstance(event, ErrorEvent):
            errors.append(event)
        return turn_event(self, event)

    monkeypatch.setattr(CallRunner, "_synthesize", spoken)
    monkeypatch.setattr(CarrierCall, "turn_event", seen)
    async with (
        carrier.gateway(speech, redis_url=redis_url, redis_prefix=redis_prefix) as (gw, _),
        Redis.from_url(redis_url) as admin,
    ):
        core = HoldsOne("1")
        gw.app.state.gateway.conversation.pipeline = core
        async with carrier.dial(gw.url, mic_speed=4.0) as lost, carrier.dial(gw.url) as other:
            lost_key = f"{carrier.name}:{lost.call_id}"
            other_key = f"{carrier.name}:{other.call_id}"
            for call, key in ((lost, lost_key), (other, other_key)):  # the intros saved
                await call.wait_for(lambda c=call: len(c.media_frames()) > 0)
                assert await _saved(admin, f"{redis_prefix}:{{{key}}}:s")
            before = await admin.get(f"{redis_prefix}:{{{other_key}}}:s")
            await lost.dtmf("1")
            assert await until(lambda: "1" in core.inputs, 20), core.inputs
            lock = f"{redis_prefix}:{{{lost_key}}}:lock"
            assert await admin.exists(lock)  # the turn holds it
            await admin.set(lock, "another", px=30_000)
            heard = len(lost.media_frames())
            core.release.set()
            assert await until(lambda: synthesized == [SORRY], 20), synthesized
            assert errors == [ErrorEvent(text=STORE_LOCK_LOST_TEXT, source="gateway")]
            assert store_failed(errors[0])
            assert await until(lambda: len(lost.media_frames()) > heard, 10)  # said
            assert await admin.get(lock) == b"another"  # not the gateway's to take
            assert lost.closed_at is None
            # the call goes on: once the other holder is done, a key press is answered
            await admin.delete(lock)
            heard = len(lost.media_frames())
            await lost.dtmf("5")
            assert await until(lambda: "5" in core.inputs, 20), core.inputs
            assert await until(lambda: len(lost.media_frames()) > heard, 20)
            assert synthesized == [SORRY]  # answered, no error
            assert len(errors) == 1
            assert lost.closed_at is None
            # the other call's session as saved after its intro; its next key answered
            assert await admin.get(f"{redis_prefix}:{{{other_key}}}:s") == before
            heard = len(other.media_frames())
            await other.dtmf("7")
            assert await until(lambda: len(other.media_frames()) > heard, 20)
            assert len(errors) == 1
            kept = await session_of(gw, other_key)
            assert kept is not None
            assert kept.turn_count == 2
            for call in (lost, other):
                await call.stop()
                await call.wait_for(lambda c=call: c.closed_at is not None)
    turns = [r for r in caplog.records if r.name == "gateway.conversation"]
    blamed = [r.getMessage() for r in turns if r.levelno >= logging.WARNING]
    assert len(blamed) == 1, blamed
    assert "not saved, the session store lost its lock before the save" in blamed[0]
    ends = [getattr(r, "error_source", None) for r in turns if r.getMessage() == "turn error"]
    assert ends == ["gateway"]  # the store's (the gateway's), never the core's
    assert not [r for r in caplog.records if "Redis lost its data" in r.getMessage()]


async def _saved(admin: Redis, data_key: str, within_s: float = 20.0) -> bool:
    """Whether the session at ``data_key`` is in Redis within ``within_s`` seconds."""
    for _ in range(int(within_s / 0.05)):
        if await admin.exists(data_key):
            return True
        await asyncio.sleep(0.05)
    return bool(await admin.exists(data_key))
