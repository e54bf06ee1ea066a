"""What the gateway adds to a turn: wrk against a bare FastAPI endpoint and the gateway, one run.

Every server runs as its own process pinned to core 0 (``taskset -c 0``) with its
default settings: the gateway rows are ``gateway serve`` (its logging at INFO to
/dev/null, one line per turn; its protocol classes; no access log unless
GATEWAY_ACCESS_LOG=true), the bare endpoint is uvicorn's CLI with ``--no-access-log``;
wrk runs on core 1 (``-t1 -c32``, keep-alive, ``--latency``).
Rows, in this order, each a fresh server:

1. ``bare`` (three rows: new sessions, 5 turns a session, Alexa) —
   bench/baseline_app.py: ``PUT /client`` reading the text body and answering one
   plain-text line with a cookie, ``POST /alexa`` reading the body and answering fixed
   JSON: the same shapes with no session, pipeline or store.
2. ``V2 text, defaults`` — the gateway with nothing set (memory sessions, demo core,
   TTS links on: every answer carries an MP3 link), a different sentence per request.
3. ``V2 text, tts=None`` — the same with ``tts=None`` (no links).
4. ``V2 text, Redis, defaults`` / ``..., tts=None`` — only ``GATEWAY_REDIS_URL`` set.
5. ``/alexa`` — the gateway as ``gateway serve`` runs it (bench/pki_serve.py: the same
   serve function, its app given the local keys) with Redis, verification on (a local
   CA made here, the signing chain fetched once and cached, as Amazon's is), every
   request signed (LaunchRequest-free IntentRequests, 4,000 of them, each with its own
   session; wrk sends them round and round, so past the first 4,000 of a row a request
   is a later turn of its session, which loads it: at 2,000 req/s a 10 s row is mostly
   such turns, as a skill's conversations are), so each costs the signature check, the
   turn, its log line and two Redis round trips.
   ``/alexa, Redis, verification OFF`` is the same with GATEWAY_ALEXA_VERIFY=false:
   what the signature check costs (a setting for local development only).

6. ``V2 text, memory/Redis, 5 turns a session`` — the defaults again, but each session
   id the server sets is sent back as the cookie of four more requests (a session is
   in one request at a time), so most turns load an existing session and look for
   pushes queued in its outbox; against the bare endpoint run the same way (its
   answer echoes the cookie).
7. Tuned: ``V2 text, Redis unix socket, tts=None`` and ``/alexa, Redis unix socket``
   — rows 4 (tts=None) and 5 with ``GATEWAY_REDIS_URL=unix://...``: a private
   ``redis-server`` started by this script (no TCP port, no persistence) on a unix
   socket in its temporary folder, to show what the TCP loopback costs per turn (the
   shared Redis of the other rows is unchanged). Skipped when redis-server is not
   installed.

Besides wrk's figures, each row gives the server's CPU time per request (user + system,
from /proc over the measured run): steadier than requests/s on a loaded machine, and
its bare/gateway ratio is the throughput ratio on an otherwise idle core.

Rows 2-5 send no cookie, so each request starts a session: first turns (the
demo answers "You said: ..."). Prints requests/s, p50 and p99 (wrk's), and the ratio
of throughput and p99 to the bare endpoint of the same run.

    python bench/turn_overhead.py [--seconds 10] [--redis redis://127.0.0.1:6379/0]
        [--only alexa] [--repeat 5]

On a shared host one run's ratios move by several percent from one run to the next (a
row and its bare row run a minute apart). ``--repeat N`` runs the rows N times, one
round after the other, and ends with each gateway row's median ratio and every
round's figure beside it.

Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loadgen import free_port, start
from bench.voice_assistants import SKILL_ID, Keys

V2_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local body = "tell me about topic " .. counter .. " and the weather in town " .. (counter %% 97)
  return wrk.format("PUT", "/client?key=bench%s", {["Content-Type"] = "text/plain"}, body)
end
"""

TURNS = 5

V2_SESSIONS_SCRIPT = """
counter = 0
local free = {}   -- session ids not in use by a request, with turns left
local used = {}   -- turns taken by each session id
request = function()
  counter = counter + 1
  local body = "tell me about topic " .. counter .. " and the weather in town " .. (counter %% 97)
  local headers = {["Content-Type"] = "text/plain"}
  local id = table.remove(free)
  if id then headers["Cookie"] = "flowstorm-session-id=" .. id end
  return wrk.format("PUT", "/client?key=bench%s", headers, body)
end
response = function(status, headers, body)
  local cookie = headers["set-cookie"] or headers["Set-Cookie"]
  local id = cookie and cookie:match("flowstorm%%-session%%-id=([^;]+)")
  if id then
    local n = (used[id] or 0) + 1
    if n < %d then used[id] = n; table.insert(free, id) else used[id] = nil end
  end
end
"""

