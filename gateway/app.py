"""``create_app(settings)``: the FastAPI application with every channel wired in."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.alexa.routes import post_alexa
from adapters.alexa.routes import router as alexa_router
from adapters.exotel.routes import router as exotel_router
from adapters.flowstorm.v1.routes import router as flowstorm_v1_router
from adapters.flowstorm.v2.routes import put_client
from adapters.flowstorm.v2.routes import router as flowstorm_v2_router
from adapters.google.routes import router as google_router
from adapters.plivo.routes import api_base_url as plivo_api
from adapters.plivo.routes import router as plivo_router
from adapters.telnyx.routes import TelnyxDialer
from adapters.telnyx.routes import api_base_url as telnyx_api
from adapters.telnyx.routes import router as telnyx_router
from adapters.twilio.calls import TwilioDialer
from adapters.twilio.calls import api_base_url as twilio_api
from adapters.twilio.routes import router as twilio_router
from adapters.voiceflow.routes import SYSTEM_CLOCK as VOICEFLOW_CLOCK
from adapters.voiceflow.routes import Clock as VoiceflowClock
from adapters.voiceflow.routes import mount as mount_voiceflow
from adapters.vonage.routes import api_base_url as vonage_api
from adapters.vonage.routes import router as vonage_router
from gateway import apidoc, console
from gateway.admin import (
    AdminRefused,
    admin_refused_handler,
    admin_route,
    admit,
    documented_name,
    unknown_fields,
)
from gateway.answers import AnswerStore, MemoryAnswerStore, RedisAnswerStore
from gateway.breaker import outage_level, retry_after_s
from gateway.bus import Bus, MemoryBus, RedisBus
from gateway.calls import mount as mount_calls
from gateway.conversation import Conversation
from gateway.deps import Gateway, gateway_of
from gateway.files import router as files_router
from gateway.httputil import problem, quiet_aborts, status_phrase
from gateway.logs import logged_path, set_hash_key
from gateway.metrics import REGISTRY
from gateway.metricsauth import METRICS_OPENAPI, require_metrics_token
from gateway.middleware import Endpoint, RequestIdMiddleware
from gateway.nonces import MemoryNonceStore, NonceStore, RedisNonceStore
from gateway.outbox import Journal, MemoryOutbox, Outbox, RedisOutbox
from gateway.pipeline import make_pipeline
from gateway.pipeline.http import PipelineRequest, PipelineResponse
from gateway.protocol import clipped
from gateway.push import Pusher
from gateway.push import install as install_admin
from gateway.secrets import LOG_SESSION_REF, TTS_ID, load_secret_keys
from gateway.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    StoreUnavailable,
    make_store,
)
from gateway.settings import Settings
from gateway.speech.service import make_speech
from gateway.startup import router as startup_router

log = logging.getLogger(__name__)

PUSH_NAMESPACES = ("flowstorm", "voiceflow")
"""Session namespaces a push's ``sessionId`` is looked up in."""
PUSH_CHANNELS = ("flowstorm_v1", "flowstorm_v2", "voiceflow")
"""Channels whose clients get pushes from their session's outbox (V1 and socket.io
connections, a V2 ``GET /client``, a V2 turn's answer; V1 resume)."""
SESSION_NAMESPACES = (*PUSH_NAMESPACES, "alexa", "google", "dialogflow", "twilio")
"""Session namespaces the session view (GET /v1/sessions/{id}) looks in, in order."""


NO_STORE_PATHS: Final = ("/v1/", "/metrics")
"""Path prefixes whose answers say ``Cache-Control: no-store`` (RFC 9111): the admin API's
(a session view or a push's answer names the session id, a Flowstorm client's bearer
credential, and its app key; a call's record its numbers' outcome) and ``/metrics``
(what GATEWAY_METRICS_TOKEN guards). See :class:`RequestIdMiddleware`."""


GC_THRESHOLD: Final = 10_000
"""The cyclic collector's first threshold under ``gateway serve`` (CPython's default: 700).

A young collection runs when the container objects allocated and not yet freed exceed
it. Under load the objects of the turns in flight (coroutine frames, events, dicts)
pass 700 every few turns, so each young collection walked the same live objects
again, only to find them alive: 4,500-5,000 collections in 10 s of V2 text
turns on Redis (wrk ``-c32``, about 4,000 turns/s), 7 % of the process's CPU. At 10,000
the swing of the turns in flight no longer triggers it: 23 collections in the same
run, 1.5 % of the CPU (gc.callbacks timing). Garbage cycles, rare on the turn path,
are found after at most 10,000 net allocations instead of 700."""


