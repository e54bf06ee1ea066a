"""SIGTERM during V2 turns: every turn that was accepted completes and is saved, none is
cut, new connections are refused, and ``gateway serve`` exits 0 (twice SIGTERM too)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.conftest import GatewayProcess, serve

TURNS = 30


def slow_core(
    arrived: list[str], all_in: asyncio.Event, release: asyncio.Event, turns: int = TURNS
) -> FastAPI:
    """A core that holds every turn until the test releases it; ``all_in`` is set when
    ``turns`` turns have arrived."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        arrived.append(text)
        if len(arrived) == turns:
            all_in.set()
        await release.wait()
        return JSONResponse({"items": [{"text": f"done {text}"}]})

    return app


async def test_sigterm_lets_accepted_turns_finish(
    gateway_processes: list[GatewayProcess],
) -> None:
    arrived: list[str] = []
    all_in, release = asyncio.Event(), asyncio.Event()
    async with serve(slow_core(arrived, all_in, release)) as core:
        proc = GatewayProcess({"GATEWAY_PIPELINE": f"{core}/turn"}).start()
        gateway_processes.append(proc)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as c:

            async def turn(i: int) -> httpx.Response:
                return await c.put(
                    f"{proc.url}/client?key=k&tts=None",
                    headers={"Content-Type": "text/plain"},
                    content=f"turn {i}",
                )

            burst = [asyncio.create_task(turn(i)) for i in range(TURNS)]
            await asyncio.wait_for(all_in.wait(), 30)  # every turn is accepted, at the core
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the gateway is shutting down with 30 turns open
            with_new = await asyncio.gather(turn(999), return_exceptions=True)
            release.set()
            answers = await asyncio.gather(*burst)
        exit_code = await asyncio.to_thread(proc.proc.wait, 30)
    assert sorted(a.text for a in answers) == sorted(f"< done turn {i}\n" for i in range(TURNS))
    assert all(a.status_code == 200 for a in answers)
    # a request after SIGTERM is not taken (connection refused or 503), never half-served
    [new] = with_new
    assert isinstance(new, httpx.HTTPError) or (
        isinstance(new, httpx.Response) and new.status_code == 503
    ), new
    assert exit_code == 0  # a graceful stop is a success (not killed by its SIGTERM: 143)


async def test_sigterm_twice_a_running_turn_is_saved_and_the_exit_status_is_0(
    gateway_processes: list[GatewayProcess], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A second SIGTERM (an impatient operator, a supervisor that repeats it) changes
    nothing: the turn the core holds finishes, is answered and saved; nothing is logged
    at ERROR; the process exits 0 (uvicorn raised the signal again once it had stopped,
    and its default action killed the process: status -15, a container's 143)."""
    arrived: list[str] = []
    all_in, release = asyncio.Event(), asyncio.Event()
    log_path = tmp_path / "gateway.log"
    async with serve(slow_core(arrived, all_in, release, turns=1)) as core:
        with log_path.open("wb") as log_file:
            env = {
                "GATEWAY_PIPELINE": f"{core}/turn",
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_REDIS_PREFIX": redis_prefix,
            }
            proc = GatewayProcess(env, stderr=log_file, log_level="info").start()
            gateway_processes.append(proc)
            assert proc.proc is not None
            async with httpx.AsyncClient(timeout=30) as client:
                running = asyncio.create_task(
                    client.put(
                        f"{proc.url}/client?key=k&tts=None",
                        headers={"Content-Type": "text/plain"},
                        content="the last words",
                    )
                )
                await asyncio.wait_for(all_in.wait(), 30)  # the turn is at the core
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                with pytest.raises(httpx.ConnectError):  # no longer accepting
                    await client.get(f"{proc.url}/healthz")
                release.set()
                answer = await running
            exit_code = await asyncio.to_thread(proc.proc.wait, 30)
    assert (answer.status_code, answer.text) == (200, "< done the last words\n")
    assert exit_code == 0
    logged = log_path.read_text()
    assert "Finished server process" in logged
    assert " ERROR " not in logged, logged
    store = redis.Redis.from_url(redis_url)
    try:
        [key] = list(store.scan_iter(match=f"{redis_prefix}:{{flowstorm:*}}:s"))
        saved = json.loads(store.get(key) or b"{}")
    finally:
        store.close()
    assert saved["turn_count"] == 1
