"""The master secret key: derivation per purpose, and where the key comes from
(GATEWAY_SECRET_KEY, set-if-absent in the real Redis, per process), also when
Redis is down at startup and comes up later (a real redis-server started late)."""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import ValidationError

from gateway.app import create_app
from gateway.secrets import (
    TTS_ID,
    TWILIO_STREAM_TOKEN,
    VOICEFLOW_SESSION_KEY,
    SecretKeys,
    Source,
    _log_end,
    derive_key,
    load_secret_keys,
)
from gateway.sessions import redis_client
from gateway.settings import Settings
from tests.conftest import free_port, serve, unless_hung

MASTER = "m" * 40


def source_of(keys: SecretKeys) -> Source:
    """``keys.source`` as declared: an earlier assert would narrow it for mypy for good,
    while the retry in the background changes it (see tests.conftest.state_of)."""
    return keys.source


def test_each_purpose_has_its_own_stable_key() -> None:
    purposes = [VOICEFLOW_SESSION_KEY, TWILIO_STREAM_TOKEN, TTS_ID]
    keys = [derive_key(MASTER.encode(), p) for p in purposes]
    assert len(set(keys)) == 3
    assert all(len(k) == 32 for k in keys)
    assert keys == [derive_key(MASTER.encode(), p) for p in purposes]  # every instance alike
    assert derive_key(b"n" * 40, TTS_ID) != keys[2]
    # RFC 5869 HKDF-SHA256, no salt, info = the purpose
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=b"tts-id").derive(MASTER.encode())
    assert keys[2] == expected
    with pytest.raises(ValueError, match="master"):
        derive_key(b"", TTS_ID)
    with pytest.raises(ValueError, match="purpose"):
        derive_key(b"x" * 32, "")


def test_the_setting_needs_32_characters() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(secret_key="short")
    for blank in (" " * 40, "\t\n " * 20, " x" * 31):
        with pytest.raises(ValidationError, match="not whitespace"):
            Settings(secret_key=blank)
    assert Settings(secret_key="").secret_key is None
    assert Settings(secret_key=MASTER).secret_key is not None


async def test_the_setting_wins(redis_url: str, redis_prefix: str) -> None:
    client = redis_client(redis_url)
    try:
        keys = await load_secret_keys(MASTER, client, prefix=redis_prefix)
        assert (keys.master, keys.source, keys.shared) == (MASTER.encode(), "setting", True)
        assert await client.get(f"{redis_prefix}:secret-key") is None  # Redis not touched
    finally:
        await client.aclose()


async def test_instances_with_only_redis_share_one_key(redis_url: str, redis_prefix: str) -> None:
    """Many processes starting at once (separate clients) all end with the same key."""
    clients = [redis_client(redis_url) for _ in range(8)]
    try:
        loaded = await asyncio.gather(
            *(load_secret_keys(None, c, prefix=redis_prefix) for c in clients)
        )
        assert {k.source for k in loaded} == {"redis"}
        assert len({k.master for k in loaded}) == 1
        stored = await clients[0].get(f"{redis_prefix}:secret-key")
        assert stored == loaded[0].master
        assert len(stored) == 64  # 32 random bytes, hex
        assert await clients[0].ttl(f"{redis_prefix}:secret-key") == -1  # never expires
        later = await load_secret_keys(None, clients[0], prefix=redis_prefix)
        assert later.key(TTS_ID) == loaded[3].key(TTS_ID)
    finally:
        for c in clients:
            await c.aclose()


async def test_without_redis_the_key_is_per_process(caplog: pytest.LogCaptureFixture) -> None:
    one, two = await load_secret_keys(None, None), await load_secret_keys(None, None)
    assert (one.source, one.shared) == ("process", False)
    assert one.master != two.master
    assert one.key(TTS_ID) != two.key(TTS_ID)
    [warning] = [r for r in caplog.records if "GATEWAY_SECRET_KEY" in r.getMessage()][:1]
    assert warning.levelno == logging.WARNING
    assert "per-process" in warning.getMessage()


