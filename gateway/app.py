"""``create_app(settings)``: the FastAPI application with every channel wired in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from adapters.alexa.routes import router as alexa_router
from adapters.flowstorm_v1.routes import router as flowstorm_v1_router
from adapters.flowstorm_v2.routes import router as flowstorm_v2_router
from adapters.google.routes import router as google_router
from gateway.bus import Bus, MemoryBus, RedisBus
from gateway.conversation import Conversation
from gateway.deps import Gateway, gateway_of
from gateway.files import router as files_router
from gateway.httputil import problem
from gateway.metrics import REGISTRY
from gateway.middleware import RequestIdMiddleware
from gateway.pipeline import make_pipeline
from gateway.pipeline.http import PipelineRequest, PipelineResponse
from gateway.sessions import RedisSessionStore, StoreUnavailable, make_store
from gateway.settings import Settings
from gateway.speech.service import make_speech

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app for ``settings`` (read from the environment when omitted).

    The store, pipeline and turn engine are made when the app starts (lifespan)
    and closed when it stops, after running turns have finished (bounded by
    GATEWAY_TURN_TIMEOUT_S).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = make_store(
            settings.redis_url, settings.redis_prefix, settings.redis_max_connections
        )
        redis = store.redis if isinstance(store, RedisSessionStore) else None
        bus: Bus = RedisBus(redis, prefix=settings.redis_prefix) if redis else MemoryBus()
        speech = make_speech(settings, redis)
        pipeline = make_pipeline(settings)
        conversation = Conversation(store, pipeline, settings, speech)
        warming = asyncio.create_task(speech.warm_up()) if settings.speech_warm_up else None
        app.state.gateway = Gateway(settings, store, pipeline, conversation, speech, bus)
        log.info(
            "gateway ready: store=%s pipeline=%s",
            type(store).__name__,
            pipeline.name,
        )
        try:
            yield
        finally:
            left = await conversation.drain(settings.turn_timeout_s + 1)
            if left:
                log.warning("%d turns were still running at shutdown", left)
            if warming is not None:
                warming.cancel()
            await pipeline.aclose()
            await speech.aclose()
            await bus.aclose()
            await store.aclose()

    app = FastAPI(
        title="Channel gateway",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(flowstorm_v2_router)
    app.include_router(flowstorm_v1_router)
    app.include_router(files_router)
    # voice assistants; their routers' lifespans make the verifiers and log startup warnings
    app.include_router(alexa_router)
    app.include_router(google_router)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics of this process",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="The session store is reachable",
        responses={503: {"description": "The session store does not answer"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        try:
            await gateway_of(request).store.ping()
        except StoreUnavailable as exc:
            return problem(503, "Not ready", str(exc))
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
            "ErrorEvent with source `pipeline`."
        ),
        response_model=PipelineResponse,
    )
    def pipeline_turn(body: PipelineRequest) -> None:  # documentation only
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(400, "Bad request", "The request is not valid.", errors=_errors(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return problem(500, "Internal Server Error", "The gateway failed; see its log.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, _title(exc.status_code), str(exc.detail))

    return app


def _errors(exc: RequestValidationError) -> list[dict[str, str]]:
    return [
        {"loc": ".".join(str(p) for p in e.get("loc", ())), "msg": str(e.get("msg", ""))}
        for e in exc.errors()
    ]


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
