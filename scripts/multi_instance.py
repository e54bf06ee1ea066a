#!/usr/bin/env python3
"""The multi-instance proof: three gateway processes behind a real HAProxy, one killed mid-run.

Starts Redis (a private redis-server, or --redis URL with a key prefix of its own),
three ``gateway serve`` processes sharing it (the same GATEWAY_VOICEFLOW_SECRET,
GATEWAY_TWILIO_STREAM_SECRET and Twilio auth token, GATEWAY_PUBLIC_URL = the
balancer, Alexa/Google verification off, no GATEWAY_APP_KEYS) and HAProxy 2.6 in front
of them with a config generated from deploy/haproxy/haproxy.cfg's rules
(tests/scale/cluster.py). Then runs conversations on every channel through the
balancer at once (tests/scale/conversations.py: Flowstorm V2 text and audio, V1 text
and audio, Alexa, Google, Dialogflow ES/CX, socket.io over WebSocket and long polling,
Twilio calls) while one gateway process (the one serving the most calls, then the most
connections) is SIGKILLed and started again on its port. Every conversation checks the
demo core's answers; HTTP turns are sent once more after a reset, WebSocket and
socket.io clients reconnect and resume, calls cut by the kill must end cleanly and the
caller calls again. A cut call whose session the gateways leave in the store is
a failure (with --no-strict-call-sessions only reported as a gap).

Prints conversations, turns, retries, reconnections and failures per channel with
p50/p99 turn latency through the balancer, what the kill left behind (session locks,
speech workers, sessions, HAProxy redispatches, gateway ERROR lines); then V2 text
throughput (tts=None, the light client of bench/loadgen.py) with 1 and with 3 gateway
processes behind the balancer. Exits 1 on any failure. Every process it starts is
stopped at the end, on Ctrl-C and SIGTERM too; every wait is bounded.

    python scripts/multi_instance.py [--conversations 20] [--speech-conversations 6]
        [--throughput-conversations 300] [--redis redis://127.0.0.1:6379/0] [--keep]
        [--no-kill] [--no-twilio] [--channel NAME ...] [--verbose] [--no-strict-call-sessions]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench.loadgen import report as throughput_line  # noqa: E402
from bench.v2_concurrency import drive  # noqa: E402
from gateway.speech.stt import PocketsphinxRecognizer  # noqa: E402
from tests.scale.cluster import (  # noqa: E402
    Balancer,
    GatewayProcess,
    RedisServer,
    cpu_seconds,
    free_port,
    group_members,
    read_balancer_log,
)
from tests.scale.conversations import (  # noqa: E402
    CHANNELS,
    SPEECH_CHANNELS,
    TWILIO_AUTH,
    Outcome,
    Speech,
    Target,
    caller_ear,
    run,
)

GATEWAYS = 3
VOICEFLOW_SECRET = "multi-instance-voiceflow-secret-0123456789"
STREAM_SECRET = "multi-instance-twilio-stream-secret-0123456789"


@dataclass
class Options:
    """The size and timing of a proof run (the command line's defaults)."""

    conversations: int = 20
    """Conversations per text channel."""
    speech_conversations: int = 6
    """Conversations per speech channel (V2 audio, V1 audio, Twilio)."""
    spread_s: float = 10.0
    """Conversation k of n on a channel starts at k/n of this."""
    kill_at_s: float = 5.0
    """When the gateway process is killed (after the first conversations started)."""
    down_s: float = 2.0
    """How long the killed process stays down before it is started again."""
    kill: bool = True
    """False: no kill (a baseline to compare latencies with)."""
    think: tuple[float, float] = (0.4, 1.6)
    """Pause between the turns of a conversation (uniform, seconds)."""
    conversation_limit_s: float = 150.0
    throughput_conversations: int = 300
    """Concurrent V2 conversations (5 turns) per throughput measurement; 0 skips it."""
    twilio: bool = True
    strict_call_sessions: bool = True
    """Count a cut call whose session the gateways left open as a failure (else it is
    reported as a gateway gap; see tests/scale/conversations.py)."""
    channels: tuple[str, ...] = ()
    """Only these channels (names of tests/scale/conversations.py's CHANNELS); all if empty."""
    verbose: bool = False
    """Print every conversation's turn latencies."""
    gateway_log_level: str = "warning"
    """--log-level of the gateway processes (their logs are in the work directory)."""
    redis_url: str | None = None
    """An existing Redis (a key prefix of the run's own); None: a private redis-server."""
    keep: bool = False
    """Keep the work directory (configs and logs) even when everything passed."""
    seed: int = 1


@dataclass
class Kill:
    """What happened to the killed gateway process (times in s since the run started)."""

    victim: str
    pid: int
    connections: int
    """HAProxy's current sessions to it at the kill (WebSockets, polls, requests)."""
    calls: int = 0
    """Twilio calls it served at the kill (its /metrics gateway_connections)."""
    at: float = 0.0
    down_after: float = 0.0
    restarted_at: float = 0.0
    ready_after: float = 0.0
    up_at: float = 0.0
    workers_left: list[int] = field(default_factory=list)
    """Processes of the killed gateway's group (speech workers) alive 3 s after the kill."""
    stale_locks: dict[str, float] = field(default_factory=dict)
    """Session locks 0.5 s after the kill with their remaining lease (s): turns of the
    dead process hold them until the lease ends (live turns hold one for milliseconds)."""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    kill: Kill | None = None
    throughput: dict[int, float] = field(default_factory=dict)
    throughput_failures: int = 0
    gateway_errors: list[str] = field(default_factory=list)
    sessions_left: Counter[str] = field(default_factory=Counter)
    workdir: Path | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    @property
    def failures(self) -> int:
        return len(self.failed) + self.throughput_failures

    @property
    def call_sessions_left_open(self) -> list[str]:
        return [key for o in self.outcomes for key in o.sessions_left_open]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q + 0.5) - 1)] if ordered else float("nan")


