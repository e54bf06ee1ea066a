"""Admin endpoints' authentication: ``Authorization: Bearer <key>`` with a key of
GATEWAY_ADMIN_KEYS.

One FastAPI dependency, :func:`require_admin`, for every admin endpoint
(``POST /v1/calls``; ``/v1/push`` can use the same)::

    @router.post("/v1/calls", dependencies=[Depends(require_admin)])

Refusals are RFC 9457 problem bodies (``application/problem+json``), raised as
:class:`AdminRefused` and answered by :func:`admin_refused_handler` (installed by
:func:`install`):

- 401 with ``WWW-Authenticate: Bearer realm="gateway-admin"`` — no
  ``Authorization: Bearer`` header (RFC 6750 section 3: no error code then);
- 401 with ``WWW-Authenticate: Bearer realm="gateway-admin", error="invalid_token"``
  — a key that is not one of GATEWAY_ADMIN_KEYS (RFC 6750 section 3.1: an invalid
  access token is 401, not 403; every admin key grants the whole admin API, so there
  is no ``insufficient_scope`` case);
- 403 without a challenge — a key sent while no admin keys are configured: the admin
  API is off, every admin request is refused whatever it carries, and no other key
  would do (RFC 9110 section 15.5.4).

Keys are compared in constant time (:func:`gateway.protocol.key_valid`).

Every refusal is logged by :func:`admin_refused_handler` (the path, the peer, the
status and why; never the key), at WARNING for the first
:data:`gateway.ratelimit.LOGGED_REFUSALS_BURST` and then one per
:data:`~gateway.ratelimit.LOGGED_REFUSALS_EVERY_S` (that line counts the refusals logged
at DEBUG since), the others at DEBUG: a client hammering the admin API with a wrong key
does not flood the log (:class:`gateway.ratelimit.RefusalLog`: the app's ``admin``
:func:`~gateway.ratelimit.refusal_log`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.deps import gateway_of
from gateway.httputil import problem
from gateway.logs import redact_query
from gateway.protocol import key_valid
from gateway.ratelimit import refusal_log

log = logging.getLogger("gateway.admin")


REALM = "gateway-admin"
"""The realm of the admin API's Bearer challenges."""
CHALLENGE = f'Bearer realm="{REALM}"'
"""``WWW-Authenticate`` of the 401 for a request without a bearer token."""
INVALID_TOKEN = f'Bearer realm="{REALM}", error="invalid_token"'
"""``WWW-Authenticate`` of the 401 for a key that is not an admin key (RFC 6750 section 3.1)."""


CHALLENGE_HEADER: dict[str, Any] = {
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750 section 3): "
        f'`{CHALLENGE}`, with `error="invalid_token"` for a wrong key',
        "schema": {"type": "string"},
    }
}
"""The OpenAPI ``headers`` of an admin operation's 401 answer."""


class AdminRefused(Exception):
    """An admin request refused: ``status`` 401 or 403, ``detail`` for the problem body,
    ``challenge`` the ``WWW-Authenticate`` value of the answer (every 401 has one) or
    None."""

    def __init__(self, status: int, detail: str, challenge: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.challenge = challenge


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_admin_key(keys: frozenset[str], authorization: str | None) -> None:
    """Return if ``authorization`` carries one of ``keys``; else raise AdminRefused
    (see the module doc): 401 with :data:`CHALLENGE` for no bearer token, 401 with
    :data:`INVALID_TOKEN` for a wrong key (compared in constant time), 403 without a
    challenge when ``keys`` is empty."""
    token = bearer_token(authorization)
    if token is None:
        raise AdminRefused(401, "Expected `Authorization: Bearer <admin key>`.", CHALLENGE)
    if not keys:
        raise AdminRefused(403, "No admin keys are configured (GATEWAY_ADMIN_KEYS).")
    if not key_valid(token, keys):
        raise AdminRefused(401, "The admin key is not valid.", INVALID_TOKEN)


BEARER = HTTPBearer(auto_error=False, description="A key of GATEWAY_ADMIN_KEYS.")
"""The admin API's security scheme in the OpenAPI document (``HTTPBearer``): a
dependency on it marks an operation as needing it; it refuses nothing itself
(``auto_error`` off: :func:`check_admin_key` gives the refusals)."""


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> None:
    """FastAPI dependency: the request carries an admin key (see the module doc).

    Raises AdminRefused (answered 401/403 by :func:`admin_refused_handler`; see
    :func:`check_admin_key`). ``credentials`` only documents the bearer scheme in the
    OpenAPI document (the operation's ``security``), as the push API's check does.
    """
    keys = gateway_of(request).settings.admin_keys
    check_admin_key(keys, request.headers.get("authorization"))


ADMIN_CHECKS: set[Callable[..., Any]] = {require_admin}
"""The FastAPI dependencies that check the admin key (:func:`require_admin` and the admin
API's own, gateway/push.py): a route depending on one is an admin route."""


def admin_route(request: Request) -> bool:
    """Whether the route ``request`` matched checks the admin key (:data:`ADMIN_CHECKS`).

    FastAPI parses a JSON body before it solves the route's dependencies, so a
    malformed body would be answered 400 before the key is looked at; the app's
    handler of invalid requests asks this first and refuses a request without a valid
    key as :func:`check_admin_key` would.
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return False
    return any(d.call in ADMIN_CHECKS for d in dependant.dependencies)


async def admin_refused_handler(request: Request, exc: Exception) -> JSONResponse:
    """The problem body of an AdminRefused, with its ``WWW-Authenticate`` challenge (on
    every 401: ``Bearer realm="gateway-admin"``, plus ``error="invalid_token"`` for a
    wrong key); logged at the level the app's ``admin`` RefusalLog gives (module doc)."""
    assert isinstance(exc, AdminRefused)
    refusal_log(request.app.state, "admin").log(
        log,
        "Admin request %s from %s refused (%d): %s",
        redact_query(request.url.path),  # /v1/sessions/<id>: the id is a credential
        request.client.host if request.client else "?",
        exc.status,
        exc.detail,
    )
    title = "Unauthorized" if exc.status == 401 else "Forbidden"
    response = problem(exc.status, title, exc.detail)
    if exc.challenge is not None:
        response.headers["WWW-Authenticate"] = exc.challenge
    return response


def install(app: FastAPI) -> None:
    """Answer AdminRefused raised anywhere in ``app`` with its problem body (and log it:
    the app's ``admin`` :func:`~gateway.ratelimit.refusal_log`)."""
    app.add_exception_handler(AdminRefused, admin_refused_handler)
