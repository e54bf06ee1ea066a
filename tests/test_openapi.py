"""The committed OpenAPI document matches the app (regenerate with `gateway openapi`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from jsonschema import Draft202012Validator

from adapters.flowstorm.v2.protocol import CONFIG_SOURCES
from gateway.cli import main, openapi_json
from tests.conftest import ROOT, served


def test_openapi_document_is_up_to_date() -> None:
    committed = (ROOT / "openapi" / "openapi.json").read_text(encoding="utf-8")
    assert committed == openapi_json(), "openapi/openapi.json is stale: run `gateway openapi`"


def test_openapi_documents_the_pipeline_webhook_and_channels() -> None:
    document = json.loads(openapi_json())
    assert {"/client", "/healthz", "/readyz"} <= set(document["paths"])
    assert set(document["paths"]["/client"]) == {"put", "get"}
    webhook = document["webhooks"]["pipeline-turn"]["post"]
    request = webhook["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert request.endswith("/PipelineRequest")
    schemas = document["components"]["schemas"]
    assert {"sessionId", "appKey", "input", "state", "turn"} <= set(
        schemas["PipelineRequest"]["properties"]
    )
    assert {"items", "sessionEnded", "sleepTimeout", "state"} <= set(
        schemas["PipelineResponse"]["properties"]
    )


def test_every_v2_configuration_value_is_documented() -> None:
    """flowstorm-socket-v2.md "Configuration": PUT /client's parameters named every query
    parameter of the spec's table but ``timeZone``, and not ``sendResponseItems``
    (PROTOCOL-NOTES.md); each value the server reads is documented now."""
    document = json.loads(openapi_json())
    documented = {p["name"] for p in document["paths"]["/client"]["put"]["parameters"]}
    assert documented == {param for _, _, param in CONFIG_SOURCES}


BODIES: list[tuple[dict[str, Any], bool]] = [
    ({"type": "Input", "input": {"transcript": {"text": "hello"}}}, True),
    ({"type": "Input", "input": {"transcript": {"text": "#intro"}}}, True),
    ({"type": "Input", "input": {"action": "#intro"}}, True),
    ({"type": "Input", "input": {"transcript": {"text": " "}, "action": "#intro"}}, True),
    ({"type": "Input", "input": {"transcript": {"text": "hi"}, "locale": "en-US"}}, True),
    ({"type": "Input", "input": {"transcript": {"text": "hi"}, "locale": None}}, True),
    ({"type": "Input", "input": {"transcript": {"text": ""}}}, False),
    ({"type": "Input", "input": {"transcript": {"text": " \t"}}}, False),
    ({"type": "Input", "input": {}}, False),
    ({"type": "Input", "input": {"transcript": {"text": ""}, "action": " "}}, False),
    ({"type": "Input", "input": {"transcript": {"text": "hi"}, "locale": "en US!"}}, False),
    # where Python's and ECMA's regex (\\s, $) differ from each other: the server's blank
    # is str.strip()'s, and a locale with a final line feed is no language tag
    ({"type": "Input", "input": {"transcript": {"text": "\x1c\x85"}}}, False),
    ({"type": "Input", "input": {"transcript": {"text": ""}, "action": "\x1f"}}, False),
    ({"type": "Input", "input": {"transcript": {"text": "\ufeff"}}}, True),
    ({"type": "Input", "input": {"transcript": {"text": "hi"}, "locale": "en-US\n"}}, False),
]


async def test_the_documented_v2_input_rules_are_the_servers() -> None:
    """PUT /client's JSON body schema says what the server refuses with 400 beyond the
    types (a blank transcript with no action, a locale that is no language tag):
    schemathesis sends schema-valid bodies and expects them accepted (ST202), and once
    sent an empty transcript the schema allowed. Each body here is valid by the
    document exactly when the running server answers it 200 rather than 400, both for
    Python's jsonschema (``re``) and for jsonschema_rs, the validator schemathesis judges
    with (ECMA-like regex: ``\\S`` matched U+001C and U+0085, which the server calls blank,
    and ``$`` in Python matched before a final line feed)."""
    document = json.loads(openapi_json())
    schema = document["paths"]["/client"]["put"]["requestBody"]["content"]["application/json"]
    full = {**schema["schema"], "components": document["components"]}
    validator = Draft202012Validator(full)
    ecma = jsonschema_rs.validator_for(full)
    async with served() as url, httpx.AsyncClient(base_url=url) as client:
        for body, valid in BODIES:
            assert validator.is_valid(body) is valid, body
            assert ecma.is_valid(body) is valid, body
            answer = await client.put("/client?key=openapi&tts=None", json=body)
            assert answer.status_code == (200 if valid else 400), (body, answer.text)


def test_the_documented_blank_is_the_servers_in_every_regex_dialect() -> None:
    """PUT /client's "not blank" pattern takes a character ``str.strip()`` keeps (the
    server's blank: ``str.isspace``), read by Python ``re`` and by jsonschema_rs alike;
    ``\\S`` differed between them (U+001C-U+001F, U+0085, U+FEFF)."""
    document = json.loads(openapi_json())
    schema = document["paths"]["/client"]["put"]["requestBody"]["content"]["application/json"]
    input_rules = schema["schema"]["allOf"][1]["properties"]["input"]
    leaf = input_rules["anyOf"][0]["properties"]["transcript"]["properties"]["text"]
    ecma = jsonschema_rs.validator_for(leaf)
    python = Draft202012Validator(leaf)
    for code in [*range(0x3001), 0xFEFF]:
        char = chr(code)
        assert ecma.is_valid(char) is python.is_valid(char) is not char.isspace(), hex(code)


PUSH_BODIES: list[tuple[dict[str, Any], bool]] = [
    ({"target": {"sessionId": "s1"}, "items": [{"text": "hello"}]}, True),
    ({"target": {"sessionId": "s1", "appKey": "k"}, "items": [{"audio": "https://a/b.mp3"}]}, True),
    ({"target": {"appKey": "k", "deviceId": "d"}, "items": [{"text": " ", "ssml": "<s/>"}]}, True),
    ({"target": {"sessionId": "s1"}, "items": [{"text": "\ufeff"}]}, True),
    ({"target": {"sessionId": "s1"}, "items": [{}]}, False),
    ({"target": {"sessionId": "s1"}, "items": [{"text": " \t", "confidence": 1.0}]}, False),
    ({"target": {"sessionId": "s1"}, "items": [{"text": "\x1c\x85"}]}, False),
    ({"target": {"sessionId": "s1"}, "items": [{"text": "hi"}, {"code": ""}]}, False),
    ({"target": {}, "items": [{"text": "hi"}]}, False),
    ({"target": {"appKey": "k"}, "items": [{"text": "hi"}]}, False),
    ({"target": {"sessionId": None, "deviceId": "d"}, "items": [{"text": "hi"}]}, False),
]
"""POST /v1/push bodies, and whether they are valid (an unknown target: 404, not 400)."""

K256, K257 = "k" * 256, "k" * 257
"""Application keys of the longest length any channel takes (MAX_ID_CHARS), and one more."""
CALL_BODIES: list[tuple[dict[str, Any], bool]] = [
    ({"carrier": "twilio", "to": "+15550100000", "from": "+15550100001"}, True),
    ({"carrier": "twilio", "to": " tel:+15550100000 ", "from": "sip:bot@example.com"}, True),
    ({"carrier": "telnyx", "to": "SIPS:a@b", "from": "+15550100001", "appKey": "k"}, True),
    ({"carrier": "twilio", "to": "sip:" + "x" * 1020, "from": "+15550100001"}, True),
    ({"carrier": "twilio", "to": "", "from": "+15550100001"}, False),
    ({"carrier": "twilio", "to": "12345", "from": "+15550100001"}, False),
    ({"carrier": "twilio", "to": "+05550100000", "from": "+15550100001"}, False),
    ({"carrier": "twilio", "to": "sip:a b", "from": "+15550100001"}, False),
    ({"carrier": "twilio", "to": "sip:" + "x" * 1021, "from": "+15550100001"}, False),
    ({"carrier": "twilio", "to": "+15550100000", "from": "+15550100001", "appKey": ""}, False),
    ({"carrier": "telnyx", "to": "+15550100000", "from": "+15550100001", "appKey": K256}, True),
    ({"carrier": "telnyx", "to": "+15550100000", "from": "+15550100001", "appKey": K257}, False),
]
"""POST /v1/calls bodies, and whether they are valid (the carriers are not configured:
503, not 400)."""


async def test_the_documented_admin_bodies_are_the_servers() -> None:
    """POST /v1/push and POST /v1/calls: a body is valid by the OpenAPI document exactly
    when the running server does not refuse it 400, for Python's jsonschema and for
    jsonschema_rs (schemathesis' validator). The document allowed an empty pushed item,
    a target without a session or a device, and any string as a call's ``to``, ``from``
    and ``appKey`` (``""``; an ``appKey`` over 256 characters, which no channel takes, was
    placed), all of which the server refuses: a client built from the
    document (or schemathesis, ST202) sent them as valid."""
    document = json.loads(openapi_json())
    auth = {"Authorization": "Bearer admin-key-for-tests"}
    async with (
        served(admin_keys=frozenset({"admin-key-for-tests"})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for path, bodies, accepted in (
            ("/v1/push", PUSH_BODIES, 404),
            ("/v1/calls", CALL_BODIES, 503),
        ):
            body_doc = document["paths"][path]["post"]["requestBody"]["content"]
            full = {**body_doc["application/json"]["schema"], "components": document["components"]}
            validator = Draft202012Validator(full)
            ecma = jsonschema_rs.validator_for(full)
            for body, valid in bodies:
                assert validator.is_valid(body) is valid, body
                assert ecma.is_valid(body) is valid, body
                answer = await client.post(path, json=body, headers=auth)
                assert answer.status_code == (accepted if valid else 400), (body, answer.text)


def test_openapi_to_a_file_it_cannot_write_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway openapi --out`` a directory, or under a file, died with the traceback of
    pathlib's OSError (exit 1). Now one ``gateway: cannot write ...`` line, exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (tmp_path, blocker / "openapi.json"):
        assert main(["openapi", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"gateway: cannot write {out}: ")
        assert len(err.splitlines()) == 1


def test_openapi_help_names_the_file_it_writes_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README: ``gateway openapi`` writes ``openapi/openapi.json``; its ``--help`` said
    only "file, or - for stdout", so a user could not tell where the document went."""
    with pytest.raises(SystemExit) as stop:
        main(["openapi", "--help"])
    assert stop.value.code == 0
    assert "(default openapi/openapi.json)" in " ".join(capsys.readouterr().out.split())
