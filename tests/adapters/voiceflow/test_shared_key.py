"""Voiceflow sessionKeys of an instance started while Redis was down (gateway/secrets.py
``SecretKeys.pending``): a real redis-server started late on a free port, two real
gateways served by uvicorn, python-socketio clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import Settings
from tests.adapters.voiceflow.helpers import PROJECT, USER, RecordingCore, client
from tests.calls.test_shared_stream_key import adopted, redis_server
from tests.conftest import free_port, served_app, unless_hung


@asynccontextmanager
async def gateway(core_url: str, **overrides: Any) -> AsyncIterator[tuple[str, FastAPI]]:
    """An in-process gateway on ``core_url`` with ``overrides``; (url, app)."""
    app = create_app(Settings().model_copy(update={"pipeline": core_url, **overrides}))
    async with served_app(app) as url:
        yield url, app


async def test_an_instance_started_while_redis_was_down_issues_no_session_key() -> None:
    """Instance A starts while Redis is down: it signed Voiceflow sessionKeys with its
    per-process key until it adopted the key shared through Redis, so a session created
    on A meanwhile could not be resumed on B (nor on A once it adopted the shared key):
    its client was told ``newSessionRequired`` and its conversation was lost; and a valid
    key made on B read as invalid on A. A handshake on A is now refused ``error
    store-unavailable`` (the client sends client.start again) until A knows the shared
    key, the connection untouched; then a key A issues resumes the session on B."""
    port = free_port()
    overrides: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "redis_prefix": "gw-vf-pending",
        "voiceflow_secret": None,
    }
    core = RecordingCore()
    async with core.running() as core_url, gateway(core_url, **overrides) as (a_url, a_app):
        a_keys = a_app.state.gateway.secret_keys
        assert a_keys.pending  # Redis did not answer: not the shared key
        async with client(a_url) as vf:
            for event, payload in (
                ("client.start", {"userID": USER, "projectID": PROJECT}),
                ("session.create", {}),
                ("client.start", {"userID": USER, "projectID": PROJECT, "sessionKey": "x.y.z"}),
            ):
                await vf.emit(event, payload)
                told, data = await vf.next()
                assert (told, data.get("code")) == ("error", "store-unavailable"), (told, data)
                assert "send client.start again" in data["error"]
            await vf.emit("action.send", {"action": {"type": "launch"}})  # no handshake
            refused = await vf.expect("action.status")
            assert (refused["status"], refused["reason"]) == ("rejected", "not-started")
            async with redis_server(port), gateway(core_url, **overrides) as (b_url, _):
                await unless_hung(adopted(a_keys), "A adopting the shared key")
                key = await vf.handshake()  # the same connection, once A knows the key
                _, _, done = await vf.act({"type": "launch"})  # the session is made
                assert done["status"] == "completed"
                async with client(b_url) as on_b:
                    assert await on_b.start(key) is False  # resumed: B accepts A's key
