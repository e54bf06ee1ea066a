"""The committed OpenAPI document matches the app (regenerate with `gateway openapi`)."""

from __future__ import annotations

import json

from gateway.cli import openapi_json
from tests.conftest import ROOT


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
