"""The I/O side of the shared call engine: one carrier media stream on the WebSocket driver.

Spec: shared/specs/CARRIERS.md; the flow is :mod:`gateway.protocol.call`'s. A route
that admitted a stream (its carrier's token or signature) makes a :class:`CallRunner`
with the carrier's codec and serves it: frames (text or binary) go through
:meth:`CarrierCall.receive`; every inbound audio chunk is heard by the call's one
speech stage (one VAD pass per chunk, its onset drives barge-in at once); audio and
marks go out through a :class:`~gateway.io.websocket.PacedSender`, paced at real time
when the codec says ``realtime``, else sent as fast as they are made; the final mark's
echo (or its grace running out) hangs up through the adapter's ``hang_up`` (else the
socket is closed).

:func:`admit` runs a route's check of a stream's upgrade, refusing (1008 before the
accept: HTTP 403) or accepting it. :class:`CallTokens` issues and checks the per-call
tokens a carrier's answer puts in the stream URL (``/vonage/stream/{token}``):
HMAC-SHA256 over ``call id`` and expiry, used once (the gateway's NonceStore, shared
through Redis).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from starlette.websockets import WebSocket

from gateway import metrics
from gateway.callcodec import CarrierCodec, VerificationRefused, WireFrame
from gateway.deps import Gateway
from gateway.events import ResponseItem
from gateway.io.websocket import SEND_ERRORS, PacedSender, WebSocketDriver
from gateway.protocol import ProtocolError
from gateway.protocol.actions import (
    CancelListening,
    FeedAudio,
    FinishListening,
    StartListening,
)
from gateway.protocol.call import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CallAction,
    CallConfig,
    CarrierCall,
    HangUp,
    Interrupt,
    PausePlayback,
    Play,
    ResumePlayback,
    Speak,
    Transfer,
)
from gateway.sessions import StoreUnavailable
from gateway.settings import Settings
from gateway.speech.audio import AudioFormatError
from gateway.speech.stage import SpeechStage
from gateway.speech.stt import RecognitionError, RecognizerBusy
from gateway.speech.types import Heard

log = logging.getLogger("gateway.call")

IDLE_TIMEOUT_S: Final = 30.0
"""A started stream that sends nothing for this long is closed (carriers stream silence)."""
START_TIMEOUT_S: Final = 10.0
"""Seconds a new stream gets to send its start."""
FINAL_MARK_GRACE_S: Final = 5.0
"""After the last audio's expected end, how long its mark may take before hanging up anyway."""
MAX_BAD_FRAMES: Final = 500
"""Invalid frames one stream may send before it is closed (1008)."""
LOGGED_BAD_FRAMES: Final = 5
LISTEN_BATCH_MS: Final = 60
"""Audio goes to the recognizer in batches of at least this many ms."""
UNPACED_AHEAD_MS: Final = 3_600_000
"""Send-ahead of a carrier that buffers (``realtime`` False): no pacing."""
TOKEN_TTL_S: Final = 300

HangUpHook = Callable[["CallRunner", str], Awaitable[None]]
"""An adapter's hang-up: ``(runner, call id)``; the runner closes the socket after it."""
TransferHook = Callable[["CallRunner", Transfer], Awaitable[None]]
"""An adapter's transfer; the runner closes the socket after it."""
T = TypeVar("T")


def call_config(settings: Settings, channel: str) -> CallConfig:
    """The engine's behaviour for carrier ``channel`` from ``settings`` (the Twilio
    settings name the shared call behaviour: barge-in, DTMF, frame size)."""
    return CallConfig(
        key_allowed=settings.key_allowed,
        channel=channel,
        default_app_key=channel,
        barge_in=settings.twilio_barge_in,
        barge_in_min_speech_ms=settings.twilio_barge_in_min_speech_ms,
        barge_in_backchannels=settings.barge_in_backchannels,
        barge_in_max_backchannel_ms=settings.barge_in_max_backchannel_ms,
        dtmf_mode=settings.twilio_dtmf_mode,
        dtmf_timeout_ms=settings.twilio_dtmf_timeout_ms,
        frame_ms=settings.twilio_frame_ms,
        silence_timeout_ms=settings.silence_timeout_ms,
        vad_min_speech_ms=settings.vad_min_speech_ms,
        error_text=settings.voice_error_text,
    )


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class CallGrant:
    """What a good token grants: a stream for ``call_id`` until ``expires`` (Unix s)."""

    call_id: str
    expires: int
    nonce: str


