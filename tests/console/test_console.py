"""The browser console (/console) in a real Chromium against a real gateway.

Each test loads the page afresh in one headless Chromium (tests/console/conftest.py)
and talks to one gateway served for the module (demo pipeline, pocketsphinx, Piper
TTS links). Screenshots of the states named go to test-artifacts/console/.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from selenium import webdriver
from selenium.webdriver.common.keys import Keys
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from gateway.app import create_app
from gateway.console import (
    ANSWER_MARGIN_S,
    CONTENT_SECURITY_POLICY,
    SECURITY_HEADERS,
    answer_timeout_s,
)
from gateway.server import GatewayWebSocketProtocol
from gateway.settings import Settings
from gateway.speech.audio import Pcm, encode_wav
from tests.conftest import no_server_errors, served_app
from tests.console.conftest import SPOKEN, Console, ThreadedGateway, chromium, speech_wav
from tests.speech import normalise, wer


def test_a_text_conversation_remembers_the_name(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    page = Console(browser, console_gateway.url)
    page.screenshot("closed")
    page.connect()
    assert page.session_id == "none"
    page.screenshot("sleeping")
    page.say("My name is Ada")  # the first text starts a session of the id the page proposed
    session_id = page.session_id
    assert session_id != "none"
    assert f'"type":"SessionStarted","sessionId":"{session_id}"' in "".join(page.events())
    # the answer's audio is skipped (Skip, shown while Responding): Listening at once
    page.driver.find_element("id", "text").send_keys("What is my name?")
    page.click("send")
    page.wait_for(
        lambda: page.state == "Responding" and page.bot_texts()[-1:] == ["Your name is Ada."]
    )
    page.click("skip")
    page.wait_for(lambda: page.state == "Listening")
    assert page.bot_texts() == ["Nice to meet you, Ada.", "Your name is Ada."]
    assert page.session_id == session_id
    assert [kind for kind, _ in page.chat()] == ["user", "bot", "user", "bot"]
    # each bot message came once, with its TTS link (a replay button)
    assert (
        browser.execute_script(
            "return document.querySelectorAll('#chat li.bot button.play').length"
        )
        == 2
    )
    page.assert_no_failures()
    page.screenshot("listening")


def test_a_spoken_turn_is_recognised_as_it_comes_and_answered(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    page = Console(browser, console_gateway.url)
    page.connect()
    page.click("mic")  # the fake microphone says SPOKEN (Piper), then silence
    page.wait_for(lambda: page.state == "Listening")
    page.wait_for(lambda: browser.find_elements("css selector", "#chat li.user.interim"))
    page.screenshot("listening-interim")
    page.wait_for(lambda: page.bot_texts() and page.state == "Listening")
    answer = page.bot_texts()
    [(kind, heard)] = [(k, t) for k, t in page.chat() if k.startswith("user")]
    assert kind == "user", "the final Recognized turned the interim bubble into the user's words"
    assert wer([(SPOKEN, normalise(heard))]) <= 0.34, heard
    assert answer == [f"You said: {heard}"]
    events = page.events()
    interim = [e for e in events if '"type":"Recognized"' in e and '"isFinal":false' in e]
    assert interim, "interim Recognized results were shown as they came"
    sent = [e.split("→ ", 1)[1] for e in events if "→ " in e]
    # the stream was opened (no session yet: none named), the audio streamed, and the
    # stream closed after the final result
    assert sent[1] == '{"type":"InputAudioStreamOpen"}'
    assert sent[2].startswith("audio: ")
    assert sent[2].endswith("s of LINEAR16 at 16000 Hz")
    assert sent[3:] == ['{"type":"InputAudioStreamClose"}']
    page.assert_no_failures()
    page.js("document.getElementById('details').open = true")  # history and events, shown
    page.screenshot("events")
    assert page.history() == [
        "Closed", "Open", "Sleeping", "Listening", "Processing", "Responding", "Listening",
    ]  # fmt: skip


def test_the_client_states_follow_the_events(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    page = Console(browser, console_gateway.url)
    page.connect()
    page.click("start")
    page.wait_for(lambda: page.state == "Responding")
    page.screenshot("responding")
    # Responding lasts while the two greetings' TTS audio plays, one after the other
    page.wait_for(lambda: page.state == "Listening")
    console_gateway.pause(1.0)  # the answer waits: the page shows Processing meanwhile
    page.say("My name is Grace", shot="processing")
    page.say("goodbye")  # the demo ends the session: Sleeping, and the sessionId is forgotten
    assert page.bot_texts()[-1] == "Goodbye, Grace!"
    assert page.state == "Sleeping"
    assert page.session_id == "none"
    page.assert_no_failures()
    assert page.history() == [
        "Closed", "Open", "Sleeping",
        "Processing", "Responding", "Listening",
        "Processing", "Responding", "Listening",
        "Processing", "Responding", "Sleeping",
    ]  # fmt: skip
    page.click("connect")  # Disconnect
    page.wait_for(lambda: page.state == "Closed")
    assert page.history()[-1] == "Closed"


def test_a_dropped_connection_reconnects_into_the_same_session(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    page = Console(browser, console_gateway.url, retry_s=2)
    page.connect()
    page.say("My name is Linus")
    session_id = page.session_id
    assert console_gateway.drop_websockets() == 1
    page.wait_for(lambda: page.state == "Failed")
    page.screenshot("failed")
    page.wait_for(lambda: page.state == "Sleeping")  # retried: Open, Init, Ready
    assert page.session_id == session_id
    page.say("What is my name?")
    assert page.bot_texts()[-1] == "Your name is Linus."
    # the gateway still had the session (SessionStarted says `resumed`): no note says otherwise
    assert [text for kind, text in page.chat() if kind.startswith("note")] == [
        "Connection lost (1006: no close frame). Trying again in 2 s.",
        "Connected again.",
    ]
    assert page.session_id == session_id
    history = page.history()
    assert history[history.index("Failed") :] == [
        "Failed", "Open", "Sleeping", "Processing", "Responding", "Listening",
    ]  # fmt: skip
    requests = [e for e in page.events() if '"type":"Request"' in e]
    assert all(f'"sessionId":"{session_id}"' in e for e in requests), requests
    # speech goes on in that session too: the stream names it, as reconnected clients do
    page.click("mic")
    page.wait_for(
        lambda: page.bot_texts()[-1].startswith("You said:") and page.state == "Listening"
    )
    events = page.events()
    assert any(
        e.endswith(f'→ {{"type":"InputAudioStreamOpen","sessionId":"{session_id}"}}')
        for e in events
    ), events
    # the session is announced on each connection's first turn, the reconnected one's too
    # (flowstorm-socket-v1.md "Communication Flow"; Flowstorm's server did so): one id
    started = [e for e in events if '"type":"SessionStarted"' in e]
    assert len(started) == 2, started
    assert all(f'"sessionId":"{session_id}"' in e for e in started), started
    assert page.session_id == session_id
    page.assert_no_failures()


def test_a_turn_the_gateway_leaves_unanswered_is_a_lost_connection_not_a_hang(
    browser: webdriver.Chrome,
) -> None:
    # a connection that died without a close (half-open TCP: a NAT or proxy that forgot
    # it) leaves a sent message unanswered for ever; the gateway's own turn timeout would
    # have answered an Error long before. The server's loop held (nothing it serves moves)
    # stands in for it: the page gives the socket up after ?answer=2 s of silence
    gateway = ThreadedGateway().start()
    try:
        with no_server_errors():
            page = Console(browser, gateway.url, answer_s=2)
            page.connect()
            page.say("My name is Ada")
            session_id = page.session_id
            gateway.pause(15)
            page.driver.find_element("id", "text").send_keys("What is my name?")
            page.click("send")
            page.wait_for(lambda: page.state == "Failed", timeout=12)
            assert outage_notes(page) == [
                "Connection lost (no answer for 2 s). Trying again in 1 s."
            ]
            page.screenshot("no-answer")
            page.wait_for(lambda: page.state == "Sleeping", timeout=40)  # the loop goes on
            assert page.session_id == session_id
            page.say("What is my name?")
            assert page.bot_texts()[-1] == "Your name is Ada."
            history = page.history()
            assert history[history.index("Failed") - 1 :] == [
                "Processing", "Failed", "Open", "Sleeping", "Processing", "Responding", "Listening",
            ]  # fmt: skip
            page.assert_no_failures()
    finally:
        gateway.stop()


async def test_the_console_config_names_the_gateways_answer_limit() -> None:
    """``/console/config.json`` gives the page the gateway's turn timeout and how long a
    silent turn may last (lock wait + turn timeout + margin): a turn timeout over 60 s
    was cut short by the page's fixed 60 s."""
    settings = Settings(turn_timeout_s=90, lock_wait_s=15)
    async with served_app(create_app(settings), settings) as url, httpx.AsyncClient() as client:
        config = await client.get(f"{url}/console/config.json")
    assert config.status_code == 200
    assert config.json() == {"answerTimeoutS": 90 + 15 + ANSWER_MARGIN_S, "turnTimeoutS": 90}
    # with GATEWAY_ERROR_TURN the #error turn may run GATEWAY_ERROR_TURN_MIN_S more
    error_turn = settings.model_copy(update={"error_turn": True, "error_turn_min_s": 3})
    assert answer_timeout_s(error_turn) == 90 + 3 + 15 + ANSWER_MARGIN_S
    assert config.headers["cache-control"] == "no-store"
    for name, value in SECURITY_HEADERS.items():
        assert config.headers[name] == value


