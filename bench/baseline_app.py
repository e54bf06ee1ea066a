"""The baseline for gateway benchmarks: a bare FastAPI endpoint shaped like ``PUT /client``.

It reads the text body and answers one plain-text line, with no session, no
pipeline and no store, so a benchmark's ratio shows what the gateway adds.
It also answers ``POST /alexa`` with fixed JSON after reading the body. Run:
``uvicorn bench.baseline_app:app``.
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

app = FastAPI()


@app.put("/client")
async def client(request: Request) -> PlainTextResponse:
    text = (await request.body()).decode()
    answer = PlainTextResponse(f"< You said: {text}\n")
    answer.set_cookie(
        "flowstorm-session-id", request.cookies.get("flowstorm-session-id") or str(uuid.uuid4())
    )
    return answer


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


_ALEXA_ANSWER = {
    "version": "1.0",
    "response": {"outputSpeech": {"type": "SSML", "ssml": "<speak>Hello.</speak>"}},
}


@app.post("/alexa")
async def alexa(request: Request) -> JSONResponse:
    """An Alexa-shaped answer: the body read (not checked), fixed JSON back."""
    await request.body()
    return JSONResponse(_ALEXA_ANSWER)
