"""Vonage's and Plivo's answer webhooks retried to an instance served under another root
path (uvicorn ``root_path``: a proxy's prefix), on the real Redis: the retry key is bound
to the route, not to the URL path with its root path (as Telnyx's,
tests/calls/test_telnyx_root_path.py)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
from pydantic import SecretStr

from adapters.plivo.routes import NONCE_TTL_S
from adapters.plivo.verify import signature
from adapters.vonage.verify import VonageVerifier, replay_key
from gateway.app import create_app
from gateway.callcodec import RETRY_WINDOW_S, request_key
from gateway.io.call import TOKEN_TTL_S, signed_issue_time
from gateway.settings import Settings
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN
from tests.adapters.twilio.helpers import PUBLIC
from tests.adapters.vonage.harness import SECRET, signed
from tests.conftest import served_app


def gateway_settings(redis_url: str, redis_prefix: str) -> Settings:
    """Settings of two instances sharing the test's Redis, Vonage and Plivo configured."""
    update: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "public_url": PUBLIC,
        "vonage_signature_secret": SecretStr(SECRET),
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
    }
    return Settings().model_copy(update=update)


async def test_an_answer_retry_is_answered_alike_by_an_instance_with_another_root_path(
    redis_url: str, redis_prefix: str
) -> None:
    """Vonage's and Plivo's answer webhooks answered by A (served under ``/a``), then the
    carrier's retry of the same signed request through the load balancer to B (under
    ``/b``): the retry key held ``request.url.path``, root path included, so B refused
    it 403 "replayed" (the call got no stream). It is bound to the route's name now: B
    answers the retry with A's answer, the same bytes (one stream token)."""
    settings = gateway_settings(redis_url, redis_prefix)
    call_uuid = str(uuid.uuid4())
    vonage_query = {"uuid": call_uuid, "from": "447700900000", "to": "447700900001"}
    vonage_headers = {"Authorization": signed(SECRET)}
    form = {"CallUUID": call_uuid, "From": "14155550100", "To": "14155550199"}
    path = "/plivo/answer?appKey=plivo"
    nonce = uuid.uuid4().hex[:20]
    plivo_headers = {
        "X-Plivo-Signature-V3": signature(AUTH_TOKEN, "POST", PUBLIC + path, form, nonce),
        "X-Plivo-Signature-V3-Nonce": nonce,
    }
    a_app, b_app = create_app(settings), create_app(settings)
    async with (
        served_app(a_app, settings, root_path="/a") as a,
        served_app(b_app, settings, root_path="/b") as b,
        httpx.AsyncClient() as client,
    ):
        answers = []
        for base in (a, b):
            vonage = await client.get(
                f"{base}/vonage/answer", params=vonage_query, headers=vonage_headers
            )
            plivo = await client.post(f"{base}{path}", data=form, headers=plivo_headers)
            answers.append((vonage, plivo))
        (vonage_first, plivo_first), (vonage_retry, plivo_retry) = answers
        assert vonage_first.status_code == 200, vonage_first.text
        assert vonage_retry.status_code == 200, vonage_retry.text
        assert vonage_retry.content == vonage_first.content
        assert plivo_first.status_code == 200, plivo_first.text
        assert plivo_retry.status_code == 200, plivo_retry.text
        assert plivo_retry.content == plivo_first.content
        other = {**vonage_query, "uuid": str(uuid.uuid4())}  # the token, another request
        replayed = await client.get(f"{b}/vonage/answer", params=other, headers=vonage_headers)
        assert replayed.status_code == 401, replayed.text


