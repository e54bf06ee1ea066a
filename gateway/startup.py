"""What the channels say at startup: one INFO line for every channel not configured.

A gateway serves every channel at once, and a channel none of whose settings are given
(no Alexa skill ids, no Plivo auth token, ...) refuses its requests: that is how the
product ships, not a fault, so it is no WARNING. Each such channel records itself with
:func:`not_configured` while its router's lifespan starts (on the app's
:class:`~gateway.deps.Gateway`); this module's :data:`router`, included after every
channel's, logs them all in one INFO line (:func:`summary`):

``channels not configured (they refuse their requests until the setting named is
given): alexa: /alexa answers 503 (GATEWAY_ALEXA_SKILL_IDS), ...``

What each endpoint answers is unchanged; each refused request is still logged at
WARNING (in a bounded burst: :class:`gateway.ratelimit.RefusalLog`), so whoever forgot a
setting learns it from the first request refused. Configurations that are unsafe or
half done (verification turned off, some of a channel's credentials without the
others) stay WARNINGs of the channel's own logger.

The same lifespan logs one more INFO line when ``/metrics`` answers anyone in a
deployment (GATEWAY_REDIS_URL set, no GATEWAY_METRICS_TOKEN:
:func:`gateway.metricsauth.open_metrics_notice`): open is the shipped default, as
Prometheus setups scrape without credentials, and many keep ``/metrics`` off their
public routes at the proxy, which the gateway cannot see; so it is said once, not
warned of.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI

from gateway.metricsauth import open_metrics_notice

if TYPE_CHECKING:
    from gateway.deps import Gateway

__all__ = ["Unconfigured", "not_configured", "router", "summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Unconfigured:
    """A channel none of whose settings are given, so ``path`` refuses every request.

    ``channel`` is its short name (``alexa``), ``path`` the endpoint that refuses
    (``/alexa``), ``status`` the HTTP status it answers (503; 403 for a carrier's
    webhook or stream), ``needs`` the setting(s) that configure it
    (``GATEWAY_ALEXA_SKILL_IDS``).
    """

    channel: str
    path: str
    status: int
    needs: str


def not_configured(gw: Gateway, channel: str, path: str, status: int, needs: str) -> None:
    """Record on ``gw`` that ``channel`` is not configured (see :class:`Unconfigured`),
    for the startup's one INFO line; logs nothing itself (DEBUG aside)."""
    log.debug("%s is not configured: %s answers %d (%s)", channel, path, status, needs)
    gw.unconfigured.append(Unconfigured(channel, path, status, needs))


def summary(unconfigured: Sequence[Unconfigured]) -> str | None:
    """The one line naming the channels of ``unconfigured`` (in their order), or None
    when there are none."""
    if not unconfigured:
        return None
    listed = ", ".join(
        f"{u.channel}: {u.path} answers {u.status} ({u.needs})" for u in unconfigured
    )
    return (
        f"channels not configured (they refuse their requests until the setting named is "
        f"given): {listed}"
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gw: Gateway = app.state.gateway
    line = summary(gw.unconfigured)
    if line is not None:
        log.info("%s", line)
    if (notice := open_metrics_notice(gw.settings)) is not None:
        log.info("%s", notice)
    yield


router = APIRouter(lifespan=_lifespan)
"""Include it after every channel's router: its lifespan, started after theirs, logs the
:func:`summary` of the channels they recorded."""
