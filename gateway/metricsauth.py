"""``GET``/``HEAD /metrics`` behind a bearer token: GATEWAY_METRICS_TOKEN (opt-in).

The gateway serves its Prometheus metrics on the port of its public webhooks, where
they tell anyone who reaches it the session and turn counts, error rates by channel
and source, the channels in use and their latency. With GATEWAY_METRICS_TOKEN set,
:func:`require_metrics_token` (a dependency of both routes) lets through only a
request with ``Authorization: Bearer <token>`` of one of its tokens (comma-separated: a
new token is added, the scrapers moved to it, then the old one dropped, with no window of
401s; each compared in constant time, every one whichever matches,
:func:`gateway.protocol.key_valid`); the others get an RFC 9457 problem body:

- 401 with ``WWW-Authenticate: Bearer realm="gateway-metrics"`` — no bearer token
  (RFC 6750 section 3: no error code then);
- 401 with ``WWW-Authenticate: Bearer realm="gateway-metrics", error="invalid_token"``
  — another token (section 3.1).

Admin keys (GATEWAY_ADMIN_KEYS) are not taken: a scraper's credential then grants
nothing else (a Prometheus configuration holding an admin key could push to and dial
for anyone), and /metrics, unlike the admin API, does not slow wrong keys down
(gateway/admin.py), so it would be a place to guess admin keys at full speed. The
token's at least 16 characters (gateway/settings.py) leave nothing to guess.

Unset (the default, as before): /metrics answers everyone, so ``gateway serve`` with
no settings and the Prometheus setups scraping it without credentials work unchanged;
:func:`open_metrics_notice` is the INFO line ``gateway serve`` logs of it at startup when
GATEWAY_REDIS_URL is set (a deployment, not a trial).

Each refusal is logged (never the token) at WARNING for the first few and then one
per interval, the rest at DEBUG (the app's ``metrics``
:func:`~gateway.ratelimit.refusal_log`): a scraper with a wrong token is seen in the log
without flooding it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from gateway.admin import bearer_token
from gateway.apidoc import PROBLEM
from gateway.deps import gateway_of
from gateway.protocol import clipped, key_valid
from gateway.ratelimit import MAX_CLIENT_CHARS, refusal_log
from gateway.settings import Settings

__all__ = [
    "CHALLENGE",
    "INVALID_TOKEN",
    "METRICS_BEARER",
    "METRICS_OPENAPI",
    "open_metrics_notice",
    "require_metrics_token",
]

log = logging.getLogger("gateway.metrics")

REALM: Final = "gateway-metrics"
"""The realm of /metrics' Bearer challenges."""
CHALLENGE: Final = f'Bearer realm="{REALM}"'
"""``WWW-Authenticate`` of the 401 for a request without a bearer token."""
INVALID_TOKEN: Final = f'Bearer realm="{REALM}", error="invalid_token"'
"""``WWW-Authenticate`` of the 401 for another token (RFC 6750 section 3.1)."""

METRICS_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="MetricsToken",
    description="GATEWAY_METRICS_TOKEN, required by /metrics only when it is set.",
)
"""/metrics' security scheme in the OpenAPI document; it refuses nothing itself
(:func:`require_metrics_token` does)."""

METRICS_OPENAPI: Final[dict[str, Any]] = {
    # FastAPI lists the scheme as required; {} adds "or none" (OpenAPI 3.1 section
    # 4.8.10: an empty requirement makes security optional), the default
    "openapi_extra": {"security": [{}]},
    "responses": {
        401: {
            "description": "GATEWAY_METRICS_TOKEN is set and the request does not carry it "
            "as `Authorization: Bearer <token>` (problem body)",
            "headers": {
                "WWW-Authenticate": {
                    "description": f"The Bearer challenge (RFC 6750 section 3): `{CHALLENGE}`, "
                    'with `error="invalid_token"` for another token',
                    "schema": {"type": "string"},
                }
            },
            "content": PROBLEM,
        }
    },
}
"""Route arguments documenting the token in the OpenAPI document: the operation's
optional ``security`` and its 401."""


async def require_metrics_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(METRICS_BEARER)],
) -> None:
    """FastAPI dependency of ``/metrics``: nothing when GATEWAY_METRICS_TOKEN is unset or
    ``Authorization: Bearer`` carries it; else raises HTTPException 401 with the
    ``WWW-Authenticate`` challenge of the module doc (the app's handler answers a
    problem body), after logging the refusal. ``credentials`` only documents the scheme
    in the OpenAPI document."""
    tokens = gateway_of(request).settings.metrics_tokens
    if not tokens:
        return
    sent = bearer_token(request.headers.get("authorization"))
    if sent is None:
        detail, challenge = "Expected `Authorization: Bearer <metrics token>`.", CHALLENGE
    elif key_valid(sent, tokens):  # each token compared, whichever matches
        return
    else:
        detail, challenge = "The metrics token is not valid.", INVALID_TOKEN
    refusal_log(request.app.state, "metrics").log(
        log,
        "Metrics request from %s refused (401): %s",
        # the address: with a trusted X-Forwarded-For, the client's own text (cut)
        clipped(request.client.host, MAX_CLIENT_CHARS, quote=False) if request.client else "?",
        detail,
    )
    raise HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def open_metrics_notice(settings: Settings) -> str | None:
    """The startup INFO line saying /metrics answers anyone, for ``settings`` with
    GATEWAY_REDIS_URL set (a deployment: replicas sharing a store) and no
    GATEWAY_METRICS_TOKEN; None otherwise (a token set, or a trial on the memory store)."""
    if settings.metrics_token is not None or not settings.redis_url:
        return None
    return (
        "GET /metrics answers anyone who reaches this port (turn and session counts, error "
        "rates, channels, latency): set GATEWAY_METRICS_TOKEN to require a bearer token, or "
        "keep /metrics off the public routes of your proxy"
    )
