"""A small Dialogflow CX for tests (a real FastAPI app): Google's OAuth token endpoint and
detectIntent / serverStreamingDetectIntent (REST v3) of one scripted agent.

Contract: shared/specs/CORES.md, "Dialogflow CX detectIntent (REST v3)".

- ``POST /token``: the OAuth 2.0 JWT bearer grant google-auth's service-account
  credentials use (``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``,
  ``assertion``). The assertion is verified with the test key's public half (RS256,
  ``iss`` the client email, ``aud`` Google's token endpoint, ``scope`` cloud-platform, ``exp``
  in the future); answers ``{"access_token", "expires_in", "token_type"}``.
- ``POST /v3/projects/P/locations/L/agents/A/sessions/<id>:detectIntent`` (and
  ``:serverStreamingDetectIntent``): needs ``Authorization: Bearer <issued token>``
  (401 UNAUTHENTICATED otherwise), a session id of at most 36 characters (400
  INVALID_ARGUMENT), one ``queryInput`` kind, a ``languageCode`` in CX's form (``en``,
  ``en-US``; 400 for ``en_US``) and a text of at most 256 characters. The agent keeps
  each session's page and parameters (:func:`agent`). The streaming method answers a
  JSON array written element by element (server-sent events with ``?alt=sse`` or
  ``app.state.sse``): a PARTIAL DetectIntentResponse with the first message, then (after
  ``app.state.gap_s``) the FINAL one with all messages. The texts ``deep`` and
  ``deep100`` are answered a DetectIntentResponse whose parameters nest 50,000 and 100
  levels deep, in the method's form; ``digits`` and ``nan`` one whose parameters hold a
  number of 5,000 digits and ``NaN`` (JSON the gateway refuses). The text ``leak`` is answered 403 with a message
that echoes the request's bearer token (as a careless proxy might); ``bomb`` with a gzip
answer inflating to 100 MB (``tests.gateway.core_app.gzip_bomb``); ``segments`` with a
``mixedAudio`` whose segments are a number; ``cloud storage`` with a ``playAudio`` and a
``mixedAudio`` segment of ``gs://`` URIs (and one https segment); ``news`` with a text,
variants the connector does not know (``toolCall`` twice, a 5,000-character one) and a
``conversationSuccess``. The text ``nulls`` is answered, in the method's form, a
DetectIntentResponse whose ``responseMessages``, ``currentPage``, ``parameters``,
``languageCode`` and ``responseType`` are JSON ``null`` (proto3 JSON: their default);
``null fields`` one whose messages are a text and messages whose fields are ``null``
(``payload``, ``endInteraction``, ``text``, ``text.text``, ``playAudio.audioUri``,
``mixedAudio.segments``) and a ``null`` message. The text ``halves <n>`` is streamed a PARTIAL response of
``n`` texts ``p0``... and a FINAL one of ``n`` others, ``f0``... (none repeated).

``app.state.piece`` (bytes; 0: not cut) cuts the FINAL response in pieces of that
size; ``app.state.no_final`` set, the stream ends cleanly after the PARTIAL response
(as a server or proxy that stops mid-answer: the SSE form has no end marker but the
FINAL, the array form is then left unclosed unless ``app.state.close_array``); the text ``long`` is answered "Here it comes." then 2,000 texts in one message.
``app.state.requests`` holds ``(path, body)`` of each detectIntent, ``app.state.tokens``
the tokens issued (``app.state.token_redirect`` set: the token endpoint answers 307 to
that URL; ``app.state.token_body`` set: it answers 200 with that body; ``app.state.token_padding``
``"spaces"`` / ``"gzip"``: it issues the token in an answer of the token JSON then 2 MB of
spaces / gzip-compressed, then 100 MB of spaces; ``"gzip, gzip"``: that gzip answer
compressed again; ``"gzip alone"``: the token JSON gzip-compressed, nothing after it),
``app.state.token_requests`` counts the token requests; while
``app.state.token_hold`` is an unset event, the token endpoint waits for it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.gateway.core_app import gzip_bomb

AGENT = "projects/demo-project/locations/europe-west3/agents/a1b2c3"
EMAIL = "gateway@demo-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
"""The ``aud`` of every service-account assertion: Google's token endpoint, whatever
``token_uri`` the key names (google-auth ``_make_authorization_grant_assertion``)."""


def google_error(code: int, status: str, message: str) -> JSONResponse:
    """A Google API error body."""
    return JSONResponse(
        {"error": {"code": code, "message": message, "status": status}}, status_code=code
    )


def agent(state: dict[str, Any], query: dict[str, Any]) -> list[dict[str, Any]] | Response:
    """The scripted agent: the responseMessages of a query, changing the session ``state``
    (``page``, ``parameters``), or an error answer."""
    text = (query.get("text") or {}).get("text")
    event = (query.get("event") or {}).get("event")
    dtmf = query.get("dtmf")
    params = state.setdefault("parameters", {})

    def say(*texts: str) -> dict[str, Any]:
        return {"text": {"text": list(texts)}, "responseType": "HANDLER_PROMPT"}

    if event == "WELCOME":
        state["page"] = "Start Page"
        return [
            say("Welcome to the pizza shop."),
            {"outputAudioText": {"ssml": "<speak>What would you <emphasis>like</emphasis>?</speak>"}},
        ]  # fmt: skip
    if event == "sys.no-input-default":
        return [say("Are you still there?")]
    if dtmf is not None:
        return [say(f"You pressed {dtmf['digits']} then {dtmf.get('finishDigit', 'nothing')}.")]
    if text == "pizza":
        state["page"] = "Order"
        params["item"] = "pizza"
        return [say("What size?")]
    if text == "large":
        if state.get("page") != "Order":
            return [say("Large what?")]
        params["size"] = "large"
        state["page"] = "Confirm"
        return [
            say("A large pizza.", "Anything else?"),
            {"payload": {"richContent": [[{"type": "chips", "options": [{"text": "drinks"}]}]]}},
            {"playAudio": {"audioUri": "https://cdn.example.com/ding.mp3"}},
            {"mixedAudio": {"segments": [{"uri": "https://cdn.example.com/jingle.wav"}, {"audio": "AAAA"}]}},
        ]  # fmt: skip
    if text == "what did I order":
        return [say(f"A {params.get('size', 'regular')} {params.get('item', 'nothing')}.")]
    if text == "agent":
        return [say("Connecting you."), {"liveAgentHandoff": {"metadata": {"reason": "asked"}}}]
    if text == "call sales":
        return [{"telephonyTransferCall": {"phoneNumber": "+15550001111"}}]
    if text == "call nobody":  # a transfer naming no number, a text after it
        return [say("Dialling."), {"telephonyTransferCall": {}}, say("Still here.")]
    if text == "bye":
        state["page"] = "End Session"
        return [say("Goodbye."), {"endInteraction": {}}]
    if text == "long":
        return [say("Here it comes."), say(*(f"line {n} " + "y" * 30 for n in range(2_000)))]
    if text == "boom":
        return google_error(500, "INTERNAL", "Internal error encountered.")
    if text == "quota":
        return google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for detectIntent.")
    if text == "garbage":
        return PlainTextResponse("<html>oops</html>", media_type="application/json")
    if text == "shape":
        return JSONResponse({"responseId": "r", "queryResult": {"responseMessages": "no"}})
    if text == "cloud storage":  # audio URIs in CX's gs:// form, no client can fetch
        return [
            say("Listen."),
            {"playAudio": {"audioUri": "gs://agent-bucket/ding.mp3"}},
            {"mixedAudio": {"segments": [{"uri": "gs://agent-bucket/a.wav"}, {"uri": "https://cdn.example.com/b.wav"}]}},
        ]  # fmt: skip
    if text == "news":  # variants newer than the connector, one twice, and known ones
        return [
            say("The news."),
            {"toolCall": {"tool": "t"}, "responseType": "HANDLER_PROMPT", "source": "VIRTUAL_AGENT"},
            {"x" * 5_000: {}},
            {"toolCall": {"tool": "u"}},
            {"conversationSuccess": {}},
        ]  # fmt: skip
    if text == "segments":  # a mixedAudio whose segments are no list
        return [{"mixedAudio": {"segments": 2}}]
    return [say("Sorry, I did not get that.")]


def make_cx_server(public_key_pem: bytes) -> FastAPI:
    """The server app; ``public_key_pem`` verifies the token requests' assertions."""
    app = FastAPI()
    app.state.requests = []
    app.state.tokens = set()
    app.state.token_requests = 0
    app.state.token_hold = None
    app.state.sessions = {}
    app.state.gap_s = 0.0
    app.state.sse = False
    app.state.slow_s = 1.5
    app.state.piece = 0
    app.state.no_final = False
    app.state.close_array = False
    app.state.token_redirect = None
    app.state.token_body = None
    app.state.token_padding = None

    @app.post("/token")
    async def token(request: Request) -> Response:
        app.state.token_requests += 1
        if app.state.token_redirect:  # a token endpoint (or a proxy) that sends it on
            return Response(status_code=307, headers={"Location": app.state.token_redirect})
        if app.state.token_body is not None:  # 200 with no OAuth token response (a proxy's)
            return Response(app.state.token_body, media_type="application/json")
        if app.state.token_hold is not None:  # a token endpoint that hangs until set
            await app.state.token_hold.wait()
        form = dict(parse_qsl((await request.body()).decode()))  # form-urlencoded
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion")),
                public_key_pem,
                algorithms=["RS256"],
                audience=GOOGLE_TOKEN_AUDIENCE,
                issuer=EMAIL,
                options={"require": ["exp", "iat", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": str(exc)}, status_code=400
            )
        if SCOPE not in str(claims.get("scope", "")).split():
            return JSONResponse({"error": "invalid_scope"}, status_code=400)
        issued = "ya29." + secrets.token_urlsafe(24)
        app.state.tokens.add(issued)
        answer = {"access_token": issued, "expires_in": 3599, "token_type": "Bearer"}
        if app.state.token_padding == "spaces":  # valid JSON, whitespace after it
            return Response(json.dumps(answer).encode() + b" " * 2_097_152, media_type="application/json")  # fmt: skip
        padding = app.state.token_padding
        if padding in ("gzip", "gzip, gzip", "gzip alone"):
            body = gzip.compress(json.dumps(answer).encode())
            if padding != "gzip alone":  # a second gzip member: 100 MB of spaces
                body += gzip_bomb()
            if padding == "gzip, gzip":  # all that compressed again
                body = gzip.compress(body)
            headers = {"Content-Encoding": padding.removesuffix(" alone")}
            return Response(body, media_type="application/json", headers=headers)
        return JSONResponse(answer)

    @app.post("/v3/projects/{project}/locations/{location}/agents/{agent_id}/sessions/{rest}")
    async def detect_intent(
        project: str, location: str, agent_id: str, rest: str, request: Request
    ) -> Response:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in app.state.tokens:
            return google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        session_id, _, method = rest.partition(":")
        if method not in ("detectIntent", "serverStreamingDetectIntent"):
            return google_error(404, "NOT_FOUND", f"Method {method} not found.")
        if not 0 < len(session_id) <= 36:
            return google_error(400, "INVALID_ARGUMENT", "Session ID must be <= 36 characters.")
        body = await request.json()
        app.state.requests.append((request.url.path, body))
        query = body.get("queryInput") or {}
        kinds = [k for k in ("text", "intent", "audio", "event", "dtmf") if k in query]
        if len(kinds) != 1 or not query.get("languageCode"):
            return google_error(400, "INVALID_ARGUMENT", "queryInput needs one input and a language.")  # fmt: skip
        language = str(query["languageCode"])
        if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", language):  # no en_US
            return google_error(400, "INVALID_ARGUMENT", f"Unsupported language code {language}.")  # fmt: skip
        if len((query.get("text") or {}).get("text") or "") > 256:
            return google_error(400, "INVALID_ARGUMENT", "Text length must not exceed 256 characters.")  # fmt: skip
        said = (query.get("text") or {}).get("text")
        if said == "leak":  # a proxy that tells all it knows in its error message
            return google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission denied on resource (Authorization: Bearer {bearer}, "
                "upstream 10.0.0.7:8443).",
            )
        if said == "bomb":  # 100 MB of spaces in about 100 KB of gzip
            return Response(
                gzip_bomb(), media_type="application/json", headers={"Content-Encoding": "gzip"}
            )
        if said == "slow":
            await asyncio.sleep(app.state.slow_s)
        if said in ("deep", "deep100"):
            sse = app.state.sse or request.query_params.get("alt") == "sse"
            return _deep(50_000 if said == "deep" else 100, method, sse)
        if said in ("digits", "nan"):
            sse = app.state.sse or request.query_params.get("alt") == "sse"
            return _raw(_holding("1" * 5_000 if said == "digits" else "NaN"), method, sse)
        if said in ("nulls", "null fields"):
            sse = app.state.sse or request.query_params.get("alt") == "sse"
            return _raw(json.dumps(_nulls(said == "nulls")), method, sse)
        if isinstance(said, str) and said.startswith("halves "):
            return StreamingResponse(_halves(int(said.split()[1])), media_type="application/json")
        path = f"projects/{project}/locations/{location}/agents/{agent_id}/sessions/{session_id}"
        state = app.state.sessions.setdefault(path, {})
        messages = agent(state, query)
        if isinstance(messages, Response):
            return messages
        if method == "detectIntent":
            return JSONResponse(_answer(state, query, messages, "FINAL"))
        if app.state.sse or request.query_params.get("alt") == "sse":
            sse = _sse(app, state, query, messages)
            return StreamingResponse(sse, media_type="text/event-stream")
        return StreamingResponse(
            _stream(app, state, query, messages), media_type="application/json"
        )

    return app


def _answer(
    state: dict[str, Any], query: dict[str, Any], messages: list[dict[str, Any]], kind: str
) -> dict[str, Any]:
    return {
        "responseId": secrets.token_hex(8),
        "queryResult": {
            **({"text": query["text"]["text"]} if "text" in query else {}),
            **({"triggerEvent": query["event"]["event"]} if "event" in query else {}),
            "languageCode": query["languageCode"],
            "parameters": dict(state.get("parameters", {})),
            "responseMessages": messages,
            "currentPage": {
                "name": f"{AGENT}/flows/00000000-0000-0000-0000-000000000000/pages/p",
                "displayName": state.get("page", "Start Page"),
            },
            "match": {"matchType": "INTENT", "confidence": 1.0},
        },
        "responseType": kind,
    }


def _nulls(all_null: bool) -> dict[str, Any]:
    """A DetectIntentResponse holding JSON ``null`` fields (see the module doc)."""
    if all_null:
        messages = None
    else:
        messages = [
            {"text": {"text": ["Hello."]}, "payload": None, "responseType": None},
            {"payload": None},
            {"endInteraction": None, "channel": None},
            {"text": None},
            {"text": {"text": None}},
            {"playAudio": {"audioUri": None}},
            {"mixedAudio": {"segments": None}},
            None,
        ]
    result = {"responseMessages": messages, "currentPage": None, "parameters": None}
    return {"responseId": "r", "queryResult": {**result, "languageCode": None}, "responseType": None}  # fmt: skip


async def _halves(count: int) -> AsyncIterator[bytes]:
    """A streamed answer (JSON array) of a PARTIAL response of ``count`` texts ``p<n>``
    and a FINAL one of ``count`` other texts ``f<n>``."""
    for kind, prefix, lead in (("PARTIAL", "p", b"["), ("FINAL", "f", b",")):
        messages = [{"text": {"text": [f"{prefix}{n}"]}} for n in range(count)]
        answer = {"queryResult": {"responseMessages": messages}, "responseType": kind}
        yield lead + json.dumps(answer).encode()
    yield b"]"


def _deep(depth: int, method: str, sse: bool) -> Response:
    """A DetectIntentResponse whose parameters nest ``depth`` levels, as ``method``
    answers it (in SSE form when ``sse``)."""
    return _raw(_holding("[" * depth + "]" * depth), method, sse)


def _holding(value: str) -> str:
    """A DetectIntentResponse (JSON text) whose parameter ``p`` is the JSON text ``value``."""
    return f'{{"queryResult":{{"responseMessages":[],"parameters":{{"p":{value}}}}}}}'


def _raw(answer: str, method: str, sse: bool) -> Response:
    """The DetectIntentResponse ``answer`` (JSON text, sent as it is) as ``method``
    answers it: the body, a one-element array, or one event when ``sse``."""
    if method == "detectIntent":
        return Response(answer, media_type="application/json")
    if sse:
        return Response(f"data: {answer}\r\n\r\n", media_type="text/event-stream")
    return Response(f"[{answer}]", media_type="application/json")


async def _stream(
    app: FastAPI, state: dict[str, Any], query: dict[str, Any], messages: list[dict[str, Any]]
) -> AsyncIterator[bytes]:
    partial = _answer(state, query, messages[:1], "PARTIAL")
    final = _answer(state, query, messages, "FINAL")
    yield b"[" + json.dumps(partial, indent=2).encode()
    if app.state.no_final:
        if app.state.close_array:
            yield b"]"
        return
    await asyncio.sleep(app.state.gap_s)
    app.state.final_at = time.monotonic()
    if not app.state.piece:
        yield b"\n,\n" + json.dumps(final, indent=2).encode()[:20]
        yield json.dumps(final, indent=2).encode()[20:] + b"\n]"
        return
    rest = b"\n,\n" + json.dumps(final, indent=2).encode() + b"\n]"
    for at in range(0, len(rest), app.state.piece):
        yield rest[at : at + app.state.piece]


async def _sse(
    app: FastAPI, state: dict[str, Any], query: dict[str, Any], messages: list[dict[str, Any]]
) -> AsyncIterator[bytes]:
    """The same responses as server-sent events (Google's ``alt=sse``)."""
    yield (
        b"data: "
        + json.dumps(_answer(state, query, messages[:1], "PARTIAL")).encode()
        + b"\r\n\r\n"
    )
    if app.state.no_final:
        return
    await asyncio.sleep(app.state.gap_s)
    app.state.final_at = time.monotonic()
    rest = b"data: " + json.dumps(_answer(state, query, messages, "FINAL")).encode() + b"\r\n\r\n"
    size = app.state.piece or len(rest)
    for at in range(0, len(rest), size):
        yield rest[at : at + size]
