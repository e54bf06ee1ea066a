"""What the gateway logs at startup (gateway/startup.py).

``gateway serve`` with no settings at all (the README's first command) printed nine
WARNING lines: six channels that were merely not configured (Alexa, Dialogflow, Google,
Vonage, Plivo, Exotel), the random per-process secret key twice (gateway.secrets and
Voiceflow), and Twilio's unsigned requests. A channel none of whose settings are given
is how the gateway ships: the channels not configured (Telnyx too, silent before) are
one INFO line, each refused request to them a WARNING (bounded:
gateway.ratelimit.RefusalLog), so whoever forgot a setting learns it from the first
request. What stays a WARNING: the per-process key (once), Twilio accepting unsigned
requests, verification turned off, a channel with some of its credentials but not enough.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from pydantic import SecretStr

from adapters.voiceflow.routes import VoiceflowServer
from gateway.cli import MAX_UNKNOWN_NAMED, unknown_settings_warning
from gateway.deps import Gateway
from gateway.secrets import SecretKeys
from gateway.settings import OTHER_VARIABLES, Settings, unknown_settings
from gateway.startup import Unconfigured, summary
from tests.adapters.carriers import upgrade_status
from tests.adapters.telnyx.harness import PUBLIC_KEY as TELNYX_PUBLIC_KEY
from tests.conftest import GatewayProcess, served

UNCONFIGURED = {
    "alexa": ("/alexa", 503, "GATEWAY_ALEXA_SKILL_IDS"),
    "dialogflow": ("/dialogflow", 503, "GATEWAY_DIALOGFLOW_AUTH"),
    "google": ("/google", 503, "GATEWAY_GOOGLE_PROJECT_IDS"),
    "telnyx": ("/telnyx/texml", 403, "GATEWAY_TELNYX_PUBLIC_KEY"),
    "vonage": ("/vonage/answer", 403, "GATEWAY_VONAGE_SIGNATURE_SECRET"),
    "plivo": ("/plivo/answer", 403, "GATEWAY_PLIVO_AUTH_TOKEN"),
    "exotel": ("/exotel/stream", 403, "GATEWAY_EXOTEL_API_KEY and GATEWAY_EXOTEL_API_TOKEN"),
}
"""Every channel the embedded defaults leave unconfigured: its endpoint, what it answers,
the setting(s) it needs."""

CHANNEL_LOGGERS = (
    "adapters.alexa",
    "adapters.google",
    "gateway.vonage",
    "gateway.plivo",
    "gateway.exotel",
    "adapters.telnyx",
    "adapters.voiceflow.routes",
)
"""The loggers that warned of a channel not configured (or of the key again) at startup."""

LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+) (?P<message>.*)$")


def _expected_summary() -> str:
    listed = ", ".join(
        f"{channel}: {path} answers {status} ({needs})"
        for channel, (path, status, needs) in UNCONFIGURED.items()
    )
    return (
        "channels not configured (they refuse their requests until the setting named is "
        f"given): {listed}"
    )


def test_the_summary_lists_each_channel_once_in_order() -> None:
    assert summary([]) is None
    one = [Unconfigured("alexa", "/alexa", 503, "GATEWAY_ALEXA_SKILL_IDS")]
    assert summary(one) == (
        "channels not configured (they refuse their requests until the setting named is "
        "given): alexa: /alexa answers 503 (GATEWAY_ALEXA_SKILL_IDS)"
    )


def test_gateway_serve_without_settings_warns_only_of_the_key_and_unsigned_twilio() -> None:
    """A real ``gateway serve`` (its logging setup, uvicorn, every router's lifespan) with
    no GATEWAY_ setting at all: two WARNING lines (the per-process secret key, once; Twilio
    accepting unsigned requests) and one INFO line naming the seven channels not configured.
    Before: nine WARNING lines."""
    proc = GatewayProcess({}, log_level="info")
    proc.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    try:
        proc.start()
        text = proc.log_tail(1_000_000)
    finally:
        proc.stop()
    lines = [m for line in text.splitlines() if (m := LINE.match(line))]
    warnings = [(m["logger"], m["message"]) for m in lines if m["level"] == "WARNING"]
    assert [logger for logger, _ in warnings] == ["gateway.secrets", "adapters.twilio"], text
    assert "random per-process key" in warnings[0][1]
    assert "Twilio requests are NOT verified" in warnings[1][1]
    startup = [m["message"] for m in lines if m["logger"] == "gateway.startup"]
    assert startup == [_expected_summary()], text
    assert all(m["level"] == "INFO" for m in lines if m["logger"] == "gateway.startup")


async def test_the_app_without_settings_logs_one_info_line_of_the_unconfigured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's lifespan (in this process): nothing of the channels not configured at
    WARNING, Voiceflow's duplicate of the key's WARNING gone, one INFO summary (which
    names Telnyx too: its webhooks refused without a word at startup)."""
    caplog.set_level(logging.DEBUG)
    async with served(Settings()):
        pass
    channel_warnings = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name in CHANNEL_LOGGERS
    ]
    assert channel_warnings == []
    key = [
        r for r in caplog.records if r.name == "gateway.secrets" and r.levelno >= logging.WARNING
    ]
    assert len(key) == 1
    (line,) = [r for r in caplog.records if r.name == "gateway.startup" and r.levelno > 10]
    assert line.levelno == logging.INFO
    assert line.getMessage() == _expected_summary()


