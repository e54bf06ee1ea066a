"""The WebSocket driver on a real socket (uvicorn, a websockets client): guarded sends, the
action runner, the turn forwarder with the real turn engine, idle timeout, the speech side
through the listening actions, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close as CloseFrame

from gateway.conversation import Conversation, TurnRejected
from gateway.events import ErrorEvent, Input, ResponseEvent, TurnEvent
from gateway.io.websocket import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    DRAINED_S,
    FrameRate,
    WebSocketDriver,
)
from gateway.logs import session_ref
from gateway.protocol.actions import (
    CancelListening,
    Close,
    EndSession,
    FeedAudio,
    FinishListening,
    Send,
    SendBytes,
    StartListening,
    StartTurn,
)
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.speech.audio import AudioFormat
from gateway.turn import TurnContext
from tests.conftest import serve
from tests.gateway.turns import ctx, engine

log = logging.getLogger("tests.websocket")


@dataclass(frozen=True)
class Stall:
    """An action of the toy protocol that keeps the driver busy ``seconds`` (EchoDriver.other):
    as audio backpressure or a slow send keeps it from reading."""

    seconds: float


@dataclass(frozen=True)
class Unplayable:
    """An action of the toy protocol that fails as it is carried out (EchoDriver.other)."""

    what: str


class Echo:
    """A toy protocol object: ``turn <text>`` starts a turn, ``listen``/``audio``/``done``/
    ``drop`` drive utterance 1, ``close`` closes 4000, ``end`` ends the session, other text
    is echoed upper-cased, bytes reversed. Turn events are sent by their type."""

    def __init__(self, record: list[str], *, unplayable_response: bool = False) -> None:
        self.record = record
        self.ctx = ctx("ws-1")
        self.unplayable_response = unplayable_response
        """Whether a Response comes with an :class:`Unplayable` after its Send."""

    def receive(self, frame: str | bytes) -> list[object]:
        if isinstance(frame, bytes):
            return [SendBytes(frame[::-1])]
        word, _, rest = frame.partition(" ")
        fmt = AudioFormat("LINEAR16", 16000)
        match word:
            case "turn":
                return [StartTurn(self.ctx, Input.of(rest))]
            case "steal":  # a turn in the same session under another application key
                thief = TurnContext(channel="test", session_id="ws-1", app_key="thief")
                return [StartTurn(thief, Input.of(rest))]
            case "close":
                return [Send("bye"), Close(4000, "asked"), Send("never")]
            case "end":
                return [EndSession(self.ctx), Send("ended")]
            case "listen":
                return [StartListening(1, fmt, from_ms=250)]
            case "audio":
                return [FeedAudio(1, rest.encode())]
            case "done":
                return [FinishListening(1)]
            case "drop":
                return [CancelListening(1)]
            case "stall":
                return [Stall(float(rest)), Send("stalled")]
        return [Send(frame.upper())]

    def turn_event(self, event: TurnEvent) -> list[object]:
        if self.unplayable_response and isinstance(event, ResponseEvent):
            return [Send(event.type), Unplayable("the answer's last part")]
        return [Send(event.type)]

    def turn_rejected(self, exc: TurnRejected) -> list[object]:
        return [Send(f"rejected {exc.reason}")]

    def turn_finished(self) -> list[object]:
        self.record.append("turn_finished")
        return [Send("finished")]

    def connection_lost(self) -> list[object]:
        self.record.append("lost")
        return [Send("too late")]


class Ears:
    """The speech side, recording the listening actions it is given."""

    def __init__(self, record: list[str]) -> None:
        self.record = record

    async def start(self, action: StartListening) -> None:
        self.record.append(f"start {action.stream} {action.from_ms}")

    async def feed(self, action: FeedAudio) -> None:
        self.record.append(f"feed {action.stream} {action.data.decode()}")

    async def finish(self, action: FinishListening) -> None:
        self.record.append(f"finish {action.stream}")

    async def cancel(self, action: CancelListening) -> None:
        self.record.append(f"cancel {action.stream}")

    async def close(self) -> None:
        self.record.append("ears closed")


class EchoDriver(WebSocketDriver[object]):
    def __init__(
        self, ws: WebSocket, conversation: Conversation, record: list[str], **options: Any
    ) -> None:
        self.echo = Echo(record, unplayable_response=options.pop("unplayable_response", False))
        self.hold_after: str | None = options.pop("hold_after", None)
        self.idle_s: float | None = options.pop("idle_s", None)
        self.claims: bool = options.pop("claims", False)
        drivers: list[EchoDriver] | None = options.pop("drivers", None)
        self._holding = False
        super().__init__(
            ws, self.echo, conversation, listening=Ears(record), log=log, name="echo", **options
        )
        if drivers is not None:
            drivers.append(self)  # the test calls it (caught_up)

    def received(self, frame: str | bytes) -> Sequence[object]:
        return self.echo.receive(frame)

    def idle_timeout_s(self) -> float | None:
        return self.idle_s

    def holding(self) -> bool:
        return self._holding

    async def run(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, Send) and action.text in ("SessionStarted", "Response"):
                self.echo.record.append(f"sent {action.text}")
            await super().run([action])
            if isinstance(action, Send) and action.text == self.hold_after:
                self._holding = True

    def lost(self) -> Sequence[object]:
        return self.echo.connection_lost()

    async def other(self, action: object) -> None:
        if isinstance(action, Unplayable):
            self.echo.record.append(f"unplayable {action.what}")
            raise RuntimeError(f"{action.what} cannot be carried out")
        if isinstance(action, Stall):
            await asyncio.sleep(action.seconds)
            return
        await super().other(action)

    def failure(self) -> Sequence[object]:
        """As Flowstorm V1 answers a failure of the gateway: an Error frame of source
        ``gateway``, then the driver's close 1011."""
        error = ErrorEvent(text="Internal gateway error.", source="gateway")
        return [Send(error.wire_json()), *super().failure()]

    async def forward(self, start: StartTurn) -> None:
        """With ``claims``, each event inside a claim that records its way in and out."""
        if not self.claims:
            await super().forward(start)
            return

        @contextlib.asynccontextmanager
        async def claim(event: TurnEvent) -> AsyncIterator[bool]:
            self.echo.record.append(f"claim {event.type}")
            try:
                yield True
            finally:
                self.echo.record.append(f"claimed {event.type}")

        await self.forward_claimed(start, claim)


