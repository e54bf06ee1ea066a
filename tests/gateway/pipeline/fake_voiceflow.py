"""Voiceflow's Dialog Manager runtime for tests: a real FastAPI app speaking the contract
of shared/specs/CORES.md ("Voiceflow Dialog Manager", (a) state interact and (b) the
interact stream) with a small pizza agent behind it.

``POST /state/user/{userID}/interact`` answers a JSON array of traces (``verbose=true``:
``{state, trace, action}``); ``POST /v2/project/{projectID}/user/{userID}/interact/stream``
answers the same traces as SSE (``event: trace``, ``id``, ``data``), then ``event: end``,
each written when the agent reaches it. Both need ``Authorization`` = :data:`API_KEY` (no
Bearer; else 401); ``config.stripSSML`` strips the tags of ``speak`` messages, as the
runtime's does (:func:`stripped`); the state endpoint reads the ``versionID`` header, the
stream endpoint the ``environment`` query parameter (``development`` when absent, as
Voiceflow's). The agent's variables are per userID.

The agent: ``launch`` -> a text (slate + message), a ``speak`` with an audio URL, a
``choice`` of two path buttons, a ``debug`` trace and ``no-reply {timeout: 7}``; the path
``path-large``/``path-small`` -> a text and a ``visual`` image; ``what size`` answers the
stored size; ``agent`` -> the custom action trace ``transfer``; ``nobody`` -> a text and
the custom action trace ``handoff`` without a target; ``bye`` -> a text and
``end``; ``voice`` -> ``speak`` traces whose messages are SSML or plain text
(:data:`VOICE`); ``recorded`` -> ``speak`` traces with a message and its recording as
``src`` (:data:`RECORDED`); ``music`` -> a text and a ``stream`` trace (an audio player step's song);
``no-reply`` -> "Still there?"; ``menu`` -> a text and the custom action trace
``open_menu`` with the plain text payload ``main``, whose path ``done`` answers "Back
from the menu."; ``news`` -> a text and traces of unknown types without paths
(``carouselV3`` twice, a 5,000-character type) and a ``debug``; ``stream`` -> one text, then waits for
``app.state.release``, then another; ``ask ai``, ``unended ai``, ``twice ai`` -> streamed
``completion`` traces (:data:`COMPLETIONS`). Failures: ``boom`` (500), ``slow`` (2 s),
``garbage`` (not JSON), ``object`` (not a list), ``cut`` (the stream ends without ``end``),
``deep`` (JSON nested 50,000 levels deep, as the body or a trace's data), ``overflow``
(a no-reply timeout of 1e308 s, which the client's parser does not expect), ``bad choice``,
``bad carousel``, ``bad card``, ``bad slate`` (a trace whose buttons, cards or slate
children are a number), ``endless``
(streaming: one line of 32 MB that never ends, see tests.gateway.core_app.endless_body).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.gateway.core_app import DEEP, endless_body

API_KEY = "VF.DM.6651f0.testkey"


def trace(kind: str, payload: Any, **more: Any) -> dict[str, Any]:
    """A trace as the runtime sends it: ``{type, payload, time, ...}``."""
    return {"type": kind, "payload": payload, "time": int(time.time() * 1000), **more}


def text(message: str) -> dict[str, Any]:
    """A ``text`` trace with its slate and message."""
    slate = {"id": "s1", "content": [{"children": [{"text": message}]}]}
    return trace("text", {"slate": slate, "message": message, "delay": 0})


SHAPES: dict[str, dict[str, Any]] = {
    "bad choice": trace("choice", {"buttons": 2}),
    "bad carousel": trace("carousel", {"layout": "Carousel", "cards": 2}),
    "bad card": trace("cardV2", {"title": "Pizza", "buttons": 2}),
    "bad slate": trace("text", {"slate": {"id": "s1", "content": [{"children": 2}]}}),
}
"""Texts answered (state interact) with a trace whose array is a number."""


SSML_TAG = re.compile(r"</?[^>]+(>|$)")
"""What Voiceflow's runtime strips from a ``speak`` message with ``config.stripSSML``
(general-runtime ``lib/services/filter``: ``sanitizeSSML``, this regex): every tag."""


def stripped(trace: Any, config: Any) -> Any:
    """``trace`` as the runtime sends it for the request's ``config``: with ``stripSSML``, a
    ``speak`` message's tags removed (``Hi<break/>there`` -> ``Hithere``)."""
    if not (isinstance(config, dict) and config.get("stripSSML")) or trace["type"] != "speak":
        return trace
    payload = trace["payload"]
    if payload.get("type") != "message":
        return trace
    return {**trace, "payload": {**payload, "message": SSML_TAG.sub("", payload["message"])}}