class CallTokens:
    """Per-call stream tokens: ``base64url(call_id|expires|nonce).hex(hmac)``.

    ``secret`` keys the HMAC-SHA256; ``ttl_s`` is how long a token is good.
    """

    def __init__(self, secret: bytes, ttl_s: int = TOKEN_TTL_S) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, call_id: str, now: float) -> str:
        """A fresh token for ``call_id`` (up to 128 characters, no ``|``).

        Raises ValueError for a call id that is empty, too long or holds ``|``."""
        if not call_id or len(call_id) > 128 or "|" in call_id:
            raise ValueError(f"invalid call id {call_id!r}")
        body = f"{call_id}|{int(now) + self.ttl_s}|{secrets.token_hex(8)}".encode()
        text = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{text}.{self._sign(text)}"

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:32]

    def check(self, token: str, now: float) -> CallGrant:
        """The grant of an authentic, unexpired ``token``.

        Raises VerificationRefused (403): malformed, forged or expired."""
        text, _, mac = token.partition(".")
        if len(token) > 512 or not mac or not hmac.compare_digest(mac, self._sign(text)):
            raise VerificationRefused("the stream token is malformed or forged")
        try:
            body = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            call_id, expires, nonce = body.split("|")
            grant = CallGrant(call_id, int(expires), nonce)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise VerificationRefused("the stream token is malformed") from None
        if grant.expires < now:
            raise VerificationRefused(f"the stream token of call {call_id} has expired")
        return grant


async def use_token(gw: Gateway, tokens: CallTokens, carrier: str, token: str) -> CallGrant:
    """The grant of a good, unused ``token`` (marked used on every instance).

    Raises VerificationRefused (forged, expired, used, or the store is down)."""
    now = time.time()
    grant = tokens.check(token, now)
    try:
        fresh = await gw.nonces.use_once(
            f"{carrier}:stream:{grant.nonce}", max(grant.expires - now, 1)
        )
    except StoreUnavailable as exc:
        raise VerificationRefused("the one-time token store is unavailable") from exc
    if not fresh:
        raise VerificationRefused(f"the stream token of call {grant.call_id} was used already")
    return grant


async def admit(websocket: WebSocket, carrier: str, check: Awaitable[T]) -> T | None:
    """Admit a carrier's stream: await the route's ``check`` of the upgrade (a token,
    credentials), then accept the WebSocket; ``check``'s value (a :class:`CallGrant`).

    None when ``check`` raised VerificationRefused (logged, naming ``carrier``; the
    upgrade is closed with 1008 before the accept, which the client sees as HTTP 403)
    or the peer left before the accept. A ``check`` with nothing to grant returns True.
    """
    try:
        granted = await check
    except VerificationRefused as exc:
        log.warning("%s stream refused: %s", carrier, exc.reason)
        with contextlib.suppress(*SEND_ERRORS):
            await websocket.close(code=CLOSE_POLICY)  # before accept: HTTP 403
        return None
    try:
        await websocket.accept()
    except SEND_ERRORS:
        return None
    return granted


# ------------------------------------------------------------------ listening