async def test_marks_of_the_version_before_keyed_by_path_count_as_the_route(
    redis_url: str, redis_prefix: str
) -> None:
    """A rolling deploy: the version before (until e6597817) marked an answered request
    under the URL's path (``{key}:request:<request key of /vonage/answer>``, Plivo's also
    with its first answer's slot). The carrier's retry of a request it answered, landing
    on this version, was refused ("replayed": the route's name was not marked), and the
    call got no stream. The path's marks, written here by hand into the real Redis as that
    version wrote them, now count as the route's (as Telnyx's): the retry is answered,
    Plivo's with a stream token issued at the old mark's slot; another request with the
    same signature is still refused."""
    settings = gateway_settings(redis_url, redis_prefix)
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        nonces = app.state.gateway.nonces

        # Vonage: the answer the version before gave to this GET
        call_uuid = str(uuid.uuid4())
        query = urlencode({"uuid": call_uuid, "from": "447700900000", "to": "447700900001"})
        authorization = signed(SECRET)
        verifier = VonageVerifier(SECRET)
        claims = verifier.check(authorization, b"", time.time())
        key = f"vonage:token:{replay_key(authorization, claims)}"
        await nonces.use_once(key, verifier.replay_window_s)
        old = request_key("GET", "/vonage/answer", query, b"")
        await nonces.use_once(f"{key}:request:{old}", RETRY_WINDOW_S)
        headers = {"Authorization": authorization}
        retry = await client.get(f"/vonage/answer?{query}", headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.json()[0]["action"] == "connect"
        other = query.replace(call_uuid, str(uuid.uuid4()))
        replayed = await client.get(f"/vonage/answer?{other}", headers=headers)
        assert replayed.status_code == 401, replayed.text

        # Plivo: the answer the version before gave to this POST, in the slot before now's
        call_uuid = str(uuid.uuid4())
        form = {"CallUUID": call_uuid, "From": "14155550100", "To": "14155550199"}
        body = urlencode(form)
        nonce = uuid.uuid4().hex[:20]
        plivo_headers = {
            "X-Plivo-Signature-V3": signature(
                AUTH_TOKEN, "POST", PUBLIC + "/plivo/answer?appKey=plivo", form, nonce
            ),
            "X-Plivo-Signature-V3-Nonce": nonce,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        key = "plivo:v3-nonce:" + hashlib.sha256(nonce.encode()).hexdigest()
        await nonces.use_once(key, NONCE_TTL_S)
        sent = f"{key}:request:" + request_key(
            "POST", "/plivo/answer", "appKey=plivo", body.encode()
        )
        await nonces.use_once(sent, RETRY_WINDOW_S)
        window = int(RETRY_WINDOW_S)
        slot = int(time.time()) // window * window
        await nonces.use_once(f"{sent}:at:{slot - window}", RETRY_WINDOW_S)
        retry = await client.post("/plivo/answer?appKey=plivo", content=body, headers=plivo_headers)
        same_slot = int(time.time()) // window * window == slot
        assert retry.status_code == 200, retry.text
        found = re.search(r"/plivo/stream/([A-Za-z0-9_.-]+)", retry.text)
        assert found is not None, retry.text
        text = found.group(1).partition(".")[0]
        issued_for, expires, _ = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).split(b"|")
        assert issued_for.decode() == call_uuid
        if same_slot:  # the old mark's slot found (not now's): the first answer's token
            issued = signed_issue_time(slot - window, 2 * RETRY_WINDOW_S)
            assert int(expires) == issued + TOKEN_TTL_S
        again = await client.post("/plivo/answer?appKey=other", content=body, headers=plivo_headers)
        assert again.status_code == 403, again.text


async def test_an_answer_marks_what_the_version_before_reads_for_its_retry(
    redis_url: str, redis_prefix: str
) -> None:
    """A rolling deploy, the other way round: this version answers the first request and
    the carrier's retry lands on an instance of the version before (until e6597817),
    which reads only the marks keyed by the URL's path (``{key}:request:<request key of
    /vonage/answer>``; Plivo's also with its first answer's slot, ``...:at:<slot>``).
    Only the route's name was marked, so that instance refused the retry "replayed" and
    the call got no stream. The first answer now sets those marks too, read here in the
    real Redis as that version read them; a retry to this version is still answered."""
    settings = gateway_settings(redis_url, redis_prefix)
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        nonces = app.state.gateway.nonces

        # Vonage: the first answer, given by this version
        call_uuid = str(uuid.uuid4())
        query = urlencode({"uuid": call_uuid, "from": "447700900000", "to": "447700900001"})
        authorization = signed(SECRET)
        headers = {"Authorization": authorization}
        first = await client.get(f"/vonage/answer?{query}", headers=headers)
        assert first.status_code == 200, first.text
        claims = VonageVerifier(SECRET).check(authorization, b"", time.time())
        key = f"vonage:token:{replay_key(authorization, claims)}"
        old = request_key("GET", "/vonage/answer", query, b"")
        assert await nonces.used(f"{key}:request:{old}")  # what the version before reads
        assert not await nonces.used(f"{key}:request:" + request_key("GET", "/x", query, b""))
        retry = await client.get(f"/vonage/answer?{query}", headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content

        # Plivo: the first answer, given by this version
        form = {"CallUUID": str(uuid.uuid4()), "From": "14155550100", "To": "14155550199"}
        body = urlencode(form)
        nonce = uuid.uuid4().hex[:20]
        plivo_headers = {
            "X-Plivo-Signature-V3": signature(
                AUTH_TOKEN, "POST", PUBLIC + "/plivo/answer?appKey=plivo", form, nonce
            ),
            "X-Plivo-Signature-V3-Nonce": nonce,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        window = int(RETRY_WINDOW_S)
        before = int(time.time()) // window * window
        first = await client.post("/plivo/answer?appKey=plivo", content=body, headers=plivo_headers)
        after = int(time.time()) // window * window
        assert first.status_code == 200, first.text
        key = "plivo:v3-nonce:" + hashlib.sha256(nonce.encode()).hexdigest()
        sent = f"{key}:request:" + request_key(
            "POST", "/plivo/answer", "appKey=plivo", body.encode()
        )
        assert await nonces.used(sent)
        slots = [s for s in {before, after} if await nonces.used(f"{sent}:at:{s}")]
        assert len(slots) == 1, slots  # the first answer's slot, as that version reads it
        retry = await client.post("/plivo/answer?appKey=plivo", content=body, headers=plivo_headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content
