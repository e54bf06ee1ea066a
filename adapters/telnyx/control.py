"""Telnyx Call Control, pure: the REST requests that place, transfer and hang up calls,
and the answering-machine webhook read as an input.

From Telnyx's API reference (https://developers.telnyx.com/api-reference/call-commands/dial,
``.../transfer-call``, ``.../hangup-call``; "Answering Machine Detection"):

- dial: ``POST /v2/calls`` JSON ``connection_id``, ``to``, ``from``,
  ``answering_machine_detection`` (``detect`` ...), ``client_state`` (base64),
  ``webhook_url`` and the stream fields ``stream_url``, ``stream_track``,
  ``stream_codec`` (the inbound codec: ``default``, the call's own, when left out),
  ``stream_bidirectional_mode``, ``stream_bidirectional_codec``,
  ``stream_bidirectional_sampling_rate`` (CARRIERS.md "Telnyx", "Enable");
- transfer: ``POST /v2/calls/{call_control_id}/actions/transfer`` JSON ``to``
  (the id one path segment, percent-encoded: :func:`gateway.callcontrol.path_segment`);
- streaming start: ``POST /v2/calls/{call_control_id}/actions/streaming_start`` JSON
  ``stream_url`` (the WebSocket address the stream is delivered to), ``stream_track``,
  ``stream_codec``, ``stream_bidirectional_mode`` (``mp3``/``rtp``),
  ``stream_bidirectional_codec``, ``stream_bidirectional_sampling_rate``,
  ``stream_auth_token``; ``client_state`` would
  replace the call's state on every later webhook, so it is not sent
  (https://developers.telnyx.com/api-reference/call-commands/streaming-start): a call
  moved to another instance at shutdown (:func:`streaming_start`);
- streaming stop: ``POST /v2/calls/{call_control_id}/actions/streaming_stop`` JSON
  ``stream_id`` (the stream's; "if the stream_id is not provided the command stops all
  streams associated with a given call_control_id", so a call may have several:
  https://developers.telnyx.com/api-reference/call-commands/streaming-stop): the old
  stream of a moved call (:func:`streaming_stop`);
- hang-up: ``POST /v2/calls/{call_control_id}/actions/hangup`` JSON ``{}``;
  HTTP 422 with error code ``90018`` means the call had already ended (CARRIERS.md);
- auth: ``Authorization: Bearer <API key>``.

The AMD result is the webhook ``call.machine.detection.ended`` (``payload.result``
``human`` | ``machine`` | ``not_sure``) or ``call.machine.premium.detection.ended``
(``human_residence``, ``human_business``, ``machine``, ...): :func:`machine_input`.
The call's end is the webhook ``call.hangup`` (``payload.call_control_id``,
``payload.client_state``, ``payload.hangup_cause``): :func:`hangup_of`; with
``call.answered`` and the AMD result it is the call's outcome (:func:`outcome_of`, its
``hangup_cause`` as Twilio's ``CallStatus``: :func:`hangup_status`; a call answered ends
``completed`` whatever the cause, as gateway/calls.py ``record_outcome`` keeps it). A
TeXML call's end is its status callback (the TeXML Application's "Call progress events
URL", ``status_callback``: Ed25519-signed, form-urlencoded ``CallSid`` = the
call_control_id, ``CallStatus`` ``completed`` ...;
https://developers.telnyx.com/api-reference/callbacks/texml-call-completed):
:func:`texml_call_ended`.
A stream that could not connect is the webhook ``streaming.failed``
(https://developers.telnyx.com/api-reference/callbacks/call-streaming-failed:
``payload.call_control_id``, ``payload.client_state``, ``payload.failure_reason``, a
string such as ``connection_failed``, ``payload.stream_id``, ``payload.stream_type``
``websocket``, ``payload.stream_params`` ``stream_url``/``track``):
:func:`stream_failure_of`. A TeXML ``<Stream>``'s is its ``statusCallback``, the TeXML
stream webhook (https://developers.telnyx.com/api-reference/callbacks/texml-stream:
Ed25519-signed, form-urlencoded ``AccountSid``, ``CallSid`` "The unique identifier of
the call (call_control_id)", ``StreamEvent`` ``stream-started``, ``stream-stopped`` or
``stream-error``, ``StreamName``, ``StreamSid``, ``Timestamp``, and ``StreamError``
"Error message if the stream failed (conditional, only present when StreamEvent is
stream-error)"; "The server must return an HTTP 200"): :func:`texml_stream_failure`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from adapters.telnyx.protocol import stream_fields
from gateway.callcontrol import RestAnswer, RestRequest, path_segment
from gateway.events import Input
from gateway.protocol import ProtocolError, load_json

MACHINE: Final = "#machine"
"""The input of an answering-machine answer (attributes ``answeredBy``)."""
ALREADY_ENDED_CODE: Final = "90018"
AMD_EVENTS: Final = frozenset(
    {"call.machine.detection.ended", "call.machine.premium.detection.ended"}
)
TEXML_ENDED: Final = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
"""The ``CallStatus`` values of a TeXML status callback whose call is over."""
HANGUP_STATUS: Final = {
    "time_limit": "completed",
    "user_busy": "busy",
    "busy": "busy",
    "call_rejected": "busy",  # the callee declined (SIP 603), as a busy line
    "timeout": "no-answer",
    "no_answer": "no-answer",
    "originator_cancel": "canceled",
}
"""``call.hangup``'s ``hangup_cause`` as Twilio's ``CallStatus``; ``normal_clearing``
is :func:`hangup_status`'s own case; any other cause (``not_found``, ``unspecified``,
...) is ``failed``."""
MAX_RESULT: Final = 64
"""The longest AMD ``result`` taken (Telnyx's are words such as ``human_residence``): a
longer one is cut to it, in the ``#machine`` input, its log line and the outcome alike."""
MAX_FAILURE_REASON: Final = 128
"""The longest ``streaming.failed`` ``failure_reason`` taken (Telnyx's are words such as
``connection_failed``): a longer one is cut to it."""
MAX_CALL_ID: Final = 256
"""The longest call_control_id taken from a webhook (``call.hangup``, an AMD result,
``call.answered``) or a TeXML status callback's ``CallSid`` (a call_control_id is ~60
characters), as ``GET /v1/calls/{callId}`` (gateway/calls.py ``MAX_CALL_ID_CHARS``): a
longer one is no call of the gateway's, its webhook ignored (:func:`overlong_call_id`)."""


@dataclass(frozen=True)
class TelnyxAuth:
    """An API key and the API's base URL (``https://api.telnyx.com``)."""

    api_key: str
    base_url: str = "https://api.telnyx.com"

    def url(self, path: str) -> str:
        """``<base>/v2<path>``."""
        return f"{self.base_url.rstrip('/')}/v2{path}"

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <key>``."""
        return {"Authorization": f"Bearer {self.api_key}"}


def client_state(state: dict[str, Any]) -> str:
    """``client_state``: base64 of the compact JSON of ``state`` (echoed on the call's webhooks)."""
    raw = json.dumps(state, separators=(",", ":")).encode()
    return base64.b64encode(raw).decode("ascii")


def read_client_state(value: object) -> dict[str, Any]:
    """The state of :func:`client_state` (``value``: the field as a webhook or the stream's
    start carries it; an empty dict for none or a malformed one: not a string, not
    base64, or JSON outside :func:`~gateway.protocol.load_json`'s bounds, e.g. nested
    too deep)."""
    if not value or not isinstance(value, str):
        return {}
    try:
        state = load_json(base64.b64decode(value, validate=True), what="The client_state")
    except (ValueError, ProtocolError):
        return {}
    return state if isinstance(state, dict) else {}


def dial(
    auth: TelnyxAuth,
    *,
    connection_id: str,
    to: str,
    from_: str,
    stream_url: str,
    state: dict[str, Any],
    machine_detection: bool = True,
    webhook_url: str | None = None,
    stream_auth_token: str | None = None,
) -> RestRequest:
    """Place a call whose answer streams to ``stream_url`` (the callee's audio in PCMU,
    bidirectional RTP PCMU 8 kHz: :func:`adapters.telnyx.protocol.stream_fields`);
    ``state`` travels as ``client_state``; AMD ``detect`` when ``machine_detection``;
    the call's webhooks go to ``webhook_url`` when given (else the connection's).
    ``stream_auth_token`` becomes the dial's ``stream_auth_token`` field when given: the
    gateway sets it to the one-time stream token that ``stream_url`` carries in its
    ``token`` query. The stream is admitted by that URL's token alone
    (adapters/telnyx/routes.py ``/telnyx/stream``: how Telnyx presents
    ``stream_auth_token`` on the upgrade is not documented, CARRIERS.md "Telnyx", so no
    header is read); the field is where
    :meth:`adapters.telnyx.routes.TelnyxDialer.placed` reads the token back to bind it to
    the call Telnyx names."""
    body: dict[str, Any] = {
        "connection_id": connection_id,
        "to": to,
        "from": from_,
        **stream_fields(stream_url, auth_token=stream_auth_token),
        "client_state": client_state(state),
    }
    if machine_detection:
        body["answering_machine_detection"] = "detect"
    if webhook_url:
        body["webhook_url"] = webhook_url
        body["webhook_url_method"] = "POST"
    return RestRequest("POST", auth.url("/calls"), auth.headers, json=body)


def transfer(auth: TelnyxAuth, call_control_id: str, target: str) -> RestRequest:
    """Transfer the call to ``target`` (E.164 number, ``tel:`` stripped, or SIP URI)."""
    to = target.strip().removeprefix("tel:")
    return RestRequest(
        "POST",
        auth.url(f"/calls/{path_segment(call_control_id)}/actions/transfer"),
        auth.headers,
        json={"to": to},
    )


def streaming_start(
    auth: TelnyxAuth, call_control_id: str, stream_url: str, token: str
) -> RestRequest:
    """Start a new stream of the call to ``stream_url`` (the gateway's stream route,
    the caller's audio in PCMU, bidirectional RTP PCMU 8 kHz:
    :func:`adapters.telnyx.protocol.stream_fields`, with ``stream_auth_token``
    ``token``, the one-time token the URL carries, as the dial sends it)."""
    return RestRequest(
        "POST",
        auth.url(f"/calls/{path_segment(call_control_id)}/actions/streaming_start"),
        auth.headers,
        json=stream_fields(stream_url, auth_token=token),
    )


def streaming_stop(auth: TelnyxAuth, call_control_id: str, stream_id: str) -> RestRequest:
    """Stop the call's stream ``stream_id`` (only that one: the call's other streams go
    on)."""
    return RestRequest(
        "POST",
        auth.url(f"/calls/{path_segment(call_control_id)}/actions/streaming_stop"),
        auth.headers,
        json={"stream_id": stream_id},
    )


def hang_up(auth: TelnyxAuth, call_control_id: str) -> RestRequest:
    """Hang the call up."""
    return RestRequest(
        "POST",
        auth.url(f"/calls/{path_segment(call_control_id)}/actions/hangup"),
        auth.headers,
        json={},
    )


def already_ended(answer: RestAnswer) -> bool:
    """Whether a command failed because the call was over (422, error code 90018)."""
    if answer.status != 422 or not isinstance(answer.body, dict):
        return False
    errors = answer.body.get("errors")
    return isinstance(errors, list) and any(
        isinstance(e, dict) and str(e.get("code")) == ALREADY_ENDED_CODE for e in errors
    )


def call_id(answer: RestAnswer) -> str | None:
    """The ``data.call_control_id`` of a dial's answer."""
    data = answer.body.get("data") if isinstance(answer.body, dict) else None
    value = data.get("call_control_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _event_type(data: Mapping[str, Any]) -> str:
    """A webhook ``data``'s ``event_type``; "" when it is not a string (no event of ours)."""
    kind = data.get("event_type")
    return kind if isinstance(kind, str) else ""


def _event(event: Any) -> tuple[str, Mapping[str, Any]] | None:
    """The ``event_type`` (:func:`_event_type`) and ``payload`` of the webhook ``event``
    (parsed JSON: ``{"data": {"event_type": ..., "payload": {...}}}``); None when ``data``
    or its ``payload`` is not an object."""
    data = event.get("data") if isinstance(event, dict) else None
    if not isinstance(data, dict):
        return None
    payload = data.get("payload")
    return (_event_type(data), payload) if isinstance(payload, dict) else None


def _app_key(payload: Mapping[str, Any]) -> str | None:
    """The ``appKey`` of a webhook payload's ``client_state`` (the call was placed with,
    :func:`read_client_state`); None when it names none."""
    app_key = read_client_state(payload.get("client_state")).get("appKey")
    return app_key if isinstance(app_key, str) and app_key else None


def _call_id(payload: Mapping[str, Any]) -> str | None:
    """A webhook payload's ``call_control_id`` when it is one the gateway takes: a string
    of 1 to :data:`MAX_CALL_ID` characters (the longest ``GET /v1/calls/{callId}`` and the
    outcome records take); None otherwise."""
    ccid = payload.get("call_control_id")
    return ccid if isinstance(ccid, str) and 0 < len(ccid) <= MAX_CALL_ID else None


def overlong_call_id(event: Any) -> str | None:
    """The ``call_control_id`` of the webhook ``event`` (parsed JSON) when it is a string
    longer than :data:`MAX_CALL_ID`: no call the gateway placed or serves has such an id
    (its outcome could not be recorded or read, its stream's token could not carry it),
    so the webhook is no event the gateway acts on (:func:`hangup_of`,
    :func:`machine_input`, :func:`outcome_of` read none); None for any other webhook."""
    data = event.get("data") if isinstance(event, dict) else None
    payload = data.get("payload") if isinstance(data, dict) else None
    ccid = payload.get("call_control_id") if isinstance(payload, dict) else None
    return ccid if isinstance(ccid, str) and len(ccid) > MAX_CALL_ID else None


def hangup_of(event: Any) -> tuple[str, str | None] | None:
    """``(call_control_id, appKey)`` when the webhook ``event`` (parsed JSON) is
    ``call.hangup``: the call ended; ``appKey`` of the ``client_state`` the call was placed
    with (None when it names none). None for any other event or one without a
    ``call_control_id`` of 1 to :data:`MAX_CALL_ID` characters (:func:`overlong_call_id`)."""
    got = _event(event)
    if got is None or got[0] != "call.hangup":
        return None
    ccid = _call_id(got[1])
    return None if ccid is None else (ccid, _app_key(got[1]))


def texml_call_ended(form: Mapping[str, str]) -> str | None:
    """The ``CallSid`` (the call's call_control_id) when the TeXML status callback ``form``
    (its form fields) says the call is over (``CallStatus`` in :data:`TEXML_ENDED`); None
    for another status, or a ``CallSid`` that is empty or longer than :data:`MAX_CALL_ID`."""
    if form.get("CallStatus") not in TEXML_ENDED:
        return None
    call_sid = form.get("CallSid", "")
    return call_sid if 0 < len(call_sid) <= MAX_CALL_ID else None


def machine_input(event: Any) -> tuple[str, Input] | None:
    """``(call_control_id, #machine input)`` when the webhook ``event`` (parsed JSON) says
    a machine answered; None for any other event, a person, or a ``call_control_id`` that
    is not 1 to :data:`MAX_CALL_ID` characters (:func:`overlong_call_id`).

    The input's attributes: ``answeredBy`` (Telnyx's ``result``, cut to
    :data:`MAX_RESULT` characters), ``callControlId``
    and the ``clientState`` the call was placed with.
    """
    got = _event(event)
    if got is None or got[0] not in AMD_EVENTS:
        return None
    payload = got[1]
    result, ccid = payload.get("result"), _call_id(payload)
    if not isinstance(result, str) or ccid is None or "machine" not in result:
        return None
    result = result[:MAX_RESULT]
    attributes = {
        "answeredBy": result,
        "callControlId": ccid,
        "clientState": read_client_state(payload.get("client_state")),
    }
    return ccid, Input.of(MACHINE, attributes=attributes)


@dataclass(frozen=True)
class Outcome:
    """What a webhook says of a call's outcome (gateway/calls.py ``record_outcome``):
    its ``call_id`` (call_control_id), ``status`` (Twilio's vocabulary) or None,
    ``answered_by`` (the AMD result) or None, ``to`` (the callee, "" unknown)."""

    call_id: str
    status: str | None
    answered_by: str | None
    to: str


def hangup_status(payload: Mapping[str, Any]) -> str:
    """The ``CallStatus`` (Twilio's vocabulary) of a call that ended unanswered, by the
    ``call.hangup`` ``payload``: its ``hangup_cause`` by :data:`HANGUP_STATUS`, else
    ``failed``; ``normal_clearing`` (the call was cleared, no fault) ``canceled`` when
    the ``hangup_source`` is ``caller`` (for a dial, the gateway's side: a ``hangup``
    command before the callee answered, Twilio's "canceled via the REST API while
    ringing"), else ``no-answer`` (the callee's side, or ``unknown``).

    Telnyx's ``call.hangup`` does not say whether the call was answered (no answer time;
    ``start_time`` is the call's start, ``call_quality_stats`` counts early media too):
    ``call.answered`` does, usually before the ``call.hangup`` (Telnyx does not enforce
    the order of its webhooks). So this is the status of a call never answered, and
    gateway/calls.py ``record_outcome`` makes it ``completed`` for a call it recorded
    ``in-progress`` (answered), whichever of the two came first.
    A ``normal_clearing`` was taken as ``completed`` whatever came before: a dial
    cancelled while ringing read as a call that took place."""
    cause = str(payload.get("hangup_cause"))
    if cause == "normal_clearing":
        return "canceled" if payload.get("hangup_source") == "caller" else "no-answer"
    return HANGUP_STATUS.get(cause, "failed")


def outcome_of(event: Any) -> Outcome | None:
    """The :class:`Outcome` of the webhook ``event`` (parsed JSON): ``call.answered``
    (``in-progress``), ``call.hangup`` (:func:`hangup_status`: the status of a call never
    answered, which ``record_outcome`` makes ``completed`` for one answered), an AMD
    result (``answered_by``); None for another event or one without a
    ``call_control_id`` of at most :data:`MAX_CALL_ID` characters."""
    got = _event(event)
    if got is None:
        return None
    kind, payload = got
    ccid, to, result = _call_id(payload), payload.get("to"), payload.get("result")
    if ccid is None:
        return None
    to = to if isinstance(to, str) else ""
    if kind == "call.answered":
        return Outcome(ccid, "in-progress", None, to)
    if kind == "call.hangup":
        return Outcome(ccid, hangup_status(payload), None, to)
    if kind in AMD_EVENTS and isinstance(result, str) and result:
        return Outcome(ccid, None, result[:MAX_RESULT], to)
    return None


@dataclass(frozen=True)
class StreamFailure:
    """A ``streaming.failed`` webhook: the media stream ``stream_id`` ("" when not given)
    of call ``call_id`` (its call_control_id) could not connect, for ``reason`` (its
    ``failure_reason``, at most :data:`MAX_FAILURE_REASON` characters, "" when not
    given); ``app_key`` of the ``client_state`` the call was placed with (None when it
    names none)."""

    call_id: str
    reason: str
    stream_id: str
    app_key: str | None


TEXML_STREAM_ERROR: Final = "stream-error"
"""The ``StreamEvent`` of a TeXML stream webhook whose stream failed."""


def texml_stream_failure(form: Mapping[str, str]) -> StreamFailure | None:
    """The :class:`StreamFailure` when the TeXML stream webhook ``form`` (its form fields)
    is a ``stream-error`` (module doc): ``CallSid`` (the call_control_id), ``StreamError``
    and ``StreamSid`` cut to :data:`MAX_FAILURE_REASON` characters ("" when not given),
    no app key (the route's ``?appKey=`` gives it). None for another ``StreamEvent``
    (``stream-started``, ``stream-stopped``), none, or a ``CallSid`` that is empty or
    longer than :data:`MAX_CALL_ID`."""
    if form.get("StreamEvent") != TEXML_STREAM_ERROR:
        return None
    call_sid = form.get("CallSid", "")
    if not 0 < len(call_sid) <= MAX_CALL_ID:
        return None
    reason, stream_sid = form.get("StreamError", ""), form.get("StreamSid", "")
    return StreamFailure(
        call_sid, reason[:MAX_FAILURE_REASON], stream_sid[:MAX_FAILURE_REASON], None
    )


def stream_failure_of(event: Any) -> StreamFailure | None:
    """The :class:`StreamFailure` when the webhook ``event`` (parsed JSON) is
    ``streaming.failed``; None for any other event, or one without a ``payload`` object
    holding a ``call_control_id`` of 1 to :data:`MAX_CALL_ID` characters. A
    ``failure_reason`` or ``stream_id`` that is not a string is taken as none; each is
    cut to :data:`MAX_FAILURE_REASON` characters (a client's text)."""
    got = _event(event)
    if got is None or got[0] != "streaming.failed":
        return None
    payload = got[1]
    ccid = _call_id(payload)
    if ccid is None:
        return None
    reason, stream_id = payload.get("failure_reason"), payload.get("stream_id")
    return StreamFailure(
        ccid,
        reason[:MAX_FAILURE_REASON] if isinstance(reason, str) else "",
        stream_id[:MAX_FAILURE_REASON] if isinstance(stream_id, str) else "",
        _app_key(payload),
    )