def app(
    record: list[str],
    store: dict[str, Conversation],
    ended: asyncio.Event | None = None,
    **options: Any,
) -> Starlette:
    """The driver's endpoint at ``/ws``; ``ended`` is set when it has returned."""

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        store["engine"] = conversation = engine()
        driver = EchoDriver(ws, conversation, record, **options)
        await driver.serve()
        record.append(f"open={driver.open}")
        await driver.send_text("after the end")  # dropped, never raises
        record.append("sent after the end")
        if ended is not None:
            ended.set()

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


@contextlib.asynccontextmanager
async def client(
    record: list[str], store: dict[str, Conversation], **options: Any
) -> AsyncIterator[ClientConnection]:
    """A websockets client connected to :func:`app` served by uvicorn; on leaving, the
    client closes and the server side's endpoint is waited for (its last record)."""
    ended = asyncio.Event()
    async with serve(app(record, store, ended, **options)) as url:
        async with connect(url.replace("http://", "ws://", 1) + "/ws") as ws:
            yield ws
        await asyncio.wait_for(ended.wait(), 10)


async def test_frames_in_actions_out_and_close_stops_everything() -> None:
    record: list[str] = []
    async with client(record, {}) as ws:
        await ws.send("hello")
        assert await ws.recv() == "HELLO"
        await ws.send(b"abc")
        assert await ws.recv() == b"cba"
        await ws.send("close")
        assert await ws.recv() == "bye"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()  # "never" is not sent after the Close
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "asked")
    assert record[-4:] == ["ears closed", "lost", "open=False", "sent after the end"]


