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
  would do (RFC 9110 section 15.5.4);
- 400 with ``WWW-Authenticate: Bearer realm="gateway-admin", error="invalid_request"``
  — more than one ``Authorization`` header: RFC 6750 section 3.1 makes a request with
  more than one credential malformed (``invalid_request``, 400); none of them is looked
  at (the first was taken: a right key followed by a wrong one was accepted).

Keys are compared in constant time (:func:`gateway.protocol.key_valid`).

Key guessing is slowed per client address (:func:`admit`; an IPv6 address counted by its
/64, an IPv4-mapped one as its IPv4 address: :func:`gateway.ratelimit.client_key`): each
wrong key (the 401 ``invalid_token``) takes a token from the address's bucket
(GATEWAY_ADMIN_FAILURES_BURST tokens, refilled at GATEWAY_ADMIN_FAILURES_PER_S per second;
:class:`gateway.ratelimit.TokenBuckets`, at most :data:`MAX_TRACKED_ADDRESSES` addresses, in
this process: N instances allow N times the rate); while it is empty, every admin request of
that address is refused 429 with ``Retry-After`` (a problem body) before its key is looked
at, so a guess cannot be tested then, a right key included. Requests without a key, with a
right one, or while no keys are configured (403) take nothing.

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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Annotated, Any, Final, get_args

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from gateway.deps import gateway_of
from gateway.httputil import problem, status_phrase
from gateway.logs import logged_path
from gateway.protocol import KeyDigests, SeveralCredentials, clipped, key_valid, sole_credentials
from gateway.ratelimit import MAX_CLIENT_CHARS, TokenBuckets, client_key, refusal_log

log = logging.getLogger("gateway.admin")


REALM = "gateway-admin"
"""The realm of the admin API's Bearer challenges."""
CHALLENGE = f'Bearer realm="{REALM}"'
"""``WWW-Authenticate`` of the 401 for a request without a bearer token."""
INVALID_TOKEN = f'Bearer realm="{REALM}", error="invalid_token"'
"""``WWW-Authenticate`` of the 401 for a key that is not an admin key (RFC 6750 section 3.1)."""
INVALID_REQUEST = f'Bearer realm="{REALM}", error="invalid_request"'
"""``WWW-Authenticate`` of the 400 for a request with more than one ``Authorization``
header (RFC 6750 section 3.1: more than one credential is a malformed request)."""


CHALLENGE_HEADER: dict[str, Any] = {
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750 section 3): "
        f'`{CHALLENGE}`, with `error="invalid_token"` for a wrong key',
        "schema": {"type": "string"},
    }
}
"""The OpenAPI ``headers`` of an admin operation's 401 answer."""


MAX_TRACKED_ADDRESSES: Final = 65_536
"""Client addresses whose wrong admin keys are counted at once, per process (refilled
buckets are dropped first, then the least recently used: :class:`TokenBuckets`)."""

RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds until the client address may send an admin key again",
        "schema": {"type": "integer"},
    }
}
"""The OpenAPI ``headers`` of an admin operation's 429 answer."""
TOO_MANY_FAILURES: Final = (
    "Too many wrong admin keys from this client address (GATEWAY_ADMIN_FAILURES_BURST, "
    "refilled at GATEWAY_ADMIN_FAILURES_PER_S): refused before the key is looked at, "
    "until `Retry-After` seconds have passed"
)
"""The OpenAPI description of an admin operation's 429 answer."""


