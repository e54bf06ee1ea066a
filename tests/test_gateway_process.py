"""The helper that starts real gateway processes for the multi-instance tests
(tests/conftest.py: GatewayProcess, start_all)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import GatewayProcess, start_all, start_timeout_s


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
