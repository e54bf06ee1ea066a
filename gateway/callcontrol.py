"""Call control over the carriers' REST APIs: one async executor for every carrier.

The requests themselves are built, pure, by each adapter's ``control.py``
(:mod:`adapters.twilio.control`, :mod:`adapters.telnyx.control`,
:mod:`adapters.vonage.control`, :mod:`adapters.plivo.control`) as
:class:`RestRequest` values; :class:`CallControl` sends them with one pooled
``httpx.AsyncClient`` (GATEWAY_CALLS_TIMEOUT_S per request) and hands back a
:class:`RestAnswer`. Base URLs come from settings (GATEWAY_TWILIO_API_BASE_URL,
GATEWAY_TELNYX_API_BASE_URL, GATEWAY_VONAGE_API_BASE_URL, GATEWAY_PLIVO_API_BASE_URL),
so tests point them at a local server.

:class:`CallControl` also keeps the per-instance records of call control: the
last transfers (:attr:`CallControl.transfers`) and the answering-machine results
waiting for the call they belong to (:class:`MachineAnswers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from gateway.events import Input

log = logging.getLogger("gateway.callcontrol")

RECORDS_KEPT: Final = 256
"""Transfers kept in :attr:`CallControl.transfers` (the latest)."""


@dataclass(frozen=True)
class RestRequest:
    """One call-control request: ``method``, absolute ``url``, ``headers`` (auth included)
    and a body: ``form`` (application/x-www-form-urlencoded) or ``json`` (application/json),
    or neither."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] | None = None
    json: Any = None


@dataclass(frozen=True)
class RestAnswer:
    """A carrier's answer: HTTP ``status`` and ``body`` (parsed JSON, else the text)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300


@dataclass(frozen=True)
class TransferResult:
    """How a transfer went: ``ok`` (the carrier took it), else ``error``: what failed,
    naming the carrier's API (``"the twilio API answered HTTP 503"``, a network error,
    ``"twilio REST is not configured"``)."""

    ok: bool
    error: str | None = None


class CallControlError(Exception):
    """The carrier's API could not be reached (network error, timeout)."""


class MachineAnswers:
    """Answering-machine results (``#machine`` inputs) on their way to their call.

    A call's stream handler :meth:`register` s a callback under the carrier's call id
    (Telnyx ``call_control_id``); :meth:`deliver` hands it the input, or keeps it
    (the latest :data:`RECORDS_KEPT`) until the call registers, when it is handed
    over at once. Per instance: the webhook and the stream must reach the same one.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Callable[[Input], None]] = {}
        self._waiting: OrderedDict[str, Input] = OrderedDict()

    def register(self, call_id: str, handler: Callable[[Input], None]) -> None:
        """Route the inputs of ``call_id`` to ``handler`` (a waiting one at once)."""
        self._handlers[call_id] = handler
        waiting = self._waiting.pop(call_id, None)
        if waiting is not None:
            handler(waiting)

    def unregister(self, call_id: str) -> None:
        """Stop routing ``call_id``'s inputs."""
        self._handlers.pop(call_id, None)

    def deliver(self, call_id: str, machine: Input) -> bool:
        """Hand ``machine`` to ``call_id``'s handler; False when kept for later."""
        handler = self._handlers.get(call_id)
        if handler is not None:
            handler(machine)
            return True
        self._waiting[call_id] = machine
        while len(self._waiting) > RECORDS_KEPT:
            self._waiting.popitem(last=False)
        return False

    def waiting(self, call_id: str) -> Input | None:
        """The input kept for ``call_id`` (not removed), if any."""
        return self._waiting.get(call_id)


class CallControl:
    """The gateway's call-control client (see the module doc); made per app, closed
    with :meth:`aclose`."""

    def __init__(self, timeout_s: float = 10.0, *, client: httpx.AsyncClient | None = None) -> None:
        self.client = client or httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_connections=50)
        )
        self.transfers: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        """The latest transfers: ``{"channel", "callId", "target", "reason", "ok", "time"}``."""
        self.machine_answers = MachineAnswers()

    async def send(self, request: RestRequest) -> RestAnswer:
        """Send ``request``; the answer whatever its status.

        Raises CallControlError when the API cannot be reached or does not answer in time.
        """
        try:
            response = await self.client.request(
                request.method,
                request.url,
                headers=dict(request.headers),
                data=dict(request.form) if request.form is not None else None,
                json=request.json,
            )
        except httpx.HTTPError as exc:
            raise CallControlError(f"{request.method} {request.url}: {exc!r}") from exc
        text = response.text
        body: Any = text
        if text and "json" in response.headers.get("content-type", ""):
            with contextlib.suppress(ValueError):
                body = json.loads(text)
        return RestAnswer(response.status_code, body)

    def record_transfer(
        self, channel: str, call_id: str, target: str, reason: str | None, ok: bool
    ) -> dict[str, Any]:
        """Keep (and log at INFO, or WARNING when it failed) the record of a transfer."""
        record = {
            "channel": channel,
            "callId": call_id,
            "target": target,
            "reason": reason,
            "ok": ok,
            "time": time.time(),
        }
        self.transfers.append(record)
        log.log(
            logging.INFO if ok else logging.WARNING,
            "%s call %s %s to %s%s",
            channel,
            call_id,
            "transferred" if ok else "NOT transferred",
            target,
            f" ({reason})" if reason else "",
        )
        return record

    async def aclose(self) -> None:
        """Close the pooled client."""
        await self.client.aclose()
