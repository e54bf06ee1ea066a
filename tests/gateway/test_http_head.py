"""HEAD is answered like GET without the body (RFC 9110 section 9.3.2) on the operations
routes and on ``/file/tts``, where it never starts a synthesis. Real uvicorn, real
espeak-ng, real Redis for ``/readyz``."""

from __future__ import annotations

import httpx

from gateway.app import create_app
from gateway.events import ResponseItem
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from tests.conftest import served, served_app
from tests.gateway.speech.test_tts import CountingSynth


async def test_head_on_the_operations_routes_answers_as_get_without_a_body(
    redis_url: str,
) -> None:
    async with served(redis_url=redis_url) as url, httpx.AsyncClient(base_url=url) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            get = await client.get(path)
            head = await client.head(path)
            assert get.status_code == 200, path
            assert head.status_code == 200, (path, head.status_code, head.text)
            assert head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"], path
            assert "content-length" in head.headers, path
        assert head.headers["content-type"].startswith("text/plain")  # /metrics
        assert int((await client.head("/healthz")).headers["content-length"]) == len(
            (await client.get("/healthz")).content
        )


async def test_head_of_a_tts_link_answers_from_the_cache_without_synthesizing() -> None:
    settings = Settings(tts_provider="espeak-ng", public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        speech: SpeechService = app.state.gateway.speech
        counter = CountingSynth(speech.pool.synthesizer)
        speech.pool.synthesizer = counter
        item = await speech.link_item(ResponseItem(text="Testing one two."), "mp3")
        assert item.audio is not None
        path = item.audio.removeprefix("http://gw.test")
        file_id = path.rsplit("/", 1)[1].removesuffix(".mp3")

        # registered, not synthesized: 200, the GET's type, no length, and no synthesis
        head = await client.head(path)
        assert head.status_code == 200, head.text
        assert head.content == b""
        assert head.headers["content-type"] == "audio/mpeg"
        assert head.headers["cache-control"] == "no-cache"
        assert "content-length" not in head.headers
        assert "transfer-encoding" not in head.headers
        assert counter.calls == 0
        assert await speech.cache.get(file_id, "mp3") is None

        # unknown id, another link's extension, malformed id: as GET
        for bad in (f"/file/tts/{'a' * 64}.mp3", f"/file/tts/{file_id}.wav", "/file/tts/x.mp3"):
            got, headed = await client.get(bad), await client.head(bad)
            assert got.status_code == headed.status_code == 404, bad
            assert headed.headers["content-type"] == "application/problem+json"
            assert headed.content == b""
        assert counter.calls == 0
        assert await speech.cache.get(file_id, "mp3") is None

        # the GET synthesizes; a HEAD then gives the cached file's length and caching
        body = (await client.get(path)).content
        assert counter.calls == 1
        head = await client.head(path)
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-type"] == "audio/mpeg"
        assert head.headers["content-length"] == str(len(body)) != "0"
        assert head.headers["cache-control"] == "public, max-age=86400, immutable"
        assert counter.calls == 1
