"""Flowstorm V2 text conversations under load: the gateway against a bare FastAPI baseline.

Starts, one after the other, (1) a bare FastAPI endpoint (bench/baseline_app.py),
(2) the gateway with memory sessions and (3) the gateway with Redis sessions, each
as its own uvicorn process pinned to one core, and drives N concurrent
conversations of 5 turns each (`tts=None`: turns, not speech synthesis) from this
process with a light keep-alive HTTP client (bench/loadgen.py). Prints turns per
second, p50/p99 turn latency, and each gateway's throughput as a ratio of the
baseline's. Every answer is checked, so lost or crossed turns count as failures.

    python bench/v2_concurrency.py [--conversations 200] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from http.cookies import SimpleCookie
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loadgen import Connection, free_port, report, start


async def drive(port: int, conversations: int, *, check: bool) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0

    async def conversation(i: int) -> None:
        nonlocal failures
        connection = await Connection.open("127.0.0.1", port)
        headers = {"Content-Type": "text/plain"}
        turns = ("#intro", f"my name is User{i}", f"message {i}", "what is my name", "bye")
        expected = (
            None,
            f"< Nice to meet you, User{i}.\n",
            f"< You said: message {i}\n",
            f"< Your name is User{i}.\n",
            f"< Goodbye, User{i}!\n.\n",
        )
        try:
            for text, want in zip(turns, expected, strict=True):
                t0 = time.perf_counter()
                status, answer, body = await connection.request(
                    "PUT", "/client?key=bench&tts=None", text.encode(), headers
                )
                latencies.append(time.perf_counter() - t0)
                cookie = SimpleCookie(answer.get("set-cookie", ""))
                if "flowstorm-session-id" in cookie:
                    headers["Cookie"] = (
                        f"flowstorm-session-id={cookie['flowstorm-session-id'].value}"
                    )
                ok = status == 200 and (not check or want is None or body.decode() == want)
                failures += not ok
        finally:
            await connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(conversations)))
    return time.perf_counter() - t0, latencies, failures


def run(name: str, cmd: list[str], env: dict[str, str], n: int, *, check: bool) -> float:
    port = free_port()
    proc = start([*cmd, str(port)], env, port)
    try:
        asyncio.run(drive(port, 20, check=check))  # warm-up
        elapsed, lat, failures = asyncio.run(drive(port, n, check=check))
    finally:
        proc.terminate()
        proc.wait(10)
    return report(name, elapsed, lat, failures, unit="turns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument(
        "--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    n = args.conversations
    print(f"{n} concurrent V2 conversations x 5 turns; each server on one core (taskset -c 0)")
    uvicorn = [sys.executable, "-m", "uvicorn", "--log-level", "warning"]
    serve = [sys.executable, "-m", "gateway", "serve", "--log-level", "warning", "--port"]
    base = run(
        "bare FastAPI baseline", [*uvicorn, "bench.baseline_app:app", "--port"], {}, n, check=False
    )
    memory = run("gateway, memory store", serve, {}, n, check=True)
    prefix = f"bench-{secrets.token_hex(4)}"
    redis = run(
        "gateway, Redis store",
        serve,
        {"GATEWAY_REDIS_URL": args.redis, "GATEWAY_REDIS_PREFIX": prefix},
        n,
        check=True,
    )
    print(f"ratio to baseline: memory {memory / base:.2f}, Redis {redis / base:.2f}")


if __name__ == "__main__":
    main()
