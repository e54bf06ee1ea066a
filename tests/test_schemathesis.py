"""Property-based API tests: schemathesis generates requests from the OpenAPI document.

Every HTTP operation of the app is called with generated valid and invalid input
against a real server (uvicorn in a thread, embedded defaults with the voice
assistants' verification off so their handlers run). The check is that nothing
answers a server error (5xx) and that answers match the documented schema where
one is documented. The number of generated cases is printed.
"""

from __future__ import annotations

import socket
import threading
import time
import zoneinfo
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.settings import Settings

if TYPE_CHECKING:  # schemathesis defines this alias for type checkers only
    from schemathesis.specs.openapi.schemas import OpenApiCase

CASES: list[str] = []

# The OpenAPI document's own string format (V2's timeZone): a key of the IANA time zone
# database, as the gateway's zoneinfo knows them; any other string is refused (400)
schemathesis.openapi.format(
    "iana-time-zone", st.sampled_from(sorted(zoneinfo.available_timezones()))
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = create_app(
        Settings(
            alexa_verify=False,
            google_verify=False,
            dialogflow_verify=False,
            tts_provider="espeak-ng",
        )
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)
    sock.close()
    print(f"\nschemathesis: {len(CASES)} generated cases, 0 server errors")


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=10)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same cases every run: no flaky findings
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_a_server_error(case: OpenApiCase) -> None:
    CASES.append(f"{case.method} {case.path}")
    case.call_and_validate(timeout=30)  # every check schemathesis has
