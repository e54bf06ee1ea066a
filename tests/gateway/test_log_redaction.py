"""Credentials never reach the log: session ids (V1/V2 bearer credentials) and `?key=`.

A real ``gateway serve`` process with JSON logs at INFO (access log on) serves
V2 turns; its whole stderr is then searched for the credentials.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from fastapi import FastAPI
from websockets.asyncio.client import connect as ws_connect_async
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from adapters.voiceflow.protocol import PATH as VOICEFLOW_PATH
from adapters.voiceflow.routes import VoiceflowServer
from gateway.app import create_app
from gateway.events import ResponseItem
from gateway.logs import (
    QUIET_LIBRARIES,
    SOCKETIO_LOGGERS,
    JsonFormatter,
    RedactQuery,
    configure_logging,
    logfmt,
    logged_path,
    masked_number,
    redact_query,
    session_ref,
    set_hash_key,
    tts_ref,
)
from gateway.redisconn import SocketIoRedisOutage
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.speech.tts import SynthesisError
from tests.adapters.flowstorm.v1.helpers import (
    init_frame,
    recv_json,
    request_frame,
    send_json,
    turn,
    ws_url,
)
from tests.conftest import ROOT, GatewayProcess, serve, served_app

APP_KEY = "app-key-that-is-a-secret"
HASH_KEY = "log-hash-key-for-this-test"
STREAM_TOKEN = "stream-token-that-is-a-secret"


def test_redact_query_hides_credential_values_only() -> None:
    line = "GET /client?key=abc&deviceId=d1&X-Token=t&token=t2&sessionKey=s HTTP/1.1"
    assert redact_query(line) == (
        "GET /client?key=***&deviceId=d1&X-Token=t&token=***&sessionKey=*** HTTP/1.1"
    )
    assert redact_query("/twilio/voice?Key=K1;secret=x") == "/twilio/voice?Key=***;secret=***"
    assert redact_query("/healthz") == "/healthz"
    assert redact_query("/v1/sessions/0b7c-secret?x=1") == "/v1/sessions/***?x=1"
    assert redact_query("/vonage/stream/tok.en-1") == "/vonage/stream/***"


def test_a_session_id_with_slashes_is_hidden_whole() -> None:
    """A Flowstorm session id may hold ``/`` (``GET /v1/sessions/{id}`` takes the rest of
    the path as the id); only its first segment was hidden, the rest written as sent
    (``/v1/sessions/***/part-of-the-id``). Now everything up to the query is."""
    assert redact_query("/v1/sessions/abc/secret-part?x=1") == "/v1/sessions/***?x=1"
    assert redact_query('"GET /v1/sessions/a/b/c HTTP/1.1" 200') == (
        '"GET /v1/sessions/*** HTTP/1.1" 200'
    )
    assert logged_path("/v1/sessions/abc/secret-part") == "/v1/sessions/***"
    assert redact_query("/twilio/stream/tok/next") == "/twilio/stream/***/next"


def test_access_record_args_are_redacted() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "PUT", "/client?key=s3cret&tts=None", "1.1", 200),
        None,
    )
    assert RedactQuery().filter(record)
    assert "s3cret" not in record.getMessage()
    assert "key=***&tts=None" in record.getMessage()


def test_session_id_field_becomes_a_keyed_hash() -> None:
    set_hash_key("k1")
    try:
        record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "turn ok", (), None)
        record.session_id = "flowstorm:0b7c-secret"
        entry = json.loads(JsonFormatter().format(record))
        assert "session_id" not in entry
        assert entry["session"] == session_ref("flowstorm:0b7c-secret")
        assert entry["session"].startswith("flowstorm:h-")
        assert "0b7c" not in json.dumps(entry)
        set_hash_key("k2")  # another key, another reference: the hash is keyed
        assert session_ref("flowstorm:0b7c-secret") != entry["session"]
    finally:
        set_hash_key(None)


def test_a_session_reference_is_made_once_per_key_and_follows_a_changed_key() -> None:
    import hashlib
    import hmac

    from gateway.logs import _session_ref

    keys = {"now": b"first master key"}
    set_hash_key(lambda: keys["now"])  # as the master key's derived key, which may change

    def expected(key: bytes, session_id: str) -> str:
        digest = hmac.new(key, session_id.encode(), hashlib.sha256).digest()
        return f"alexa:h-{digest[:8].hex()}"

    try:
        first = session_ref("alexa:amzn1.echo-api.session.s1")
        hits = _session_ref.cache_info().hits
        assert session_ref("alexa:amzn1.echo-api.session.s1") == first  # the same text
        assert _session_ref.cache_info().hits == hits + 1  # no second HMAC
        assert first == expected(b"first master key", "amzn1.echo-api.session.s1")
        keys["now"] = b"adopted master key"  # a key adopted later: the new reference
        assert session_ref("alexa:amzn1.echo-api.session.s1") == expected(
            b"adopted master key", "amzn1.echo-api.session.s1"
        )
        assert session_ref("alexa:amzn1.echo-api.session.s1") != first
    finally:
        set_hash_key(None)


def test_a_served_turn_logs_neither_the_session_id_nor_the_key(tmp_path: Path) -> None:
    log_file = tmp_path / "gateway.log"
    env = {
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_LOG_HASH_KEY": HASH_KEY,
        "GATEWAY_TTS_PROVIDER": "espeak-ng",
        "GATEWAY_ACCESS_LOG": "true",  # off by default; its lines must be redacted too
        "GATEWAY_ADMIN_KEYS": "admin-key-of-this-test",
        "PYTHONPATH": str(ROOT),
    }
    with log_file.open("wb") as sink:
        # its port held and handed over (--fd): no other worker's gateway answers there
        gw = GatewayProcess(env, stderr=sink, log_level="info")
        gw.env.pop("GATEWAY_REDIS_URL", None)
        port = gw.port
        try:
            gw.start()
            base = gw.url
            with httpx.Client(base_url=base) as client:
                text = {"Content-Type": "text/plain"}
                first = client.put(f"/client?key={APP_KEY}&tts=None", headers=text, content="hi")
                session = first.cookies["flowstorm-session-id"]
                second = client.put(f"/client?key={APP_KEY}&tts=None", headers=text, content="x")
                assert (first.status_code, second.status_code) == (200, 200)
                client.get(f"/client?key={APP_KEY}")
                # the admin API's session view: the id in the path (access log)
                admin = {"Authorization": "Bearer admin-key-of-this-test"}
                assert client.get(f"/v1/sessions/{session}", headers=admin).status_code == 200
            # uvicorn logs every WebSocket request at INFO (uvicorn.error), access log or not
            for path in (f"/socket?key={APP_KEY}", f"/twilio/stream/{STREAM_TOKEN}"):
                try:
                    with ws_connect(f"ws://127.0.0.1:{port}{path}", open_timeout=10):
                        pass
                except InvalidStatus:  # the stream token is refused: logged all the same
                    pass
        finally:
            gw.stop()
    logged = log_file.read_text()
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert any(e["logger"] == "uvicorn.access" and "key=***" in e["message"] for e in lines)
    turns = [e for e in lines if e["message"] == "turn ok"]
    assert len(turns) == 2
    set_hash_key(HASH_KEY)
    try:
        expected = session_ref(f"flowstorm:{session}")
    finally:
        set_hash_key(None)
    assert [e["session"] for e in turns] == [expected, expected]
    assert session not in logged
    assert APP_KEY not in logged
    assert STREAM_TOKEN not in logged
    assert any('"WebSocket /socket?key=***" [accepted]' in e["message"] for e in lines)
    assert any('"WebSocket /twilio/stream/***" 403' in e["message"] for e in lines)
    assert any(e["message"].endswith('"GET /v1/sessions/*** HTTP/1.1" 200') for e in lines)


async def test_the_http_clients_request_lines_with_credentials_are_not_logged(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """httpx logs each request's whole URL at INFO: a Rasa core's ``?token=``, a session
    id in a Voiceflow or Dialogflow CX path. Under configure_logging at INFO (the
    default) they are not written."""
    app = FastAPI()

    @app.post("/webhooks/rest/webhook")
    async def rasa() -> list[dict[str, str]]:
        return [{"text": "hi"}]

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("httpx").level)
    try:
        configure_logging("INFO")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://core") as client:
            answer = await client.post("/webhooks/rest/webhook?token=RASA-SECRET-1", json={})
        assert answer.json() == [{"text": "hi"}]
        logging.getLogger("gateway.test").warning("a line that is written")
        # the twilio library's client (REST hang-ups) logs each request's URL at INFO too
        assert not logging.getLogger("twilio.http_client").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], level, httpx_level = saved
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(httpx_level)
        logging.getLogger("twilio.http_client").setLevel(logging.NOTSET)
    written = capfd.readouterr().err
    assert "a line that is written" in written
    assert "RASA-SECRET-1" not in written


def test_socketio_lines_are_written_once_in_the_gateways_format(tmp_path: Path) -> None:
    """python-engineio's ERROR for a request of an unknown Engine.IO session is one JSON
    line of the root handler, not also a bare line of a handler of its own (which
    python-engineio adds for ``engineio_logger=False``); the sid it names (a polling
    client's credential, maybe a live session of another instance) is written as its
    reference, and an access line hides it too."""
    log_file = tmp_path / "gateway.log"
    env = {"GATEWAY_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    with log_file.open("wb") as sink:
        gw = GatewayProcess(env, stderr=sink)
        try:
            gw.start()
            answer = httpx.get(f"{gw.url}{VOICEFLOW_PATH}/?EIO=4&transport=polling&sid=nosuch")
            assert answer.status_code == 400
        finally:
            gw.stop()
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("{")] == []
    entries = [json.loads(line) for line in lines]  # every line: one JSON object
    assert all(isinstance(entry, dict) for entry in entries)
    assert len(set(lines)) == len(lines)
    engineio = [e for e in entries if e["logger"] == "engineio.server"]
    assert [e["level"] for e in engineio] == ["ERROR"]
    assert re.fullmatch(
        r"Invalid session engine\.io:h-[0-9a-f]{16}", engineio[0]["message"].partition(" (")[0]
    )
    assert "nosuch" not in log_file.read_text()
    # an access line (GATEWAY_ACCESS_LOG=true, at INFO) of a polling request hides the sid
    polled = f'"GET {VOICEFLOW_PATH}/?EIO=4&transport=polling&sid=nosuch HTTP/1.1" 400'
    assert redact_query(polled) == polled.replace("sid=nosuch", "sid=***")


def test_text_log_lines_carry_the_turns_fields(tmp_path: Path) -> None:
    """The default text format wrote a turn as ``INFO gateway.conversation turn ok``: no
    channel, session, turn number or latency (only the JSON format had them). Its line
    now ends with them as logfmt pairs (a value with a space quoted), the session by
    its reference, never its id; the request id follows."""
    log_file = tmp_path / "gateway.log"
    with log_file.open("wb") as sink:
        gw = GatewayProcess({"PYTHONPATH": str(ROOT)}, stderr=sink, log_level="info")
        try:
            gw.start()
            with httpx.Client(base_url=gw.url) as client:
                for text in ("my name is Ada", "what is my name"):
                    answer = client.put(
                        "/client?key=log-app&deviceId=d-1&tts=None",
                        content=text,
                        headers={"Content-Type": "text/plain"},
                    )
                    assert answer.status_code == 200
                cookies = list(client.cookies.values())
        finally:
            gw.stop()
    written = log_file.read_text()
    turns = [line for line in written.splitlines() if " gateway.conversation turn " in line]
    assert len(turns) == 2, written
    pairs = [
        dict(re.findall(r' (\w+)=("[^"]*"|\S+)', line.partition(" turn ok")[2])) for line in turns
    ]
    for number, fields in enumerate(pairs, start=1):
        assert fields["channel"] == "flowstorm_v2"
        assert fields["turn"] == str(number)
        assert fields["outcome"] == "ok"
        assert float(fields["latency_ms"]) > 0
        assert re.fullmatch(r"[0-9a-f]{32}", fields["request_id"]), fields
    assert pairs[0]["session"] == pairs[1]["session"]
    assert re.fullmatch(r"flowstorm:h-[0-9a-f]{16}", pairs[0]["session"])
    assert cookies  # the session id (a bearer credential) is never written
    assert all(value not in written for value in cookies)


def test_logfmt_quotes_what_would_break_a_pair() -> None:
    assert logfmt({"channel": "alexa", "turn": 3}) == " channel=alexa turn=3"
    assert logfmt({"reason": 'a "b" c=d', "empty": ""}) == ' reason="a \\"b\\" c=d" empty=""'
    assert logfmt({"text": "one\ntwo \\ three"}) == ' text="one\\ntwo \\\\ three"'


@pytest.mark.parametrize("configured_first", [True, False])
def test_socketio_loggers_propagate_only_whatever_the_order(configured_first: bool) -> None:
    """Whether configure_logging runs before or after the socket.io server is made (tests
    make apps without it), python-socketio's and python-engineio's loggers have no
    handler of their own (not even one a server made with ``logger=False`` added
    earlier) and pass ERRORs only to the root's handler."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    loggers = [logging.getLogger(name) for name in SOCKETIO_LOGGERS]
    try:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)  # as in a fresh process
        socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)
        assert all(logger.handlers for logger in loggers)  # python-socketio's own handlers
        if configured_first:
            configure_logging("DEBUG", "json")
            VoiceflowServer(Settings(redis_url=None))
        else:
            VoiceflowServer(Settings(redis_url=None))
            configure_logging("DEBUG", "json")
        for logger in loggers:
            assert (logger.handlers, logger.propagate) == ([], True)
            assert logger.getEffectiveLevel() == logging.ERROR
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.parametrize("level", ["ERROR", "CRITICAL"])
def test_no_line_below_the_configured_level_is_written(
    capfd: pytest.CaptureFixture[str], level: str
) -> None:
    """GATEWAY_LOG_LEVEL holds for every logger: the quiet libraries' own WARNING level
    (httpx, twilio) and a WARNING that a filter made of an ERROR (python-socketio's Redis
    outage lines) write nothing under ``error``/``critical``; a CRITICAL line is written."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    outage = logging.getLogger("socketio.server")
    lowered = SocketIoRedisOutage(outage.name)
    try:
        configure_logging(level)
        logging.getLogger("httpx").warning("an httpx warning")
        logging.getLogger("twilio.http_client").warning("a twilio warning")
        outage.addFilter(lowered)
        outage.error(
            "Cannot receive from redis... retrying in 1 secs",
            extra={"redis_exception": "Connection refused"},
        )
        logging.getLogger("gateway.test").critical("a critical line")
    finally:
        root.handlers[:], restored = saved
        root.setLevel(restored)
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.NOTSET)
        outage.removeFilter(lowered)
    written = capfd.readouterr().err
    assert "a critical line" in written
    assert "warning" not in written
    assert "Cannot receive from redis" not in written


@pytest.mark.parametrize(
    ("number", "shown"),
    [
        ("+15550100", "+****0100"),
        ("+44 20 7946 0958", "+** ** **** 0958"),
        ("0100", "0100"),
        ("client:alice", "client:alice"),
        ("", ""),
    ],
)
def test_a_phone_number_is_logged_by_its_last_four_digits(number: str, shown: str) -> None:
    """Only a number's last 4 digits reach the log; text without digits stays as it is."""
    assert masked_number(number) == shown


