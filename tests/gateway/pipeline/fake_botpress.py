"""Botpress Cloud's Chat API for tests: a real FastAPI app speaking the contract of
shared/specs/CORES.md ("Botpress Chat API") with a small bot behind it.

Under ``/{webhookId}`` (:data:`WEBHOOK_ID`; another id is 404): ``POST /users`` -> 201
``{user, key}``; ``POST /users/get-or-create`` with ``x-user-key`` the HS256 JWT of
``{"id"}`` signed with ``app.state.encryption_key`` (manual mode); ``POST /conversations``
-> 201 ``{conversation}``; ``POST /conversations/get-or-create {id}`` -> 201
``{conversation}``, the one of that id (403 when another user owns it) or a new one; ``GET /conversations/{id}/listen`` -> SSE whose ``data`` is a
JSON ``{type, data}`` signal (403 for a user not the conversation's; ``init`` first, then ``message_created`` with ``isBot`` and
``event_created``, for the user's own messages and events too); ``POST /messages`` and
``POST /events`` -> 201 ``{message}`` / ``{event}``. Every call but ``POST /users`` needs
a known ``x-user-key`` (else 401). The bot answers after the 201, message by message
(:data:`GAP_S` apart), with no end-of-turn marker; its memory is per conversation.

The bot: the event ``intro`` -> a text and a ``choice``; the option ``yes``; ``my name is
X`` / ``what is my name`` (``my name is X...``: the name is remembered at once, the answer
comes after 2 s); ``rich`` -> a card, an image, an audio, a markdown and a bloc
(its items flat, ``{type, text}``, as the Chat API sends them); ``bloc`` -> a bloc of a
text, an image, a location (flat) and a markdown (``{type, payload}``, a bot SDK's form);
``empty choice`` / ``empty dropdown`` -> a choice (dropdown) with no options, then a text;
``agent`` -> a text and the event ``{type: "transfer", target, reason}``; ``nobody`` -> a
text and the event ``{type: "handoff", reason}`` (no target); ``bye`` -> a text
and the event ``{type: "end"}``; ``news`` -> a text amid bot events of other types
(``typing`` twice, a 5,000-character type, none); another event -> nothing. Failures: ``boom`` (500 on the
message), ``slow`` (answers after 2 s), ``garbage`` (a signal that is not JSON), ``deep``
(a signal nested 50,000 levels deep), ``weird`` (a message without a payload type), ``stranger`` (a bot message whose
``conversationId`` is another conversation's, on this conversation's stream), ``bad options`` / ``bad carousel`` /
``bad bloc`` / ``bad card`` (a choice's options, a carousel's or bloc's items, a card's
actions that are a number),
``hangup`` (the listen stream closes without a word), ``chatty`` (a participant signal
every 0.2 s for 3 s, then ``state.chatter_done`` set, and no answer), ``endless`` (the listen stream goes
on with one line of 32 MB that never ends, see tests.gateway.core_app.endless_body);
``take your time`` (the listen stream's keepalive, ``data: ping``, then a text);
``crash`` (the listen stream's connection dropped without the end of its body);
``state.listen_refusal`` set (a status): listen answers it, with a message quoting the
request's ``x-user-key`` (as a careless proxy might); ``state.user_key`` set: the key
``POST /users`` answers (a broken server's or proxy's, that no header can carry);
``state.conversation_refusal`` set (a status): ``POST /conversations`` answers it;
``state.unknown_key_status`` (401 unless set): the status of a call with a key the
Chat API does not know (a user deleted: 404 or 403 on some deployments);
``state.webhook_gone`` set: every call is answered 404 ``webhook not found``, as one under
a wrong webhook id (the integration deleted, or the id changed).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.gateway.core_app import DEEP, endless_body

WEBHOOK_ID = "wh-5c1d2e"
GAP_S = 0.05
"""Time between two messages of the bot (s)."""


ENDLESS = "<endless>"
"""Published to the listen streams: the stream goes on with an endless line."""

CRASH = "<crash>"
"""Published to the listen streams: the connection is dropped, the body not ended."""

KEEPALIVE = "<keepalive>"
"""Published to the listen streams: the keepalive the Chat integration's stream proxy
sends after 30 s without a signal, ``event: message`` / ``data: ping``."""


def make_botpress() -> FastAPI:
    """A fresh fake Chat API (``app.state.calls``: (method, path, body) received)."""
    app = FastAPI()
    state = app.state
    state.calls = []
    state.users = {}  # key -> user id
    state.conversations = {}  # id -> {"memory": {}, "listeners": [queues]}
    state.encryption_key = None
    state.tasks = set()
    state.listen_refusal = None
    state.user_key = None  # set: the key POST /users answers (a broken server or proxy)
    state.conversation_refusal = None  # set: the status POST /conversations answers
    state.unknown_key_status = 401  # the status of a call with a key no user has
    state.webhook_gone = False  # set: every call is 404, as for a wrong webhook id
    state.hold = None  # an asyncio.Event: the bot says its second message on only once set

    def user_of(request: Request) -> str | None:
        key = request.headers.get("x-user-key", "")
        if key in state.users:
            return str(state.users[key])
        if state.encryption_key and key:
            try:
                claims = jwt.decode(key, state.encryption_key, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                return None
            return str(claims["id"])
        return None

    async def call(request: Request, webhook_id: str) -> tuple[dict[str, Any], str | None]:
        body = await request.json() if await request.body() else {}
        state.calls.append((request.method, request.url.path.split(webhook_id, 1)[1], body))
        return body, user_of(request)

    def refuse(webhook_id: str, user: str | None) -> Response | None:
        if webhook_id != WEBHOOK_ID or state.webhook_gone:
            return JSONResponse({"message": "webhook not found"}, status_code=404)
        if user is None:
            status = state.unknown_key_status
            return JSONResponse({"message": "Unauthorized: x-user-key"}, status_code=status)
        return None

    def publish(conversation_id: str, kind: str, data: Any) -> None:
        for queue in state.conversations[conversation_id]["listeners"]:
            queue.put_nowait(data if kind == "raw" else json.dumps({"type": kind, "data": data}))

    def record(conversation_id: str, user: str | None, payload: Any) -> dict[str, Any]:
        """A message or event record of ``user`` (no ``isBot``)."""
        return {
            "id": uuid.uuid4().hex,
            "createdAt": "2026-01-01T00:00:00Z",
            "payload": payload,
            "userId": user,
            "conversationId": conversation_id,
        }

    def bot_message(conversation_id: str, payload: dict[str, Any]) -> None:
        message = {**record(conversation_id, "bot", payload), "isBot": True}
        publish(conversation_id, "message_created", message)

    def bot_event(conversation_id: str, payload: dict[str, Any]) -> None:
        publish(conversation_id, "event_created", record(conversation_id, "bot", payload))

    async def bot(conversation_id: str, said: str | None, event: str | None) -> None:
        memory = state.conversations[conversation_id]["memory"]
        replies: list[tuple[str, Any]] = []
        if event == "intro":
            replies = [
                ("text", "Hi, I am the Botpress bot."),
                (
                    "choice",
                    {
                        "text": "Shall we start?",
                        "options": [
                            {"label": "Yes please", "value": "yes"},
                            {"label": "No", "value": "no"},
                        ],
                    },
                ),
            ]
        elif event is not None:
            return
        elif said == "yes":
            replies = [("text", "Let us start.")]
        elif said and said.lower().startswith("my name is "):
            memory["name"] = said[11:].strip(" .").title()
            if said.endswith("..."):
                await asyncio.sleep(2)
            replies = [("text", f"Hello {memory['name']}.")]
        elif said == "what is my name":
            replies = [("text", f"You are {memory.get('name', 'unknown')}.")]
        elif said == "rich":
            replies = [
                (
                    "card",
                    {
                        "title": "Pizza",
                        "subtitle": "Margherita",
                        "imageUrl": "https://cdn.example.com/p.png",
                        "actions": [
                            {"action": "postback", "label": "Order", "value": "order"},
                            {"action": "url", "label": "Menu", "value": "https://example.com/menu"},
                        ],
                    },
                ),
                ("image", {"imageUrl": "https://cdn.example.com/i.png"}),
                ("audio", {"audioUrl": "https://cdn.example.com/a.mp3"}),
                ("markdown", {"markdown": "**bold**"}),
                ("bloc", {"items": [{"type": "text", "text": "in a bloc"}]}),
            ]
        elif said == "bloc":  # the Chat API's flat items, then one in a bot SDK's form
            items = [
                {"type": "text", "text": "Our shop:"},
                {"type": "image", "imageUrl": "https://cdn.example.com/shop.png"},
                {"type": "location", "latitude": 50.08, "longitude": 14.42, "title": "Shop"},
                {"type": "markdown", "payload": {"markdown": "*Open* daily"}},
            ]
            replies = [("bloc", {"items": items})]
        elif said in ("empty choice", "empty dropdown"):
            replies = [
                (said.split()[1], {"text": "Pick one:", "options": []}),
                ("text", "Or just say it."),
            ]
        elif said == "agent":
            replies = [
                ("text", "One moment."),
                ("event", {"type": "transfer", "target": "+15550001111", "reason": "billing"}),
            ]
        elif said == "nobody":  # a handoff that names no target
            replies = [("text", "One moment."), ("event", {"type": "handoff", "reason": "billing"})]
        elif said == "bye":
            replies = [("text", "Bye now."), ("event", {"type": "end"})]
        elif said == "news":  # bot events the connector does not know, one twice
            replies = [
                ("event", {"type": "typing"}),
                ("text", "The news."),
                ("event", {"type": "x" * 5_000}),
                ("event", {"type": "typing"}),
                ("event", {"kind": "no type"}),
            ]
        elif said == "slow":
            await asyncio.sleep(2)
            replies = [("text", "late")]
        elif said == "garbage":
            publish(conversation_id, "raw", "{not json")
            return
        elif said == "deep":
            publish(conversation_id, "raw", DEEP)
            return
        elif said == "bad options":
            replies = [("choice", {"text": "Pick one:", "options": 5})]
        elif said == "bad carousel":
            replies = [("carousel", {"items": 5})]
        elif said == "bad bloc":
            replies = [("bloc", {"items": 5})]
        elif said == "bad card":
            replies = [("card", {"title": "Pizza", "actions": 5})]
        elif said == "weird":
            replies = [("weird", {"text": "no type"})]
        elif said == "stranger":  # a bot message of another conversation on this stream
            message = {**record("conv-other", "bot", {"type": "text", "text": "Your PIN?"})}
            publish(conversation_id, "message_created", {**message, "isBot": True})
            return
        elif said == "hangup":
            publish(conversation_id, "raw", None)
            return
        elif said == "endless":
            publish(conversation_id, "raw", ENDLESS)
            return
        elif said == "crash":
            publish(conversation_id, "raw", CRASH)
            return
        elif said == "take your time":  # the stream's keepalive comes before the answer
            await asyncio.sleep(GAP_S)
            publish(conversation_id, "raw", KEEPALIVE)
            replies = [("text", "Done thinking.")]
        elif said == "chatty":  # signals the answer is not made of, for 3 s, and no answer
            state.chatter_done = asyncio.Event()
            for _ in range(15):
                await asyncio.sleep(0.2)
                publish(conversation_id, "participant_added", {"userId": "someone"})
            state.chatter_done.set()
            return
        else:
            replies = [("text", f"You said: {said}")]
        for i, (kind, value) in enumerate(replies):
            if i == 1 and state.hold is not None:
                await state.hold.wait()
            await asyncio.sleep(GAP_S)
            if kind == "event":
                bot_event(conversation_id, value)
            elif kind == "text":
                bot_message(conversation_id, {"type": "text", "text": value})
            elif kind == "weird":
                bot_message(conversation_id, value)
            else:
                bot_message(conversation_id, {"type": kind, **value})

    def later(coro: Any) -> None:
        task = asyncio.create_task(coro)
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    @app.post("/{webhook_id}/users")
    async def create_user(webhook_id: str, request: Request) -> Response:
        body, _ = await call(request, webhook_id)
        if webhook_id != WEBHOOK_ID or state.webhook_gone:
            return JSONResponse({"message": "webhook not found"}, status_code=404)
        user_id, key = body.get("id") or f"user-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        key = state.user_key if state.user_key is not None else key
        state.users[key] = user_id
        return JSONResponse({"user": {"id": user_id}, "key": key}, status_code=201)

    @app.post("/{webhook_id}/users/get-or-create")
    async def get_or_create_user(webhook_id: str, request: Request) -> Response:
        _, user = await call(request, webhook_id)
        if (refused := refuse(webhook_id, user)) is not None:
            return refused
        return JSONResponse({"user": {"id": user}}, status_code=201)

    @app.post("/{webhook_id}/conversations")
    async def create_conversation(webhook_id: str, request: Request) -> Response:
        body, user = await call(request, webhook_id)
        if (refused := refuse(webhook_id, user)) is not None:
            return refused
        if state.conversation_refusal:
            message = {"message": "conversations are down"}
            return JSONResponse(message, status_code=state.conversation_refusal)
        conversation_id = body.get("id") or f"conv-{uuid.uuid4().hex[:8]}"
        return made(conversation_id, user)

    @app.post("/{webhook_id}/conversations/get-or-create")
    async def get_or_create_conversation(webhook_id: str, request: Request) -> Response:
        body, user = await call(request, webhook_id)
        if (refused := refuse(webhook_id, user)) is not None:
            return refused
        conversation_id = body.get("id")
        if not isinstance(conversation_id, str) or not conversation_id:
            return JSONResponse({"message": "id is required"}, status_code=400)
        known = state.conversations.get(conversation_id)
        if known is not None and known["owner"] != user:
            return JSONResponse({"message": "You are not the owner"}, status_code=403)
        return made(conversation_id, user, known is None)

    def made(conversation_id: str, user: str | None, new: bool = True) -> Response:
        if new:
            state.conversations[conversation_id] = {"memory": {}, "listeners": [], "owner": user}
        conversation = {
            "id": conversation_id,
            "createdAt": "2026-01-01T00:00:00Z",
            "updatedAt": "2026-01-01T00:00:00Z",
        }
        return JSONResponse({"conversation": conversation}, status_code=201)

    @app.get("/{webhook_id}/conversations/{conversation_id}/listen")
    async def listen(webhook_id: str, conversation_id: str, request: Request) -> Response:
        _, user = await call(request, webhook_id)
        if (refused := refuse(webhook_id, user)) is not None:
            return refused
        if conversation_id not in state.conversations:
            return JSONResponse({"message": "conversation not found"}, status_code=404)
        if state.conversations[conversation_id]["owner"] != user:
            return JSONResponse({"message": "not a participant"}, status_code=403)
        if state.listen_refusal:
            key = request.headers.get("x-user-key")
            message = f"listen is down for maintenance (x-user-key {key})"
            return JSONResponse({"message": message}, status_code=state.listen_refusal)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        listeners = state.conversations[conversation_id]["listeners"]
        listeners.append(queue)

        async def signals() -> AsyncIterator[str | bytes]:  # StreamingResponse takes either
            try:
                yield f"data: {json.dumps({'type': 'init', 'data': {}})}\n\n"
                yield ": keepalive\n\n"  # an SSE comment, as proxies and the API send
                while (data := await queue.get()) is not None:
                    if data == CRASH:
                        raise RuntimeError("the Chat API crashed")
                    if data == KEEPALIVE:
                        yield "event: message\ndata: ping\n\n"
                        continue
                    if data == ENDLESS:  # a line of 32 MB that never ends
                        async for chunk in endless_body(app, b"data: "):
                            yield chunk
                        return
                    yield f"data: {data}\n\n"
            finally:
                listeners.remove(queue)

        return StreamingResponse(signals(), media_type="text/event-stream")

    async def incoming(webhook_id: str, request: Request, kind: str) -> Response:
        """``POST /messages`` (``kind`` "message") or ``POST /events`` ("event"): published
        on the listen streams, then the bot answers it."""
        body, user = await call(request, webhook_id)
        if (refused := refuse(webhook_id, user)) is not None:
            return refused
        conversation_id, payload = body.get("conversationId"), body.get("payload") or {}
        if not isinstance(conversation_id, str) or conversation_id not in state.conversations:
            return JSONResponse({"message": "conversation not found"}, status_code=404)
        if kind == "message" and payload.get("text") == "boom":
            return JSONResponse({"message": "internal error"}, status_code=500)
        made = record(conversation_id, user, payload)
        if kind == "message":
            publish(conversation_id, "message_created", {**made, "isBot": False})
            later(bot(conversation_id, payload.get("text"), None))
        else:
            publish(conversation_id, "event_created", made)
            later(bot(conversation_id, None, str(payload.get("type"))))
        return JSONResponse({kind: made}, status_code=201)

    @app.post("/{webhook_id}/messages")
    async def create_message(webhook_id: str, request: Request) -> Response:
        return await incoming(webhook_id, request, "message")

    @app.post("/{webhook_id}/events")
    async def create_event(webhook_id: str, request: Request) -> Response:
        return await incoming(webhook_id, request, "event")

    return app
