"""The helper that starts real gateway processes for the multi-instance tests
(tests/conftest.py: GatewayProcess, start_all)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import GatewayProcess, free_port, reserved_port, start_all, start_timeout_s


class _Impostor(BaseHTTPRequestHandler):
    """Another worker's server: 200 to everything, marked ``x-impostor``."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("x-impostor", "1")
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def impostor_on(port: int) -> Iterator[bool]:
    """Try to serve :class:`_Impostor` on ``port`` (as another xdist worker's gateway
    would, binding a port it was told was free); yields whether it could bind it."""
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _Impostor)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        yield False
        return
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield True
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_server_of_another_worker_cannot_take_the_port_between_choice_and_start() -> None:
    """The port race seen in CI: the port was picked (free_port) before the spawn, another
    xdist worker's gateway bound it in between, ours exited "address already in use",
    and wait_ready took the other gateway's /healthz 200 for ours. Here the other server
    binds the port after the choice, before the spawn: it cannot (the port is held and
    handed to the child as a listening socket, ``gateway serve --fd``), and what answers
    at the URL is our child, alive."""
    gw = GatewayProcess({})
    with impostor_on(gw.port) as bound:
        try:
            gw.start()
            answer = httpx.get(f"{gw.url}/healthz", timeout=10)
            assert "x-impostor" not in answer.headers, "another server answered for ours"
            assert answer.json() == {"status": "ok"}
            assert gw.proc is not None
            assert gw.proc.poll() is None, gw.log_tail()
        finally:
            gw.stop()
    assert not bound
    # stopped, the port refuses connections and stays held: a restart on it works
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/healthz", timeout=10)
    with impostor_on(gw.port) as bound_after_stop:
        assert not bound_after_stop
    again = GatewayProcess({}, port=gw.port).start()
    try:
        assert httpx.get(f"{again.url}/healthz", timeout=10).status_code == 200
    finally:
        again.stop()


def test_a_port_given_that_another_process_holds_is_refused_at_once() -> None:
    port = free_port()
    with impostor_on(port) as bound:
        assert bound
        with pytest.raises(OSError, match="Address already in use"):
            reserved_port(port)


def test_processes_start_together_and_answer() -> None:
    a, b = start_all(GatewayProcess({}), GatewayProcess({}))
    try:
        for proc in (a, b):
            assert httpx.get(f"{proc.url}/healthz", timeout=5).status_code == 200
    finally:
        a.stop()
        b.stop()
    assert a.proc is not None
    assert a.proc.returncode is not None


def test_a_process_that_cannot_start_says_why_with_its_stderr() -> None:
    broken = GatewayProcess({"GATEWAY_PIPELINE": "no-such-core:x"})
    with pytest.raises(RuntimeError, match=r"exited with \d+ after .*its stderr:\n") as caught:
        broken.start()
    assert "no-such-core" in str(caught.value)  # the child's own error message
    assert broken.proc is not None
    assert broken.proc.returncode is not None


def test_the_start_timeout_is_generous_and_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_TEST_START_TIMEOUT_S", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert start_timeout_s() >= 60
    monkeypatch.setenv("CI", "true")
    assert start_timeout_s() >= 120
    monkeypatch.setenv("GATEWAY_TEST_START_TIMEOUT_S", "7.5")
    assert start_timeout_s() == 7.5
