"""Hostile input for every parser a client reaches: the targets, their seeds, the generator.

Shared by tests/test_parsers_fuzz.py (hypothesis property tests, sized for CI) and
bench/fuzz_parsers.py (the long run, >= 1,000,000 inputs). Both feed each
:class:`Target` texts made by :func:`hostile`, and count any exception that is not
one of the target's declared errors as a crash.

Inputs are golden messages (the specs' examples and shared/fixtures) mutated, or
hostile JSON alone:

- a value at a random place of a seed replaced (or a key added) with an *atom*:
  nesting 1..20,000 deep (arrays, objects, unbalanced), numbers of up to 50,000
  digits, ``1e999``, ``NaN``/``Infinity``, strings of up to 200,000 characters,
  escapes of lone surrogates, raw control/bidi/BOM/non-BMP characters, the wrong
  type (``null``, ``[]``, ``{}``, ``"1"``, ``true``...), long arrays, duplicate keys;
- text-level damage: truncation, insertion of structural characters, deletion,
  duplication of a span, raw lone surrogates (bytes targets then get invalid UTF-8).

Randomness comes from a ``random.Random``: the bench seeds one; the property tests
draw one from hypothesis (``st.randoms``), so failures shrink and replay.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import engineio.packet
import socketio.packet

from adapters.alexa.protocol import AlexaConfig, parse_envelope, plan
from adapters.alexa.verify import AlexaVerificationError, AlexaVerifier
from adapters.exotel.protocol import ExotelCodec
from adapters.flowstorm.v1.protocol import V1Connection, parse_event
from adapters.flowstorm.v2.protocol import JsonEventReader, parse_config, text_input
from adapters.google.protocol import detect, dialogflow_plan, google_plan
from adapters.google.protocol import load_json as google_body
from adapters.google.verify import GoogleVerificationError, GoogleVerifier, StaticCertSource
from adapters.plivo.protocol import PlivoCodec
from adapters.telnyx.protocol import TelnyxCodec
from adapters.twilio.protocol import CallConfig, TwilioCall, parse_message
from adapters.voiceflow.protocol import SessionKeys, VoiceflowConnection, parse_client_start
from adapters.voiceflow.routes import BoundedJson, BoundedPacket
from adapters.vonage.protocol import VonageCodec
from gateway.callcodec import CarrierCodec
from gateway.protocol import ProtocolError, check_time_zone, load_json, parse_timestamp
from tests.adapters.exotel import test_protocol as exotel_golden
from tests.adapters.flowstorm.v2.helpers import parse_json_events, split_events
from tests.adapters.plivo import test_protocol as plivo_golden
from tests.adapters.telnyx import test_protocol as telnyx_golden
from tests.adapters.twilio.test_protocol import START
from tests.adapters.vonage import test_protocol as vonage_golden

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
V1_SPEC = ROOT.parent / "shared" / "specs" / "flowstorm-socket-v1.md"

# ------------------------------------------------------------------------- atoms

_DEPTHS = (2, 63, 64, 65, 100, 999, 1000, 1001)
_DIGITS = (99, 100, 101, 4300, 4301, 5000)
_UNICODE = (
    "\u202e",  # right-to-left override
    "\ufeff",  # BOM
    "\U0001d518",  # non-BMP
    "e\u0301",  # combining
    "\u2028\u2029",  # line/paragraph separators
    "\x00",
    "\x1f",
    "\x7f",
    "\uffff",
    "\u0378",  # unassigned
    "😀" * 3,
)
_ESCAPES = (
    "\\ud800",
    "\\udfff",
    "\\udc00\\ud800",
    "\\ud83d\\ude00",
    "\\u0000",
    "\\uZZZZ",
    "\\x41",
    "\\",
    "\\u12",
)
_WRONG = ("null", "true", "false", "0", "-1", "1.5", '""', '"1"', "[]", "{}", "[null]", '{"":""}')


def _depth(rng: random.Random) -> int:
    """A nesting depth: mostly around the bounds, now and then up to 20,000."""
    return rng.choice(_DEPTHS) if rng.random() < 0.9 else rng.randint(1, 20_000)


def _digits(rng: random.Random) -> int:
    """A number's digit count: mostly around the bounds, now and then up to 50,000."""
    return rng.choice(_DIGITS) if rng.random() < 0.9 else rng.randint(1, 50_000)


