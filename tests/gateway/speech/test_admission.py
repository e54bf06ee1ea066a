"""AdmissionGate: a bounded pool with a bounded, timed wait queue (gateway.speech.admission),
and the settings that bound the gateway's recognizer with it.

The gate is plain asyncio; these tests drive it with real tasks and its own Prometheus
metrics (a private registry per test, so counts are exact).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from gateway.settings import Settings
from gateway.speech.admission import AdmissionGate, SpeechBusy
from gateway.speech.service import make_speech
from gateway.speech.stt import PocketsphinxRecognizer


class Metrics:
    """The four metrics of a gate, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.depth = Gauge("depth", "waiting", registry=self.registry)
        self.in_use = Gauge("in_use", "held", registry=self.registry)
        self.wait = Histogram("wait_seconds", "wait", registry=self.registry)
        self.refused = Counter("refused", "refused", ["reason"], registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def gate(limit: int, queue: int | None, wait_s: float | None, metrics: Metrics) -> AdmissionGate:
    return AdmissionGate(
        limit,
        queue,
        wait_s,
        source="stt",
        what="speech recognition",
        unit="recognizers",
        depth=metrics.depth,
        in_use=metrics.in_use,
        wait=metrics.wait,
        refused=metrics.refused,
    )


async def settle() -> None:
    """Let every ready task run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_holder_one_waiter_and_the_rest_refused_at_once() -> None:
    m = Metrics()
    g = gate(1, 1, 30.0, m)
    await g.acquire()  # free: at once
    assert (g.held, g.waiting, g.saturated()) == (1, 0, False)
    queued = asyncio.create_task(g.acquire())
    await settle()
    assert (g.waiting, m.value("depth"), g.saturated()) == (1, 1, True)

    start = time.perf_counter()
    for _ in range(3):
        with pytest.raises(SpeechBusy) as refused:
            await g.acquire()
        busy = refused.value
        assert (busy.source, busy.reason, busy.retry_after_s) == ("stt", "queue-full", 30)
        assert "busy" in busy.text
        assert "all 1 recognizers are in use" in busy.text
    # refused without waiting: the wait is 30 s, so anything well under it proves none
    # was waited (a wide margin over a loaded machine's stalls); the waiter still waits
    assert time.perf_counter() - start < 10
    assert not queued.done()
    assert m.value("refused_total", reason="queue-full") == 3

    g.release()  # the waiter gets the place, in order
    await asyncio.wait_for(queued, 5)
    assert (g.held, g.waiting, m.value("depth"), m.value("in_use")) == (1, 0, 0, 1)
    assert m.value("wait_seconds_count") == 2  # both admitted callers observed their wait
    g.release()
    assert (g.held, m.value("in_use"), g.saturated()) == (0, 0, False)


async def test_a_waiter_is_refused_when_no_place_frees_within_the_wait() -> None:
    m = Metrics()
    g = gate(1, 2, 0.3, m)
    await g.acquire()
    with pytest.raises(SpeechBusy) as refused:
        async with asyncio.timeout(30):  # a hang guard
            await g.acquire()
    # refused by its wait's timeout (not at once: the queue had room for it)
    assert refused.value.reason == "wait-timeout"
    assert "none of the 1 recognizers became free within 0.3 s" in refused.value.text
    assert refused.value.retry_after_s == 1
    assert (g.waiting, m.value("depth"), m.value("refused_total", reason="wait-timeout")) == (
        0,
        0,
        1,
    )
    g.release()
    await g.acquire()  # the timed-out waiter took nothing with it
    g.release()


async def test_a_cancelled_waiter_leaves_the_queue_and_no_place_is_lost() -> None:
    m = Metrics()
    g = gate(1, 1, None, m)
    await g.acquire()
    waiter = asyncio.create_task(g.acquire())
    await settle()
    assert g.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (g.waiting, m.value("depth"), g.saturated()) == (0, 0, False)
    g.release()
    await g.acquire()
    assert g.held == 1
    g.release()


async def test_without_a_queue_bound_nothing_is_refused() -> None:
    m = Metrics()
    g = gate(1, None, None, m)
    await g.acquire()
    waiters = [asyncio.create_task(g.acquire()) for _ in range(5)]
    await settle()
    assert (g.waiting, g.saturated()) == (5, False)
    for _ in waiters:
        g.release()
        await settle()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    g.release()
    assert (g.held, g.waiting, m.value("refused_total", reason="queue-full")) == (0, 0, 0)


async def test_queue_zero_refuses_as_soon_as_all_are_held() -> None:
    g = gate(2, 0, 1.0, Metrics())
    await g.acquire()
    assert not g.saturated()
    await g.acquire()
    assert g.saturated()
    with pytest.raises(SpeechBusy):
        await g.acquire()
    g.release()
    g.release()


@pytest.mark.parametrize(
    ("limit", "queue", "wait_s", "what"),
    [(0, 1, 1.0, "limit"), (1, -1, 1.0, "queue"), (1, 1, 0.0, "wait_s"), (1, 1, -2.0, "wait_s")],
)
def test_bad_bounds_are_refused(limit: int, queue: int, wait_s: float, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        AdmissionGate(limit, queue, wait_s, source="stt", what="x", unit="ys")


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("GATEWAY_STT_QUEUE", "-1"),
        ("GATEWAY_STT_QUEUE", "many"),
        ("GATEWAY_STT_QUEUE_WAIT_MS", "0"),
        ("GATEWAY_TWILIO_BUSY_TEXT", ""),
    ],
)
def test_bad_admission_settings_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=env.removeprefix("GATEWAY_").lower()):
        Settings()


def test_the_settings_make_a_bounded_recognizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STT_MAX_STREAMS", "2")
    monkeypatch.setenv("GATEWAY_STT_QUEUE", "0")
    monkeypatch.setenv("GATEWAY_STT_QUEUE_WAIT_MS", "1500")
    recognizer = make_speech(Settings(), None).recognizer
    assert isinstance(recognizer, PocketsphinxRecognizer)
    assert (recognizer.max_streams, recognizer.max_queued, recognizer.queue_wait_s) == (2, 0, 1.5)