async def test_a_turn_is_forwarded_and_held_back_from_its_response_on() -> None:
    record: list[str] = []
    async with client(record, {}, hold_after="SessionStarted") as ws:
        await ws.send("turn #intro")
        got = [await ws.recv()]
        while got[-1] != "finished":
            got.append(await ws.recv())
    assert got[0] == "SessionStarted"
    assert "ResponseItem" in got
    assert got[-2:] == ["Response", "finished"]
    # SessionStarted went out at once; the rest waited for the end of the turn's stream
    assert record[:3] == ["sent SessionStarted", "turn_finished", "sent Response"]


async def test_a_rejected_turn_is_answered_by_the_protocol() -> None:
    record: list[str] = []
    async with client(record, {}) as ws:
        await ws.send("end")  # no session yet: nothing to end
        assert await ws.recv() == "ended"
        await ws.send("turn #intro")
        while await ws.recv() != "finished":
            pass
        await ws.send("steal hello")  # the engine refuses: the session is another key's
        assert await ws.recv() == "rejected session-foreign"
        await ws.send("sync")
        assert await ws.recv() == "SYNC"  # no turn_finished after a rejection by default


async def test_listening_actions_go_to_the_speech_side_in_order() -> None:
    record: list[str] = []
    async with client(record, {}) as ws:
        for frame in ("listen", "audio one", "audio two", "done", "drop"):
            await ws.send(frame)
        await ws.send("sync")
        assert await ws.recv() == "SYNC"
    assert record[:5] == ["start 1 250", "feed 1 one", "feed 1 two", "finish 1", "cancel 1"]


async def test_caught_up_once_the_frames_the_peer_sent_are_read() -> None:
    """caught_up (a V1 socket's graceful shutdown, before it finishes the utterance) is
    False while the receive loop is held up (a stall: as audio backpressure holds it) with
    the peer's frames unread behind it; once the stall is over it is True when every frame
    the peer had sent was read and carried out (the speech side has all of the audio), not
    before; a loop waiting for frames that do not come is caught up at once."""
    record: list[str] = []
    drivers: list[EchoDriver] = []
    async with client(record, {}, drivers=drivers) as ws:
        await ws.send("sync")
        assert await ws.recv() == "SYNC"
        [driver] = drivers
        assert await asyncio.wait_for(driver.caught_up(5), 5)  # nothing sent: caught up
        await ws.send("listen")
        await ws.send("stall 1")
        for i in range(50):
            await ws.send(f"audio {i}")
        assert not await driver.caught_up(0.2)  # the stall holds the loop (1 s)
        assert await driver.caught_up(10)
        fed = [r for r in record if r.startswith("feed")]  # no await since it returned
        assert fed == [f"feed 1 {i}" for i in range(50)]
        await ws.send("sync")
        while await ws.recv() != "SYNC":
            pass


async def test_a_quiet_peer_is_closed_after_the_idle_timeout() -> None:
    record: list[str] = []
    async with client(record, {}, idle_s=0.2) as ws:
        await ws.send("hi")
        assert await ws.recv() == "HI"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == CLOSE_GOING_AWAY


async def test_end_session_ends_it_in_the_engine() -> None:
    record: list[str] = []
    engines: dict[str, Conversation] = {}
    async with client(record, engines) as ws:
        await ws.send("turn #intro")
        while await ws.recv() != "finished":
            pass
        await ws.send("end")
        assert await ws.recv() == "ended"
        await ws.send("turn hello")
        assert await ws.recv() == "SessionStarted"  # a new session: the old one ended
        while await ws.recv() != "finished":
            pass


async def until_closed(ws: ClientConnection) -> tuple[list[str | bytes], CloseFrame]:
    """Every frame ``ws`` receives until the server closes it (within 10 s, else
    TimeoutError: a hang), and the server's close frame."""
    got: list[str | bytes] = []
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                got.append(await ws.recv())
    assert closed.value.rcvd is not None  # the server closed, with a code
    return got, closed.value.rcvd