class _Listening:
    """The speech side of one call: one speech stage (one VAD pass per chunk, made
    when the stream's rate is known) and a task per utterance (see Twilio's)."""

    def __init__(
        self, gw: Gateway, call: CarrierCall, run: Callable[[Sequence[CallAction]], Awaitable[None]]
    ) -> None:
        self.gw = gw
        self.call = call
        self._run = run
        self._stream = 0
        self._task: asyncio.Task[None] | None = None
        self._speech: SpeechStage | None = None

    @property
    def speech(self) -> SpeechStage:
        """The call's stage, in the stream's format (made on first use)."""
        if self._speech is None:
            self._speech = self.gw.speech.stage(
                self.call.listen_format,
                interim=True,  # a real interruption shows in the interim transcript
                silence_timeout_ms=None,  # the call counts the caller's floor itself
                frame_ms=20,
                keep_ms=self.call.keep_ms,
                batch_ms=LISTEN_BATCH_MS,
            )
        return self._speech

    async def start(self, action: StartListening) -> None:
        await self._stop()
        self._stream = action.stream
        self.speech.listen(action.from_ms)
        name = f"{self.call.config.channel} call listener"
        self._task = asyncio.create_task(self._listen(), name=name)

    async def feed(self, action: FeedAudio) -> None:
        speech = self.speech
        started = bool(speech.hear(action.data))
        voice = self.call.voice(speech.onset_ms, started=started, voiced_ms=speech.voiced_ms)
        await self._run(voice)

    async def finish(self, action: FinishListening) -> None:
        """Nothing to do: a call's utterance ends by endpointing."""

    async def cancel(self, action: CancelListening) -> None:
        if action.stream == self._stream:
            await self._stop()

    async def close(self) -> None:
        await self._stop()

    async def _listen(self) -> None:
        call = self.call
        speech = self.speech
        try:
            await speech.run(self._report)
            result = speech.result
            actions = (
                call.heard(result.kind, result.text, result.confidence)
                if result is not None
                else []
            )
        except RecognizerBusy as exc:
            log.warning("%s call: utterance not heard: %s", call.config.channel, exc.text)
            metrics.ERRORS.labels(call.config.channel, "stt").inc()
            actions = call.listener_failed()
        except (RecognitionError, AudioFormatError) as exc:
            log.warning("%s call: recognition failed: %s", call.config.channel, exc)
            actions = call.listener_failed()
        except Exception:
            log.exception("%s call: listening failed", call.config.channel)
            actions = call.listener_failed()
        if self._task is asyncio.current_task():
            self._task = None
        await self._run(actions)

    async def _report(self, heard: Heard) -> None:
        """The events of an utterance before its result: interim transcripts go to the call
        (a real interruption of the bot shows in them); onsets it has already."""
        if heard.kind == "interim":
            await self._run(self.call.interim(heard.text))

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if self._speech is not None:
            self._speech.stop()
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------ the runner