async def test_an_unhandled_error_is_logged_without_the_session_id_of_its_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The line of an unhandled error named the path with the session id in it
    (``unhandled error serving GET /v1/sessions/<id>``, a credential of the admin API's
    session view). The path is redacted as in the access log.

    The failure is a route of the test's own under ``/v1/sessions/`` that raises (the
    view itself has no unhandled error left to provoke: a session the store cannot read
    is taken as absent, see test_push.py); the error handler and the log are the app's."""
    secret_id = "view-s3cret-session-4711"
    settings = Settings()
    app = create_app(settings)

    @app.get("/v1/sessions/{session_id}/boom")
    async def boom(session_id: str) -> None:
        raise RuntimeError("a gateway bug")

    # before the session view's route, which takes the rest of the path as the id
    app.router.routes.insert(0, app.router.routes.pop())

    async with (
        serve(app, **uvicorn_options(settings)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.get(f"/v1/sessions/{secret_id}/boom")
    assert answer.status_code == 500
    assert answer.json()["detail"] == "The gateway failed; see its log."
    server = [r for r in caplog.records if r.name.startswith(("gateway", "uvicorn"))]
    assert [r.getMessage() for r in server if r.levelno >= logging.ERROR] == [
        "unhandled error serving GET /v1/sessions/***"  # the rest of the path may be the id's
    ]
    assert not [r for r in server if secret_id in r.getMessage()]


def _text_log_of(requests: list[str], tmp_path: Path) -> str:
    """The stderr of a real ``gateway serve`` (text format, INFO, access log on) after it
    answered a GET of each of ``requests`` (paths, sent as written)."""
    log_file = tmp_path / "gateway.log"
    env = {"GATEWAY_ACCESS_LOG": "true", "GATEWAY_LOG_FORMAT": "text", "PYTHONPATH": str(ROOT)}
    with log_file.open("wb") as sink:
        gateway = GatewayProcess(env, stderr=sink, log_level="info").start()
        try:
            with httpx.Client(base_url=gateway.url) as client:
                for path in requests:
                    client.get(path)
        finally:
            gateway.stop()
    return log_file.read_text(encoding="utf-8", errors="replace")


def test_a_carriers_app_key_is_hidden_in_the_access_log(tmp_path: Path) -> None:
    """The carriers' answer and status URLs take the application key as ``appKey``
    (``/telnyx/texml?appKey=...``, Vonage, Plivo): the access log wrote it whole, though
    ``key``, the same key on the Flowstorm and Twilio URLs, is written ``***``."""
    paths = [
        f"/telnyx/texml?appKey={APP_KEY}",
        f"/vonage/answer?from=1&appKey={APP_KEY}",
        f"/plivo/answer?APPKEY={APP_KEY}",
    ]
    logged = _text_log_of(paths, tmp_path)
    assert APP_KEY not in logged
    assert '"GET /telnyx/texml?appKey=*** HTTP/1.1"' in logged
    assert '"GET /vonage/answer?from=1&appKey=*** HTTP/1.1"' in logged
    assert redact_query(f"/plivo/answer?APPKEY={APP_KEY}&x=1") == "/plivo/answer?APPKEY=***&x=1"


def test_an_admin_refusal_names_the_path_escaped_and_cut(tmp_path: Path) -> None:
    """The WARNING of a refused admin request quoted the decoded path whole: anyone could
    write an ESC sequence into the operator's terminal (``/v1/calls/%1b[2J`` clears it;
    the text format writes the message as it is) and make a line of tens of kB. The path
    is written percent-encoded outside printable ASCII and cut to 200 characters."""
    long_id = "A" * 5000
    logged = _text_log_of(["/v1/calls/x%1b[31mRED%07", f"/v1/calls/{long_id}"], tmp_path)
    refusals = [line for line in logged.splitlines() if "Admin request" in line]
    assert len(refusals) == 2, logged
    assert "\x1b" not in logged
    assert "\x07" not in logged
    assert "Admin request /v1/calls/x%1B%5B31mRED%07 from 127.0.0.1 refused (401)" in refusals[0]
    assert f"Admin request /v1/calls/{long_id[:190]}… from 127.0.0.1" in refusals[1]
    assert all(len(line) < 600 for line in refusals)


TTS_LINK = re.compile(r"/file/tts/([0-9a-f]{64})\.mp3")


def test_a_tts_file_id_is_logged_by_its_first_8_characters(tmp_path: Path) -> None:
    """A TTS file id is a capability (whoever has ``/file/tts/{id}.mp3`` gets the audio of
    what the bot said to someone): the access log wrote it whole on every GET and HEAD of
    a link. A real ``gateway serve`` (text format, access log on) answers a turn with a
    link, which is fetched: every line names the file by its first 8 characters and
    ``…``, the extension kept."""
    log_file = tmp_path / "gateway.log"
    env = {
        "GATEWAY_ACCESS_LOG": "true",
        "GATEWAY_LOG_FORMAT": "text",
        "GATEWAY_TTS_PROVIDER": "espeak-ng",
        "PYTHONPATH": str(ROOT),
    }
    with log_file.open("wb") as sink:
        gateway = GatewayProcess(env, stderr=sink, log_level="info").start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                text = {"Content-Type": "text/plain"}
                turn = client.put("/client?key=k", headers=text, content="hello")
                found = TTS_LINK.search(turn.text)
                assert found is not None, turn.text
                file_id = found[1]
                assert client.get(f"/file/tts/{file_id}.mp3").status_code == 200
                assert client.head(f"/file/tts/{file_id}.mp3").status_code == 200
                assert client.get(f"/file/tts/{file_id}.wav").status_code == 404
        finally:
            gateway.stop()
    logged = log_file.read_text(encoding="utf-8", errors="replace")
    assert file_id not in logged
    assert file_id[8:40] not in logged
    shown = f"/file/tts/{file_id[:8]}…"
    assert f'"GET {shown}.mp3 HTTP/1.1" 200' in logged, logged
    assert f'"HEAD {shown}.mp3 HTTP/1.1" 200' in logged
    assert f'"GET {shown}.wav HTTP/1.1" 404' in logged


class _FailingSynth:
    """A synthesizer whose every synthesis fails."""

    voice = "failing"

    async def synthesize(self, text: str, *, ssml: bool = False) -> Any:
        raise SynthesisError("the voice model is broken")


async def test_the_file_routes_lines_name_a_file_by_the_start_of_its_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The file route's own WARNING of a failed synthesis (``synthesis of <id> failed``)
    wrote the whole id, as the unhandled-error line would have (its path); both name it
    by :func:`tts_ref` now."""
    caplog.set_level(logging.INFO)
    settings = Settings(tts_provider="espeak-ng", public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        speech = app.state.gateway.speech
        speech.pool.synthesizer = _FailingSynth()
        item = await speech.link_item(ResponseItem(text="This cannot be said."), "mp3")
        assert item.audio is not None
        path = item.audio.removeprefix("http://gw.test")
        file_id = path.removeprefix("/file/tts/").removesuffix(".mp3")
        assert (await client.get(path)).status_code == 500
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.files"]
    assert said == [f"synthesis of {file_id[:8]}… failed: the voice model is broken"]
    server = [r for r in caplog.records if r.name.startswith(("gateway", "uvicorn", "adapters"))]
    assert not [r for r in server if file_id in r.getMessage()]
    assert tts_ref(file_id) == file_id[:8] + "…"
    assert logged_path(path) == f"/file/tts/{file_id[:8]}….mp3"
    assert redact_query(f"{path}?x=1") == f"/file/tts/{file_id[:8]}….mp3?x=1"
    # an extension no file has is cut with the id (a client's id in the wrong place)
    assert logged_path(f"/file/tts/x.{file_id}") == f"/file/tts/x.{file_id[:6]}…"


async def test_websocket_frames_and_credential_headers_are_not_logged_at_debug(
    tmp_path: Path,
) -> None:
    """At GATEWAY_LOG_LEVEL=DEBUG the websockets library (uvicorn gives it the
    ``uvicorn.error`` logger) wrote every frame's payload, a V1 ``Init``'s app key and a
    ``Request``'s session id and words among them, and every handshake header, a
    ``Cookie`` or an ``Authorization`` (Exotel's Basic credentials) too. The frame lines
    now say their type and size, and those headers' values are ``***``."""
    app_key, session_id = "debug-app-key-s3cret", "debug-session-s3cret"
    cookie, basic = "flowstorm-session-id=cookie-s3cret", "Basic YmFzaWMtczNjcmV0"
    log_file = tmp_path / "gateway.log"
    with log_file.open("wb") as sink:
        gw = GatewayProcess({"PYTHONPATH": str(ROOT)}, stderr=sink, log_level="debug")
        try:
            gw.start()
            headers = {"Cookie": cookie, "Authorization": basic}
            async with ws_connect_async(ws_url(gw.url), additional_headers=headers) as ws:
                frame = init_frame(deviceId="debug-device")
                frame["key"] = app_key
                await send_json(ws, frame)
                assert await recv_json(ws) == {"type": "Ready"}
                frames = await turn(ws, request_frame("#intro", session_id))
                assert frames[0]["type"] == "SessionStarted"
        finally:
            gw.stop()
    written = log_file.read_text()
    assert re.search(r"uvicorn\.error < TEXT \[\d+ bytes\]", written), written[-3000:]
    assert re.search(r"uvicorn\.error > TEXT \[\d+ bytes\]", written)
    assert "uvicorn.error < cookie: ***" in written
    assert "uvicorn.error < authorization: ***" in written
    assert "uvicorn.error < upgrade: websocket" in written  # other headers as they were
    for secret in (app_key, session_id, "cookie-s3cret", "YmFzaWMtczNjcmV0", "#intro"):
        assert secret not in written, secret
