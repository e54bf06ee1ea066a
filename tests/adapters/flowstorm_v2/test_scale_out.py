"""V2 conversations across gateway processes that share one Redis, restarts, and load."""

from __future__ import annotations

import asyncio
import signal

import httpx

from tests.conftest import GatewayProcess

KEY = "scale-test"
TEXT = {"Content-Type": "text/plain"}


def env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": prefix}


async def say(client: httpx.AsyncClient, url: str, text: str) -> str:
    answer = await client.put(f"{url}/client?key={KEY}", headers=TEXT, content=text)
    assert answer.status_code == 200, answer.text
    return answer.text


async def test_two_processes_serve_alternate_turns(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    a = GatewayProcess(env(redis_url, redis_prefix)).start()
    gateway_processes.append(a)
    b = GatewayProcess(env(redis_url, redis_prefix)).start()
    gateway_processes.append(b)
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
    limits = httpx.Limits(max_connections=200)

    async def conversation(i: int, pool: httpx.AsyncClient) -> tuple[str, list[str]]:
        headers = dict(TEXT)
        answers = []
        for text in ("#intro", f"my name is User{i}", f"message {i}", "what is my name", "bye"):
            answer = await pool.put(f"{server.url}/client?key={KEY}", headers=headers, content=text)
            assert answer.status_code == 200, answer.text
            headers["Cookie"] = f"flowstorm-session-id={answer.cookies['flowstorm-session-id']}"
            answers.append(answer.text)
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
