"""Instructions per request of the turn rows of bench/turn_overhead.py: this tree beside another.

On a busy machine the CPU time per request that bench/turn_overhead.py prints moves by
tens of percent from one run to the next (caches, other processes on the core). Here
each server runs under ``valgrind --tool=callgrind`` and the figure is the number of
instructions the server process executed (user space: the kernel's share of the
socket writes is not in it) while wrk sent requests, divided by the turns the gateway
ran meanwhile (its ``gateway_turns_total``, read before the counters are zeroed and
after they are dumped; the bare endpoint: the requests wrk saw answered):
steady to a few percent whatever else runs.

Rows (the servers and wrk scripts of bench/turn_overhead.py): ``bare`` (the bare
FastAPI PUT /client), ``barealexa`` (the bare endpoint's POST /alexa, sent the alexa
row's signed requests), ``memory`` and ``redis`` (V2 text, tts=None, a new session per
request), ``memorylinks`` and ``redislinks`` (V2 text with default settings: TTS
links on, a new session per request, as turn_overhead.py's "V2 text, defaults" row),
``memory5``/``redis5`` (5 turns a session, TTS links), ``redis5none`` (the same
without links, ``tts=None``), ``alexa`` (/alexa on Redis,
verification on, every request signed) and ``alexamem`` (the same with the memory
store). wrk runs ``-t1 -c8`` (``--connections``) for a warm-up (3 s runs until WARM_UP
requests were answered), the counters are zeroed (``callgrind_control -z``), wrk runs
``--seconds`` s and the counters are dumped. More connections make the batches of the
Redis lock scripts larger (``ScriptBatch``: the calls of one event-loop iteration go
together), as under turn_overhead.py's ``-c32``, where a batch holds about 12 calls.
Under valgrind a server answers a few dozen requests a second: start-up takes a
minute or more on a loaded machine.

``--old /work/main`` measures another checkout the same way, row by row after this
tree's. Needs valgrind and wrk (``apt-get install valgrind wrk``).

    python bench/turn_instructions.py [--rows redis,alexa] [--old /work/main] [--seconds 10]
        [--connections 8]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loadgen import free_port
from bench.turn_overhead import (
    ALEXA_SCRIPT,
    TURNS,
    V2_SCRIPT,
    V2_SESSIONS_SCRIPT,
    alexa_requests,
)
from bench.voice_assistants import SKILL_ID, Keys

ROOT = Path(__file__).resolve().parents[1]
WARM_UP = 20
"""Requests answered before the counters are zeroed."""
ROWS = (
    "bare",
    "barealexa",
    "memory",
    "memorylinks",
    "redis",
    "redislinks",
    "memory5",
    "redis5",
    "redis5none",
    "alexa",
    "alexamem",
)


def _server(row: str, port: int, folder: Path, redis_url: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``row``'s server (as bench/turn_overhead.py's)."""
    redis = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": f"ti{secrets.token_hex(3)}"}
    uvicorn = [sys.executable, "-m", "uvicorn", "--no-access-log"]
    if row.startswith("bare"):
        return [*uvicorn, "bench.baseline_app:app", "--port", str(port)], {}
    if row.startswith("alexa"):  # gateway serve with the local keys (bench/pki_serve.py)
        serve = [sys.executable, str(ROOT / "bench" / "pki_serve.py"), "--port", str(port)]
        env = {"BENCH_PKI_DIR": str(folder), "GATEWAY_ALEXA_SKILL_IDS": SKILL_ID}
        return serve, {**env, **(redis if row == "alexa" else {})}
    serve = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    return serve, redis if row.startswith("redis") else {}


def _script(row: str, folder: Path, keys: Keys) -> Path:
    """The wrk script of ``row`` (Alexa requests are signed now: valid for 150 s)."""
    script = folder / f"{row}.lua"
    if row.endswith("alexa") or row.startswith("alexa"):
        script.write_text(ALEXA_SCRIPT % alexa_requests(keys, 1500, folder))
    elif row.endswith("5"):
        script.write_text(V2_SESSIONS_SCRIPT % ("", TURNS))
    elif row.endswith("5none"):
        script.write_text(V2_SESSIONS_SCRIPT % ("&tts=None", TURNS))
    elif row.endswith("links"):  # default settings: no tts parameter, links on
        script.write_text(V2_SCRIPT % "")
    else:
        script.write_text(V2_SCRIPT % "&tts=None")
    return script


def _wrk(port: int, script: Path, seconds: int, connections: int) -> int:
    """Requests answered by one wrk run (``-t1 -c<connections>``)."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def _turns(port: int) -> float | None:
    """The gateway's ``gateway_turns_total`` summed over its labels (None: no /metrics,
    the bare endpoint)."""
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60)
    if answer.status_code != 200:
        return None
    found = re.findall(r"^gateway_turns_total\{[^}]*\} ([0-9.e+]+)$", answer.text, re.MULTILINE)
    return sum(float(value) for value in found)


def measure(
    tree: Path, row: str, seconds: int, folder: Path, redis_url: str, connections: int = 8
) -> tuple[int, float]:
    """(requests, instructions per request) of ``row`` served from checkout ``tree``."""
    keys = Keys(folder)
    port = free_port()
    cmd, env = _server(row, port, folder, redis_url)
    out = folder / f"callgrind.{row}.{secrets.token_hex(3)}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{row} did not start under valgrind: {cmd}")
            time.sleep(0.5)
        script = _script(row, folder, keys)
        # warm-up: until WARM_UP requests were answered (first requests import and set up
        # what later ones reuse: under valgrind on a loaded machine that takes a while)
        warmed, until = 0, time.monotonic() + 300
        while warmed < WARM_UP and time.monotonic() < until:
            warmed += _wrk(port, script, 3, connections)
        turns_before = _turns(port)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        requests = _wrk(port, script, seconds, connections)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
        if turns_before is not None:  # the turns the server ran while counted (wrk's count
            # leaves out the requests still in flight when it stopped); /metrics is read
            # outside the counted span
            ran = int((_turns(port) or 0) - turns_before)
            if ran > 0:  # else (no counter found): wrk's count, as for the bare endpoint
                requests = ran
    finally:
        proc.terminate()
        proc.wait(60)
    total = 0
    for name in glob.glob(f"{out}*"):
        text = Path(name).read_text()
        if "Trigger: dump" in text:  # the dump of the measured run (not the one at exit)
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
            total = max(total, int(found.group(1)) if found else 0)
        os.remove(name)
    return requests, total / max(requests, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="redis,alexa", help=f"comma-separated, of {ROWS}")
    parser.add_argument("--old", type=Path, help="another checkout, measured after this one")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8, help="wrk's -c (default 8)")
    parser.add_argument(
        "--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if unknown := set(rows) - set(ROWS):
        sys.exit(f"unknown rows {sorted(unknown)}: choose from {ROWS}")
    trees = {"this": ROOT, **({"old": args.old.resolve()} if args.old else {})}
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp:
        for row in rows:
            figures = {}
            for label, tree in trees.items():
                requests, per = measure(
                    tree, row, args.seconds, Path(tmp), args.redis, args.connections
                )
                figures[label] = per
                print(f"{row:8} {label:4} {requests:6d} requests  {per / 1000:8.1f} k instr/req")
            if "old" in figures:
                change = figures["this"] / figures["old"] - 1
                print(f"{row:8} this vs old: {change * 100:+.0f}%", flush=True)


if __name__ == "__main__":
    main()
