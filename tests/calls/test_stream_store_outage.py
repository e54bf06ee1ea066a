"""A carrier stream whose one-time token cannot be checked because the gateway's Redis
(the nonce store) is down: the upgrade is refused before the accept with HTTP 503,
``Retry-After`` and a problem body (an outage of a dependency, not the carrier's bad
credentials: no 403, no 500), logged at WARNING naming the component, no traceback
(gateway/io/call.py ``admit``). The Vonage answer webhook that would issue the token is
refused 503 too (its token cannot be checked for a replay). A Redis server and a Redis
Cluster alike: nothing listens on the port GATEWAY_REDIS_URL names (an unreachable
Cluster raises redis-py's RedisClusterUnreachableError, which is no RedisError)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.app import create_app
from gateway.settings import Settings
from tests.adapters.plivo.harness import AUTH_ID as PLIVO_AUTH_ID
from tests.adapters.plivo.harness import AUTH_TOKEN as PLIVO_AUTH_TOKEN
from tests.adapters.plivo.harness import ask_answer
from tests.adapters.telnyx.harness import PUBLIC_KEY, ask_texml
from tests.adapters.twilio.helpers import PUBLIC
from tests.adapters.vonage.harness import SECRET, ask_ncco
from tests.conftest import refused_port, served, served_app
from tests.redis_topologies import start_cluster


def vonage_down(redis_url: str) -> tuple[Any, Settings]:
    """A gateway app taking Vonage calls, its Redis at ``redis_url``, and its settings."""
    # the master key set: the test issues a stream token itself (without it, and Redis
    # down at startup, no token is issued: tests/calls/test_carrier_shared_stream_keys.py)
    update = {
        "redis_url": redis_url,
        "vonage_signature_secret": SecretStr(SECRET),
        "secret_key": SecretStr("m" * 40),
    }
    settings = Settings().model_copy(update=update)
    return create_app(settings), settings


async def refused_while_down(url: str, app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A Vonage call to the gateway ``app`` at ``url`` whose one-time key store is down:
    its signed answer webhook is refused 503 (its token cannot be checked for a replay),
    and a stream with the token the answer would carry (issued here as the answer issues
    it) is refused 503 at the upgrade; neither with a traceback. The first is logged at
    WARNING, the second at DEBUG: the Redis client's breaker logged the outage (one
    WARNING), not one per request."""
    call_uuid = str(uuid.uuid4())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway"):
        answer = await ask_ncco(url, call_uuid)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert "key store is unavailable" in answer.json()["detail"]
    (record,) = [r for r in caplog.records if "Vonage answer refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "component: nonce-store" in record.getMessage()
    assert record.exc_info is None
    token = app.state.vonage.tokens.issue(call_uuid, time.time())
    stream = f"ws://{urlsplit(url).netloc}/vonage/stream/{token}"
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="gateway"), pytest.raises(InvalidStatus) as refused:
        async with connect(stream):
            pass
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Content-Type"] == "application/problem+json"
    body = json.loads(response.body or b"")
    assert body["status"] == 503
    assert "token store is unavailable" in body["detail"]
    (record,) = [r for r in caplog.records if "stream refused" in r.getMessage()]
    assert record.levelno == logging.DEBUG  # the outage's second failure
    assert "Vonage" in record.getMessage()
    assert "component: nonce-store" in record.getMessage()
    assert record.exc_info is None


async def test_a_stream_is_refused_503_while_the_redis_server_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, settings = vonage_down(f"redis://127.0.0.1:{refused_port()}/0")  # nothing listens
    async with served_app(app, settings) as url:
        await refused_while_down(url, app, caplog)


async def test_a_stream_is_refused_503_while_the_redis_cluster_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A private Cluster, its nodes shut down once the gateway has started (one down
    at startup: tests/adapters/flowstorm/v2/test_routes.py and
    tests/gateway/test_redis_topologies.py). The rest of the gateway reports the same
    outage as for a server (redis-py's cluster errors are caught with its RedisError:
    gateway/redisconn.py ``REDIS_ERRORS``): a V2 turn is a 503 of the session store,
    not an internal gateway error, and /readyz says the store does not answer."""
    with start_cluster() as cluster:
        app, settings = vonage_down(cluster)
        async with served_app(app, settings) as url:
            first = redis.Redis.from_url("redis://" + urlsplit(cluster).netloc.split(",")[0])
            for node in list(first.cluster("nodes")):
                host, _, port = node.partition("@")[0].rpartition(":")
                with contextlib.suppress(redis.ConnectionError):  # it is gone
                    redis.Redis(host=host, port=int(port)).shutdown(nosave=True)
            first.close()
            await refused_while_down(url, app, caplog)
            caplog.clear()
            async with httpx.AsyncClient(base_url=url) as client:
                turn = await client.put(
                    "/client?key=cluster", headers={"Content-Type": "text/plain"}, content="hi"
                )
                ready = await client.get("/readyz")
    assert turn.status_code == 503
    assert turn.text == "! gateway: The session store is unavailable.\n"
    assert ready.status_code == 503
    assert ready.json()["detail"] == "The session store does not answer."
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_plivo_answer_is_refused_503_while_the_redis_server_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A V3-signed Plivo answer whose nonce cannot be checked for a replay (the one-time
    key store, the gateway's Redis, is down): 503 with ``Retry-After`` and a problem
    body, logged at WARNING naming the component; no stream URL is minted."""
    down = f"redis://127.0.0.1:{refused_port()}/0"  # nothing listens there
    token = SecretStr(PLIVO_AUTH_TOKEN)
    async with served(
        redis_url=down, public_url=PUBLIC, plivo_auth_id=PLIVO_AUTH_ID, plivo_auth_token=token
    ) as url:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gateway"):
            answer = await ask_answer(url, PUBLIC, str(uuid.uuid4()))
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert "key store is unavailable" in answer.json()["detail"]
        (record,) = [r for r in caplog.records if "/plivo/answer refused" in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert "component: nonce-store" in record.getMessage()
        assert record.exc_info is None


async def test_a_telnyx_webhook_is_refused_503_while_the_redis_server_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A signed Telnyx TeXML answer whose signature cannot be checked for a replay (the
    one-time key store, the gateway's Redis, is down): 503 with ``Retry-After`` and a
    problem body, logged at WARNING naming the component; no stream URL is minted."""
    down = f"redis://127.0.0.1:{refused_port()}/0"  # nothing listens there
    key = SecretStr("KEY-T")
    async with served(redis_url=down, telnyx_api_key=key, telnyx_public_key=PUBLIC_KEY) as url:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="adapters.telnyx"):
            answer = await ask_texml(url, "v3:" + uuid.uuid4().hex)
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert "key store is unavailable" in answer.json()["detail"]
        (record,) = [r for r in caplog.records if "Telnyx webhook refused" in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert "component: nonce-store" in record.getMessage()
        assert record.exc_info is None
