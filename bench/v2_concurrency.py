"""Flowstorm V2 text conversations under load: the gateway against a bare FastAPI baseline.

Starts, one after the other, (1) a bare FastAPI endpoint (bench/baseline_app.py),
(2) the gateway with memory sessions and (3) the gateway with Redis sessions, each
as its own uvicorn process pinned to one core when possible, and drives N
concurrent conversations of 5 turns each from this process. Prints turns per
second, p50/p99 turn latency, and each gateway's throughput as a ratio of the
baseline's. Every answer is checked, so lost or crossed turns count as failures.

    python bench/v2_concurrency.py [--conversations 200] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    taskset = ["taskset", "-c", "0"] if sys.platform == "linux" and os.cpu_count() else []
    proc = subprocess.Popen(
        taskset + cmd,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server on port {port} did not start: {cmd}")


async def drive(url: str, conversations: int, *, baseline: bool) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0

    async def conversation(i: int, pool: httpx.AsyncClient) -> None:
        nonlocal failures
        headers = {"Content-Type": "text/plain"}
        turns = ("#intro", f"my name is User{i}", f"message {i}", "what is my name", "bye")
        expected = (
            None,
            f"< Nice to meet you, User{i}.\n",
            f"< You said: message {i}\n",
            f"< Your name is User{i}.\n",
            f"< Goodbye, User{i}!\n.\n",
        )
        for text, want in zip(turns, expected, strict=True):
            t0 = time.perf_counter()
            answer = await pool.put(f"{url}/client?key=bench", headers=headers, content=text)
            latencies.append(time.perf_counter() - t0)
            headers["Cookie"] = f"flowstorm-session-id={answer.cookies['flowstorm-session-id']}"
            ok = answer.status_code == 200 and (baseline or want is None or answer.text == want)
            failures += not ok

    limits = httpx.Limits(max_connections=conversations, max_keepalive_connections=conversations)
    async with httpx.AsyncClient(limits=limits, timeout=120) as pool:
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(i, pool) for i in range(conversations)))
        elapsed = time.perf_counter() - t0
    return elapsed, latencies, failures


def run(
    name: str, cmd: list[str], env: dict[str, str], conversations: int, baseline: bool = False
) -> float:
    port = free_port()
    proc = start([*cmd, str(port)], env, port)
    try:
        asyncio.run(drive(f"http://127.0.0.1:{port}", 20, baseline=baseline))  # warm-up
        elapsed, lat, failures = asyncio.run(
            drive(f"http://127.0.0.1:{port}", conversations, baseline=baseline)
        )
    finally:
        proc.terminate()
        proc.wait(10)
    lat.sort()
    rate = len(lat) / elapsed
    print(
        f"{name:<24} {len(lat):>6} turns {rate:>9.0f} turns/s   "
        f"p50 {statistics.median(lat) * 1000:>7.1f} ms   "
        f"p99 {lat[int(len(lat) * 0.99) - 1] * 1000:>7.1f} ms   failures {failures}"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument(
        "--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    n = args.conversations
    print(f"{n} concurrent V2 conversations x 5 turns; each server on one core (taskset -c 0)")
    uvi = [sys.executable, "-m", "uvicorn", "--log-level", "warning", "--port"]
    serve = [sys.executable, "-m", "gateway", "serve", "--log-level", "warning", "--port"]
    base = run(
        "bare FastAPI baseline",
        [*uvi[:-1], "bench.baseline_app:app", "--port"],
        {},
        n,
        baseline=True,
    )
    memory = run("gateway, memory store", serve, {}, n)
    prefix = f"bench-{secrets.token_hex(4)}"
    redis = run(
        "gateway, Redis store",
        serve,
        {"GATEWAY_REDIS_URL": args.redis, "GATEWAY_REDIS_PREFIX": prefix},
        n,
    )
    print(f"ratio to baseline: memory {memory / base:.2f}, Redis {redis / base:.2f}")


if __name__ == "__main__":
    main()
