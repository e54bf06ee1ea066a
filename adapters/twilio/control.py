"""Twilio call control, pure: the REST requests that place, transfer and hang up calls.

Each function builds a :class:`~gateway.callcontrol.RestRequest` (sent by
:class:`gateway.callcontrol.CallControl`). From Twilio's docs ("Call resource":
https://www.twilio.com/docs/voice/api/call-resource, "Answering Machine Detection":
https://www.twilio.com/docs/voice/answering-machine-detection):

- create: ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``, form-encoded
  ``To``, ``From``, ``Url`` (+ ``Method``) or ``Twiml``, for AMD
  ``MachineDetection`` (``Enable`` | ``DetectMessageEnd``), ``AsyncAmd=true``,
  ``AsyncAmdStatusCallback`` (+ ``AsyncAmdStatusCallbackMethod``), and for the call's
  progress ``StatusCallback`` (+ ``StatusCallbackMethod``) with ``StatusCallbackEvent``
  repeated for each of :data:`STATUS_EVENTS` (without it only ``completed`` is sent):
  each callback's form carries ``CallSid``, ``CallStatus`` (``queued``, ``initiated``,
  ``ringing``, ``in-progress``, ``completed``, ``busy``, ``no-answer``, ``failed``,
  ``canceled``), ``To``, ``From``, and ``AnsweredBy`` when detection ran;
- update: ``POST .../Calls/{CallSid}.json`` with ``Twiml`` (new instructions: the
  transfer's ``<Dial>``), ``Url`` + ``Method`` (fetch new instructions there: a call
  moved to another instance at shutdown, :func:`redirect`) or ``Status=completed``
  (hang up);
- auth: HTTP Basic ``AccountSid:AuthToken``.

The call's SID is one path segment of the update's URL, percent-encoded
(:func:`gateway.callcontrol.path_segment`): it comes from a stream's start or a
callback, and a ``/``, ``..``, ``?``, ``#`` or ``%`` in it must not make the request
another endpoint of Twilio's API (with the account's credentials), a query or a fragment.

``AnsweredBy`` (sync: on the ``Url`` request; async: on the status callback) is one
of ``human``, ``machine_start``, ``machine_end_beep``, ``machine_end_silence``,
``machine_end_other``, ``fax``, ``unknown`` (:func:`is_machine`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final

from twilio.twiml.voice_response import VoiceResponse  # type: ignore[import-untyped]

from adapters.twilio.protocol import MACHINE_ANSWERS as MACHINE_ANSWERS
from gateway.callcontrol import RestRequest, path_segment

STATUS_EVENTS: Final = ["initiated", "ringing", "answered", "completed"]
"""The ``StatusCallbackEvent`` s a placed call reports to its ``StatusCallback``."""


@dataclass(frozen=True)
class TwilioAuth:
    """An account's REST credentials and the API's base URL (``https://api.twilio.com``)."""

    account_sid: str
    auth_token: str
    base_url: str = "https://api.twilio.com"

    def calls_url(self, call_sid: str | None = None) -> str:
        """``<base>/2010-04-01/Accounts/{AccountSid}/Calls.json`` (no ``call_sid``: the
        create's URL) or ``.../Calls/{sid}.json``, ``sid`` one path segment
        (:func:`gateway.callcontrol.path_segment`)."""
        base = f"{self.base_url.rstrip('/')}/2010-04-01/Accounts/{self.account_sid}/Calls"
        return f"{base}/{path_segment(call_sid)}.json" if call_sid else f"{base}.json"

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Basic base64(AccountSid:AuthToken)``."""
        raw = f"{self.account_sid}:{self.auth_token}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}

    def update(self, call_sid: str, form: dict[str, str | list[str]]) -> RestRequest:
        """``POST .../Calls/{sid}.json`` with ``form``: an update of the live call ``call_sid``
        (new TwiML, a new URL to fetch it from, or its status)."""
        return RestRequest("POST", self.calls_url(call_sid), self.headers, form=form)


def create_call(
    auth: TwilioAuth,
    *,
    to: str,
    from_: str,
    url: str,
    machine_detection: str | None = None,
    amd_callback: str | None = None,
    status_callback: str | None = None,
) -> RestRequest:
    """Place a call whose answer fetches TwiML from ``url`` (POST).

    With ``machine_detection`` (``Enable`` | ``DetectMessageEnd``) detection runs
    asynchronously (``AsyncAmd=true``): the call connects at once and the result is
    POSTed to ``amd_callback``. With ``status_callback`` the call's progress
    (:data:`STATUS_EVENTS`) is POSTed there.
    """
    form: dict[str, str | list[str]] = {"To": to, "From": from_, "Url": url, "Method": "POST"}
    if machine_detection:
        form["MachineDetection"] = machine_detection
        form["AsyncAmd"] = "true"
        if amd_callback:
            form["AsyncAmdStatusCallback"] = amd_callback
            form["AsyncAmdStatusCallbackMethod"] = "POST"
    if status_callback:
        form["StatusCallback"] = status_callback
        form["StatusCallbackMethod"] = "POST"
        form["StatusCallbackEvent"] = STATUS_EVENTS
    return RestRequest("POST", auth.calls_url(), auth.headers, form=form)


def dial_twiml(target: str) -> str:
    """``<Response><Dial><Number>+1…</Number></Dial></Response>`` for a phone number
    (E.164, ``tel:`` stripped) or ``<Dial><Sip>sip:…</Sip></Dial>`` for a SIP URI.

    Raises ValueError for an empty target.
    """
    target = target.strip()
    if not target:
        raise ValueError("a transfer needs a target")
    response = VoiceResponse()
    dial = response.dial()
    if target.lower().startswith(("sip:", "sips:")):
        dial.sip(target)
    else:
        dial.number(target.removeprefix("tel:"))
    return str(response.to_xml(xml_declaration=False))


def transfer(auth: TwilioAuth, call_sid: str, target: str) -> RestRequest:
    """Hand the live call to ``target``: update it with the TwiML of :func:`dial_twiml`
    (the media stream stops; the caller hears the target ring)."""
    return auth.update(call_sid, {"Twiml": dial_twiml(target)})


def redirect(auth: TwilioAuth, call_sid: str, url: str) -> RestRequest:
    """Have the live call fetch new TwiML from ``url`` (``Url``, ``Method=POST``): its
    current instructions (the media stream and what follows it) are dropped, and Twilio
    POSTs ``url`` as it POSTs a voice webhook (signed: ``X-Twilio-Signature`` over
    ``url`` and the form)."""
    return auth.update(call_sid, {"Url": url, "Method": "POST"})


def hang_up(auth: TwilioAuth, call_sid: str) -> RestRequest:
    """End the call: update it with ``Status=completed``."""
    return auth.update(call_sid, {"Status": "completed"})


def is_machine(answered_by: str) -> bool:
    """Whether an ``AnsweredBy`` value is an answering machine or a fax."""
    return answered_by in MACHINE_ANSWERS
