"""The console as an attacker sees it, in a real Chromium against a real gateway: text
of the core, the user and the gateway is shown as text, never as markup or script, and
the page's links from the core cannot run script.

The hostile values come the ways they would: typed by the user (the demo core echoes
it: "You said: ..."), pushed as a core's items (``POST /v1/push``: text, image and
audio links), and an app key the gateway quotes in its refusal (an Error's text). The
page's Content-Security-Policy would block an injected inline handler anyway, so the
checks are structural: no element but the page's own in the chat, and no script ran
(``window.pwned``), not just that no alert fired.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver

from gateway.console import CONTENT_SECURITY_POLICY
from tests.conftest import no_server_errors
from tests.console.conftest import Console, ThreadedGateway

ADMIN_KEY = "admin-key-of-console-tests"

MARKUP = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
"""Text that would add elements (and run script) if written as HTML."""

ELEMENTS = (
    "return [...document.querySelectorAll('#chat *')].map("
    "(e) => e.tagName.toLowerCase() + (e.getAttribute('src') ? ' ' + e.getAttribute('src') : ''))"
)
"""Every element in the chat: its tag (and src), in document order."""

WATCH = (
    "window.pwned = null; window.dialogs = [];"
    "for (const name of ['alert', 'confirm', 'prompt'])"
    " window[name] = (m) => { window.dialogs.push(String(m)); };"
)
"""Installed before the page's script: dialogs are recorded instead of shown."""


@pytest.fixture(scope="module")
def gateway() -> Iterator[ThreadedGateway]:
    """A gateway that takes pushes (admin key :data:`ADMIN_KEY`) and the app key
    ``right-key`` only (the refusal quotes a wrong one); no ERROR logged."""
    gw = ThreadedGateway(admin_keys=ADMIN_KEY, app_keys="right-key").start()
    try:
        with no_server_errors():
            yield gw
    finally:
        gw.stop()


@pytest.fixture
def watched(browser: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The browser with :data:`WATCH` run before each page's own script."""
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    try:
        yield browser
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )
        browser.get("about:blank")


def assert_nothing_ran(page: Console) -> None:
    """No injected script ran and no dialog was opened."""
    assert page.js("return [window.pwned, window.dialogs]") == [None, []]


def test_text_of_the_user_and_the_core_is_shown_as_text(
    gateway: ThreadedGateway, watched: webdriver.Chrome
) -> None:
    page = Console(watched, gateway.url)
    page.connect(key="right-key")
    page.say(MARKUP)  # the user's bubble, and the demo core's echo of it
    assert page.chat() == [("user", MARKUP), ("bot", f"You said: {MARKUP}")]
    pushed = httpx.post(
        f"{gateway.url}/v1/push",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={
            "target": {"sessionId": page.session_id},
            "items": [
                {"text": MARKUP, "image": "javascript:window.pwned=3"},
                {"text": '"><svg onload="window.pwned=4">', "image": 'x" onerror="window.pwned=5'},
                {"text": "Audio.", "audio": "javascript:window.pwned=6"},
            ],
        },
    )
    assert pushed.status_code == 200, pushed.text
    page.wait_for(lambda: len(page.bot_texts()) == 4)
    # the javascript: audio link is played as media (it fails; it runs nothing), the
    # answer's audio ends with it (the items' TTS, synthesized and played, before it)
    page.wait_for(lambda: page.state == "Listening", timeout=90)
    assert page.bot_texts()[1:] == [MARKUP, '"><svg onload="window.pwned=4">', "Audio."]
    # the page's own elements only: the bubbles, their replay buttons, the items' images
    # (whatever their links, an <img> runs no script), the audio failure's note
    elements = page.js(ELEMENTS)
    assert elements == [
        "li",  # the user's text
        "li", "button",  # its echo, and its TTS link's replay button
        "li", "img javascript:window.pwned=3", "button",
        "li", 'img x" onerror="window.pwned=5', "button",
        "li", "button", "span",
    ], elements  # fmt: skip
    assert page.js("return document.querySelector('#chat li:last-child span').textContent") == (
        "Audio could not be played."
    )
    assert not page.js("return document.querySelectorAll('#chat [onerror], #chat [onload]').length")
    page.screenshot("injection-shown-as-text")
    assert_nothing_ran(page)


def test_the_gateways_refusal_quoting_the_key_is_shown_as_text(
    gateway: ThreadedGateway, watched: webdriver.Chrome
) -> None:
    key = '<img src=x onerror="window.pwned=6">'
    page = Console(watched, gateway.url)
    page.connect_clicked(key=key)
    page.wait_for(lambda: page.state == "Failed")
    page.wait_for(lambda: [t for k, t in page.chat() if k.startswith("note")])
    [(kind, note)] = page.chat()
    assert kind == "note error"
    assert note.startswith(f"Could not connect: Unknown application key '{key}' (1008)"), note
    assert page.js(ELEMENTS) == ["li"]
    page.screenshot("injection-refused-key")
    page.click("connect")  # Disconnect
    page.wait_for(lambda: page.state == "Closed")
    assert_nothing_ran(page)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/console/", 200),
        ("GET", "/console/console.js", 200),
        ("GET", "/console/capture-worklet.js", 200),
        ("GET", "/console/nothing.js", 404),
        ("POST", "/console/", 405),
    ],
)
def test_every_answer_of_the_console_carries_its_security_headers(
    gateway: ThreadedGateway, method: str, path: str, status: int
) -> None:
    # the page holds a microphone: no other site may frame it, in browsers that know
    # CSP's frame-ancestors and in those that know only X-Frame-Options (RFC 7034)
    answer = httpx.request(method, gateway.url + path)
    assert answer.status_code == status
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    if status == 405:
        assert answer.headers["allow"] == "GET, HEAD"
