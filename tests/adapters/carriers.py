"""What the shared call tests (tests/adapters/test_carrier_calls.py) need of each carrier:
its gateway settings, how a call is dialled, how the call ends after a goodbye, its
refusals. Each carrier's harness module (tests/adapters/<carrier>/harness.py) gives one
:class:`Carrier`; the wire itself is its :class:`CarrierHarness` subclass."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.callcodec import (
    MAX_PARAM_NAME_CHARS,
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS,
    MAX_PARAMS_CHARS,
)
from gateway.events import Input, Response, ResponseItem
from gateway.sessions import Session
from gateway.speech.service import SpeechService
from tests.adapters.carrier_harness import CarrierHarness
from tests.adapters.twilio.helpers import Served, twilio_gateway, until
from tests.calls.carrier_api import Captured, CarrierApi, carrier_api

NOT_ASCII = ("abc.%C3%A9", "%C3%A9.0000")
"""Stream tokens as a URL carries them (percent-encoded UTF-8) with a character that is
not ASCII: in the MAC, in the body. Refused like a forged token (403)."""


@dataclass(frozen=True)
class Transfer:
    """How a carrier transfers a call: ``settings(api_url)`` of its REST API,
    ``check(command, call)`` asserts the one request it got (method, path, auth, body);
    ``closes``: whether the gateway closes the stream after it (else the carrier stops it)."""

    settings: Callable[[str], dict[str, Any]]
    check: Callable[[Captured, Any], None]
    closes: bool = True


@dataclass(frozen=True)
class Carrier:
    """One carrier of the shared call tests.

    ``settings(api_url)``: the gateway settings of the carrier (its REST API at
    ``api_url``, the local stand-in); ``dial(gateway_url, **harness_options)``: an
    inbound call, begun; ``hangup(call)``: the (method, path) of the REST hang-up
    after a goodbye and ``auth`` the start of its Authorization header (None: the
    gateway ends the call by closing the socket); ``refusals(gw)``: asserts that
    unsigned, forged and tokenless requests are refused with the carrier's statuses;
    ``barge_in``: settings of the barge-in test; ``calls(gw)``: the channel's running
    calls and call tasks by id (None: it keeps no registry); ``transfer``: how it transfers (None: untested).
    """

    name: str
    settings: Callable[[str], dict[str, Any]]
    dial: Callable[..., AbstractAsyncContextManager[Any]]
    refusals: Callable[[Served], Awaitable[None]]
    hangup: Callable[[Any], tuple[str, str]] | None = None
    auth: str = ""
    barge_in: dict[str, Any] = field(default_factory=dict)
    calls: Callable[[Served], dict[str, Any]] | None = None
    transfer: Transfer | None = None

    def __str__(self) -> str:
        return self.name

    @contextlib.asynccontextmanager
    async def gateway(
        self,
        speech: SpeechService | None,
        *,
        more: Callable[[str], dict[str, Any]] = lambda api_url: {},
        **overrides: Any,
    ) -> AsyncIterator[tuple[Served, CarrierApi]]:
        """A served gateway configured for the carrier (and ``more(api_url)``, then
        ``overrides``), its REST API a local stand-in."""
        async with carrier_api() as api:
            settings = {**self.settings(api.url), **more(api.url), **overrides}
            async with twilio_gateway(speech, **settings) as gw:
                yield gw, api

    async def session_exists(self, gw: Served, call: CarrierHarness) -> bool:
        """Whether the gateway's session of ``call`` is in the store."""
        return await session_of(gw, f"{self.name}:{call.call_id}") is not None

    async def ended(self, gw: Served, call: CarrierHarness, within_s: float = 10.0) -> None:
        """Wait until the call's session is gone and the channel runs no call."""
        for _ in range(int(within_s / 0.1)):
            if not await self.session_exists(gw, call):
                break
            await asyncio.sleep(0.1)
        assert not await self.session_exists(gw, call)
        if self.calls is not None:
            calls = self.calls
            assert await until(lambda: not calls(gw), within_s), calls(gw)


async def session_of(gw: Served, key: str) -> Any:
    """The session stored at ``key`` (None: there is none)."""
    async with gw.app.state.gateway.store.open(key, lease_s=5, wait_s=5) as txn:
        return txn.session


def token_expires(token: str) -> int:
    """The expiry (Unix seconds) a stream token carries
    (``base64url(call_id|expires|nonce).hmac``, :class:`gateway.io.call.CallTokens`)."""
    text = token.partition(".")[0]
    return int(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).split(b"|")[1])


async def upgrade_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a WebSocket upgrade of ``url`` (101: accepted, then closed)."""
    try:
        async with connect(url, additional_headers=headers or {}):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


async def closed_with(
    url: str,
    frames: Sequence[str | bytes],
    headers: dict[str, str] | None = None,
    within_s: float = 30.0,
) -> tuple[int, str]:
    """Open a stream at ``url`` (with ``headers`` on the upgrade), send ``frames`` and
    read until the gateway closes it: the close frame's code and reason (AssertionError:
    the connection ended without one; TimeoutError: not closed within ``within_s``)."""
    async with connect(url, additional_headers=headers or {}) as ws:
        async with asyncio.timeout(within_s):
            with contextlib.suppress(ConnectionClosed):
                for frame in frames:
                    await ws.send(frame)
                while True:
                    await ws.recv()
        close = ws.protocol.close_rcvd
        assert close is not None, "the connection ended without a close frame"
        return close.code, close.reason


class Scripted:
    """A core answering each input text from a script (else "Okay."), recording the inputs."""

    name = "scripted"

    def __init__(self, script: dict[str, list[ResponseItem]]) -> None:
        self.script = script
        self.inputs: list[Input] = []

    async def process(self, session: Session, input: Input) -> AsyncIterator[Any]:
        self.inputs.append(input)
        for item in self.script.get(input.text, [ResponseItem(text="Okay.")]):
            yield item
        yield Response()

    async def aclose(self) -> None:
        pass


OVERSIZED_PARAMS: list[tuple[dict[str, str], str]] = [
    ({f"p{i}": "v" for i in range(MAX_PARAMS + 1)}, f"more than {MAX_PARAMS} parameters"),
    ({"n" * (MAX_PARAM_NAME_CHARS + 1): "v"}, f"a name longer than {MAX_PARAM_NAME_CHARS}"),
    ({"v": "x" * (MAX_PARAM_VALUE_CHARS + 1)}, f"v: longer than {MAX_PARAM_VALUE_CHARS}"),
    (
        {f"v{i}": "x" * (MAX_PARAM_VALUE_CHARS - 1000) for i in range(3)},
        f"longer than {MAX_PARAMS_CHARS} characters in all",
    ),
]
"""Custom parameters (or headers) of a start beyond the kit's bounds
(gateway/callcodec.py ``params_fault``), each with the fault its refusal names: too many,
a name too long, a value too long, too many characters in all (each value within bounds).
Every carrier's start carrying them is closed with 1008 (they were taken whole)."""
