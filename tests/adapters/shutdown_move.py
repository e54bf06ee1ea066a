"""What the shutdown-move tests (tests/adapters/<carrier>/test_shutdown_move.py) share:
two real ``gateway serve`` instances on real Redis, a fake carrier REST API and a core
that records each turn; the SIGTERM of instance a and its end; the moved call going on
at instance b in the same session without a greeting."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.io.call import MOVED_MARK_S
from tests.adapters.carrier_harness import CarrierHarness
from tests.adapters.twilio.helpers import PUBLIC, until
from tests.calls.carrier_api import CarrierApi, carrier_api
from tests.conftest import GatewayProcess, serve, start_all

Turn = tuple[str, int, str]
"""A turn the recording core took: (sessionId, turn number, input text)."""


def recording_core(turns: list[Turn]) -> FastAPI:
    """A core that records each turn's (sessionId, turn, input text) and answers briefly."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        turns.append((body["sessionId"], body["turn"], text))
        return JSONResponse({"items": [{"text": "Yes."}]})

    return app


@dataclass(frozen=True)
class Instances:
    """Two started gateway instances of one deployment: ``a`` (shut down by the test),
    ``b`` (where the moved calls go on); ``api``: the fake carrier REST API both use;
    ``log``: the file one of them logs to."""

    a: GatewayProcess
    b: GatewayProcess
    api: CarrierApi
    log: Path


@dataclass(frozen=True)
class Deployment:
    """What two gateway instances of a test need: real Redis (``redis_url``, keys under
    ``redis_prefix``), the list that stops the processes after the test
    (``gateway_processes``), a folder for the log (``tmp_path``). The fixture
    ``deployment`` (tests/adapters/conftest.py) gives one."""

    redis_url: str
    redis_prefix: str
    gateway_processes: list[GatewayProcess]
    tmp_path: Path

    def session_ttl(self, channel: str, call_id: str) -> int:
        """The seconds the Redis of the deployment keeps call ``call_id``'s session of
        ``channel`` (``twilio``...) still: Redis's ``TTL`` (-2: there is none)."""
        store: Any = redis.Redis.from_url(self.redis_url)
        try:
            return int(store.ttl(f"{self.redis_prefix}:{{{channel}:{call_id}}}:s"))
        finally:
            store.close()

    async def saved(self, channel: str, call_ids: Sequence[str]) -> None:
        """Wait (15 s) until the sessions of ``call_ids`` of ``channel`` are stored: the
        turns that made them saved them and let go of their locks."""

        def stored() -> bool:
            return all(self.session_ttl(channel, call_id) > 0 for call_id in call_ids)

        assert await until(stored, 15), call_ids

    def held(self, channel: str, call_id: str) -> None:
        """The session of a call moved at shutdown whose new stream has not started is
        kept MOVED_MARK_S at most (a caller who hung up meanwhile leaves none behind for
        its whole timeout)."""
        ttl = self.session_ttl(channel, call_id)
        assert 0 < ttl <= MOVED_MARK_S, ttl

    async def kept(self, channel: str, call_id: str) -> None:
        """The new stream of a moved call started: its session is kept its whole timeout
        again (within 5 s, before any turn saves it)."""
        ttl = functools.partial(self.session_ttl, channel, call_id)
        assert await until(lambda: ttl() > MOVED_MARK_S, 5), ttl()

    @contextlib.asynccontextmanager
    async def two_instances(
        self,
        core: FastAPI,
        carrier_settings: Callable[[str], dict[str, str]],
        logging: Literal["a", "b"] = "a",
    ) -> AsyncIterator[Instances]:
        """Serve ``core`` (its ``/turn`` is the gateway's pipeline) and a fake carrier
        REST API, and start two ``gateway serve`` instances a and b on the real Redis,
        public URL :data:`PUBLIC`, silence timeout 10 min, with the carrier's settings
        ``carrier_settings(api_url)``. The instance named by ``logging`` writes its log
        (level INFO) to ``<tmp_path>/<logging>.log`` (open until the block ends).
        ``RuntimeError`` (from :func:`start_all`) if one does not start."""
        log = self.tmp_path / f"{logging}.log"
        async with serve(core) as core_url, carrier_api() as api:
            env = {
                "GATEWAY_REDIS_URL": self.redis_url,
                "GATEWAY_REDIS_PREFIX": self.redis_prefix,
                "GATEWAY_PUBLIC_URL": PUBLIC,
                **carrier_settings(api.url),
                "GATEWAY_PIPELINE": f"{core_url}/turn",
                "GATEWAY_SILENCE_TIMEOUT_MS": "600000",
            }
            with log.open("wb") as log_file:
                if logging == "a":
                    a = GatewayProcess(env, stderr=log_file, log_level="info")
                    b = GatewayProcess(env)
                else:
                    a = GatewayProcess(env)
                    b = GatewayProcess(env, stderr=log_file, log_level="info")
                self.gateway_processes.extend([a, b])
                start_all(a, b)
                assert a.proc is not None
                yield Instances(a, b, api, log)


async def sigterm(
    instances: Instances, requests: int, first: CarrierHarness, cut: CarrierHarness | None = None
) -> None:
    """SIGTERM to instance a; wait (10 s) until the carrier API took ``requests``
    requests (the move's), then stop the moved call's old stream ``first`` as the carrier
    does and wait (15 s) until the call that was not moved, ``cut``, is closed."""
    a, api = instances.a, instances.api
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    assert await until(lambda: len(api.requests) == requests, 10), api.requests
    await first.stop()  # the carrier stops the old stream of the call it moved
    if cut is not None:
        await cut.wait_for(lambda: cut.close_code is not None, 15)


async def sigterm_once_greeted(
    instances: Instances,
    turns: list[Turn],
    requests: int,
    first: CarrierHarness,
    cut: CarrierHarness,
) -> None:
    """Once both calls, ``first`` and ``cut``, were greeted (two ``turns``, within 30 s),
    :func:`sigterm` (the move's ``requests`` to the carrier API)."""
    assert await until(lambda: len(turns) == 2, 30), turns  # both greetings
    await sigterm(instances, requests, first, cut)


async def exit_code(instance: GatewayProcess) -> int:
    """The exit code of ``instance`` once it has ended (within 30 s)."""
    assert instance.proc is not None
    return await asyncio.to_thread(instance.proc.wait, 30)


async def goes_on_without_a_greeting(second: CarrierHarness, turns: list[Turn]) -> None:
    """The moved call's new stream ``second`` (after the two calls' greetings) gets no
    greeting: the caller has the floor, and a key pressed is the next turn (within 15 s)."""
    await asyncio.sleep(1.0)  # no greeting: the caller has the floor
    assert second.media_frames() == []
    assert len(turns) == 2
    await second.dtmf("5")
    assert await until(lambda: len(turns) == 3, 15), turns
    assert second.close_code is None


def assert_moved_in_its_session(turns: list[Turn], moved: str, cut: str) -> None:
    """Both calls were greeted once; the moved call's key was its session's second turn."""
    assert sorted(turns[:2]) == sorted([(moved, 1, "#intro"), (cut, 1, "#intro")])
    assert turns[2] == (moved, 2, "5")  # the same session, its second turn
