"""SIGTERM during V2 turns: every turn that was accepted completes and is saved, none is
cut, new connections are refused, and ``gateway serve`` exits 0 (twice SIGTERM too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from adapters.flowstorm.v1.protocol import REQUEST_REFUSED_TEXT, UTTERANCE_LOST_TEXT
from adapters.flowstorm.v1.routes import CLOSE_RESERVE_S, DRAIN_READ_MS, drain_read_s
from adapters.flowstorm.v2.hearing import NOTHING_SAID_TEXT
from adapters.flowstorm.v2.hearing import UTTERANCE_LOST_TEXT as UTTERANCE_LOST_TEXT_V2
from gateway.speech.audio import Pcm, silence
from tests.adapters.flowstorm.v1.helpers import (
    init_frame,
    open_stream,
    pcm_at,
    recv_json,
    request_frame,
    send_audio,
    send_json,
    ws_url,
)
from tests.conftest import GatewayProcess, serve, unless_hung
from tests.speech import normalise, wer

TURNS = 30


def slow_core(
    arrived: list[str], all_in: asyncio.Event, release: asyncio.Event, turns: int = TURNS
) -> FastAPI:
    """A core that holds every turn until the test releases it; ``all_in`` is set when
    ``turns`` turns have arrived."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        arrived.append(text)
        if len(arrived) == turns:
            all_in.set()
        await release.wait()
        return JSONResponse({"items": [{"text": f"done {text}"}]})

    return app


async def v2_lines(client: httpx.AsyncClient, url: str, done: asyncio.Event) -> list[str]:
    """The non-blank lines of a Flowstorm V2 GET of ``url`` (a session's long poll) until
    its answer ends; sets ``done`` then (also when it fails)."""
    lines: list[str] = []
    try:
        async with client.stream("GET", url) as got:
            async for line in got.aiter_lines():
                if line.strip():
                    lines.append(line)
    finally:
        done.set()
    return lines


async def test_sigterm_lets_accepted_turns_finish(
    gateway_processes: list[GatewayProcess],
) -> None:
    arrived: list[str] = []
    all_in, release = asyncio.Event(), asyncio.Event()
    async with serve(slow_core(arrived, all_in, release)) as core:
        proc = GatewayProcess({"GATEWAY_PIPELINE": f"{core}/turn"}).start()
        gateway_processes.append(proc)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as c:

            async def turn(i: int) -> httpx.Response:
                return await c.put(
                    f"{proc.url}/client?key=k&tts=None",
                    headers={"Content-Type": "text/plain"},
                    content=f"turn {i}",
                )

            burst = [asyncio.create_task(turn(i)) for i in range(TURNS)]
            await asyncio.wait_for(all_in.wait(), 30)  # every turn is accepted, at the core
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the gateway is shutting down with 30 turns open
            with_new = await asyncio.gather(turn(999), return_exceptions=True)
            release.set()
            answers = await asyncio.gather(*burst)
        exit_code = await asyncio.to_thread(proc.proc.wait, 30)
    assert sorted(a.text for a in answers) == sorted(f"< done turn {i}\n" for i in range(TURNS))
    assert all(a.status_code == 200 for a in answers)
    # a request after SIGTERM is not taken (connection refused or 503), never half-served
    [new] = with_new
    assert isinstance(new, httpx.HTTPError) or (
        isinstance(new, httpx.Response) and new.status_code == 503
    ), new
    assert exit_code == 0  # a graceful stop is a success (not killed by its SIGTERM: 143)


