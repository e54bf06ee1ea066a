"""Flowstorm V2 text conversations under load, on one instance and on two sharing Redis.

Starts, one after the other, each server as its own process pinned to core 0
(``taskset -c 0``): (1) a bare FastAPI endpoint (bench/baseline_app.py), then the
gateway with its **default settings** (TTS links on: every answer carries an MP3 link)
(2) with memory sessions, (3) with only ``GATEWAY_REDIS_URL`` set, and (4) **two
instances** with only ``GATEWAY_REDIS_URL`` set, both on core 0, each conversation
sending its turns to the two in turn (turn 1 to A, turn 2 to B, ...; half the
conversations start on B), so every turn after the first loads a session the other
instance saved; then the same three gateway rows with ``tts=None`` (no links: labelled).
Both instances of row 4 share core 0, so its CPU per turn compares with row 3's: what
it costs that any instance can serve any turn. Row 5, the control, runs the two
instances again with each conversation kept on one of them (half on each): what two
processes on one core cost by themselves, without a turn ever crossing.

This process (pinned to core 1) keeps N conversations of 5 turns going at once for
``--seconds`` (a new one starts where one ended) with a light keep-alive HTTP client
(bench/loadgen.py) and checks every answer: the demo's words (the name said in turn 2 is
remembered in turn 4, whichever instance answers) and, with links, one audio link per
answer; a wrong or crossed answer counts as a failure. Prints turns per second, p50/p99
turn latency, the servers' CPU µs per turn (user + system from /proc, both instances
summed), the client's CPU share (near 100 %: the figures measure the client), and each
row's throughput and CPU as a ratio of the baseline's.

Redis: the given URL's server, database 13 by default (``--redis``), flushed before
each Redis row; no other setting is given to the instances.

    python bench/v2_concurrency.py [--conversations 200] [--seconds 10]
        [--redis redis://127.0.0.1:6379/13]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from http.cookies import SimpleCookie
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loadgen import Connection, free_port, start
from bench.turn_overhead import cpu_s

LINK = re.compile(rb"^# \(audio=http\S+/file/tts/[0-9a-f]{64}\.mp3\)$", re.MULTILINE)
"""The V2 text line of an item's audio link (TTS links on)."""


def expected(i: int) -> list[tuple[str, str | None]]:
    """Conversation ``i``'s turns: (text sent, the demo's answer line or None: unchecked)."""
    return [
        ("#intro", None),
        (f"my name is User{i}", f"< Nice to meet you, User{i}."),
        (f"message {i}", f"< You said: message {i}"),
        ("what is my name", f"< Your name is User{i}."),
        ("bye", f"< Goodbye, User{i}!"),
    ]


def answered(body: bytes, want: str | None, links: bool) -> bool:
    """Whether a V2 text answer says ``want`` (as one of its lines) and, with ``links``,
    carries an audio link per item said."""
    lines = body.decode("utf-8", "replace").splitlines()
    said = [line for line in lines if line.startswith("< ")]
    if not said or (want is not None and want not in said):
        return False
    return not links or len(LINK.findall(body)) == len(said)


async def drive(
    ports: list[int],
    conversations: int,
    seconds: float,
    query: str,
    *,
    check: bool,
    links: bool,
    sticky: bool = False,
) -> tuple[float, list[float], int]:
    """Keep ``conversations`` going at once for ``seconds`` (each slot starts a new one
    when its last ended); turn k of conversation i goes to ``ports[(i + k) % len]``, or
    with ``sticky`` every turn to ``ports[i % len]``.
    Returns (elapsed s, turn latencies s, failed turns)."""
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def conversation(i: int, connections: list[Connection]) -> None:
        nonlocal failures
        headers = {"Content-Type": "text/plain"}
        for k, (text, want) in enumerate(expected(i)):
            connection = connections[(i + (0 if sticky else k)) % len(connections)]
            t0 = time.perf_counter()
            status, answer, body = await connection.request(
                "PUT", f"/client?key=bench{query}", text.encode(), headers
            )
            latencies.append(time.perf_counter() - t0)
            cookie = SimpleCookie(answer.get("set-cookie", ""))
            if "flowstorm-session-id" in cookie:
                headers["Cookie"] = f"flowstorm-session-id={cookie['flowstorm-session-id'].value}"
            ok = status == 200 and (not check or answered(body, want, links))
            failures += not ok

    async def slot(first: int) -> None:
        connections = [await Connection.open("127.0.0.1", port) for port in ports]
        try:
            i = first
            while True:
                await conversation(i, connections)
                if time.perf_counter() >= deadline:
                    return
                i += conversations
        finally:
            for connection in connections:
                await connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(slot(i) for i in range(conversations)))
    return time.perf_counter() - t0, latencies, failures


