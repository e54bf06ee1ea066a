"""The running gateway's parts, as the routes of every adapter reach them."""

from __future__ import annotations

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
    pusher: Pusher | None = None
    unconfigured: list[Unconfigured] = field(default_factory=list)
    before_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    draining: bool = False
    """A graceful shutdown has begun: not ready (``/readyz`` 503), never unset."""
    """What runs at shutdown once the listening sockets are closed and before the open
    connections are (gateway/server.py ``GatewayServer``), concurrently: the routers'
    own (Twilio, Plivo, Telnyx, Vonage move their calls to another instance); each bounds its
    time and never raises."""


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The Gateway of the app serving ``conn`` (an HTTP request or a WebSocket)."""
    gw: Gateway = conn.app.state.gateway
    return gw
