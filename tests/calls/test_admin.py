"""The admin-key check of gateway/admin.py and its setting."""

from __future__ import annotations

import logging

import httpx
import pytest
from pydantic import SecretStr

from gateway.admin import MAX_TRACKED_ADDRESSES, AdminRefused, bearer_token, check_admin_key
from gateway.app import create_app
from gateway.protocol import key_valid
from gateway.ratelimit import LOGGED_REFUSALS_BURST, MAX_CLIENT_CHARS, RefusalLog, TokenBuckets
from gateway.settings import Settings
from tests.conftest import served, served_app

ADMIN_OPERATIONS = (
    ("post", "/v1/push"),
    ("get", "/v1/sessions/{session_id}"),
    ("post", "/v1/calls"),
    ("get", "/v1/calls/{callId}"),
    ("head", "/v1/sessions/{session_id}"),
    ("head", "/v1/calls/{callId}"),
)
"""The operations of the admin API (method, OpenAPI path): HEAD of the two views too
(cb7a502)."""


def test_bearer_tokens() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_admin_keys_are_checked_and_none_configured_refuses_all() -> None:
    """No token: 401 with a bare Bearer challenge; a wrong key: 401 ``invalid_token``
    (RFC 6750 section 3.1); no keys configured: 403 without a challenge."""
    keys = frozenset({"k1", "k2"})
    check_admin_key(keys, "Bearer k2")
    with pytest.raises(AdminRefused) as missing:
        check_admin_key(keys, None)
    assert missing.value.status == 401
    assert missing.value.challenge == 'Bearer realm="gateway-admin"'
    for wrong_key in ("Bearer k3", "Bearer k1k2", "Bearer K1"):
        with pytest.raises(AdminRefused) as wrong:
            check_admin_key(keys, wrong_key)
        assert wrong.value.status == 401
        assert wrong.value.challenge == 'Bearer realm="gateway-admin", error="invalid_token"'
    with pytest.raises(AdminRefused) as unset:
        check_admin_key(frozenset(), "Bearer k1")
    assert unset.value.status == 403
    assert unset.value.challenge is None


def test_gateway_admin_keys_is_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", " admin-key-one-0001, admin-key-two-0002 ,,")
    assert Settings().admin_keys == frozenset({"admin-key-one-0001", "admin-key-two-0002"})


def test_refusals_are_logged_at_warning_in_a_burst_then_once_a_minute() -> None:
    now = [0.0]
    refusals = RefusalLog(burst=2, every_s=60, clock=lambda: now[0])
    assert [refusals.level() for _ in range(4)] == [
        (logging.WARNING, 0),
        (logging.WARNING, 0),
        (logging.DEBUG, 0),
        (logging.DEBUG, 0),
    ]
    now[0] = 61.0  # a token again: the WARNING line counts those logged at DEBUG
    assert refusals.level() == (logging.WARNING, 2)
    assert refusals.level() == (logging.DEBUG, 0)


