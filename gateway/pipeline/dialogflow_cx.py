"""The ``dialogflow-cx`` pipeline: a Dialogflow CX agent through detectIntent (REST v3).

Spec: shared/specs/CORES.md, "Dialogflow CX detectIntent (REST v3)".
``GATEWAY_PIPELINE=dialogflow-cx:projects/P/locations/L/agents/A``; settings
``GATEWAY_DIALOGFLOW_CX_*``.

- Auth: the service-account JSON key of GATEWAY_DIALOGFLOW_CX_CREDENTIALS through
  google-auth (``service_account.Credentials``, scope ``cloud-platform``): a JWT
  assertion signed with the key is exchanged at the key's ``token_uri`` for an access
  token, sent as ``Authorization: Bearer`` (the token endpoint's answer read within
  GATEWAY_PIPELINE_MAX_RESPONSE_BYTES, as the API's: :class:`_TimedAuthRequest`). The
  refresh (blocking I/O in google-auth) runs in a worker thread, one at a time, only
  when the token is missing or expiring, or when CX refused it (HTTP 401: the token is
  dropped and the request sent once more with a fresh one; CX did not run it).
- Endpoint: ``https://<location>-dialogflow.googleapis.com`` (``dialogflow.googleapis.com``
  for ``global``), or GATEWAY_DIALOGFLOW_CX_ENDPOINT. ``POST /v3/<agent>[/environments/
  <env>]/sessions/<id>:detectIntent``. The CX session id is the first 36 hex digits of
  the SHA-256 of the gateway session's key (``<channel>:<session id>``), so one gateway
  session is one CX session (CX keeps the conversation state) and a session id one
  channel's client proposed never reaches another channel's CX session.
- ``queryInput`` (with ``languageCode``: GATEWAY_DIALOGFLOW_CX_LANGUAGE or the locale,
  a Java-style ``en_US`` written ``en-US``: :func:`language_code`):
  ``#intro`` -> ``event`` GATEWAY_DIALOGFLOW_CX_WELCOME_EVENT (``WELCOME``);
  ``#silence`` -> ``event`` GATEWAY_DIALOGFLOW_CX_NO_INPUT_EVENT
  (``sys.no-input-default``); another ``#name`` -> ``event`` ``name``; a key press
  (``input.attributes["dtmf"]``, or on a phone channel a transcript of only ``0-9*#``)
  -> ``dtmf {digits, finishDigit "#"}``; anything else -> ``text`` (cut to 256
  characters, the API's limit). ``queryParams.timeZone`` is the session's zone.
- ``queryResult.responseMessages`` -> items, in order: ``text.text[]`` one item per
  text; ``outputAudioText`` ``ssml`` (with its spoken text) or ``text``; ``playAudio``
  ``audioUri`` and ``mixedAudio`` segments' ``uri`` -> audio items when http(s) URLs
  (a ``gs://`` URI is dropped, logged at WARNING: :meth:`DialogflowCxPipeline._audio_items`,
  as every core's media URLs, :func:`gateway.pipeline.cores.is_url`); ``payload`` -> a
  code item (the payload as JSON); ``telephonyTransferCall`` ``phoneNumber``/``sipUri``
  and ``liveAgentHandoff`` (``metadata.target``/``phoneNumber``/``sipUri``, else
  GATEWAY_DIALOGFLOW_CX_HANDOFF_TARGET) -> :func:`gateway.events.transfer_item`; one
  without a target (a handoff: nor the setting) is not carried out: no item, one WARNING
  line (:class:`gateway.pipeline.cores.UntargetedHandoffs`), the turn goes on;
  ``endInteraction`` -> ``Response.session_ended``. ``conversationSuccess`` and
  ``knowledgeInfoCard`` give no item; a variant the connector does not know gives none
  either, its name logged at DEBUG, one line per turn (:data:`KNOWN_FIELDS`).
  A field that is JSON ``null`` is an absent one (proto3 JSON reads ``null`` as the
  field's default): ``responseMessages: null`` is no messages, a ``payload: null``
  or ``endInteraction: null`` no variant, a ``null`` element of ``responseMessages`` no
  message (skipped: it can mean nothing else; :func:`_messages`).
  ``pipeline_state`` records the CX session id, the current page and the session
  parameters.
- Streaming (GATEWAY_DIALOGFLOW_CX_STREAMING): ``:serverStreamingDetectIntent``, whose
  answer is a stream of DetectIntentResponses (a JSON array written element by
  element, Google's REST streaming form; or server-sent events with ``alt=sse``):
  the messages of each PARTIAL response are forwarded as they arrive; the FINAL
  response's messages are forwarded except those equal to one already forwarded; a
  stream that ends before its FINAL response (its last one PARTIAL) is a PipelineError. The
  array is read by :class:`JsonArrayReader`, in time linear in the answer however
  small the pieces it comes in.
- Failures (PipelineError): no token, the API unreachable, non-2xx (the fixed text
  ``the Dialogflow CX core answered HTTP <status>``; the Google error ``message`` goes
  only to the log, redacted: :func:`gateway.pipeline.cores.check_status`), an answer
  that is not a DetectIntentResponse (also a message field of the wrong type: a
  ``text.text`` or ``mixedAudio.segments`` that is no list) or over
  GATEWAY_PIPELINE_MAX_RESPONSE_BYTES, and
  JSON that :func:`gateway.pipeline.cores.core_json` refuses (too deep, a number of more
  than 100 characters, ``NaN``/``Infinity``, a lone surrogate): ``the core answered
  something that is not JSON: <what is wrong>``, the same for the whole answer, a
  streamed element and an event's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self
from urllib.parse import quote

import google.auth.exceptions
import httpx
import requests
from google.auth.transport.requests import Request as AuthRequest
from google.oauth2 import service_account

from gateway.events import INTRO, SILENCE, Input, Response, ResponseItem, transfer_item
from gateway.pipeline.base import PipelineConfigError, PipelineError, PipelineOutput, shown_spec
from gateway.pipeline.cores import (
    DEFAULT_RETRY,
    RetryPolicy,
    UntargetedHandoffs,
    body_chunks,
    bounded_lines,
    check_status,
    checked_json,
    core_failed,
    core_json,
    is_url,
    iter_sse,
    log_dropped,
    pooled_client,
    read_body,
    send_retried,
    talking_to,
    text_decoder,
)
from gateway.protocol import (
    MAX_JSON_DEPTH,
    UnsafeValue,
    clipped,
    guarded_decoder,
    json_depth,
    media_type,
)
from gateway.ratelimit import RefusalLog
from gateway.sessions import Session, retrieved
from gateway.settings import Settings
from gateway.ssml import ssml_to_text

log = logging.getLogger(__name__)

KIND = "Dialogflow CX"
"""How errors name this core (``the Dialogflow CX core answered HTTP 403``)."""
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MAX_TEXT = 256
"""``TextInput.text`` limit of detectIntent, characters."""
PHONE_CHANNELS = frozenset({"twilio", "vonage", "telnyx", "plivo", "sip"})
"""Channels whose digit-only inputs are key presses (sent as ``dtmf``)."""

_AGENT = re.compile(r"projects/([^/\s]+)/locations/([^/\s]+)/agents/([^/\s]+)")
_DTMF = re.compile(r"[0-9*#]+")
_TOO_DEEP = f"the core streamed an element nested deeper than {MAX_JSON_DEPTH} levels"


TOKEN_TIMEOUT_S = 10.0
"""Longest wait (s) for Google's token endpoint in one refresh (google-auth's default: 120)."""


TOKEN_READ_STEP = 1024
"""Bytes of the token endpoint's answer taken per step, inflated (requests asks for gzip and
deflate), checked against the bound after each: urllib3 (2.7 and later, a dependency)
inflates no more than a read asks for, whatever the ratio or the chain of codings (before
2.6 it inflated each piece as sent whole: a KB of gzip'ed gzip, about a GB)."""


class _TimedAuthRequest(AuthRequest):
    """google-auth's requests transport whose calls wait at most :data:`TOKEN_TIMEOUT_S`
    (a service account's refresh passes no timeout of its own), follow no redirect (the
    token request's body is the signed assertion, a credential that requests would
    POST again to whatever host a 307/308 names; a redirect is the token endpoint's
    refusal instead: a TransportError naming its status, "has no access token") and read
    at most ``max_bytes`` of an answer, inflated step by step (:meth:`_bounded`), as
    every core's answer is (:func:`gateway.pipeline.cores.body_chunks`)."""

    def __init__(self, session: requests.Session, max_bytes: int) -> None:
        super().__init__(session)
        self.max_bytes = max_bytes

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        # no redirect followed; the body streamed, to be read by the hook, bounded
        kwargs.update(allow_redirects=False, stream=True, hooks={"response": self._bounded})
        answer = super().__call__(  # type: ignore[no-untyped-call]
            url, method, body, headers, timeout=TOKEN_TIMEOUT_S, **kwargs
        )
        if 300 <= answer.status < 400:
            raise google.auth.exceptions.TransportError(  # type: ignore[no-untyped-call]
                f"a redirect (HTTP {answer.status}) from the token_uri, not followed"
            )
        return answer

    def _bounded(self, answer: requests.Response, *args: Any, **kwargs: Any) -> None:
        """Reads ``answer``'s body (a requests response hook, before google-auth sees it)
        :data:`TOKEN_READ_STEP` bytes at a time, as its content. Raises TransportError
        (GoogleAuthError: "has no access token") past ``max_bytes``; requests' own errors
        of a body cut off or not valid gzip/deflate (google-auth makes them a
        TransportError)."""
        data = bytearray()
        with contextlib.closing(answer):  # released whole, or closed
            for chunk in answer.iter_content(TOKEN_READ_STEP):
                data += chunk
                if len(data) > self.max_bytes:
                    raise google.auth.exceptions.TransportError(  # type: ignore[no-untyped-call]
                        f"the token_uri's answer is larger than {self.max_bytes} bytes"
                    )
        answer._content = bytes(data)  # what .content gives (requests' own attribute)


class DialogflowCxPipeline:
    """A Dialogflow CX agent as the core (see the module doc).

    ``agent`` is ``projects/P/locations/L/agents/A``; ``credentials`` google-auth
    credentials with the cloud-platform scope; ``retry`` (a
    :class:`~gateway.pipeline.cores.RetryPolicy`, GATEWAY_PIPELINE_RETRIES and its limits)
    says how a request the API refused unprocessed is sent again. Raises PipelineError on
    the failures of the module doc.
    """

    name = "dialogflow-cx"

    def __init__(
        self,
        agent: str,
        credentials: service_account.Credentials,
        *,
        language: str | None = None,
        endpoint: str | None = None,
        environment: str | None = None,
        welcome_event: str = "WELCOME",
        no_input_event: str = "sys.no-input-default",
        handoff_target: str | None = None,
        streaming: bool = False,
        connect_timeout_s: float = 3.0,
        max_response_bytes: int = 1_048_576,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        match = _AGENT.fullmatch(agent)
        if match is None:
            raise ValueError(f"not a CX agent name: {agent!r}")
        regional = "" if match.group(2) == "global" else f"{match.group(2)}-"
        self.agent = agent
        self.endpoint = (endpoint or f"https://{regional}dialogflow.googleapis.com").rstrip("/")
        self.environment = environment
        self.language = language
        self.welcome_event = welcome_event
        self.no_input_event = no_input_event
        self.handoff_target = handoff_target
        self.streaming = streaming
        self._credentials = credentials
        self._auth_session = requests.Session()
        self._refreshing: asyncio.Future[None] | None = None
        self._max = max_response_bytes
        self._retry = retry
        self._client = client or pooled_client(connect_timeout_s)
        self.dropped_audio = RefusalLog()
        """The lines of audio URIs dropped (not http(s)): a burst at WARNING, then one a
        minute (an agent that always answers ``gs://`` logs no line per turn)."""
        self.untargeted_handoffs = UntargetedHandoffs(
            log, f"the {KIND} core", "GATEWAY_DIALOGFLOW_CX_HANDOFF_TARGET is not set"
        )
        """The lines of ``liveAgentHandoff`` messages not carried out: their metadata
        names no target and GATEWAY_DIALOGFLOW_CX_HANDOFF_TARGET is not set."""
        self.untargeted_calls = UntargetedHandoffs(
            log, f"the {KIND} core", "the message has no phoneNumber or sipUri"
        )
        """The lines of ``telephonyTransferCall`` messages not carried out (no target)."""

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The pipeline of ``GATEWAY_PIPELINE=dialogflow-cx:projects/P/locations/L/agents/A``
        (the scheme in any case, as RFC 3986 section 3.1 has it).

        Raises PipelineConfigError naming the setting: a malformed spec
        (GATEWAY_PIPELINE); GATEWAY_DIALOGFLOW_CX_CREDENTIALS unset, unreadable or not a
        service-account key.
        """
        scheme, _, agent = spec.strip().partition(":")
        if scheme.lower() != "dialogflow-cx" or _AGENT.fullmatch(agent.strip("/")) is None:
            raise PipelineConfigError(
                f"GATEWAY_PIPELINE {shown_spec(spec)!r} is not a Dialogflow CX agent: expected "
                "dialogflow-cx:projects/PROJECT/locations/LOCATION/agents/AGENT"
            )
        path = settings.dialogflow_cx_credentials
        if not path:
            raise PipelineConfigError(
                "GATEWAY_DIALOGFLOW_CX_CREDENTIALS must name the service-account JSON key "
                "of the dialogflow-cx pipeline"
            )
        if path.lstrip().startswith("{"):  # the key's JSON itself: its private key, not shown
            raise PipelineConfigError(
                "GATEWAY_DIALOGFLOW_CX_CREDENTIALS holds JSON text (not shown: a private key); "
                "it takes the path of the service-account JSON key file"
            )
        try:
            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                path, scopes=[SCOPE]
            )
        except (OSError, ValueError, KeyError) as exc:
            raise PipelineConfigError(
                f"GATEWAY_DIALOGFLOW_CX_CREDENTIALS {path!r} is not a readable service-account "
                f"JSON key: {type(exc).__name__}: {str(exc)[:120]}"
            ) from exc
        return cls(
            agent.strip("/"),
            credentials,
            language=settings.dialogflow_cx_language,
            endpoint=settings.dialogflow_cx_endpoint,
            environment=settings.dialogflow_cx_environment,
            welcome_event=settings.dialogflow_cx_welcome_event,
            no_input_event=settings.dialogflow_cx_no_input_event,
            handoff_target=settings.dialogflow_cx_handoff_target,
            streaming=settings.dialogflow_cx_streaming,
            connect_timeout_s=settings.pipeline_connect_timeout_s,
            max_response_bytes=settings.pipeline_max_response_bytes,
            retry=RetryPolicy.of(settings),
        )

    # ------------------------------------------------------------------ requests

    def session_path(self, session: Session) -> str:
        """``projects/.../agents/A[/environments/E]/sessions/<CX session id>``."""
        base = self.agent
        if self.environment:
            base += f"/environments/{quote(self.environment, safe='')}"
        return f"{base}/sessions/{cx_session_id(session.key)}"

    def query_input(self, session: Session, input: Input) -> dict[str, Any]:
        """The ``queryInput`` of a turn (see the module doc)."""
        language = self.language or language_code(input.locale or session.locale)
        query: dict[str, Any]
        dtmf = input.attributes.get("dtmf")
        text = input.text.strip()
        if isinstance(dtmf, str) and _DTMF.fullmatch(dtmf):
            query = {"dtmf": _dtmf(dtmf)}
        elif input.action and input.action != "#":
            events = {INTRO: self.welcome_event, SILENCE: self.no_input_event}
            query = {"event": {"event": events.get(input.action, input.action.removeprefix("#"))}}
        elif session.channel in PHONE_CHANNELS and _DTMF.fullmatch(text):
            query = {"dtmf": _dtmf(text)}
        else:
            query = {"text": {"text": text[:MAX_TEXT]}}
        return {**query, "languageCode": language}

    async def _token(self) -> str:
        """A valid access token. One refresh runs at a time, in a thread (google-auth is
        blocking), for every turn that needs it; a turn that gives up waiting (its time
        is over) does not stop it, and the next turn waits for the same refresh rather
        than start another: a token endpoint that hangs holds one thread, for at most
        :data:`TOKEN_TIMEOUT_S`, not one per turn (the threads of the default executor
        also decode audio and encode speech)."""
        if self._credentials.valid:
            return str(self._credentials.token)
        refreshing = self._refreshing
        if refreshing is None or refreshing.done():
            request = _TimedAuthRequest(self._auth_session, self._max)
            refreshing = asyncio.ensure_future(
                asyncio.to_thread(self._credentials.refresh, request)
            )
            # read by a waiter, or dropped (the next turn refreshes and reports its own)
            refreshing.add_done_callback(retrieved)
            self._refreshing = refreshing
        try:
            await asyncio.shield(refreshing)
        except google.auth.exceptions.GoogleAuthError as exc:  # the token endpoint's words:
            raise core_failed(  # logged only (they may quote the assertion or a proxy's)
                KIND, "has no access token", f"{type(exc).__name__}: {exc}"
            ) from exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # google-auth's parser on a 200 that is no token response (a proxy's page, a
            # list, an expires_in that is no number): the endpoint's fault, not the gateway's
            raise core_failed(
                KIND,
                "has no access token",
                "the token_uri answered without a usable access_token "
                f"({type(exc).__name__}: {exc})",
            ) from exc
        return str(self._credentials.token)

    async def _send(self, url: str, body: dict[str, Any]) -> httpx.Response:
        """The API's answer to ``body`` POSTed at ``url``, its body not read yet (the
        caller closes it), sent with a valid access token.

        An answer 401 means the token was refused before it expired (revoked, or this
        host's clock is behind): the token is dropped and the request sent once more with
        a fresh one, as google-auth's own transports do. CX refused the request without
        running it, so this repeats no turn; without it the refused token would be sent
        on every turn until its expiry (up to an hour). A second 401 is the answer.
        Each request is sent by :func:`gateway.pipeline.cores.send_retried`: again after
        a 429 (or a 503 with ``Retry-After``) when the wait fits in the turn, as many
        times as this core's ``retry`` policy allows (GATEWAY_PIPELINE_RETRIES).
        """
        token = await self._token()
        answer = await self._post(url, body, token)
        if answer.status_code != 401:
            return answer
        await answer.aclose()
        if self._credentials.token == token:  # not replaced by another turn's refresh
            self._credentials.token = None
            log.warning("the %s core refused its access token (HTTP 401): fetching another", KIND)
        return await self._post(url, body, await self._token())

    async def _post(self, url: str, body: dict[str, Any], token: str) -> httpx.Response:
        request = self._client.build_request(
            "POST",
            url,
            json=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json; charset=utf-8",
            },
        )
        return await send_retried(
            self._client, request, f"the {KIND} core", self.name, retry=self._retry
        )

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        path = self.session_path(session)
        method = "serverStreamingDetectIntent" if self.streaming else "detectIntent"
        url = f"{self.endpoint}/v3/{path}:{method}"
        body = {
            "queryInput": self.query_input(session, input),
            "queryParams": {"timeZone": input.zone_id or session.time_zone},
        }
        answers: list[dict[str, Any]] = []
        sent: Counter[str] = Counter()
        unknown: dict[str, None] = {}  # variants dropped unknown, in order
        with talking_to(f"the {KIND} core"):
            answer = await self._send(url, body)
            async with contextlib.aclosing(answer):
                secrets = [self._credentials.token]
                await check_status(answer, f"the {KIND} core", secrets, _google_error)
                async for part in self._parts(answer):
                    answers.append(part)
                    final = part.get("responseType") != "PARTIAL"
                    for item in self._items(part, sent, final, unknown):
                        yield item
        if not answers:
            raise PipelineError("the core's stream held no DetectIntentResponse")
        if answers[-1].get("responseType") == "PARTIAL":
            # the stream's last response is its FINAL one; an event stream has no other end
            # marker, so a body ended after a PARTIAL (a server or proxy that gave up) would
            # pass for the whole answer, the half answer's page and parameters kept
            raise PipelineError(f"the {KIND} core's stream ended before its FINAL response")
        log_dropped(log, f"the {KIND} core", "ResponseMessage variants", unknown)
        yield self._response(session, path, answers)

    def _items(
        self, answer: dict[str, Any], sent: Counter[str], final: bool, unknown: dict[str, None]
    ) -> list[ResponseItem]:
        """Items of one DetectIntentResponse's messages; ``sent`` counts the JSON of the
        messages forwarded already (a FINAL response skips them once each: a multiset, so
        each message costs one lookup; a list searched for each made a stream of many
        messages quadratic, seconds of the event loop for 1 MB); the fields of variants
        the connector does not know go in ``unknown`` (:data:`KNOWN_FIELDS`)."""
        items: list[ResponseItem] = []
        for message in _messages(answer):
            key = json.dumps(message, sort_keys=True)
            if final and sent[key] > 0:
                sent[key] -= 1
                continue
            if not final:
                sent[key] += 1
            items += self._message_items(message)
            if not message.keys() <= KNOWN_FIELDS:
                unknown.update(dict.fromkeys(k for k in message if k not in KNOWN_FIELDS))
        return items

    def _message_items(self, message: dict[str, Any]) -> list[ResponseItem]:
        if "text" in message:
            texts = _dict(message["text"]).get("text") or []
            if not isinstance(texts, list):
                raise PipelineError("the core answered a text message whose text is no list")
            return [ResponseItem(text=t) for t in texts if isinstance(t, str) and t.strip()]
        if "outputAudioText" in message:
            audio_text = _dict(message["outputAudioText"])
            ssml = audio_text.get("ssml")
            if isinstance(ssml, str) and ssml.strip():
                return [ResponseItem(text=ssml_to_text(ssml), ssml=ssml)]
            text = audio_text.get("text")
            return [ResponseItem(text=text)] if isinstance(text, str) and text.strip() else []
        if "playAudio" in message:
            uri = _dict(message["playAudio"]).get("audioUri")
            return self._audio_items("playAudio audioUri", [uri])
        if "mixedAudio" in message:
            segments = _dict(message["mixedAudio"]).get("segments") or []
            if not isinstance(segments, list):
                raise PipelineError("the core answered a mixedAudio whose segments are no list")
            uris = [s.get("uri") for s in segments if isinstance(s, dict)]
            return self._audio_items("mixedAudio segment uri", uris)
        if "payload" in message:
            code = json.dumps(message["payload"], separators=(",", ":"))
            return [ResponseItem(code=code, repeatable=False)]
        if "telephonyTransferCall" in message:
            call = _dict(message["telephonyTransferCall"])
            target = call.get("phoneNumber") or call.get("sipUri")
            if not isinstance(target, str) or not target.strip():
                self.untargeted_calls.log("telephonyTransferCall")
                return []
            return [transfer_item(target, reason="telephonyTransferCall")]
        if "liveAgentHandoff" in message:
            metadata = _dict(message["liveAgentHandoff"]).get("metadata") or {}
            metadata = metadata if isinstance(metadata, dict) else {}
            named = [metadata.get(k) for k in ("target", "phoneNumber", "sipUri")]
            target = next((t for t in named if isinstance(t, str) and t.strip()), None)
            target = target or self.handoff_target
            if not target:
                self.untargeted_handoffs.log("liveAgentHandoff")
                return []
            reason = metadata.get("reason")
            return [transfer_item(target, reason=reason if isinstance(reason, str) else None)]
        return []  # endInteraction (in _response), conversationSuccess, knowledgeInfoCard

    def _audio_items(self, field: str, uris: list[Any]) -> list[ResponseItem]:
        """One audio item per http(s) URL of ``uris`` (:func:`is_url`, the rule of every
        core's media URLs); a ``gs://`` URI (CX's Cloud Storage form) or another string
        is dropped, logged at WARNING naming ``field`` and the URI (bounded:
        :attr:`dropped_audio`), as no phone call or client could fetch it; a blank or
        non-string one (an inline ``audio`` segment) is no item."""
        out: list[ResponseItem] = []
        for uri in uris:
            if is_url(uri):
                out.append(ResponseItem(audio=uri))
            elif isinstance(uri, str) and uri:
                self.dropped_audio.log(
                    log,
                    "the %s core answered a %s that is not an http(s) URL: %s; dropped",
                    KIND,
                    field,
                    clipped(uri.partition("?")[0]),  # not a signed URL's signature
                )
        return out

    def _response(self, session: Session, path: str, answers: list[dict[str, Any]]) -> Response:
        ended = any("endInteraction" in m for a in answers for m in _messages(a))
        result = _dict(answers[-1].get("queryResult"))
        page = _dict(result.get("currentPage"))
        state: dict[str, Any] = {"session": path.rsplit("/", 1)[-1]}
        if isinstance(page.get("displayName"), str):
            state["currentPage"] = page["displayName"]
        if isinstance(result.get("parameters"), dict):
            state["parameters"] = result["parameters"]
        session.pipeline_state = state
        language = result.get("languageCode")
        return Response(session_ended=ended, locale=language if isinstance(language, str) else None)

    async def _parts(self, answer: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """The DetectIntentResponses of ``answer``: detectIntent's one, or those of a
        streamed answer (JSON array or SSE), each as soon as it is complete, read in
        linear time however the answer is cut."""
        if not self.streaming:
            yield _object(await read_body(answer, self._max, "the core"))
            return
        kind = media_type(answer.headers.get("content-type"))
        if kind == "text/event-stream":
            async for event in iter_sse(bounded_lines(answer, self._max, "the core", blank=True)):
                if event.data:  # (an event with a type and no data: iter_sse)
                    yield _object(event.data.encode())
            return
        decode = text_decoder(answer, "the core")
        reader = JsonArrayReader()
        async for data in body_chunks(answer, self._max, "the core"):
            for value in reader.feed(decode(data)):
                yield _element(value)
        for value in reader.feed(decode(b"", True)):
            yield _element(value)
        reader.finish()

    async def aclose(self) -> None:
        """Close the pooled connections (the API's and the token endpoint's)."""
        await self._client.aclose()
        self._auth_session.close()


_NON_SPACE = re.compile(r"\S")
_NEXT = re.compile(r"[^\s,]")  # between elements: the next one, the array's end or garbage
_OUTSIDE = re.compile(r'[\[\]{}"]')  # what the scanner heeds outside strings
_INSIDE = re.compile(r'["\\]')  # and inside them
_STRING_REST = re.compile(r'(?:[^"\\]++|\\.)*+"', re.DOTALL)  # a string's rest and its end
_SCALAR = 9
"""Characters of the longest JSON value that is neither an object, an array nor a string
(``-Infinity``): a scalar element is decided on at most that many."""
_INCOMPLETE = "the core's stream is not a complete JSON array"
# a \uD800-\uDFFF escape: the element may hold a lone surrogate (a literal prefix: fast)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonArrayReader:
    """One JSON array streamed in pieces (Google's REST streaming form of
    serverStreamingDetectIntent: ``[`` element ``,`` element ... ``]``), read
    incrementally: :meth:`feed` gives the values of the elements each piece of text
    completes, :meth:`finish` checks the array was closed.

    Linear in the text however it is cut: an element that begins in a piece is first
    decoded from there directly (a whole element in one piece costs one parse); one
    that piece does not complete is scanned on, each character once (C regex searches
    for the brackets and quotes that matter, the nesting depth and string state kept
    across pieces), and decoded once when its closing bracket or quote came. So each
    character is handed to the JSON decoder at most twice; ``decoded`` counts them
    (``parses`` the decoder's runs), ``read`` the characters fed.

    Between elements, whitespace and commas are skipped. Raises PipelineError: text
    before the ``[`` (``the core's stream is not a JSON array``); an element nested
    deeper than :data:`gateway.protocol.MAX_JSON_DEPTH` (the bound of :func:`core_json`,
    checked before the parser could recurse past it); an element that is JSON but that
    :func:`core_json` refuses (a number of more than 100 characters, ``NaN`` or
    ``Infinity``, a lone surrogate: the error of :func:`_core_json`, as for a whole
    answer); an element that is not JSON, anything but whitespace after the ``]``, or
    (:meth:`finish`) no ``]`` (``... not a complete JSON array``). Elements that are not
    objects are given as they are: the caller decides.

    The decoder refuses what core_json refuses as it parses (hooks on numbers and
    constants), so a good element still costs one parse; one it refuses, or one that
    may hold a lone surrogate, is decoded again by core_json for the verdict.
    """

    def __init__(self) -> None:
        self.read = 0
        self.decoded = 0
        self.parses = 0
        self._decoder = guarded_decoder()  # UnsafeValue: left to core_json
        self._scalars = json.JSONDecoder()  # a scalar element goes to the caller as it is
        self._raw_surrogate = False  # a piece held a surrogate character (not from UTF-8)
        self._opened = False
        self._closed = False
        self._pending: list[str] | None = None  # the element begun and not ended yet
        self._scalar = False  # ... a number or literal (decided on its first characters)
        self._depth = 0  # brackets open in it
        self._deepest = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> Iterator[Any]:
        """The values of the elements ``text`` (the next piece of the stream) completes,
        each given before the next is read (so an error after it comes after it)."""
        self.read += len(text)
        if not (self._raw_surrogate or text.isascii()):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                self._raw_surrogate = True  # from here each element is left to core_json
        i, n = 0, len(text)
        while i < n:
            if self._pending is None:
                found = (_NEXT if self._opened and not self._closed else _NON_SPACE).search(text, i)
                if found is None:
                    break
                i = found.start()
                if self._closed:
                    raise PipelineError(_INCOMPLETE)
                if not self._opened:
                    if text[i] != "[":
                        raise PipelineError("the core's stream is not a JSON array")
                    self._opened, i = True, i + 1
                    continue
                if text[i] == "]":
                    self._closed, i = True, i + 1
                    continue
                value, end = self._whole(text, i)
                if end >= 0:
                    yield value
                    i = end
                    continue
                self._begin(text[i])
                start = i
            else:
                start = 0
            if self._scalar:
                value, end = self._scalar_value(text, start)
                if end < 0:
                    break
                yield value
                i = end
                continue
            pending = self._pending
            assert pending is not None  # begun above or in an earlier piece
            end = self._scan(text, start)
            if end < 0:
                pending.append(text[start:])
                break
            pending.append(text[start:end])
            self._pending = None
            yield self._decode("".join(pending))
            i = end

    def finish(self) -> None:
        """Raises PipelineError unless the array was closed (with no element pending)."""
        if not self._closed or self._pending is not None:
            raise PipelineError(_INCOMPLETE)

    def _whole(self, text: str, start: int) -> tuple[Any, int]:
        """The element at ``text[start]`` and its end, when ``text`` holds all of it; else
        (None, -1). An element deeper than the bound is refused here."""
        first = text[start]
        if first not in "{[":
            return None, -1
        self.parses += 1
        try:
            value, end = self._decoder.raw_decode(text, start)
        except RecursionError:  # nested past the parser's own limit
            raise PipelineError(_TOO_DEEP) from None
        except (ValueError, UnsafeValue):
            self.decoded += len(text) - start
            # not complete in this piece (or not JSON, or refused: _decode will tell)
            return None, -1
        self.decoded += end - start
        # core_json's bound (the parser takes up to the interpreter's recursion limit)
        if text.count("[", start, end) + text.count("{", start, end) > MAX_JSON_DEPTH and (
            json_depth(text[start:end]) > MAX_JSON_DEPTH
        ):
            raise PipelineError(_TOO_DEEP)
        if self._raw_surrogate or _SURROGATE_ESCAPE.search(text, start, end):
            return _core_json(text[start:end]), end
        return value, end

    def _begin(self, first: str) -> None:
        self._pending = []
        self._scalar = first not in '{["'
        self._depth = self._deepest = 0
        self._in_string = self._escaped = False

    def _scan(self, text: str, i: int) -> int:
        """Scans the pending object, array or string on through ``text`` from ``i``: the
        index just past its end, or -1 when ``text`` ends first (the state kept)."""
        n = len(text)
        while i < n:
            if self._in_string:
                if self._escaped:
                    self._escaped, i = False, i + 1
                    continue
                found = _INSIDE.search(text, i)
                if found is None:
                    return -1
                i = found.end()
                if found[0] == "\\":
                    self._escaped = True
                    continue
                self._in_string = False
                if self._depth == 0:
                    return i  # the element was a string
                continue
            found = _OUTSIDE.search(text, i)
            if found is None:
                return -1
            i = found.end()
            mark = found[0]
            if mark == '"':
                string = _STRING_REST.match(text, i)  # the whole string at once, if here
                if string is None:
                    self._in_string = True
                elif self._depth == 0:
                    return string.end()  # the element was a string
                else:
                    i = string.end()
            elif mark in "[{":
                self._depth += 1
                self._deepest = max(self._deepest, self._depth)
            else:
                self._depth -= 1
                if self._depth <= 0:
                    return i
        return -1

    def _scalar_value(self, text: str, start: int) -> tuple[Any, int]:
        """The pending number or literal, when its first :data:`_SCALAR` characters
        decide it, and its end in ``text``; (None, -1) while they have not all come."""
        assert self._pending is not None
        before = sum(map(len, self._pending))
        head = "".join(self._pending) + text[start : start + _SCALAR - before]
        self.parses += 1
        self.decoded += len(head)
        try:
            value, end = self._scalars.raw_decode(head)
        except ValueError:
            if len(head) >= _SCALAR:
                raise PipelineError(_INCOMPLETE) from None
            self._pending = [head]
            return None, -1
        self._pending = None
        return value, start + end - before

    def _decode(self, element: str) -> Any:
        """The value of a whole element the scan delimited."""
        if self._deepest > MAX_JSON_DEPTH:
            raise PipelineError(_TOO_DEEP)
        self.parses += 1
        self.decoded += len(element)
        try:
            value, end = self._decoder.raw_decode(element)
        except UnsafeValue:
            return _core_json(element)  # raises the error naming what is wrong
        except (ValueError, RecursionError):
            raise PipelineError(_INCOMPLETE) from None
        if end != len(element):
            raise PipelineError(_INCOMPLETE)
        if self._raw_surrogate or _SURROGATE_ESCAPE.search(element):
            return _core_json(element)
        return value


def _core_json(data: str | bytes) -> Any:
    """:func:`core_json` of an answer or a streamed element; what it refuses is the
    PipelineError ``the core answered something that is not JSON: <what is wrong>``."""
    return checked_json(data, "the core answered something that is not JSON")


def _element(value: Any) -> dict[str, Any]:
    """A streamed element as a DetectIntentResponse; PipelineError otherwise."""
    if not isinstance(value, dict):
        raise PipelineError("the core streamed an element that is not an object")
    return _checked(value)


def cx_session_id(key: str) -> str:
    """The CX session id of a gateway session key (``<channel>:<session id>``): the first
    36 hex digits of its SHA-256 (CX takes at most 36 characters of ``[A-Za-z0-9_-]``)."""
    return hashlib.sha256(key.encode()).hexdigest()[:36]


def language_code(locale: str) -> str:
    """The CX ``languageCode`` of a turn's ``locale``: a BCP 47 tag as it is (``en``,
    ``en-US``); a locale as Java's ``Locale.toString()`` writes it (``en_US``, as
    Flowstorm V1 clients send it; ``zh_TW_#Hant``, ``en__POSIX``) as its language and
    country, ``-`` between (``en-US``, ``zh-TW``, ``en``): the form of CX's language
    codes, which have no ``_`` (an agent refuses ``en_US`` as a language it does not
    support)."""
    if "_" not in locale:
        return locale
    language, _, rest = locale.partition("_")
    country = rest.split("_", 1)[0]
    return f"{language}-{country}" if country else language


def _dtmf(keys: str) -> dict[str, str]:
    if keys.endswith("#") and len(keys) > 1:
        return {"digits": keys[:-1], "finishDigit": "#"}
    return {"digits": keys}


KNOWN_FIELDS = frozenset(
    {
        # the ResponseMessage variants (its ``message`` oneof) the connector reads
        "text",
        "payload",
        "outputAudioText",
        "playAudio",
        "mixedAudio",
        "telephonyTransferCall",
        "liveAgentHandoff",
        "endInteraction",
        "conversationSuccess",  # no item
        "knowledgeInfoCard",  # no item
        # ResponseMessage's fields beside the variant
        "responseType",
        "source",
        "channel",
    }
)
"""The fields of a ResponseMessage the connector knows; a message with another (a
variant newer than the connector, as ``toolCall``) gives no item for it, and its name is
logged at DEBUG, one line per turn (:func:`gateway.pipeline.cores.log_dropped`)."""


def _dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PipelineError("the core answered a message field that is not an object")
    return value


def _messages(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The ResponseMessages of a DetectIntentResponse (:func:`_checked`), each without
    its null fields: proto3 JSON reads ``null`` as the field's default, for a message
    field (a variant: ``"payload": null``, ``"endInteraction": null``) as not set, so
    such a variant is none (it was a ``null`` payload item, or the end of the session). A
    ``null`` message is no message: skipped (:func:`_checked` let it through)."""
    messages = _dict(answer.get("queryResult")).get("responseMessages") or []
    return [{k: v for k, v in m.items() if v is not None} for m in messages if isinstance(m, dict)]


def _checked(answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` when it is a DetectIntentResponse; PipelineError otherwise. Its
    ``responseMessages`` may be absent or ``null`` (proto3 JSON's default: no messages;
    ``null`` failed the turn before), and an element of it ``null`` (no message, skipped
    by :func:`_messages`; it failed the turn as "not a list of objects" before: it carries
    nothing, and the answer's other messages are the bot's)."""
    result = answer.get("queryResult")
    if not isinstance(result, dict):
        raise PipelineError("the core answered no queryResult")
    messages = result.get("responseMessages")
    messages = [] if messages is None else messages
    if not isinstance(messages, list) or not all(
        m is None or isinstance(m, dict) for m in messages
    ):
        raise PipelineError("the core answered responseMessages that are not a list of objects")
    return answer


def _object(data: bytes) -> dict[str, Any]:
    value = _core_json(data)
    if not isinstance(value, dict):
        raise PipelineError("the core answered JSON that is not an object")
    return _checked(value)


def _google_error(data: bytes) -> str:
    """The ``error.message`` of a Google API error body, else the body (for the log)."""
    try:
        message = core_json(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return data.decode("utf-8", "replace")
    return str(message)
