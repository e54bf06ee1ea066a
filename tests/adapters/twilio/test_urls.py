"""The URLs Twilio's requests are checked against, on a real server: ``POST
/twilio/voice/`` (a webhook URL configured with a trailing slash) answered as
``/twilio/voice`` is, never a redirect built from the request's Host header; a stream's
``wss://`` URL signed with its default port (443), not the twilio library's ``:80``."""

from __future__ import annotations

from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.adapters.twilio.harness import call_sid, local_ws_url, parse_twiml, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway


async def test_the_voice_webhook_with_a_trailing_slash_is_answered_not_redirected_by_host() -> None:
    """Starlette answered ``POST /twilio/voice/`` with a 307 to ``http://<Host>/twilio/voice``:
    any client's Host header came back as the redirect's target. It is now the voice
    webhook itself: signed (the auth token, the URL with its slash) it gets its TwiML;
    unsigned, or signed for the URL without the slash, 403; no answer names the Host."""
    form = {"CallSid": call_sid(), "AccountSid": "AC" + "0" * 32, "From": "+15550100"}
    host = {"Host": "attacker.example"}
    async with twilio_gateway() as gw, httpx.AsyncClient(base_url=gw.url) as client:
        signed = {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice/", form), **host}
        answer = await client.post("/twilio/voice/", data=form, headers=signed)
        assert answer.status_code == 200, answer.text
        assert parse_twiml(answer.text).stream_url.startswith("wss://gateway.example.com/")
        other = {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice", form), **host}
        for headers in (host, other):
            refused = await client.post("/twilio/voice/", data=form, headers=headers)
            assert refused.status_code == 403, refused.text
            assert "location" not in refused.headers
            assert "attacker.example" not in refused.text


async def stream_handshakes(public: str, **gateway: Any) -> list[int]:
    """A Twilio call to a gateway whose GATEWAY_PUBLIC_URL is ``public`` (an https URL
    without a port; ``gateway``: more of twilio_gateway's settings), its stream opened
    three times, signed for the stream URL as sent, with ``:443`` and with ``:80``: the
    handshake's status each time (101 accepted)."""
    host = "wss://" + public.removeprefix("https://")
    form = {"CallSid": call_sid(), "AccountSid": "AC" + "0" * 32, "From": "+15550100"}
    statuses = []
    async with (
        twilio_gateway(**gateway) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        for signed_host in (host, host + ":443", host + ":80"):
            voice = {"X-Twilio-Signature": sign(AUTH, public + "/twilio/voice", form)}
            answer = await client.post("/twilio/voice", data=form, headers=voice)
            assert answer.status_code == 200, answer.text
            stream_url = parse_twiml(answer.text).stream_url
            assert stream_url.startswith(host + "/twilio/stream/")
            signed = signed_host + stream_url.removeprefix(host)
            headers = {"X-Twilio-Signature": sign(AUTH, signed)}
            try:
                async with connect(local_ws_url(gw.url, stream_url), additional_headers=headers):
                    statuses.append(101)
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
    return statuses


async def test_a_stream_url_signed_with_wss_s_default_port_is_accepted_not_port_80() -> None:
    """The twilio library checks a signature against the URL as sent and with the
    scheme's default port added, which its ``add_port`` takes to be 443 for ``https``
    and 80 for anything else: a stream's ``wss://host/...`` signed as
    ``wss://host:443/...`` (wss's port, as Twilio may sign a URL with its port: the
    library's "sig generation on back end is inconsistent") was refused (403), one signed
    as ``wss://host:80/...`` accepted. Now the forms checked are the URL as sent and
    with ``:443``."""
    assert PUBLIC == "https://gateway.example.com"
    # as sent, with :443, with :80
    assert await stream_handshakes(PUBLIC) == [101, 101, 403]


async def test_a_stream_url_with_an_ipv6_host_signed_as_sent_is_accepted() -> None:
    """GATEWAY_PUBLIC_URL with an IPv6 literal (``https://[2001:db8::1]``): a stream
    signed for its URL as sent (``wss://[2001:db8::1]/twilio/stream/...``) was refused
    (403) once the port-less ``wss`` URL was handed to the library with ``:443``: its
    ``remove_port`` cuts the host at its first ``:`` (``wss://[/...``), so the URL as sent
    was no longer among the forms checked. Both forms pass; ``:80`` is still refused."""
    public = "https://[2001:db8::1]"
    # as sent, with :443, with :80
    assert await stream_handshakes(public, public_url=public) == [101, 101, 403]


async def test_the_status_callback_with_a_trailing_slash_is_served_as_signed() -> None:
    """``POST /twilio/status/`` (every route's slash form) was Starlette's 307 built from
    the Host header, the callback's body lost. It is the status callback itself, its
    signature checked for the URL as sent (the slash included)."""
    event = {"AccountSid": "AC" + "0" * 32, "CallSid": call_sid(), "StreamEvent": "stream-stopped"}
    host = {"Host": "attacker.example"}
    async with twilio_gateway() as gw, httpx.AsyncClient(base_url=gw.url) as client:
        signed = {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/status/", event), **host}
        answer = await client.post("/twilio/status/", data=event, headers=signed)
        assert answer.status_code == 204, answer.text
        bare = {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/status", event), **host}
        assert (await client.post("/twilio/status", data=event, headers=bare)).status_code == 204
        for headers in (host, bare):  # unsigned, or signed for the other URL
            refused = await client.post("/twilio/status/", data=event, headers=headers)
            assert refused.status_code == 403, refused.text
            assert "location" not in refused.headers
