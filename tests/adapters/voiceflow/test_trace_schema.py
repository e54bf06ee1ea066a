"""Every trace the Voiceflow endpoint emits passes the schemas Voiceflow publishes.

The schemas are the npm package ``@voiceflow/dtos-interact`` (zod), run by node
(``tests/js/validate-traces.js``; ``scripts/test`` installs ``tests/js`` with ``npm
ci``). A client built on that package, and Voiceflow's own UIs, which render a ``text``
trace's ``payload.slate``, see nothing of a trace that fails it (PROTOCOL-NOTES.md
"Voiceflow socket.io interact").

The package has a schema for ``text``, ``speak``, ``visual``, ``choice``, ``end``
(ExitTraceDTO), ``cardV2`` and more, but NONE for ``completion`` traces
(``config.completionEvents``) nor for custom action traces (any type the core names,
here ``open_url``): those are checked against the package's BaseTraceDTO with ``type``
any non-empty string, and the test asserts that they are the only ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from fastapi import FastAPI, Request

from tests.adapters.voiceflow.helpers import client, served
from tests.conftest import ROOT, serve

JS = ROOT / "tests" / "js"
VALIDATOR = JS / "validate-traces.js"
PACKAGE = JS / "node_modules" / "@voiceflow" / "dtos-interact"

NO_SCHEMA = "BaseTraceDTO (no schema for this type)"
"""How validate-traces.js names the check of a trace type the package has no schema for."""
WITHOUT_SCHEMA = {"completion", "open_url"}
"""Trace types the adapter emits here that @voiceflow/dtos-interact has no schema for."""

IMAGE = "https://example.org/cat.png"
JINGLE = "https://example.org/jingle.mp3"
CARD = {
    "title": "Cats",
    "imageUrl": IMAGE,
    "description": {"text": "All about cats."},
    "buttons": [{"name": "More", "request": {"type": "text", "payload": "more"}}],
}
BUTTONS = ["Yes", {"name": "No", "request": {"type": "path-no", "payload": {"label": "No"}}}]


def every_kind_core() -> FastAPI:
    """A real core webhook whose answers make every trace kind the adapter produces."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> dict[str, Any]:
        body: dict[str, Any] = await request.json()
        if body["input"]["transcript"]["text"] == "bye":
            return {"items": [{"text": "Goodbye."}], "sessionEnded": True}  # -> end
        return {
            "items": [
                {"text": "Welcome.\nPick one.", "image": IMAGE},  # text of 2 lines, visual
                {"ssml": "<speak>Or <break/> listen.</speak>"},  # text from SSML alone
                {"audio": JINGLE},  # the core's own recording: speak {type: audio}
                {"text": "#buttons", "code": json.dumps({"buttons": BUTTONS})},  # choice
                {
                    "text": "#cards",
                    "code": json.dumps({"traces": [{"type": "cardV2", "payload": CARD}]}),
                },
                {"text": "#open_url", "code": json.dumps({"url": "https://example.org"})},
                {"text": "That is all."},
            ],
            "attributes": {"noReplyTimeoutMs": 7000},  # -> no-reply {timeout: 7}
        }

    return app


def validate(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """Run tests/js/validate-traces.js on ``traces``; its report (see the script)."""
    node = shutil.which("node")
    assert node, "node (v18+) is needed to run Voiceflow's published schemas"
    assert PACKAGE.is_dir(), f"run `npm ci --prefix {JS}` first (scripts/test does)"
    done = subprocess.run(
        [node, str(VALIDATOR)],
        input=json.dumps(traces),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == 0 or not all(r["ok"] for r in report["results"])
    return report


def slate_text(payload: dict[str, Any]) -> str:
    """The plain text of a text trace's Slate document, one line per paragraph."""
    return "\n".join(
        "".join(leaf["text"] for leaf in paragraph["children"])
        for paragraph in payload["slate"]["content"]
    )


async def test_every_trace_passes_voiceflows_published_schemas() -> None:
    traces: list[dict[str, Any]] = []
    async with (
        serve(every_kind_core()) as core_url,
        served(pipeline=f"{core_url}/turn", tts_provider="espeak-ng") as url,
    ):
        for config in ({}, {"audioEvents": True}, {"completionEvents": True}):
            async with client(url) as vf:
                await vf.handshake(config=config)
                _, launched, _ = await vf.act({"type": "launch", "payload": {}})
                [choice] = [t for t in launched if t["type"] == "choice"]
                # pressing each button sends its request as the next action
                for button in choice["payload"]["buttons"]:
                    _, answered, _ = await vf.act(button["request"])
                    traces += answered
                _, ended, _ = await vf.act({"type": "text", "payload": "bye"})
                assert ended[-1]["type"] == "end"
                assert await vf.expect("session.ended") == {"reason": "end_of_diagram"}
                traces += launched + ended

    # the conversation covered every kind of trace the adapter produces
    kinds = {t["type"] for t in traces}
    assert kinds == {
        "text",
        "visual",
        "speak",
        "choice",
        "cardV2",
        "open_url",
        "completion",
        "no-reply",
        "end",
    }
    speak_types = {t["payload"]["type"] for t in traces if t["type"] == "speak"}
    assert speak_types == {"message", "audio"}
    assert {t["payload"]["state"] for t in traces if t["type"] == "completion"} == {
        "start",
        "content",
        "end",
    }
    texts = [t["payload"] for t in traces if t["type"] == "text"]
    assert {p["message"] for p in texts} >= {"Welcome.\nPick one.", "Or listen.", "Goodbye."}
    for payload in texts:  # slate beside message, saying the same
        assert slate_text(payload) == payload["message"]
        assert isinstance(payload["slate"]["id"], str)

    report = validate(traces)
    failures = [r for r in report["results"] if not r["ok"]]
    assert failures == [], failures
    assert len(report["results"]) == len(traces)
    checked = {r["type"]: r["schema"] for r in report["results"]}
    assert checked == {
        "text": "TextTraceDTO",
        "visual": "VisualTraceDTO",
        "speak": "SpeakTraceDTO",
        "choice": "ChoiceTraceDTO",
        "cardV2": "CardTraceDTO",
        "end": "ExitTraceDTO",
        "no-reply": "NoReplyTraceDTO",
        # no schema in the package for these: BaseTraceDTO's common fields only
        "completion": NO_SCHEMA,
        "open_url": NO_SCHEMA,
    }
    assert {t for t in report["schemas"]}.isdisjoint(WITHOUT_SCHEMA)


async def test_the_validator_catches_what_a_voiceflow_client_would_refuse() -> None:
    """The check is real: traces without what the package requires fail it."""
    report = validate(
        [
            {"type": "text", "payload": {"message": "no slate"}, "time": 1},  # before the fix
            {"type": "speak", "payload": {"type": "shout", "message": "x"}},
            {"type": "choice", "payload": {"buttons": [{"request": {"type": "text"}}]}},
            {"type": "visual", "payload": {"visualType": "image"}},
            {"type": "", "payload": {}},
        ]
    )
    results = report["results"]
    assert [r["ok"] for r in results] == [False] * 5
    assert results[0]["schema"] == "TextTraceDTO"
    assert results[0]["issues"][0]["path"] == ["payload", "slate"]
    assert report["package"] == "@voiceflow/dtos-interact"
