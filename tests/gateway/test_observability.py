"""/metrics after real turns (no ``_created`` series; GATEWAY_METRICS_TOKEN), and the JSON
log format."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
import pytest
from pydantic import SecretStr

from gateway.app import create_app
from gateway.logs import JsonFormatter, session_ref
from gateway.pipeline.base import REQUEST_ID
from gateway.settings import Settings
from tests.adapters.alexa.test_routes import envelope
from tests.conftest import gateway, gateway_app, serve, served_app, settled

METRICS_TOKEN = "metrics-token-of-this-test"
ADMIN_KEY = "admin-key-of-this-test"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")):
            got = line[len(name) :].split(" ")[0].strip("{}")
            if ",".join(sorted(got.split(","))) == wanted or not labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_turns_errors_and_redis(redis_url: str, redis_prefix: str) -> None:
    async with (
        gateway(redis_url=redis_url, redis_prefix=redis_prefix) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        before = (await client.get("/metrics")).text
        text = {"Content-Type": "text/plain"}
        await client.put("/client?key=k", headers=text, content="hello")
        client.cookies.set("flowstorm-session-id", "gone")
        await client.put("/client?key=k", headers=text, content="hello")  # rejected: unknown
        after = await client.get("/metrics")
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    body = after.text

    def grew(name: str, **labels: str) -> float:
        return sample(body, name, **labels) - sample(before, name, **labels)

    assert grew("gateway_turns_total", channel="flowstorm_v2", outcome="ok") == 1
    assert grew("gateway_turns_total", channel="flowstorm_v2", outcome="rejected") == 1
    assert grew("gateway_errors_total", channel="flowstorm_v2", source="session") == 1
    assert grew("gateway_sessions_started_total", channel="flowstorm_v2") == 1
    assert grew("gateway_turn_seconds_count", channel="flowstorm_v2") == 1
    assert grew("gateway_redis_seconds_count", op="acquire") >= 2
    assert grew("gateway_redis_seconds_count", op="release") >= 2
    assert sample(body, "gateway_turns_in_flight") == 0


async def test_a_session_the_platform_ends_is_counted_as_ended() -> None:
    """gateway_sessions_ended_total counted only sessions a turn's Response ended; one the
    platform ended (Alexa's SessionEndedRequest, a call hung up: Conversation.end) was
    never counted, so for calls the counter hardly moved. It is counted once; ending
    it again (it is gone) counts nothing."""
    sid = "amzn1.echo-api.session.metrics-ended"
    async with (
        gateway_app(alexa_verify=False) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        before = (await client.get("/metrics")).text
        assert (await client.post("/alexa", json=envelope(sid, text="hi"))).status_code == 200
        for _ in range(2):
            ended = await client.post("/alexa", json=envelope(sid, kind="SessionEndedRequest"))
            assert ended.status_code == 200
        await settled(app)  # both ends done (one may finish after its answer)
        after = (await client.get("/metrics")).text
    for name in ("gateway_sessions_started_total", "gateway_sessions_ended_total"):
        grew = sample(after, name, channel="alexa") - sample(before, name, channel="alexa")
        assert grew == 1, name


def test_json_log_lines_carry_structured_fields() -> None:
    record = logging.LogRecord(
        "gateway.conversation", logging.INFO, __file__, 1, "turn %s", ("ok",), None
    )
    record.channel = "alexa"
    record.session_id = "s-1"
    record.turn = 3
    record.latency_ms = 12.5
    token = REQUEST_ID.set("req-7")
    try:
        line = JsonFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(line)
    assert entry["message"] == "turn ok"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "gateway.conversation"
    assert entry["request_id"] == "req-7"
    assert (entry["channel"], entry["session"], entry["turn"], entry["latency_ms"]) == (
        "alexa",
        session_ref("s-1"),  # never the id itself (a bearer credential)
        3,
        12.5,
    )
    assert "session_id" not in entry
    assert entry["time"].endswith("+00:00")


def test_json_log_lines_carry_no_ansi_colour_template() -> None:
    """uvicorn's records carry ``color_message`` (the message template with ANSI colour
    codes, for its console formatter): the JSON line had it as a field
    (``"color_message": "Started server process [\\u001b[36m%d\\u001b[0m]"``)."""
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None
    )
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    line = JsonFormatter().format(record)
    assert "\\u001b" not in line
    assert json.loads(line)["message"] == "Started server process [42]"
    assert "color_message" not in json.loads(line)


async def test_connections_gauge_counts_open_v1_sockets() -> None:
    from websockets.asyncio.client import connect

    async with gateway() as url, httpx.AsyncClient(base_url=url) as client:
        before = sample(
            (await client.get("/metrics")).text, "gateway_connections", channel="flowstorm_v1"
        )
        async with connect(url.replace("http", "ws") + "/socket") as ws:
            await ws.send('{"type":"Init","key":"k","deviceId":"d","config":{}}')
            await ws.recv()  # Ready: the connection is being served
            during = sample(
                (await client.get("/metrics")).text, "gateway_connections", channel="flowstorm_v1"
            )
        for _ in range(100):  # the server notices the close a moment later
            after = sample(
                (await client.get("/metrics")).text, "gateway_connections", channel="flowstorm_v1"
            )
            if after == before:
                break
            await asyncio.sleep(0.02)
    assert during == before + 1
    assert after == before


async def test_metrics_take_each_of_several_tokens() -> None:
    """GATEWAY_METRICS_TOKEN held one token: rotating it refused the scrapers (401) until
    each had the new one. With two (the old and the new, comma-separated) each is taken;
    another token is still the 401 ``invalid_token`` problem, a missing one the bare
    challenge."""
    old, new = METRICS_TOKEN, "metrics-token-after-rotation"
    async with (
        gateway(metrics_token=SecretStr(f"{old}, {new}")) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for method in ("GET", "HEAD"):
            for token in (old, new):
                right = await client.request(
                    method, "/metrics", headers={"Authorization": f"Bearer {token}"}
                )
                assert right.status_code == 200, (method, token)
            for guess in (f"{old},{new}", new + "x", old[:-1]):
                refused = await client.request(
                    method, "/metrics", headers={"Authorization": f"Bearer {guess}"}
                )
                assert refused.status_code == 401, (method, guess)
                assert refused.headers["www-authenticate"] == (
                    'Bearer realm="gateway-metrics", error="invalid_token"'
                )
        body = await client.get("/metrics", headers={"Authorization": f"Bearer {new}"})
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer not-a-token"})
        missing = await client.get("/metrics")
    assert "gateway_turns_in_flight" in body.text
    assert wrong.headers["content-type"] == "application/problem+json"
    assert wrong.json() == {
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "detail": "The metrics token is not valid.",
    }
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="gateway-metrics"'


async def test_more_than_one_authorization_header_on_metrics_is_an_invalid_request() -> None:
    """With several ``Authorization`` headers /metrics took the first: the right token
    followed by a wrong one was let through (and a wrong one first was counted as a guess
    though the right one came with it). As the admin API (RFC 6750 section 3.1: more
    than one credential is a malformed request), GET and HEAD now answer 400
    ``invalid_request`` in /metrics' problem form, whichever order and tokens, and take
    nothing from the address's allowance of wrong tokens."""
    wrong = "a-wrong-metrics-token"
    twice = ((METRICS_TOKEN, wrong), (wrong, METRICS_TOKEN), (METRICS_TOKEN, METRICS_TOKEN))
    async with (
        gateway(metrics_token=SecretStr(METRICS_TOKEN), admin_failures_burst=1) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for method in ("GET", "HEAD"):
            for first, second in twice:
                headers = [
                    ("Authorization", f"Bearer {first}"),
                    ("Authorization", f"Bearer {second}"),
                ]
                answer = await client.request(method, "/metrics", headers=headers)
                assert answer.status_code == 400, (method, first, answer.text)
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.headers["www-authenticate"] == (
                    'Bearer realm="gateway-metrics", error="invalid_request"'
                )
                if method == "GET":
                    assert answer.json() == {
                        "type": "about:blank",
                        "title": "Bad Request",
                        "status": 400,
                        "detail": "The request has more than one Authorization header: "
                        "send exactly one.",
                    }
        # one header with the right token is answered: no guess was counted (burst 1)
        right = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert right.status_code == 200, right.text


def _too_many_tokens(answer: httpx.Response) -> int:
    """Check ``answer`` is /metrics' 429 for too many wrong tokens, in the admin API's form
    (problem body, ``Retry-After``, no challenge); its ``Retry-After`` (s)."""
    assert answer.status_code == 429, (answer.status_code, answer.text)
    assert answer.headers["content-type"] == "application/problem+json"
    assert "www-authenticate" not in answer.headers
    retry = int(answer.headers["retry-after"])
    assert answer.json() == {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": f"Too many wrong metrics tokens from this address: retry after {retry} s.",
    }
    return retry


async def test_wrong_metrics_tokens_from_one_address_are_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/metrics did not slow wrong tokens down (every one a 401, however many), so a token
    could be guessed at full speed. Now each wrong token takes one of
    GATEWAY_ADMIN_FAILURES_BURST from the client address's allowance (refilled at
    GATEWAY_ADMIN_FAILURES_PER_S) as a wrong admin key does; once it is used up, every
    /metrics request of that address, GET or HEAD, the right token too, is answered 429
    with ``Retry-After`` in the admin API's problem form, before the token is looked at.
    Requests without a token or with the right one take nothing; the right token from
    another address is answered; the admin keys' allowance is a table of its own."""
    caplog.set_level(logging.DEBUG, logger="gateway.metrics")
    settings = Settings(
        metrics_token=SecretStr(METRICS_TOKEN),
        admin_keys=frozenset({ADMIN_KEY}),
        admin_failures_burst=3,
        admin_failures_per_s=0.01,
    )
    app = create_app(settings)
    right = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    wrong = {"Authorization": "Bearer a-wrong-metrics-token"}
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for _ in range(5):  # neither a missing token nor the right one is counted
            assert (await http.get("/metrics")).status_code == 401
            assert (await http.get("/metrics", headers=right)).status_code == 200
        for method in ("GET", "HEAD", "GET"):  # the allowance: three guesses
            assert (await http.request(method, "/metrics", headers=wrong)).status_code == 401
        for headers in (wrong, right, {}):
            for method in ("GET", "HEAD"):
                answer = await http.request(method, "/metrics", headers=headers)
                if method == "GET":
                    assert 90 <= _too_many_tokens(answer) <= 100, headers  # 1 token at 0.01/s
                else:
                    assert answer.status_code == 429
                    assert 90 <= int(answer.headers["retry-after"]) <= 100
        # the admin API of that address keeps its own allowance
        admin = await http.get("/v1/sessions/s1", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.status_code == 404, admin.text
        # another client address (the same app, through ASGI) is not limited
        other = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=other, base_url="http://gw") as elsewhere:
            assert (await elsewhere.get("/metrics", headers=right)).status_code == 200
            assert (await elsewhere.get("/metrics", headers=wrong)).status_code == 401
    assert set(app.state.metrics_failures._buckets) == {"127.0.0.1", "203.0.113.7"}
    document = app.openapi()  # the 429 is documented, with its Retry-After
    for method in ("get", "head"):
        documented = document["paths"]["/metrics"][method]["responses"]["429"]
        assert set(documented["headers"]) == {"Retry-After"}
        assert set(documented["content"]) == {"application/problem+json"}
    assert getattr(app.state, "admin_failures", None) is None or not len(app.state.admin_failures)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.metrics"]
    assert lines[-1] == (
        "Metrics request from 203.0.113.7 refused (401): The metrics token is not valid."
    )
    assert lines[-2].startswith(
        "Metrics request from 127.0.0.1 refused (429): Too many wrong metrics tokens"
    )
    assert not [line for line in lines if METRICS_TOKEN in line]


