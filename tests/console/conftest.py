"""Fixtures of the browser console tests: a real gateway in a thread, a real Chromium.

The gateway (uvicorn, gateway serve's protocol classes, memory sessions, the demo
pipeline, embedded speech) runs in a thread of its own with its own event loop, since
Selenium's calls block. Its GATEWAY_PUBLIC_URL is its own address, so the TTS links
the console plays are served by it. ``drop_websockets()`` cuts the server side of every
open WebSocket (the TCP connection, no close frame), as a crash or a network drop would.

Chromium is Debian's ``/usr/bin/chromium`` driven through ``/usr/bin/chromedriver``
(Selenium; selenium-manager is not used, nothing is downloaded), headless, with a fake
microphone that plays a WAV of Piper speech (``--use-file-for-fake-audio-capture``).
Screenshots go to ``test-artifacts/console/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from gateway.app import create_app
from gateway.server import GatewayWebSocketProtocol, uvicorn_options
from gateway.settings import Settings
from gateway.speech.audio import Pcm, encode_wav, resample
from tests.conftest import ROOT, no_server_errors
from tests.speech import padded

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts" / "console"

SPOKEN = "tell me about this place"
"""What the fake microphone says (a sentence of tests.speech.SENTENCES)."""

WAIT_S = 20.0
"""Safety net for waits on the page, so a broken console fails instead of hanging."""


class ThreadedGateway:
    """A gateway served by uvicorn in a thread; ``url`` is its base URL.

    ``port``: the port to listen on (0: any free one; a stopped gateway's port brings
    it back at the same address); ``overrides``: Settings fields."""

    def __init__(self, port: int = 0, **overrides: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart's port
        self.sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.settings = Settings(public_url=self.url, **overrides)
        config = uvicorn.Config(
            create_app(self.settings),
            log_level="warning",
            lifespan="on",
            **uvicorn_options(self.settings),
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="console-gateway", daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self) -> ThreadedGateway:
        """Start serving; returns when the server accepts connections (at most 20 s)."""
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive(), "the gateway stopped while starting"
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.01)
        return self

    def drop_websockets(self) -> int:
        """Cut the TCP connection of every open WebSocket (no close frame); how many."""
        done = threading.Event()
        dropped: list[int] = []

        def drop() -> None:
            sockets = [
                c
                for c in self.server.server_state.connections
                if isinstance(c, GatewayWebSocketProtocol)
            ]
            for connection in sockets:
                connection.transport.abort()
            dropped.append(len(sockets))
            done.set()

        self.loop.call_soon_threadsafe(drop)
        assert done.wait(5)
        return dropped[0]

    def pause(self, seconds: float) -> None:
        """Hold the server's event loop for ``seconds`` (from now): nothing it serves moves,
        so a page that sent a request shows the state it waits in."""
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def stop(self) -> None:
        """Stop the server (its lifespan closes the app) and the thread."""
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def console_gateway() -> Iterator[ThreadedGateway]:
    """One gateway for the module; the test fails if it logged an ERROR."""
    gw = ThreadedGateway(speech_warm_up=True).start()
    try:
        with no_server_errors():
            yield gw
    finally:
        gw.stop()


def speech_wav(pcm: Pcm, path: Path) -> Path:
    """``pcm`` padded with silence (0.5 s before, 4 s after: the recognizer ends the
    utterance in the pause) as a 16 kHz mono WAV file at ``path``."""
    path.write_bytes(encode_wav(resample(padded(pcm, 500, 4000), 16000)))
    return path


@contextlib.contextmanager
def chromium(wav: Path, profile: Path, *flags: str) -> Iterator[webdriver.Chrome]:
    """Headless Chromium (a phone's screen) whose microphone plays ``wav``, with a fresh
    profile in the folder ``profile``; ``flags``: more command-line flags."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        *flags,
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    # a phone's screen (390 x 780 CSS px, touch): the layout must hold there
    metrics = {"width": 390, "height": 780, "deviceScaleFactor": 1, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(corpus: dict[str, Pcm]) -> Iterator[webdriver.Chrome]:
    """Headless Chromium whose microphone says :data:`SPOKEN` (Piper), with a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="console-test-") as tmp:
        wav = speech_wav(corpus[SPOKEN], Path(tmp) / "speech.wav")
        with chromium(wav, Path(tmp) / "profile") as driver:
            yield driver


class Console:
    """The console page in the browser: fields, buttons and what it shows."""

    def __init__(
        self,
        driver: webdriver.Chrome,
        base: str,
        *,
        retry_s: int = 1,
        stall_s: int | None = None,
        answer_s: int | None = None,
        listen_s: int | None = None,
    ) -> None:
        """``retry_s``: the page's ``?retry=`` (seconds between reconnects); ``stall_s``: its
        ``?stall=`` (seconds an answer's audio may go without progress; None: the 30 s default);
        ``answer_s``: its ``?answer=`` (seconds Processing may go without an event from the
        gateway; None: the gateway's config.json ``answerTimeoutS``); ``listen_s``: its
        ``?listen=`` (seconds Talk waits for the gateway to start listening; None: 10 s)."""
        self.driver = driver
        stall = f"&stall={stall_s}" if stall_s is not None else ""
        answer = f"&answer={answer_s}" if answer_s is not None else ""
        listen = f"&listen={listen_s}" if listen_s is not None else ""
        driver.get(f"{base}/console?retry={retry_s}{stall}{answer}{listen}")
        self.wait_for(lambda: self.state == "Closed")

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body) in the page."""
        return self.driver.execute_script(script, *args)

    def wait_for(self, condition: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        """Wait until ``condition()`` is truthy; its value."""
        return WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(lambda _: condition())

    @property
    def state(self) -> str:
        """The client state the page shows (the marked state pill)."""
        return str(
            self.js("return document.querySelector('#states [aria-current=true]').dataset.state")
        )

    def history(self) -> list[str]:
        """The client states the page went through, in order."""
        return list(
            self.js(
                "return [...document.querySelectorAll('#history li')].map(li => li.textContent)"
            )
        )

    def chat(self) -> list[tuple[str, str]]:
        """The chat bubbles: (class, text) each; class ``bot``, ``user`` or ``note``."""
        return [
            (kind, text)
            for kind, text in self.js(
                "return [...document.querySelectorAll('#chat li')].map("
                "li => [li.className, li.firstChild ? li.firstChild.textContent : ''])"
            )
        ]

    def bot_texts(self) -> list[str]:
        """The bot's messages, in order."""
        return [text for kind, text in self.chat() if kind == "bot"]

    def events(self) -> list[str]:
        """The event log lines (direction and frame)."""
        return list(
            self.js("return [...document.querySelectorAll('#events li')].map(li => li.textContent)")
        )

    def assert_no_failures(self) -> None:
        """No Error event came, and every TTS link played (none logged as not played)."""
        failures = [e for e in self.events() if '"type":"Error"' in e or " ! " in e]
        assert not failures, failures

    @property
    def session_id(self) -> str:
        """The session id the page shows (``none`` without one)."""
        return str(self.js("return document.getElementById('session').textContent"))

    def click(self, element_id: str) -> None:
        """Click the element ``element_id``."""
        self.driver.find_element("id", element_id).click()

    def connect(self, key: str = "console-test", locale: str = "en") -> None:
        """Fill in the key and locale, connect, and wait for Sleeping (Ready)."""
        self.connect_clicked(key, locale)
        self.wait_for(lambda: self.state == "Sleeping")

    def connect_clicked(self, key: str = "console-test", locale: str = "en") -> None:
        """Fill in the key and locale and click Connect (no wait)."""
        for element_id, value in (("key", key), ("locale", locale)):
            field = self.driver.find_element("id", element_id)
            field.clear()
            field.send_keys(value)
        self.click("connect")

    def say(self, text: str, *, shot: str | None = None) -> None:
        """Type ``text`` and send it; waits until the bot answered it and is Listening or
        Sleeping. ``shot``: the name of a screenshot taken in Processing."""
        answered = len(self.history())
        self.driver.find_element("id", "text").send_keys(text)
        self.click("send")
        if shot:
            self.wait_for(lambda: self.state == "Processing")
            self.screenshot(shot)
        self.wait_for(
            lambda: (
                self.history()[answered:].count("Responding")
                and self.state in ("Listening", "Sleeping")
            )
        )

    def screenshot(self, name: str) -> Path:
        """Save a screenshot as test-artifacts/console/``name``.png."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path
