"""Prometheus metrics of the gateway, served at ``GET /metrics``.

Names and labels:

- ``gateway_turns_total{channel, outcome}``: turns by outcome ``ok``, ``error``
  (the turn ended with an ErrorEvent) or ``rejected`` (it could not start).
- ``gateway_errors_total{channel, source}``: ErrorEvents and rejections by source
  (``pipeline``, ``session``, ``gateway``...); ``stt``: audio turns, utterances and
  calls refused because every recognizer was busy.
- ``gateway_turn_seconds{channel}``: turn latency, input to Response/Error.
- ``gateway_turns_in_flight``: turns running in this process.
- ``gateway_sessions_started_total{channel}``, ``gateway_sessions_ended_total{channel}``
  (ended by a turn's Response or by the platform: a call hung up, Alexa's
  SessionEndedRequest; sessions that expire idle are not counted).
- ``gateway_connections{channel}``: open socket connections (V1, Twilio, socket.io).
- ``gateway_open_connections``: open client connections of the server (HTTP and
  WebSocket); ``gateway_max_connections``: their cap (GATEWAY_MAX_CONNECTIONS).
- ``gateway_connections_shed_total{reason}``: connections refused or closed by the
  server's limits (gateway/server.py): ``full`` (503 at the cap), ``evicted`` (closed
  to make room), ``header_timeout``, ``body_timeout`` (408), ``send_timeout`` (the
  peer did not read).
- ``gateway_stt_seconds``: end of speech to final recognition result;
  ``gateway_tts_seconds``: synthesis and encoding of one file (cache misses);
  ``gateway_tts_queue_depth``: syntheses waiting in the TTS pool;
  ``gateway_tts_running``: syntheses running; ``gateway_tts_wait_seconds``: time a
  synthesis waited in the queue; ``gateway_tts_rejected_total``: syntheses refused
  because the pool was full (HTTP 503 / Error source ``tts``).
- ``gateway_stt_streams``: recognition streams decoding now (at most
  GATEWAY_STT_MAX_STREAMS); ``gateway_stt_queue_depth``: recognition streams waiting
  for a recognizer (at most GATEWAY_STT_QUEUE); ``gateway_stt_queue_wait_seconds``:
  how long each admitted stream waited (0 when a recognizer was free);
  ``gateway_stt_refused_total{reason}``: streams refused as busy, ``queue-full``
  (at once) or ``wait-timeout`` (after GATEWAY_STT_QUEUE_WAIT_MS).
- ``gateway_core_seconds{core}``: time the core pipeline took for a turn, from the
  request to its last item or failure, by core name (``demo``, ``http``, ``rasa``,
  ``voiceflow``, ``botpress``...); ``gateway_core_errors_total{core}``: its failures
  (PipelineError, timeouts); ``gateway_core_retries_total{core}``: requests sent to it
  once more after it refused them unprocessed (HTTP 429, or 503 with ``Retry-After``:
  gateway/pipeline/cores.py, ``send_retried``).
- ``gateway_redis_seconds{op}``: Redis round trips of the session store
  (``acquire``, ``release``).
- ``gateway_redis_breaker_open``: 1 while the Redis client's circuit breaker is open
  (Redis did not answer; the calls of the session store, outbox, bus, nonces and TTS
  cache are refused at once, gateway/breaker.py), else 0;
  ``gateway_redis_refused_total``: calls it refused meanwhile;
  ``gateway_redis_unreachable_total``: calls that failed at once because Redis could
  not be reached (connection refused or reset: Redis down or restarting; the breaker
  stays closed, one WARNING when the first fails, one INFO when Redis answers again).

All live in one registry per process (:data:`REGISTRY`), so several apps in one
process (tests) share them; values are per process, as Prometheus expects.

No ``*_created`` series: prometheus-client adds one to every counter, histogram and
summary child in the text format (the Unix time it was made, a gauge-like series of its
own per label set: ``gateway_turns_created{channel="alexa",outcome="ok"}``), which
Prometheus stores as one more series each and nothing here uses (a counter's reset is
seen from its value). Importing this module turns them off for the process with
prometheus-client's :func:`~prometheus_client.disable_created_metrics` (what its
``PROMETHEUS_DISABLE_CREATED_SERIES=true`` does), so the gateway's ``/metrics`` has none
whatever the environment says.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase

# read when samples are collected (see the module doc); the library's function is unannotated
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

TURNS = Counter(
    "gateway_turns", "Turns by channel and outcome.", ["channel", "outcome"], registry=REGISTRY
)
ERRORS = Counter(
    "gateway_errors", "Turn errors by channel and source.", ["channel", "source"], registry=REGISTRY
)
TURN_SECONDS = Histogram(
    "gateway_turn_seconds", "Turn latency (s).", ["channel"], buckets=_LATENCY, registry=REGISTRY
)
TURNS_IN_FLIGHT = Gauge("gateway_turns_in_flight", "Turns running now.", registry=REGISTRY)
SESSIONS_STARTED = Counter(
    "gateway_sessions_started", "Sessions started.", ["channel"], registry=REGISTRY
)
SESSIONS_ENDED = Counter(
    "gateway_sessions_ended", "Sessions ended.", ["channel"], registry=REGISTRY
)
CONNECTIONS = Gauge(
    "gateway_connections", "Open socket connections.", ["channel"], registry=REGISTRY
)
OPEN_CONNECTIONS = Gauge(
    "gateway_open_connections", "Open client connections (HTTP and WebSocket).", registry=REGISTRY
)
MAX_CONNECTIONS = Gauge(
    "gateway_max_connections", "Cap of open client connections.", registry=REGISTRY
)
CONNECTIONS_SHED = Counter(
    "gateway_connections_shed",
    "Connections refused or closed by the server's limits, by reason.",
    ["reason"],
    registry=REGISTRY,
)
STT_SECONDS = Histogram(
    "gateway_stt_seconds", "End of speech to final result (s).", buckets=_LATENCY, registry=REGISTRY
)
TTS_SECONDS = Histogram(
    "gateway_tts_seconds", "Synthesis of one item (s).", buckets=_LATENCY, registry=REGISTRY
)
STT_STREAMS = Gauge("gateway_stt_streams", "Recognition streams decoding now.", registry=REGISTRY)
STT_QUEUE_DEPTH = Gauge(
    "gateway_stt_queue_depth", "Recognition streams waiting for a recognizer.", registry=REGISTRY
)
STT_QUEUE_WAIT_SECONDS = Histogram(
    "gateway_stt_queue_wait_seconds",
    "Wait of each admitted recognition stream for a recognizer (s).",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    registry=REGISTRY,
)
STT_REFUSED = Counter(
    "gateway_stt_refused",
    "Recognition streams refused as busy, by reason (queue-full, wait-timeout).",
    ["reason"],
    registry=REGISTRY,
)
TTS_QUEUE_DEPTH = Gauge(
    "gateway_tts_queue_depth", "Syntheses waiting in the TTS pool.", registry=REGISTRY
)
TTS_RUNNING = Gauge("gateway_tts_running", "Syntheses running.", registry=REGISTRY)
TTS_WAIT_SECONDS = Histogram(
    "gateway_tts_wait_seconds",
    "Time a synthesis waited in the TTS pool's queue (s).",
    buckets=_LATENCY,
    registry=REGISTRY,
)
TTS_REJECTED = Counter(
    "gateway_tts_rejected", "Syntheses refused: the TTS pool was full.", registry=REGISTRY
)
CORE_SECONDS = Histogram(
    "gateway_core_seconds",
    "Core pipeline time per turn (s), by core name.",
    ["core"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
CORE_ERRORS = Counter(
    "gateway_core_errors", "Core pipeline failures, by core name.", ["core"], registry=REGISTRY
)
CORE_RETRIES = Counter(
    "gateway_core_retries",
    "Requests sent to a core once more after it refused them (HTTP 429, or 503 with "
    "Retry-After), by core name.",
    ["core"],
    registry=REGISTRY,
)
REDIS_SECONDS = Histogram(
    "gateway_redis_seconds", "Redis round trips (s).", ["op"], buckets=_FAST, registry=REGISTRY
)

REDIS_BREAKER_OPEN = Gauge(
    "gateway_redis_breaker_open",
    "1 while the Redis client's circuit breaker is open (Redis did not answer).",
    registry=REGISTRY,
)
REDIS_REFUSED = Counter(
    "gateway_redis_refused",
    "Redis calls refused at once by the client's open circuit breaker.",
    registry=REGISTRY,
)
REDIS_UNREACHABLE = Counter(
    "gateway_redis_unreachable",
    "Redis calls that failed at once: Redis could not be reached (refused, reset).",
    registry=REGISTRY,
)


@functools.lru_cache(maxsize=4096)
def labelled(metric: MetricWrapperBase, *values: str) -> Any:
    """``metric.labels(*values)``, cached: the child for a label set is made once.

    prometheus-client's ``labels()`` takes a lock and builds a key on every call;
    per-turn code calls this instead.
    """
    return metric.labels(*values)


@contextmanager
def connection(channel: str) -> Iterator[None]:
    """Count one open connection of ``channel`` while the block runs."""
    gauge = CONNECTIONS.labels(channel)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()