def run(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    n: int,
    seconds: float,
    *,
    instances: int = 1,
    sticky: bool = False,
    query: str = "",
    check: bool = True,
    links: bool = False,
    baseline: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """Serve ``instances`` copies of ``cmd`` on core 0, warm them up, drive ``n``
    conversations and print the row; (turns/s, CPU µs per turn)."""
    procs: list[subprocess.Popen[bytes]] = []
    ports = []
    try:
        for _ in range(instances):
            port = free_port()
            procs.append(start([*cmd, str(port)], env, port))
            ports.append(port)
        asyncio.run(drive(ports, 20, 0.0, query, check=check, links=links))  # warm-up
        cpu0 = sum(cpu_s(p.pid) for p in procs)
        client0 = time.process_time()
        elapsed, lat, failures = asyncio.run(
            drive(ports, n, seconds, query, check=check, links=links, sticky=sticky)
        )
        cpu_us = (sum(cpu_s(p.pid) for p in procs) - cpu0) * 1e6 / max(len(lat), 1)
        client = (time.process_time() - client0) / elapsed
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    lat.sort()
    rate = len(lat) / elapsed
    versus = ""
    if baseline is not None:
        versus = f"  {rate / baseline[0]:.2f}x turns/s, CPU {baseline[1] / cpu_us:.2f}x"
    print(
        f"{name:<58} {len(lat):>6} {rate:>7.0f} "
        f"{lat[len(lat) // 2] * 1000:>7.1f} {lat[max(0, int(len(lat) * 0.99) - 1)] * 1000:>7.1f} "
        f"{cpu_us:>7.0f} {client * 100:>6.0f}% {failures:>8}{versus}",
        flush=True,
    )
    return rate, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="per row: conversations keep starting"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="the Redis the gateway rows share (its database is flushed)",
    )
    args = parser.parse_args()
    if sys.platform == "linux" and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the client on the other core
    n = args.conversations
    store = redis.Redis.from_url(args.redis)
    print(
        f"{n} concurrent V2 text conversations of 5 turns, new ones for {args.seconds:g} s; "
        "servers on core 0, this client on core 1; default settings unless the row says "
        "otherwise"
    )
    print(
        f"{'server':<58} {'turns':>6} {'turns/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU µs':>7} {'client':>7} {'failures':>8}  vs bare"
    )
    uvicorn = [sys.executable, "-m", "uvicorn", "--log-level", "warning", "--no-access-log"]
    serve = [sys.executable, "-m", "gateway", "serve", "--log-level", "warning", "--port"]
    base = run(
        "bare FastAPI endpoint",
        [*uvicorn, "bench.baseline_app:app", "--port"],
        {},
        n,
        args.seconds,
        check=False,
    )
    only_redis = {"GATEWAY_REDIS_URL": args.redis}
    rows: list[tuple[str, dict[str, str], int, bool]] = [
        ("gateway, memory", {}, 1, False),
        ("gateway, only GATEWAY_REDIS_URL", only_redis, 1, False),
        ("2 instances, only GATEWAY_REDIS_URL, alternating", only_redis, 2, False),
        ("2 instances, each conversation on one (control)", only_redis, 2, True),
    ]
    for label, query, links in (("", "", True), (", tts=None", "&tts=None", False)):
        for name, env, instances, sticky in rows:
            store.flushdb()
            run(
                f"{name}{label}",
                serve,
                env,
                n,
                args.seconds,
                instances=instances,
                sticky=sticky,
                query=query,
                links=links,
                baseline=base,
            )
    store.flushdb()


if __name__ == "__main__":
    main()
