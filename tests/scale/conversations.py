"""Conversations on every channel through a load balancer, each checking the demo core's answers.

Used by ``scripts/multi_instance.py``. Every conversation runs against the balancer's
URL (:class:`Target`), paces its turns (think time) and records an :class:`Outcome`:
turns, per-turn latency (from the first attempt to the answer, so a turn that had to be
sent again counts with its whole delay), HTTP turns sent again, WebSocket / socket.io
reconnections, and the first wrong answer if any. What a conversation does when its
gateway process dies under it is what its protocol allows:

- HTTP channels (Flowstorm V2, Alexa, Google, Dialogflow) send a turn once more when
  the connection was reset or the balancer answered 502/503/504 itself (its HTML error
  page; the gateway's own errors are JSON): the request reached no live gateway, or
  reached the one that died.
- Flowstorm V1 reconnects (``Init``) and sends the turn again with its ``sessionId``
  (``Request`` with the same sessionId; ``InputAudioStreamOpen`` with the sessionId
  and the whole utterance for an audio turn).
- socket.io reconnects and resumes with its ``sessionKey`` (``client.start`` must
  answer ``newSessionRequired: false``), then sends the action again.
- A Twilio call cannot be resumed (Twilio never reconnects a media stream): a call cut
  by the kill must end cleanly: the harness does what Twilio does (the ``stream-error``
  status callback to ``/twilio/status``, then the TwiML's ``<Hangup/>``), and the
  call's session must be gone from the store (one left open is recorded in
  :attr:`Outcome.sessions_left_open`, a failure when ``Target.strict_call_sessions``).
  The caller then calls again.

The demo core's answers make every conversation checkable: the intro, "my name is X"
-> "Nice to meet you, X.", "message N" -> "You said: message N", "what is my name" ->
"Your name is X." (after a kill too: the session is in Redis), "bye" -> "Goodbye, X!".
A farewell sent again may find that its first attempt (whose answer the kill lost)
already ended the session; the channel's answer to that is accepted and counted in
:attr:`Outcome.farewell_repeats`. Recognised speech is checked by word error rate; on
the phone, the bot's whole answer as the caller hears it (:func:`caller_ear`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis.asyncio as aioredis
import socketio
import socketio.exceptions
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway.settings import Settings
from gateway.speech.audio import AudioFormat, Pcm, encode_wav, resample
from gateway.speech.stt import PocketsphinxRecognizer, recognize
from gateway.speech.tts import FIRST_PIECE_CHARS, PiperSynthesizer, split_pieces
from tests.adapters.google.requests import cx, es, v3
from tests.speech import SENTENCES, normalise, padded, wer

INTRO = "Hello, I am the gateway demo bot."
NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Linus", "Margaret", "Tim")
TWILIO_NAMES = ("alan", "john", "robert")
"""Names that the default Piper voice says and pocketsphinx hears back at 8 kHz."""
TWILIO_ASK = "what's my name"
TWILIO_INTRO = (
    "Hello, I am the gateway demo bot.",
    "Tell me your name, or say anything, and I will answer.",
)
"""The demo core's greeting of a new session (gateway/pipeline/demo.py): two items."""
CACHED_QUIET_S = 4.0
"""How long a Twilio caller waits for more of an answer that came in fewer pieces than
it would have if synthesized now (its audio cached): longer than the synthesis of one
piece on a loaded machine."""
TWILIO_HEARD_AS: dict[str, tuple[str, ...]] = {
    "alan": ("alan", "allen", "ellen", "helen"),
    "john": ("john",),
    "robert": ("robert", "roberts"),
}
"""Each name and what the gateway's own recogniser may make of the caller saying it (the
bot then answers with that name): the names the caller's ear can hear in an answer."""
TWILIO_AUTH = "0123456789abcdef0123456789abcdef"
"""GATEWAY_TWILIO_AUTH_TOKEN of the gateways: the harness signs what Twilio would sign."""
VOICEFLOW_USER = "scale@test.com"
VOICEFLOW_PROJECT = "6939bedf69c7ce5ee7a108ed"
MULAW_8K = AudioFormat("MULAW", 8000)
WER_BOUND = 0.34
RECV_LIMIT_S = 30.0
"""No single answer may take longer (a hang is a failure, not a wait)."""
RECONNECTS = 6
"""Connection attempts per turn for WebSocket and socket.io clients."""
STILL_WORKING = Settings.model_fields["voice_still_working_text"].default
"""What Alexa, Google and Dialogflow are told when a turn outlives their deadline."""
ASK_AGAIN = 5
ASK_AGAIN_AFTER_S = 2.0
"""A voice assistant user told "still working" asks again (at most ASK_AGAIN times)."""


class Wrong(Exception):
    """An answer that is not what the demo core says (or no answer)."""


class Disconnected(Exception):
    """The connection went away under a turn (its gateway process died)."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Wrong(what)


def close_to(reference: str, heard: str) -> bool:
    """Whether ``heard`` is ``reference`` within the word error bound."""
    return wer([(normalise(reference), normalise(heard))]) <= WER_BOUND


# --------------------------------------------------------------------------- shared


@dataclass
class Speech:
    """Audio the simulated users say, synthesised once by Piper (deterministic voice)."""

    sentences: dict[str, Pcm]
    """Each of tests.speech.SENTENCES at Piper's rate (V1/V2 audio turns)."""
    phone: dict[str, bytes]
    """'my name is <n>' for TWILIO_NAMES and TWILIO_ASK as a phone carries them."""

    @classmethod
    async def make(cls, twilio: bool) -> Speech:
        piper = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
        sentences = {text: await piper.synthesize(text) for text in SENTENCES}
        phone: dict[str, bytes] = {}
        if twilio:
            from tests.adapters.twilio.helpers import phone as on_the_phone

            for text in [f"my name is {n}" for n in TWILIO_NAMES] + [TWILIO_ASK]:
                phone[text] = on_the_phone(await piper.synthesize(text))
        return cls(sentences, phone)