async def test_sigterm_twice_a_running_turn_is_saved_and_the_exit_status_is_0(
    gateway_processes: list[GatewayProcess], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A second SIGTERM (an impatient operator, a supervisor that repeats it) changes
    nothing: the turn the core holds finishes, is answered and saved; nothing is logged
    at ERROR; the process exits 0 (uvicorn raised the signal again once it had stopped,
    and its default action killed the process: status -15, a container's 143)."""
    arrived: list[str] = []
    all_in, release = asyncio.Event(), asyncio.Event()
    log_path = tmp_path / "gateway.log"
    async with serve(slow_core(arrived, all_in, release, turns=1)) as core:
        with log_path.open("wb") as log_file:
            env = {
                "GATEWAY_PIPELINE": f"{core}/turn",
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_REDIS_PREFIX": redis_prefix,
            }
            proc = GatewayProcess(env, stderr=log_file, log_level="info").start()
            gateway_processes.append(proc)
            assert proc.proc is not None
            async with httpx.AsyncClient(timeout=30) as client:
                running = asyncio.create_task(
                    client.put(
                        f"{proc.url}/client?key=k&tts=None",
                        headers={"Content-Type": "text/plain"},
                        content="the last words",
                    )
                )
                await asyncio.wait_for(all_in.wait(), 30)  # the turn is at the core
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                with pytest.raises(httpx.ConnectError):  # no longer accepting
                    await client.get(f"{proc.url}/healthz")
                release.set()
                answer = await running
            exit_code = await asyncio.to_thread(proc.proc.wait, 30)
    assert (answer.status_code, answer.text) == (200, "< done the last words\n")
    assert exit_code == 0
    logged = log_path.read_text()
    assert "Finished server process" in logged
    assert " ERROR " not in logged, logged
    store = redis.Redis.from_url(redis_url)
    try:
        [key] = list(store.scan_iter(match=f"{redis_prefix}:{{flowstorm:*}}:s"))
        saved = json.loads(store.get(key) or b"{}")
    finally:
        store.close()
    assert saved["turn_count"] == 1


def held_core(hold_s: float, arrived: list[str], came: asyncio.Event) -> FastAPI:
    """A core that takes ``hold_s`` for every turn, answering ``done <text>``; ``came``
    is set when a turn arrives."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        text = (await request.json())["input"]["transcript"]["text"]
        arrived.append(text)
        came.set()
        await asyncio.sleep(hold_s)
        return JSONResponse({"items": [{"text": f"done {text}"}]})

    return app


async def test_sigterm_a_websocket_turn_waiting_for_its_session_lock_is_saved(
    gateway_processes: list[GatewayProcess], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A turn whose socket was closed (1012) at SIGTERM while it waited for its
    session's lock (another turn of the session held it) is drained by the lifespan
    for GATEWAY_LOCK_WAIT_S + GATEWAY_TURN_TIMEOUT_S + 1 s, the time such a turn may
    take: it was drained for GATEWAY_TURN_TIMEOUT_S + 1 s only, then its core call was
    cut (the pipeline closed under it) and the session was never saved. The client that
    resumes on another instance with ``lastSeq`` gets its answer.

    The sockets wait for their turns' answers only as long as GATEWAY_SHUTDOWN_TIMEOUT_S
    (2 s here) leaves; then each gets an Error of source ``gateway`` saying its answer was
    not ready, before the 1012 close (it got the close alone, at once)."""
    arrived: list[str] = []
    came = asyncio.Event()
    log_path = tmp_path / "gateway.log"
    env = {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": redis_prefix,
        "GATEWAY_TURN_TIMEOUT_S": "3",
        "GATEWAY_LOCK_WAIT_S": "5",
        "GATEWAY_SHUTDOWN_TIMEOUT_S": "2",  # the sockets are closed before the turns end
    }
    session_id = "drained-after-its-lock"
    async with serve(held_core(2.5, arrived, came)) as core:
        env["GATEWAY_PIPELINE"] = f"{core}/turn"
        with log_path.open("wb") as log_file:
            proc = GatewayProcess(env, stderr=log_file, log_level="info").start()
            gateway_processes.append(proc)
            assert proc.proc is not None
            first = await connect(ws_url(proc.url))
            second = await connect(ws_url(proc.url))
            for ws in (first, second):
                await send_json(ws, init_frame("k", tts="None"))
                assert (await recv_json(ws))["type"] == "Ready"
            await send_json(first, request_frame("first", session_id))
            await asyncio.wait_for(came.wait(), 10)  # the first turn holds the lock
            assert arrived == ["first"]
            await send_json(second, request_frame("second", session_id))
            await asyncio.sleep(0.3)  # the second turn waits for the lock
            proc.proc.send_signal(signal.SIGTERM)
            # told, then closed, within GATEWAY_SHUTDOWN_TIMEOUT_S, not at the end of the
            # turns: each socket's last word is the Error that its answer was not ready
            # (sockets that waited for their turns would get the turns' Responses), then
            # the 1012 close; their turns go on (was also: < 4 s of wall clock after the
            # signal; the receive guards are 30 s)
            for ws in (first, second):
                told = await unless_hung(recv_json(ws), "the shutdown's Error")
                while told["type"] == "SessionStarted":  # the turn's first event
                    told = await unless_hung(recv_json(ws), "the shutdown's Error")
                assert (told["type"], told.get("source")) == ("Error", "gateway"), told
                assert "answer was not ready" in told["text"]
                with pytest.raises(ConnectionClosed):
                    await unless_hung(ws.recv(), "the 1012 close")
                assert ws.close_code == 1012
            exit_code = await asyncio.to_thread(proc.proc.wait, 30)
        assert exit_code == 0
        assert arrived == ["first", "second"]
        logged = log_path.read_text()
        assert "still running at shutdown" not in logged, logged
        assert " ERROR " not in logged, logged
        store = redis.Redis.from_url(redis_url)
        try:
            saved = json.loads(store.get(f"{redis_prefix}:{{flowstorm:{session_id}}}:s") or b"{}")
        finally:
            store.close()
        assert saved["turn_count"] == 2

        other = GatewayProcess(env).start()
        gateway_processes.append(other)
        async with connect(ws_url(other.url)) as ws:
            await send_json(
                ws, {**init_frame("k", tts="None"), "sessionId": session_id, "lastSeq": 0}
            )
            texts: list[str] = []
            async with asyncio.timeout(10):
                while "done second" not in texts:
                    frame = await recv_json(ws)
                    if frame["type"] == "Response":
                        texts += [item["text"] for item in frame["response"]["items"]]
        assert texts == ["done first", "done second"]


async def _busy_and_idle_at_sigterm(
    gateway_processes: list[GatewayProcess], core: str, came: asyncio.Event
) -> tuple[GatewayProcess, ClientConnection, ClientConnection]:
    """A gateway process on the core at ``core`` (its ``/turn``), two Flowstorm V1 sockets
    made ready (``tts=None``), a turn ("mid-turn") running on the first (``came``: set by
    the core once it has it), then SIGTERM: (the process, the busy socket, the idle one)."""
    proc = GatewayProcess({"GATEWAY_PIPELINE": f"{core}/turn"}).start()
    gateway_processes.append(proc)
    assert proc.proc is not None
    busy = await connect(ws_url(proc.url))
    idle = await connect(ws_url(proc.url))
    for ws in (busy, idle):
        await send_json(ws, init_frame("k", tts="None"))
        assert (await recv_json(ws))["type"] == "Ready"
    await send_json(busy, request_frame("mid-turn"))
    await asyncio.wait_for(came.wait(), 10)
    proc.proc.send_signal(signal.SIGTERM)
    return proc, busy, idle


async def test_sigterm_a_v1_turn_running_gets_its_answer_before_the_1012_close(
    gateway_processes: list[GatewayProcess],
) -> None:
    """A Flowstorm V1 turn running at SIGTERM: uvicorn closed its socket with 1012 at once,
    so the (stock) client never got the Response (only a client resuming with ``lastSeq``
    on another instance did). Its socket is now closed once its turn has answered, within
    GATEWAY_SHUTDOWN_TIMEOUT_S; an idle socket is closed at once."""
    arrived: list[str] = []
    came = asyncio.Event()
    async with serve(held_core(2.5, arrived, came)) as core:
        proc, busy, idle = await _busy_and_idle_at_sigterm(gateway_processes, core, came)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(2):  # the turn has 2.5 s to go: idle is not waited for
                await idle.recv()
        assert idle.close_code == 1012
        frames = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    frames.append(json.loads(await busy.recv()))
        assert busy.close_code == 1012
        responses = [f for f in frames if f["type"] == "Response"]
        assert [i["text"] for r in responses for i in r["response"]["items"]] == ["done mid-turn"]
        assert not [f for f in frames if f["type"] == "Error"], frames
        assert proc.proc is not None
        exit_code = await asyncio.to_thread(proc.proc.wait, 30)
    assert exit_code == 0


async def test_sigterm_a_v1_request_during_the_drain_is_refused_before_the_1012_close(
    gateway_processes: list[GatewayProcess],
) -> None:
    """A Flowstorm V1 socket whose turn runs at SIGTERM, waited for by the drain: its
    client sends another Request meanwhile (the user typed again). It got the client's
    Error "a turn is still running" (wait for the Response, then send it again: to a socket
    that then closed 1012). It is now refused with an Error of source ``gateway`` saying
    the gateway restarts and the request was not run (send it again after reconnecting);
    no turn runs for it; the running turn's Response still comes, then 1012."""
    arrived: list[str] = []
    came = asyncio.Event()
    async with serve(held_core(2.5, arrived, came)) as core:
        proc, busy, idle = await _busy_and_idle_at_sigterm(gateway_processes, core, came)
        # the idle socket closed: the drain began on every socket (busy's waits for its turn)
        assert await until_closed(idle) == []
        assert idle.close_code == 1012
        await send_json(busy, request_frame("typed again"))
        frames = await until_closed(busy)
        assert busy.close_code == 1012
        frames = [f for f in frames if f["type"] != "SessionStarted"]  # the turn's, earlier
        assert [f["type"] for f in frames] == ["Error", "Response"], frames
        assert (frames[0]["source"], frames[0]["text"]) == ("gateway", REQUEST_REFUSED_TEXT)
        assert [i["text"] for i in frames[-1]["response"]["items"]] == ["done mid-turn"]
        assert arrived == ["mid-turn"]  # no turn for the refused Request
        assert proc.proc is not None
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        assert_nothing_failed(proc)


def test_the_v1_drain_reads_ahead_at_most_300_ms_and_never_past_the_shutdown_timeout() -> None:
    """The V1 drain reads what the client already sent before it finishes an utterance and
    before its 1012 close (a Request sent just before gets the refused Error): that read
    waited its full 300 ms even when the shutdown had less left (earlier phases, or the
    turns' answers, used GATEWAY_SHUTDOWN_TIMEOUT_S up), so the shutdown could run up to
    0.3 s past it. Its budget is now min(300 ms, what is left), never below 0."""
    assert DRAIN_READ_MS == 300
    assert drain_read_s(5.0) == 0.3  # the 1 s kept for the close: the whole read
    assert drain_read_s(0.3) == 0.3
    assert drain_read_s(0.12) == pytest.approx(0.12)  # only what the shutdown has left
    assert drain_read_s(0.0) == 0.0
    assert drain_read_s(-0.4) == 0.0  # the shutdown's time is over: no read at all
    assert CLOSE_RESERVE_S >= DRAIN_READ_MS / 1000  # a drain in time reads in full


async def test_sigterm_a_v1_request_sent_as_the_drain_closes_is_refused_before_1012(
    gateway_processes: list[GatewayProcess],
) -> None:
    """A V1 client answers its turn's Response at once with the next Request, while the
    drain, which waited for that turn, closes the socket: the Request was read after the
    close (1012 alone, nothing said of it: the client could not tell whether it ran), or
    just before it (a turn started whose answer the close cut: the answer-lost Error). The
    drain now reads what the client sent before it closes, and refuses a Request from
    its start on: the Error of source ``gateway`` that the request was not run, then
    1012; no turn ran for it."""
    arrived: list[str] = []
    came = asyncio.Event()
    async with serve(held_core(1.0, arrived, came)) as core:
        proc = GatewayProcess({"GATEWAY_PIPELINE": f"{core}/turn"}).start()
        gateway_processes.append(proc)
        assert proc.proc is not None
        ws = await connect(ws_url(proc.url))
        await send_json(ws, init_frame("k", tts="None"))
        assert (await recv_json(ws))["type"] == "Ready"
        await send_json(ws, request_frame("mid-turn"))
        await asyncio.wait_for(came.wait(), 10)
        proc.proc.send_signal(signal.SIGTERM)
        frames: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    frames.append(json.loads(await ws.recv()))
                    if frames[-1]["type"] == "Response":
                        await send_json(ws, request_frame("next"))  # at once, as answered
        assert ws.close_code == 1012
        assert [f["type"] for f in frames] == ["SessionStarted", "Response", "Error"], frames
        assert (frames[-1]["source"], frames[-1]["text"]) == ("gateway", REQUEST_REFUSED_TEXT)
        assert arrived == ["mid-turn"]
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        assert_nothing_failed(proc)


async def test_sigterm_a_realtime_put_answered_while_its_audio_still_arrives_gets_its_answer(
    gateway_processes: list[GatewayProcess],
) -> None:
    """A realtime PUT running at SIGTERM is answered when its recognition ends (here:
    the shutdown finishes it, and its silence gives the 503 of source ``gateway``, no
    turn), while the client still writes the audio it sent before the GET told it to
    stop. uvicorn, its keep-alive off for the shutdown, closed the connection with that
    input unread: the kernel reset it and the client lost the answer (httpx ReadError)
    of a turn that ran and was saved. The connection now lingers (FIN after the answer,
    input read and dropped, gateway/server.py LINGER_S) as refused ones do."""
    proc = GatewayProcess({}).start()
    gateway_processes.append(proc)
    process = proc.proc
    assert process is not None
    async with httpx.AsyncClient(timeout=30) as client:
        intro = await client.put(
            f"{proc.url}/client?key=k&tts=None",
            headers={"Content-Type": "text/plain"},
            content="#intro",
        )
        assert intro.cookies["flowstorm-session-id"]  # the client sends it from now on
        told_to_stop = asyncio.Event()

        async def audio() -> AsyncIterator[bytes]:
            for frame in range(1000):  # 20 ms of μ-law silence each, until told
                if told_to_stop.is_set():
                    return
                yield b"\xff" * 160
                if frame == 25:  # the turn runs: stop the gateway
                    process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.02)

        async def follow() -> httpx.Response:
            await asyncio.sleep(0.3)  # the PUT has begun
            recognition = await client.get(f"{proc.url}/client?key=k")
            await asyncio.sleep(0.3)  # a round trip later the client hears of its end
            told_to_stop.set()
            return recognition

        following = asyncio.create_task(follow())
        answer = await client.put(
            f"{proc.url}/client?key=k&tts=None&realtime=1&sttSampleRate=8000&sttEncoding=MULAW",
            headers={"Content-Type": "audio/basic"},
            content=audio(),
        )
        assert (await following).status_code == 200
    exit_code = await asyncio.to_thread(process.wait, 30)
    assert answer.status_code == 503
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [(e["type"], e["text"]) for e in lines] == [("Error", NOTHING_SAID_TEXT)], lines
    assert exit_code == 0


# ------------------------------------------------ Flowstorm V1: an utterance at SIGTERM

PLACE = "tell me about this place"
WEATHER = "what is the weather like today"


async def speaking_socket(url: str, speech: bytes) -> ClientConnection:
    """A V1 socket (no TTS) whose client opened an audio stream and sent ``speech``
    (LINEAR16 at 16 kHz) without closing the stream, whose every frame the gateway has read:
    a second InputAudioStreamOpen, refused with an Error, comes back after them (frames are
    taken in order), so the utterance is open and being heard (no final: no trailing
    silence for the endpointer, and the wall-clock guard is seconds away)."""
    ws = await connect(ws_url(url))
    await send_json(ws, init_frame("k", tts="None"))
    assert (await recv_json(ws))["type"] == "Ready"
    await open_stream(ws)
    await send_audio(ws, speech, 16000)
    await send_json(ws, {"type": "InputAudioStreamOpen"})
    refused = await recv_json(ws)
    assert (refused["type"], refused["source"]) == ("Error", "client"), refused
    return ws


async def until_closed(
    ws: ClientConnection, talk: bytes = b"", *, hung_after_s: float = 30.0
) -> list[dict[str, Any]]:
    """The frames ``ws`` gets until the server closes it; from the first frame on (the
    utterance's ``Recognized``: it was finished before) the client streams ``talk``
    (LINEAR16 at 16 kHz, 100 ms frames) as a microphone still on would. ``hung_after_s``:
    the safety net's time (s), never a bound the test checks."""
    microphone: asyncio.Task[None] | None = None

    async def stream() -> None:
        with contextlib.suppress(ConnectionClosed):
            await send_audio(ws, talk, 16000)

    frames: list[dict[str, Any]] = []
    try:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(hung_after_s):  # a safety net, not a bound
                while True:
                    frames.append(json.loads(await ws.recv()))
                    if talk and microphone is None:
                        microphone = asyncio.create_task(stream())
    finally:
        if microphone is not None:
            await microphone
    return frames


def assert_nothing_failed(proc: GatewayProcess) -> None:
    """The stopped ``proc`` logged no ERROR and no traceback (a cancelled utterance, a
    forwarder cancelled at the close)."""
    logged = proc.log_tail(1_000_000)
    assert " ERROR " not in logged, logged
    assert "Traceback" not in logged, logged


def close_to(sentence: str, recognized: str) -> bool:
    """Whether ``recognized`` is within the word error bound of ``sentence``."""
    return wer([(sentence, normalise(recognized))]) <= 0.34


async def test_sigterm_a_v1_utterance_being_heard_is_recognised_and_answered_before_1012(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """A V1 client speaking at SIGTERM (audio stream open, its utterance heard, no final
    yet: no turn) was closed 1012 at once, and what the user had said was lost. The
    utterance is now finished as the client's InputAudioStreamClose would finish it: the
    recognizer's final of what was heard, ``Recognized``, its turn (the demo core's "You
    said: ..."), the Response, then 1012. The microphone goes on streaming another
    sentence after the finish: no second utterance. An utterance of silence only gives no
    turn (the user did not end it: a made-up ``#silence`` would move the dialogue on),
    only the close; an idle socket is closed at once, with no frame."""
    proc = GatewayProcess({}).start()
    gateway_processes.append(proc)
    assert proc.proc is not None
    speaking = await speaking_socket(proc.url, pcm_at(corpus[PLACE], 16000, after_ms=0))
    silent = await speaking_socket(proc.url, silence(400, 16000).data)
    idle = await connect(ws_url(proc.url))
    await send_json(idle, init_frame("k", tts="None"))
    assert (await recv_json(idle))["type"] == "Ready"

    proc.proc.send_signal(signal.SIGTERM)
    went_on = pcm_at(corpus[WEATHER], 16000)  # a whole utterance, trailing silence and all
    told, quiet, nothing = await asyncio.gather(
        until_closed(speaking, went_on), until_closed(silent), until_closed(idle)
    )
    assert [f["type"] for f in told] == ["Recognized", "SessionStarted", "Response"], told
    recognized = told[0]["text"]
    assert close_to(PLACE, recognized), recognized
    assert [i["text"] for i in told[-1]["response"]["items"]] == [f"You said: {recognized}"]
    assert speaking.close_code == 1012
    assert quiet == []
    assert silent.close_code == 1012
    assert nothing == []
    assert idle.close_code == 1012
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


def echo_core(arrived: list[str], came: asyncio.Event, release: asyncio.Event) -> FastAPI:
    """A core that answers ``You said: <text>`` once the test sets ``release``; ``came``
    is set when a turn arrives."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        text = (await request.json())["input"]["transcript"]["text"]
        arrived.append(text)
        came.set()
        await release.wait()
        return JSONResponse({"items": [{"text": f"You said: {text}"}]})

    return app


async def test_sigterm_a_v1_utterance_whose_turn_is_not_answered_in_time_gets_the_error(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """The utterance heard at SIGTERM is recognised and its turn runs, but the core does
    not answer within GATEWAY_SHUTDOWN_TIMEOUT_S (less 1 s): the client gets its
    ``Recognized``, then the Error of source ``gateway`` an unanswered turn gets, then
    1012 (it got the close alone, at once). An idle socket is closed at once: while the
    utterance's turn is still at the core."""
    arrived: list[str] = []
    came, release = asyncio.Event(), asyncio.Event()
    async with serve(echo_core(arrived, came, release)) as core:
        # 9 s for the recognition and the turn: the recognizer's worker, on a loaded
        # machine, takes seconds over the queued audio; the core answers only after the close
        env = {"GATEWAY_PIPELINE": f"{core}/turn", "GATEWAY_SHUTDOWN_TIMEOUT_S": "10"}
        proc = GatewayProcess(env).start()
        gateway_processes.append(proc)
        assert proc.proc is not None
        speaking = await speaking_socket(proc.url, pcm_at(corpus[PLACE], 16000, after_ms=0))
        idle = await connect(ws_url(proc.url))
        await send_json(idle, init_frame("k", tts="None"))
        assert (await recv_json(idle))["type"] == "Ready"
        proc.proc.send_signal(signal.SIGTERM)
        told = asyncio.create_task(until_closed(speaking))
        assert await until_closed(idle) == []
        assert idle.close_code == 1012
        assert not told.done()  # the utterance's socket waits for its turn meanwhile
        frames = await told
        release.set()
        assert [f["type"] for f in frames[:1]] == ["Recognized"], frames
        assert close_to(PLACE, frames[0]["text"]), frames
        assert arrived == [frames[0]["text"]]  # its turn ran
        last = frames[-1]
        assert (last["type"], last["source"]) == ("Error", "gateway"), frames
        assert "answer was not ready" in last["text"]
        assert "Response" not in [f["type"] for f in frames]
        assert speaking.close_code == 1012
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        assert_nothing_failed(proc)


async def test_sigterm_a_v1_utterance_not_recognised_in_time_gets_an_error_before_1012(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """GATEWAY_SHUTDOWN_TIMEOUT_S 1 s leaves no time (less 1 s for the server) to finish
    the utterance heard at SIGTERM: its recognition cannot end in time. The client gets an
    Error of source ``gateway`` saying the answer was not ready and that the utterance was
    not recognised (no turn ran: nothing to resume), then 1012; it got the close alone."""
    env = {"GATEWAY_SHUTDOWN_TIMEOUT_S": "1"}
    proc = GatewayProcess(env).start()
    gateway_processes.append(proc)
    assert proc.proc is not None
    speaking = await speaking_socket(proc.url, pcm_at(corpus[PLACE], 16000, after_ms=0))
    proc.proc.send_signal(signal.SIGTERM)
    frames = await until_closed(speaking)
    assert [(f["type"], f.get("source")) for f in frames] == [("Error", "gateway")], frames
    assert frames[0]["text"] == UTTERANCE_LOST_TEXT
    assert "answer was not ready" in frames[0]["text"]
    assert speaking.close_code == 1012
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


async def test_sigterm_a_v1_stream_in_which_nothing_was_said_not_recognised_in_time_gets_no_error(
    gateway_processes: list[GatewayProcess],
) -> None:
    """GATEWAY_SHUTDOWN_TIMEOUT_S 1 s leaves no time to finish the streams open at SIGTERM,
    but nothing was said in these: a Duplex stream quiet while its client listens (its
    utterance waits for a voice onset), a stream of silence, and one opened just before the
    signal with no audio yet. Each got the Error of an utterance lost ("reconnect and say
    it again") though the user had said nothing; now only the close 1012, as a silent
    stream whose result comes in time gets (no ``#silence`` turn, no Error)."""
    env = {"GATEWAY_SHUTDOWN_TIMEOUT_S": "1"}
    proc = GatewayProcess(env).start()
    gateway_processes.append(proc)
    assert proc.proc is not None
    quiet = await connect(ws_url(proc.url))
    await send_json(quiet, init_frame("k", tts="None", sttMode="Duplex"))
    assert (await recv_json(quiet))["type"] == "Ready"
    await open_stream(quiet)
    await send_audio(quiet, silence(1000, 16000).data, 16000)
    await open_stream(quiet)  # a Duplex stream's Open again: acknowledged after the audio
    silent = await speaking_socket(proc.url, silence(400, 16000).data)
    opening = await speaking_socket(proc.url, b"")
    proc.proc.send_signal(signal.SIGTERM)
    told = await asyncio.gather(until_closed(quiet), until_closed(silent), until_closed(opening))
    assert list(told) == [[], [], []]
    assert [ws.close_code for ws in (quiet, silent, opening)] == [1012, 1012, 1012]
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


def streaming_until_closed(url: str, signal_it: Callable[[], None]) -> list[Frame]:
    """A V1 client on a raw socket (websockets' sans-I/O client): Init, then audio frames
    (ignored: no stream open) every 3 ms; ``signal_it()`` once Ready came. It reads
    nothing more while it streams, only peeks: once the server's close frame has arrived
    it streams on for 0.3 s (the time a busy client takes to read it), then reads. The
    frames it got (the close frame last when it came); none when a send failed (the
    server reset the connection: an asyncio client's transport then closes, unread data
    and all)."""
    host, port = url.removeprefix("http://").split(":")
    client = ClientProtocol(parse_uri(ws_url(url)))
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        client.send_request(client.connect())
        sock.sendall(b"".join(client.data_to_send()))
        while client.state is not State.OPEN:
            client.receive_data(sock.recv(65536))
        client.send_text(json.dumps(init_frame("k", tts="None")).encode())
        sock.sendall(b"".join(client.data_to_send()))
        got: list[Frame] = []
        while not any(isinstance(e, Frame) for e in got):
            client.receive_data(sock.recv(65536))
            got += [e for e in client.events_received() if isinstance(e, Frame)]
            sock.sendall(b"".join(client.data_to_send()))
        signal_it()
        closed_at: float | None = None
        while closed_at is None or time.monotonic() - closed_at < 0.3:
            client.send_binary(bytes(3200))
            sock.sendall(b"".join(client.data_to_send()))
            time.sleep(0.003)
            with contextlib.suppress(BlockingIOError):
                seen = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                if closed_at is None and b"\x88" in seen:  # a close frame's first byte
                    closed_at = time.monotonic()
    except (ConnectionResetError, BrokenPipeError):
        # the server reset the connection: the sends fail, and a client gives up on it
        # (asyncio's transport closes on a write error), what it had not read yet lost
        sock.close()
        return []
    frames: list[Frame] = []
    with contextlib.suppress(OSError):
        while not any(f.opcode is Opcode.CLOSE for f in frames):
            data = sock.recv(65536)
            if not data:
                break
            client.receive_data(data)
            frames += [e for e in client.events_received() if isinstance(e, Frame)]
            sock.sendall(b"".join(client.data_to_send()))  # the echo of the close
    sock.close()
    return frames


async def test_sigterm_a_v1_socket_whose_client_still_streams_gets_the_close_frame(
    gateway_processes: list[GatewayProcess],
) -> None:
    """A V1 client streaming audio when its socket is closed 1012 at shutdown (idle here:
    audio without an open stream is ignored) still sends until it has read the close
    frame. The server's shutdown cut the connection right after that frame, with audio
    unread or still coming: a TCP reset, and the client lost the close frame (and what
    came just before it, e.g. the Response of its utterance): it saw 1006. The closing
    handshake now ends the connection (the client's echo; gateway/server.py LINGER_S)."""
    proc = GatewayProcess({}).start()
    gateway_processes.append(proc)
    process = proc.proc
    assert process is not None
    frames = await asyncio.to_thread(
        streaming_until_closed, proc.url, lambda: process.send_signal(signal.SIGTERM)
    )
    closes = [f for f in frames if f.opcode is Opcode.CLOSE]
    assert closes, frames  # not a reset
    assert Close.parse(closes[0].data).code == 1012
    assert await asyncio.to_thread(process.wait, 30) == 0


async def test_sigterm_a_v1_duplex_utterance_being_heard_is_answered_before_1012(
    gateway_processes: list[GatewayProcess],
    corpus: dict[str, Pcm],
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A V1 client with ``sttMode: Duplex`` speaking at SIGTERM: its utterance is finished
    as at InputAudioStreamClose (the stream's last), and its result is reported with the
    stream's end first (CancelListening of the utterance, from inside its own report: its
    listening task ends, cancelled, while the report's Recognized and turn still go out).
    The shutdown waited for that task only, found no turn yet and closed 1012 at once: the
    client had the Recognized, or nothing, never its Response. Now the report is waited
    for too: ``Recognized``, the turn's ``Response``, then 1012."""
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": redis_prefix}
    proc = GatewayProcess(env).start()
    gateway_processes.append(proc)
    assert proc.proc is not None
    ws = await connect(ws_url(proc.url))
    await send_json(ws, init_frame("k", tts="None", sttMode="Duplex", silenceTimeout=1000))
    assert (await recv_json(ws))["type"] == "Ready"
    # a first turn: the socket follows its session's outbox, so the utterance's turn
    # first catches up on it (Redis round trips inside the utterance's report)
    await send_json(ws, request_frame("hello"))
    while (await recv_json(ws))["type"] != "Response":
        pass
    await open_stream(ws)
    await send_audio(ws, pcm_at(corpus[PLACE], 16000, after_ms=0), 16000)
    # a Duplex stream's Open again is acknowledged after the audio before it is read
    await open_stream(ws)
    proc.proc.send_signal(signal.SIGTERM)
    told = await until_closed(ws)
    assert [f["type"] for f in told] == ["Recognized", "Response"], told
    recognized = told[0]["text"]
    assert close_to(PLACE, recognized), recognized
    assert [i["text"] for i in told[-1]["response"]["items"]] == [f"You said: {recognized}"]
    assert ws.close_code == 1012
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


MUSIC = "play some music please"
TABLE = "i would like to book a table for two"


async def until_gauge(proc: GatewayProcess, gauge: str, value: float) -> None:
    """Poll ``proc``'s ``GET /metrics`` until the unlabelled ``gauge`` reads ``value``
    (a hang guard of 120 s, not a bound)."""

    async def poll() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                text = (await client.get(f"{proc.url}/metrics")).text
                if f"\n{gauge} {float(value)}\n" in f"\n{text}":
                    return
                await asyncio.sleep(0.05)

    await unless_hung(poll(), f"{gauge} reaching {value}", within_s=120)


async def test_sigterm_a_v1_utterance_hears_the_audio_sent_before_the_signal_not_read_yet(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """A V1 client that sent its whole utterance in a burst just before SIGTERM: the
    gateway had not read its end yet (more than MAX_PENDING_AUDIO_MS of it waited for the
    recognizer, so the receive loop stopped reading: backpressure, the rest in uvicorn's
    queue and the socket's buffers). The shutdown finished the utterance with what was read
    and dropped the rest: the ``Recognized`` lacked the last words the user said. The
    receive loop now reads what was received (the backpressure lifted, a few hundred ms at
    most) before the finish: the ``Recognized`` ends with the last sentence.

    Deterministic: one recognizer (GATEWAY_STT_MAX_STREAMS 1), held by another socket's
    utterance being heard (``gateway_stt_streams`` 1 before the burst connects) until the
    shutdown finishes that one; the burst's utterance waits for it meanwhile
    (``gateway_stt_queue_depth`` 1 at the signal), so none of its audio is recognised and
    the receive loop stops after 10 s of it. Its speech has no pause (the sentences back to
    back): no end of speech before the tail. Both sockets get their ``Recognized``,
    ``Response`` and the close 1012.

    Load: the burst's 14 s of audio is recognised after the signal, on a loaded machine
    slower than real time; the 30 s safety net of until_closed (and the 60 s shutdown and
    queue wait) could end the test first (it failed once under load), and nothing made
    sure the holder had the recognizer before the burst asked for one. The queue's wait
    and the shutdown's time are 10 minutes, this test's waits hang guards of that order
    (none a bound the test checks), and the two gauges are waited for."""
    env = {
        "GATEWAY_STT_MAX_STREAMS": "1",
        "GATEWAY_STT_QUEUE_WAIT_MS": "600000",
        "GATEWAY_SHUTDOWN_TIMEOUT_S": "600",
    }
    proc = GatewayProcess(env).start()
    gateway_processes.append(proc)
    assert proc.proc is not None
    url = ws_url(proc.url)
    # the one recognizer is taken by this socket's utterance (being heard, no final)
    holder = await connect(url)
    await send_json(holder, init_frame("k", tts="None", silenceTimeout=60_000))
    assert (await recv_json(holder))["type"] == "Ready"
    await open_stream(holder)
    await send_audio(holder, pcm_at(corpus[PLACE], 16000, after_ms=0), 16000)
    await until_gauge(proc, "gateway_stt_streams", 1)
    # the burst: no write limit, so each send returns once its frame is written to the
    # socket (or the client's buffer): the client has sent all of it before the signal
    burst = await connect(url, write_limit=2**26)
    await send_json(burst, init_frame("k", tts="None", silenceTimeout=60_000))
    assert (await recv_json(burst))["type"] == "Ready"
    await open_stream(burst)
    head = [pcm_at(corpus[s], 16000, before_ms=0, after_ms=0) for s in (MUSIC, TABLE, PLACE)]
    talk = b""
    while len(talk) < 12 * 32000:  # 12 s, over the 10 s that may wait for the recognizer
        talk += b"".join(head)
    tail = pcm_at(corpus[WEATHER], 16000, before_ms=0, after_ms=200)
    await send_audio(burst, talk + tail, 16000)
    await until_gauge(proc, "gateway_stt_queue_depth", 1)  # waiting for the recognizer
    await asyncio.sleep(0.5)  # the gateway reads up to the backpressure's bound meanwhile
    proc.proc.send_signal(signal.SIGTERM)
    held, told = await asyncio.gather(
        until_closed(holder, hung_after_s=700), until_closed(burst, hung_after_s=700)
    )
    assert [f["type"] for f in held] == ["Recognized", "SessionStarted", "Response"], held
    assert close_to(PLACE, held[0]["text"]), held
    assert holder.close_code == 1012
    assert [f["type"] for f in told] == ["Recognized", "SessionStarted", "Response"], told
    words = normalise(told[0]["text"]).split()
    # the last sentence, sent last: heard (the old code: the Recognized ended in the head)
    assert close_to(WEATHER, " ".join(words[-len(WEATHER.split()) :])), told[0]["text"]
    assert [i["text"] for i in told[-1]["response"]["items"]] == [f"You said: {told[0]['text']}"]
    assert burst.close_code == 1012
    assert await asyncio.to_thread(proc.proc.wait, 700) == 0  # a hang guard
    assert_nothing_failed(proc)


# ------------------------------------------- Flowstorm V2: a realtime PUT's utterance at SIGTERM


@dataclass
class RealtimeAnswer:
    """What a V2 client streaming a realtime PUT at SIGTERM got: the PUT's answer (or the
    error that cut it) and the lines of its parallel GET."""

    put: httpx.Response | BaseException
    get_lines: list[str]


async def realtime_put_at_sigterm(
    proc: GatewayProcess, before: bytes, after: bytes, *, pace_before_s: float = 0.0
) -> RealtimeAnswer:
    """A V2 client (cookie from an ``#intro`` text turn, no TTS) streams a realtime PUT of
    LINEAR16 at 16 kHz (``audio/basic``) with a parallel GET: ``before`` in 100 ms chunks
    (every ``pace_before_s``), then SIGTERM to the gateway 0.2 s later (the chunks are
    read by then, the stall bound of 2 s far), then 0.3 s later ``after`` at real-time
    pace (a microphone still on) until the GET ends (recognition ended: the client stops
    writing, as the spec says) or ``after`` runs out."""
    process = proc.proc
    assert process is not None
    step = 16000 * 2 // 10  # 100 ms
    async with httpx.AsyncClient(timeout=60) as client:
        intro = await client.put(
            f"{proc.url}/client?key=k&tts=None",
            headers={"Content-Type": "text/plain"},
            content="#intro",
        )
        assert intro.status_code == 200, intro.text
        stop = asyncio.Event()

        async def microphone() -> AsyncIterator[bytes]:
            for start in range(0, len(before), step):
                yield before[start : start + step]
                await asyncio.sleep(pace_before_s)
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            for start in range(0, len(after), step):
                if stop.is_set():
                    return
                yield after[start : start + step]
                await asyncio.sleep(0.1)

        following = asyncio.create_task(v2_lines(client, f"{proc.url}/client?key=k", stop))
        await asyncio.sleep(0.3)  # the GET waits for the PUT's recognition (marker wait 3 s)
        try:
            put: httpx.Response | BaseException = await client.put(
                f"{proc.url}/client?key=k&tts=None&realtime=1",
                headers={"Content-Type": "audio/basic"},
                content=microphone(),
            )
        except httpx.HTTPError as exc:  # the old code: cut by the server's shutdown
            put = exc
        get_lines = await asyncio.gather(following, return_exceptions=True)
    lines = get_lines[0]
    return RealtimeAnswer(put, lines if isinstance(lines, list) else [repr(lines)])


def recording_core(arrived: list[str]) -> FastAPI:
    """A core that answers ``You said: <text>`` at once, and records every turn's text."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        text = (await request.json())["input"]["transcript"]["text"]
        arrived.append(text)
        return JSONResponse({"items": [{"text": f"You said: {text}"}]})

    return app


def talking_on(corpus: dict[str, Pcm], seconds: float) -> bytes:
    """``seconds`` of speech without pauses (the corpus' sentences, unpadded, over and
    over): no end of speech for the endpointer."""
    sentences = [pcm_at(corpus[s], 16000, before_ms=0, after_ms=0) for s in (WEATHER, PLACE)]
    talk = b""
    while len(talk) < seconds * 32000:
        talk += b"".join(sentences)
    return talk[: int(seconds * 32000) // 2 * 2]


async def test_sigterm_a_v2_realtime_put_being_heard_is_recognised_and_answered(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """A V2 client speaking into a realtime PUT at SIGTERM (its utterance heard, no end of
    speech: the microphone goes on talking) was not finished early: the utterance went on
    (up to GATEWAY_MAX_AUDIO_S and more) past GATEWAY_SHUTDOWN_TIMEOUT_S, and the request
    was cut (a dropped connection), what the user said lost. The utterance is now finished
    at the signal as the body's end would finish it: the recognizer's final of what was
    heard before the signal (the audio after it is dropped), the GET ends with it, and the
    PUT answers: ``RecognizedInput``, the turn's items, the Response; then the gateway
    exits 0."""
    arrived: list[str] = []
    async with serve(recording_core(arrived)) as core:
        env = {"GATEWAY_PIPELINE": f"{core}/turn", "GATEWAY_SHUTDOWN_TIMEOUT_S": "10"}
        proc = GatewayProcess(env).start()
        gateway_processes.append(proc)
        assert proc.proc is not None
        speech = pcm_at(corpus[PLACE], 16000, after_ms=0)
        got = await realtime_put_at_sigterm(proc, speech, talking_on(corpus, 20))
        assert isinstance(got.put, httpx.Response), got.put
        assert got.put.status_code == 200, got.put.text
        lines = [json.loads(line) for line in got.put.text.splitlines()]
        assert [e["type"] for e in lines] == ["RecognizedInput", "ResponseItem", "Response"], lines
        recognized = lines[0]["input"]["transcript"]["text"]
        assert close_to(PLACE, recognized), recognized
        assert arrived == ["#intro", recognized]
        assert lines[1]["responseItem"]["text"] == f"You said: {recognized}"
        final = json.loads(got.get_lines[-1])
        assert (final["isFinal"], final["input"]["transcript"]["text"]) == (True, recognized)
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


async def test_sigterm_a_v2_realtime_put_of_silence_only_gives_no_turn(
    gateway_processes: list[GatewayProcess],
) -> None:
    """A realtime PUT in which nothing was said at SIGTERM (the microphone streams
    silence) went on to its silence timeout and gave the ``#silence`` turn, a made-up
    input moving the dialogue on though the user did not end the stream. It is now
    finished at the signal with no turn: 503 with an ErrorEvent of source ``gateway``
    (``Retry-After``), which the GET gets too."""
    arrived: list[str] = []
    async with serve(recording_core(arrived)) as core:
        proc = GatewayProcess({"GATEWAY_PIPELINE": f"{core}/turn"}).start()
        gateway_processes.append(proc)
        assert proc.proc is not None
        quiet = silence(1000, 16000).data
        got = await realtime_put_at_sigterm(
            proc, quiet, silence(20_000, 16000).data, pace_before_s=0.1
        )
        assert isinstance(got.put, httpx.Response), got.put
        assert (got.put.status_code, got.put.headers.get("retry-after")) == (503, "1")
        [error] = [json.loads(line) for line in got.put.text.splitlines()]
        assert (error["type"], error["source"]) == ("Error", "gateway"), error
        assert error["text"] == NOTHING_SAID_TEXT
        assert [json.loads(line) for line in got.get_lines] == [error]
        assert arrived == ["#intro"]  # no #silence turn
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


async def test_sigterm_a_v2_realtime_put_not_recognised_in_time_gets_the_error(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """GATEWAY_SHUTDOWN_TIMEOUT_S 1 s leaves no time (less 1 s for the server) to
    recognise the utterance being heard at SIGTERM: the request was cut (a dropped
    connection, no error in V2's form). Now it is answered 503 with an ErrorEvent of
    source ``gateway`` saying it was not recognised and no turn ran; no turn ran."""
    arrived: list[str] = []
    async with serve(recording_core(arrived)) as core:
        env = {"GATEWAY_PIPELINE": f"{core}/turn", "GATEWAY_SHUTDOWN_TIMEOUT_S": "1"}
        proc = GatewayProcess(env).start()
        gateway_processes.append(proc)
        assert proc.proc is not None
        speech = pcm_at(corpus[PLACE], 16000, after_ms=0)
        got = await realtime_put_at_sigterm(proc, speech, talking_on(corpus, 20))
        assert isinstance(got.put, httpx.Response), got.put
        assert got.put.status_code == 503, got.put.text
        [error] = [json.loads(line) for line in got.put.text.splitlines()]
        assert (error["type"], error["source"]) == ("Error", "gateway"), error
        assert error["text"] == UTTERANCE_LOST_TEXT_V2
        assert arrived == ["#intro"]
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert_nothing_failed(proc)


async def test_sigterm_a_v2_realtime_put_hears_the_audio_sent_before_the_signal_not_recognised_yet(
    gateway_processes: list[GatewayProcess], corpus: dict[str, Pcm]
) -> None:
    """A V2 client that sent its whole utterance into a realtime PUT in a burst just before
    SIGTERM, none of it recognised yet (the recognizer was busy): the shutdown finishes the
    utterance with ALL of that audio, so the ``RecognizedInput`` ends with the last sentence
    the user said. V1's socket lost that end (its receive loop stopped reading behind the
    speech stage's backpressure, the rest unread at the finish); V2 never had that gap,
    and this pins why: the PUT's body is read as it arrives by a task of its own into the
    body's queue, whatever the recognizer's pace (routes.py ``_Hearing._read``; the
    recognition is fed from that queue, inline, so no backpressure holds the reading), and
    the shutdown's finish is queued behind every chunk read before it (``_Hearing.drain``).
    A reader that waited for the recognizer, as V1's loop did, fails this test: the
    ``RecognizedInput`` ends in the head.

    Deterministic: one recognizer (GATEWAY_STT_MAX_STREAMS 1), held by a V1 socket's
    utterance being heard (its open stream took it at once) until the shutdown finishes
    that one; the PUT's first audio waits for it meanwhile (the queue's wait 60 s), so none
    of the burst is recognised before the signal. Its speech has no pause (the sentences
    back to back): no end of speech before the tail. The V1 socket gets its ``Recognized``,
    ``Response`` and the close 1012; the PUT its ``RecognizedInput`` and turn, and the
    parallel GET the same final text."""
    env = {
        "GATEWAY_STT_MAX_STREAMS": "1",
        "GATEWAY_STT_QUEUE_WAIT_MS": "60000",
        # the burst's 14 s of audio is recognised after the signal, on a loaded machine
        "GATEWAY_SHUTDOWN_TIMEOUT_S": "60",
    }
    proc = GatewayProcess(env).start()
    gateway_processes.append(proc)
    process = proc.proc
    assert process is not None
    # the one recognizer is taken by this socket's utterance (being heard, no final)
    holder = await connect(ws_url(proc.url))
    await send_json(holder, init_frame("k", tts="None", silenceTimeout=60_000))
    assert (await recv_json(holder))["type"] == "Ready"
    await open_stream(holder)
    await send_audio(holder, pcm_at(corpus[PLACE], 16000, after_ms=0), 16000)
    head = [pcm_at(corpus[s], 16000, before_ms=0, after_ms=0) for s in (MUSIC, TABLE, PLACE)]
    talk = b""
    while len(talk) < 12 * 32000:  # 12 s, as V1's test (over its 10 s of backpressure)
        talk += b"".join(head)
    burst = talk + pcm_at(corpus[WEATHER], 16000, before_ms=0, after_ms=200)
    step = 16000 * 2 // 10  # 100 ms chunks, sent without a pause
    async with httpx.AsyncClient(timeout=120) as client:
        intro = await client.put(
            f"{proc.url}/client?key=k&tts=None",
            headers={"Content-Type": "text/plain"},
            content="#intro",
        )
        assert intro.status_code == 200, intro.text
        sent = asyncio.Event()
        stop = asyncio.Event()

        async def microphone() -> AsyncIterator[bytes]:
            for start in range(0, len(burst), step):
                yield burst[start : start + step]
            # httpx asks for more once the last chunk is written to the socket
            sent.set()
            with contextlib.suppress(TimeoutError):  # the body stays open until the GET ends
                async with asyncio.timeout(90):
                    await stop.wait()

        async def signal_it() -> None:
            await sent.wait()
            await asyncio.sleep(0.5)  # the gateway reads what it is given meanwhile
            process.send_signal(signal.SIGTERM)

        following = asyncio.create_task(v2_lines(client, f"{proc.url}/client?key=k", stop))
        await asyncio.sleep(0.3)  # the GET waits for the PUT's recognition (marker wait 3 s)
        signalling = asyncio.create_task(signal_it())
        answer, held = await asyncio.gather(
            client.put(
                f"{proc.url}/client?key=k&tts=None&realtime=1",
                headers={"Content-Type": "audio/basic"},
                content=microphone(),
            ),
            until_closed(holder),
        )
        await signalling
        get_lines = await following
    assert [f["type"] for f in held] == ["Recognized", "SessionStarted", "Response"], held
    assert close_to(PLACE, held[0]["text"]), held
    assert holder.close_code == 1012
    assert answer.status_code == 200, answer.text
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [e["type"] for e in lines] == ["RecognizedInput", "ResponseItem", "Response"], lines
    recognized = lines[0]["input"]["transcript"]["text"]
    words = normalise(recognized).split()
    # the last sentence, sent last: heard (a reader held by the recognizer: the head only)
    assert close_to(WEATHER, " ".join(words[-len(WEATHER.split()) :])), recognized
    assert lines[1]["responseItem"]["text"] == f"You said: {recognized}"
    final = json.loads(get_lines[-1])
    assert (final["isFinal"], final["input"]["transcript"]["text"]) == (True, recognized)
    assert await asyncio.to_thread(process.wait, 60) == 0
    assert_nothing_failed(proc)