async def test_configured_channels_are_not_listed_and_all_configured_logs_no_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.startup")
    configured: dict[str, Any] = {
        "alexa_skill_ids": frozenset({"amzn1.ask.skill.x"}),
        "google_project_ids": frozenset({"my-project"}),
        "dialogflow_auth": "bearer:tok",
        "vonage_signature_secret": "vonage-secret-0123456789",
        "plivo_auth_token": "plivo-token",
        "exotel_api_key": "exotel-key",
        "exotel_api_token": "exotel-token",
        "telnyx_public_key": TELNYX_PUBLIC_KEY,
        "public_url": "https://gateway.example.com",
    }
    async with served(Settings(**configured)):
        pass
    assert [r for r in caplog.records if r.name == "gateway.startup"] == []
    caplog.clear()
    async with served(Settings(alexa_skill_ids=frozenset({"amzn1.ask.skill.x"}))):
        pass
    (line,) = [r for r in caplog.records if r.name == "gateway.startup"]
    assert "alexa" not in line.getMessage()
    assert "google: /google answers 503 (GATEWAY_GOOGLE_PROJECT_IDS)" in line.getMessage()


@pytest.mark.parametrize(
    ("settings", "logger", "warning"),
    [
        (
            {"alexa_verify": False},
            "adapters.alexa",
            "Alexa request verification is OFF (GATEWAY_ALEXA_VERIFY=false)",
        ),
        (
            {"exotel_api_key": "exotel-key"},
            "gateway.exotel",
            "GATEWAY_EXOTEL_API_TOKEN is unset: /exotel/stream refuses every call "
            "(GATEWAY_EXOTEL_API_KEY is set)",
        ),
        (
            {"exotel_api_token": "exotel-token"},
            "gateway.exotel",
            "GATEWAY_EXOTEL_API_KEY is unset: /exotel/stream refuses every call "
            "(GATEWAY_EXOTEL_API_TOKEN is set)",
        ),
        (
            {"telnyx_api_key": "KEYxx", "public_url": "https://gateway.example.com"},
            "adapters.telnyx",
            "GATEWAY_TELNYX_PUBLIC_KEY is unset: every Telnyx webhook is refused (403)",
        ),
        (
            {"telnyx_public_key": TELNYX_PUBLIC_KEY, "public_url": "https://gateway.example.com"},
            "adapters.telnyx",
            "GATEWAY_TELNYX_API_KEY is unset: no call can be dialled and /telnyx/texml answers 503",
        ),
        (
            {"plivo_auth_token": "plivo-token"},
            "gateway.plivo",
            "GATEWAY_PLIVO_AUTH_ID is unset: the Plivo API cannot be called, so no call can be "
            "transferred or hung up through it (GATEWAY_PLIVO_AUTH_TOKEN is set)",
        ),
        (
            {"vonage_signature_secret": "vonage-secret-0123456789", "vonage_application_id": "app"},
            "gateway.vonage",
            "GATEWAY_VONAGE_PRIVATE_KEY is unset: the Voice API cannot be called, so no call "
            "can be transferred (GATEWAY_VONAGE_APPLICATION_ID is set)",
        ),
        (
            {"plivo_auth_id": "MAXX"},
            "gateway.plivo",
            "GATEWAY_PLIVO_AUTH_TOKEN is unset: /plivo/answer refuses every call "
            "(GATEWAY_PLIVO_AUTH_ID is set)",
        ),
        (
            {"vonage_application_id": "app-id"},
            "gateway.vonage",
            "GATEWAY_VONAGE_SIGNATURE_SECRET is unset: /vonage/answer refuses every call "
            "(GATEWAY_VONAGE_APPLICATION_ID or _PRIVATE_KEY is set)",
        ),
    ],
)
async def test_an_unsafe_or_half_done_channel_still_warns(
    settings: dict[str, Any], logger: str, warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Verification turned off, or some of a channel's credentials without the others:
    a WARNING of the channel's logger at startup, and the channel is not in the INFO
    line of the channels not configured (it is configured, badly)."""
    caplog.set_level(logging.INFO)
    async with served(Settings(**settings)):
        pass
    warned = [
        r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING
    ]
    assert any(warning in text for text in warned), warned
    (line,) = [r for r in caplog.records if r.name == "gateway.startup"]
    channel = logger.rsplit(".", 1)[-1]
    assert f"{channel}: " not in line.getMessage()


async def test_a_request_to_each_unconfigured_endpoint_is_a_warning_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first request refused by a channel not configured is logged once at WARNING
    (the channel's bounded refusal log) naming the setting it needs; its answer is what
    it always was."""
    caplog.set_level(logging.DEBUG)
    async with served(Settings()) as url, httpx.AsyncClient(base_url=url) as client:
        caplog.clear()
        answers = {
            "alexa": await client.post("/alexa", json={"version": "1.0"}),
            "google": await client.post("/google", json={}),
            "dialogflow": await client.post("/dialogflow", json={}),
            "telnyx": await client.post("/telnyx/texml", data={"CallSid": "v3:x"}),
            "vonage": await client.get("/vonage/answer", params={"uuid": "u1"}),
            "plivo": await client.post("/plivo/answer", data={"CallUUID": "c1"}),
        }
        exotel = await upgrade_status(url.replace("http://", "ws://") + "/exotel/stream", {})
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
    for channel, answer in answers.items():
        _, status, needs = UNCONFIGURED[channel]
        assert answer.status_code == status, channel
        assert answer.headers["content-type"] == "application/problem+json", channel
        lines = [r for r in refused if needs.split()[0] in r.getMessage()]
        assert [r.levelno for r in lines] == [logging.WARNING], (channel, refused)
    assert answers["alexa"].json()["reason"] == "not_configured"
    assert answers["vonage"].json()["detail"] == "no signature secret is configured"
    assert answers["plivo"].json()["detail"] == "no auth token is configured"
    assert exotel == 403
    (line,) = [r for r in refused if "Exotel stream refused" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "GATEWAY_EXOTEL_API_KEY and GATEWAY_EXOTEL_API_TOKEN" in line.getMessage()
    assert len(refused) == len(UNCONFIGURED)  # one line each, nothing more


async def test_voiceflow_warns_of_the_process_key_only_when_the_gateway_did_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Voiceflow's own WARNING of a per-process key stays for a gateway whose key was not
    loaded by gateway.secrets (which warns itself), e.g. an app embedding the channels
    with a Gateway of its own; it is gone when gateway.secrets already said it."""
    caplog.set_level(logging.WARNING, logger="adapters.voiceflow.routes")
    unannounced = SecretKeys.random()
    announced = SecretKeys.random()
    announced.warned = True
    for keys, expected in ((unannounced, 1), (announced, 0)):
        caplog.clear()
        gw = SimpleNamespace(secret_keys=keys, before_close=[])  # start adds its shutdown hook
        VoiceflowServer(Settings()).start(cast(Gateway, gw))
        said = [r for r in caplog.records if "per-process key" in r.getMessage()]
        assert len(said) == expected, keys.warned


async def test_with_redis_down_the_key_is_warned_of_once(caplog: pytest.LogCaptureFixture) -> None:
    """GATEWAY_REDIS_URL set and Redis not answering at startup: gateway.secrets says the
    key is random until Redis answers; Voiceflow no longer says it again."""
    caplog.set_level(logging.WARNING)
    async with served(Settings(redis_url="redis://127.0.0.1:1/0")):  # nothing listens
        pass
    key = [r.getMessage() for r in caplog.records if r.name == "gateway.secrets"]
    assert len([text for text in key if "per-process key until Redis answers" in text]) == 1
    assert [r for r in caplog.records if r.name == "adapters.voiceflow.routes"] == []


async def test_an_open_metrics_endpoint_of_a_deployment_is_one_info_line(
    caplog: pytest.LogCaptureFixture, redis_url: str, redis_prefix: str
) -> None:
    """/metrics answers anyone unless GATEWAY_METRICS_TOKEN is set (the default, as
    Prometheus setups scrape without credentials). With GATEWAY_REDIS_URL set (a
    deployment, not a trial) the startup says so once, at INFO, naming the setting; with
    the token set it says nothing (and without Redis neither: the summary is the only
    line, test_gateway_serve_without_settings_warns_only_of_the_key_and_unsigned_twilio)."""
    caplog.set_level(logging.INFO)
    async with served(Settings(redis_url=redis_url, redis_prefix=redis_prefix)):
        pass
    (line,) = [r for r in caplog.records if "/metrics" in r.getMessage()]
    assert (line.name, line.levelno) == ("gateway.startup", logging.INFO)
    assert line.getMessage().startswith("GET /metrics answers anyone who reaches this port")
    assert "set GATEWAY_METRICS_TOKEN" in line.getMessage()
    caplog.clear()
    token = SecretStr("metrics-token-of-this-test")
    async with served(
        Settings(redis_url=redis_url, redis_prefix=redis_prefix, metrics_token=token)
    ):
        pass
    assert [r for r in caplog.records if "/metrics" in r.getMessage()] == []
    assert [r for r in caplog.records if r.name == "gateway.startup"]  # it did log


def test_gateway_serve_warns_once_of_gateway_variables_that_name_no_setting() -> None:
    """A ``GATEWAY_*`` variable with a typo (GATEWAY_PORTT, GATEWAY_ADMIN_KEY for
    GATEWAY_ADMIN_KEYS) was ignored without a word (``extra="ignore"``): the operator
    believed the setting on. A real ``gateway serve`` now logs one WARNING naming them,
    sorted, each with the setting it likely meant, never a value; it still starts. A
    setting in lower case (read as its upper-case name) and the documented variables that
    are no setting (deploy/compose.yaml's, the tests') are not named."""
    secret = "typo-admin-key-value-0123456789"
    typos = {
        "GATEWAY_PORTT": "portt-value-0123456789",
        "GATEWAY_ADMIN_KEY": secret,
        "GATEWAY_NO_SUCH_THING": "on",
        "gateway_log_format": "text",  # a setting: pydantic-settings reads it
    }
    proc = GatewayProcess({}, log_level="info")
    proc.env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    proc.env.update(typos)
    proc.env.update(dict.fromkeys(OTHER_VARIABLES, "x"))
    try:
        proc.start()
        text = proc.log_tail(1_000_000)
    finally:
        proc.stop()
    lines = [m for line in text.splitlines() if (m := LINE.match(line))]
    unknown = [
        m["message"] for m in lines if m["level"] == "WARNING" and "name no setting" in m["message"]
    ]
    assert unknown == [
        "GATEWAY_* environment variables that name no setting are ignored (3): "
        "GATEWAY_ADMIN_KEY (did you mean GATEWAY_ADMIN_KEYS?), GATEWAY_NO_SUCH_THING, "
        "GATEWAY_PORTT (did you mean GATEWAY_PORT?)"
    ], text
    assert [m["logger"] for m in lines if m["message"] == unknown[0]] == ["gateway.server"]
    assert secret not in text
    assert "portt-value-0123456789" not in text


def test_the_unknown_variables_named_are_clipped_and_counted() -> None:
    """At most MAX_UNKNOWN_NAMED names (sorted), then how many more; none: no line."""
    assert unknown_settings_warning({"GATEWAY_PORT": "1", "PATH": "/bin"}) is None
    environ = {f"GATEWAY_ZZ_{n:02d}": "v" for n in range(MAX_UNKNOWN_NAMED + 5)}
    line = unknown_settings_warning(environ)
    assert line is not None
    names = line.split(": ", 1)[1].split(", ")
    assert names == [*sorted(environ)[:MAX_UNKNOWN_NAMED], "and 5 more"]
    assert f"are ignored ({MAX_UNKNOWN_NAMED + 5})" in line


def test_every_gateway_variable_of_deploy_is_a_setting_or_documented_as_none() -> None:
    """deploy/'s files (compose, its .env example, the image, the manifests) set or
    interpolate only settings and OTHER_VARIABLES: a deployment as shipped logs no
    warning of unknown variables (GATEWAY_HTTP_PORT of deploy/.env reaches the replicas)."""
    deploy = Path(__file__).parents[2] / "deploy"
    files = [deploy / "compose.yaml", deploy / ".env.example", deploy / "Dockerfile"]
    files += sorted((deploy / "kubernetes").rglob("*.yaml"))
    names = {
        name
        for path in files
        for name in re.findall(r"GATEWAY_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8"))
    }
    assert {"GATEWAY_HTTP_PORT", "GATEWAY_NETWORK_SUBNET", "GATEWAY_SECRET_KEY"} <= names
    assert unknown_settings(dict.fromkeys(names, "")) == []