@dataclass
class Outcome:
    """What one conversation did."""

    channel: str
    index: int
    turns: int = 0
    latencies: list[float] = field(default_factory=list)
    retried: int = 0
    reconnected: int = 0
    cut: int = 0
    """Twilio: calls of this conversation cut by the kill (each ended cleanly, or error)."""
    farewell_repeats: int = 0
    sessions_left_open: list[str] = field(default_factory=list)
    """Twilio: sessions of calls cut by the kill still in the store after the
    stream-error callback (a gateway gap; a failure when the target is strict)."""
    resumed: Counter[str] = field(default_factory=Counter)
    """How interrupted turns were resumed (printed by the script)."""
    sessions: set[str] = field(default_factory=set)
    """Store keys (``namespace:id``) of the sessions this conversation used."""
    error: str = ""
    done: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.error) or not self.done

    async def lost(self, attempt: int, exc: BaseException) -> None:
        """A turn's ``attempt`` lost its connection (``exc``): wait before the next one;
        raises Wrong after the last of RECONNECTS."""
        if attempt == RECONNECTS - 1:
            raise Wrong(f"no connection after {RECONNECTS} attempts: {exc!r}") from exc
        self.reconnected += 1
        await asyncio.sleep(0.2 * (attempt + 1))

    def answered(self, target: Target, t0: float, attempt: int, resumed: str) -> None:
        """A turn started at ``t0`` (perf_counter) was answered at its ``attempt``; a
        retried one counts as ``resumed``."""
        self.latencies.append(time.perf_counter() - t0)
        self.turns += 1
        target.on_turn()
        if attempt:
            self.resumed[resumed] += 1


@dataclass
class Target:
    """Where and how the conversations run."""

    url: str
    """The balancer's base URL (also GATEWAY_PUBLIC_URL of the gateways)."""
    redis: aioredis.Redis
    prefix: str
    tag: str
    """Unique per run: session ids of the channels that name their own."""
    http: httpx.AsyncClient
    speech: Speech
    recognizer: PocketsphinxRecognizer | None = None
    think: tuple[float, float] = (0.2, 0.8)
    on_turn: Callable[[], None] = lambda: None
    seed: int = 1
    strict_call_sessions: bool = False
    """Whether a cut call's session left open fails its conversation (else it is
    recorded in Outcome.sessions_left_open and reported as a gap)."""

    @property
    def ws(self) -> str:
        return "ws" + self.url.removeprefix("http")

    def session_key(self, key: str) -> str:
        """The Redis key of the session ``key`` (``namespace:id``), as gateway/sessions.py."""
        return f"{self.prefix}:{{{key}}}:s"


class Pacer:
    """Think time between turns, reproducible per conversation."""

    def __init__(self, target: Target, channel: str, index: int) -> None:
        self.random = random.Random(f"{target.seed}-{channel}-{index}")
        self.low, self.high = target.think

    async def pause(self) -> None:
        await asyncio.sleep(self.random.uniform(self.low, self.high))


def is_balancer_error(answer: httpx.Response) -> bool:
    """HAProxy's own 502/503/504 (an HTML page); the gateway's errors are JSON or text."""
    return answer.status_code in (502, 503, 504) and answer.headers.get(
        "content-type", ""
    ).startswith("text/html")


async def retrying(
    target: Target, method: str, path: str, outcome: Outcome | None = None, **kwargs: Any
) -> httpx.Response:
    """An HTTP request through the balancer, sent once more after a reset or a balancer
    error (see the module doc; counted in ``outcome.retried``)."""
    for attempt in (1, 2):
        try:
            answer = await target.http.request(method, target.url + path, **kwargs)
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            if attempt == 2:
                raise Wrong(f"{method} {path}: {type(exc).__name__} twice") from exc
        else:
            if attempt == 2 or not is_balancer_error(answer):
                return answer
        if outcome is not None:
            outcome.retried += 1
    raise AssertionError("unreachable")


