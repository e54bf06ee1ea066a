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
  — another token (section 3.1);
- 400 with ``WWW-Authenticate: Bearer realm="gateway-metrics", error="invalid_request"``
  — more than one ``Authorization`` header (section 3.1: more than one credential is a
  malformed request), none of them looked at (the first was taken: a right token then a
  wrong one was let through), as the admin API answers them (gateway/admin.py).

Token guessing is slowed per client address as the admin API slows key guessing
(gateway/admin.py): each wrong token (the 401 ``invalid_token``) takes one from the
address's allowance, GATEWAY_ADMIN_FAILURES_BURST refilled at GATEWAY_ADMIN_FAILURES_PER_S
(a :class:`gateway.ratelimit.TokenBuckets` of its own, ``app.state.metrics_failures``:
:func:`gateway.admin.failure_buckets`; an address keyed by
:func:`gateway.ratelimit.client_key`: an IPv4 address on its own, an IPv6 one by its /64;
the address uvicorn gives, a trusted proxy's X-Forwarded-For under FORWARDED_ALLOW_IPS).
While it is used up, every /metrics request of that address is refused before its token
is looked at, the right one too:

- 429 with ``Retry-After`` (whole seconds) and a problem body, as the admin API's.

Requests without a token, with a right one, or while no token is set take nothing.

Admin keys (GATEWAY_ADMIN_KEYS) are not taken: a scraper's credential then grants
nothing else (a Prometheus configuration holding an admin key could push to and dial
for anyone), and the admin keys' allowance is not shared with /metrics. The token's at
least 16 characters (gateway/settings.py) leave nothing to guess.

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

from gateway.admin import bearer_token, failure_buckets
from gateway.apidoc import PROBLEM
from gateway.deps import gateway_of
from gateway.protocol import SeveralCredentials, clipped, key_valid, sole_credentials
from gateway.ratelimit import MAX_CLIENT_CHARS, client_key, refusal_log
from gateway.settings import Settings

__all__ = [
    "CHALLENGE",
    "INVALID_REQUEST",
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
INVALID_REQUEST: Final = f'Bearer realm="{REALM}", error="invalid_request"'
"""``WWW-Authenticate`` of the 400 for more than one ``Authorization`` header (RFC 6750
section 3.1: more than one credential is a malformed request)."""

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
        400: {
            "description": "GATEWAY_METRICS_TOKEN is set and the request has more than one "
            "`Authorization` header (RFC 6750 section 3.1: `invalid_request`; none of them "
            "is looked at; problem body)",
            "headers": {
                "WWW-Authenticate": {
                    "description": f"`{INVALID_REQUEST}`",
                    "schema": {"type": "string"},
                }
            },
            "content": PROBLEM,
        },
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
        },
        429: {
            "description": "Too many wrong metrics tokens from this client address "
            "(GATEWAY_ADMIN_FAILURES_BURST, refilled at GATEWAY_ADMIN_FAILURES_PER_S, counted "
            "apart from the admin keys): refused before the token is looked at, until "
            "`Retry-After` seconds have passed (problem body)",
            "headers": {
                "Retry-After": {
                    "description": "Seconds until the client address may send a metrics "
                    "token again",
                    "schema": {"type": "integer"},
                }
            },
            "content": PROBLEM,
        },
    },
}
"""Route arguments documenting the token in the OpenAPI document: the operation's
optional ``security``, its 401 and its 429."""


async def require_metrics_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(METRICS_BEARER)],
) -> None:
    """FastAPI dependency of ``/metrics``: nothing when GATEWAY_METRICS_TOKEN is unset or
    ``Authorization: Bearer`` carries one of its tokens; else raises HTTPException (the
    app's handler answers a problem body with its headers), after logging the refusal:
    429 with ``Retry-After`` while the client address's allowance of wrong tokens is used
    up (before the token is looked at), else 400 ``invalid_request`` for more than one
    ``Authorization`` header (none looked at, nothing taken from the allowance), else 401
    with the ``WWW-Authenticate`` challenge of the module doc (a wrong token takes one from
    the allowance). ``credentials`` only documents the scheme in the OpenAPI document."""
    tokens = gateway_of(request).settings.metrics_token_digests  # hashed once
    if not tokens:
        return
    failures = failure_buckets(request, "metrics_failures")
    address = client_key(request.client.host) if request.client else "unknown"
    headers: dict[str, str]
    try:  # which one counts is anyone's guess: none does
        authorization, several = sole_credentials(request.headers.getlist("authorization")), ""
    except SeveralCredentials as exc:
        authorization, several = None, str(exc)
    if not failures.allowed(address):
        status, retry = 429, failures.retry_after_s(address)
        detail = f"Too many wrong metrics tokens from this address: retry after {retry} s."
        headers = {"Retry-After": str(retry)}
    elif several:
        status, detail = 400, several
        headers = {"WWW-Authenticate": INVALID_REQUEST}
    else:
        status, sent = 401, bearer_token(authorization)
        if sent is None:
            detail = "Expected `Authorization: Bearer <metrics token>`."
            headers = {"WWW-Authenticate": CHALLENGE}
        elif key_valid(sent, tokens):  # each token compared, whichever matches
            return
        else:
            detail = "The metrics token is not valid."
            headers = {"WWW-Authenticate": INVALID_TOKEN}
            failures.take(address)  # a guess: not a missing token
    refusal_log(request.app.state, "metrics").log(
        log,
        "Metrics request from %s refused (%d): %s",
        # the address: with a trusted X-Forwarded-For, the client's own text (cut)
        clipped(request.client.host, MAX_CLIENT_CHARS, quote=False) if request.client else "?",
        status,
        detail,
    )
    raise HTTPException(status, detail, headers=headers)


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