def make_voiceflow() -> FastAPI:
    """A fresh fake runtime (``app.state.requests``: bodies, headers and the user id)."""
    app = FastAPI()
    app.state.requests = []
    app.state.variables = {}
    app.state.release = asyncio.Event()

    def record(request: Request, user_id: str, body: dict[str, Any]) -> Response | None:
        if request.headers.get("authorization") != API_KEY:
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        app.state.requests.append(
            {**body, "_user": user_id, "_version": request.headers.get("versionid")}
        )
        return None

    @app.post("/state/user/{user_id}/interact")
    async def interact(user_id: str, request: Request) -> Response:
        body = await request.json()
        if (refused := record(request, user_id, body)) is not None:
            return refused
        said = body.get("action", body.get("request", {}))
        if said.get("payload") == "boom":
            return JSONResponse({"message": "internal"}, status_code=500)
        if said.get("payload") == "slow":
            await asyncio.sleep(2)
        if said.get("payload") == "garbage":
            return Response("[{not json", media_type="application/json")
        if said.get("payload") == "object":
            return JSONResponse({"traces": "none"})
        if said.get("payload") == "deep":
            return Response(DEEP, media_type="application/json")
        if said.get("payload") == "overflow":  # valid JSON: 1e308 s is no int of ms
            no_reply = '[{"type": "no-reply", "payload": {"timeout": 1e308}}]'
            return Response(no_reply, media_type="application/json")
        if (shape := SHAPES.get(str(said.get("payload")))) is not None:  # an array a number
            return JSONResponse([shape])
        config = body.get("config")
        traces = [stripped(t, config) for t in agent(app, user_id, said) if t != "WAIT"]
        if request.query_params.get("verbose") == "true":
            return JSONResponse({"state": {}, "trace": traces, "action": said})
        return JSONResponse(traces)

    @app.post("/v2/project/{project_id}/user/{user_id}/interact/stream")
    async def stream(project_id: str, user_id: str, request: Request) -> Response:
        body = await request.json()
        if (refused := record(request, user_id, body)) is not None:
            return refused
        app.state.requests[-1]["_project"] = project_id
        # this endpoint's environment is its query parameter (Voiceflow's API reference,
        # "Interact (stream)": default development); it takes no versionID header
        app.state.requests[-1]["_environment"] = request.query_params.get(
            "environment", "development"
        )
        said = body.get("action", {})
        if said.get("payload") == "boom":
            return JSONResponse({"message": "internal"}, status_code=500)

        if said.get("payload") == "endless":  # one line of 32 MB that never ends
            return StreamingResponse(endless_body(app, b"data: "), media_type="text/event-stream")

        async def events() -> AsyncIterator[str]:
            if said.get("payload") == "slow":
                await asyncio.sleep(2)
            n = 0
            if said.get("payload") == "deep":
                yield f"event: trace\nid: 1\ndata: {DEEP}\n\n"
            for t in agent(app, user_id, said):
                if t == "WAIT":
                    await app.state.release.wait()
                    continue
                n += 1
                t = stripped(t, body.get("config"))
                yield f"event: trace\nid: {n}\ndata: {json.dumps(t)}\n\n"
            if said.get("payload") != "cut":
                yield f"event: end\nid: {n + 1}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def agent(app: FastAPI, user_id: str, action: dict[str, Any]) -> list[Any]:
    """The traces of the agent for ``action`` (``"WAIT"`` marks a pause in a stream)."""
    variables: dict[str, Any] = app.state.variables.setdefault(user_id, {})
    kind, payload = action.get("type"), action.get("payload")
    if kind == "launch":
        return [
            text("Welcome to the pizza shop."),
            trace(
                "speak",
                {
                    "type": "message",
                    "message": "What size?",
                    "src": "https://cdn.example.com/tts/size.mp3",
                },
            ),
            trace(
                "choice",
                {
                    "buttons": [
                        {
                            "name": "Large",
                            "request": {
                                "type": "path-large",
                                "payload": {"label": "Large", "actions": []},
                            },
                        },
                        {
                            "name": "Small",
                            "request": {
                                "type": "path-small",
                                "payload": {"label": "Small", "actions": []},
                            },
                        },
                    ]
                },
            ),
            trace("debug", {"message": "matched launch"}),
            trace("no-reply", {"timeout": 7}),
        ]
    if kind in ("path-large", "path-small"):
        variables["size"] = kind.removeprefix("path-")
        return [
            text(f"A {variables['size']} pizza."),
            trace(
                "visual",
                {
                    "visualType": "image",
                    "image": "https://cdn.example.com/pizza.png",
                    "dimensions": None,
                    "canvasVisibility": "full",
                },
            ),
        ]
    if kind == "no-reply":
        return [text("Still there?")]
    if kind == "done":  # the path of the menu's custom action
        return [text("Back from the menu.")]
    if kind == "intent" and isinstance(payload, dict):  # an intent request, NLU skipped
        name = (payload.get("intent") or {}).get("name")
        entities = {e.get("name"): e.get("value") for e in payload.get("entities") or []}
        return [text(f"Intent {name} with {entities}.")]
    if kind == "event" and isinstance(payload, dict):
        return [text(f"Event {(payload.get('event') or {}).get('name')}.")]
    if kind != "text":
        return [text(f"unhandled {kind}")]
    if payload == "what size":
        return [text(f"You ordered a {variables.get('size', 'no')} pizza.")]
    if payload == "agent":
        target = json.dumps({"target": "sip:agent@example.com", "reason": "human"})
        return [
            text("Transferring."),
            trace("transfer", target, paths=[{"event": {"type": "done"}}], defaultPath=0),
        ]
    if payload == "nobody":  # a handoff custom action that names no target
        return [
            text("Transferring."),
            trace("handoff", '{"reason": "human"}', paths=[{"event": {"type": "done"}}]),
        ]
    if payload == "menu":  # a custom action whose payload is plain text, not JSON
        return [
            text("Opening the menu."),
            trace("open_menu", "main", paths=[{"event": {"type": "done"}}], defaultPath=0),
        ]
    if payload == "music":  # an audio player step: Voiceflow's ``stream`` trace
        song = {"src": "https://cdn.example.com/song.mp3", "action": "PLAY", "token": "t1"}
        return [text("Here is a song."), trace("stream", {**song, "loop": False})]
    if payload == "bye":
        return [text("Goodbye."), trace("end", None)]
    if payload == "voice":  # a voice agent's speak steps: SSML in the message, or plain text
        return [trace("speak", {"type": "message", "message": m}) for m in VOICE]
    if payload == "recorded":  # speak steps with Voiceflow's TTS of their message as src
        return [trace("speak", {"type": "message", "message": m, "src": s}) for m, s in RECORDED]
    if payload == "news":  # traces of types the connector does not know, no paths
        kinds = ["carouselV3", "x" * 5_000, "carouselV3", "debug"]
        return [text("The news."), *(trace(k, {"data": 1}) for k in kinds)]
    if payload == "stream":
        return [text("first"), "WAIT", text("second")]
    if payload in COMPLETIONS:
        parts = [
            {"state": state, **({"content": c} if c else {})} for state, c in COMPLETIONS[payload]
        ]
        return [trace("completion", part) for part in parts]
    return [text(f"You said: {payload}")]


