"""What the benchmarks share: free ports, starting servers, a light HTTP/1.1 client, reports.

httpx's async pool caps a load generator at a few hundred requests per second on
this machine, less than the servers under test; :class:`Connection` is a minimal
keep-alive HTTP/1.1 client on one socket (Content-Length and chunked answers) that
costs far less per request, so the figures measure the servers, not the client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start a server pinned to core 0 (when taskset exists) and wait for its /healthz."""
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


class Connection:
    """A minimal HTTP/1.1 keep-alive client on one socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; (status, lower-case headers, body). Chunked answers are joined."""
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(head.encode("latin-1") + b"\r\n" + body)
        await self.writer.drain()
        raw = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = raw.rstrip("\r\n").split("\r\n")
        answer: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            answer[name.strip().lower()] = value.strip()
        if answer.get("transfer-encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data += await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                del data[-2:]
            return int(status_line.split()[1]), answer, bytes(data[:-2] if data else data)
        length = int(answer.get("content-length", "0"))
        return int(status_line.split()[1]), answer, await self.reader.readexactly(length)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST ``body``; (status, response body)."""
        status, _, data = await self.request("POST", path, body, headers)
        return status, data

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def report(name: str, elapsed: float, lat: list[float], failures: int, unit: str = "req") -> float:
    """Print count, rate, p50/p99 latency and failures; returns the rate per second."""
    lat.sort()
    rate = len(lat) / elapsed
    print(
        f"{name:<34} {len(lat):>6} {unit} {rate:>8.0f} {unit}/s   "
        f"p50 {statistics.median(lat) * 1000:>7.1f} ms   "
        f"p99 {lat[max(0, int(len(lat) * 0.99) - 1)] * 1000:>7.1f} ms   failures {failures}"
    )
    return rate