def create_app(
    settings: Settings | None = None,
    *,
    freeze_gc: bool = False,
    voiceflow_clock: VoiceflowClock = VOICEFLOW_CLOCK,
) -> FastAPI:
    """The gateway app for ``settings`` (read from the environment when omitted).

    The store, pipeline and turn engine are made when the app starts (lifespan)
    and closed when it stops, after running turns have finished (bounded by
    GATEWAY_LOCK_WAIT_S + Settings.turn_max_s + 1 s: a turn may wait for its session's
    lock before it runs). ``freeze_gc`` (``gateway serve``: the app owns its
    process) moves everything alive once the app has started out of the garbage
    collector's reach (``gc.freeze()``): its full passes otherwise walk every module
    object, tens of ms each, the turns' long latency tail; and it raises the
    collector's first threshold to :data:`GC_THRESHOLD`. Apps embedded in another
    process (tests) leave the collector alone. ``voiceflow_clock`` is the Voiceflow
    socket's time source (adapters.voiceflow.routes.Clock: the real one, or a test's).
    """
    settings = settings or Settings()
    key = settings.log_hash_key
    set_hash_key(key.get_secret_value() if key else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = make_store(
            settings.redis_url,
            settings.redis_prefix,
            settings.redis_max_connections,
            memory_max_sessions=settings.memory_max_sessions,
        )
        redis = store.redis if isinstance(store, RedisSessionStore) else None
        bus: Bus = RedisBus(redis, prefix=settings.redis_prefix) if redis else MemoryBus()
        # before anything that signs: speech (TTS file ids), Twilio and Voiceflow (their
        # routers' lifespans run after this one and take the keys from the Gateway)
        secret_keys = await load_secret_keys(
            settings.secret_key.get_secret_value() if settings.secret_key else None,
            redis,
            prefix=settings.redis_prefix,
        )
        if settings.log_hash_key is None:  # logs name sessions with the master key's
            set_hash_key(lambda: secret_keys.key(LOG_SESSION_REF))
        # read at each use: the key follows the master key, which changes once the key
        # shared through Redis is read (Redis down at startup): then every instance gives
        # one sentence one id again (the process's key meanwhile: ids of this one only)
        speech = make_speech(settings, redis, id_key=lambda: secret_keys.key(TTS_ID))
        pipeline = make_pipeline(settings)
        outbox: Outbox = (
            RedisOutbox(
                redis,
                prefix=settings.redis_prefix,
                keep=2 * settings.outbox_max,
                ttl_s=settings.outbox_ttl_s,
            )
            if redis
            else MemoryOutbox(keep=2 * settings.outbox_max, ttl_s=settings.outbox_ttl_s)
        )
        journal = Journal(outbox, bus, limit=settings.outbox_max)
        # a turn learns of queued pushes as it locks
        # and a save keeps the outbox's numbering (seq) at least as long as the session
        if isinstance(store, RedisSessionStore) and isinstance(outbox, RedisOutbox):
            store.peek_outbox(outbox.keys, keep_s=settings.outbox_ttl_s)
        elif isinstance(store, MemorySessionStore) and isinstance(outbox, MemoryOutbox):
            store.peek_outbox(outbox.pending, outbox.keep_numbers)
        conversation = Conversation(store, pipeline, settings, speech, journal)
        warming = asyncio.create_task(speech.warm_up()) if settings.speech_warm_up else None
        nonces: NonceStore = (
            RedisNonceStore(redis, prefix=settings.redis_prefix) if redis else MemoryNonceStore()
        )
        ttl_s = settings.voiceflow_answer_ttl_s
        answers: AnswerStore = (
            RedisAnswerStore(redis, prefix=settings.redis_prefix, ttl_s=ttl_s)
            if redis
            else MemoryAnswerStore(ttl_s=ttl_s)
        )
        app.state.gateway = Gateway(
            settings,
            store,
            pipeline,
            conversation,
            speech,
            bus,
            nonces=nonces,
            secret_keys=secret_keys,
            journal=journal,
            answers=answers,
            pusher=Pusher(
                store,
                journal,
                settings,
                push_namespaces=PUSH_NAMESPACES,
                push_channels=PUSH_CHANNELS,
                all_namespaces=SESSION_NAMESPACES,
            ),
        )
        log.info(
            "gateway ready: store=%s pipeline=%s secret key=%s",
            type(store).__name__,
            pipeline.name,
            secret_keys.source,
        )
        if freeze_gc:  # see the docstring; the objects of turns are collected as before
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            # a turn's task waits up to GATEWAY_LOCK_WAIT_S for its session's lock, then
            # runs GATEWAY_TURN_TIMEOUT_S (and its #error turn: Settings.turn_max_s; + 1 s
            # to save); those of WebSockets (closed 1012 at once) started before the
            # shutdown, so this adds nothing to its bound. A webhook's session end gone on
            # in the background (it waits for its session's turn) is waited for too
            left = await conversation.drain(settings.lock_wait_s + settings.turn_max_s + 1)
            if left:
                log.warning("%d turns or session ends were still running at shutdown", left)
            if warming is not None:
                warming.cancel()
            await pipeline.aclose()
            await speech.aclose()
            await bus.aclose()
            await secret_keys.aclose()
            await store.aclose()

    app = FastAPI(
        title="Channel gateway",
        version="0.1.0",
        summary="One bot, every channel: Flowstorm sockets, Alexa, Google, Twilio, Voiceflow.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry (0.165: tracing, metrics, logs) off: the gateway's
        # figures are its Prometheus metrics (/metrics). On, FastAPI looks the three global
        # OpenTelemetry providers up on every request even when none is configured (an
        # older FastAPI takes the argument as an unused extra)
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    # the turn routes are called by the middleware itself (see RequestIdMiddleware):
    # their routes below still document them and answer their paths' other methods.
    # It wraps the whole stack, Starlette's ServerErrorMiddleware too (add_middleware
    # puts it inside that one): the 500 of an unhandled error carries the X-Request-Id
    # as every other answer does, and its ERROR line the request id
    build_stack = app.build_middleware_stack
    direct: dict[tuple[str, str], Endpoint] = {
        ("PUT", "/client"): put_client,
        ("POST", "/alexa"): post_alexa,
    }
    direct.update({(method, path + "/"): call for (method, path), call in direct.items()})

    def build_middleware_stack() -> ASGIApp:
        return RequestIdMiddleware(build_stack(), direct=direct, no_store=NO_STORE_PATHS)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    # a path with a trailing slash is served as the same path without it (no 307 built
    # from the Host header): see _SlashForms
    app.router.redirect_slashes = False
    app.router.default = _SlashForms(app.router.app, app.router.default)
    app.include_router(flowstorm_v2_router)
    app.include_router(flowstorm_v1_router)
    app.include_router(files_router)
    # voice assistants; their routers' lifespans make the verifiers and log startup warnings
    app.include_router(alexa_router)
    app.include_router(google_router)
    # phone calls (Twilio Media Streams); its router's lifespan logs the verification warnings
    app.include_router(twilio_router)
    # Telnyx: the Call Control webhooks of calls placed here (answering-machine results)
    app.include_router(telnyx_router)
    # Vonage: the answer URL (NCCO) and the WebSocket stream, on the shared call engine
    app.include_router(vonage_router)
    # Plivo: the answer URL (XML) and the Audio Stream, on the shared call engine
    app.include_router(plivo_router)
    # Exotel: the Voicebot applet's stream (Basic auth), on the shared call engine
    app.include_router(exotel_router)
    # call control: POST /v1/calls (admin key) through each carrier's dialer, transfers
    # and hang-ups through each carrier's REST API (Exotel has none here), whose client is
    # made at startup when the carrier's credentials are configured
    mount_calls(
        app,
        {"twilio": TwilioDialer(), "telnyx": TelnyxDialer()},
        (twilio_api, telnyx_api, vonage_api, plivo_api),
    )
    # Voiceflow socket.io at /v4/interact/socket (a mounted ASGI app; its router's lifespan)
    mount_voiceflow(app, settings, clock=voiceflow_clock)
    if settings.console_enabled:  # the browser console: static files at /console
        console.mount(app)
    # the admin API: proactive push and the session view (gateway/push.py)
    install_admin(app)
    # last: its lifespan logs the one INFO line of the channels not configured, which the
    # channels' lifespans (started before it) recorded
    app.include_router(startup_router)

    # GET and HEAD (RFC 9110 section 9.3.2: the same answer without its body, as load
    # balancers and uptime checkers ask): one route each, so each has its own operationId
    # in the OpenAPI document (one route of both methods would give both the same id)
    # GATEWAY_METRICS_TOKEN, when set, is required as a bearer token (gateway/metricsauth.py)
    metrics_route: dict[str, Any] = {
        "tags": ["operations"],
        "response_class": PlainTextResponse,
        "dependencies": [Depends(require_metrics_token)],
        "openapi_extra": METRICS_OPENAPI["openapi_extra"],
        "responses": {
            200: {"content": {CONTENT_TYPE_LATEST: {}}},
            **METRICS_OPENAPI["responses"],
        },
    }

    @app.head("/metrics", summary="The headers of GET /metrics, no body", **metrics_route)
    @app.get("/metrics", summary="Prometheus metrics of this process", **metrics_route)
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.head("/healthz", tags=["operations"], summary="The process is up (headers only)")
    @app.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    readyz_responses: dict[int | str, dict[str, Any]] = {
        503: {
            "description": "The process is shutting down (from the first SIGTERM/SIGINT), "
            "or the session store does not answer; asked again after `Retry-After` seconds",
            "content": apidoc.PROBLEM,
            "headers": {
                "Retry-After": {
                    "description": "1 (shutting down, or the store failed), or the seconds "
                    "until the store client's circuit breaker asks Redis again (its "
                    "cool-down, at most 5)",
                    "schema": {"type": "integer"},
                }
            },
        }
    }

    @app.head(
        "/readyz",
        tags=["operations"],
        summary="The session store is reachable (headers only)",
        responses=readyz_responses,
    )
    @app.get(
        "/readyz",
        tags=["operations"],
        summary="The session store is reachable",
        responses=readyz_responses,
    )
    async def readyz(request: Request) -> JSONResponse:
        gw = gateway_of(request)
        if gw.draining:  # the listener is still open while Voiceflow clients are told
            refused = problem(503, "Service Unavailable", "The gateway is shutting down.")
            refused.headers["Retry-After"] = "1"
            return refused
        try:
            await gw.store.ping()
        except StoreUnavailable as exc:  # the how goes to the log, the body says what
            # refused by the Redis client's open breaker (503 at once), or one more failure
            # of an outage: the breaker logged it (outage_level)
            log.log(outage_level(exc), "not ready: %s", exc)
            refused = problem(503, "Service Unavailable", "The session store does not answer.")
            refused.headers["Retry-After"] = str(retry_after_s(exc))
            return refused
        return JSONResponse({"status": "ready"})

    @app.webhooks.post(
        "pipeline-turn",
        summary="The core pipeline webhook (GATEWAY_PIPELINE=http(s)://...)",
        description=(
            "The gateway POSTs each turn to the user's core as a PipelineRequest. The core "
            "answers `application/json` with one PipelineResponse, or `application/x-ndjson` "
            'with lines `{"type":"ResponseItem","responseItem":{...}}` forwarded as they '
            'arrive and a last line `{"type":"Response","response":{...},"state":{...}}`. '
            "`response.attributes` are merged into the session's attributes; `state` replaces "
            "the stored pipeline state. Non-2xx, timeouts and invalid answers become an "
            "ErrorEvent with source `pipeline`, but for HTTP 429, or 503 with `Retry-After`: "
            "they say the core did not process the turn, and the gateway sends the same "
            "request (the same body and `X-Request-Id`) again after the delay asked for "
            "(GATEWAY_PIPELINE_RETRIES, within the turn's time). A core answers them only "
            "for a turn it has not acted on; one it may have taken in gets another status "
            "(500, or 503 without `Retry-After`), never sent again, else the core sees the "
            "user's words twice."
        ),
        response_model=PipelineResponse,
    )
    def pipeline_turn(body: PipelineRequest) -> None:  # documentation only
        return None

    def openapi() -> dict[str, Any]:
        """FastAPI's document, saying 400 + problem body where FastAPI says 422."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
                webhooks=app.webhooks.routes,
            )
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    if "422" in responses:
                        del responses["422"]
                        responses.setdefault("400", _BAD_REQUEST)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for name, schema in apidoc.SCHEMAS.items():
                schemas.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if admin_route(request):  # the body was parsed before the key was checked
            try:
                admit(request, settings.admin_key_digests)
            except AdminRefused as refused:
                return await admin_refused_handler(request, refused)
        detail = "The request is not valid."
        extra = _unknown_fields(exc)
        if extra:  # an admin body's mistyped option: named (clipped), not dropped
            documented = _documented_names(request, extra)
            detail = f"The request is not valid: {unknown_fields(list(extra), documented)}."
        return problem(400, "Bad Request", detail, errors=_errors(exc))

    quiet_aborts(log, logging.getLogger("uvicorn.error"))  # a cut-off streamed body

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the path may carry a credential (/v1/sessions/<id>): redacted as the access log
        # is; and control characters escaped, cut (logged_path)
        path = logged_path(request.url.path)
        log.exception("unhandled error serving %s %s", request.method, path)
        return problem(500, "Internal Server Error", "The gateway failed; see its log.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        answer = problem(exc.status_code, status_phrase(exc.status_code), str(exc.detail))
        answer.headers.update(exc.headers or {})  # e.g. Allow on 405 (RFC 9110)
        if exc.status_code == 405:  # every method of the path, not only its first route's
            # (a mounted app's path matches no route here: the Allow it gave stays)
            answer.headers["Allow"] = _allowed_methods(request) or answer.headers.get("Allow", "")
        return answer

    return app


_BAD_REQUEST: dict[str, Any] = {
    "description": "The request is not valid (RFC 9457 problem body)",
    "content": {
        "application/problem+json": {
            "schema": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "errors": {"type": "array", "items": {"type": "object"}},
                },
            }
        }
    },
}


def _errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """The ``errors`` of a validation refusal: ``{loc, msg}`` each, ``loc`` the dotted path
    whose parts are cut as :func:`gateway.protocol.clipped` does (an unknown field's
    name is the client's)."""
    return [
        {
            "loc": ".".join(clipped(p, quote=False) for p in e.get("loc", ())),
            "msg": str(e.get("msg", "")),
        }
        for e in exc.errors()
    ]


def _unknown_fields(exc: RequestValidationError) -> dict[str, tuple[str | int, ...]]:
    """The dotted paths in the body of the unknown fields that a model refusing them
    (``extra="forbid"``: the admin bodies) found, in order, each with its ``loc`` in the
    body; empty when none."""
    return {
        ".".join(str(p) for p in e["loc"][1:]): tuple(e["loc"][1:])
        for e in exc.errors()
        if e.get("type") == "extra_forbidden" and e.get("loc", ())[:1] == ("body",)
    }


def _documented_names(request: Request, extra: Mapping[str, Sequence[str | int]]) -> dict[str, str]:
    """The documented spellings of those unknown fields ``extra`` (dotted path -> body
    ``loc``) that are the Python (snake_case) names of the route's body model's fields
    (:func:`gateway.admin.documented_name`), by dotted path."""
    body = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body, "field_info", None), "annotation", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return {}
    found = {path: documented_name(model, loc) for path, loc in extra.items()}
    return {path: name for path, name in found.items() if name is not None}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405: every method some route of the request's path takes."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


class _SlashForms:
    """The router's ``default`` (called when no route matched): a request whose path ends
    with ``/`` (``/client/``, ``/twilio/status/``, ``/alexa/``: a webhook URL a platform
    was configured with) is routed again without its trailing slashes, HTTP and
    WebSocket alike; anything else (and a slash form that matches nothing either) goes
    to ``not_found``, the gateway's 404 problem body.

    Starlette's ``redirect_slashes`` answered such a request with a 307 whose Location
    was built from the Host header and scheme the gateway saw (``http://`` behind a TLS
    proxy, any client's Host), which most webhook clients do not follow with their
    body. ``raw_path`` keeps the path as sent (its slash): URL signatures are checked
    against it (:func:`gateway.httputil.sent_path`)."""

    def __init__(self, route: ASGIApp, not_found: ASGIApp) -> None:
        self.route = route
        self.not_found = not_found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and len(path) > 1 and path.endswith("/"):
            bare = path.rstrip("/")
            if bare and bare != scope.get("root_path", "").rstrip("/"):
                scope["path"] = bare
                await self.route(scope, receive, send)
                return
        await self.not_found(scope, receive, send)
