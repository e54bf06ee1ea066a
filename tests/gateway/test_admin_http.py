"""The operator-facing HTTP answers (the admin API under ``/v1/``, ``/metrics``) through a
real gateway served by uvicorn, on a real Redis: what they tell caches; and the request
id the gateway takes from a client (RequestIdMiddleware)."""

from __future__ import annotations

import re
from typing import Any

import httpx
from pydantic import SecretStr
from websockets.asyncio.client import connect

from gateway.app import create_app
from gateway.settings import Settings
from tests.adapters.flowstorm.v1.helpers import ws_url
from tests.calls.test_call_outcomes import AUTHORIZED, twilio_placing, twilio_status
from tests.conftest import served, served_app
from tests.gateway.test_push import ADMIN, AUTH, hello

METRICS_TOKEN = "metrics-token-for-tests"


async def test_admin_and_metrics_answers_are_never_stored_by_a_cache(
    redis_url: str, redis_prefix: str
) -> None:
    """The session view and a push's answer carry the session id (the bearer credential of
    Flowstorm clients) and its app key, ``/metrics`` what the token guards: each answer,
    a refusal too, says ``Cache-Control: no-store`` (RFC 9111 section 5.2.2.5), so no
    browser or proxy cache keeps it. They said nothing; the channels' own answers are
    left as they were."""
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "admin_keys": frozenset({ADMIN}),
        "metrics_token": SecretStr(METRICS_TOKEN),
    }
    metrics = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with served(**settings) as url, httpx.AsyncClient(base_url=url) as client:
        async with connect(ws_url(url)) as ws:
            await hello(ws, "no-store-1")
        answers = {
            "view": await client.get("/v1/sessions/no-store-1", headers=AUTH),
            "view HEAD": await client.head("/v1/sessions/no-store-1", headers=AUTH),
            "unknown session": await client.get("/v1/sessions/nobody", headers=AUTH),
            "push": await client.post(
                "/v1/push",
                json={"target": {"sessionId": "no-store-1"}, "items": [{"text": "Hi."}]},
                headers=AUTH,
            ),
            "no key": await client.get("/v1/sessions/no-store-1"),
            "bad body": await client.post("/v1/push", content=b"{", headers=AUTH),
            "405": await client.delete("/v1/sessions/no-store-1", headers=AUTH),
            "metrics": await client.get("/metrics", headers=metrics),
            "metrics HEAD": await client.head("/metrics", headers=metrics),
            "metrics refused": await client.get("/metrics"),
        }
        statuses = {name: answer.status_code for name, answer in answers.items()}
        assert statuses == {
            "view": 200,
            "view HEAD": 200,
            "unknown session": 404,
            "push": 202,
            "no key": 401,
            "bad body": 415,
            "405": 405,
            "metrics": 200,
            "metrics HEAD": 200,
            "metrics refused": 401,
        }
        assert answers["view"].json()["sessionId"] == "no-store-1"
        for name, answer in answers.items():
            assert answer.headers.get_list("cache-control") == ["no-store"], name
        # a channel's answer and the health probes are not the admin API's: unchanged
        for path in ("/healthz", "/readyz"):
            assert "cache-control" not in (await client.get(path)).headers, path

    async with twilio_placing() as (client, _):
        body = {"carrier": "twilio", "to": "+15550100", "from": "+15550199", "appKey": "twilio"}
        placed = await client.post("/v1/calls", json=body, headers=AUTHORIZED)
        assert placed.status_code == 201, placed.text
        sid = placed.json()["callId"]
        assert await twilio_status(client, sid, "busy") == 204
        outcome = await client.get(f"/v1/calls/{sid}", headers=AUTHORIZED)
        assert outcome.status_code == 200, outcome.text
        for answer in (placed, outcome):
            assert answer.headers.get_list("cache-control") == ["no-store"], answer.url


