"""Exotel calls: the Voicebot applet's bidirectional stream, on the shared call engine.

Spec: shared/specs/CARRIERS.md "Exotel". There is no answer document: the Voicebot applet of
an App Bazaar flow points at ``wss://KEY:TOKEN@<public host>/exotel/stream``
(``?sample-rate=8000|16000|24000``: the rate of a start that states none, given to the
codec; a start stating another rate is served at its own, the disagreement logged at
WARNING naming both, bounded per app: :class:`ExotelRunner`; up to 3 custom query
parameters such as ``appKey``, which Exotel also gives in the
start's ``custom_parameters``: the URL's ``appKey`` is taken, the start's only when the
URL has none), and Exotel presents the credentials as ``Authorization:
Basic`` on the upgrade, checked by :class:`~adapters.exotel.verify.ExotelVerifier` against
GATEWAY_EXOTEL_API_KEY / GATEWAY_EXOTEL_API_TOKEN: refused before the upgrade (HTTP 403)
otherwise, and when they are unset. The stream (``connected``, ``start``, ``media``,
``dtmf``, ``mark``, ``stop``; base64 16-bit PCM) is served by
:class:`gateway.io.call.CallRunner` with :class:`~adapters.exotel.protocol.ExotelCodec`
(chunks in multiples of 320 bytes, sent unpaced: Exotel buffers). The call ends by closing
the socket after the last audio's mark came back (the flow's next applet runs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from fastapi import APIRouter, FastAPI, WebSocket

from adapters.exotel.protocol import ExotelCodec
from adapters.exotel.verify import ExotelVerifier
from gateway.callcodec import VerificationRefused
from gateway.deps import gateway_of
from gateway.io.call import CallRunner, admit, call_config
from gateway.ratelimit import refusal_log
from gateway.startup import not_configured

log = logging.getLogger("gateway.exotel")

CHANNEL: Final = "exotel"
UNSET: Final = "GATEWAY_EXOTEL_API_KEY and GATEWAY_EXOTEL_API_TOKEN"
"""The settings an unconfigured Exotel channel needs (in its startup note and refusals)."""


@dataclass
class ExotelChannel:
    """The Exotel channel's per-app state (this router's lifespan)."""

    verifier: ExotelVerifier | None
    calls: dict[str, CallRunner] = field(default_factory=dict)


class ExotelRunner(CallRunner):
    """An Exotel stream's runner: at the start, a stated rate other than the URL's
    ``sample-rate`` (:attr:`~adapters.exotel.protocol.ExotelCodec.rate_disagreement`) is
    logged, at WARNING through the app's RefusalLog ``Exotel sample rate`` (a burst, then
    DEBUG: every call of a misconfigured applet has it), naming the call and both rates."""

    codec: ExotelCodec

    def started(self, call_id: str) -> None:
        """Log the start's rate disagreement, if any (class doc)."""
        told = self.codec.rate_disagreement
        if told is None:
            return
        level, quiet = refusal_log(self.ws.app.state, "Exotel sample rate").level()
        since = f" ({quiet} more calls so since, logged at DEBUG)" if quiet else ""
        log.log(level, "%s: %s%s", self.name, told, since)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gw = app.state.gateway
    settings = gw.settings
    token = settings.exotel_api_token.get_secret_value() if settings.exotel_api_token else ""
    verifier = None
    if settings.exotel_api_key and token:
        verifier = ExotelVerifier(settings.exotel_api_key, token)
    elif settings.exotel_api_key or token:  # half done: one of the two credentials
        given, unset = (
            ("GATEWAY_EXOTEL_API_KEY", "GATEWAY_EXOTEL_API_TOKEN")
            if settings.exotel_api_key
            else ("GATEWAY_EXOTEL_API_TOKEN", "GATEWAY_EXOTEL_API_KEY")
        )
        log.warning("%s is unset: /exotel/stream refuses every call (%s is set)", unset, given)
    else:  # not configured at all: the startup's INFO line names it
        not_configured(gw, CHANNEL, "/exotel/stream", 403, UNSET)
    app.state.exotel = ExotelChannel(verifier)
    yield


router = APIRouter(tags=["Exotel"], lifespan=_lifespan)


@router.websocket("/exotel/stream")
async def stream(websocket: WebSocket) -> None:
    """A Voicebot applet's stream (module doc)."""
    gw = gateway_of(websocket)
    channel: ExotelChannel = websocket.app.state.exotel

    async def check() -> bool:
        if channel.verifier is None:
            raise VerificationRefused(f"no Exotel credentials are configured ({UNSET})")
        channel.verifier.check_all(websocket.headers.getlist("authorization"))
        return True

    if not await admit(websocket, "Exotel", check()):
        return
    codec = ExotelCodec(url_sample_rate=websocket.query_params.get("sample-rate"))
    runner = ExotelRunner(
        websocket, gw, codec, call_config(gw.settings, CHANNEL), calls=channel.calls
    )
    app_key = websocket.query_params.get("appKey")
    if app_key:  # the URL's, over a custom parameter of the start (module doc)
        runner.call.extra_parameters["appKey"] = app_key
    await runner.serve()
