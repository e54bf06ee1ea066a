"""Voiceflow socket.io actions beside Flowstorm V1 WebSocket turns, against one gateway process.

Starts one `gateway serve` process (demo core; memory store, or Redis with
--redis), pinned to CPU 0 when `taskset` exists, while this client process runs on
the other CPUs. Against that same process it drives, one channel after the other:

- Flowstorm Socket V1 (`websockets` client): N connections, each Init, `#intro`, then
  K text Requests; latency = Request sent -> its Response received;
- Voiceflow socket.io (python-socketio AsyncClient) over each asked transport: N
  connections, each client.start, session.create, launch, then K text actions;
  latency = action.send -> its `action.status completed`.

The text turns alternate "my name is UserI" / "what is my name" and every answer
is checked, so a lost or crossed answer counts as a failure. Prints actions per
second and p50/p99 latency per channel (after a warm-up round of each).

    python bench/voiceflow_actions.py [--clients 50] [--actions 20]
        [--transports websocket,polling] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import socketio
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
PATH = "/v4/interact/socket"
LIMIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "error"]
    proc = subprocess.Popen(
        pin + cmd, env={**os.environ, **env}, cwd=ROOT, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not start")


def expected(i: int, n: int) -> tuple[str, str]:
    """The text of turn ``n`` of client ``i`` and the demo core's answer."""
    if n % 2 == 0:
        return f"my name is User{i}", f"Nice to meet you, User{i}."
    return "what is my name", f"Your name is User{i}."


# ---------------------------------------------------------------- Flowstorm V1


async def v1_client(url: str, i: int, actions: int, latencies: list[float]) -> int:
    failures = 0
    async with ws_connect(url.replace("http", "ws", 1) + "/socket") as ws:

        async def turn(text: str) -> dict[str, Any]:
            await ws.send(
                json.dumps(
                    {"type": "Request", "request": {"input": {"transcript": {"text": text}}}}
                )
            )
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] in ("Response", "Error"):
                    return dict(frame)

        await ws.send(
            json.dumps({"type": "Init", "key": "bench", "deviceId": f"d{i}", "config": {}})
        )
        assert json.loads(await ws.recv())["type"] == "Ready"
        await turn("#intro")
        for n in range(actions):
            text, want = expected(i, n)
            t0 = time.perf_counter()
            frame = await turn(text)
            latencies.append(time.perf_counter() - t0)
            items = frame.get("response", {}).get("items", [])
            failures += [item.get("text") for item in items] != [want]
    return failures


# ------------------------------------------------------------------ Voiceflow


async def voiceflow_client(
    url: str, i: int, actions: int, latencies: list[float], transport: str
) -> int:
    failures = 0
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    sio = socketio.AsyncClient(reconnection=False)

    async def received(event: str, data: Any = None) -> None:
        await events.put((event, data))

    sio.on("*", received)
    await sio.connect(url, transports=[transport], socketio_path=PATH, wait_timeout=30)
    try:

        async def expect(name: str) -> Any:
            event, data = await events.get()
            assert event == name, (event, data)
            return data

        async def act(action: dict[str, Any], mid: str) -> list[str]:
            await sio.emit("action.send", {"action": action, "messageID": mid})
            messages: list[str] = []
            while True:
                event, data = await events.get()
                if event == "action.trace" and data["trace"]["type"] == "text":
                    messages.append(data["trace"]["payload"]["message"])
                elif event == "action.status" and data["status"] != "accepted":
                    return messages if data["status"] == "completed" else ["<rejected>"]

        await sio.emit("client.start", {"userID": f"user{i}", "projectID": "bench"})
        await expect("client.started")
        await sio.emit("session.create", {})
        await expect("session.created")
        await act({"type": "launch"}, "launch")
        for n in range(actions):
            text, want = expected(i, n)
            t0 = time.perf_counter()
            got = await act({"type": "text", "payload": text}, f"m{n}")
            latencies.append(time.perf_counter() - t0)
            failures += got != [want]
    finally:
        await sio.disconnect()
    return failures


# ---------------------------------------------------------------------- runs


Client = Callable[[str, int, int, list[float]], Awaitable[int]]


async def drive(
    url: str, client: Client, clients: int, actions: int
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    t0 = time.perf_counter()
    async with asyncio.timeout(LIMIT_S * 5):
        results = await asyncio.gather(
            *(client(url, i, actions, latencies) for i in range(clients)), return_exceptions=True
        )
    elapsed = time.perf_counter() - t0
    failures = sum(r if isinstance(r, int) else actions for r in results)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"  {len(errors)} clients failed, first: {errors[0]!r}")
    return elapsed, latencies, failures


def report(name: str, clients: int, elapsed: float, lat: list[float], failures: int) -> None:
    lat = sorted(lat)
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan")
    print(
        f"{name:<30} {clients:>4} clients {len(lat):>6} actions {len(lat) / elapsed:>8.0f} /s   "
        f"p50 {statistics.median(lat) * 1000 if lat else float('nan'):>7.1f} ms   "
        f"p99 {p99 * 1000:>7.1f} ms   failures {failures}"
    )


async def bench(url: str, clients: int, actions: int, transports: list[str]) -> None:
    runs: list[tuple[str, Client]] = [("Flowstorm V1 WebSocket", v1_client)]
    for transport in transports:

        def vf(u: str, i: int, k: int, lat: list[float], t: str = transport) -> Awaitable[int]:
            return voiceflow_client(u, i, k, lat, t)

        runs.append((f"Voiceflow socket.io {transport}", vf))
    for name, client in runs:
        await drive(url, client, min(clients, 10), 4)  # warm-up
        elapsed, lat, failures = await drive(url, client, clients, actions)
        report(name, clients, elapsed, lat, failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--actions", type=int, default=20, help="text actions per client")
    parser.add_argument("--transports", default="websocket,polling")
    parser.add_argument("--redis", default=None, help="GATEWAY_REDIS_URL (default: memory)")
    args = parser.parse_args()
    env = {"GATEWAY_VOICEFLOW_SECRET": secrets.token_hex(32)}
    if args.redis:
        env |= {
            "GATEWAY_REDIS_URL": args.redis,
            "GATEWAY_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}",
        }
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))  # clients off the server's CPU
    port = free_port()
    proc = start_gateway(port, env)
    store = "Redis" if args.redis else "memory"
    print(
        f"one gateway process ({store} store, demo core, CPU 0); "
        f"{args.clients} concurrent clients x {args.actions} text actions per channel"
    )
    try:
        asyncio.run(
            bench(
                f"http://127.0.0.1:{port}", args.clients, args.actions, args.transports.split(",")
            )
        )
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    main()
