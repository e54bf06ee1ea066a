"""Flowstorm V2 over real HTTP: a ``deviceId`` and an application key are bounded as the
push API names them (at most MAX_ID_CHARS characters)."""

from __future__ import annotations

import httpx

from gateway.protocol import MAX_ID_CHARS
from tests.conftest import gateway

TEXT = {"Content-Type": "text/plain"}


async def test_a_device_id_or_key_longer_than_the_push_api_takes_is_refused() -> None:
    """``deviceId`` (query or X-DeviceId) had no bound, while the push API takes a
    ``target.deviceId`` of at most 256 characters: a device with a longer id was indexed
    (its id in a store key) and could never be pushed to. A longer one is a 400; a key
    longer than that, with GATEWAY_APP_KEYS unset (any key opens sessions, stored with
    them), a 403 as an unknown key's. Ids of 256 characters are served."""
    long_id, longest = "d" * (MAX_ID_CHARS + 1), "d" * MAX_ID_CHARS
    async with gateway() as url, httpx.AsyncClient(base_url=url) as c:
        refusals = [
            (f"/client?key=k&tts=None&deviceId={long_id}", {}),
            ("/client?key=k&tts=None", {"X-DeviceId": long_id}),
        ]
        for path, headers in refusals:
            refused = await c.put(path, headers={**TEXT, **headers}, content="hello")
            assert refused.status_code == 400, refused.text
            assert refused.text.startswith("! client: invalid deviceId:"), refused.text
            assert str(MAX_ID_CHARS) in refused.text
            assert long_id not in refused.text
            assert "flowstorm-session-id" not in refused.cookies
            got = await c.get(path, headers=headers)  # the GET reads the device too
            assert got.status_code == 400, got.text

        too_long_key = await c.put(f"/client?key={long_id}&tts=None", headers=TEXT, content="hi")
        assert too_long_key.status_code == 403, too_long_key.text
        assert too_long_key.text == (
            f"! client: The application key is longer than {MAX_ID_CHARS} characters.\n"
        )
        assert "flowstorm-session-id" not in too_long_key.cookies

        served = await c.put(
            f"/client?key={longest}&tts=None&deviceId={longest}", headers=TEXT, content="hi"
        )
        assert served.status_code == 200, served.text
        assert served.text == "< You said: hi\n"
