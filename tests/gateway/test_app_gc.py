"""What ``gateway serve``'s app does to the garbage collector once started (gateway/app.py)."""

from __future__ import annotations

import gc

import httpx

from gateway.app import GC_THRESHOLD, create_app
from gateway.settings import Settings
from tests.conftest import serve


async def test_a_served_app_freezes_startup_objects_and_raises_the_first_threshold() -> None:
    threshold = gc.get_threshold()
    try:
        async with serve(create_app(Settings(), freeze_gc=True)) as url:
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold() == (GC_THRESHOLD, *threshold[1:])
            async with httpx.AsyncClient(base_url=url) as client:
                answer = await client.put(
                    "/client?key=t&tts=None",
                    content=b"hello",
                    headers={"Content-Type": "text/plain"},
                )
            assert answer.status_code == 200
            assert "You said: hello" in answer.text
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_an_embedded_app_leaves_the_collector_alone() -> None:
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    async with serve(create_app(Settings())):
        assert gc.get_threshold() == threshold
        assert gc.get_freeze_count() == frozen