VOICE: list[str] = [
    '<voice name="Joanna">Hello <emphasis level="strong">there</emphasis></voice>',
    'Hi<break time="500ms"/>again',
    "<speak>Tom & Jerry<break/>are here.</speak>",
    "5 < 6 & 7 > 2",
    "I <3 pizza & <b>pasta</b>",
    '<audio src="https://cdn.example.com/chime.mp3"/>',
]
"""The ``message`` of each ``speak`` trace answered to ``voice`` (a voice agent's, as the
runtime sends them): SSML in a voice, a pause between two words, a document written by hand
(a bare ``&``), plain text with ``<``, ``&`` and ``>`` or HTML tags, a sound alone."""


RECORDED: list[tuple[str, str]] = [
    ("Your pizza is ready.", "https://cdn.example.com/tts/ready.mp3"),
    ('<voice name="Joanna">Enjoy <emphasis>your meal</emphasis>.</voice>',
     "https://cdn.example.com/tts/enjoy.mp3"),
    ("Anything else?", "data:audio/mpeg;base64,SUQzBAAAAAAAI1RTU0U="),
    ("See you.", "http://cdn.example.com/tts/see-you.mp3"),
]  # fmt: skip
"""The ``message`` and ``src`` of each ``speak`` trace answered to ``recorded``: a voice
agent's messages with the recording of their words (Voiceflow's TTS, ``config.tts``): plain
text and SSML with an https ``src``, then a ``data:`` one (what the runtime's own TTS
gives) and an ``http:`` one (which the voice assistants do not play)."""


COMPLETIONS: dict[str, list[tuple[str, str | None]]] = {
    "ask ai": [("start", None), ("content", "The large "), ("content", "one."), ("end", None)],
    "unended ai": [("start", None), ("content", "The large "), ("content", "pizza is best.")],
    "twice ai": [
        ("start", None),
        ("content", "First."),
        ("start", None),
        ("content", "Second."),
        ("end", None),
    ],
}
"""Texts answered with streamed ``completion`` traces (``state``, ``content``): one whole
(``ask ai``), one whose ``end`` never comes (the traces, or the stream, end first) and
one followed by another ``start`` before its end (``twice ai``)."""