async def test_a_client_hammering_the_admin_api_with_a_bad_key_does_not_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every refused POST /v1/calls was a WARNING line: a client sending a wrong key in a
    loop wrote one per request. POST /v1/push and GET /v1/sessions logged none. Now every
    admin refusal is logged, the first LOGGED_REFUSALS_BURST at WARNING (the path, the
    peer, why; never the key), the rest at DEBUG until a minute has passed."""
    caplog.set_level(logging.DEBUG, logger="gateway.admin")
    wrong = {"Authorization": "Bearer not-the-key", "Content-Type": "application/json"}
    async with (  # (wrong keys past the limiter's burst would get 429: see below)
        served(admin_keys=frozenset({"the-admin-key-of-tests"}), admin_failures_burst=100) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for _ in range(20):
            answer = await http.post("/v1/calls", json={"carrier": "twilio"}, headers=wrong)
            assert answer.status_code == 401
        assert (await http.post("/v1/push", json={}, headers=wrong)).status_code == 401
        viewed = await http.get("/v1/sessions/secret-session-id", headers=wrong)
        assert viewed.status_code == 401
    lines = [r for r in caplog.records if r.name == "gateway.admin"]
    assert len(lines) == 22  # each refusal, /v1/push's and /v1/sessions' included
    warnings = [r for r in lines if r.levelno == logging.WARNING]
    assert len(warnings) == LOGGED_REFUSALS_BURST
    assert all(r.levelno == logging.DEBUG for r in lines[LOGGED_REFUSALS_BURST:])
    first = warnings[0].getMessage()
    assert first.startswith("Admin request /v1/calls from 127.0.0.1 refused (401): ")
    assert "not-the-key" not in first
    assert "secret-session-id" not in lines[-1].getMessage()
    assert "/v1/push" in lines[-2].getMessage()
    assert "/v1/sessions/*** " in lines[-1].getMessage()  # a session id is a credential


async def test_the_first_admin_refusal_a_minute_later_counts_those_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The admin refusals are the app's ``admin`` refusal_log: after a minute the next
    refusal is a WARNING again, saying how many were logged at DEBUG since."""
    caplog.set_level(logging.DEBUG, logger="gateway.admin")
    now = [0.0]
    settings = Settings(admin_keys=frozenset({"the-admin-key-of-tests"}))
    app = create_app(settings)
    app.state.refusal_logs = {"admin": RefusalLog(clock=lambda: now[0])}
    wrong = {"Authorization": "Bearer not-the-key"}
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for _ in range(LOGGED_REFUSALS_BURST + 3):
            assert (await http.post("/v1/push", json={}, headers=wrong)).status_code == 401
        now[0] += 61.0
        caplog.clear()
        assert (await http.post("/v1/push", json={}, headers=wrong)).status_code == 401
    (line,) = [r for r in caplog.records if r.name == "gateway.admin"]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        "Admin request /v1/push from 127.0.0.1 refused (401): The admin key is not valid."
        " (3 more refused since, logged at DEBUG)"
    )


