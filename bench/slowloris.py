"""Slowloris at 256 open files: ``gateway serve`` beside plain uvicorn, in the same run.

Both processes run the same app (memory sessions, demo core) with RLIMIT_NOFILE 256;
the baseline is ``uvicorn.run(create_app())`` with uvicorn's own protocols (no read
deadlines, no connection cap), the other ``gateway serve`` (gateway/server.py) with
GATEWAY_HEADER_TIMEOUT_S / GATEWAY_BODY_TIMEOUT_S = 2. Against each: the attack of
tests/test_slowloris.py (200 slow-header + 50 slow-body clients that reconnect ~2 s
after being closed, 8 s) while real V2 text turns (a new connection each) and V1
WebSocket turns run. Prints, per server: real turns served / failed, how the slow
connections ended, the longest one, ERROR lines in the server's log.

    python3 bench/slowloris.py
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.adapters.flowstorm.v1.helpers import init, init_frame, request_frame, turn, ws_url  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.test_slowloris import ATTACK_S, SLOW_BODIES, SLOW_HEADERS, Attacker  # noqa: E402

OPEN_FILES = 256
BASELINE = (
    "import uvicorn, sys; from gateway.app import create_app; "
    "uvicorn.run(create_app(), port=int(sys.argv[1]), log_level='warning')"
)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


async def real_turns(url: str, until: float) -> Counter[str]:
    """V2 text turns and V1 WebSocket turns until ``until``: outcome -> count."""
    outcomes: Counter[str] = Counter()

    async def v2() -> None:
        i = 0
        while time.monotonic() < until:
            i += 1
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    reply = await client.put(
                        f"{url}/client?key=k&tts=None",
                        content=f"turn {i}",
                        headers={"Content-Type": "text/plain"},
                    )
                ok = reply.status_code == 200 and f"turn {i}" in reply.text
                outcomes["V2 served" if ok else f"V2 {reply.status_code}"] += 1
            except httpx.HTTPError as exc:
                outcomes[f"V2 {type(exc).__name__}"] += 1
            await asyncio.sleep(0.2)

    async def v1() -> None:
        while time.monotonic() < until:
            try:
                async with ws_connect(ws_url(url), open_timeout=10) as ws:
                    await init(ws, init_frame())
                    for i in range(5):
                        frames = await turn(ws, request_frame(f"socket turn {i}"))
                        ok = frames[-1]["type"] == "Response"
                        outcomes["V1 served" if ok else "V1 error"] += 1
                        await asyncio.sleep(0.3)
            except Exception as exc:
                outcomes[f"V1 {type(exc).__name__}"] += 1
                await asyncio.sleep(0.3)

    await asyncio.gather(v2(), v1())
    return outcomes


async def attack(name: str, command: list[str], env: dict[str, str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [*command, str(port)] if "-c" in command else [*command, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stderr=log,
            preexec_fn=_limit,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with httpx.AsyncClient(timeout=1) as client:
                        ready = (await client.get(f"{url}/healthz")).status_code == 200
                    if ready:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                await asyncio.sleep(0.2)
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: "
            body = (
                b"PUT /client?key=k&tts=None HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 10000\r\n\r\nhi"
            )
            attackers = [Attacker("127.0.0.1", port, head) for _ in range(SLOW_HEADERS)]
            attackers += [Attacker("127.0.0.1", port, body) for _ in range(SLOW_BODIES)]
            until = time.monotonic() + ATTACK_S
            tasks = [asyncio.create_task(a.run(until)) for a in attackers]
            await asyncio.sleep(1.0)
            real = await real_turns(url, until - 1.0)
            await asyncio.gather(*tasks)
        finally:
            proc.terminate()
            proc.wait(30)
        text = await asyncio.to_thread(Path(log.name).read_text)
        errors = sum(1 for line in text.splitlines() if " ERROR " in line or "Traceback" in line)
    slow: Counter[str] = Counter()
    for a in attackers:
        slow.update(a.outcomes)
    print(f"{name}:")
    print(f"  real turns: {dict(real)}")
    print(f"  slow connections: {dict(slow)}")
    longest = max(a.longest_s for a in attackers)
    print(f"  longest slow connection closed by the server: {longest:.1f} s")
    print(f"  ERROR/Traceback lines in its log: {errors}")


async def main() -> None:
    print(
        f"{SLOW_HEADERS} slow-header + {SLOW_BODIES} slow-body clients for {ATTACK_S:g} s, "
        f"RLIMIT_NOFILE {OPEN_FILES}"
    )
    await attack("baseline: uvicorn.run(create_app())", [sys.executable, "-c", BASELINE], {})
    await attack(
        "gateway serve (deadlines 2 s, automatic cap)",
        [sys.executable, "-m", "gateway", "serve", "--log-level", "warning"],
        {"GATEWAY_HEADER_TIMEOUT_S": "2", "GATEWAY_BODY_TIMEOUT_S": "2"},
    )


if __name__ == "__main__":
    asyncio.run(main())