def test_the_no_answer_limit_follows_the_gateways_turn_timeout(
    browser: webdriver.Chrome,
) -> None:
    # the page gave a silent turn up after 60 s, whatever GATEWAY_TURN_TIMEOUT_S; now after
    # the gateway's answerTimeoutS (config.json): here 1 s lock wait + 1 s turn + the margin
    limit = 1 + 1 + ANSWER_MARGIN_S
    gateway = ThreadedGateway(turn_timeout_s=1, lock_wait_s=1).start()
    try:
        with no_server_errors():
            page = Console(browser, gateway.url)
            page.wait_for(lambda: any("no-answer limit" in e for e in page.events()))
            page.connect()
            page.say("My name is Ada")
            gateway.pause(limit + 4)
            page.driver.find_element("id", "text").send_keys("What is my name?")
            page.click("send")
            page.wait_for(lambda: page.state == "Failed", timeout=limit + 3)
            assert outage_notes(page) == [
                f"Connection lost (no answer for {limit:g} s). Trying again in 1 s."
            ]
            page.screenshot("no-answer-turn-timeout")
            page.wait_for(lambda: page.state == "Sleeping", timeout=40)  # the loop goes on
    finally:
        gateway.stop()


def fake_socket_gateway(handler: Callable[[WebSocket], Awaitable[None]]) -> ThreadedGateway:
    """A gateway whose ``/socket/`` is ``handler`` (a gateway misbehaving in a way the real
    one does not), its console the real one; started."""
    gateway = ThreadedGateway()
    app = gateway.server.config.app
    assert isinstance(app, FastAPI)
    app.router.routes.insert(0, WebSocketRoute("/socket/", handler))
    return gateway.start()


