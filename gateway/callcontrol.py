"""Call control over the carriers' REST APIs: one async executor for every carrier.

The requests themselves are built, pure, by each adapter's ``control.py``
(:mod:`adapters.twilio.control`, :mod:`adapters.telnyx.control`,
:mod:`adapters.vonage.control`, :mod:`adapters.plivo.control`) as
:class:`RestRequest` values; :class:`CallControl` sends them with one pooled
``httpx.AsyncClient`` (GATEWAY_CALLS_TIMEOUT_S per request) and hands back a
:class:`RestAnswer`. Base URLs come from settings (GATEWAY_TWILIO_API_BASE_URL,
GATEWAY_TELNYX_API_BASE_URL, GATEWAY_VONAGE_API_BASE_URL, GATEWAY_PLIVO_API_BASE_URL),
so tests point them at a local server.

:class:`CallControl` also keeps the per-instance record of the last transfers
(:attr:`CallControl.transfers`). Answering-machine results travel to their call's
stream over the bus (gateway/io/call.py ``announce_machine``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

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


class CallControl:
    """The gateway's call-control client (see the module doc); made per app, closed
    with :meth:`aclose`."""

    def __init__(self, timeout_s: float = 10.0, *, client: httpx.AsyncClient | None = None) -> None:
        self.client = client or httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_connections=50)
        )
        self.transfers: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        """The latest transfers: ``{"channel", "callId", "target", "reason", "ok", "time"}``."""

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
