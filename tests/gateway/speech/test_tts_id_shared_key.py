"""TTS file ids of an instance started while Redis was down (gateway/secrets.py): on a
real redis-server started late on a free port, two real gateways served by uvicorn, the
links read from Flowstorm V2 answers over HTTP."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.adapters.twilio.helpers import Served, twilio_gateway
from tests.calls.test_shared_stream_key import adopted, redis_server
from tests.conftest import free_port, unless_hung

LINK = re.compile(r"^# \(audio=(\S+/file/tts/([0-9a-f]{64})\.\w+)\)$", re.MULTILINE)


async def tts_id(gw: Served, text: str) -> str:
    """The TTS file id of the demo core's answer to ``text`` (a new V2 session)."""
    async with httpx.AsyncClient(base_url=gw.url) as client:
        answer = await client.put(
            "/client?key=demo", content=text, headers={"Content-Type": "text/plain"}
        )
    assert answer.status_code == 200, answer.text
    found = LINK.search(answer.text)
    assert found is not None, answer.text
    return found.group(2)


async def test_the_tts_id_key_follows_the_shared_key_once_it_is_read() -> None:
    """Instance A starts while Redis is down: its TTS id key was derived once, at
    startup, from its per-process master key, and kept after A adopted the key shared
    through Redis, so one sentence had one id on A and another on B (each instance
    synthesized and cached it apart, for good). The key follows the master key now:
    once A has read the shared key, A and B give the sentence the same id."""
    port = free_port()
    overrides: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "redis_prefix": "gw-pending-tts",
    }
    async with twilio_gateway(**overrides) as a:
        a_keys = a.app.state.gateway.secret_keys
        assert a_keys.pending  # Redis did not answer: A has its own key meanwhile
        async with redis_server(port), twilio_gateway(**overrides) as b:
            assert b.app.state.gateway.secret_keys.source == "redis"
            await unless_hung(adopted(a_keys), "A adopting the shared key")
            text = "the tts id of this sentence"
            on_a, on_b = await tts_id(a, text), await tts_id(b, text)
            assert on_a == on_b
            assert await tts_id(a, "another sentence") != on_a  # ids still tell texts apart
