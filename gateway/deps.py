"""The running gateway's parts, as the routes of every adapter reach them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from gateway.bus import Bus
from gateway.conversation import Conversation
from gateway.nonces import MemoryNonceStore, NonceStore
from gateway.pipeline.base import Pipeline
from gateway.secrets import SecretKeys
from gateway.sessions import SessionStore
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.answers import AnswerStore
    from gateway.outbox import Journal
    from gateway.push import Pusher
    from gateway.speech.service import SpeechService
    from gateway.startup import Unconfigured


@dataclass
class Gateway:
    """Everything routes may use: settings, the turn engine, speech and the bus.

    Routes never use the store or the pipeline directly: turns go through
    ``conversation``. ``nonces`` holds one-time keys shared by every instance
    (per-call stream tokens), so adapters never need Redis themselves.
    ``secret_keys`` is the master key every signing key is derived from
    (:mod:`gateway.secrets`; read a purpose's key when it is needed).
    ``journal`` is the sessions' outbox with the bus (gateway/outbox.py): connections
    follow their session's outbox through it; ``pusher`` serves the admin API
    (gateway/push.py). ``unconfigured`` lists the channels not configured, recorded by
    their routers' lifespans for the startup's one INFO line (:mod:`gateway.startup`).
    ``before_close`` is run by ``gateway serve`` at shutdown before it closes the
    connections. ``draining`` is set when a graceful shutdown begins (the first
    SIGTERM/SIGINT, while Voiceflow clients are told ``server.restart`` and the server
    still accepts): ``/readyz`` then answers 503, so a load balancer sends no new
    clients here.
    """

    settings: Settings
    store: SessionStore
    pipeline: Pipeline
    conversation: Conversation
    speech: SpeechService
    bus: Bus
    nonces: NonceStore = field(default_factory=MemoryNonceStore)
    secret_keys: SecretKeys = field(default_factory=SecretKeys.random)
    journal: Journal | None = None
    answers: AnswerStore | None = None
    """Answers a client's socket could not take, kept for its session's next connection
    (gateway/answers.py; the Voiceflow channel's)."""
    pusher: Pusher | None = None
    unconfigured: list[Unconfigured] = field(default_factory=list)
    before_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """What runs at shutdown once the listening sockets are closed and before the open
    connections are (gateway/server.py ``GatewayServer``), concurrently: the routers' own
    (Twilio, Plivo, Telnyx, Vonage move their calls to another instance; Flowstorm V1 lets
    running turns answer within :meth:`drain_left_s`; Flowstorm V2 finishes the utterances
    its realtime PUTs are hearing); each bounds its time and never raises."""
    before_close_runs: bool = False
    """A server that runs ``before_close`` at shutdown serves this Gateway: set by
    gateway/server.py ``GatewayServer`` (``gateway serve``) once started. Unset under
    another server (plain uvicorn), where nothing runs those hooks: a router then does at
    the signal what it would have left to them (Voiceflow's ``server.restart``)."""
    draining: bool = False
    """A graceful shutdown has begun: not ready (``/readyz`` 503), never unset."""
    drain_began: float | None = None
    """When the graceful shutdown began (``time.monotonic()``; None before): every wait of
    the shutdown counts GATEWAY_SHUTDOWN_TIMEOUT_S from then (:meth:`drain_left_s`)."""

    def begin_draining(self) -> None:
        """A graceful shutdown begins (the first SIGTERM/SIGINT): ``draining`` from now on,
        ``drain_began`` now unless it began already (a second call changes nothing)."""
        self.draining = True
        if self.drain_began is None:
            self.drain_began = time.monotonic()

    def drain_left_s(self) -> float:
        """Seconds left of GATEWAY_SHUTDOWN_TIMEOUT_S since the graceful shutdown began (the
        whole of it before; never below 0): what the shutdown's waits may still take."""
        total = float(self.settings.shutdown_timeout_s)
        if self.drain_began is None:
            return total
        return max(0.0, total - (time.monotonic() - self.drain_began))


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The Gateway of the app serving ``conn`` (an HTTP request or a WebSocket)."""
    gw: Gateway = conn.app.state.gateway
    return gw
