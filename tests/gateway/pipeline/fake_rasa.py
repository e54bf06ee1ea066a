"""A Rasa server's REST channel for tests: a real FastAPI app speaking the contract of
shared/specs/CORES.md ("Rasa REST channel") with a small bot behind it.

As Rasa's ``rest.py``/``CollectingOutputChannel``: ``GET /webhooks/rest/`` is
``{"status": "ok"}``; ``POST /webhooks/rest/webhook`` answers a JSON array of
``{"recipient_id", "text"?, "image"?, "buttons"?, "custom"?}`` (None values left out,
text split on blank lines, buttons on the text's message, then custom, then image, then
each of ``elements`` as ``title : subtitle`` with its ``buttons``, ``[]`` when it has none);
with ``?stream=true`` the same messages as NDJSON lines under the content type
``text/event-stream`` with no ``data:`` prefix, each written as the bot utters it.
The tracker (slots) is per ``sender``. ``app.state.token`` set: ``?token=`` required.

The bot: ``/greet`` greets with two buttons; ``/mood_great``; ``my name is X`` and
``what is my name`` (a slot); ``picture`` (text + image); ``agent`` (a custom transfer);
``nobody`` (a text, a custom transfer without a target, a text);
``files`` (one ``attachment`` message each of :data:`ATTACHMENTS`);
``carousel`` (two elements, the second without buttons); ``bye`` (two texts then
``custom {"end_session": true}``); ``farewell`` (``custom {"end_session": true, "text":
"Bye"}``, no ``ssml``); ``spoken`` (a text, then ``custom {"ssml", "text"}``);
``badssml`` (a text, then ``custom {"ssml"}`` whose ``text`` is a number: malformed); ``nullbuttons`` (a text with two
buttons, one whose ``payload`` is null, one whose ``title`` is: Rasa leaves out only the
message's own null fields); ``stream`` (one message, then
waits for ``app.state.release`` before the next); failures: ``boom`` (500), ``leak`` (403, its body the
query's token then 5,000 characters), ``slow``
(2 s), ``garbage`` (not JSON), ``object`` (not an array), ``badline`` (a broken NDJSON line),
``unended`` (streamed: two lines, the last without its line end),
``stranger`` (a message, then one whose ``recipient_id`` is another sender's),
``deep`` (JSON nested 50,000 levels deep, as the body or as a line), ``crash`` (streamed:
one line, then the connection is dropped without the end of the body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.gateway.core_app import DEEP

ATTACHMENTS: list[Any] = [
    "https://cdn.example.com/song.MP3",
    "https://cdn.example.com/cat.png?name=x.pdf",
    "https://cdn.example.com/clip.mp4",
    "https://cdn.example.com/menu.pdf",
    "https://cdn.example.com/stream",
    "ftp://cdn.example.com/song.mp3",
    "http://[::1/song.mp3",
    {"payload": {"src": "https://cdn.example.com/dog.jpg"}},
    {"payload": {"url": "https://cdn.example.com/voice.ogg"}},
    {"type": "audio", "payload": {"url": "https://cdn.example.com/voice"}},
]
"""The attachments the bot sends for ``files``: bare URLs (media of each kind by their
extension, a document, none, not http(s), a malformed host), untyped and typed payloads."""


def make_rasa() -> FastAPI:
    """A fresh fake Rasa app (``app.state.requests``: the bodies and queries received)."""
    app = FastAPI()
    app.state.requests = []
    app.state.slots = {}
    app.state.token = None
    app.state.release = asyncio.Event()

    @app.get("/webhooks/rest/")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/rest/webhook")
    async def webhook(request: Request) -> Response:
        if app.state.token and request.query_params.get("token") != app.state.token:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.json()
        peer = request.client.port if request.client else None
        app.state.requests.append({**body, "_query": dict(request.query_params), "_peer": peer})
        sender, text = body["sender"], body.get("message", "")
        if text == "boom":
            return JSONResponse({"error": "internal"}, status_code=500)
        if text == "leak":  # a proxy telling all: the token, and a long dump
            token = request.query_params.get("token")
            return PlainTextResponse(f"denied token={token}\n" + "x" * 5000, 403)
        if text == "slow":
            await asyncio.sleep(2)
        if text == "garbage":
            return Response("<html>oops</html>", media_type="application/json")
        if text == "object":
            return JSONResponse({"text": "not an array"})
        stream = request.query_params.get("stream", "").lower() == "true"
        if text == "deep":
            return Response(DEEP + "\n", media_type="text/event-stream" if stream else None)
        line = json.dumps({"recipient_id": sender, "text": "ok"})
        if stream and text == "unended":  # cut just before the last line's end
            last = json.dumps({"recipient_id": sender, "text": "and"})
            return Response(f"{line}\n{last}", media_type="text/event-stream")
        if stream and text == "badline":
            return Response(f"{line}\n{{broken\n", media_type="text/event-stream")
        if text == "stranger":  # a message for another user (a proxy mixing answers up)
            stranger = {"recipient_id": "other:user", "text": "Your balance is 12 dollars."}
            if stream:
                return Response(f"{line}\n{json.dumps(stranger)}\n", media_type="text/event-stream")
            return JSONResponse([{"recipient_id": sender, "text": "ok"}, stranger])
        utterances = bot(app, sender, text)
        if not stream:
            return JSONResponse([m for u in utterances for m in messages(sender, u)])

        async def lines() -> AsyncIterator[str]:
            if text == "crash":  # the server dies in the middle of its answer
                yield json.dumps({"recipient_id": sender, "text": "Let me"}) + "\n"
                raise RuntimeError("the bot server crashed")
            for utterance in utterances:
                if utterance == "WAIT":
                    await app.state.release.wait()
                    continue
                for message in messages(sender, utterance):
                    yield json.dumps(message) + "\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    return app


def bot(app: FastAPI, sender: str, text: str) -> list[Any]:
    """What the bot utters for ``text`` (dicts as Rasa's ``dispatcher.utter_message``)."""
    slots: dict[str, Any] = app.state.slots.setdefault(sender, {})
    lowered = text.lower()
    if text == "/greet":
        return [
            {
                "text": "Hey! How are you?",
                "buttons": [
                    {"title": "great", "payload": "/mood_great"},
                    {"title": "sad", "payload": "/mood_unhappy"},
                ],
            }
        ]
    if text == "/mood_great":
        return [{"text": "Great, carry on!"}]
    if lowered.startswith("my name is "):
        slots["name"] = text[11:].strip().title()
        return [{"text": f"Nice to meet you, {slots['name']}."}]
    if lowered == "what is my name":
        return [{"text": f"You are {slots.get('name', 'a stranger')}."}]
    if lowered == "picture":
        return [{"text": "Here is a cat.", "image": "https://example.com/cat.png"}]
    if lowered == "agent":
        return [
            {"text": "Connecting you."},
            {"custom": {"transfer": {"target": "+15551234567", "reason": "asked for a person"}}},
        ]
    if lowered == "nobody":  # a transfer that names no target, a text after it
        return [
            {"text": "Connecting you."},
            {"custom": {"transfer": {"reason": "asked for a person"}}},
            {"text": "Please hold on."},
        ]
    if lowered == "files":  # dispatcher.utter_message(attachment=...), one each
        return [{"attachment": a} for a in ATTACHMENTS]
    if lowered == "carousel":
        return [
            {
                "elements": [
                    {
                        "title": "Margherita",
                        "subtitle": "tomato",
                        "buttons": [{"title": "Order", "payload": "/order"}],
                    },
                    {"title": "Funghi", "subtitle": "mushrooms"},
                ]
            }
        ]
    if lowered == "bye":
        return [{"text": "Bye!\n\nSee you soon."}, {"custom": {"end_session": True}}]
    if lowered == "farewell":
        return [{"custom": {"end_session": True, "text": "Bye"}}]
    if lowered == "spoken":
        return [{"text": "Listen."}, {"custom": {"ssml": "<speak>Hi!</speak>", "text": "Hi!"}}]
    if lowered == "badssml":
        return [{"text": "Listen."}, {"custom": {"ssml": "<speak>Hi!</speak>", "text": 5}}]
    if lowered == "stream":
        return [{"text": "first"}, "WAIT", {"text": "second"}]
    if lowered == "nullbuttons":  # buttons' fields null (a domain's empty `payload:`)
        return [
            {
                "text": "Pick one.",
                "buttons": [{"title": "Yes", "payload": None}, {"title": None, "payload": "/no"}],
            }
        ]
    if text.startswith("/"):
        return [{"text": f"intent {text[1:]}"}]
    return [{"text": f"You said: {text}"}]


def messages(sender: str, utterance: dict[str, Any]) -> list[dict[str, Any]]:
    """The REST channel's messages of one utterance (CollectingOutputChannel)."""
    out: list[dict[str, Any]] = []
    text = utterance.get("text")
    if utterance.get("buttons"):
        out.append({"recipient_id": sender, "text": text, "buttons": utterance["buttons"]})
    elif text:
        out.extend({"recipient_id": sender, "text": part} for part in text.split("\n\n"))
    if "custom" in utterance:
        out.append({"recipient_id": sender, "custom": utterance["custom"]})
    if "image" in utterance:
        out.append({"recipient_id": sender, "image": utterance["image"]})
    if "attachment" in utterance:
        out.append({"recipient_id": sender, "attachment": utterance["attachment"]})
    for element in utterance.get("elements", []):  # OutputChannel.send_elements
        text = f"{element.get('title', '')} : {element.get('subtitle', '')}"
        buttons = element.get("buttons", [])
        out.append({"recipient_id": sender, "text": text, "buttons": buttons})
    return [{k: v for k, v in m.items() if v is not None} for m in out]
