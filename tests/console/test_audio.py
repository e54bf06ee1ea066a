"""The console's answer audio in a real Chromium against a real gateway: a link that
fails is said by its item, one stream plays at a time, and Skip ends the download.

Items with audio come as a core's would, through ``POST /v1/push`` to the page's live
session; their links point at the gateway's own ``/file/tts`` or at small HTTP servers
of the test (a WAV file, a 503, a slow synthesis). Which ``<audio>`` elements play is
read from the page itself: ``HTMLMediaElement.play`` is recorded before the page's own
script runs (the elements are the page's; only the list of them is the test's).
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver

from gateway.speech.audio import Pcm, encode_wav
from tests.conftest import no_server_errors
from tests.console.conftest import Console, ThreadedGateway

ADMIN_KEY = "admin-key-of-console-tests"

RECORD_PLAYS = (
    "window.played = [];"
    "const play = HTMLMediaElement.prototype.play;"
    "HTMLMediaElement.prototype.play = function () {"
    " window.played.push(this); return play.call(this); };"
)
"""Keeps every media element the page plays in ``window.played`` (from before its script)."""

PLAYING = "return window.played.filter((a) => !a.paused && !a.ended).length"
"""How many of the page's audio elements play now."""

AUDIO_NOTES = (
    "return [...document.querySelectorAll('#chat li.bot')].map((li) => {"
    " const note = li.querySelector('.audio-failed');"
    " return note ? note.textContent : null; })"
)
"""The audio note of each bot message (None: none)."""


@pytest.fixture(scope="module")
def gateway() -> Iterator[ThreadedGateway]:
    """A gateway that takes pushes (admin key :data:`ADMIN_KEY`); no ERROR logged."""
    gw = ThreadedGateway(admin_keys=ADMIN_KEY).start()
    try:
        with no_server_errors():
            yield gw
    finally:
        gw.stop()


@pytest.fixture
def page(browser: webdriver.Chrome, gateway: ThreadedGateway) -> Iterator[Console]:
    """The console, connected, in a session (one turn said); plays recorded."""
    added = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_PLAYS}
    )
    try:
        console = Console(browser, gateway.url)
        console.connect()
        console.say("hello")
        yield console
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )
        browser.get("about:blank")  # no audio of this test plays into the next


@contextlib.contextmanager
def http_server(handler: Any) -> Iterator[str]:
    """Serve ``handler`` on a free port of 127.0.0.1; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def push(gateway: ThreadedGateway, page: Console, *items: dict[str, str]) -> None:
    """Push ``items`` to the page's session; they are delivered live."""
    pushed = httpx.post(
        f"{gateway.url}/v1/push",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"target": {"sessionId": page.session_id}, "items": list(items)},
    )
    assert pushed.json()["delivery"] == "live", pushed.text


