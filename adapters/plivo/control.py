"""Plivo call control, pure: transfer and hang-up of a live call.

From Plivo's API reference ("Transfer a call", "Hang up a call"; plivo-python
``calls.update`` and Plivo's Java example ``Call/TransferCall.java``):

- transfer: ``POST /v1/Account/{auth_id}/Call/{call_uuid}/`` with ``legs``
  (``aleg``), ``aleg_url`` (the XML the call runs next: :func:`dial_xml`) and
  ``aleg_method``. ``legs`` is ``aleg``, ``bleg`` or ``both`` (``aleg`` transfers
  ``call_uuid`` itself); ``aleg_url`` is required for ``aleg``; ``aleg_method`` defaults
  to POST (plivo-ruby ``CallInterface#update`` "Transfer a call",
  https://www.rubydoc.info/gems/plivo/4.1.3/Plivo/Resources/CallInterface:update).
  The same request moves a live call to another gateway instance at shutdown: its
  ``aleg_url`` is then the answer URL with ``resumed=1`` (routes.py ``_move_request``),
  so Plivo fetches a new ``<Stream>`` there. Plivo's reference
  (https://www.plivo.com/docs/voice/api/call/transfer-a-call/) says the call "fetch[es]
  and execute[s] XML from a different URL", answered 202, and that "Maximum transfers
  allowed for a single call is 70" (then it hangs up, "Loop detected": a call moved by
  70 deploys); plivo-python ``plivo/resources/calls.py`` ``Calls.update`` sends
  ``POST ('Call', call_uuid)`` with these fields. That the transfer ends the running
  XML's stream (Plivo's ``stop`` or the socket's close) is [unverified]: neither says
  what becomes of a running ``<Stream>`` (Plivo can stop one by its id, ``DELETE
  Call/{call_uuid}/Stream/{stream_id}``, plivo-python ``delete_specific_stream``;
  not used); routes.py waits for the stream's end within the move's bound either way;
- hang-up: ``DELETE /v1/Account/{auth_id}/Call/{call_uuid}/``: 204 OK, 404 the call
  had already ended (CARRIERS.md "Plivo");
- auth: HTTP Basic ``auth_id:auth_token``.

The call's UUID is one path segment of the URL, percent-encoded
(:func:`gateway.callcontrol.path_segment`): it comes from the stream's start, and a
``/``, ``..``, ``?`` or ``#`` in it must not make the request another endpoint of
Plivo's API (with the account's credentials).
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gateway.callcontrol import RestAnswer, RestRequest, path_segment


@dataclass(frozen=True)
class PlivoAuth:
    """Auth ID, Auth Token and the API's base URL (``https://api.plivo.com``)."""

    auth_id: str
    auth_token: str
    base_url: str = "https://api.plivo.com"

    def call_url(self, call_uuid: str) -> str:
        """``<base>/v1/Account/{auth_id}/Call/{call_uuid}/``, ``call_uuid`` one path
        segment (:func:`gateway.callcontrol.path_segment`)."""
        base = f"{self.base_url.rstrip('/')}/v1/Account/{self.auth_id}"
        return f"{base}/Call/{path_segment(call_uuid)}/"

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Basic base64(auth_id:auth_token)``."""
        raw = f"{self.auth_id}:{self.auth_token}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


def dial_xml(target: str) -> str:
    """``<Response><Dial><Number>…</Number></Dial></Response>`` (``<User>`` for a SIP URI):
    what ``aleg_url`` answers. Raises ValueError for an empty target."""
    target = target.strip()
    if not target:
        raise ValueError("a transfer needs a target")
    root = ET.Element("Response")
    dial = ET.SubElement(root, "Dial")
    sip = target.lower().startswith(("sip:", "sips:"))
    ET.SubElement(dial, "User" if sip else "Number").text = (
        target if sip else target.removeprefix("tel:").lstrip("+")
    )
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")


def transfer(auth: PlivoAuth, call_uuid: str, aleg_url: str) -> RestRequest:
    """Transfer the call: it fetches and runs the XML at ``aleg_url`` (POST): a
    transfer's ``<Dial>``, or the answer URL anew for a call moved at shutdown."""
    body = {"legs": "aleg", "aleg_url": aleg_url, "aleg_method": "POST"}
    return RestRequest("POST", auth.call_url(call_uuid), auth.headers, json=body)


def hang_up(auth: PlivoAuth, call_uuid: str) -> RestRequest:
    """Hang the call up."""
    return RestRequest("DELETE", auth.call_url(call_uuid), auth.headers)


def already_ended(answer: RestAnswer) -> bool:
    """Whether a hang-up found the call over (404)."""
    return answer.status == 404