class CallRunner(WebSocketDriver[CallAction]):
    """One accepted carrier media stream (module doc).

    ``codec`` the carrier's; ``call_id`` the call it was admitted for (None: the
    start names it); ``config`` the behaviour; ``hang_up`` / ``transfer`` the
    adapter's REST actions (None: closing the socket ends the call);
    ``calls`` a registry of the instance's calls (by call id, while served); ``call``
    the engine when the adapter brings its own (a :class:`CarrierCall` subclass, as
    Twilio's; None: a CarrierCall over ``codec``).
    """

    finish_after_reject = True

    def __init__(
        self,
        ws: WebSocket,
        gw: Gateway,
        codec: CarrierCodec,
        config: CallConfig,
        *,
        call_id: str | None = None,
        hang_up: HangUpHook | None = None,
        transfer: TransferHook | None = None,
        calls: dict[str, CallRunner] | None = None,
        call: CarrierCall | None = None,
    ) -> None:
        settings = gw.settings
        if call is None:
            call = CarrierCall(codec, call_id, config)
        self.call = call
        self.carrier = config.channel
        super().__init__(
            ws,
            call,
            gw.conversation,
            listening=_Listening(gw, call, self.run),
            send_timeout_s=settings.send_timeout_s,
            log=log,
            name=f"{config.channel} call {call_id or '?'}",
        )
        self.gw = gw
        self.codec = codec
        self.bad_frames = 0
        self.start_timeout_s = START_TIMEOUT_S
        """Seconds a new stream gets to send its start (then closed 1008)."""
        self._hang_up_hook = hang_up
        self._transfer_hook = transfer
        self._calls = calls
        ahead = settings.twilio_send_ahead_ms if codec.realtime else UNPACED_AHEAD_MS
        self.sender: PacedSender[WireFrame] = PacedSender(
            self.send_frame, codec.frame_ms or settings.twilio_frame_ms, ahead
        )
        self._started = 0.0
        self._hangup: asyncio.Task[None] | None = None

    async def send_frame(self, frame: WireFrame) -> None:
        """Send a text (``str``) or binary (``bytes``) frame; never raises."""
        if isinstance(frame, str):
            await self.send_text(frame)
        else:
            await self.send_bytes(frame)

    async def serve(self) -> None:
        """Serve the stream until it stops, the call ends or the peer goes away."""
        self._started = asyncio.get_running_loop().time()
        self.spawn(self.sender.run(), "sender")
        try:
            with metrics.connection(self.carrier):
                await super().serve()
        finally:
            info = self.call.info
            if self._calls is not None and info is not None:
                self._calls.pop(info.call_id, None)

    def idle_timeout_s(self) -> float:
        if self.call.info is None:
            now = asyncio.get_running_loop().time()
            return max(self._started + self.start_timeout_s - now, 0.0)
        return IDLE_TIMEOUT_S

    async def idle(self) -> None:
        if self.call.info is None:
            log.warning("%s: no start; closing", self.name)
            await self.close(CLOSE_POLICY, "Expected the stream's start.")
        else:
            log.warning("%s: the stream went quiet; closing", self.name)
            await self.close(1001, "The stream went quiet.")

    def received(self, frame: str | bytes) -> list[CallAction]:
        had_info = self.call.info is not None
        try:
            actions = self.call.receive(frame)
        except ProtocolError as exc:
            self._bad_frame(exc.text)
            return []
        info = self.call.info
        if not had_info and info is not None:
            self.name = f"{self.carrier} call {info.call_id}"
            if self._calls is not None:
                self._calls[info.call_id] = self
            self.started(info.call_id)
        return actions

    def started(self, call_id: str) -> None:
        """The stream's start named the call ``call_id`` (for adapters: register it)."""

    def done(self) -> bool:
        call = self.call
        return call.stopped or (call.closed and self._hangup is None)

    def _bad_frame(self, why: str) -> None:
        self.bad_frames += 1
        level = logging.WARNING if self.bad_frames <= LOGGED_BAD_FRAMES else logging.DEBUG
        log.log(level, "%s: frame dropped: %s", self.name, why)
        if self.bad_frames >= MAX_BAD_FRAMES and self.open:
            self.spawn(self.close(CLOSE_POLICY, "Too many invalid messages."), "close")

    async def other(self, action: CallAction) -> None:
        if isinstance(action, Play):
            self.sender.play(action.messages, action.mark)
            if action.final:
                wait_s = self.sender.queued_ms / 1000 + FINAL_MARK_GRACE_S
                self.spawn(self._final_mark_watch(wait_s), "final mark")
        elif isinstance(action, Interrupt):
            await self.sender.interrupt(action.clear)
            log.debug("%s: barge-in", self.name)
        elif isinstance(action, PausePlayback):
            self.sender.pause()
        elif isinstance(action, ResumePlayback):
            self.sender.resume()
            log.debug("%s: speech over the bot was no interruption; resumed", self.name)
        elif isinstance(action, Speak):
            await self.run(self.call.spoken(await self._synthesize(action.text)))
        elif isinstance(action, HangUp):
            self._hangup = self.spawn(self._end(action.call_id, None), "hang-up")
        elif isinstance(action, Transfer):
            self._hangup = self.spawn(self._end(action.call_id, action), "transfer")

    async def _synthesize(self, text: str) -> bytes | None:
        _, audio = await self.gw.speech.voice_item(ResponseItem(text=text), self.call.tts)
        return audio

    async def _final_mark_watch(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        actions = self.call.final_mark_overdue()
        if actions:
            log.warning("%s: the final mark did not come back", self.name)
        await self.run(actions)

    async def _end(self, call_id: str, transfer: Transfer | None) -> None:
        """The adapter's hang-up or transfer (its errors logged), then close the socket."""
        try:
            if transfer is not None and self._transfer_hook is not None:
                await self._transfer_hook(self, transfer)
            elif transfer is None and self._hang_up_hook is not None:
                await self._hang_up_hook(self, call_id)
        except Exception as exc:  # the carrier's REST errors
            log.warning("%s: hang-up/transfer failed (%s); closing", self.name, exc)
        await self.close(CLOSE_NORMAL, "The call ended.")

    def lost(self) -> list[CallAction]:
        return self.call.connection_lost()

    async def shutdown(self) -> None:
        await super().shutdown()
        with contextlib.suppress(*SEND_ERRORS):
            await self.ws.close(CLOSE_NORMAL)