async def test_redis_down_at_startup_then_up_the_shared_key_is_adopted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if shutil.which("redis-server") is None:  # scripts/test installs it
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    client = redis_client(f"redis://127.0.0.1:{port}/0")
    server: asyncio.subprocess.Process | None = None
    try:
        # startup is not held up: Redis is not started until after this returns, so
        # returning at all, with the per-process key and the log line, is not waiting for
        # it (was also: < 5 s of wall clock; now a 30 s hang guard)
        keys = await unless_hung(load_secret_keys(None, client, prefix="gw"), "startup")
        assert keys.source == "process"
        assert any("until Redis answers" in r.getMessage() for r in caplog.records)
        provisional = keys.key(TTS_ID)
        server = await asyncio.create_subprocess_exec(
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(300):  # the retry comes every 1, 2, 4, 5, 5 ... s
            if source_of(keys) == "redis":
                break
            await asyncio.sleep(0.05)
        assert source_of(keys) == "redis"
        assert keys.master == await client.get("gw:secret-key")
        assert keys.key(TTS_ID) == derive_key(keys.master, TTS_ID) != provisional
    finally:
        await keys.aclose()
        await client.aclose()
        if server is not None:
            server.terminate()
            await server.wait()


async def test_instances_converge_again_when_redis_loses_the_shared_key(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted without its data: an instance started since stored a new key, the
    running ones kept the old, and their stream tokens failed each other, silently. Each
    instance now puts its key back when it is gone and adopts the key Redis holds."""
    client = redis_client(redis_url)
    name = f"{redis_prefix}:secret-key"
    a = await load_secret_keys(None, client, prefix=redis_prefix, check_s=0.05)
    b = await load_secret_keys(None, client, prefix=redis_prefix, check_s=0.05)
    try:
        assert a.master == b.master
        old = a.master
        await client.delete(name)  # the data is lost: one of them puts its key back
        for _ in range(100):
            if await client.get(name) == old:
                break
            await asyncio.sleep(0.02)
        assert await client.get(name) == old
        assert (a.master, b.master) == (old, old)  # nothing changed for anybody
        await client.set(name, "f" * 64)  # an instance started meanwhile stored its own
        for _ in range(100):
            if a.master == b.master == b"f" * 64:
                break
            await asyncio.sleep(0.02)
        assert a.master == b.master == b"f" * 64
        assert a.key(TTS_ID) == derive_key(b"f" * 64, TTS_ID)
        assert any("lost its data" in r.getMessage() for r in caplog.records)
    finally:
        await a.aclose()
        await b.aclose()
        await client.delete(name)
        await client.aclose()


async def test_the_retry_stops_at_shutdown() -> None:
    client = redis_client("redis://127.0.0.1:1/0")  # nothing listens
    keys = await load_secret_keys(None, client)
    retry = keys._retry
    assert retry is not None
    assert not retry.done()
    await keys.aclose()
    assert retry.done()
    assert keys.source == "process"
    await client.aclose()


def test_random_keys_differ() -> None:
    assert SecretKeys.random().master != SecretKeys.random().master


async def test_startup_warnings_with_redis_down_do_not_say_it_is_unset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With GATEWAY_REDIS_URL set and Redis not answering at startup, the Voiceflow and
    Twilio warnings said 'no GATEWAY_REDIS_URL' and pointed at the wrong setting."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens
    with caplog.at_level(logging.WARNING):
        async with serve(create_app(settings)):
            pass
    random_key = [r.getMessage() for r in caplog.records if "until Redis answers" in r.getMessage()]
    # the key's own and Twilio's (Voiceflow's was the same again); Twilio's now says its
    # calls are refused until then (its stream tokens need the shared key)
    assert any("per-process key" in text for text in random_key), random_key
    assert any("Twilio" in text and "refused (503)" in text for text in random_key), random_key
    assert not any("GATEWAY_REDIS_URL" in text for text in random_key), random_key


async def test_a_shared_key_that_is_not_utf8_is_checked_and_put_back(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A shared key of bytes that are not UTF-8 (written by another hand than the gateway's,
    which writes hex): the background check decoded it to put it back, raised
    UnicodeDecodeError on its first round and ended, silently (a Redis that lost its data
    then left this instance on a key nobody else had), and ``aclose`` raised it at
    shutdown. Now the bytes go back as they are, the check goes on, and a check task that
    ends by an error is logged at ERROR."""
    client = redis_client(redis_url)
    name = f"{redis_prefix}:secret-key"
    binary = bytes(range(128, 256)) + b"\xff\xfe" * 8
    await client.set(name, binary)
    keys = await load_secret_keys(None, client, prefix=redis_prefix, check_s=0.05)
    try:
        assert keys.master == binary
        assert keys._retry is not None
        await asyncio.sleep(0.2)  # a few checks
        assert not keys._retry.done()
        await client.delete(name)  # the data is lost: this instance puts its key back
        for _ in range(100):
            if await client.get(name) == binary:
                break
            await asyncio.sleep(0.02)
        assert await client.get(name) == binary
        assert keys.master == binary
        assert not keys._retry.done()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await keys.aclose()  # no error raised at shutdown
        await client.delete(name)
        await client.aclose()


async def test_a_key_task_that_fails_is_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A background key task ending by an error (it runs until cancelled) is one ERROR
    saying the shared key is no longer checked, with the error; a cancelled one is
    not logged."""

    async def broken() -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    failed = asyncio.create_task(broken())
    await asyncio.wait({failed})
    _log_end(failed)
    [record] = [r for r in caplog.records if r.name == "gateway.secrets"]
    assert record.levelno == logging.ERROR
    assert "no longer read or checked" in record.getMessage()
    assert "UnicodeDecodeError" in record.getMessage()
    cancelled = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait({cancelled})
    _log_end(cancelled)
    assert len([r for r in caplog.records if r.name == "gateway.secrets"]) == 1