def _size(rng: random.Random, big: int) -> int:
    """A length: mostly small, now and then ``big``."""
    return rng.choice((0, 1, 2, 100, 1000)) if rng.random() < 0.95 else big


def atom(rng: random.Random) -> str:
    """One hostile JSON text (valid, out of bounds, or malformed on purpose)."""
    kind = rng.randrange(14)
    if kind == 0:
        d = _depth(rng)
        return "[" * d + "]" * d
    if kind == 1:
        d = _depth(rng)
        return '{"a":' * d + "1" + "}" * d
    if kind == 2:
        d = _depth(rng)
        return '[{"k":' * d + "0" + "}]" * d
    if kind == 3:
        return rng.choice("[{") * _depth(rng)  # never closed
    if kind == 4:
        return rng.choice(("", "-")) + rng.choice("123456789") + "0" * (_digits(rng) - 1)
    if kind == 5:
        n = _digits(rng)
        return rng.choice(
            ("1." + "0" * n, "1e" + "9" * min(n, 400), "1e999", "-1e999", "1e-999", "0." + "0" * n)
        )
    if kind == 6:
        return rng.choice(("NaN", "Infinity", "-Infinity", "nan", "inf", "01", "-", "1.", ".5"))
    if kind == 7:
        n = _size(rng, rng.choice((65_536, 200_000)))
        return '"' + rng.choice("a\u00e9\u4e2d") * n + '"'
    if kind == 8:
        return '"' + "".join(rng.choice(_ESCAPES) for _ in range(rng.randint(1, 4))) + '"'
    if kind == 9:
        return json.dumps("".join(rng.choice(_UNICODE) for _ in range(rng.randint(1, 5))))[
            : None if rng.random() < 0.5 else -1
        ].replace("\\u", "\\u" if rng.random() < 0.5 else "\\U")
    if kind == 10:
        return rng.choice(_WRONG)
    if kind == 11:
        return "[" + ",".join(["1"] * _size(rng, 100_000)) + "]"
    if kind == 12:
        return '{"a":1,"a":' + rng.choice(_WRONG) + "}"
    return json.dumps(_random_value(rng, 4), ensure_ascii=rng.random() < 0.5)


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**70), 2**70)
    if kind == 3:
        return rng.uniform(-1e300, 1e300)
    if kind in (4, 5):
        return "".join(
            rng.choice(_UNICODE) if rng.random() < 0.2 else chr(rng.randint(32, 0x2FF))
            for _ in range(rng.randint(0, 12))
        )
    if kind == 6:
        return [_random_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {str(_random_value(rng, 0)): _random_value(rng, depth - 1) for _ in range(4)}


# --------------------------------------------------------------------- mutations

_MARK = "\x00\x01fuzz\x01\x00"
_SPLICE = json.dumps(_MARK)


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _places(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _places(item, (*path, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


def splice(rng: random.Random, seed: Any, raw: str) -> str:
    """``seed`` (a JSON value) with ``raw`` JSON text at a random place (or a new key)."""
    place = rng.choice(_places(seed))
    if rng.random() < 0.2:  # a new key beside the existing ones
        holder = _places(seed)
        dicts = [p for p in holder if isinstance(_at(seed, p), dict)]
        if dicts:
            where = rng.choice(dicts)
            target = dict(_at(seed, where))
            target[rng.choice(("type", "x", "", "\u202e", "event", "request"))] = _MARK
            return json.dumps(_replace(seed, where, target)).replace(_SPLICE, raw, 1)
    return json.dumps(_replace(seed, place, _MARK)).replace(_SPLICE, raw, 1)


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def damage(rng: random.Random, text: str) -> str:
    """``text`` with a random text-level damage."""
    kind = rng.randrange(6)
    pos = rng.randint(0, len(text))
    if kind == 0:
        return text[:pos]
    if kind == 1:
        return text[:pos] + rng.choice('{}[]",:\\ \n') * rng.randint(1, 3) + text[pos:]
    if kind == 2:
        end = min(len(text), pos + rng.randint(1, 20))
        return text[:pos] + text[end:]
    if kind == 3:
        end = min(len(text), pos + rng.randint(1, 50))
        return text[:end] + text[pos:]
    if kind == 4:
        return text[:pos] + rng.choice(("\ud800", "\udfff", "\x00", "\ufeff")) + text[pos:]
    return text[:pos] + chr(rng.randint(0, 0x10FFFF)) + text[pos:]


def hostile(rng: random.Random, seeds: tuple[Any, ...]) -> str:
    """One hostile input made from ``seeds`` (JSON values; see the module doc)."""
    roll = rng.random()
    if not seeds or roll < 0.1:
        return atom(rng)
    seed = rng.choice(seeds)
    if roll < 0.15:  # now and then a golden message as it is: the paths of success
        return json.dumps(seed)
    if roll < 0.65:
        return splice(rng, seed, atom(rng))
    if roll < 0.8:
        return splice(rng, seed, json.dumps(_random_value(rng, 2)))
    text = json.dumps(seed) if rng.random() < 0.5 else splice(rng, seed, atom(rng))
    for _ in range(rng.randint(1, 3)):
        text = damage(rng, text)
    return text


# ------------------------------------------------------------------------- seeds


def _fixtures(folder: str) -> tuple[Any, ...]:
    return tuple(
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((FIXTURES / folder).rglob("*.json"))
    )


def _v1_seeds() -> tuple[Any, ...]:
    text = V1_SPEC.read_text(encoding="utf-8")
    return tuple(json.loads(b.split("```")[0]) for b in text.split("```javascript")[1:])


TWILIO_START: dict[str, Any] = json.loads(START)  # the Twilio tests' start frame
STREAM: str = TWILIO_START["streamSid"]
CALL: str = TWILIO_START["start"]["callSid"]
TWILIO_SEEDS: tuple[Any, ...] = (
    {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    TWILIO_START,
    {
        "event": "media",
        "sequenceNumber": "3",
        "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": "/" * 212},
        "streamSid": STREAM,
    },
    {"event": "dtmf", "streamSid": STREAM, "dtmf": {"track": "inbound_track", "digit": "1"}},
    {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM, "mark": {"name": "m"}},
    {"event": "stop", "stop": {"accountSid": "AC" + "0" * 32, "callSid": CALL}},
)
V2_SEEDS: tuple[Any, ...] = (
    {"type": "Input", "input": {"transcript": {"text": "hello"}, "attributes": {"a": 1}}},
    {"type": "Log", "entries": [{"time": 1, "level": "WARN", "text": "mic muted"}]},
    {"type": "Binary", "data": "AAAAAAAA"},
    {"type": "InputStreamClose"},
)
VOICEFLOW_SEEDS: tuple[Any, ...] = (
    [
        "client.start",
        {
            "userID": "u",
            "projectID": "p",
            "sessionKey": None,
            "config": {"userTimezone": "Europe/Prague", "audioEvents": True},
        },
    ],
    ["session.create", {}],
    ["action.send", {"action": {"type": "text", "payload": "hi"}, "messageID": "m1"}],
    [
        "action.send",
        {
            "action": {
                "type": "intent",
                "payload": {
                    "intent": {"name": "order"},
                    "entities": [{"name": "size", "value": "large"}],
                    "query": "a large one",
                    "confidence": 0.9,
                },
            }
        },
    ],
    ["action.send", {"action": {"type": "event", "payload": {"event": {"name": "x"}}}}],
)
CARRIER_SEEDS: dict[str, tuple[Callable[[], CarrierCodec], str, tuple[Any, ...]]] = {
    # carrier: (new codec, its start frame, the golden messages of its tests)
    "telnyx": (
        TelnyxCodec,
        telnyx_golden.start("L16", 16000),
        tuple(
            json.loads(m)
            for m in (
                telnyx_golden.CONNECTED,
                telnyx_golden.START,
                telnyx_golden.DTMF,
                telnyx_golden.media(b"\x00\x01" * 160),
            )
        ),
    ),
    "vonage": (
        VonageCodec,
        vonage_golden.CONNECTED,
        (
            json.loads(vonage_golden.CONNECTED),
            {"event": "websocket:notify", "payload": {"name": "3"}},
            {"event": "websocket:dtmf", "digit": "5", "duration": 260},
        ),
    ),
    "plivo": (
        PlivoCodec,
        plivo_golden.START,
        tuple(
            json.loads(m)
            for m in (
                plivo_golden.START,
                plivo_golden.DTMF,
                plivo_golden.PLAYED,
                plivo_golden.media(b"\xff" * 160),
            )
        ),
    ),
    "exotel": (
        ExotelCodec,
        exotel_golden.START,
        tuple(
            json.loads(m)
            for m in (exotel_golden.START, exotel_golden.DTMF, exotel_golden.media(b"\0" * 320))
        ),
    ),
}
TIME_SEEDS: tuple[Any, ...] = (
    "2024-06-01T12:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "Europe/Prague",
    "America",
    "America/New_York",
)

# ----------------------------------------------------------------------- targets

_ALEXA_NOW = datetime(2026, 1, 1, tzinfo=UTC)
_ALEXA_STAMP = "2026-01-01T00:00:00Z"
_ALEXA_HEADERS = {
    "SignatureCertChainUrl": "https://s3.amazonaws.com/echo.api/echo-api-cert.pem",
    "Signature-256": base64.b64encode(b"\x01" * 256).decode(),
}
_GOOGLE_HEADER = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k","typ":"JWT"}').rstrip(b"=")


class _NoFetch:
    async def fetch(self, url: str) -> bytes:
        raise OSError("the fuzzer fetches nothing")


def _b64(text: str) -> str:
    raw = text.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class _EngineIOPacket(engineio.packet.Packet):  # type: ignore[misc]
    """An Engine.IO packet decoded as the gateway's server decodes them (its json option)."""

    json = BoundedJson


@dataclass(frozen=True)
class Target:
    """One parser: ``run(text)`` parses an input; ``declared`` are the errors it may raise."""

    name: str
    run: Callable[[str], object]
    seeds: tuple[Any, ...]
    declared: tuple[type[BaseException], ...] = (ProtocolError,)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def targets() -> list[Target]:
    """Every parser a client's JSON, date or zone name reaches, with its seeds."""
    loop = asyncio.new_event_loop()
    alexa_seeds = tuple(
        {**s, "request": {**s["request"], "timestamp": _ALEXA_STAMP}}
        for s in _fixtures("alexa")
        if isinstance(s.get("request"), dict)
    )
    google_seeds = _fixtures("google")
    alexa_verifier = AlexaVerifier(
        frozenset({"amzn1.ask.skill.x"}), fetcher=_NoFetch(), clock=lambda: _ALEXA_NOW
    )
    google_verifier = GoogleVerifier(frozenset({"p"}), StaticCertSource({}))
    keys = SessionKeys("fuzz-secret-0123456789abcdef0123", 3600)

    def v1(text: str, *, after_init: bool) -> object:
        conn = V1Connection(True, max_frame_bytes=1 << 20, new_id=lambda: "s1")
        if after_init:
            conn.receive_text('{"type":"Init","key":"k","deviceId":"d","config":{}}')
        return conn.receive_text(text)

    def v2_reader(text: str) -> object:
        body = _bytes(text)
        reader = JsonEventReader(max_event_bytes=1 << 20, max_text_bytes=1 << 20)
        events = []
        step = 1 + len(body) // 7
        for i in range(0, len(body), step):
            events += reader.feed(body[i : i + step])
        reader.close()
        return split_events(events)

    def twilio(text: str, *, started: bool) -> object:
        call = TwilioCall(CALL, CallConfig(key_allowed=lambda key: True))
        if started:
            call.receive(json.dumps(TWILIO_START))
        return call.receive(text)

    def alexa(text: str) -> object:
        return plan(parse_envelope(_bytes(text)), AlexaConfig())

    def alexa_verify(text: str) -> object:
        return loop.run_until_complete(alexa_verifier.verify(_ALEXA_HEADERS, _bytes(text)))

    def google(text: str) -> object:
        data = google_body(_bytes(text))
        return (detect(data), google_plan(data) if "handler" in data else dialogflow_plan(data))

    def google_token(text: str, *, segment: int) -> object:
        parts = [_GOOGLE_HEADER.decode(), _b64('{"iss":"x"}'), "c2ln"]
        parts[segment] = _b64(text)
        token = ".".join(parts)
        return loop.run_until_complete(google_verifier.verify({"Authorization": f"Bearer {token}"}))

    def socketio_packet(text: str) -> object:
        try:  # what the server's guard answers with an error event
            packet = BoundedPacket(encoded_packet="2" + text)
        except (ProtocolError, ValueError):  # ValueError: python-socketio's own decoder
            return None
        conn = VoiceflowConnection(keys=keys, project_allowed=lambda p: True, clock=lambda: 0.0)
        data = packet.data
        return conn.receive(data[0], data[1:])  # never raises

    def engineio_message(text: str) -> object:
        message = _EngineIOPacket(encoded_packet="4" + text)  # never raises: text kept
        try:
            packet = BoundedPacket(encoded_packet=message.data)
        except (ProtocolError, ValueError):
            return None
        if packet.packet_type != socketio.packet.EVENT:
            return packet
        conn = VoiceflowConnection(keys=keys, project_allowed=lambda p: True, clock=lambda: 0.0)
        return conn.receive(packet.data[0], packet.data[1:])

    def voiceflow_start(text: str) -> object:
        return parse_client_start(load_json(text))

    def config(text: str) -> object:
        pairs = dict(parse_qsl(text, keep_blank_values=True))
        return parse_config(pairs, pairs)

    def string_of(parse: Callable[[str], object]) -> Callable[[str], object]:
        def run(text: str) -> object:
            value = load_json(text)
            return parse(value if isinstance(value, str) else text)

        return run

    def carrier(name: str, text: str, *, started: bool) -> object:
        new, start, _ = CARRIER_SEEDS[name]
        codec = new()
        if started:
            codec.receive_text(start)
        return codec.receive_text(text)

    carrier_targets = [
        Target(
            f"{name}.codec({'after' if started else 'before'} start)",
            functools.partial(carrier, name, started=started),
            seeds,
        )
        for name, (_, _, seeds) in CARRIER_SEEDS.items()
        for started in (False, True)
    ]
    v1_seeds = _v1_seeds()
    return [
        *carrier_targets,
        Target("json.load_json(str)", load_json, v1_seeds + V2_SEEDS),
        Target("json.load_json(bytes)", lambda t: load_json(_bytes(t)), v1_seeds + V2_SEEDS),
        Target("v1.parse_event", parse_event, v1_seeds),
        Target("v1.connection(before Init)", lambda t: v1(t, after_init=False), v1_seeds, ()),
        Target("v1.connection(after Init)", lambda t: v1(t, after_init=True), v1_seeds, ()),
        Target("v2.parse_json_events", lambda t: parse_json_events(_bytes(t)), V2_SEEDS),
        Target("v2.JsonEventReader(chunks)", v2_reader, V2_SEEDS),
        Target("v2.text_input", lambda t: text_input(_bytes(t)), V2_SEEDS),
        Target(
            "v2.parse_config(query)",
            config,
            ({"key": "k", "sttSampleRate": "16000", "timeZone": "UTC", "tts": "None"},),
        ),
        Target("twilio.parse_message", parse_message, TWILIO_SEEDS),
        Target("twilio.call(before start)", lambda t: twilio(t, started=False), TWILIO_SEEDS),
        Target("twilio.call(after start)", lambda t: twilio(t, started=True), TWILIO_SEEDS),
        Target("alexa.parse_envelope+plan", alexa, alexa_seeds),
        Target(
            "alexa.verify(body, timestamp)",
            alexa_verify,
            alexa_seeds,
            (AlexaVerificationError,),
        ),
        Target("google.body+plan", google, google_seeds),
        Target(
            "google.verify(jwt header)",
            lambda t: google_token(t, segment=0),
            ({"alg": "RS256", "kid": "k", "typ": "JWT"},),
            (GoogleVerificationError,),
        ),
        Target(
            "google.verify(jwt claims)",
            lambda t: google_token(t, segment=1),
            ({"iss": "https://accounts.google.com", "aud": "p", "iat": 1, "exp": 2},),
            (GoogleVerificationError,),
        ),
        Target("voiceflow.socketio_packet+connection", socketio_packet, VOICEFLOW_SEEDS, ()),
        Target("voiceflow.engineio_message", engineio_message, VOICEFLOW_SEEDS, ()),
        Target(
            "voiceflow.parse_client_start",
            voiceflow_start,
            tuple(s[1] for s in VOICEFLOW_SEEDS[:1]),
        ),
        Target("time.parse_timestamp", string_of(parse_timestamp), TIME_SEEDS),
        Target("time.check_time_zone", string_of(check_time_zone), TIME_SEEDS),
    ]