ALEXA_SCRIPT = """
local requests = dofile("%s")
local i = 0
request = function()
  i = i %% #requests + 1
  return requests[i]
end
"""


def _lua_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + escaped.replace("\r", "\\r").replace("\n", "\\n") + "'"


def alexa_requests(keys: Keys, count: int, folder: Path) -> Path:
    """``count`` signed Alexa IntentRequests (each its own session) as a Lua file of raw
    HTTP requests for wrk; timestamps are now, so use them within 150 s."""
    lines = ["return {"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for i in range(count):
        envelope = {
            "version": "1.0",
            "session": {
                "new": True,
                "sessionId": f"amzn1.echo-api.session.wrk-{secrets.token_hex(6)}-{i}",
                "application": {"applicationId": SKILL_ID},
                "user": {"userId": f"amzn1.ask.account.wrk{i}"},
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
        body = json.dumps(envelope)
        headers = keys.alexa_headers(body.encode())
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw = (
            f"POST /alexa HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        )
        lines.append(f"  {_lua_string(raw)},")
    lines.append("}")
    path = folder / "alexa_requests.lua"
    path.write_text("\n".join(lines))
    return path


def unix_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """A private redis-server on a unix socket in ``folder`` (no TCP port, nothing saved)
    and its ``unix://`` URL, once it answers; None when redis-server is not installed."""
    server = shutil.which("redis-server")
    if server is None:
        return None
    sock = folder / "redis.sock"
    options = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    proc = subprocess.Popen(
        [server, *options, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return proc, f"unix://{sock}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server on {sock} did not start")


def cpu_s(pid: int) -> float:
    """CPU time (user + system, s) process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, script: Path, seconds: int) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, errors) of one wrk run on core 1."""
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    out = subprocess.run(
        [
            *pin,
            "wrk",
            "-t1",
            "-c32",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    status = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, ms("50"), ms("99"), errors + (int(status.group(1)) if status else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only the gateway rows whose name contains this (repeatable); bare rows run",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the rows this many times, alternating, and print each row's median ratio",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    keys = Keys(folder)
    scripts = {}
    for name, query in (("defaults", ""), ("tts_none", "&tts=None")):
        scripts[name] = folder / f"v2_{name}.lua"
        scripts[name].write_text(V2_SCRIPT % query)
        scripts[f"{name}_sessions"] = folder / f"v2_{name}_sessions.lua"
        scripts[f"{name}_sessions"].write_text(V2_SESSIONS_SCRIPT % (query, TURNS))
    prefix = f"bench-{secrets.token_hex(4)}"
    redis = {"GATEWAY_REDIS_URL": args.redis, "GATEWAY_REDIS_PREFIX": prefix}
    alexa_env = {
        **redis,
        "BENCH_PKI_DIR": str(folder),
        "GATEWAY_ALEXA_SKILL_IDS": SKILL_ID,
    }
    alexa_off = {**alexa_env, "GATEWAY_ALEXA_VERIFY": "false"}
    uvicorn = [sys.executable, "-m", "uvicorn"]
    bare_cmd = [*uvicorn, "--no-access-log", "bench.baseline_app:app", "--port"]
    # `gateway serve` with the local keys injected (bench/pki_serve.py): what users run
    gateway_cmd = [sys.executable, str(Path(__file__).with_name("pki_serve.py")), "--port"]
    serve_cmd = [sys.executable, "-m", "gateway", "serve", "--port"]
    rows: list[tuple[str, list[str], dict[str, str], str]] = [
        ("bare endpoint, PUT /client", bare_cmd, {}, "tts_none"),
        ("bare endpoint, PUT /client, sessions", bare_cmd, {}, "tts_none_sessions"),
        ("bare endpoint, POST /alexa", bare_cmd, {}, "alexa"),
        ("V2 text, defaults (memory, TTS links)", serve_cmd, {}, "defaults"),
        ("V2 text, memory, tts=None", serve_cmd, {}, "tts_none"),
        ("V2 text, Redis, defaults (TTS links)", serve_cmd, redis, "defaults"),
        ("V2 text, Redis, tts=None", serve_cmd, redis, "tts_none"),
        (
            f"V2 text, memory, {TURNS} turns a session",
            serve_cmd,
            {},
            "defaults_sessions",
        ),
        (
            f"V2 text, Redis, {TURNS} turns a session",
            serve_cmd,
            redis,
            "defaults_sessions",
        ),
        ("/alexa, Redis, verification on", gateway_cmd, alexa_env, "alexa"),
        # what the signature check costs: the same row with it off (never in production)
        ("/alexa, Redis, verification OFF", gateway_cmd, alexa_off, "alexa"),
    ]
    private = unix_redis(folder)
    if private is not None:
        atexit.register(lambda proc: (proc.terminate(), proc.wait(10)), private[0])
        unix = {"GATEWAY_REDIS_URL": private[1], "GATEWAY_REDIS_PREFIX": prefix}
        rows += [
            ("V2 text, Redis unix socket, tts=None", serve_cmd, unix, "tts_none"),
            ("/alexa, Redis unix socket", gateway_cmd, {**alexa_env, **unix}, "alexa"),
        ]
    print(
        f"wrk -t1 -c32 -d{args.seconds}s on core 1; each server alone on core 0, default "
        "settings (log level INFO to /dev/null, no access log)"
    )
    if args.only:
        rows = [r for r in rows if r[0].startswith("bare") or any(o in r[0] for o in args.only)]
    ratios: dict[str, list[tuple[float, float]]] = {}
    for round_ in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"round {round_} of {args.repeat}")
        for name, pair in run_rows(rows, args.seconds, folder, keys, scripts).items():
            ratios.setdefault(name, []).append(pair)
    if args.repeat > 1:
        print(f"\nmedian of {args.repeat} rounds (each round's ratios to its own bare rows)")
        for name, pairs in ratios.items():
            throughput = statistics.median(t for t, _ in pairs)
            cpu = statistics.median(c for _, c in pairs)
            each = ", ".join(f"{t:.2f}" for t, _ in pairs)
            print(f"{name:42} {throughput:.2f}x throughput (rounds: {each}), CPU {cpu:.2f}x")
    shutil.rmtree(folder, ignore_errors=True)


def run_rows(
    rows: list[tuple[str, list[str], dict[str, str], str]],
    seconds: int,
    folder: Path,
    keys: Keys,
    scripts: dict[str, Path],
) -> dict[str, tuple[float, float]]:
    """Run ``rows`` in order, each a fresh server, and print their table; returns each
    gateway row's (throughput, CPU) ratio to the bare row of its shape in this run."""
    print(
        f"{'server':42} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs':>8} {'errors':>7}  "
        "vs bare (CPU: bare's CPU µs per request / this row's)"
    )
    bare: dict[str, tuple[float, float, float]] = {}
    ratios: dict[str, tuple[float, float]] = {}
    for name, cmd, env, kind in rows:
        port = free_port()
        proc = start([*cmd, str(port)], env, port)
        try:
            if kind == "alexa":  # signed now: valid for 150 s
                script = folder / "alexa.lua"
                requests = alexa_requests(keys, 4000, folder)
                script.write_text(ALEXA_SCRIPT % requests)
            else:
                script = scripts[kind]
            wrk(port, script, 2)  # warm-up
            cpu_before = cpu_s(proc.pid)
            rate, p50, p99, errors = wrk(port, script, seconds)
            cpu_us = (cpu_s(proc.pid) - cpu_before) * 1e6 / max(1.0, rate * seconds)
        finally:
            proc.terminate()
            proc.wait(10)
        base_kind = (
            "alexa" if kind == "alexa" else "sessions" if kind.endswith("_sessions") else "v2"
        )
        if name.startswith("bare"):
            bare[base_kind] = (rate, p99, cpu_us)
            versus = ""
        else:
            b_rate, b_p99, b_cpu = bare[base_kind]
            ratios[name] = (rate / b_rate, b_cpu / cpu_us)
            versus = (
                f"{rate / b_rate:.2f}x throughput, p99 {p99 / b_p99:.1f}x, "
                f"CPU {b_cpu / cpu_us:.2f}x"
            )
        print(f"{name:42} {rate:8.0f} {p50:8.2f} {p99:8.2f} {cpu_us:8.0f} {errors:7d}  {versus}")
    return ratios


if __name__ == "__main__":
    main()