class Unavailable(BaseHTTPRequestHandler):
    """Answers every GET with 503 (a TTS service that is saturated)."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Retry-After", "5")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_an_audio_link_that_fails_is_said_by_its_message(
    page: Console, gateway: ThreadedGateway
) -> None:
    with http_server(Unavailable) as busy:
        never_issued = f"{gateway.url}/file/tts/{'0' * 64}.mp3"  # the gateway: 404
        assert httpx.get(never_issued).status_code == 404
        push(
            gateway,
            page,
            {"text": "Gone.", "audio": never_issued},
            {"text": "Busy.", "audio": f"{busy}/tts.mp3"},
        )
        page.wait_for(lambda: page.state == "Listening" and page.bot_texts()[-1:] == ["Busy."])
    # the person sees it by each message whose audio failed (the chat is a live region:
    # the note is read out as it appears), and the event log has the details
    assert page.js(AUDIO_NOTES) == [
        None,  # the answer to "hello": it played
        "Audio could not be played.",
        "Audio could not be played.",
    ]
    assert page.js("return document.getElementById('chat').getAttribute('aria-live')") == "polite"
    described = page.js(  # the replay button of a failed item is described by its note
        "const button = document.querySelectorAll('#chat li.bot button.play')[2];"
        "return document.getElementById(button.getAttribute('aria-describedby')).textContent"
    )
    assert described == "Audio could not be played."
    assert len([e for e in page.events() if " ! audio not played: " in e]) == 2
    page.screenshot("audio-failed")
    # a replay that fails again keeps the one note
    page.driver.find_elements("css selector", "#chat li.bot button.play")[1].click()
    page.wait_for(lambda: len([e for e in page.events() if " ! audio not played" in e]) == 3)
    assert page.js(AUDIO_NOTES)[1:] == ["Audio could not be played."] * 2


def test_one_audio_plays_at_a_time(page: Console, gateway: ThreadedGateway, tmp_path: Path) -> None:
    (tmp_path / "long.wav").write_bytes(encode_wav(Pcm(bytes(20 * 8000 * 2), 8000)))
    files = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http_server(files) as base:
        audio = f"{base}/long.wav"
        push(gateway, page, {"text": "One.", "audio": audio}, {"text": "Two.", "audio": audio})
        page.wait_for(lambda: page.state == "Responding" and page.js(PLAYING) == 1)
        replays = page.driver.find_elements("css selector", "#chat li.bot button.play")
        # Two's replay while One plays: One's answer is skipped, Two plays alone
        replays[2].click()
        time.sleep(0.5)
        assert page.js(PLAYING) == 1
        assert page.state == "Listening"
        # replayed twice quickly: the second replaces the first
        replays[1].click()
        replays[1].click()
        time.sleep(0.5)
        assert page.js(PLAYING) == 1
        assert page.js("return window.played.filter((a) => !a.paused)[0].currentTime") > 0
        # an answer that comes meanwhile is heard alone: the replay stops
        push(gateway, page, {"text": "Three.", "audio": audio})
        page.wait_for(lambda: page.state == "Responding")
        time.sleep(0.5)
        assert page.js(PLAYING) == 1
        page.click("skip")
        page.wait_for(lambda: page.state == "Listening")
        assert page.js(PLAYING) == 0
    page.assert_no_failures()


class SlowSynthesis(BaseHTTPRequestHandler):
    """A TTS link whose synthesis is slow: the headers at once, the audio after a second,
    then 16 kB/s (real time at 8 kHz) for 40 s. ``served`` is set when a GET came,
    ``gone`` when its client went away (a write failed)."""

    served = threading.Event()
    gone = threading.Event()
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def do_GET(self) -> None:
        type(self).served.set()
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self.wfile.flush()
            time.sleep(1)  # synthesizing
            self.wfile.write(encode_wav(Pcm(bytes(40 * 8000 * 2), 8000))[:44])
            for _ in range(400):
                self.wfile.write(bytes(1600))
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            type(self).gone.set()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_skip_ends_the_download_of_the_audio_it_skips(
    page: Console, gateway: ThreadedGateway
) -> None:
    SlowSynthesis.served.clear()
    SlowSynthesis.gone.clear()
    with http_server(SlowSynthesis) as slow:
        push(gateway, page, {"text": "A long story.", "audio": f"{slow}/story.wav"})
        page.wait_for(lambda: page.state == "Responding")
        assert SlowSynthesis.served.wait(10)
        page.click("skip")  # while the synthesis is still pending
        page.wait_for(lambda: page.state == "Listening")
        # the browser dropped the download: the synthesis is not waited for
        assert SlowSynthesis.gone.wait(5), "the skipped audio was still downloaded"
        time.sleep(1.5)  # past the first audio: nothing starts playing later
        assert page.js(PLAYING) == 0
    page.assert_no_failures()


def png_1x1() -> bytes:
    """A PNG of one grey pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1 x 1, 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )


def test_items_without_text_are_heard_and_seen(
    page: Console, gateway: ThreadedGateway, tmp_path: Path
) -> None:
    # a core's item may be a sound or a picture alone (ResponseItem: text is optional;
    # the push takes any item with content): it was dropped unseen and unheard
    (tmp_path / "chime.wav").write_bytes(encode_wav(Pcm(bytes(8000 * 2), 8000)))  # 1 s
    (tmp_path / "dot.png").write_bytes(png_1x1())
    files = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http_server(files) as base:
        push(gateway, page, {"audio": f"{base}/chime.wav"}, {"image": f"{base}/dot.png"})
        page.wait_for(
            lambda: page.js("return document.querySelectorAll('#chat li.bot').length") == 3
        )
        page.wait_for(lambda: page.state == "Listening")
        played = page.js("return window.played.map((a) => a.currentSrc)")
        assert played[-1] == f"{base}/chime.wav", played
        assert page.js(
            "return [...document.querySelectorAll('#chat li.bot img')].map((i) => [i.src, i.naturalWidth])"
        ) == [[f"{base}/dot.png", 1]]
        # (no words: a bubble with its replay button, a bubble with its image)
        assert page.js(
            "return [...document.querySelectorAll('#chat li.bot')].slice(1).map("
            "(li) => [...li.childNodes].map((n) => n.nodeName))"
        ) == [["BUTTON"], ["IMG"]]
        page.screenshot("items-without-text")
    page.assert_no_failures()
