"""Choosing the core: GATEWAY_PIPELINE schemes, GATEWAY_PIPELINES per application key (JSON
or TOML), configuration errors at startup (also from `gateway serve`), and one gateway
serving two application keys from two different cores."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.events import Input
from gateway.pipeline import (
    CORES,
    CoreRouter,
    DemoPipeline,
    HttpPipeline,
    PipelineConfigError,
    make_pipeline,
)
from gateway.pipeline.botpress import BotpressPipeline
from gateway.pipeline.rasa import RasaPipeline
from gateway.pipeline.voiceflow import VoiceflowPipeline
from gateway.settings import Settings
from tests.conftest import free_port, gateway, serve, serve_refused
from tests.gateway.pipeline.fake_botpress import WEBHOOK_ID, make_botpress
from tests.gateway.pipeline.fake_rasa import make_rasa
from tests.gateway.pipeline.fake_voiceflow import API_KEY, make_voiceflow
from tests.gateway.turns import ctx, engine, pipeline_error, said, texts, v2_put


def settings(**overrides: Any) -> Settings:
    return Settings().model_copy(update=overrides)


def test_the_registry_names_every_core_by_a_lazy_import_string() -> None:
    assert CORES["rasa+http"] == CORES["rasa+https"] == "gateway.pipeline.rasa:RasaPipeline"
    assert CORES["voiceflow"] == "gateway.pipeline.voiceflow:VoiceflowPipeline"
    assert CORES["botpress"] == "gateway.pipeline.botpress:BotpressPipeline"
    assert CORES["dialogflow-cx"] == "gateway.pipeline.dialogflow_cx:DialogflowCxPipeline"
    assert CORES["openai+https"] == CORES["openai+http"] == "gateway.pipeline.openai:OpenAIPipeline"


async def test_each_scheme_makes_its_core() -> None:
    made = {
        "demo": DemoPipeline,
        "https://core.example.com/turn": HttpPipeline,
        "rasa+http://rasa:5005": RasaPipeline,
        "rasa+https://rasa.example.com/": RasaPipeline,
        "voiceflow:": VoiceflowPipeline,
        "voiceflow:64f0c0de": VoiceflowPipeline,
        "botpress:wh-1": BotpressPipeline,
    }
    for spec, cls in made.items():
        router = make_pipeline(settings(pipeline=spec, voiceflow_api_key=SecretStr("VF.DM.x")))
        assert isinstance(router, CoreRouter)
        assert isinstance(router.default, cls), spec
        await router.aclose()
    rasa = make_pipeline(settings(pipeline="rasa+https://rasa.example.com/"))
    assert isinstance(rasa.default, RasaPipeline)
    assert rasa.default.url == "https://rasa.example.com/webhooks/rest/webhook"
    await rasa.aclose()


@pytest.mark.parametrize(
    ("scheme", "core"),
    [
        ("RASA+http", "rasa"),
        ("Rasa+HTTP", "rasa"),
        ("VOICEFLOW", "voiceflow"),
        ("BotPress", "botpress"),
    ],
)
async def test_a_scheme_in_upper_case_names_the_same_core(
    three_cores: dict[str, tuple[str, FastAPI]], scheme: str, core: str
) -> None:
    """Schemes are case-insensitive (RFC 3986 section 3.1), and core_class reads them so:
    ``RASA+http://host:5005`` passed startup, then every turn failed (httpx: the URL's
    scheme ``rasa+http`` is no protocol it speaks). Each core answers its turns."""
    url, _ = three_cores[core]
    spec = {
        "rasa": f"{scheme}{url.removeprefix('http')}",
        "voiceflow": f"{scheme}:",
        "botpress": f"{scheme}:{WEBHOOK_ID}",
    }[core]
    conv = engine(
        pipeline=spec,
        voiceflow_api_key=SecretStr(API_KEY),
        voiceflow_runtime_url=three_cores["voiceflow"][0],
        botpress_url=three_cores["botpress"][0],
        botpress_idle_s=0.2,
    )
    assert texts(await conv.turn(ctx(), Input.of("hello")).collect()) == ["You said: hello"]
    await conv.pipeline.aclose()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"pipeline": "watson:abc"}, "GATEWAY_PIPELINE: unknown core 'watson:abc'"),
        ({"pipeline": "rasa"}, "GATEWAY_PIPELINE: unknown core 'rasa'"),
        (
            {"pipeline": "voiceflow:"},
            "GATEWAY_PIPELINE='voiceflow:': needs GATEWAY_VOICEFLOW_API_KEY",
        ),
        ({"pipeline": "botpress:"}, "GATEWAY_BOTPRESS_WEBHOOK_ID"),
        ({"pipeline": "rasa+http://"}, "GATEWAY_PIPELINE='rasa+http://': no host"),
        # the webhook path went after the query: every turn a 404 from Rasa
        ({"pipeline": "rasa+http://rasa:5005?token=s3cret"}, "GATEWAY_RASA_TOKEN"),
        ({"pipelines": '{"shop": "rasa+http://rasa:5005/#x"}'}, "takes no query or fragment"),
        ({"pipeline": "https:///turn"}, "the webhook URL has no host"),
        ({"pipelines": "{nope"}, "GATEWAY_PIPELINES is not valid JSON"),
        ({"pipelines": '{"shop": 5}'}, "GATEWAY_PIPELINES must map application keys"),
        ({"pipelines": "[]"}, "GATEWAY_PIPELINES must map application keys"),
        ({"pipelines": '["shop"'}, "GATEWAY_PIPELINES is not valid JSON"),
        ({"pipelines": '{"shop": "voiceflow:"}'}, "GATEWAY_PIPELINES['shop']='voiceflow:'"),
        ({"pipelines": '{"shop": "ftp://x"}'}, "GATEWAY_PIPELINES['shop']: unknown core"),
        ({"pipelines": "/nonexistent/cores.toml"}, "cannot read the TOML file"),
    ],
)
def test_configuration_errors_name_the_setting(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(PipelineConfigError) as raised:
        make_pipeline(settings(**overrides))
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"pipeline": "https://gw:pa55word@core.example:99999/turn?token=s3cret"},
            "GATEWAY_PIPELINE='https://***@core.example:99999/turn?token=***': the webhook URL",
        ),
        ({"pipeline": "rasa+http://rasa:5005?token=s3cret"}, "rasa:5005?token=***'"),
        (
            {"pipelines": '{"shop": "htps://gw:pa55word@core.example/?token=s3cret"}'},
            "unknown core 'htps://***@core.example/?token=***'",
        ),
        (
            {"pipeline": "openai+https://gw:pa55word@llm.example/v1?key=s3cret"},
            "'openai+https://***@llm.example/v1?key=***' is not an OpenAI-compatible server",
        ),
        (  # a password holding "@": its part after the first "@" was shown
            {"pipeline": "https://gw:p@pa55word@core.example:99999/turn"},
            "GATEWAY_PIPELINE='https://***@core.example:99999/turn': the webhook URL",
        ),
        (  # a password holding ";k=": its part before the ";" was shown as a query's
            {"pipeline": "https://gw:pa55word;k=s3cret@core.example:99999/turn"},
            "GATEWAY_PIPELINE='https://***': the webhook URL",
        ),
    ],
)
def test_configuration_errors_quote_no_credential_of_the_spec(
    overrides: dict[str, Any], words: str
) -> None:
    """A spec's URL password and query values (a webhook's ``?token=``) are not in the
    startup error, which goes to stderr and the logs: the rest of the spec is."""
    with pytest.raises(PipelineConfigError) as raised:
        make_pipeline(settings(**overrides))
    assert words in str(raised.value)
    assert "pa55word" not in str(raised.value)
    assert "s3cret" not in str(raised.value)


async def test_pipelines_from_toml_share_a_core_per_spec(tmp_path: Path) -> None:
    toml = tmp_path / "cores.toml"
    toml.write_text('shop = "rasa+http://rasa:5005"\nbar = "rasa+http://rasa:5005"\nfaq = "demo"\n')
    router = make_pipeline(settings(pipeline="rasa+http://rasa:5005", pipelines=str(toml)))
    assert router.core_for("shop") is router.core_for("bar") is router.default
    assert isinstance(router.core_for("faq"), DemoPipeline)
    assert router.core_for("other") is router.default
    assert router.name == "rasa+demo"
    await router.aclose()
    tabled = tmp_path / "tabled.toml"
    tabled.write_text('[pipelines]\nshop = "demo"\n')
    router = make_pipeline(settings(pipeline="rasa+http://rasa:5005", pipelines=str(tabled)))
    assert isinstance(router.core_for("shop"), DemoPipeline)
    await router.aclose()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GATEWAY_PIPELINE": "watson:abc"}, "GATEWAY_PIPELINE: unknown core"),
        ({"GATEWAY_PIPELINE": "voiceflow:"}, "GATEWAY_VOICEFLOW_API_KEY"),
        ({"GATEWAY_PIPELINES": '{"a": "botpress:"}'}, "GATEWAY_BOTPRESS_WEBHOOK_ID"),
        ({"GATEWAY_PIPELINE": "http://127.0.0.1:abc/turn"}, "port"),
        ({"GATEWAY_PIPELINE": "http://127.0.0.1:99999/turn"}, "port"),
        # any invalid setting: one line naming it, not pydantic's traceback (exit 1)
        ({"GATEWAY_TURN_TIMEOUT_S": "-1"}, "GATEWAY_TURN_TIMEOUT_S: Input should be greater"),
        ({"GATEWAY_ERROR_TURN": "maybe"}, "GATEWAY_ERROR_TURN: Input should be a valid boolean"),
        ({"GATEWAY_APP_KEYS": " , "}, "GATEWAY_APP_KEYS: names no key"),
        ({"GATEWAY_PUBLIC_URL": "gateway.example.com"}, "GATEWAY_PUBLIC_URL: must be an http"),
        (
            {"GATEWAY_REDIS_URL": "redis://h:notaport"},
            "GATEWAY_REDIS_URL: redis:// URL: the port is not a number",
        ),
        ({"GATEWAY_CALL_OVERRIDES": "{bad"}, "GATEWAY_CALL_OVERRIDES"),
    ],
)
def test_gateway_serve_refuses_to_start(env: dict[str, str], words: str) -> None:
    stderr = serve_refused(env)
    assert words in stderr
    assert stderr.startswith("gateway: ")


@pytest.fixture
async def three_cores() -> AsyncIterator[dict[str, tuple[str, FastAPI]]]:
    """The fake Rasa, Voiceflow runtime and Botpress Chat API, each on a free port."""
    apps = {"rasa": make_rasa(), "voiceflow": make_voiceflow(), "botpress": make_botpress()}
    async with (
        serve(apps["rasa"]) as rasa,
        serve(apps["voiceflow"]) as vf,
        serve(apps["botpress"]) as bp,
    ):
        yield {
            "rasa": (rasa, apps["rasa"]),
            "voiceflow": (vf, apps["voiceflow"]),
            "botpress": (bp, apps["botpress"]),
        }


async def test_one_gateway_serves_application_keys_from_different_cores(
    three_cores: dict[str, tuple[str, FastAPI]],
) -> None:
    (rasa, rasa_app), (vf, vf_app) = three_cores["rasa"], three_cores["voiceflow"]
    bp, _ = three_cores["botpress"]
    pipelines = {"pizza": "voiceflow:", "support": f"botpress:{WEBHOOK_ID}", "demo": "demo"}
    async with (
        gateway(
            pipeline=f"rasa+{rasa}",
            pipelines=json.dumps(pipelines),
            voiceflow_api_key=SecretStr(API_KEY),
            voiceflow_runtime_url=vf,
            botpress_url=bp,
            botpress_idle_s=0.2,
        ) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):

        async def say(key: str, text: str) -> list[str]:
            answer = await v2_put(client, key, text)
            client.cookies.clear()  # each key its own session
            return said(answer.text)

        assert await say("shop", "hello") == ["You said: hello"]  # not in the map: Rasa
        assert await say("pizza", "hello") == ["You said: hello"]
        assert await say("support", "hi there") == ["You said: hi there"]
        assert await say("demo", "my name is Ada") == ["Nice to meet you, Ada."]
    assert [r["message"] for r in rasa_app.state.requests] == ["hello"]
    assert [r["action"]["payload"] for r in vf_app.state.requests] == ["hello"]


async def test_the_engine_picks_the_core_by_the_sessions_app_key(
    three_cores: dict[str, tuple[str, FastAPI]],
) -> None:
    rasa, _ = three_cores["rasa"]
    conv = engine(pipeline="demo", pipelines=json.dumps({"app": f"rasa+{rasa}"}))
    assert texts(await conv.turn(ctx(), Input.of("#intro")).collect()) == ["Hey! How are you?"]
    await conv.pipeline.aclose()


async def test_the_log_line_of_a_failed_turn_names_its_core(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Of several cores, the one that failed is named in the turn's WARNING (its error,
    "the core could not be reached", names none); the client's Error is unchanged."""
    port = free_port()  # nothing listens there: the connection is refused
    conv = engine(pipeline="demo", pipelines=json.dumps({"app": f"http://127.0.0.1:{port}/"}))
    with caplog.at_level(logging.WARNING, logger="gateway.conversation"):
        events = await pipeline_error(conv, "the core could not be reached: ConnectError")
    assert "(core http)" not in str(events[-1])
    lines = [r.getMessage() for r in caplog.records if "pipeline failed" in r.getMessage()]
    assert len(lines) == 1
    assert "(core http): the core could not be reached: ConnectError" in lines[0]
    await conv.pipeline.aclose()
