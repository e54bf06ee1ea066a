"""V2 conversations across gateway processes that share one Redis: alternating turns,
restarts, load, and a realtime speech turn whose PUT and GET reach different processes.

The text tests turn TTS links off (``tts=None``): they measure turns, not synthesis.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from gateway.speech.audio import Pcm
from tests.adapters.flowstorm.v2.helpers import (
    CHUNK_MS,
    at,
    check_link,
    check_turn,
    pcm_chunks,
    realtime_turn,
)
from tests.conftest import GatewayProcess, serve, start_all
from tests.gateway.core_app import make_core

KEY = "scale-test"
TEXT = {"Content-Type": "text/plain"}


def env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": prefix}


async def say(client: httpx.AsyncClient, url: str, text: str) -> str:
    answer = await client.put(f"{url}/client?key={KEY}&tts=None", headers=TEXT, content=text)
    assert answer.status_code == 200, answer.text
    return answer.text


async def test_two_processes_serve_alternate_turns(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    a, b = (
        GatewayProcess(env(redis_url, redis_prefix)),
        GatewayProcess(env(redis_url, redis_prefix)),
    )
    gateway_processes += [a, b]
    start_all(a, b)
    async with httpx.AsyncClient() as client:  # one cookie jar, two gateways
        assert "demo bot" in await say(client, a.url, "#intro")
        assert await say(client, b.url, "my name is Alan") == "< Nice to meet you, Alan.\n"
        assert await say(client, a.url, "what is my name") == "< Your name is Alan.\n"
        assert await say(client, b.url, "my name is Ada") == "< Nice to meet you, Ada.\n"
        assert await say(client, a.url, "what is my name") == "< Your name is Ada.\n"
        assert await say(client, b.url, "bye") == "< Goodbye, Ada!\n.\n"


async def test_restart_mid_conversation_loses_nothing(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    first = GatewayProcess(env(redis_url, redis_prefix)).start()
    gateway_processes.append(first)
    async with httpx.AsyncClient() as client:
        await say(client, first.url, "#intro")
        await say(client, first.url, "my name is Grace")
        first.stop(signal.SIGKILL)  # a crash, not a polite stop
        second = GatewayProcess(env(redis_url, redis_prefix), port=first.port).start()
        gateway_processes.append(second)
        assert await say(client, second.url, "what is my name") == "< Your name is Grace.\n"
        second.stop(signal.SIGTERM)
        third = GatewayProcess(env(redis_url, redis_prefix), port=first.port).start()
        gateway_processes.append(third)
        assert await say(client, third.url, "what is my name") == "< Your name is Grace.\n"


async def test_200_concurrent_conversations_of_5_turns(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """No turn is lost or crossed: each conversation hears exactly its own answers."""
    server = GatewayProcess(env(redis_url, redis_prefix)).start()
    gateway_processes.append(server)
    # a kept-alive connection is reused only within 1 s of its last answer, well inside
    # the server's keep-alive (GATEWAY_KEEP_ALIVE_TIMEOUT_S, 75 s): httpx's default expiry
    # is 5 s too, counted from when the client read the answer (later than the server's
    # timer started), so a PUT could go out on a connection the server was closing just
    # then (HTTP/1.1's race of an idle close and a new request; a PUT is not retried)
    limits = httpx.Limits(max_connections=200, keepalive_expiry=1.0)

    async def conversation(i: int, pool: httpx.AsyncClient) -> tuple[str, list[str]]:
        headers = dict(TEXT)
        answers = []
        for text in ("#intro", f"my name is User{i}", f"message {i}", "what is my name", "bye"):
            answer = await pool.put(
                f"{server.url}/client?key={KEY}&tts=None", headers=headers, content=text
            )
            assert answer.status_code == 200, answer.text
            answers.append(answer.text)
            if text == "bye":  # the session ended: its cookie is cleared
                assert 'flowstorm-session-id=""' in answer.headers["set-cookie"]
                break
            headers["Cookie"] = f"flowstorm-session-id={answer.cookies['flowstorm-session-id']}"
        return headers["Cookie"], answers

    async with httpx.AsyncClient(limits=limits, timeout=60) as pool:
        results = await asyncio.gather(*(conversation(i, pool) for i in range(200)))
    for i, (_, answers) in enumerate(results):
        assert "demo bot" in answers[0]
        assert answers[1] == f"< Nice to meet you, User{i}.\n"
        assert answers[2] == f"< You said: message {i}\n"
        assert answers[3] == f"< Your name is User{i}.\n"
        assert answers[4] == f"< Goodbye, User{i}!\n.\n"
    assert len({cookie for cookie, _ in results}) == 200  # 200 distinct sessions


async def test_realtime_put_and_get_on_two_processes(
    redis_url: str,
    redis_prefix: str,
    gateway_processes: list[GatewayProcess],
    corpus: dict[str, Pcm],
) -> None:
    """The PUT streams audio to one process, the parallel GET reads the recognition from
    the other (Redis bus); the TTS links of either download from both (Redis cache)."""
    speech_env = {**env(redis_url, redis_prefix), "GATEWAY_TTS_PROVIDER": "espeak-ng"}
    a, b = GatewayProcess(speech_env), GatewayProcess(speech_env)
    gateway_processes += [a, b]
    await asyncio.to_thread(start_all, a, b)
    sentence = "tell me about this place"
    quiet = b"\x00" * (16000 * CHUNK_MS // 1000 * 2)
    async with httpx.AsyncClient(timeout=60) as client:
        intro = await client.put(
            f"{b.url}/client?key={KEY}", headers={"Content-Type": "application/json"},
            content=json.dumps({"type": "Input", "input": {"transcript": {"text": "#intro"}}}),
        )  # fmt: skip
        first = json.loads(intro.text.splitlines()[0])
        await check_link(client, first["responseItem"]["audio"], "mp3", files_from=a.url)
        turn = await realtime_turn(
            client,
            "",
            "audio/basic",
            pcm_chunks(at(corpus[sentence], 16000)),
            tail=quiet,
            put_url=a.url,
            get_url=b.url,
            key=KEY,
        )
        heard = await check_turn(client, turn.put, sentence, files_from=b.url)
    got = [json.loads(line) for line in turn.get_lines]
    assert len(got) >= 2
    assert [e["isFinal"] for e in got] == [False] * (len(got) - 1) + [True]
    assert got[-1]["input"]["transcript"]["text"] == heard
    assert turn.get_ended <= turn.put_answered + 0.05


async def test_a_turn_on_a_killed_instance_frees_its_session_within_one_lease(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    """SIGKILL an instance while a turn holds the session's lock (the core holds the
    answer); the next turn on the other instance starts when the lease runs out
    (GATEWAY_LOCK_LEASE_S = 3 s; it was turn timeout + 5 s = 35 s here before)."""
    lease_s = 3.0
    core = make_core()
    async with serve(core) as core_url, httpx.AsyncClient(timeout=60) as client:
        settings = {
            "GATEWAY_PIPELINE": f"{core_url}/hold-on?text=hold",
            "GATEWAY_TURN_TIMEOUT_S": "30",
            "GATEWAY_LOCK_LEASE_S": str(lease_s),
        }
        a = GatewayProcess(env(redis_url, redis_prefix) | settings)
        b = GatewayProcess(env(redis_url, redis_prefix) | settings)
        gateway_processes += [a, b]
        start_all(a, b)
        try:
            assert await say(client, a.url, "hello") == "< core heard hello\n"  # the cookie
            held = asyncio.create_task(say(client, a.url, "hold"))
            for _ in range(400):  # the turn runs on a: it holds the lock, the core holds it
                if len(core.state.requests) == 2:
                    break
                await asyncio.sleep(0.025)
            assert [r["input"]["transcript"]["text"] for r in core.state.requests] == [
                "hello",
                "hold",
            ]
            a.stop(signal.SIGKILL)
            killed = time.monotonic()
            assert await say(client, b.url, "next") == "< core heard next\n"
            answered = time.monotonic() - killed
            started = core.state.requests[-1]["_received_at"] - killed  # b's turn reached the core
            print(
                f"\nafter SIGKILL the turn on the other instance started in {started:.2f} s, "
                f"answered in {answered:.2f} s"
            )
            # the lease left at the kill is 2 to 3 s (renewed every second); generous margin
            assert 1.0 < started < lease_s + 3.0
            with pytest.raises(httpx.HTTPError):
                await held  # the killed instance's client lost its connection
            # the killed turn saved nothing: b's turn saw the session as "hello" left it
            assert [r["turn"] for r in core.state.requests] == [1, 2, 2]
        finally:
            core.state.release.set()
