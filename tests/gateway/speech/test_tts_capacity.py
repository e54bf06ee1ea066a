"""Lazy TTS links, bounded synthesis and clear refusals, on real ``gateway serve`` processes.

Default settings throughout (Piper, TTS links on, as a curl user gets them); Redis
only where two instances share it (the key prefix is set for the test's own cleanup).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time

import httpx

from gateway.speech.audio import decode_mp3
from tests.conftest import GatewayProcess

KEY = "tts-test"
TEXT = {"Content-Type": "text/plain"}
LINK = re.compile(r"^# \(audio=http://localhost:\d+(/file/tts/[0-9a-f]{64}\.mp3)\)$", re.M)


def links(answer: str) -> list[str]:
    """The paths of the TTS links in a plain-text V2 answer."""
    return LINK.findall(answer)


def said(answer: str) -> list[str]:
    return [line for line in answer.splitlines() if line.startswith(("<", "!", "."))]


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


async def short_conversation(url: str, i: int, within_s: float = 60.0) -> float:
    """Two text turns without speech, each answered (``within_s``: a hang guard, the
    client's timeout); the slowest time, for the printed figures only."""
    slowest = 0.0
    async with httpx.AsyncClient(timeout=within_s) as client:
        for text, answer in ((f"my name is Short{i}", f"< Nice to meet you, Short{i}."),
                             ("what is my name", f"< Your name is Short{i}.")):  # fmt: skip
            start = time.perf_counter()
            reply = await client.put(f"{url}/client?key={KEY}&tts=None", headers=TEXT, content=text)
            slowest = max(slowest, time.perf_counter() - start)
            assert reply.status_code == 200, reply.text
            assert said(reply.text) == [answer]
    return slowest


async def test_200_conversations_on_two_instances_with_tts_links(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """200 concurrent 4-turn V2 text conversations (default: TTS links on), turns
    alternating between two instances: no failed or crossed turn, and a sample of the
    links downloads real audio from either instance."""
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": redis_prefix}
    a = GatewayProcess(env).start()
    gateway_processes.append(a)
    b = GatewayProcess(env).start()
    gateway_processes.append(b)

    async def conversation(i: int, client: httpx.AsyncClient) -> list[str]:
        headers = dict(TEXT)
        answers = []
        turns = ("#intro", f"my name is User{i}", f"message {i}", "what is my name")
        for n, text in enumerate(turns):
            url = (a, b)[(i + n) % 2].url
            reply = await client.put(f"{url}/client?key={KEY}", headers=headers, content=text)
            assert reply.status_code == 200, reply.text
            headers["Cookie"] = f"flowstorm-session-id={reply.cookies['flowstorm-session-id']}"
            answers.append(reply.text)
        return answers

    start = time.perf_counter()
    # no keep-alive: a connection idle past the server's keep-alive on a loaded machine
    # may be closed by the server just as the client reuses it (a client-side race)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        results = await asyncio.gather(*(conversation(i, client) for i in range(200)))
    elapsed = time.perf_counter() - start
    named: list[str] = []
    for i, answers in enumerate(results):
        assert "demo bot" in answers[0]
        assert said(answers[1]) == [f"< Nice to meet you, User{i}."]
        assert said(answers[2]) == [f"< You said: message {i}"]
        assert said(answers[3]) == [f"< Your name is User{i}."]
        for answer in answers:  # every spoken line has its link
            assert len(links(answer)) == len([s for s in said(answer) if s.startswith("<")])
        named += links(answers[3])
    assert len(set(named)) == 200  # "Your name is UserN." differs per conversation
    print(f"200 conversations x 4 turns on 2 instances: {elapsed:.1f} s")

    sample = random.Random(7).sample(named, 6) + links(results[0][0])[:1]
    async with httpx.AsyncClient(timeout=60) as client:
        for n, path in enumerate(sample):
            first, second = ((a, b), (b, a))[n % 2]
            got = await client.get(first.url + path)  # synthesized here ...
            assert got.status_code == 200, got.text
            assert got.headers["content-type"] == "audio/mpeg"
            assert decode_mp3(got.content).duration_s > 0.5
            again = await client.get(second.url + path)  # ... and cached for the other
            assert again.status_code == 200
            assert again.content == got.content


async def test_links_do_not_tell_what_was_said(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """A link id is an HMAC under the gateway's key: the SHA-256 of a sentence said, or
    a forged id, is a 404 like any id never issued."""
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": redis_prefix}
    gw = GatewayProcess(env).start()
    gateway_processes.append(gw)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        await client.put(f"/client?key={KEY}", headers=TEXT, content="my name is Walter")
        asked = await client.put(f"/client?key={KEY}", headers=TEXT, content="what is my name")
        (path,) = links(asked.text)
        assert (await client.get(path)).status_code == 200
        for voice in ("piper:en_US-joe-medium",):  # the old id: SHA-256 of the request
            plain = json.dumps(["tts/1", "Your name is Walter.", False, voice, "mp3"])
            old_id = hashlib.sha256(plain.encode()).hexdigest()
            assert (await client.get(f"/file/tts/{old_id}.mp3")).status_code == 404
        file_id = path.rsplit("/", 1)[1].removesuffix(".mp3")
        forged = ("0" if file_id[0] != "0" else "1") + file_id[1:]
        missing = await client.get(f"/file/tts/{forged}.mp3")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"


async def test_long_items_are_synthesized_in_bounded_memory(
    gateway_processes: list[GatewayProcess],
) -> None:
    """Items of 2,000 and 10,000 characters (the demo echoes them; default settings):
    their links are issued at once, speak the first GATEWAY_TTS_MAX_CHARS characters,
    and the gateway's peak RSS grows by less than 150 MB while short conversations are
    answered meanwhile."""
    gw = GatewayProcess({}).start()
    gateway_processes.append(gw)
    assert gw.proc is not None
    pid = gw.proc.pid
    started = memory_kb(pid)
    async with httpx.AsyncClient(base_url=gw.url, timeout=300) as client:
        warm = await client.put(f"/client?key={KEY}", headers=TEXT, content="hello there")
        (warm_link,) = links(warm.text)
        assert (await client.get(warm_link)).status_code == 200  # Piper loaded, one piece
        warmed = memory_kb(pid)
        paths = []
        # endless sentences of words, the second with numbers (many phonemes per character)
        for n, phrase in ((2_000, "the quick brown fox jumps over the lazy dog "),
                          (10_000, "the 42 quick brown foxes jump over 7 lazy dogs ")):  # fmt: skip
            words = (phrase * (n // len(phrase) + 1))[:n].strip()
            reply = await client.put(f"/client?key={KEY}", headers=TEXT, content=words)
            assert reply.status_code == 200
            assert said(reply.text) == [f"< You said: {words}"]
            (link,) = links(reply.text)
            # the text answer does not wait for speech: its link is not synthesized yet (a
            # HEAD never synthesizes; a pending link has no Content-Length, a cached one
            # has); was: the answer within 5 s of wall clock
            pending = await client.head(link)
            assert pending.status_code == 200, pending.text
            assert "content-length" not in pending.headers, pending.headers
            assert pending.headers["cache-control"] == "no-cache"
            paths.append(link)
        assert len(paths) == 2

        async def fetch(path: str) -> float:
            got = await client.get(path)
            assert got.status_code == 200, got.text
            return decode_mp3(got.content).duration_s

        fetching = asyncio.gather(*(fetch(p) for p in paths))
        await asyncio.sleep(0.5)
        slowest = max(await asyncio.gather(*(short_conversation(gw.url, i) for i in range(5))))
        durations = await fetching
    peak = memory_kb(pid)
    print(
        f"gateway RSS: {started['VmRSS'] / 1024:.0f} MB at start; peak "
        f"{warmed['VmHWM'] / 1024:.0f} MB after one short synthesis, "
        f"{peak['VmHWM'] / 1024:.0f} MB after 2,000 + 10,000 characters "
        f"(speech {durations[0]:.0f} s + {durations[1]:.0f} s); slowest short turn "
        f"meanwhile {slowest:.2f} s"
    )
    # both items are cut at GATEWAY_TTS_MAX_CHARS (1500 characters)
    assert all(30 < d < 400 for d in durations)
    assert peak["VmHWM"] - warmed["VmHWM"] < 150 * 1024


async def test_saturated_speech_is_refused_promptly_while_text_is_served(
    gateway_processes: list[GatewayProcess],
) -> None:
    """More concurrent /file/tts misses than the pool takes (1 running + 8 queued by
    default): the excess gets 503 + Retry-After at once; text turns go on meanwhile."""
    gw = GatewayProcess({}).start()
    gateway_processes.append(gw)
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
        paths = []
        for i in range(30):
            reply = await client.put(
                f"/client?key={KEY}", headers=TEXT, content=f"saturation number {i}"
            )
            paths += links(reply.text)
        assert len(paths) == 30

        done: list[str] = []  # what completed, in order: a fetch's status, or "text"

        async def fetch(path: str) -> tuple[int, float, httpx.Response]:
            begin = time.perf_counter()
            got = await client.get(path)
            done.append(str(got.status_code))
            return got.status_code, time.perf_counter() - begin, got

        async def text(i: int) -> float:
            slowest = await short_conversation(gw.url, i)
            done.append("text")
            return slowest

        fetching = asyncio.gather(*(fetch(p) for p in paths))
        await asyncio.sleep(0.2)
        slowest = max(await asyncio.gather(*(text(i) for i in range(5))))
        results = await fetching
        metrics = (await client.get("/metrics")).text
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    print(
        f"30 concurrent /file/tts misses: {len(served)} served, {len(refused)} refused "
        f"(slowest refusal {max((r[1] for r in refused), default=0):.2f} s); slowest "
        f"short text turn meanwhile {slowest:.2f} s"
    )
    assert len(served) + len(refused) == 30
    assert len(served) >= 1
    assert len(refused) >= 10  # 30 at once into 1 + 8 places (some finish meanwhile)
    for _, _, answer in refused:
        assert answer.headers["retry-after"] == "2"
        assert answer.headers["content-type"] == "application/problem+json"
    for _, _, answer in served:
        assert decode_mp3(answer.content).duration_s > 0.5
    # prompt: every refusal and every text turn came while the pool still synthesized,
    # before the last synthesis was served (not after the queue drained); was: each
    # refusal < 3 s and the slowest text turn < 5 s of wall clock
    last_served = max(i for i, what in enumerate(done) if what == "200")
    assert all(i < last_served for i, what in enumerate(done) if what in ("503", "text")), done
    assert "gateway_tts_rejected_total" in metrics
    assert "gateway_tts_queue_depth" in metrics
    assert "gateway_tts_wait_seconds_count" in metrics