@pytest.mark.parametrize("claims", [False, True], ids=["unclaimed", "claimed"])
async def test_held_actions_that_fail_are_an_error_then_close_1011(
    claims: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The actions held until the turn's stream ended failing as they are carried out
    (forward_turn's failure path): the client gets what went out before the failure (the
    held Response), then the driver's ``failure()`` (an Error of source ``gateway``, as
    V1's) and the close 1011, and nothing after them. The failure is logged once, the
    turn's session was saved, every claim was left, and the connection ends as any does
    (the speech side closed, ``lost``, the endpoint returns)."""
    record: list[str] = []
    engines: dict[str, Conversation] = {}
    options = {"hold_after": "SessionStarted", "unplayable_response": True, "claims": claims}
    with caplog.at_level(logging.INFO, logger=log.name):
        async with client(record, engines, **options) as ws:
            await ws.send("turn #intro")
            got, rcvd = await until_closed(ws)  # a failure never answered: a hang
            assert rcvd.code == CLOSE_INTERNAL
            assert rcvd.reason == "Internal gateway error."
    assert got[0] == "SessionStarted"
    assert got[-2] == "Response"  # held, sent before the action that failed
    assert json.loads(got[-1]) == {
        "type": "Error",
        "text": "Internal gateway error.",
        "source": "gateway",
    }
    assert "finished" not in got  # turn_finished's actions came after the failed one
    # the held actions ran after the turn's stream ended, in order, up to the failure
    held = record.index("turn_finished")
    assert record[held : held + 3] == [
        "turn_finished",
        "sent Response",
        "unplayable the answer's last part",
    ]
    assert record[-4:] == ["ears closed", "lost", "open=False", "sent after the end"]
    if claims:  # each event's claim was left before the held actions ran
        claims_made = [r for r in record if r.startswith("claim")]
        ins, outs = claims_made[0::2], claims_made[1::2]
        assert [r.replace("claim ", "claimed ") for r in ins] == outs  # each left in turn
        assert outs[-1] == "claimed Response"
        assert record.index("claimed Response") < held
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failed] == [
        f"echo: forwarding a turn of session {session_ref(ctx('ws-1').key)} failed"
    ]
    assert failed[0].exc_info is not None
    assert "the answer's last part cannot be carried out" in str(failed[0].exc_info[1])
    session = await engines["engine"].store.get(ctx("ws-1").key)
    assert session is not None
    assert session.turn_count == 1  # the turn was saved


# ------------------------------------------------------------- frame rate


def test_a_frame_rate_allows_its_burst_then_its_rate() -> None:
    rate = FrameRate(burst=10, per_s=100)
    assert all(rate.take(0.0, 0.0) for _ in range(10))  # the burst, back to back
    assert not rate.take(0.0, 0.0)  # then none
    assert rate.take(0.0, 0.01)  # 10 ms later: one more (100 a second)
    assert not rate.take(0.0, 0.0)
    assert all(rate.take(0.0, 0.02) for _ in range(1000))  # 50 a second: never refused
    # a long pause refills the bucket to its burst, no further
    assert all(rate.take(0.0, 0.0) for _ in range(9))
    assert rate.take(0.0, 60.0)
    assert all(rate.take(0.0, 0.0) for _ in range(9))
    assert not rate.take(0.0, 0.0)
    with pytest.raises(ValueError, match="burst must be >= 1"):
        FrameRate(burst=0, per_s=1)
    with pytest.raises(ValueError, match="per_s > 0"):
        FrameRate(burst=1, per_s=0)


def test_frames_that_piled_up_while_the_driver_was_busy_are_its_backlog() -> None:
    """A peer sending 50 frames a second while the driver is busy 5 s (not reading): the
    250 frames queued meanwhile are read back to back afterwards. The bucket's burst (10)
    would refuse them; the driver's busy time refills it beyond its burst while frames
    stay queued, and a read that waits takes its wait back from that credit (a wait
    between two chunks of the backlog does not drop it). Once the peer has been at its
    own pace as long as the driver was busy, the credit is gone."""
    rate = FrameRate(burst=10, per_s=60)
    assert rate.take(0.0, 0.02)
    assert rate.take(5.0, 0.0)  # the frame read after the stall, then its backlog
    assert all(rate.take(0.0, 0.0) for _ in range(100))
    assert rate.take(0.0, 2 * DRAINED_S)  # its next chunk, a loop iteration later
    assert all(rate.take(0.0, 0.0) for _ in range(150))
    assert all(rate.take(0.0, 0.02) for _ in range(250))  # 5 s at the peer's own pace
    assert all(rate.take(0.0, 0.0) for _ in range(5))
    flood = [rate.take(0.0, 0.0) for _ in range(20)]  # a flood gets the burst, no more
    assert not all(flood)


def test_the_default_frame_rate_absorbs_a_network_stall_of_a_real_time_client() -> None:
    """A V1 client streaming 2.7 ms AudioWorklet quanta (375 frames a second) over a
    network that stalls 7.5 s, then delivers what queued at once: with the default
    settings (a burst of 3,000, 1,000 a second) the 2,812 frames that arrive together
    are within the burst (with 500 and 500, as first set, about 1.3 s of stall
    closed the client 1008); at 50 frames a second a 55 s stall is too. The stall is the
    network's: the driver was not busy (no credit), it waited for the first frame."""
    settings = Settings()
    for per_s, stall_s in ((375, 7.5), (50, 55.0)):
        rate = FrameRate(settings.flowstorm_v1_frame_burst, settings.flowstorm_v1_frames_per_s)
        assert all(rate.take(0.0, 1 / per_s) for _ in range(2 * per_s))  # its own pace
        queued = int(per_s * stall_s)
        assert rate.take(0.0, stall_s)  # the first frame after the stall
        assert all(rate.take(0.0, 0.0) for _ in range(queued - 1))  # the rest at once
        assert all(rate.take(0.0, 1 / per_s) for _ in range(2 * per_s))  # pace again


def test_a_frame_rate_bounds_the_bytes_too() -> None:
    """The frame rate counted frames only: a peer could send its 1,000 frames a second each
    of the largest size (text frames are parsed). With a byte limit each frame also takes
    its size in bytes: the byte burst at once, then the byte rate; the refusal says it was
    the bytes, and names their limit. A frame larger than the byte burst costs the whole
    burst: it is read from a full bucket (its size is the protocol's to refuse)."""
    rate = FrameRate(burst=100, per_s=1000, byte_burst=10_000, bytes_per_s=1_000)
    assert rate.take(0.0, 0.0, 6_000)
    assert rate.take(0.0, 0.0, 4_000)  # the byte burst, in two frames
    assert not rate.take(0.0, 0.0, 1)  # frames left, no bytes
    assert rate.refused == "bytes"
    assert rate.describe() == "at most 10000 bytes at once and 1000 a second"
    assert not rate.take(0.0, 0.5, 600)  # half a second: 500 bytes back
    assert rate.take(0.0, 0.1, 600)  # 600 now
    assert all(rate.take(0.0, 0.1, 100) for _ in range(200))  # within the rate: never
    assert not rate.take(0.0, 0.0, 5_000)
    assert rate.take(0.0, 60.0, 50_000)  # larger than the burst: from a full bucket
    assert not rate.take(0.0, 0.0, 1)
    assert rate.take(0.0, 0.0, 0)  # an empty frame (a V1 ping) costs no bytes
    assert all(rate.take(0.0, 0.0, 0) for _ in range(98))
    assert not rate.take(0.0, 0.0, 0)  # but it is a frame
    assert rate.refused == "frames"
    assert rate.describe() == "at most 100 frames at once and 1000 a second"
    for bad in ({"byte_burst": 0, "bytes_per_s": 1}, {"byte_burst": 1, "bytes_per_s": 0}):
        with pytest.raises(ValueError, match="byte_burst must be >= 1"):
            FrameRate(burst=1, per_s=1, **bad)
    with pytest.raises(ValueError, match="go together"):
        FrameRate(burst=1, per_s=1, byte_burst=1)


def test_bytes_that_piled_up_while_the_driver_was_busy_are_its_backlog() -> None:
    """The busy credit covers the bytes as it covers the frames: a peer sending 32,000
    bytes a second (16 kHz 16-bit audio in 640-byte frames) while the driver is busy 5 s:
    the 160,000 bytes queued meanwhile are read back to back, over a byte burst of 20,000,
    and none is refused (a wait between two chunks of the backlog takes back only its own
    length). Once the peer has been at its own pace as long as the driver was busy, the
    credit is gone: a flood of bytes gets the burst, no more."""
    rate = FrameRate(burst=10_000, per_s=10_000, byte_burst=20_000, bytes_per_s=40_000)
    assert rate.take(0.0, 0.02, 640)
    assert rate.take(5.0, 0.0, 640)  # the frame read after the stall, then its backlog
    assert all(rate.take(0.0, 0.0, 640) for _ in range(100))
    assert rate.take(0.0, 2 * DRAINED_S, 640)  # its next chunk, a loop iteration later
    assert all(rate.take(0.0, 0.0, 640) for _ in range(150))
    assert all(rate.take(0.0, 0.02, 640) for _ in range(250))  # 5 s at its own pace
    flood = [rate.take(0.0, 0.0, 640) for _ in range(40)]  # 25,600 bytes at once
    assert not all(flood)
    assert rate.refused == "bytes"


def test_the_default_byte_rate_absorbs_a_network_stall_of_a_real_time_client() -> None:
    """A V1 client streaming 16 kHz 16-bit audio (32,000 bytes a second, the most V1
    takes) in 20 ms frames over a network that stalls 8 s (the frame burst's stall) and
    then delivers what queued at once, with text events beside it: with the default
    byte limits (4 MiB at once, 256 KiB a second) none is refused; nor is a frame of
    GATEWAY_MAX_BODY_BYTES. The stall is the network's: no busy credit."""
    settings = Settings()
    rate = FrameRate(
        settings.flowstorm_v1_frame_burst,
        settings.flowstorm_v1_frames_per_s,
        byte_burst=settings.flowstorm_v1_byte_burst,
        bytes_per_s=settings.flowstorm_v1_bytes_per_s,
    )
    assert all(rate.take(0.0, 0.02, 640) for _ in range(100))  # its own pace
    assert rate.take(0.0, 8.0, 640)  # the first frame after the stall
    assert all(rate.take(0.0, 0.0, 640) for _ in range(399))  # the rest at once
    assert rate.take(0.0, 0.0, 2_000)  # a text event among them
    assert all(rate.take(0.0, 0.02, 640) for _ in range(100))  # pace again
    assert rate.take(0.0, 0.0, settings.max_body_bytes)  # one frame of the largest size


async def test_a_peer_over_the_byte_rate_is_closed_1008_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer sending big frames within the frame rate but more bytes than the driver's
    byte limit: the frames within it are handled, then the socket is closed 1008 naming
    the byte limit, with one log line (the refusal log's WARNING)."""
    record: list[str] = []
    rate = FrameRate(burst=1000, per_s=1000, byte_burst=20_000, bytes_per_s=5_000)
    with caplog.at_level(logging.INFO, logger=log.name):
        async with client(record, {}, frame_rate=rate) as ws:
            for n in range(100):  # 500 kB in 100 frames
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(f"f{n} " + "x" * 5_000)
            got, rcvd = await until_closed(ws)
    assert rcvd.code == CLOSE_POLICY
    reason = "Too many bytes: at most 20000 bytes at once and 5000 a second."
    assert rcvd.reason == reason
    assert 3 <= len(got) < 20  # the burst (and what came back meanwhile), then the close
    lines = [r for r in caplog.records if "Too many bytes" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.WARNING, f"echo: closing (1008): {reason}")
    ]


async def test_a_peer_over_the_frame_rate_is_closed_1008_once_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer sending more frames than the driver's frame_rate allows: the frames within
    it are handled, the first beyond it is not (no more are read), and the socket is
    closed 1008 naming the limit, with one log line (the refusal log's WARNING)."""
    record: list[str] = []
    with caplog.at_level(logging.INFO, logger=log.name):
        async with client(record, {}, frame_rate=FrameRate(burst=20, per_s=5)) as ws:
            for n in range(200):
                await ws.send(f"f{n}")
            got, rcvd = await until_closed(ws)
    assert rcvd.code == CLOSE_POLICY
    reason = "Too many frames: at most 20 frames at once and 5 a second."
    assert rcvd.reason == reason
    assert 20 <= len(got) < 30  # the burst (and what came back meanwhile), then the close
    assert got == [f"F{n}" for n in range(len(got))]
    lines = [r for r in caplog.records if "Too many frames" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.WARNING, f"echo: closing (1008): {reason}")
    ]
    assert record[-4:] == ["ears closed", "lost", "open=False", "sent after the end"]


async def test_a_real_time_stream_behind_a_stall_is_not_a_flood() -> None:
    """A peer sending 50 frames a second (20 ms audio), with a frame rate of burst 10 and
    60 a second, while the driver stalls 1.5 s (audio backpressure, a slow send): the
    75 frames that pile up meanwhile are read at once afterwards, and none is refused."""
    async with client([], {}, frame_rate=FrameRate(burst=10, per_s=60)) as ws:
        loop = asyncio.get_running_loop()
        await ws.send("stall 1.5")
        start = loop.time()
        for n in range(150):  # 3 s at real time
            await ws.send(f"a{n}")
            await asyncio.sleep(max(start + (n + 1) * 0.02 - loop.time(), 0))
        got = [await ws.recv() for _ in range(151)]
        assert got == ["stalled", *(f"A{n}" for n in range(150))]


async def test_a_real_time_stream_behind_a_stall_on_a_busy_loop_is_not_a_flood() -> None:
    """As above, on the gateway's WebSocket protocol (uvicorn's websockets-sansio, which
    stops reading the socket while a frame waits for the app: the frames that pile up
    during the stall wait in the kernel, read a chunk at a time once the driver reads
    again) and an event loop busy with other work (2 ms a loop iteration, as other
    connections' audio on a loaded gateway): a read between two chunks of the backlog
    waits a loop iteration, over DRAINED_S. That one wait dropped the stall's credit
    (the backlog taken for drained), so the rest of the backlog was refused 1008 after
    about the burst. A wait now takes back only its own length of the credit."""
    opts = {"ws": uvicorn_options(Settings())["ws"]}
    ended = asyncio.Event()
    stop = asyncio.Event()

    async def other_connections() -> None:
        while not stop.is_set():
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:  # their work, 2 ms of CPU
                pass
            await asyncio.sleep(0)

    driver_app = app([], {}, ended, frame_rate=FrameRate(burst=10, per_s=60))
    async with (
        serve(driver_app, **opts) as url,
        connect(url.replace("http://", "ws://", 1) + "/ws") as ws,
    ):
        busy = asyncio.create_task(other_connections())
        try:
            loop = asyncio.get_running_loop()
            await ws.send("stall 1.5")
            start = loop.time()
            pad = "x" * 640  # 20 ms of 16 kHz 16-bit audio
            for n in range(150):  # 3 s at real time
                await ws.send(f"a{n} {pad}")
                await asyncio.sleep(max(start + (n + 1) * 0.02 - loop.time(), 0))
            got = [await ws.recv() for _ in range(151)]  # before: closed 1008
        finally:
            stop.set()
            await busy
        assert got == ["stalled", *(f"A{n} {pad.upper()}" for n in range(150))]