async def test_admin_and_metrics_answers_under_a_root_path_are_never_stored(
    redis_url: str, redis_prefix: str
) -> None:
    """Served under a proxy's prefix (uvicorn ``root_path``: the ASGI path is
    ``/gw/metrics``), ``/metrics`` and the admin API's answers said no ``Cache-Control``:
    the no-store paths were compared with the path, prefix included. They are compared
    with the route's path now; the probes are still left alone."""
    settings = Settings().model_copy(
        update={
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "admin_keys": frozenset({ADMIN}),
            "metrics_token": SecretStr(METRICS_TOKEN),
        }
    )
    metrics = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with (
        served_app(create_app(settings), settings, root_path="/gw") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answers = {
            "metrics": await client.get("/metrics", headers=metrics),
            "metrics HEAD": await client.head("/metrics", headers=metrics),
            "metrics slash": await client.get("/metrics/", headers=metrics),
            "metrics refused": await client.get("/metrics"),
            "unknown session": await client.get("/v1/sessions/nobody", headers=AUTH),
            "no key": await client.get("/v1/sessions/nobody"),
        }
        statuses = {name: answer.status_code for name, answer in answers.items()}
        assert statuses == {
            "metrics": 200,
            "metrics HEAD": 200,
            "metrics slash": 200,
            "metrics refused": 401,
            "unknown session": 404,
            "no key": 401,
        }
        for name, answer in answers.items():
            assert answer.headers.get_list("cache-control") == ["no-store"], name
        for path in ("/healthz", "/readyz"):
            assert "cache-control" not in (await client.get(path)).headers, path


async def test_a_request_id_with_a_line_break_is_not_taken() -> None:
    """``X-Request-Id`` is taken when it is 1-128 characters of ``[A-Za-z0-9._:-]``; the
    check's ``$`` also matched before a final line feed, so ``abc\\n`` was taken and
    echoed, a raw LF in the answer's header (and in the id sent to the core and written
    in the log lines). uvicorn's parsers refuse such a header line, so this drives the
    ASGI app directly, as another ASGI server would: the id is a new one now."""
    app = create_app(Settings())
    transport = httpx.ASGITransport(app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        taken = await client.get("/healthz", headers={"X-Request-Id": "req-7"})
        assert taken.headers.get_list("x-request-id") == ["req-7"]
        for given in ("abc\n", "abc\r\n", "\nabc", "a" * 128 + "\n"):
            answer = await client.get("/healthz", headers={"X-Request-Id": given})
            assert answer.status_code == 200
            (made,) = answer.headers.get_list("x-request-id")
            assert made != given
            assert re.fullmatch(r"[0-9a-f]{32}", made), (given, made)


async def test_a_session_whose_id_holds_a_slash_is_viewed(
    redis_url: str, redis_prefix: str
) -> None:
    """Flowstorm V1 takes a session id with ``/`` in it (``team/a``), and the push API
    reaches it, but ``GET /v1/sessions/team%2Fa`` was the router's bare 404 ``Not Found``
    (the decoded ``/`` split the path, so no route matched) rather than the session's view.
    The view now takes the rest of the path as the id, encoded or not."""
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "admin_keys": frozenset({ADMIN}),
    }
    async with served(**settings) as url, httpx.AsyncClient(base_url=url) as client:
        async with connect(ws_url(url)) as ws:
            await hello(ws, "team/a")
        for path in ("/v1/sessions/team%2Fa", "/v1/sessions/team/a"):
            view = await client.get(path, headers=AUTH)
            assert view.status_code == 200, (path, view.text)
            assert view.json()["sessionId"] == "team/a"
            head = await client.head(path, headers=AUTH)
            assert head.status_code == 200, path
        unknown = await client.get("/v1/sessions/team/b", headers=AUTH)
        assert unknown.status_code == 404
        assert unknown.json()["detail"] == "No session has this id."
        assert (await client.get("/v1/sessions/team/a")).status_code == 401  # no key