async def test_a_settings_copy_with_other_keys_checks_its_own_keys() -> None:
    """Settings hash their admin keys, metrics tokens and Voiceflow API keys once, at
    construction (Settings.admin_key_digests ...), not at each check. A copy made with
    ``model_copy(update=...)`` (no validation, no construction: how the test helpers
    and operators' scripts derive settings) with other keys checks the copy's keys,
    over real HTTP; the original keeps its own."""
    old_admin, new_admin = "old-admin-key-0001", "new-admin-key-0002"
    old_metrics, new_metrics = "old-metrics-token-1", "new-metrics-token-2"
    base = Settings(admin_keys=frozenset({old_admin}), metrics_token=old_metrics)
    assert key_valid(old_admin, base.admin_key_digests)  # the base's digests made first
    copy = base.model_copy(
        update={
            "admin_keys": frozenset({new_admin}),
            "metrics_token": SecretStr(f"{new_metrics},{old_metrics}-b"),
        }
    )
    async with served_app(create_app(copy), copy) as url, httpx.AsyncClient(base_url=url) as http:
        for key, status in ((new_admin, 404), (old_admin, 401)):
            answer = await http.get("/v1/sessions/none", headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == status, (key, answer.text)
        for token, status in ((new_metrics, 200), (f"{old_metrics}-b", 200), (old_metrics, 401)):
            answer = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == status, (token, answer.text)
    assert key_valid(old_admin, base.admin_key_digests)
    assert not key_valid(new_admin, base.admin_key_digests)
    assert key_valid(old_metrics, base.metrics_token_digests)
    assert not key_valid(new_metrics, base.metrics_token_digests)


ADMIN_KEY = "the-admin-key-of-tests"
ADMIN_REQUESTS = (
    ("POST", "/v1/push", {"target": {"sessionId": "s1"}, "items": [{"text": "hi"}]}),
    ("GET", "/v1/sessions/s1", None),
    ("POST", "/v1/calls", {"carrier": "twilio", "to": "+15550100"}),
    ("GET", "/v1/calls/c1", None),
)
"""A request of each admin operation (method, path, JSON body or None)."""


async def _admin_request(
    http: httpx.AsyncClient, method: str, path: str, body: object, key: str | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return await http.request(method, path, json=body, headers=headers)


def _too_many(answer: httpx.Response) -> int:
    """Check ``answer`` is the limiter's 429 problem body; its ``Retry-After`` (s)."""
    assert answer.status_code == 429, (answer.status_code, answer.text)
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert (body["status"], body["title"]) == (429, "Too Many Requests")
    assert body["detail"].startswith("Too many wrong admin keys from this address")
    assert "www-authenticate" not in answer.headers
    return int(answer.headers["retry-after"])


async def test_wrong_admin_keys_from_one_address_are_limited_before_the_key_is_checked() -> None:
    """A client could try admin keys at full speed: every wrong key was a 401, however
    many. Now each wrong key takes one of GATEWAY_ADMIN_FAILURES_BURST from the client
    address's allowance (refilled at GATEWAY_ADMIN_FAILURES_PER_S); once it is used up,
    every admin request of that address, on every admin operation, is answered 429 with
    ``Retry-After`` in the admin API's problem form, before the key is looked at: the
    right key too, so a guess cannot be tested. Another address is not limited."""
    settings = Settings(
        admin_keys=frozenset({ADMIN_KEY}), admin_failures_burst=3, admin_failures_per_s=0.01
    )
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path, body in ADMIN_REQUESTS[:3]:  # three guesses on three operations
            wrong = await _admin_request(http, method, path, body, "a-wrong-admin-key-01")
            assert wrong.status_code == 401, (path, wrong.text)
        for method, path, body in ADMIN_REQUESTS:
            for key in ("a-wrong-admin-key-01", ADMIN_KEY, None):
                refused = await _admin_request(http, method, path, body, key)
                assert 90 <= _too_many(refused) <= 100, (path, key)  # 1 token at 0.01/s
        # another client address (the same app, through ASGI) still has its allowance
        other = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=other, base_url="http://gw") as elsewhere:
            viewed = await _admin_request(elsewhere, "GET", "/v1/sessions/s1", None, ADMIN_KEY)
            assert viewed.status_code == 404, viewed.text
            wrong = await _admin_request(elsewhere, "GET", "/v1/sessions/s1", None, "nope-nope")
            assert wrong.status_code == 401
    buckets = app.state.admin_failures
    assert isinstance(buckets, TokenBuckets)
    assert buckets.max_clients == MAX_TRACKED_ADDRESSES  # a bounded number of addresses
    assert len(buckets) == 2


async def test_right_keys_and_missing_keys_are_not_limited_and_the_allowance_refills() -> None:
    """Only wrong keys count: many requests with the right key, or without any key (a
    401 asking for one), never reach 429; once the address's allowance refills, its
    requests are checked again (a wrong key 401, the right key answered)."""
    now = [0.0]
    settings = Settings(admin_keys=frozenset({ADMIN_KEY}))
    app = create_app(settings)
    # GATEWAY_ADMIN_FAILURES_BURST / _PER_S's defaults, on a clock the test moves
    burst, per_s = settings.admin_failures_burst, settings.admin_failures_per_s
    app.state.admin_failures = TokenBuckets(burst, per_s, clock=lambda: now[0])
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for _ in range(burst + 5):
            right = await _admin_request(http, "GET", "/v1/sessions/s1", None, ADMIN_KEY)
            assert right.status_code == 404
            missing = await _admin_request(http, "GET", "/v1/sessions/s1", None, None)
            assert missing.status_code == 401
        for _ in range(burst):
            wrong = await _admin_request(http, "POST", "/v1/push", {}, "a-wrong-admin-key-01")
            assert wrong.status_code == 401
        retry = _too_many(await _admin_request(http, "GET", "/v1/sessions/s1", None, ADMIN_KEY))
        assert retry == round(1 / per_s)
        now[0] += retry
        right = await _admin_request(http, "GET", "/v1/sessions/s1", None, ADMIN_KEY)
        assert right.status_code == 404
        wrong = await _admin_request(http, "GET", "/v1/sessions/s1", None, "a-wrong-admin-key-01")
        assert wrong.status_code == 401
        _too_many(await _admin_request(http, "GET", "/v1/sessions/s1", None, ADMIN_KEY))


async def test_the_admin_limiters_addresses_are_bounded_in_length(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The limiter's table holds at most MAX_TRACKED_ADDRESSES addresses, and each of them
    is short: behind a proxy whose X-Forwarded-For uvicorn trusts (README: run it with
    FORWARDED_ALLOW_IPS), the client address is the header's text, as long as a client
    makes it. Each wrong key with a 16 KB made-up address kept 16 KB in the table: 65,536
    of them about a gigabyte. A long address is kept as its first
    :data:`gateway.ratelimit.MAX_CLIENT_CHARS` characters (a client that makes them up
    shares its own bucket), and is still limited. The refusal's log line cuts it too (it
    held the 16 KB address whole)."""
    settings = Settings(admin_keys=frozenset({ADMIN_KEY}), admin_failures_burst=2)
    app = create_app(settings)
    served = served_app(app, settings, forwarded_allow_ips="*")
    caplog.set_level(logging.DEBUG, logger="gateway.admin")
    async with served as url, httpx.AsyncClient(base_url=url) as http:
        for n in range(8):
            forged = {"X-Forwarded-For": f"{n}" + "A" * 16_000}
            wrong = await http.get(
                "/v1/sessions/s1",
                headers={"Authorization": "Bearer a-wrong-admin-key-01", **forged},
            )
            assert wrong.status_code == 401, wrong.text
        same = {"X-Forwarded-For": "0" + "A" * 16_000 + "B"}  # the first address, cut
        for status in (401, 429):
            wrong = await http.get(
                "/v1/sessions/s1",
                headers={"Authorization": "Bearer a-wrong-admin-key-01", **same},
            )
            assert wrong.status_code == status, wrong.text
    buckets = app.state.admin_failures
    assert isinstance(buckets, TokenBuckets)
    kept = list(buckets._buckets)  # one made-up address per digit, each cut, each its own
    assert [len(address) for address in kept] == [MAX_CLIENT_CHARS] * 8
    lines = [r.getMessage() for r in caplog.records if "Admin request" in r.getMessage()]
    assert len(lines) == 10
    assert all(len(line) < 500 and "A" * 65 not in line for line in lines), lines[0][:300]


def test_the_admin_limiters_429_is_documented() -> None:
    """Each admin operation documents the 429 of too many wrong keys, its problem body and
    its ``Retry-After``."""
    document = create_app(Settings()).openapi()
    for method, path in ADMIN_OPERATIONS:
        answer = document["paths"][path][method]["responses"]["429"]
        assert "Retry-After" in answer["headers"], path
        assert "application/problem+json" in answer["content"], path


def test_every_admin_operation_documents_the_bearer_scheme() -> None:
    """Each operation of the admin API (push, session view, calls) says in the OpenAPI
    document that it takes the admin key: ``security`` HTTPBearer, a ``bearer`` scheme.
    POST /v1/calls and GET /v1/calls/{callId} (``require_admin``) had none, so a client
    generated from the document sent no ``Authorization`` header and got 401."""
    document = create_app(Settings()).openapi()
    for method, path in ADMIN_OPERATIONS:
        operation = document["paths"][path][method]
        assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    # and no other operation claims it (the channels have their own authentication;
    # /metrics its own optional token, MetricsToken: gateway/metricsauth.py)
    claimed = {
        (method, path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if {"HTTPBearer": []} in operation.get("security", [])
    }
    assert claimed == set(ADMIN_OPERATIONS)


async def test_the_admin_refusals_headers_are_documented() -> None:
    """Every 401 of the admin API carries ``WWW-Authenticate`` (RFC 6750 section 3) and a
    push refused ``session-busy`` carries ``Retry-After``: the OpenAPI document named
    neither header (only the descriptions' prose did), so a client built from it did not
    know to read them."""
    settings = Settings(admin_keys=frozenset({"the-admin-key-of-tests"}))
    document = create_app(settings).openapi()
    responses = document["paths"]["/v1/push"]["post"]["responses"]
    assert "Retry-After" in responses["409"]["headers"]
    async with served(settings) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path in ADMIN_OPERATIONS:
            documented = document["paths"][path][method]["responses"]["401"]
            real = path.replace("{session_id}", "s1").replace("{callId}", "c1")
            for headers in ({}, {"Authorization": "Bearer not-the-key"}):
                answer = await http.request(method, real, headers=headers)
                assert answer.status_code == 401
                assert set(documented.get("headers", {})) == {"WWW-Authenticate"}, path
                assert answer.headers["www-authenticate"].startswith("Bearer "), path


def test_the_admin_keys_are_not_in_the_settings_repr() -> None:
    """The admin keys (and the Voiceflow API keys) are credentials: ``repr(settings)``
    (a traceback's locals, a debug line, an error reporter) showed them in clear while
    every SecretStr credential shows ``**********``."""
    settings = Settings(
        admin_keys=frozenset({"the-admin-key-of-tests-1"}),
        voiceflow_api_keys=frozenset({"the-voiceflow-key-1"}),
    )
    shown = repr(settings) + str(settings)
    assert "the-admin-key-of-tests-1" not in shown
    assert "the-voiceflow-key-1" not in shown
    assert settings.admin_keys == frozenset({"the-admin-key-of-tests-1"})


async def test_an_ipv6_client_is_limited_per_64_and_an_ipv4_mapped_one_as_its_ipv4() -> None:
    """Wrong admin keys were counted per client address: an IPv6 client, which may use any
    of the 2**64 addresses of its /64, took a new allowance with each one and guessed
    without limit. Now an IPv6 address is counted by its /64 (another /64 is another
    client), an IPv4 address by itself, and an IPv4-mapped IPv6 address as its IPv4 one.
    The addresses come as a trusted proxy's X-Forwarded-For (FORWARDED_ALLOW_IPS)."""
    settings = Settings(
        admin_keys=frozenset({ADMIN_KEY}), admin_failures_burst=2, admin_failures_per_s=0.01
    )
    app = create_app(settings)
    served = served_app(app, settings, forwarded_allow_ips="127.0.0.1")
    async with served as url, httpx.AsyncClient(base_url=url) as http:

        async def from_(address: str, key: str) -> httpx.Response:
            return await http.get(
                "/v1/sessions/s1",
                headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": address},
            )

        for address in ("2001:db8:1:2::a", "2001:db8:1:2:8000::b"):  # one /64
            assert (await from_(address, "a-wrong-admin-key-01")).status_code == 401
        for address in ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2::c"):
            _too_many(await from_(address, ADMIN_KEY))
        assert (await from_("2001:db8:1:3::a", ADMIN_KEY)).status_code == 404  # another /64
        for address in ("198.51.100.1", "::ffff:198.51.100.1"):  # one IPv4 client
            assert (await from_(address, "a-wrong-admin-key-01")).status_code == 401
        _too_many(await from_("198.51.100.1", ADMIN_KEY))
        _too_many(await from_("::ffff:c633:6401", ADMIN_KEY))  # the same, mapped
        assert (await from_("198.51.100.2", ADMIN_KEY)).status_code == 404  # per address
    assert set(app.state.admin_failures._buckets) == {"2001:db8:1:2::/64", "198.51.100.1"}


async def test_more_than_one_authorization_header_is_an_invalid_request() -> None:
    """With several ``Authorization`` headers the first was used: the right key followed
    by a wrong one was accepted (and a wrong one first refused a request that also held
    the right key). RFC 6750 section 3.1 makes a request with more than one credential
    malformed: every admin operation now answers 400 ``invalid_request`` in the admin
    API's problem form, with its Bearer challenge, whichever order and keys; it is not
    taken as a guess (the address's allowance of wrong keys is untouched)."""
    settings = Settings(admin_keys=frozenset({ADMIN_KEY}), admin_failures_burst=1)
    app = create_app(settings)
    twice = (
        (ADMIN_KEY, "a-wrong-admin-key-01"),
        ("a-wrong-admin-key-01", ADMIN_KEY),
        (ADMIN_KEY, ADMIN_KEY),
    )
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path, body in ADMIN_REQUESTS:
            for first, second in twice:
                headers = [
                    ("Authorization", f"Bearer {first}"),
                    ("Authorization", f"Bearer {second}"),
                ]
                answer = await http.request(method, path, json=body, headers=headers)
                assert answer.status_code == 400, (method, path, first, answer.text)
                assert answer.headers["content-type"] == "application/problem+json"
                problem = answer.json()
                assert (problem["status"], problem["title"]) == (400, "Bad Request")
                assert "more than one Authorization header" in problem["detail"]
                assert answer.headers["www-authenticate"] == (
                    'Bearer realm="gateway-admin", error="invalid_request"'
                )
        # one header with the right key is answered: no wrong key was counted (burst 1)
        viewed = await _admin_request(http, "GET", "/v1/sessions/s1", None, ADMIN_KEY)
        assert viewed.status_code == 404, viewed.text


async def test_with_the_admin_api_off_several_authorization_headers_are_403() -> None:
    """With no admin keys the admin API is off and every request carrying a key is 403
    "whatever it carries" (module doc); two Authorization headers were answered 400
    invalid_request instead. They are 403 again, without a challenge, as one key is."""
    settings = Settings(admin_keys=frozenset())
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path, body in ADMIN_REQUESTS:
            headers = [
                ("Authorization", f"Bearer {ADMIN_KEY}"),
                ("Authorization", "Bearer a-wrong-admin-key-01"),
            ]
            answer = await http.request(method, path, json=body, headers=headers)
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert "www-authenticate" not in answer.headers
            assert "No admin keys are configured" in answer.json()["detail"]
            one = await _admin_request(http, method, path, body, ADMIN_KEY)
            assert one.status_code == 403, (method, path, one.text)


async def test_post_v1_calls_without_a_carrier_says_it_is_missing() -> None:
    """A POST /v1/calls body without ``carrier`` (or with ``null``) was refused with
    "Unknown carrier None": the detail now says the field is missing, and lists the
    carriers; a carrier that is not one is still "Unknown carrier"."""
    settings = Settings(admin_keys=frozenset({ADMIN_KEY}))
    async with served(settings) as url, httpx.AsyncClient(base_url=url) as http:
        for body in ({"to": "+15550100"}, {"carrier": None, "to": "+15550100"}):
            answer = await _admin_request(http, "POST", "/v1/calls", body, ADMIN_KEY)
            assert answer.status_code == 400, answer.text
            detail = answer.json()["detail"]
            assert detail.startswith("The body has no `carrier`: expected one of "), detail
            assert "None" not in detail
        answer = await _admin_request(
            http, "POST", "/v1/calls", {"carrier": "acme", "to": "+15550100"}, ADMIN_KEY
        )
        assert answer.json()["detail"].startswith("Unknown carrier 'acme'"), answer.text
