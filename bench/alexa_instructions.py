"""Instructions per ``POST /alexa`` request, beside the bare endpoint's, counted in one process.

bench/turn_overhead.py measures throughput with wrk; on a shared machine its figures move
by tens of percent. Here the server side runs in one process under
``valgrind --tool=callgrind`` with no sockets and no load generator: uvicorn's own
protocol object (the gateway's :func:`gateway.server.uvicorn_options` class for the
gateway, uvicorn's httptools protocol for the bare app, as ``gateway serve`` and
``uvicorn --no-access-log`` run them) is fed each raw HTTP request through
``data_received`` on a fake transport that collects the answer, ``--connections``
connections at once (each sends its next request when its answer is complete, as
wrk's connections do). Everything after the socket is counted: httptools' parsing,
uvicorn's ASGI cycle, the app, its Redis round trips (real Redis: redis-py's Python
side; the kernel's share is in no figure), its log line (written to /dev/null) and
uvicorn's answer. The event loop is uvloop (what uvicorn picks when installed).

Rows: ``bare`` (bench/baseline_app.py's ``POST /alexa``: the body read, fixed JSON
back) and ``alexa`` (the gateway, Redis store at ``--redis``, verification on with a
local PKI whose chain is fetched once and cached, as bench/pki_serve.py serves it,
GATEWAY_ALEXA_SKILL_IDS set, every request a signed IntentRequest of the catch-all
intent). ``--sessions`` sessions are used round and round (default 64), so past the
first round each request is a later turn of its session, which loads it (most of
turn_overhead.py's 10 s row).

The count covers the measured requests alone: after the warm-up (and after the keys
were made and every request signed) the process zeroes its counters
(``callgrind_control -z`` on itself), sends ``--requests`` requests and dumps them
(``-d``); the figure is that dump's total over the requests. Instruction counts barely
move when other processes load the machine (a few tenths of a percent run to run).

    python bench/alexa_instructions.py [--rows bare,alexa] [--requests 200] [--profile DIR]
        [--env GATEWAY_ALEXA_VERIFY=false] [--redis ''  (the memory store)]

``--profile DIR`` keeps the callgrind files there, with instruction-level data (the
dump is ``<row>.callgrind.out.1``: ``callgrind_annotate --inclusive=yes``). ``--inner
ROW`` runs one row without valgrind (what the outer process runs under it; under
py-spy it shows the Python side by function). Needs valgrind (``apt-get install
valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
WARM_UP = 64
"""Requests answered before the measured ones (imports, caches, the chain's fetch)."""


class _Transport(asyncio.Transport):
    """What uvicorn's protocol writes to: collects one answer at a time and resolves
    ``done`` when its headers and Content-Length body are in."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.done: asyncio.Future[bytes] | None = None
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        # uvicorn writes the headers, then the body: no regex (counted in every row)
        at = self.buffer.find(b"content-length: ", 0, head_end)
        length = int(self.buffer[at + 16 : self.buffer.find(b"\r\n", at)]) if at >= 0 else 0
        if len(self.buffer) >= head_end + 4 + length and self.done is not None:
            answer = bytes(self.buffer)
            self.buffer.clear()
            if not self.done.done():
                self.done.set_result(answer)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def _alexa_requests(keys: Any, count: int, sessions: int) -> list[bytes]:
    """``count`` signed raw HTTP requests, IntentRequests of ``sessions`` sessions round
    and round (as bench/turn_overhead.py's)."""
    from bench.voice_assistants import SKILL_ID

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ids = [f"amzn1.echo-api.session.instr-{secrets.token_hex(6)}-{i}" for i in range(sessions)]
    raw = []
    for i in range(count):
        envelope = {
            "version": "1.0",
            "session": {
                "new": i < sessions,
                "sessionId": ids[i % sessions],
                "application": {"applicationId": SKILL_ID},
                "user": {"userId": f"amzn1.ask.account.instr{i % sessions}"},
            },
            "context": {"System": {"application": {"applicationId": SKILL_ID}}},
            "request": {
                "type": "IntentRequest",
                "requestId": f"amzn1.echo-api.request.{secrets.token_hex(8)}",
                "timestamp": now,
                "locale": "en-US",
                "intent": {
                    "name": "CatchAllIntent",
                    "slots": {"query": {"name": "query", "value": f"my name is User{i}"}},
                },
            },
        }
        body = json.dumps(envelope).encode()
        headers = keys.alexa_headers(body)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw.append(
            f"POST /alexa HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    return raw


def _bare_requests(count: int) -> list[bytes]:
    body = b'{"version": "1.0", "request": {"type": "IntentRequest"}}'
    head = (
        "POST /alexa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return [head + body] * count


def _callgrind(option: str) -> None:
    """``callgrind_control <option>`` of this process when it runs under callgrind."""
    if os.environ.get("ALEXA_INSTR_CALLGRIND") == "1":
        subprocess.run(
            ["callgrind_control", option, str(os.getpid())], capture_output=True, check=True
        )


async def _inner(row: str, requests: int, connections: int, sessions: int) -> None:
    import uvicorn
    from uvicorn.lifespan.on import LifespanOn
    from uvicorn.server import ServerState

    if row == "bare":
        from bench.baseline_app import app

        config = uvicorn.Config(app, log_config=None, access_log=False, http="httptools")
        raw = _bare_requests(WARM_UP + requests)
    else:
        from bench.voice_assistants import Keys, gateway_app
        from gateway.logs import configure_logging
        from gateway.server import uvicorn_options
        from gateway.settings import Settings

        folder = Path(tempfile.mkdtemp(prefix="alexa-instr-"))
        keys = Keys(folder)
        os.environ["BENCH_PKI_DIR"] = str(folder)
        settings = Settings()
        # as gateway serve logs (GATEWAY_LOG_LEVEL, INFO by default: a line per turn),
        configure_logging(settings.log_level, settings.log_format)
        # written to /dev/null (as bench/turn_overhead.py runs it)
        devnull = open(os.devnull, "w")  # noqa: SIM115, ASYNC230
        logging.getLogger().handlers[0].setStream(devnull)
        config = uvicorn.Config(
            gateway_app(), log_config=None, access_log=False, **uvicorn_options(settings)
        )
        raw = _alexa_requests(keys, WARM_UP + requests, sessions)  # signed before the count
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    state = ServerState()
    protocols = []
    for _ in range(connections):
        protocol = config.http_protocol_class(
            config=config, server_state=state, app_state=lifespan.state
        )
        transport = _Transport()
        protocol.connection_made(transport)
        protocols.append((protocol, transport))
    queue = iter(raw)
    answered: list[bytes] = []

    async def connection(protocol: Any, transport: _Transport, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            request = next(queue)
            transport.done = loop.create_future()
            protocol.data_received(request)
            answered.append(await transport.done)

    async def run(count: int) -> None:
        share = [count // connections + (i < count % connections) for i in range(connections)]
        await asyncio.gather(
            *(connection(p, t, n) for (p, t), n in zip(protocols, share, strict=True))
        )

    await run(WARM_UP)
    _callgrind("-z")  # the count starts
    await run(requests)
    _callgrind("-d")  # and ends: dumped
    statuses = {answer.split(b" ", 2)[1] for answer in answered}
    if statuses != {b"200"}:
        bad = next(a for a in answered if not a.startswith(b"HTTP/1.1 200"))
        sys.exit(f"not every answer was 200: {statuses}: {bad[:600]!r}")
    if row == "alexa" and b"You said" not in answered[-1] and b"ssml" not in answered[-1]:
        sys.exit(f"unexpected answer: {answered[-1][:600]!r}")
    if os.environ.get("ALEXA_INSTR_SHOW") == "1":
        print(answered[-1].decode(errors="replace"))
    for protocol, _ in protocols:
        protocol.connection_lost(None)
    await lifespan.shutdown()


def _measured(out: Path) -> int:
    """The instructions of the measured requests: the ``summary:`` of the run's dump
    (``callgrind_control -d``; not the file written at the exit)."""
    for name in sorted(out.parent.glob(out.name + ".*")):
        text = name.read_text()
        if "Trigger: dump" in text:
            found = re.search(r"^summary: (\d+)", text, re.MULTILINE)
            if found:
                return int(found.group(1))
    sys.exit(f"no callgrind dump in {out.parent}")


def _run(row: str, args: argparse.Namespace, out: Path) -> int:
    """Instructions of the measured requests of one callgrind run of ``row``."""
    from bench.voice_assistants import SKILL_ID

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ALEXA_INSTR_CALLGRIND": "1",
        "GATEWAY_REDIS_URL": args.redis,
        "GATEWAY_REDIS_PREFIX": f"ai{secrets.token_hex(3)}",
        "GATEWAY_ALEXA_SKILL_IDS": SKILL_ID,
        **dict(setting.split("=", 1) for setting in args.env),
    }
    if not args.redis:  # the memory store
        del env["GATEWAY_REDIS_URL"]
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        *([] if args.profile else ["--dump-instr=no"]),
        sys.executable,
        str(Path(__file__).resolve()),
        "--inner",
        row,
        "--requests",
        str(args.requests),
        "--connections",
        str(args.connections),
        "--sessions",
        str(args.sessions),
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{row} failed:\n{done.stderr.decode()[-3000:]}")
    return _measured(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="bare,alexa")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--profile", type=Path, help="keep the callgrind files here")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the gateway (GATEWAY_ALEXA_VERIFY=false, GATEWAY_LOG_LEVEL=warning)",
    )
    parser.add_argument(
        "--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--inner", choices=("bare", "alexa"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        import uvloop

        uvloop.run(_inner(args.inner, args.requests, args.connections, args.sessions))
        return
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="alexa-instr-") as tmp:
        folder = args.profile or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for row in args.rows.split(","):
            figures[row] = _run(row, args, folder / f"{row}.callgrind.out") / args.requests
            print(f"{row:6} {figures[row] / 1000:8.1f} k instructions/request", flush=True)
    if "bare" in figures and "alexa" in figures:
        print(f"ratio bare/alexa {figures['bare'] / figures['alexa']:.3f}")


if __name__ == "__main__":
    main()