class Proof:
    """One run of the proof (see the module doc); :meth:`run` returns its Report."""

    def __init__(self, options: Options, out: Callable[[str], None] = print) -> None:
        self.o = options
        self.out = out
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-multi-instance-"))
        self.report = Report(workdir=self.workdir)
        self.redis = RedisServer(options.redis_url, self.workdir)
        self.prefix = f"mi-{secrets.token_hex(4)}"
        self.lb_port = free_port()
        self.gateways: list[GatewayProcess] = []
        self.balancer: Balancer | None = None
        self.aredis: aioredis.Redis | None = None
        self.recognizer: PocketsphinxRecognizer | None = None
        self.speech: Speech | None = None
        self.t0 = 0.0
        self.turns_done = 0

    def say(self, line: str) -> None:
        self.out(line)
        sys.stdout.flush()  # progress shows as it happens, also through a pipe

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ setup

    def gateway_env(self) -> dict[str, str]:
        env = {
            "GATEWAY_REDIS_URL": self.redis.url,
            "GATEWAY_REDIS_PREFIX": self.prefix,
            "GATEWAY_PUBLIC_URL": f"http://127.0.0.1:{self.lb_port}",
            "GATEWAY_VOICEFLOW_SECRET": VOICEFLOW_SECRET,
            "GATEWAY_TWILIO_STREAM_SECRET": STREAM_SECRET,
            "GATEWAY_TWILIO_AUTH_TOKEN": TWILIO_AUTH,
            "GATEWAY_ALEXA_VERIFY": "false",
            "GATEWAY_GOOGLE_VERIFY": "false",
            "GATEWAY_DIALOGFLOW_VERIFY": "false",
            "GATEWAY_SPEECH_WARM_UP": "true",
            "GATEWAY_LOG_FORMAT": os.environ.get("GATEWAY_LOG_FORMAT", "text"),
        }
        return env

    async def setup(self) -> None:
        await asyncio.to_thread(self.redis.start)
        env = self.gateway_env()
        for k in range(1, GATEWAYS + 1):
            log = self.workdir / f"gw{k}.log"
            self.gateways.append(GatewayProcess(f"gw{k}", env, log, self.o.gateway_log_level))
        t = time.monotonic()
        for gw in self.gateways:
            gw.spawn()
        speech = asyncio.create_task(Speech.make(twilio=self.o.twilio))
        ear = None
        if self.o.twilio:  # the caller's ear: recognises what the bot says on the phone
            self.recognizer = caller_ear(self.workdir)
            ear = asyncio.create_task(self.recognizer.warm_up(2))
        await asyncio.gather(*(gw.wait_ready() for gw in self.gateways))
        ready_s = time.monotonic() - t
        self.balancer = Balancer(
            {gw.name: gw.port for gw in self.gateways}, self.workdir, port=self.lb_port
        ).start()
        await self.balancer.wait({gw.name: "UP" for gw in self.gateways})
        self.speech = await speech
        if ear is not None:
            await ear
        self.aredis = aioredis.from_url(self.redis.url)
        version = await asyncio.to_thread(
            subprocess.run, ["haproxy", "-v"], capture_output=True, text=True
        )
        self.say(
            f"{GATEWAYS} gateway processes (ports "
            f"{', '.join(str(gw.port) for gw in self.gateways)}) ready in {ready_s:.1f} s, "
            f"behind {version.stdout.split(' - ')[0].strip()} on {self.balancer.url} (all UP)"
        )
        kind = "private redis-server" if self.redis.private else "existing Redis"
        self.say(
            f"Redis {self.redis.url} ({kind}), key prefix {self.prefix}; work dir {self.workdir}"
        )

    # ------------------------------------------------------------------ the run

    def channels(self) -> list[str]:
        chosen = [c for c in CHANNELS if not self.o.channels or c in self.o.channels]
        return [c for c in chosen if c != "twilio" or self.o.twilio]

    async def conversations(self) -> None:
        assert self.balancer is not None
        assert self.aredis is not None
        speech = self.speech
        assert speech is not None
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            # no shared cookie jar: each conversation carries its own session cookie
            http.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))
            target = Target(
                url=self.balancer.url,
                redis=self.aredis,
                prefix=self.prefix,
                tag=secrets.token_hex(4),
                http=http,
                speech=speech,
                recognizer=self.recognizer,
                think=self.o.think,
                on_turn=self._turned,
                seed=self.o.seed,
                strict_call_sessions=self.o.strict_call_sessions,
            )
            jobs = []
            for c, channel in enumerate(self.channels()):
                n = (
                    self.o.speech_conversations
                    if channel in SPEECH_CHANNELS
                    else self.o.conversations
                )
                for i in range(n):
                    delay = 0.03 * c + self.o.spread_s * i / n
                    jobs.append(run(target, channel, i, delay, self.o.conversation_limit_s))
            self.say(
                f"{len(jobs)} conversations on {len(self.channels())} channels through the "
                "balancer, "
                f"started over {self.o.spread_s:.0f} s, {self.o.think[0]}-{self.o.think[1]} s "
                f"between turns; SIGKILL at {self.o.kill_at_s:.1f} s, restart "
                f"{self.o.down_s:.1f} s later"
            )
            self.t0 = time.monotonic()
            chaos = asyncio.create_task(
                self.kill_and_restart() if self.o.kill else asyncio.sleep(0)
            )
            limit = self.o.spread_s + self.o.conversation_limit_s + 30
            async with asyncio.timeout(limit):
                self.report.outcomes = list(await asyncio.gather(*jobs))
                await chaos
            elapsed = self.now()
        self.say(f"all conversations ended {elapsed:.1f} s after the start")

    def _turned(self) -> None:
        self.turns_done += 1

    async def twilio_calls(self, gw: GatewayProcess) -> int:
        """The Twilio calls ``gw`` serves now (gateway_connections{channel="twilio"})."""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                text = (await client.get(f"{gw.url}/metrics")).text
        except httpx.HTTPError:
            return 0
        for line in text.splitlines():
            if line.startswith('gateway_connections{channel="twilio"}'):
                return int(float(line.split()[-1]))
        return 0

    async def kill_and_restart(self) -> None:
        """SIGKILL a gateway at kill_at_s (the one serving the most Twilio calls, then the
        one with the most connections: the kill should cut calls, sockets and requests);
        start it again on its port down_s later."""
        assert self.balancer is not None
        await asyncio.sleep(max(self.o.kill_at_s - self.now(), 0))
        states = await self.balancer.states()
        load = Counter[str]()
        for state in states:
            load[state.server] += state.current
        names = [gw.name for gw in self.gateways]
        calls = dict(
            zip(names, await asyncio.gather(*map(self.twilio_calls, self.gateways)), strict=True)
        )
        victim = max(self.gateways, key=lambda gw: (calls[gw.name], load[gw.name]))
        kill = Kill(victim.name, 0, load[victim.name], calls[victim.name])
        kill.at = self.now()
        kill.pid = victim.kill()
        self.report.kill = kill
        self.say(
            f"  t={kill.at:5.1f} s  SIGKILL {victim.name} (pid {kill.pid}): "
            f"{kill.connections} connections open on it ({kill.calls} Twilio calls), "
            f"{self.turns_done} turns done"
        )
        kill.down_after = await self.balancer.wait({victim.name: "DOWN"}, 15)
        self.say(f"  t={self.now():5.1f} s  HAProxy marks {victim.name} DOWN")
        await asyncio.sleep(max(kill.at + 0.5 - self.now(), 0))
        kill.stale_locks = await self.locks()
        await asyncio.sleep(max(kill.at + self.o.down_s - self.now(), 0))
        kill.restarted_at = self.now()
        victim.spawn()
        kill.ready_after = await victim.wait_ready()
        await self.balancer.wait({victim.name: "UP"}, 30)
        kill.up_at = self.now()
        self.say(
            f"  t={kill.restarted_at:5.1f} s  {victim.name} started again on port "
            f"{victim.port}: ready after {kill.ready_after:.1f} s, UP in HAProxy at "
            f"t={kill.up_at:.1f} s"
        )
        await asyncio.sleep(max(kill.at + 3 - self.now(), 0))
        kill.workers_left = group_members(kill.pid)

    # ------------------------------------------------------------------ throughput

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the gateways, HAProxy, Redis (when private) and this
        process (the load generator)."""
        parts = {
            "gateways": [gw.proc.pid for gw in self.gateways if gw.proc is not None],
            "HAProxy": [self.balancer.proc.pid] if self.balancer and self.balancer.proc else [],
            "Redis": [self.redis.proc.pid] if self.redis.proc else [],
        }
        used = {name: sum(map(cpu_seconds, pids)) for name, pids in parts.items()}
        times = os.times()
        used["load generator"] = times.user + times.system
        return used

    async def throughput(self) -> None:
        """V2 text turns through the balancer with 1 and with 3 gateways in rotation,
        alternately (1, 3, 1, 3), with each part's CPU use."""
        assert self.balancer is not None
        n = self.o.throughput_conversations
        cores = os.cpu_count() or 1
        self.say("")
        self.say(
            f"Throughput: Flowstorm V2 text turns (tts=None), {n} concurrent conversations x 5 "
            "turns, bench/loadgen.py's keep-alive client, through HAProxy; two rounds"
        )
        others = [gw.name for gw in self.gateways[1:]]
        rates: dict[int, list[float]] = {1: [], GATEWAYS: []}
        for count in (1, GATEWAYS, 1, GATEWAYS):
            state = "maint" if count == 1 else "ready"
            for name in others:
                await self.balancer.set_state(name, state, ("gateway",))
            want = {name: "MAINT" if count == 1 else "UP" for name in others}
            await self.balancer.wait(want, 30, ("gateway",))
            await drive(self.lb_port, 20, check=True)  # warm-up
            before = self.cpu()
            elapsed, latencies, failures = await drive(self.lb_port, n, check=True)
            after = self.cpu()
            label = f"{count} gateway process{'es' if count > 1 else ''} behind HAProxy"
            rates[count].append(throughput_line(label, elapsed, latencies, failures, unit="turns"))
            self.report.throughput_failures += failures
            use = ", ".join(
                f"{name} {(after[name] - before[name]) / elapsed:.2f}" for name in after
            )
            self.say(f"    CPU cores used: {use} (of {cores})")
        for count, measured in rates.items():
            self.report.throughput[count] = sum(measured) / len(measured)
        one, many = self.report.throughput[1], self.report.throughput[GATEWAYS]
        self.say(
            f"ratio {GATEWAYS}:1 = {many / one:.2f} (mean of the rounds; this machine has "
            f"{cores} cores: {GATEWAYS} processes cannot be {GATEWAYS}x faster, and HAProxy, "
            "Redis and this load generator use the same cores)"
        )

    # ------------------------------------------------------------------ findings

    async def leftovers(self) -> None:
        """Sessions still in the store after every conversation ended (by namespace)."""
        assert self.aredis is not None
        async for key in self.aredis.scan_iter(match=f"{self.prefix}:{{*}}:s", count=1000):
            inner = key.decode().split("{", 1)[1].rsplit("}", 1)[0]
            self.report.sessions_left[inner.split(":", 1)[0]] += 1

    async def locks(self) -> dict[str, float]:
        """The session locks in the store now, with their remaining lease (s)."""
        assert self.aredis is not None
        found = {}
        async for key in self.aredis.scan_iter(match=f"{self.prefix}:{{*}}:lock", count=1000):
            ttl = await self.aredis.pttl(key)
            if ttl > 0:
                found[key.decode().split("{", 1)[1].rsplit("}", 1)[0]] = ttl / 1000
        return found

    def gateway_errors(self) -> None:
        """ERROR/CRITICAL lines (text or JSON format) and tracebacks of the gateway logs
        (a traceback as its innermost frame and its exception)."""
        for gw in self.gateways:
            if not gw.log_path.exists():
                continue
            lines = gw.log_path.read_text(errors="replace").splitlines()
            for n, line in enumerate(lines):
                if line.startswith("Traceback"):
                    end = next(
                        (k for k in range(n + 1, len(lines)) if not lines[k].startswith(" ")),
                        len(lines) - 1,
                    )
                    frames = [x.strip() for x in lines[n + 1 : end] if x.startswith("  File")]
                    where = frames[-1] if frames else ""
                    self.report.gateway_errors.append(
                        f"{gw.name}: traceback {lines[end].strip()} ({where})"
                    )
                elif any(mark in line for mark in (" ERROR ", " CRITICAL ", '"level": "ERROR"')):
                    self.report.gateway_errors.append(f"{gw.name}: {line}")

    # ------------------------------------------------------------------ output

    def print_table(self) -> None:
        outcomes = self.report.outcomes
        head = (
            f"{'channel':<20} {'convs':>5} {'turns':>6} {'resent':>6} {'reconn':>6} "
            f"{'cut':>4} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8}"
        )
        self.say("")
        self.say(head)
        self.say("-" * len(head))
        if self.o.verbose:
            for o in outcomes:
                times = " ".join(f"{x * 1000:.0f}" for x in o.latencies)
                self.say(f"{o.channel} #{o.index}: {o.turns} turns, ms: {times} {o.error}")
        rows = [(c, [o for o in outcomes if o.channel == c]) for c in self.channels()]
        rows.append(("all channels", outcomes))
        for name, group in rows:
            if name == "all channels":
                self.say("-" * len(head))
            latencies = [x for o in group for x in o.latencies]
            self.say(
                f"{name:<20} {len(group):>5} {sum(o.turns for o in group):>6} "
                f"{sum(o.retried for o in group):>6} {sum(o.reconnected for o in group):>6} "
                f"{sum(o.cut for o in group):>4} {sum(o.failed for o in group):>6} "
                f"{percentile(latencies, 0.5) * 1000:>8.1f} "
                f"{percentile(latencies, 0.99) * 1000:>8.1f}"
            )
        text = [
            x for o in outcomes if o.channel not in SPEECH_CHANNELS for x in o.latencies
        ]  # fmt: skip
        self.say(
            f"text turns only: p50 {percentile(text, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(text, 0.99) * 1000:.1f} ms over {len(text)} turns"
        )
        self.say(
            "resent: HTTP turns sent once more (connection reset or the balancer's 502/503); "
            "reconn: WebSocket/socket.io reconnections that resumed the session; cut: calls "
            "ended by the kill (socket closed, Twilio's stream-error callback answered; the "
            "caller called again). Latency: "
            "request -> answer through HAProxy, from the first attempt; audio turns include "
            "the upload and recognition; Twilio: end of speech -> first audio of the answer."
        )
        resumed = sum((o.resumed for o in outcomes), Counter[str]())
        for what, n in sorted(resumed.items()):
            self.say(f"  {what}: {n}")
        repeats = sum(o.farewell_repeats for o in outcomes)
        if repeats:
            self.say(f"farewells whose first attempt had already ended the session: {repeats}")

    def print_findings(self) -> None:
        kill = self.report.kill
        if kill is not None:
            for session, lease in sorted(kill.stale_locks.items()):
                owners = [o for o in self.report.outcomes if session in o.sessions]
                whose = ", ".join(
                    f"{o.channel} #{o.index}, turns "
                    + " ".join(f"{x * 1000:.0f}" for x in o.latencies)
                    + " ms"
                    for o in owners
                )
                self.say(
                    f"session lock of {session} still held 0.5 s after the kill with "
                    f"{lease:.1f} s of lease left ({whose or 'no conversation of this run'})"
                )
            workers = ", ".join(map(str, kill.workers_left)) or "none"
            self.say(
                f"killed {kill.victim} at t={kill.at:.1f} s with {kill.connections} "
                f"connections: out of rotation after {kill.down_after:.2f} s, back in "
                f"rotation at t={kill.up_at:.1f} s; its processes alive 3 s after the kill "
                f"(speech workers): {workers}"
            )
        left = self.report.sessions_left
        total = sum(left.values())
        detail = ", ".join(f"{ns} {n}" for ns, n in sorted(left.items()))
        self.say(
            f"sessions left in Redis after every conversation ended: {total}"
            + (f" ({detail}; a turn lost by the kill may leave one that expires)" if total else "")
        )
        if self.balancer is not None:
            log = read_balancer_log(self.balancer.log_path)
            errors_5xx = ", ".join(f"{n} x {code}" for code, n in sorted(log.errors.items()))
            self.say(
                f"HAProxy: {log.redispatched} requests/upgrades sent to another gateway after "
                f"the dead one refused the connection; its own 5xx answers: {errors_5xx or 'none'}"
            )
        errors = self.report.gateway_errors
        self.say(f"ERROR lines in the gateway logs: {len(errors)}")
        for line in errors[:10]:
            self.say(f"  {line}")
        left_open = self.report.call_sessions_left_open
        cut = sum(o.cut for o in self.report.outcomes)
        if cut:
            self.say(
                f"Twilio calls cut by the kill: {cut}; their sessions closed by the gateways: "
                f"{cut - len(left_open)}"
            )
        if left_open and not self.o.strict_call_sessions:
            self.say(
                f"GAP (gateway, not counted as a failure; --strict-call-sessions counts it): "
                f"{len(left_open)} session(s) of calls cut by the kill left open: POST "
                "/twilio/status with stream-error only logs it, and the instance that would "
                "have ended the session is dead; it expires after GATEWAY_SESSION_TIMEOUT_S"
            )
        failed = self.report.failed
        for o in failed[:20]:
            self.say(f"FAILED {o.channel} #{o.index}: {o.error or 'not finished'}")
        self.say(f"failures: {len(failed)} conversations of {len(self.report.outcomes)}")

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> Report:
        try:
            await self.setup()
            await self.conversations()
            await self.leftovers()
            self.gateway_errors()
            self.print_table()
            self.print_findings()
            if self.o.throughput_conversations:
                await self.throughput()
            return self.report
        finally:
            await self.close()

    def stop_processes(self) -> None:
        """Stop everything this run started (synchronous: also safe while cancelling)."""
        if self.balancer is not None:
            self.balancer.stop()
        for gw in self.gateways:
            gw.stop()
        if not self.redis.private:  # a shared Redis keeps running; the run's keys go
            with contextlib.suppress(Exception):
                import redis

                client = redis.Redis.from_url(self.redis.url)
                keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
                client.close()
        self.redis.stop()

    async def close(self) -> None:
        self.stop_processes()
        if self.recognizer is not None:
            await self.recognizer.aclose()
        if self.aredis is not None:
            await self.aredis.aclose()
        if self.o.keep or self.report.failures or not self.report.outcomes:
            self.say(f"configs and logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def prove(options: Options, out: Callable[[str], None] = print) -> Report:
    """Run the proof with ``options``; its Report (every process it started is stopped)."""
    return await Proof(options, out).run()


def parse(argv: list[str] | None) -> Options:
    d = Options()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--conversations", type=int, default=d.conversations, help="per text channel")
    add(
        "--speech-conversations",
        type=int,
        default=d.speech_conversations,
        help="per speech channel (V2 audio, V1 audio, Twilio)",
    )
    add("--spread", type=float, default=d.spread_s, help="start the conversations over S s")
    add("--kill-at", type=float, default=d.kill_at_s, help="SIGKILL a gateway after S s")
    add("--down", type=float, default=d.down_s, help="start it again S s after the kill")
    add("--no-kill", action="store_true", help="a baseline run: no kill")
    add(
        "--throughput-conversations",
        type=int,
        default=d.throughput_conversations,
        help="concurrent V2 conversations per throughput measurement (0: none)",
    )
    add("--no-twilio", action="store_true", help="leave phone calls out")
    add(
        "--strict-call-sessions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a cut call whose session is left open is a failure (default; --no-... reports it)",
    )
    add("--channel", action="append", default=[], choices=list(CHANNELS), help="only these")
    add("--verbose", action="store_true", help="print every conversation's turn latencies")
    add("--gateway-log-level", default=d.gateway_log_level, help="logs are in the work dir")
    add("--redis", help="use this Redis (key prefix of the run) instead of a private one")
    add("--keep", action="store_true", help="keep the work directory (configs, logs)")
    add("--seed", type=int, default=d.seed, help="think times")
    args = parser.parse_args(argv)
    return Options(
        conversations=args.conversations,
        speech_conversations=args.speech_conversations,
        spread_s=args.spread,
        kill_at_s=args.kill_at,
        down_s=args.down,
        kill=not args.no_kill,
        throughput_conversations=args.throughput_conversations,
        twilio=not args.no_twilio,
        strict_call_sessions=args.strict_call_sessions,
        channels=tuple(args.channel),
        verbose=args.verbose,
        gateway_log_level=args.gateway_log_level,
        redis_url=args.redis,
        keep=args.keep,
        seed=args.seed,
    )


async def _main(options: Options) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    report = await prove(options)
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    try:
        return asyncio.run(_main(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process this run started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
