"""The URLs Twilio's requests are checked against, on a real server: ``POST
/twilio/voice/`` (a webhook URL configured with a trailing slash) answered as
``/twilio/voice`` is, never a redirect built from the request's Host header; a stream's
``wss://`` URL signed with its default port (443), not the twilio library's ``:80``."""

from __future__ import annotations

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


async def test_a_stream_url_signed_with_wss_s_default_port_is_accepted_not_port_80() -> None:
    """The twilio library checks a signature against the URL as sent and with the
    scheme's default port added, which its ``add_port`` takes to be 443 for ``https``
    and 80 for anything else: a stream's ``wss://host/...`` signed as
    ``wss://host:443/...`` (wss's port, as Twilio may sign a URL with its port: the
    library's "sig generation on back end is inconsistent") was refused (403), one signed
    as ``wss://host:80/...`` accepted. Now the forms checked are the URL as sent and
    with ``:443``."""
    form = {"CallSid": call_sid(), "AccountSid": "AC" + "0" * 32, "From": "+15550100"}
    async with twilio_gateway() as gw, httpx.AsyncClient(base_url=gw.url) as client:

        async def handshake(signed_url: str) -> int:
            voice = {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice", form)}
            answer = await client.post("/twilio/voice", data=form, headers=voice)
            stream_url = parse_twiml(answer.text).stream_url
            assert stream_url.startswith("wss://gateway.example.com/twilio/stream/")
            signed = signed_url + stream_url.removeprefix("wss://gateway.example.com")
            headers = {"X-Twilio-Signature": sign(AUTH, signed)}
            try:
                async with connect(local_ws_url(gw.url, stream_url), additional_headers=headers):
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        assert await handshake("wss://gateway.example.com") == 101  # as sent
        assert await handshake("wss://gateway.example.com:443") == 101
        assert await handshake("wss://gateway.example.com:80") == 403


async def test_a_stream_url_with_an_ipv6_host_signed_as_sent_is_accepted() -> None:
    """GATEWAY_PUBLIC_URL with an IPv6 literal (``https://[2001:db8::1]``): a stream
    signed for its URL as sent (``wss://[2001:db8::1]/twilio/stream/...``) was refused
    (403) once the port-less ``wss`` URL was handed to the library with ``:443``: its
    ``remove_port`` cuts the host at its first ``:`` (``wss://[/...``), so the URL as sent
    was no longer among the forms checked. Both forms pass; ``:80`` is still refused."""
    public = "https://[2001:db8::1]"
    form = {"CallSid": call_sid(), "AccountSid": "AC" + "0" * 32, "From": "+15550100"}
    async with (
        twilio_gateway(public_url=public) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):

        async def handshake(signed_url: str) -> int:
            voice = {"X-Twilio-Signature": sign(AUTH, public + "/twilio/voice", form)}
            answer = await client.post("/twilio/voice", data=form, headers=voice)
            assert answer.status_code == 200, answer.text
            stream_url = parse_twiml(answer.text).stream_url
            assert stream_url.startswith("wss://[2001:db8::1]/twilio/stream/")
            signed = signed_url + stream_url.removeprefix("wss://[2001:db8::1]")
            headers = {"X-Twilio-Signature": sign(AUTH, signed)}
            try:
                async with connect(local_ws_url(gw.url, stream_url), additional_headers=headers):
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        assert await handshake("wss://[2001:db8::1]") == 101  # as sent
        assert await handshake("wss://[2001:db8::1]:443") == 101
        assert await handshake("wss://[2001:db8::1]:80") == 403
