"""A local HTTP server standing in for the carriers' REST APIs (Twilio, Telnyx, Vonage,
Plivo): a real Starlette app served by uvicorn on a free port that records every
request it gets and answers as the carrier documents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import serve

Transfer = tuple[str, str, str, str | None, bool]
"""A logged transfer: channel, call id, target, reason, whether the carrier took it."""


def logged_transfers(records: list[logging.LogRecord]) -> list[Transfer]:
    """The transfers among log ``records`` (pytest's ``caplog.records``; INFO of
    ``gateway.callcontrol`` captured), from the fields :func:`gateway.callcontrol.log_transfer`
    gives its line."""
    fields = ("channel", "call_id", "transfer_target", "transfer_reason", "transfer_ok")
    return [
        tuple(getattr(r, name) for name in fields)
        for r in records
        if r.name == "gateway.callcontrol" and hasattr(r, "transfer_ok")
    ]


@dataclass
class Captured:
    """One request the gateway made."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw_path: bytes = b""
    """The path as sent (percent-encoded); :attr:`path` is decoded."""
    at: float = field(default_factory=time.monotonic)
    """When it arrived (``time.monotonic()``), before any delay of its answer."""

    @property
    def form(self) -> dict[str, str]:
        """The form-encoded body (one value per name)."""
        return {k: v[0] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}

    @property
    def json(self) -> Any:
        """The JSON body."""
        return json.loads(self.body)


@dataclass
class CarrierApi:
    """The running fake: its base ``url``, the ``requests`` captured, and canned answers
    by (method, path regex) that override the defaults."""

    url: str = ""
    requests: list[Captured] = field(default_factory=list)
    answers: dict[tuple[str, str], Response] = field(default_factory=dict)
    delays: dict[tuple[str, str], float] = field(default_factory=dict)
    """Seconds to hold the answer of a request, by (method, path regex): a slow API."""

    def delay_s(self, request: Captured) -> float:
        for (method, pattern), delay_s in self.delays.items():
            if method == request.method and re.fullmatch(pattern, request.path):
                return delay_s
        return 0.0

    def answer(self, request: Captured) -> Response:
        for (method, pattern), response in self.answers.items():
            if method == request.method and re.fullmatch(pattern, request.path):
                return response
        path = request.path
        if re.fullmatch(r"/2010-04-01/Accounts/AC\w+/Calls\.json", path):
            sid = "CA" + uuid.uuid4().hex
            return JSONResponse({"sid": sid, "status": "queued", **request.form}, 201)
        if re.fullmatch(r"/2010-04-01/Accounts/AC\w+/Calls/CA\w+\.json", path):
            return JSONResponse({"sid": path.rsplit("/", 1)[1][:-5], "status": "in-progress"})
        if path == "/v2/calls":
            ccid = "v3:" + uuid.uuid4().hex
            return JSONResponse({"data": {"call_control_id": ccid, "record_type": "call"}})
        if path.startswith("/v2/calls/"):
            return JSONResponse({"data": {"result": "ok"}})
        if path.startswith("/v1/calls/"):
            return Response(status_code=204)
        if path.startswith("/v1/Account/"):
            if request.method == "DELETE":
                return Response(status_code=204)
            return JSONResponse({"message": "call transferred", "api_id": "x"}, 202)
        return JSONResponse({"error": "not found"}, 404)


@contextlib.asynccontextmanager
async def carrier_api() -> AsyncIterator[CarrierApi]:
    """Serve a :class:`CarrierApi` on a free port in this loop."""
    api = CarrierApi()

    async def endpoint(request: Request) -> Response:
        captured = Captured(
            request.method,
            request.url.path,
            dict(request.headers),
            await request.body(),
            request.scope.get("raw_path", b""),
        )
        api.requests.append(captured)
        await asyncio.sleep(api.delay_s(captured))
        return api.answer(captured)

    app = Starlette(
        routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "DELETE"])]
    )
    async with serve(app) as url:
        api.url = url
        yield api