async def test_wrong_metrics_tokens_are_counted_per_ipv6_64_and_per_ipv4_address() -> None:
    """The /metrics limiter counts an IPv6 client by its /64 (the block one host gets,
    whose 2**64 addresses it may use in turn: counted per address, it would take a new
    allowance with each), an IPv4 client by its address, an IPv4-mapped IPv6 address as
    its IPv4 one. The addresses come as a trusted proxy's X-Forwarded-For
    (FORWARDED_ALLOW_IPS) and as the ASGI scope's client."""
    settings = Settings(
        metrics_token=SecretStr(METRICS_TOKEN), admin_failures_burst=2, admin_failures_per_s=0.01
    )
    app = create_app(settings)
    served = served_app(app, settings, forwarded_allow_ips="127.0.0.1")
    async with served as url, httpx.AsyncClient(base_url=url) as http:

        async def from_(address: str, token: str) -> httpx.Response:
            return await http.get(
                "/metrics",
                headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": address},
            )

        for address in ("2001:db8:1:2::a", "2001:db8:1:2:8000::b"):  # one /64
            assert (await from_(address, "a-wrong-metrics-token")).status_code == 401
        for address in ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2::c"):
            _too_many_tokens(await from_(address, METRICS_TOKEN))
        assert (await from_("2001:db8:1:3::a", METRICS_TOKEN)).status_code == 200  # next /64
        for address in ("198.51.100.1", "::ffff:198.51.100.1"):  # one IPv4 client
            assert (await from_(address, "a-wrong-metrics-token")).status_code == 401
        _too_many_tokens(await from_("198.51.100.1", METRICS_TOKEN))
        _too_many_tokens(await from_("::ffff:c633:6401", METRICS_TOKEN))  # the same, mapped
        assert (await from_("198.51.100.2", METRICS_TOKEN)).status_code == 200  # per address
        # the ASGI scope's client: peers of one /64 share the allowance used above
        for peer, status in (("2001:db8:1:2::99", 429), ("2001:db8:1:4::1", 200)):
            asgi = httpx.ASGITransport(app=app, client=(peer, 40000))
            async with httpx.AsyncClient(transport=asgi, base_url="http://gw") as direct:
                answer = await direct.get(
                    "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
                )
                assert answer.status_code == status, peer
    assert set(app.state.metrics_failures._buckets) == {"2001:db8:1:2::/64", "198.51.100.1"}