async def http_turn(
    target: Target, outcome: Outcome, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """One HTTP turn through the balancer (:func:`retrying`); its latency is recorded."""
    t0 = time.perf_counter()
    retried = outcome.retried
    answer = await retrying(target, method, path, outcome, **kwargs)
    if outcome.retried > retried:
        outcome.resumed["HTTP turns sent again after a reset or a balancer 502/503"] += 1
    outcome.latencies.append(time.perf_counter() - t0)
    outcome.turns += 1
    target.on_turn()
    return answer


def ssml_text(ssml: str) -> str:
    root = ET.fromstring(ssml)
    check(root.tag == "speak", f"not SSML: {ssml!r}")
    return "".join(root.itertext())


@dataclass
class Step:
    """One text turn of the standard dialogue and what the answer must be."""

    text: str
    answer: Callable[[list[str]], bool]
    what: str
    farewell: bool = False


def dialogue(i: int) -> tuple[str, list[Step]]:
    """The standard text dialogue of conversation ``i``: (the name it tells, its steps)."""
    name = f"{NAMES[i % len(NAMES)]}{i}"
    return name, [
        Step("#intro", lambda t: bool(t) and t[0].startswith(INTRO), "the intro"),
        Step(
            f"my name is {name}",
            lambda t: t == [f"Nice to meet you, {name}."],
            f"Nice to meet you, {name}.",
        ),
        Step(f"message {i}", lambda t: t == [f"You said: message {i}"], f"You said: message {i}"),
        Step("what is my name", lambda t: t == [f"Your name is {name}."], f"Your name is {name}."),
        Step("bye", lambda t: t == [f"Goodbye, {name}!"], f"Goodbye, {name}!", farewell=True),
    ]


def said(what: str, texts: list[str]) -> str:
    return f"expected {what!r}, got {texts!r}"


def spoken(step: Step, text: str, outcome: Outcome, repeated: bool) -> None:
    """Check a voice assistant's answer ``text`` to ``step`` (``repeated``: the request
    was sent more than once; a farewell sent again may find its session ended)."""
    if step.farewell and repeated and text == "Goodbye!":
        outcome.farewell_repeats += 1
        return
    check(step.answer([text]), f"{step.text!r}: {said(step.what, [text])}")


def constant(body: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A request body maker that makes ``body`` each time."""
    return lambda: body


async def voice_turn(
    target: Target,
    outcome: Outcome,
    path: str,
    body: Callable[[], dict[str, Any]],
    read: Callable[[dict[str, Any]], str],
) -> tuple[dict[str, Any], str, bool]:
    """One turn of a voice assistant (Alexa, Google, Dialogflow): POST ``body()``
    (:func:`retrying`); when the answer (``read``) is the gateway's "still working" text
    (the turn outlived the platform's deadline), ask again after a moment, as the user
    is told to. Returns the answer, its text and whether the request went more than once.
    The latency is from the first request to the answer."""
    t0 = time.perf_counter()
    retried = outcome.retried
    for attempt in range(1, ASK_AGAIN + 1):
        answer = await retrying(target, "POST", path, outcome, json=body())
        check(answer.status_code == 200, f"{path}: {answer.status_code} {answer.text}")
        data: dict[str, Any] = answer.json()
        text = read(data)
        if text != STILL_WORKING or attempt == ASK_AGAIN:
            break
        outcome.resumed["voice assistant turns answered 'still working', asked again"] += 1
        await asyncio.sleep(ASK_AGAIN_AFTER_S)
    if outcome.retried > retried:
        outcome.resumed["HTTP turns sent again after a reset or a balancer 502/503"] += 1
    outcome.latencies.append(time.perf_counter() - t0)
    outcome.turns += 1
    target.on_turn()
    return data, text, attempt > 1 or outcome.retried > retried


# --------------------------------------------------------------------------- Flowstorm V2


def v2_texts(answer: httpx.Response, json_form: bool) -> tuple[list[str], bool]:
    """The item texts of a V2 answer and whether it ended the session."""
    if not json_form:
        lines = answer.text.splitlines()
        errors = [line for line in lines if line.startswith("! ")]
        check(not errors, f"error lines {errors}")
        return [line[2:] for line in lines if line.startswith("< ")], "." in lines
    events = [json.loads(line) for line in answer.text.splitlines() if line.strip()]
    check(all(e["type"] != "Error" for e in events), f"error events {events}")
    texts = [e["responseItem"]["text"] for e in events if e["type"] == "ResponseItem"]
    ended = False
    for e in events:
        if e["type"] == "Response":
            texts += [item["text"] for item in e["response"]["items"]]
            ended = bool(e["response"]["sessionEnded"])
    return texts, ended


class V2Session:
    """A Flowstorm V2 client: the session travels in the ``flowstorm-session-id`` cookie."""

    def __init__(self, target: Target, outcome: Outcome) -> None:
        self.target = target
        self.outcome = outcome
        self.cookie = ""

    async def put(self, query: str, content_type: str, body: bytes) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if self.cookie:
            headers["Cookie"] = f"flowstorm-session-id={self.cookie}"
        answer = await http_turn(
            self.target, self.outcome, "PUT", f"/client?key=scale{query}", headers=headers,
            content=body,
        )  # fmt: skip
        if "flowstorm-session-id" in answer.cookies:
            self.cookie = answer.cookies["flowstorm-session-id"]
            self.outcome.sessions.add(f"flowstorm:{self.cookie}")
        return answer

    async def say(self, step: Step, json_form: bool) -> None:
        retried = self.outcome.retried
        if json_form:
            body = json.dumps({"type": "Input", "input": {"transcript": {"text": step.text}}})
            answer = await self.put("&tts=None", "application/json", body.encode())
        else:
            answer = await self.put("&tts=None", "text/plain", step.text.encode())
        if step.farewell and answer.status_code == 404 and self.outcome.retried > retried:
            self.outcome.farewell_repeats += 1  # the lost first attempt ended it
            return
        check(answer.status_code == 200, f"{step.text!r}: {answer.status_code} {answer.text}")
        texts, ended = v2_texts(answer, json_form)
        check(step.answer(texts), f"{step.text!r}: {said(step.what, texts)}")
        check(ended == step.farewell, f"{step.text!r}: sessionEnded {ended}")

    async def speak(self, sentence: str, pcm: Pcm) -> None:
        """A WAV file turn: recognised, answered "You said: ...", with a TTS link that
        downloads through the balancer (the TTS cache is shared in Redis)."""
        wav = encode_wav(resample(padded(pcm), 16000))
        answer = await self.put("", "audio/wav", wav)
        check(answer.status_code == 200, f"audio turn: {answer.status_code} {answer.text}")
        events = [json.loads(line) for line in answer.text.splitlines() if line.strip()]
        kinds = [e["type"] for e in events]
        check(kinds == ["RecognizedInput", "ResponseItem", "Response"], f"audio turn: {events}")
        heard = events[0]["input"]["transcript"]["text"]
        check(close_to(sentence, heard), f"audio turn: heard {heard!r} for {sentence!r}")
        item = events[1]["responseItem"]
        check(item["text"] == f"You said: {heard}", f"audio turn: answered {item['text']!r}")
        link = item.get("audio", "")
        check(link.startswith(self.target.url + "/file/tts/"), f"TTS link {link!r}")
        audio = await retrying(self.target, "GET", link.removeprefix(self.target.url))
        check(
            audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg",
            f"TTS link {link}: {audio.status_code}",
        )
        check(len(audio.content) > 2000, f"TTS link {link}: {len(audio.content)} bytes")


async def v2_text(target: Target, outcome: Outcome) -> None:
    """Flowstorm V2 text turns: even conversations plain text, odd ones NDJSON events."""
    pacer = Pacer(target, outcome.channel, outcome.index)
    session = V2Session(target, outcome)
    _, steps = dialogue(outcome.index)
    for step in steps:
        await session.say(step, json_form=outcome.index % 2 == 1)
        await pacer.pause()


async def v2_audio(target: Target, outcome: Outcome) -> None:
    """Flowstorm V2 with a spoken turn (a WAV file) between the name and the question."""
    pacer = Pacer(target, outcome.channel, outcome.index)
    session = V2Session(target, outcome)
    _, steps = dialogue(outcome.index)
    sentence = SENTENCES[outcome.index % len(SENTENCES)]
    for n, step in enumerate(steps):
        if n == 2:  # instead of "message N"
            await session.speak(sentence, target.speech.sentences[sentence])
        else:
            await session.say(step, json_form=False)
        await pacer.pause()


# --------------------------------------------------------------------------- Flowstorm V1


class V1Session:
    """A Flowstorm V1 WebSocket client that reconnects and resumes with its sessionId."""

    def __init__(self, target: Target, outcome: Outcome, config: dict[str, Any]) -> None:
        self.target = target
        self.outcome = outcome
        self.config = config
        channel = outcome.channel.replace(" ", "-")
        self.session_id = f"scale-{target.tag}-{channel}-{outcome.index}"
        outcome.sessions.add(f"flowstorm:{self.session_id}")
        self.ws: ClientConnection | None = None

    async def _connect(self) -> ClientConnection:
        ws = await connect(self.target.ws + "/socket", open_timeout=10, max_size=None)
        init = {"type": "Init", "key": "scale", "deviceId": "scale", "config": self.config}
        await ws.send(json.dumps(init))
        ready = await self._recv(ws)
        check(ready == {"type": "Ready"}, f"Init answered {ready}")
        return ws

    async def _recv(self, ws: ClientConnection) -> dict[str, Any]:
        try:
            async with asyncio.timeout(RECV_LIMIT_S):
                message = await ws.recv()
        except TimeoutError:
            raise Wrong(f"no frame within {RECV_LIMIT_S} s") from None
        check(isinstance(message, str), "a binary frame")
        frame: dict[str, Any] = json.loads(message)
        return frame

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await self.ws.close()
            self.ws = None

    async def turn(
        self, send: Callable[[ClientConnection], Awaitable[None]], kind: str
    ) -> list[dict[str, Any]]:
        """Run one turn (``send`` its frames, ``kind`` names them), reconnecting as needed;
        its frames up to the Response (and the SessionEnded after an ending Response)."""
        t0 = time.perf_counter()
        for attempt in range(RECONNECTS):
            try:
                if self.ws is None:
                    self.ws = await self._connect()
                await send(self.ws)
                frames = []
                while True:
                    frame = await self._recv(self.ws)
                    frames.append(frame)
                    check(frame["type"] != "Error", f"Error frame {frame}")
                    if frame["type"] == "Response":
                        if frame["response"]["sessionEnded"]:
                            frames.append(await self._recv(self.ws))
                        break
            except (ConnectionClosed, InvalidHandshake, OSError) as exc:
                await self.close()
                await self.outcome.lost(attempt, exc)
                continue
            resumed = f"V1 reconnected, {kind} with the sessionId"
            self.outcome.answered(self.target, t0, attempt, resumed)
            return frames
        raise AssertionError("unreachable")

    async def say(self, step: Step) -> None:
        frame = {
            "type": "Request",
            "request": {"sessionId": self.session_id, "input": {"transcript": {"text": step.text}}},
        }
        reconnects = self.outcome.reconnected
        frames = await self.turn(lambda ws: ws.send(json.dumps(frame)), "Request")
        response = frames[-2] if frames[-1]["type"] == "SessionEnded" else frames[-1]
        texts = [item.get("text") for item in response["response"]["items"]]
        if step.farewell and self.outcome.reconnected > reconnects and texts == ["Goodbye!"]:
            self.outcome.farewell_repeats += 1  # the first attempt had ended the session
            return
        check(step.answer(texts), f"{step.text!r}: {said(step.what, texts)}")
        if step.farewell:
            check(frames[-1] == {"type": "SessionEnded"}, f"bye: {frames[-1]}")

    async def speak(self, sentence: str, pcm: Pcm) -> None:
        """An utterance: InputAudioStreamOpen with the sessionId, LINEAR16 16 kHz frames of
        100 ms, InputAudioStreamClose; the whole utterance again after a reconnect."""
        audio = resample(padded(pcm), 16000).data
        step = 3200

        async def send(ws: ClientConnection) -> None:
            await ws.send(
                json.dumps({"type": "InputAudioStreamOpen", "sessionId": self.session_id})
            )
            echo = await self._recv(ws)
            check(echo == {"type": "InputAudioStreamOpen"}, f"stream open answered {echo}")
            for start in range(0, len(audio), step):
                await ws.send(audio[start : start + step])
            await ws.send(json.dumps({"type": "InputAudioStreamClose"}))

        frames = await self.turn(send, "InputAudioStreamOpen + the utterance")
        finals = [f for f in frames if f["type"] == "Recognized" and f.get("isFinal", True)]
        check(len(finals) == 1, f"audio turn: {frames}")
        heard = finals[0]["text"]
        check(close_to(sentence, heard), f"audio turn: heard {heard!r} for {sentence!r}")
        texts = [item.get("text") for item in frames[-1]["response"]["items"]]
        check(texts == [f"You said: {heard}"], f"audio turn: answered {texts}")


async def v1_text(target: Target, outcome: Outcome) -> None:
    pacer = Pacer(target, outcome.channel, outcome.index)
    session = V1Session(target, outcome, {"locale": "en", "sendResponseItems": False})
    try:
        for step in dialogue(outcome.index)[1]:
            await session.say(step)
            await pacer.pause()
    finally:
        await session.close()


async def v1_audio(target: Target, outcome: Outcome) -> None:
    pacer = Pacer(target, outcome.channel, outcome.index)
    config = {"locale": "en", "sttSampleRate": 16000, "sttInterimResults": False, "tts": "None"}
    session = V1Session(target, outcome, config)
    sentence = SENTENCES[(outcome.index + 1) % len(SENTENCES)]
    try:
        for n, step in enumerate(dialogue(outcome.index)[1]):
            if n == 2:
                await session.speak(sentence, target.speech.sentences[sentence])
            else:
                await session.say(step)
            await pacer.pause()
    finally:
        await session.close()


# --------------------------------------------------------------------------- voice assistants


def alexa_request(session_id: str, kind: str, text: str = "", intent: str = "") -> dict[str, Any]:
    """An Alexa request envelope (LaunchRequest, or IntentRequest: catch-all or ``intent``)."""
    app = {"applicationId": "amzn1.ask.skill.scale"}
    user = {"userId": "amzn1.ask.account.scale"}
    request: dict[str, Any] = {
        "type": kind,
        "requestId": f"amzn1.echo-api.request.{time.monotonic_ns()}",
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "locale": "en-US",
    }
    if kind == "IntentRequest":
        slots = {"query": {"name": "query", "value": text}} if not intent else {}
        request["intent"] = {"name": intent or "CatchAllIntent", "slots": slots}
    return {
        "version": "1.0",
        "session": {
            "new": kind == "LaunchRequest",
            "sessionId": session_id,
            "application": app,
            "attributes": {},
            "user": user,
        },
        "context": {"System": {"application": app, "user": user, "device": {"deviceId": "d"}}},
        "request": request,
    }


async def alexa(target: Target, outcome: Outcome) -> None:
    pacer = Pacer(target, outcome.channel, outcome.index)
    sid = f"amzn1.echo-api.session.{target.tag}-{outcome.index}"
    outcome.sessions.add(f"alexa:{sid}")
    for step in dialogue(outcome.index)[1]:

        def body(step: Step = step) -> dict[str, Any]:  # a new requestId and timestamp
            if step.text == "#intro":
                return alexa_request(sid, "LaunchRequest")
            if step.farewell:
                return alexa_request(sid, "IntentRequest", intent="AMAZON.StopIntent")
            return alexa_request(sid, "IntentRequest", text=step.text)

        data, text, repeated = await voice_turn(
            target, outcome, "/alexa", body,
            lambda data: ssml_text(data["response"]["outputSpeech"]["ssml"]),
        )  # fmt: skip
        spoken(step, text, outcome, repeated)
        response = data["response"]
        check(response.get("shouldEndSession") is step.farewell, f"{step.text!r}: {response}")
        await pacer.pause()


async def google(target: Target, outcome: Outcome) -> None:
    pacer = Pacer(target, outcome.channel, outcome.index)
    sid = f"scale-{target.tag}-{outcome.index}"
    outcome.sessions.add(f"google:{sid}")
    for step in dialogue(outcome.index)[1]:
        if step.text == "#intro":
            request = v3(sid, "actions.intent.MAIN")
        elif step.farewell:
            request = v3(sid, "actions.intent.CANCEL", "cancel")
        else:
            request = v3(sid, "FreeText", step.text)
        data, text, repeated = await voice_turn(
            target, outcome, "/google", constant(request),
            lambda data: ssml_text(data["prompt"]["firstSimple"]["speech"]),
        )  # fmt: skip
        spoken(step, text, outcome, repeated)
        check(data["session"]["id"] == sid, f"{step.text!r}: session {data['session']}")
        scene = data.get("scene", {}).get("next", {}).get("name")
        ended = scene == "actions.scene.END_CONVERSATION"
        check(ended is step.farewell, f"{step.text!r}: scene {data.get('scene')}")
        await pacer.pause()


def dialogflow_text(data: dict[str, Any]) -> str:
    """What a Dialogflow ES or CX webhook answer says."""
    if "fulfillmentResponse" in data:
        return " ".join(
            t for m in data["fulfillmentResponse"]["messages"] for t in m["text"]["text"]
        )
    return str(data["fulfillmentText"])


async def dialogflow(target: Target, outcome: Outcome) -> None:
    """Dialogflow ES (even conversations) and CX (odd ones) fulfillment webhooks."""
    pacer = Pacer(target, outcome.channel, outcome.index)
    is_cx = outcome.index % 2 == 1
    if is_cx:
        session = f"projects/scale/locations/global/agents/a1/sessions/{target.tag}-{outcome.index}"
    else:
        session = f"projects/scale/agent/sessions/{target.tag}-{outcome.index}"
    outcome.sessions.add(f"dialogflow:{session}")
    for step in dialogue(outcome.index)[1]:
        if is_cx:
            request = (
                cx(session, event="WELCOME") if step.text == "#intro" else cx(session, step.text)
            )
        else:
            request = es(session, "WELCOME" if step.text == "#intro" else step.text)
        data, text, repeated = await voice_turn(
            target, outcome, "/dialogflow", constant(request), dialogflow_text
        )
        spoken(step, text, outcome, repeated)
        if is_cx:
            ended = data.get("targetPage", "").endswith("/pages/END_SESSION")
            check(ended is step.farewell, f"{step.text!r}: targetPage {data.get('targetPage')}")
        await pacer.pause()


# --------------------------------------------------------------------------- socket.io


class SocketIoClient:
    """A Voiceflow socket.io client (python-socketio, aiohttp) that reconnects with its
    sessionKey.

    Each client connects from its own loopback address (127.0.0.N), so the balancer's
    source-address stickiness spreads clients over the gateways; its cookie jar keeps
    the balancer's ``GW_SIO`` cookie (the jar accepts cookies of IP hosts, as a
    browser's does), as a browser with ``withCredentials`` would.
    """

    PATH = "/v4/interact/socket"

    def __init__(self, target: Target, outcome: Outcome, transport: str, source: str) -> None:
        self.target = target
        self.outcome = outcome
        self.transport = transport
        self.source = source
        self.jar = aiohttp.CookieJar(unsafe=True)
        self.http: aiohttp.ClientSession | None = None
        self.sio: socketio.AsyncClient | None = None
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.key: str | None = None
        self.messages = 0

    async def _received(self, event: str, data: Any = None) -> None:
        await self.events.put((event, data))

    async def _gone(self, *args: Any) -> None:
        await self.events.put(("disconnect", None))

    async def _open(self) -> None:
        self.events = asyncio.Queue()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(self.source, 0)), cookie_jar=self.jar
        )
        self.sio = socketio.AsyncClient(
            reconnection=False, handle_sigint=False, http_session=self.http
        )
        self.sio.on("*", self._received)
        self.sio.on("disconnect", self._gone)
        await self.sio.connect(
            self.target.url,
            transports=[self.transport],
            socketio_path=self.PATH,
            wait_timeout=10,
        )

    async def close(self) -> None:
        if self.sio is not None:
            with contextlib.suppress(Exception):
                if self.sio.connected:
                    await self.sio.disconnect()
            self.sio = None
        if self.http is not None:
            await self.http.close()
            self.http = None

    async def _next(self) -> tuple[str, Any]:
        try:
            async with asyncio.timeout(RECV_LIMIT_S):
                event, data = await self.events.get()
        except TimeoutError:
            raise Wrong(f"no socket.io event within {RECV_LIMIT_S} s") from None
        if event == "disconnect":
            raise Disconnected
        return event, data

    async def _expect(self, name: str) -> Any:
        event, data = await self._next()
        check(event == name, f"expected {name}, got {event} {data}")
        return data

    async def _handshake(self) -> None:
        """client.start (with the sessionKey when there is one); session.create if needed."""
        assert self.sio is not None
        start = {"userID": VOICEFLOW_USER, "projectID": VOICEFLOW_PROJECT, "sessionKey": self.key}
        await self.sio.emit("client.start", start)
        started = await self._expect("client.started")
        if self.key is not None:
            check(started["newSessionRequired"] is False, "the sessionKey was not accepted")
            return
        check(started["newSessionRequired"] is True, f"client.started {started}")
        await self.sio.emit("session.create", {})
        self.key = (await self._expect("session.created"))["sessionKey"]
        claims = self.key.split(".")[1]  # the sessionKey is a JWT naming the session
        sub = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["sub"]
        self.outcome.sessions.add(f"voiceflow:{sub}")

    async def act(self, action: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Send an action (reconnecting and resuming as needed); its traces and what
        followed its completion (``session.ended``)."""
        t0 = time.perf_counter()
        for attempt in range(RECONNECTS):
            try:
                if self.sio is None:
                    await self._open()
                    await self._handshake()
                assert self.sio is not None
                self.messages += 1
                mid = f"m{self.messages}"
                await self.sio.emit("action.send", {"action": action, "messageID": mid})
                status = await self._expect("action.status")
                check(status == {"status": "accepted", "messageID": mid}, f"status {status}")
                traces = []
                while True:
                    event, data = await self._next()
                    check(data.get("messageID") == mid, f"{event} {data} (for {mid})")
                    if event == "action.trace":
                        traces.append(data["trace"])
                        continue
                    check(event == "action.status", f"{event} {data}")
                    break
                after = []
                if data["status"] == "completed" and traces and traces[-1]["type"] == "end":
                    after.append(await self._expect("session.ended"))
                elif data["status"] == "rejected":
                    after.append(data)
            except (
                Disconnected,
                socketio.exceptions.ConnectionError,
                socketio.exceptions.BadNamespaceError,
                aiohttp.ClientError,
                OSError,
            ) as exc:
                await self.close()
                await self.outcome.lost(attempt, exc)
                continue
            resumed = f"socket.io ({self.transport}) reconnected with its sessionKey"
            self.outcome.answered(self.target, t0, attempt, resumed)
            return traces, after
        raise AssertionError("unreachable")


async def voiceflow(target: Target, outcome: Outcome) -> None:
    """socket.io: even conversations over WebSocket, odd ones over long polling."""
    pacer = Pacer(target, outcome.channel, outcome.index)
    transport = "websocket" if outcome.index % 2 == 0 else "polling"
    source = f"127.0.0.{2 + outcome.index % 250}"
    client = SocketIoClient(target, outcome, transport, source)
    try:
        for step in dialogue(outcome.index)[1]:
            action: dict[str, Any] = (
                {"type": "launch"}
                if step.text == "#intro"
                else {"type": "text", "payload": step.text}
            )
            reconnects = outcome.reconnected
            traces, after = await client.act(action)
            texts = [t["payload"]["message"] for t in traces if t["type"] == "text"]
            repeated = step.farewell and outcome.reconnected > reconnects
            if repeated and after and after[0].get("reason") == "session-not-found":
                outcome.farewell_repeats += 1  # the first attempt had ended the session
                continue
            check(after[:1] != [] or not step.farewell, f"bye: no session.ended ({traces})")
            check(step.answer(texts), f"{step.text!r}: {said(step.what, texts)}")
            if step.farewell:
                check([t["type"] for t in traces] == ["text", "end"], f"bye: {traces}")
                check(after == [{"reason": "end_of_diagram"}], f"bye: {after}")
            await pacer.pause()
    finally:
        await client.close()


# --------------------------------------------------------------------------- Twilio


async def twilio(target: Target, outcome: Outcome, calls: int = 3) -> None:
    """A phone call through the balancer (tests/adapters/twilio/harness.py plays Twilio):
    the intro, "my name is <n>" and "what's my name" spoken at real time (each after the
    bot's last mark came back); the whole answer to the question (every piece, until the
    bot is quiet), recognised on the caller's side (:func:`caller_ear`), must be "your
    name is <n>" (<n> or what the gateway may have heard for it); when the caller hangs up the
    session must be gone. A call cut by the kill must end cleanly (see the module doc);
    then the caller calls again (at most ``calls`` calls; a call the balancer could not
    place counts as one)."""
    for _ in range(calls):
        result = await _call(target, outcome)
        if result == "done":
            return
        if result == "not placed":
            outcome.retried += 1
            await asyncio.sleep(0.5)
    raise Wrong(f"no call of {calls} went to its end")


async def _call(target: Target, outcome: Outcome) -> str:
    """One call: "done" (to the end), "cut" (by the kill, cleanly) or "not placed"."""
    from tests.adapters.twilio.harness import TwilioHarness, call_sid, sign

    name = TWILIO_NAMES[outcome.index % len(TWILIO_NAMES)]
    sid = call_sid()
    outcome.sessions.add(f"twilio:{sid}")
    session = target.session_key(f"twilio:{sid}")
    recognition: asyncio.Task[str] | None = None
    stream_sid = ""

    async def heard(audio: bytes) -> str:
        assert target.recognizer is not None
        return (await recognize(target.recognizer, MULAW_8K, audio)).text

    try:
        async with TwilioHarness.dial(
            target.url, target.url, auth_token=TWILIO_AUTH, sid=sid, mic_speed=1.0
        ) as call:
            stream_sid = call.stream_sid

            def cut() -> bool:
                return call.closed_at is not None

            async def answered(marks: int, *texts: str) -> int:
                """Wait until the bot has said the answer of items ``texts`` (after
                ``marks`` echoed marks): a mark after each piece, as many as
                :func:`split_pieces` makes of an item synthesized now (its first clause
                first), one for an item whose audio was cached. With fewer marks than
                that, until the bot has been quiet for :data:`CACHED_QUIET_S` (longer
                than a synthesis between two pieces on a loaded machine). The marks
                echoed."""
                least = marks + len(texts)
                most = marks + sum(len(pieces(text)) for text in texts)
                deadline = time.monotonic() + RECV_LIMIT_S
                count, since = len(call.received), time.monotonic()
                while not cut() and len(call.echoed) < most:
                    now = time.monotonic()
                    if now > deadline:
                        raise Wrong(f"the bot said nothing within {RECV_LIMIT_S} s")
                    if len(call.received) != count:
                        count, since = len(call.received), now
                    elif (
                        len(call.echoed) >= max(least, len(call.marks()))
                        and now - since >= CACHED_QUIET_S
                    ):
                        break
                    await asyncio.sleep(0.05)
                return len(call.echoed)

            marks = await answered(0, *TWILIO_INTRO)
            for utterance in (f"my name is {name}", TWILIO_ASK):
                if cut():
                    break
                audio = target.speech.phone[utterance]
                seen = len(call.received)
                spoken = call.say(audio)
                reply = "Your name is {}." if utterance == TWILIO_ASK else "Nice to meet you, {}."
                marks = await answered(marks, reply.format(name.title()))
                if cut():
                    break
                speech_end = await spoken.started + (len(audio) - 9600) / 8000  # + 1.2 s quiet
                replies = [r for r in call.received[seen:] if r.event in ("media", "mark")]
                first_mark = next(i for i, r in enumerate(replies) if r.event == "mark")
                check(first_mark > 0, f"{utterance!r}: no audio before the mark")
                outcome.latencies.append(max(replies[0].at - speech_end, 0.0))
                outcome.turns += 1
                target.on_turn()
                if utterance == TWILIO_ASK:  # recognised while the caller hangs up
                    await _quiet(call, cut)  # the whole answer, whatever it is
                    media = [r.payload for r in call.received[seen:] if r.event == "media"]
                    recognition = asyncio.create_task(heard(b"".join(media)))
            if not cut():
                await call.stop()  # the caller hangs up
                await call.wait_for(cut, 10)
                check(recognition is not None, "no answer to the question")
                assert recognition is not None
                remembered = await recognition
                check(
                    remembered in {f"your name is {n}" for n in TWILIO_HEARD_AS[name]},
                    f"to {TWILIO_ASK!r} the bot said {remembered!r}, not 'your name is {name}'",
                )
                await _session_gone(target, session, "after the caller hung up")
                return "done"
    except (OSError, InvalidHandshake, AssertionError):
        if not stream_sid:  # the webhook or the stream's upgrade failed: no call
            return "not placed"
        raise
    finally:
        if recognition is not None:
            recognition.cancel()
    # cut by the kill: what Twilio does when a stream's socket breaks
    outcome.cut += 1
    form = {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": sid,
        "StreamSid": stream_sid,
        "StreamName": stream_sid,
        "StreamEvent": "stream-error",
        "StreamError": "Stream - WebSocket - Connection Broken Pipe",
        "Timestamp": datetime.now(UTC).isoformat(),
    }
    headers = {"X-Twilio-Signature": sign(TWILIO_AUTH, target.url + "/twilio/status", form)}
    answer = await retrying(target, "POST", "/twilio/status", data=form, headers=headers)
    check(answer.status_code == 204, f"stream-error callback: {answer.status_code} {answer.text}")
    try:
        await _session_gone(target, session, "after its call was cut by the kill")
    except Wrong:
        if target.strict_call_sessions:
            raise
        outcome.sessions_left_open.append(session)
        outcome.resumed["Twilio calls cut: stream-error callback 204, session LEFT OPEN"] += 1
    else:
        outcome.resumed["Twilio calls cut: stream-error callback 204, session closed"] += 1
    return "cut"


def pieces(text: str) -> list[str]:
    """The pieces a gateway with the default settings synthesizes ``text`` in, a mark
    after each (gateway/speech/tts.py)."""
    clause = Settings().tts_first_clause_chars
    return split_pieces(text, first_chars=FIRST_PIECE_CHARS, first_clause_chars=clause)


async def _quiet(call: Any, cut: Callable[[], bool], quiet_s: float = 1.0) -> None:
    """Wait until the bot has said all it says for now: every mark it sent came back and
    nothing more came for ``quiet_s`` (an answer of several pieces has a mark after
    each, the next piece coming when it is synthesized); at most RECV_LIMIT_S."""
    deadline = time.monotonic() + RECV_LIMIT_S
    while not cut() and time.monotonic() < deadline:
        count = len(call.received)
        await asyncio.sleep(quiet_s)
        if len(call.received) == count and len(call.echoed) >= len(call.marks()):
            return


TWILIO_OTHER_ANSWERS = (
    "i do not know your name yet",
    "you said what's my name",
    "sorry i did not get that say it again",
    "are you still there say something",
)
"""What the demo core could say to "what's my name" other than "Your name is <n>."."""


def ear_grammar() -> str:
    """The JSGF grammar of the caller's ear (:func:`caller_ear`): every answer the demo
    core can give to "my name is <n>" and "what's my name" (each name the gateway may
    have heard, :data:`TWILIO_HEARD_AS`), and "you said" + words of the phrases."""
    names = sorted({n for heard in TWILIO_HEARD_AS.values() for n in heard})
    words = [*names, "what's", "my", "name", "is"]
    answers = [
        "your name is <name>",
        "nice to meet you <name>",
        "you said <word>+",
        *TWILIO_OTHER_ANSWERS,
        "hello i am the gateway demo bot",
        "tell me your name or say anything and i will answer",
        "sorry something went wrong try again",
    ]
    return "\n".join(
        [
            "#JSGF V1.0;",
            "grammar answers;",
            f"<name> = {' | '.join(names)};",
            f"<word> = {' | '.join(words)};",
            f"public <answer> = {' | '.join(f'( {a} )' for a in answers)};",
        ]
    )


def caller_ear(workdir: Path, streams: int = 2) -> PocketsphinxRecognizer:
    """The caller's ear: pocketsphinx limited to :func:`ear_grammar` (its JSGF file
    written to ``workdir``). The bot speaks with Piper's random prosody over an 8 kHz
    line; pocketsphinx's open vocabulary mishears it now and then ("your name is alan"
    as "in a nutshell one", "your name michelle one", "her name is john"); among the
    answers the core can give it picks the one said (32 of 32 tried, the gateway's
    own μ-law rendering), a wrong name included."""
    grammar = workdir / "answers.gram"
    grammar.write_text(ear_grammar(), encoding="utf-8")
    return PocketsphinxRecognizer(
        max_streams=streams, decoder_options={"jsgf": str(grammar), "lm": None}
    )


async def _session_gone(target: Target, key: str, when: str, within_s: float = 10.0) -> None:
    """The session ``key`` must leave the store (at once, or within ``within_s``)."""
    deadline = time.monotonic() + within_s
    while await target.redis.exists(key):
        if time.monotonic() > deadline:
            raise Wrong(f"the call's session {key} was left open {when}")
        await asyncio.sleep(0.1)


CHANNELS: dict[str, Callable[[Target, Outcome], Awaitable[None]]] = {
    "flowstorm-v2-text": v2_text,
    "flowstorm-v2-audio": v2_audio,
    "flowstorm-v1-text": v1_text,
    "flowstorm-v1-audio": v1_audio,
    "alexa": alexa,
    "google-v3": google,
    "dialogflow-es-cx": dialogflow,
    "socket.io": voiceflow,
    "twilio": twilio,
}
SPEECH_CHANNELS = frozenset({"flowstorm-v2-audio", "flowstorm-v1-audio", "twilio"})


async def run(target: Target, channel: str, index: int, delay_s: float, limit_s: float) -> Outcome:
    """Conversation ``index`` of ``channel``, started after ``delay_s``, within ``limit_s``."""
    outcome = Outcome(channel, index)
    await asyncio.sleep(delay_s)
    scope = asyncio.timeout(limit_s)
    try:
        async with scope:
            await CHANNELS[channel](target, outcome)
        outcome.done = True
    except Wrong as exc:
        outcome.error = str(exc)
    except TimeoutError:
        outcome.error = f"not finished within {limit_s} s" if scope.expired() else "timeout"
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc!r}"
    return outcome
