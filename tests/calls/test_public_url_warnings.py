"""GATEWAY_PUBLIC_URL that a phone carrier cannot reach: :func:`gateway.calls.public_url_problem`
says why (not https; a loopback, unspecified, private or local host), and each configured
carrier (Twilio, Telnyx, Plivo, Vonage) logs one WARNING at startup naming itself, the URL,
the reason and the setting; a carrier not configured says nothing. Exotel is handed no URL
of the gateway's (its stream URL is set in Exotel's App Bazaar), so it has no such warning.

The startup tests serve the real app (uvicorn, its lifespan) with the carrier's credentials.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.calls import public_url_problem
from gateway.settings import Settings
from tests.adapters.telnyx.harness import PUBLIC_KEY as TELNYX_PUBLIC_KEY
from tests.adapters.vonage.harness import application
from tests.conftest import gateway

PUBLIC = "https://gateway.example.com"
VONAGE_PRIVATE_KEY = application("https://api.example.com")["vonage_private_key"]
"""The PEM of a Vonage application's RSA private key (GATEWAY_VONAGE_PRIVATE_KEY)."""


@pytest.mark.parametrize(
    "url",
    [
        PUBLIC,
        "https://gateway.example.com:8443/base/",
        "https://GATEWAY.EXAMPLE.COM.",
        "https://8.8.8.8",
        "https://[2606:4700::1111]:443",
        "https://1e100.net",  # a name that starts with digits is no IPv4 shorthand
    ],
)
def test_a_public_https_url_has_no_problem(url: str) -> None:
    assert public_url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://localhost", "its host localhost is not public (a local name)"),
        ("https://localhost:8443", "its host localhost is not public (a local name)"),
        ("https://dev.localhost", "its host dev.localhost is not public (a local name)"),
        ("https://gateway.local", "its host gateway.local is not public (a local name)"),
        ("https://gateway", "its host gateway is not public (a single-label name)"),
        ("https://127.0.0.1:8443", "its host 127.0.0.1 is not public (a loopback address)"),
        ("https://[::1]:8443", "its host ::1 is not public (a loopback address)"),
        (
            "https://[::ffff:127.0.0.1]",
            "its host ::ffff:127.0.0.1 is not public (a loopback address)",
        ),
        ("https://0.0.0.0", "its host 0.0.0.0 is not public (an unspecified address)"),
        ("https://[::]", "its host :: is not public (an unspecified address)"),
        ("https://10.1.2.3", "its host 10.1.2.3 is not public (a private address)"),
        ("https://192.168.1.20", "its host 192.168.1.20 is not public (a private address)"),
        ("https://172.16.0.1", "its host 172.16.0.1 is not public (a private address)"),
        ("https://[fd00::1]", "its host fd00::1 is not public (a private address)"),
        ("https://169.254.1.1", "its host 169.254.1.1 is not public (a link-local address)"),
        ("https://100.64.0.1", "its host 100.64.0.1 is not public (a non-global address)"),
        # IPv4 shorthand: HTTP clients (curl, browsers) connect to 127.0.0.1 for these
        ("https://127.1", "its host 127.1 is not public (a loopback address)"),
        ("https://0x7f.0.0.1:8443", "its host 0x7f.0.0.1 is not public (a loopback address)"),
        ("https://2130706433", "its host 2130706433 is not public (a loopback address)"),
        ("https://10.1", "its host 10.1 is not public (a private address)"),
    ],
)
def test_a_local_host_is_a_problem(url: str, reason: str) -> None:
    assert public_url_problem(url) == reason


NOT_HTTPS = "it is not https (carriers connect media streams to wss:// only)"


def test_http_is_a_problem_and_so_is_its_host() -> None:
    assert public_url_problem("http://gateway.example.com") == NOT_HTTPS
    assert public_url_problem("ws://gateway.example.com") == NOT_HTTPS
    assert public_url_problem("http://localhost:8080") == (
        f"{NOT_HTTPS} and its host localhost is not public (a local name)"
    )
    assert public_url_problem("http://0.0.0.0:8080") == (
        f"{NOT_HTTPS} and its host 0.0.0.0 is not public (an unspecified address)"
    )
    assert public_url_problem("https://") == "it has no host"


@pytest.mark.parametrize("url", [f"{PUBLIC}/?x=1", f"{PUBLIC}#frag", f"{PUBLIC}/?"])
def test_a_query_or_fragment_is_a_problem(url: str) -> None:
    assert public_url_problem(url) == (
        "it has a query or fragment (the callbacks made from it are malformed)"
    )


CARRIERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Twilio": ("adapters.twilio", {"twilio_auth_token": "twilio-auth-token"}),
    "Telnyx": ("adapters.telnyx", {"telnyx_public_key": TELNYX_PUBLIC_KEY}),
    "Telnyx API": ("adapters.telnyx", {"telnyx_api_key": "KEYtelnyx"}),
    "Plivo": ("gateway.plivo", {"plivo_auth_id": "MAXX", "plivo_auth_token": "plivo-token"}),
    "Vonage": ("gateway.vonage", {"vonage_signature_secret": "vonage-secret-0123456789"}),
    "Vonage REST": (
        "gateway.vonage",
        {"vonage_application_id": "app-id", "vonage_private_key": VONAGE_PRIVATE_KEY},
    ),
}


async def _startup_warnings(caplog: pytest.LogCaptureFixture, **settings: Any) -> list[str]:
    """The WARNING lines about GATEWAY_PUBLIC_URL logged while a gateway of ``settings``
    starts and serves (the routers' lifespans)."""
    caplog.set_level(logging.WARNING)
    caplog.clear()
    async with gateway(Settings(**settings)):
        pass
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno == logging.WARNING and "GATEWAY_PUBLIC_URL" in r.getMessage()
    ]


@pytest.mark.parametrize("configured", list(CARRIERS))
async def test_a_configured_carrier_warns_of_the_default_localhost_url(
    configured: str, caplog: pytest.LogCaptureFixture
) -> None:
    """GATEWAY_PUBLIC_URL unset (``http://localhost:8080``) and the carrier's credentials
    set: one WARNING of its logger naming the carrier, the URL, why, and the setting."""
    logger, credentials = CARRIERS[configured]
    carrier = configured.split()[0]
    warned = await _startup_warnings(caplog, **credentials)
    assert warned == [
        f"{logger}: GATEWAY_PUBLIC_URL http://localhost:8080 cannot be reached by {carrier}: "
        f"{NOT_HTTPS} and its host localhost is not public (a local name); its calls will "
        f"fail on {carrier}'s side. Set GATEWAY_PUBLIC_URL to the gateway's public "
        "https:// URL"
    ]


@pytest.mark.parametrize("configured", list(CARRIERS))
async def test_a_configured_carrier_warns_of_an_https_localhost_url(
    configured: str, caplog: pytest.LogCaptureFixture
) -> None:
    """https is not enough: Twilio warned only of the scheme before, Telnyx, Plivo and
    Vonage not at all."""
    _, credentials = CARRIERS[configured]
    warned = await _startup_warnings(caplog, public_url="https://127.0.0.1:8443", **credentials)
    assert len(warned) == 1
    assert "its host 127.0.0.1 is not public (a loopback address)" in warned[0]
    assert f"cannot be reached by {configured.split()[0]}" in warned[0]


@pytest.mark.parametrize("configured", ["Twilio", "Telnyx", "Plivo", "Vonage"])
async def test_the_warning_does_not_log_the_urls_password(
    configured: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A GATEWAY_PUBLIC_URL with a user and password (carriers such as Twilio take basic
    auth credentials in the URLs they are handed) was logged whole, password and all; the
    warning writes them ``***``. Its host is still named."""
    _, credentials = CARRIERS[configured]
    url = "http://admin:s3cret@gateway.internal:8080/base/"
    warned = await _startup_warnings(caplog, public_url=url, **credentials)
    assert len(warned) == 1
    assert "s3cret" not in warned[0]
    assert "admin" not in warned[0]
    assert "GATEWAY_PUBLIC_URL http://***@gateway.internal:8080/base/ cannot be" in warned[0]
    assert "its host gateway.internal is not public (a local name)" in warned[0]


@pytest.mark.parametrize("configured", list(CARRIERS))
async def test_a_public_https_url_is_not_warned_of(
    configured: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, credentials = CARRIERS[configured]
    assert await _startup_warnings(caplog, public_url=PUBLIC, **credentials) == []


async def test_no_carrier_configured_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    """No phone credentials (a gateway not used for calls, Exotel's included: it is handed
    no URL of the gateway's): nothing about the default ``http://localhost:8080``."""
    exotel = {"exotel_api_key": "exotel-key", "exotel_api_token": "exotel-token"}
    assert await _startup_warnings(caplog, **exotel) == []