async def test_metrics_have_no_created_series() -> None:
    """prometheus-client exported a ``*_created`` series beside every counter and
    histogram child (``gateway_turns_created{channel="flowstorm_v2",outcome="ok"}
    1.7e+09``, with its own HELP and TYPE): one more series each in Prometheus, used by
    nothing. The gateway turns them off (gateway/metrics.py)."""
    async with gateway() as url, httpx.AsyncClient(base_url=url) as client:
        text = {"Content-Type": "text/plain", "X-Tts": "None"}
        assert (await client.put("/client?key=k", headers=text, content="hi")).status_code == 200
        body = (await client.get("/metrics")).text
    assert sample(body, "gateway_turns_total", channel="flowstorm_v2", outcome="ok") >= 1
    assert sample(body, "gateway_turn_seconds_count", channel="flowstorm_v2") >= 1
    assert [line for line in body.splitlines() if "_created" in line] == []


async def test_metrics_with_a_token_answer_only_its_bearer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/metrics answered anyone who reached the public port (sessions, error rates,
    channels, latency). With GATEWAY_METRICS_TOKEN set, GET and HEAD need it as a bearer
    token: without it, 401 with the Bearer challenge; with another token (an admin key
    too), 401 ``invalid_token``; problem bodies as the gateway's other refusals, each
    logged without the token sent."""
    caplog.set_level(logging.DEBUG, logger="gateway.metrics")
    async with (
        gateway(metrics_token=SecretStr(METRICS_TOKEN), admin_keys=frozenset({ADMIN_KEY})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for method in ("GET", "HEAD"):
            for authorization in (None, f"Basic {METRICS_TOKEN}", "Bearer"):
                headers = {"Authorization": authorization} if authorization else {}
                missing = await client.request(method, "/metrics", headers=headers)
                assert missing.status_code == 401, (method, authorization)
                assert missing.headers["www-authenticate"] == 'Bearer realm="gateway-metrics"'
                assert missing.headers["content-type"] == "application/problem+json"
            for wrong in (METRICS_TOKEN + "x", METRICS_TOKEN[:-1], ADMIN_KEY):
                refused = await client.request(
                    method, "/metrics", headers={"Authorization": f"Bearer {wrong}"}
                )
                assert refused.status_code == 401, (method, wrong)
                assert refused.headers["www-authenticate"] == (
                    'Bearer realm="gateway-metrics", error="invalid_token"'
                )
                assert "gateway_turns" not in refused.text
            right = await client.request(
                method, "/metrics", headers={"Authorization": f"bearer  {METRICS_TOKEN}"}
            )
            assert right.status_code == 200, method
            assert right.headers["content-type"].startswith("text/plain")
        missing = await client.get("/metrics")
        body = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert (await client.get("/healthz")).status_code == 200  # the probes stay open
    assert missing.json() == {
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "detail": "Expected `Authorization: Bearer <metrics token>`.",
    }
    assert "gateway_turns_in_flight" in body.text
    refusals = [r.getMessage() for r in caplog.records if r.name == "gateway.metrics"]
    assert len(refusals) == 2 * 6 + 1, refusals
    assert all(m.startswith("Metrics request from 127.0.0.1 refused (401): ") for m in refusals)
    assert not [m for m in refusals if METRICS_TOKEN in m or ADMIN_KEY in m]


async def test_an_unhandled_error_s_500_and_its_log_line_carry_the_request_id() -> None:
    # The 500 of an unhandled error is answered by Starlette's ServerErrorMiddleware (the
    # app's Exception handler), which ran outside RequestIdMiddleware: the answer had no
    # X-Request-Id and its ERROR line no request_id (the id was reset by then), though
    # that is the answer whose log line an operator most needs to find.
    app = create_app(Settings())

    async def broken() -> None:  # a route with a bug: what the 500 handler is there for
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    app_log = logging.getLogger("gateway.app")
    app_log.addHandler(handler)
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            given = await client.get("/broken", headers={"X-Request-Id": "req-of-a-bug"})
            made = await client.get("/broken")
    finally:
        app_log.removeHandler(handler)
    assert given.status_code == made.status_code == 500
    assert given.headers["content-type"] == "application/problem+json"
    assert given.headers["x-request-id"] == "req-of-a-bug"
    made_id = made.headers["x-request-id"]
    assert len(made_id) == 32
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    failures = [e for e in entries if e["message"] == "unhandled error serving GET /broken"]
    assert [e.get("request_id") for e in failures] == ["req-of-a-bug", made_id]
    assert all("RuntimeError: a bug" in e["exc"] for e in failures)


async def test_a_direct_turn_routes_unhandled_error_is_the_apps_500_with_the_request_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # POST /alexa is called by RequestIdMiddleware itself (a direct endpoint). Since the
    # middleware wraps the whole stack (ServerErrorMiddleware too), a bug in such an
    # endpoint went past the app's 500 handler: uvicorn answered its own text/plain 500,
    # with no X-Request-Id and no 'unhandled error serving' line
    settings = Settings(alexa_verify=False)
    app = create_app(settings)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    app_log = logging.getLogger("gateway.app")
    app_log.addHandler(handler)

    def broken_turn(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            monkeypatch.setattr(app.state.gateway.conversation, "turn", broken_turn)
            answer = await client.post(
                "/alexa",
                content=json.dumps(envelope("S-bug", text="hi")).encode(),
                headers={"X-Request-Id": "req-of-an-alexa-bug"},
            )
    finally:
        app_log.removeHandler(handler)
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers.get_list("x-request-id") == ["req-of-an-alexa-bug"]
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    failures = [e for e in entries if e["message"] == "unhandled error serving POST /alexa"]
    assert [e.get("request_id") for e in failures] == ["req-of-an-alexa-bug"]
    assert "RuntimeError: a bug" in failures[0]["exc"]