async def _until_closed(ws: WebSocket, frames: list[str] | None = None) -> None:
    """Read ``ws`` until the page closes it, keeping its text frames in ``frames``."""
    while (message := await ws.receive())["type"] != "websocket.disconnect":
        if frames is not None and message.get("text") is not None:
            frames.append(message["text"])


def test_a_frame_that_is_not_json_is_shown_as_an_error(browser: webdriver.Chrome) -> None:
    # a frame that was not JSON threw in the page's onmessage: lost without a word. Now
    # it is an error note, its text shown as text (never as HTML), and the page goes on
    async def garbled(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()  # Init
        await ws.send_text('{"type":"Ready"}')
        await ws.send_text('<img src=x onerror="window.injected=1"> 502 Bad Gateway')
        await ws.send_text("[1, 2]")  # JSON, but no event
        await _until_closed(ws)

    gateway = fake_socket_gateway(garbled)
    try:
        page = Console(browser, gateway.url)
        page.connect()
        page.wait_for(lambda: len(page.chat()) == 2)
        page.screenshot("not-json")
        prefix = "The gateway sent a frame that is not a JSON event: "
        assert page.chat() == [
            ("note error", prefix + '<img src=x onerror="window.injected=1"> 502 Bad Gateway'),
            ("note error", prefix + "[1, 2]"),
        ]
        assert browser.find_elements("css selector", "#chat img") == []
        assert page.js("return window.injected") is None
        assert page.state == "Sleeping"
        assert any("502 Bad Gateway" in e for e in page.events())
    finally:
        gateway.stop()


def test_talk_gives_up_when_the_gateway_never_starts_listening(
    browser: webdriver.Chrome,
) -> None:
    # Talk sends InputAudioStreamOpen and waits for its echo: a gateway that never sent it
    # left the button at "Stop" for ever. Now after ?listen= seconds (10 s by default) an
    # error says so, the stream is cancelled and Talk is back
    frames: list[str] = []

    async def deaf(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()  # Init
        await ws.send_text('{"type":"Ready"}')
        await _until_closed(ws, frames)  # InputAudioStreamOpen never echoed

    gateway = fake_socket_gateway(deaf)
    try:
        page = Console(browser, gateway.url, listen_s=2)
        page.connect()
        page.click("mic")
        mic = browser.find_element("id", "mic")
        assert mic.text == "Stop"
        page.wait_for(lambda: page.chat(), timeout=6)
        page.screenshot("listen-timeout")
        assert page.chat() == [("note error", "The gateway did not start listening within 2 s.")]
        assert mic.text == "Talk"
        assert mic.is_enabled()
        assert page.state == "Sleeping"
        page.wait_for(lambda: '{"type":"InputAudioStreamCancel"}' in frames)
        assert frames[0] == '{"type":"InputAudioStreamOpen"}'
    finally:
        gateway.stop()


def test_talk_on_an_insecure_origin_says_why_the_microphone_cannot_be_used(
    console_gateway: ThreadedGateway, corpus: dict[str, Pcm], tmp_path: Path
) -> None:
    # http:// on a host other than localhost is no secure context: the browser gives the
    # page no navigator.mediaDevices (the console opened by a LAN address or a hostname).
    # A Chromium of its own maps the name console.test to the gateway's address.
    port = console_gateway.url.rsplit(":", 1)[1]
    wav = speech_wav(corpus[SPOKEN], tmp_path / "speech.wav")
    resolve = "--host-resolver-rules=MAP console.test 127.0.0.1"
    with chromium(wav, tmp_path / "profile", resolve) as driver:
        page = Console(driver, f"http://console.test:{port}")
        assert page.js("return window.isSecureContext") is False
        page.connect()
        page.click("mic")
        page.wait_for(lambda: [t for k, t in page.chat() if k == "note error"])
        page.screenshot("microphone-insecure")
        assert page.chat() == [
            (
                "note error",
                f"Microphone: the browser allows it on https:// or http://localhost only, "
                f"not on http://console.test:{port}.",
            )
        ]
        assert page.state == "Sleeping"
        assert driver.find_element("id", "mic").text == "Talk"
        page.say("hello")  # typing still works
        assert page.bot_texts() == ["You said: hello"]


def test_a_page_left_closes_its_socket_and_goes_on_when_shown_again(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    def open_sockets() -> int:
        connections = console_gateway.server.server_state.connections
        return sum(isinstance(c, GatewayWebSocketProtocol) for c in connections)

    page = Console(browser, console_gateway.url, retry_s=60)
    page.connect()
    page.say("My name is Grace")
    session_id = page.session_id
    assert open_sockets() == 1
    # another page: Chromium keeps this one in its back/forward cache; its WebSocket,
    # left open, would take answers and pushes nobody sees
    browser.get("about:blank")
    page.wait_for(lambda: open_sockets() == 0, timeout=5)
    browser.back()  # shown again from the cache: connected at once, not after `retry`
    page.wait_for(lambda: page.state == "Sleeping", timeout=5)
    assert page.session_id == session_id
    page.say("What is my name?")
    assert page.bot_texts()[-2:] == ["Nice to meet you, Grace.", "Your name is Grace."]
    assert open_sockets() == 1
    page.assert_no_failures()
    page.screenshot("shown-again")


def test_a_long_answers_audio_plays_to_its_end(browser: webdriver.Chrome, tmp_path: Path) -> None:
    # 12 s of speech-length audio (silence), served by a plain HTTP server as a core's
    # audio link would be: the console's guard against stalled links (30 s; ?stall=4 here,
    # the same code path) must not take an answer that plays on for one that hangs
    stall_s = 4
    (tmp_path / "long.wav").write_bytes(encode_wav(Pcm(bytes(12 * 8000 * 2), 8000)))
    files = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    )
    threading.Thread(target=files.serve_forever, daemon=True).start()
    gateway = ThreadedGateway(admin_keys="admin-key-of-console-tests").start()
    try:
        with no_server_errors():
            page = Console(browser, gateway.url, stall_s=stall_s)
            page.connect()
            page.say("hello")
            audio = f"http://127.0.0.1:{files.server_address[1]}/long.wav"
            pushed = httpx.post(
                f"{gateway.url}/v1/push",
                headers={"Authorization": "Bearer admin-key-of-console-tests"},
                json={
                    "target": {"sessionId": page.session_id},
                    "items": [{"text": "A long story.", "audio": audio}],
                },
            )
            assert pushed.json()["delivery"] == "live"
            page.wait_for(lambda: page.state == "Responding")
            started = time.monotonic()
            time.sleep(stall_s * 1.5 + 1)  # well past the guard, still playing
            assert page.state == "Responding", time.monotonic() - started
            page.screenshot("long-answer-playing")
            page.click("skip")
            page.wait_for(lambda: page.state == "Listening")
            page.assert_no_failures()
    finally:
        gateway.stop()
        files.shutdown()
        files.server_close()


def outage_notes(page: Console) -> list[str]:
    """The chat's notes about the connection (lost, not connected, again)."""
    return [text for kind, text in page.chat() if kind.startswith("note") and "onnect" in text]


def test_the_gateway_going_away_and_coming_back_is_one_clear_note(
    browser: webdriver.Chrome,
) -> None:
    gateway = ThreadedGateway().start()
    port = int(gateway.url.rsplit(":", 1)[1])
    with no_server_errors():
        page = Console(browser, gateway.url)
        page.connect()
        page.say("My name is Ada")
        session_id = page.session_id
        gateway.stop()  # uvicorn closes the WebSocket with 1012 (service restart)
    page.wait_for(lambda: page.state == "Failed")
    # retried every second: each attempt updates the one note, it adds none
    page.wait_for(lambda: any("(3 attempts)" in note for note in outage_notes(page)))
    assert outage_notes(page) == [
        "Connection lost (1012: the gateway restarts). Not connected again (3 attempts): "
        "the gateway does not answer. Trying again in 1 s."
    ]
    page.screenshot("gateway-away")
    gateway = ThreadedGateway(port=port).start()  # back, at the same address
    try:
        with no_server_errors():
            page.wait_for(lambda: page.state == "Sleeping")
            assert page.session_id == session_id
            # (whether the session goes on, only its next turn can tell)
            assert outage_notes(page)[1:] == ["Connected again."]
            page.say("What is my name?")  # the memory store did not outlive the restart
            assert page.bot_texts()[-1] == "I do not know your name yet."
            # the gateway created the session anew (SessionStarted without `resumed`):
            # the person is told, by the answer that shows it
            assert page.chat()[-3:] == [
                ("user", "What is my name?"),
                (
                    "note error",
                    "The conversation started over: the gateway no longer had it "
                    "(it restarted, or the session expired).",
                ),
                ("bot", "I do not know your name yet."),
            ]
            assert page.session_id == session_id
            page.assert_no_failures()
            page.screenshot("gateway-back")
    finally:
        gateway.stop()


def websocket_handshake(base_url: str) -> tuple[int, socket.socket]:
    """Open a connection to ``base_url`` and ask for the V1 WebSocket in the same breath;
    return the answer's status and the socket (open, for a 101).

    The gateway refuses at its connection cap as soon as it accepts, and websockets'
    client, whose handshake goes out a moment after its connection, can find that 503
    already read and fail on it in its own ways (a closed connection, an internal
    assertion): a handshake sent at once always reads its answer.
    """
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /socket/ HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the answer's head: {head!r}"
        head += chunk
    return int(head.split(b" ", 2)[1]), sock


def test_a_gateway_at_its_connection_cap_is_named_as_the_reason(
    browser: webdriver.Chrome,
) -> None:
    gateway = ThreadedGateway(max_connections=1).start()
    try:
        with no_server_errors(), contextlib.ExitStack() as held:
            page = Console(browser, gateway.url)
            time.sleep(1)  # the page's idle connections may be closed to make room
            statuses = []
            for _ in range(20):  # every connection a WebSocket
                status, sock = websocket_handshake(gateway.url)
                held.enter_context(sock)
                statuses.append(status)
                if status != 101:
                    break
            assert statuses[-1] == 503, statuses
            page.connect_clicked()
            page.wait_for(lambda: page.state == "Failed")
            page.wait_for(lambda: outage_notes(page))
            [note] = outage_notes(page)
            assert re.fullmatch(  # (a second attempt may have come meanwhile)
                r"Could not connect( \(\d attempts\))?: the gateway answered 503: "
                r"The gateway has too many open connections; try again shortly\. "
                r"Trying again in 1 s\.",
                note,
            ), note
            page.screenshot("gateway-full")
            held.close()
            page.wait_for(lambda: page.state == "Sleeping")  # room again: retried, Ready
            page.say("hello")
            assert page.bot_texts() == ["You said: hello"]
            page.assert_no_failures()
    finally:
        gateway.stop()


def test_a_refused_app_key_is_one_note_with_the_gateways_words(
    browser: webdriver.Chrome,
) -> None:
    gateway = ThreadedGateway(app_keys="right-key").start()
    try:
        with no_server_errors():
            page = Console(browser, gateway.url)
            page.connect_clicked(key="wrong-key")
            page.wait_for(lambda: any("(3 attempts)" in n for n in outage_notes(page)))
            [note] = [text for kind, text in page.chat() if kind.startswith("note")]
            assert note == (  # the gateway's Error text, and the close code
                "Could not connect (3 attempts): Unknown application key 'wrong-key' (1008). "
                "Trying again in 1 s."
            )
            assert page.state == "Failed"
            page.screenshot("refused-key")
            page.click("connect")  # Disconnect: no more attempts
            page.wait_for(lambda: page.state == "Closed")
    finally:
        gateway.stop()


def test_the_keyboard_alone_holds_a_conversation(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    page = Console(browser, console_gateway.url)
    page.connect()
    field = browser.find_element("id", "text")
    field.click()

    def focused() -> str:
        return str(page.js("return document.activeElement.id"))

    field.send_keys("My name is Barbara" + Keys.ENTER)  # Enter sends
    page.wait_for(lambda: page.state == "Responding")
    # while the bot answers, the focus stays in the field and the next message can be
    # typed; Enter does not send it before the answer is over, nor loses it
    assert focused() == "text"
    field.send_keys("What is my name?" + Keys.ENTER)
    assert page.js("return document.getElementById('text').value") == "What is my name?"
    page.wait_for(lambda: page.state == "Listening")
    assert page.bot_texts() == ["Nice to meet you, Barbara."]
    assert focused() == "text"
    page.screenshot("keyboard")
    browser.switch_to.active_element.send_keys(Keys.ENTER)  # no click: the focus is there
    page.wait_for(lambda: page.bot_texts()[-1:] == ["Your name is Barbara."])
    page.wait_for(lambda: page.state == "Listening")
    assert [text for kind, text in page.chat() if kind == "user"] == [
        "My name is Barbara",
        "What is my name?",
    ]
    assert focused() == "text"
    # a dropped connection disables the field; it has the focus again once reconnected
    assert console_gateway.drop_websockets() == 1
    page.wait_for(lambda: page.state == "Failed")
    page.wait_for(lambda: page.state == "Sleeping")
    assert focused() == "text"
    page.assert_no_failures()


class _CoreHandler(BaseHTTPRequestHandler):
    """A core (the gateway's webhook pipeline) whose every turn answers :data:`_ANSWER`."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(_ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


_ANSWER: dict[str, Any] = {
    "items": [
        {"text": "#1 hit", "ssml": "<speak>#1 hit</speak>"},  # a voice agent's speak
        {"ssml": "<speak>Tom &amp; <break time='1s'/>Jerry <sub alias='x'>&lt;b&gt;</sub></speak>"},
        {"text": "#open_menu", "code": '{"menu": "main"}'},  # a command: shown as nothing
    ]
}
"""A core's answer: an item with ssml whose text begins with ``#``, an item with only
ssml (its words shown), a command item."""


def test_an_item_with_ssml_is_shown_and_only_a_command_item_is_hidden(
    browser: webdriver.Chrome,
) -> None:
    # the gateway's one rule (gateway.events.is_command): a command item is a '#' text with
    # no ssml. The console hid every item whose text began with '#' ("#1 hit" with ssml,
    # said on every channel, was not shown) and showed nothing for an item with only ssml
    # (Flowstorm V1 sent it without text). Now the gateway sends that item's words as its
    # text (tags out, as every channel shows them; set as text, never as HTML) and the
    # console hides command items only
    core = ThreadingHTTPServer(("127.0.0.1", 0), _CoreHandler)
    threading.Thread(target=core.serve_forever, daemon=True).start()
    gateway = ThreadedGateway(pipeline=f"http://127.0.0.1:{core.server_address[1]}/turn").start()
    try:
        with no_server_errors():
            page = Console(browser, gateway.url)
            page.connect()
            page.say("hello")
            page.screenshot("ssml-and-commands")
            assert page.bot_texts() == ["#1 hit", "Tom & Jerry <b>"]
            assert [kind for kind, _ in page.chat()] == ["user", "bot", "bot"]
            assert browser.find_elements("css selector", "#chat b") == []
            frames = "".join(page.events())
            assert '"text":"#open_menu"' in frames  # the command came, and shows nothing
            page.assert_no_failures()
    finally:
        gateway.stop()
        core.shutdown()
        core.server_close()


def test_the_console_runs_under_its_content_security_policy(
    console_gateway: ThreadedGateway, browser: webdriver.Chrome
) -> None:
    page_headers = httpx.get(f"{console_gateway.url}/console/").headers
    script_headers = httpx.get(f"{console_gateway.url}/console/console.js").headers
    for headers in (page_headers, script_headers):
        assert headers["x-content-type-options"] == "nosniff"
        assert "script-src" not in headers["content-security-policy"]  # default-src 'self'
        assert "default-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
    # every violation the page meets is recorded, from before its own script runs
    watch = (
        "window.violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.violations.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": watch})
    try:
        page = Console(browser, console_gateway.url)
        page.connect()
        page.say("My name is Ada")  # the WebSocket, and the answer's TTS audio, allowed
        assert page.bot_texts() == ["Nice to meet you, Ada."]
        page.assert_no_failures()
        assert page.js("return window.violations") == []
        # a script that found its way into the page (an XSS) does not run
        page.js(
            "const s = document.createElement('script');"
            "s.textContent = 'window.injected = 1'; document.body.append(s);"
        )
        page.wait_for(lambda: page.js("return window.violations.length"))
        assert page.js("return window.injected") is None
        [violation] = page.js("return window.violations")
        assert violation.startswith("script-src"), violation
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )


@pytest.mark.parametrize("enabled", [True, False])
async def test_the_console_is_served_unless_turned_off(enabled: bool) -> None:
    settings = Settings(console_enabled=enabled)
    async with served_app(create_app(settings), settings) as url, httpx.AsyncClient() as client:
        page = await client.get(f"{url}/console", follow_redirects=True)
        script = await client.get(f"{url}/console/console.js")
        missing = await client.get(f"{url}/console/nothing.js")
    if not enabled:
        assert (page.status_code, script.status_code) == (404, 404)
        return
    assert page.status_code == 200
    assert str(page.url) == f"{url}/console/"
    assert page.headers["content-type"].startswith("text/html")
    assert "console.js" in page.text
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert script.headers["x-content-type-options"] == "nosniff"
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_the_console_s_redirect_carries_its_security_headers() -> None:
    """``GET /console`` redirects to ``/console/`` (the query kept); the redirect was the
    router's, without the console's security headers (CSP, nosniff, frame options)."""
    settings = Settings()
    async with served_app(create_app(settings), settings) as url, httpx.AsyncClient() as client:
        answers = [
            await client.request(method, f"{url}/console?key=abc") for method in ("GET", "HEAD")
        ]
    for answer in answers:
        assert answer.status_code == 307
        assert answer.headers["location"] == "console/?key=abc"
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers[name] == value, name


async def test_the_console_s_redirect_is_relative_to_the_address_the_browser_used() -> None:
    """The redirect of ``/console`` was an absolute URL made of the request's ``Host``
    and scheme: behind a proxy that sends its upstream's name as ``Host`` (nginx's
    default, ``proxy_set_header Host $proxy_host``) or terminates TLS, the browser was
    sent to ``http://gateway-upstream:8080/console/``, an address it cannot reach (or
    plain http). It is now relative (RFC 9110 section 10.2.2: ``console/?...``), so the
    browser stays on the address it used, a proxy's path prefix too; an encoded query
    is kept as sent."""
    settings = Settings()
    async with served_app(create_app(settings), settings) as url, httpx.AsyncClient() as client:
        upstream = {"Host": "gateway-upstream:8080", "X-Forwarded-Proto": "https"}
        answer = await client.get(f"{url}/console?key=a%20b&locale=en", headers=upstream)
        followed = await client.get(f"{url}/console", follow_redirects=True)
    assert answer.status_code == 307
    assert answer.headers["location"] == "console/?key=a%20b&locale=en"
    assert followed.status_code == 200
    assert str(followed.url) == f"{url}/console/"


async def test_the_console_s_files_are_revalidated_before_each_use() -> None:
    """The console's files went out with ``Last-Modified`` and ``ETag`` but no
    ``Cache-Control``: a browser may then reuse them unasked for a tenth of their age
    (RFC 9111 section 4.2.2, heuristic freshness), days for files installed months ago,
    so after an upgrade it could run the old console.js with the new index.html. Each
    now says ``Cache-Control: no-cache``: reused only after a 304 of its ``ETag``."""
    settings = Settings()
    async with served_app(create_app(settings), settings) as url, httpx.AsyncClient() as client:
        for path in ("/console/", "/console/console.js", "/console/console.css"):
            answer = await client.get(f"{url}{path}")
            assert answer.status_code == 200, path
            assert answer.headers.get_list("cache-control") == ["no-cache"], path
            etag = answer.headers["etag"]
            again = await client.get(f"{url}{path}", headers={"If-None-Match": etag})
            assert again.status_code == 304, path
            assert again.headers.get_list("cache-control") == ["no-cache"], path


async def test_another_method_on_the_console_s_own_routes_is_a_405_with_its_headers() -> None:
    """``/console`` (the redirect) and ``/console/config.json`` take GET and HEAD. Another
    method on ``/console`` got the gateway's generic 405 problem without the console's
    security headers (CSP, nosniff, frame options), which its files' 404/405 carry: now
    every 405 of the console has them, with ``Allow: GET, HEAD``."""
    settings = Settings()
    async with served_app(create_app(settings), settings) as url, httpx.AsyncClient() as client:
        answers = [
            await client.request(method, f"{url}{path}")
            for path in ("/console", "/console/config.json", "/console/")
            for method in ("POST", "PUT", "DELETE", "OPTIONS")
        ]
    for answer in answers:
        where = (answer.request.method, answer.request.url.path)
        assert answer.status_code == 405, where
        assert answer.headers["content-type"] == "application/problem+json", where
        assert answer.json()["title"] == "Method Not Allowed", where
        assert answer.headers["allow"] == "GET, HEAD", where
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers[name] == value, (where, name)