class AdminRefused(Exception):
    """An admin request refused: ``status`` 400, 401, 403 or 429, ``detail`` for the problem
    body, ``challenge`` the ``WWW-Authenticate`` value of the answer (every 401 has one)
    or None, ``retry_after_s`` the ``Retry-After`` of a 429 (s) or None."""

    def __init__(
        self,
        status: int,
        detail: str,
        challenge: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.challenge = challenge
        self.retry_after_s = retry_after_s


UNKNOWN_FIELDS_NAMED: Final = 3
"""How many unknown fields of an admin request body a refusal names (the others counted)."""


def unknown_fields(names: Sequence[str], documented: Mapping[str, str] | None = None) -> str:
    """The words of an admin body's refusal naming its unknown fields ``names`` (1 or more):
    ``unknown field 'machinedetection'``, ``unknown fields 'a', 'b', 'c' and 2 more``;
    a name that ``documented`` maps (a snake_case spelling, :func:`documented_name`) is
    followed by the documented one: ``unknown field 'target.session_id' (documented as
    'target.sessionId')``.

    The admin request bodies (``POST /v1/push``, ``POST /v1/calls``) refuse a property
    they do not know (400), unlike the channels' wire models, which ignore one (peers add
    fields, PROTOCOL-NOTES.md): the admin API is the operators' own, and a mistyped
    option must not be dropped silently. Each name is the client's, quoted and cut to 64
    characters (:func:`gateway.protocol.clipped`); at most :data:`UNKNOWN_FIELDS_NAMED`
    are named. Pure; never raises.
    """
    documented = documented or {}
    named = ", ".join(
        clipped(name)
        + (f" (documented as {clipped(documented[name])})" if name in documented else "")
        for name in names[:UNKNOWN_FIELDS_NAMED]
    )
    more = len(names) - UNKNOWN_FIELDS_NAMED
    return f"unknown field{'s' if len(names) > 1 else ''} {named}" + (
        f" and {more} more" if more > 0 else ""
    )


def documented_name(model: type[BaseModel] | None, path: Sequence[str | int]) -> str | None:
    """The documented (alias) spelling of the body path ``path`` (pydantic's ``loc`` in
    the body: names, list indices as ints) in the request model ``model``, when its last
    part is the Python name of a field whose alias differs (``("target", "session_id")``
    -> ``"target.sessionId"``, ``("items", 0, "node_id")`` -> ``"items.0.nodeId"``);
    None for any other path (a typo, a path through no model). Pure; never raises.

    The admin bodies take only their documented (camelCase) names: this lets a refusal
    of the Python spelling say which name to use."""
    parts: list[str] = []
    for index, part in enumerate(path):
        if isinstance(part, int):  # a list's index
            parts.append(str(part))
            continue
        if model is None:
            return None
        last = index == len(path) - 1
        for name, field in model.model_fields.items():
            alias = field.alias or name
            if last and name == part and alias != part:
                return ".".join([*parts, alias])
            if not last and alias == part:
                parts.append(part)
                model = _model_in(field.annotation)
                break
        else:
            return None
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model that ``annotation`` is or holds (``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_admin_key(keys: Collection[str] | KeyDigests, authorization: str | None) -> None:
    """Return if ``authorization`` carries one of ``keys`` (the keys or their digests,
    :attr:`Settings.admin_key_digests`); else raise AdminRefused
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


def failure_buckets(request: Request, attribute: str) -> TokenBuckets:
    """The app's buckets of wrong credentials per client address kept as ``app.state.
    <attribute>`` (made on first use from GATEWAY_ADMIN_FAILURES_BURST and
    GATEWAY_ADMIN_FAILURES_PER_S, at most :data:`MAX_TRACKED_ADDRESSES` addresses): one
    table per credential (``admin_failures``: admin keys; ``metrics_failures``: metrics
    tokens, gateway/metricsauth.py), so a scraper with a stale token does not use up the
    admin API's allowance of its address, nor the other way round."""
    state = request.app.state
    buckets: TokenBuckets | None = getattr(state, attribute, None)
    if buckets is None:
        settings = gateway_of(request).settings
        buckets = TokenBuckets(
            settings.admin_failures_burst,
            settings.admin_failures_per_s,
            max_clients=MAX_TRACKED_ADDRESSES,
        )
        setattr(state, attribute, buckets)
    return buckets


def failed_keys(request: Request) -> TokenBuckets:
    """The app's buckets of wrong admin keys per client address (``app.state.
    admin_failures``: :func:`failure_buckets`)."""
    return failure_buckets(request, "admin_failures")


def admit(request: Request, keys: Collection[str] | KeyDigests) -> None:
    """Return if ``request`` carries one of ``keys`` and its client address may send a
    key; else raise AdminRefused: 429 with ``retry_after_s`` while the address's
    allowance of wrong keys is used up (before the key is looked at: the module doc), else
    403 for more than one ``Authorization`` header while no keys are configured (the admin
    API is off: 403 whatever the request carries), else 400 ``invalid_request``
    (:data:`INVALID_REQUEST`) for more than one ``Authorization`` header, none of them
    looked at (RFC 6750 section 3.1: :func:`gateway.protocol.sole_credentials`); else as
    :func:`check_admin_key`
    (a wrong key, 401 ``invalid_token``, takes one from the address's allowance)."""
    failures = failed_keys(request)
    address = client_key(request.client.host) if request.client else "unknown"
    if not failures.allowed(address):
        retry = failures.retry_after_s(address)
        detail = f"Too many wrong admin keys from this address: retry after {retry} s."
        raise AdminRefused(429, detail, retry_after_s=retry)
    sent = request.headers.getlist("authorization")
    if len(sent) > 1 and not keys:  # switched off: 403 whatever it carries (module doc)
        raise AdminRefused(403, "No admin keys are configured (GATEWAY_ADMIN_KEYS).")
    try:  # which one counts is anyone's guess: none does
        authorization = sole_credentials(sent)
    except SeveralCredentials as exc:
        raise AdminRefused(400, str(exc), INVALID_REQUEST) from None
    try:
        check_admin_key(keys, authorization)
    except AdminRefused as refused:
        if refused.challenge == INVALID_TOKEN:  # a guess: not a missing key, not 403
            failures.take(address)
        raise


BEARER = HTTPBearer(auto_error=False, description="A key of GATEWAY_ADMIN_KEYS.")
"""The admin API's security scheme in the OpenAPI document (``HTTPBearer``): a
dependency on it marks an operation as needing it; it refuses nothing itself
(``auto_error`` off: :func:`admit` gives the refusals)."""


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> None:
    """FastAPI dependency: the request carries an admin key (see the module doc).

    Raises AdminRefused (answered 401/403/429 by :func:`admin_refused_handler`; see
    :func:`admit`). ``credentials`` only documents the bearer scheme in the
    OpenAPI document (the operation's ``security``), as the push API's check does.
    """
    admit(request, gateway_of(request).settings.admin_key_digests)


ADMIN_CHECKS: set[Callable[..., Any]] = {require_admin}
"""The FastAPI dependencies that check the admin key (:func:`require_admin` and the admin
API's own, gateway/push.py): a route depending on one is an admin route."""


def admin_route(request: Request) -> bool:
    """Whether the route ``request`` matched checks the admin key (:data:`ADMIN_CHECKS`).

    FastAPI parses a JSON body before it solves the route's dependencies, so a
    malformed body would be answered 400 before the key is looked at; the app's
    handler of invalid requests asks this first and refuses a request without a valid
    key as :func:`admit` would.
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return False
    return any(d.call in ADMIN_CHECKS for d in dependant.dependencies)


async def admin_refused_handler(request: Request, exc: Exception) -> JSONResponse:
    """The problem body of an AdminRefused, with its ``WWW-Authenticate`` challenge (on
    every 401: ``Bearer realm="gateway-admin"``, plus ``error="invalid_token"`` for a
    wrong key) or ``Retry-After`` (a 429); logged at the level the app's ``admin``
    RefusalLog gives (module doc)."""
    assert isinstance(exc, AdminRefused)
    refusal_log(request.app.state, "admin").log(
        log,
        "Admin request %s from %s refused (%d): %s",
        logged_path(request.url.path),  # /v1/sessions/<id>: the id is a credential
        # the address: with a trusted X-Forwarded-For, the client's own text (cut)
        clipped(request.client.host, MAX_CLIENT_CHARS, quote=False) if request.client else "?",
        exc.status,
        exc.detail,
    )
    response = problem(exc.status, status_phrase(exc.status), exc.detail)
    if exc.challenge is not None:
        response.headers["WWW-Authenticate"] = exc.challenge
    if exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def install(app: FastAPI) -> None:
    """Answer AdminRefused raised anywhere in ``app`` with its problem body (and log it:
    the app's ``admin`` :func:`~gateway.ratelimit.refusal_log`)."""
    app.add_exception_handler(AdminRefused, admin_refused_handler)
