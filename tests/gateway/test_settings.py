"""Settings that stop the gateway at startup, naming the setting (pydantic's
ValidationError, as `gateway serve` reports it), instead of failing the requests that
use them later."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr, ValidationError

from adapters.vonage.protocol import RATES
from gateway.cli import setting_errors, startup_warnings
from gateway.events import MAX_TIMEOUT_S
from gateway.io.call import TOKEN_TTL_S
from gateway.protocol import MAX_ID_CHARS
from gateway.settings import MAX_CALLS_TIMEOUT_S, Settings
from tests.adapters.vonage.harness import application_key
from tests.conftest import ROOT, GatewayProcess, free_port, serve_refused


@pytest.mark.parametrize("value", ["44100", "11025", "0", "-16000"])
def test_a_vonage_sample_rate_no_answer_can_ask_for_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Every answer would fail (the NCCO's content-type takes adapters/vonage/protocol.py
    RATES only): the gateway does not start; each of RATES starts it."""
    monkeypatch.setenv("GATEWAY_VONAGE_SAMPLE_RATE", value)
    with pytest.raises(ValidationError, match="vonage_sample_rate") as refused:
        Settings()
    assert f"must be 8000, 16000 or 24000 (Hz), not {int(value)}" in str(refused.value)
    for rate in RATES:
        monkeypatch.setenv("GATEWAY_VONAGE_SAMPLE_RATE", str(rate))
        assert Settings().vonage_sample_rate == rate


@pytest.mark.parametrize(
    "name",
    [
        "GATEWAY_SESSION_TIMEOUT_S",
        "GATEWAY_OUTBOX_TTL_S",
        "GATEWAY_TTS_CACHE_TTL_S",
        "GATEWAY_VOICEFLOW_SESSION_KEY_TTL_S",
    ],
)
def test_a_time_to_live_past_365_days_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Redis refuses such an expiry (past 64-bit milliseconds: 10**19 s), so every write
    with it would fail: the gateway does not start; 365 days start it."""
    monkeypatch.setenv(name, str(10**19))
    with pytest.raises(ValidationError, match=name.removeprefix("GATEWAY_").lower()):
        Settings()
    monkeypatch.setenv(name, str(MAX_TIMEOUT_S))
    assert getattr(Settings(), name.removeprefix("GATEWAY_").lower()) == MAX_TIMEOUT_S


@pytest.mark.parametrize("value", ["60.5", "300", "3600"])
def test_a_calls_timeout_a_dials_stream_token_would_not_outlive_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A Telnyx dial's stream token (good TOKEN_TTL_S, 300 s) is minted before the dial
    is sent and bound to the call when its answer comes, within GATEWAY_CALLS_TIMEOUT_S,
    which had no upper bound: an answer later than the token's life left the call
    neither bound nor hung up. Past MAX_CALLS_TIMEOUT_S (60 s, a fifth of the token's
    life) the gateway does not start, naming the setting and why (``gateway serve``: exit
    2, one line); 60 s starts it."""
    assert MAX_CALLS_TIMEOUT_S * 5 <= TOKEN_TTL_S == 300  # as the message says
    monkeypatch.setenv("GATEWAY_CALLS_TIMEOUT_S", value)
    with pytest.raises(ValidationError, match="calls_timeout_s") as refused:
        Settings()
    assert f"must be at most 60 s, not {float(value):g}: a dial's stream token (good 300 s)" in (
        str(refused.value)
    )
    monkeypatch.setenv("GATEWAY_CALLS_TIMEOUT_S", str(MAX_CALLS_TIMEOUT_S))
    assert Settings().calls_timeout_s == MAX_CALLS_TIMEOUT_S
    if value == "300":
        stderr = serve_refused({"GATEWAY_CALLS_TIMEOUT_S": value})
        assert "gateway: GATEWAY_CALLS_TIMEOUT_S: must be at most 60 s, not 300" in stderr
        assert "Traceback" not in stderr


def test_an_app_key_list_that_names_no_key_is_refused_not_open_to_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GATEWAY_APP_KEYS=" , " made an empty allow-list, which allows any key."""
    monkeypatch.setenv("GATEWAY_APP_KEYS", " , ")
    with pytest.raises(ValidationError, match="names no key"):
        Settings()
    monkeypatch.setenv("GATEWAY_APP_KEYS", "shop, faq ,")
    assert Settings().app_keys == frozenset({"shop", "faq"})
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", " , ")  # no admin key: the admin API is off
    assert Settings().admin_keys == frozenset()
    # admin keys are split before _split_keys sees them: " , " is no key, not refused
    assert Settings(admin_keys=",").admin_keys == frozenset()
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", " ops-key-1-of-the-gateway ,, ")
    assert Settings().admin_keys == frozenset({"ops-key-1-of-the-gateway"})


def test_an_app_key_longer_than_channels_take_stops_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flowstorm V1/V2 refuse a key over MAX_ID_CHARS (256) characters and the push API
    cannot name one: a configured key that long could never be used, so it is refused at
    the start (its value not shown: GATEWAY_APP_KEYS holds credentials)."""
    long_key = "k" * (MAX_ID_CHARS + 1)
    monkeypatch.setenv("GATEWAY_APP_KEYS", f"shop,{long_key}")
    with pytest.raises(ValidationError, match=f"longer than {MAX_ID_CHARS} characters"):
        Settings()
    monkeypatch.setenv("GATEWAY_APP_KEYS", f"shop,{long_key[1:]}")
    assert Settings().app_keys == frozenset({"shop", long_key[1:]})


@pytest.mark.parametrize("url", ["gateway.example.com", "not a url", "ftp://h", "https://"])
def test_a_public_url_without_a_scheme_or_host_is_refused(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Links and stream URLs are made from it: without a scheme they were relative links,
    and Twilio got ws:///host/..."""
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", url)
    with pytest.raises(ValidationError, match="public_url"):
        Settings()


def test_a_public_url_urllib_cannot_split_stops_serve_with_the_settings_words() -> None:
    """GATEWAY_PUBLIC_URL with an unclosed ``[`` (an IPv6 host) stopped ``gateway serve``
    with urllib's words (``Invalid IPv6 URL``), where a core's base URL gets the setting's
    own; it gets them too now, the password not shown."""
    stderr = serve_refused({"GATEWAY_PUBLIC_URL": "http://u:public-pw-4711@[::1"})
    assert stderr.startswith(
        "gateway: GATEWAY_PUBLIC_URL: must be an http:// or https:// URL with a host"
    )
    assert len(stderr.splitlines()) == 1
    assert "IPv6" not in stderr
    assert "public-pw-4711" not in stderr


def test_an_unset_public_url_names_the_port_the_gateway_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GATEWAY_PUBLIC_URL unset: http://localhost:{port}; set, it is kept as given."""
    monkeypatch.delenv("GATEWAY_PUBLIC_URL", raising=False)
    monkeypatch.delenv("GATEWAY_PORT", raising=False)
    assert Settings().public_url == "http://localhost:8080"
    assert Settings(port=9000).public_url == "http://localhost:9000"
    assert Settings(port=0).public_url == "http://localhost:8080"  # no URL names port 0
    monkeypatch.setenv("GATEWAY_PORT", "9100")
    assert Settings().public_url == "http://localhost:9100"
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", "https://gateway.example.com")
    assert Settings().public_url == "https://gateway.example.com"
    assert Settings(port=9000).public_url == "https://gateway.example.com"


def test_the_tts_links_of_a_gateway_served_on_another_port_lead_back_to_it() -> None:
    """``gateway serve --port P`` with nothing else set (the README's first command on
    another port): every V2 answer's audio link named port 8080, where nothing answered;
    it names P and returns the audio."""
    gateway = GatewayProcess({})
    gateway.env.pop("GATEWAY_PUBLIC_URL", None)
    gateway.env.pop("GATEWAY_REDIS_URL", None)
    gateway.start()
    try:
        answer = httpx.put(
            f"{gateway.url}/client?key=demo",
            content="hello there",
            headers={"content-type": "text/plain"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        links = re.findall(r"audio=(\S+?)\)", answer.text)
        assert links, answer.text
        assert links[0].startswith(f"http://localhost:{gateway.port}/file/tts/"), links
        audio = httpx.get(links[0], timeout=60)
        assert audio.status_code == 200
        assert audio.headers["content-type"] == "audio/mpeg"
        assert len(audio.content) > 1000
    finally:
        gateway.stop()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    """70000 was bound as 4464 (uvicorn took it modulo 65536)."""
    monkeypatch.setenv("GATEWAY_PORT", port)
    with pytest.raises(ValidationError, match="port"):
        Settings()


FLOAT_SETTINGS = sorted(
    name
    for name, field in Settings.model_fields.items()
    if field.annotation is float or field.annotation == (float | None)
)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_no_number_setting_takes_an_endless_value(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """float() reads "inf" and "nan", and ``gt=0`` lets inf through:
    GATEWAY_FLOWSTORM_V1_BYTES_PER_S=inf turned the byte limit off by accident (its
    arithmetic became NaN, which refuses nothing), a lease or timeout of inf never ends.
    Every float setting refuses them at startup, naming the setting."""
    assert len(FLOAT_SETTINGS) > 20, FLOAT_SETTINGS  # the seconds, rates and ratios
    for name in FLOAT_SETTINGS:
        monkeypatch.setenv(f"GATEWAY_{name.upper()}", value)
        with pytest.raises(ValidationError, match=name):
            Settings()
        monkeypatch.delenv(f"GATEWAY_{name.upper()}")


def test_settings_that_fail_some_clients_are_warned_of_at_startup() -> None:
    """``gateway serve``'s startup warnings: none for the defaults; a shutdown wait no
    longer than a turn may wait for its session's lock and run (its clients would get a
    500 for a turn that is saved; a wait just longer than the turn's timeout was not
    warned of, though a turn waiting for its lock is cut), and more connections than the
    open-file limit leaves, each named with its values."""
    assert startup_warnings(Settings(), 65536) == []
    expected = [
        "GATEWAY_SHUTDOWN_TIMEOUT_S={} is not longer than GATEWAY_LOCK_WAIT_S=15 + "
        "GATEWAY_TURN_TIMEOUT_S=10: on SIGTERM a turn still running when the wait ends is "
        "answered 500 though it goes on and is saved (a retry repeats it); give the "
        "shutdown more time than a turn may wait for its session and run"
    ]
    for short_s in (10, 11, 25):
        settings = Settings(shutdown_timeout_s=short_s, turn_timeout_s=10, lock_wait_s=15)
        assert startup_warnings(settings, 65536) == [expected[0].format(short_s)]
    long_enough = Settings(shutdown_timeout_s=26, turn_timeout_s=10, lock_wait_s=15)
    assert startup_warnings(long_enough, 65536) == []
    # the #error turn (GATEWAY_ERROR_TURN) may run GATEWAY_ERROR_TURN_MIN_S after the
    # timeout: 26 s is no longer enough for 15 + 10 + 2 (it was not warned of)
    error_turn = Settings(shutdown_timeout_s=26, turn_timeout_s=10, lock_wait_s=15, error_turn=True)
    assert error_turn.turn_max_s == 12
    assert startup_warnings(error_turn, 65536) == [
        expected[0]
        .format(26)
        .replace(
            "GATEWAY_TURN_TIMEOUT_S=10:",
            "GATEWAY_TURN_TIMEOUT_S=10 + GATEWAY_ERROR_TURN_MIN_S=2 (GATEWAY_ERROR_TURN):",
        )
    ]
    assert startup_warnings(error_turn.model_copy(update={"shutdown_timeout_s": 28}), 65536) == []
    crowded = startup_warnings(Settings(max_connections=1000), 256)
    assert len(crowded) == 1
    assert crowded[0].startswith("GATEWAY_MAX_CONNECTIONS=1000 is more than the open-file limit")


@pytest.mark.parametrize(
    "value",
    ["not-a-key", "c2hvcnQ=", base64.b64encode(bytes(64)).decode(), "-----BEGIN PUBLIC KEY-----"],
)
def test_a_telnyx_public_key_that_is_no_key_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Every Telnyx webhook would fail with a 500 (the verifier cannot be made): the
    gateway does not start; base64 of 32 raw bytes, as the portal shows it, starts it."""
    monkeypatch.setenv("GATEWAY_TELNYX_PUBLIC_KEY", value)
    with pytest.raises(ValidationError, match="telnyx_public_key") as refused:
        Settings()
    assert "must be base64 of the 32 raw bytes of an Ed25519 public key" in str(refused.value)
    key = base64.b64encode(bytes(range(32))).decode()
    monkeypatch.setenv("GATEWAY_TELNYX_PUBLIC_KEY", key)
    assert Settings().telnyx_public_key == key


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        pytest.param(
            "GATEWAY_TELNYX_API_KEY", "KEY0188_abc\n", "is no bearer token", id="telnyx-newline"
        ),
        pytest.param(
            "GATEWAY_TELNYX_API_KEY", "KEY0188_abc\u00a0", "is no bearer token", id="telnyx-nbsp"
        ),
        pytest.param(
            "GATEWAY_TELNYX_API_KEY", "KEY 0188_abc", "is no bearer token", id="telnyx-space"
        ),
        pytest.param(
            "GATEWAY_PLIVO_AUTH_ID",
            "MAXXXXXXXXXXXXXXXXXX\n",
            "must be letters and digits",
            id="plivo-newline",
        ),
        pytest.param(
            "GATEWAY_PLIVO_AUTH_ID", "MAXX/../SAXX", "must be letters and digits", id="plivo-slash"
        ),
    ],
)
def test_a_carrier_api_credential_no_request_can_carry_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    """A Telnyx API key that is no bearer token (a secret file's last newline, a
    non-breaking space pasted with it, a space) or a Plivo Auth ID that is not letters and
    digits (a newline, a ``/``) cannot go in a request to the carrier's API (the
    ``Authorization: Bearer`` header; the ``/v1/Account/{auth_id}/`` path): the gateway
    does not start, the line naming the setting without its value. Before, it started
    and every hang-up, transfer and dial failed, each logged as the carrier's API being
    unreachable (``component: telnyx-api``, ``plivo-api``), not as the setting's fault.
    The values as the consoles show them start it."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    (line,) = setting_errors(refused.value)
    assert line.startswith(f"{name}: {words}"), line
    assert value.strip() not in line or name == "GATEWAY_PLIVO_AUTH_ID"
    monkeypatch.setenv("GATEWAY_TELNYX_API_KEY", "KEY0188D8D2E4B3CA_aB-c.d~e+f/g==")
    monkeypatch.setenv("GATEWAY_PLIVO_AUTH_ID", "MAXXXXXXXXXXXXXXXXXX")
    settings = Settings()
    assert settings.plivo_auth_id == "MAXXXXXXXXXXXXXXXXXX"
    assert settings.telnyx_api_key is not None


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("GATEWAY_EXOTEL_API_KEY", "exotel:key", "holds ':', which no Basic user-id can"),
        ("GATEWAY_EXOTEL_API_KEY", "exotel-key\n", "holds a space, a line break"),
        ("GATEWAY_EXOTEL_API_TOKEN", "exotel-token\n", "holds a space, a line break"),
        ("GATEWAY_EXOTEL_API_TOKEN", "exotel token", "holds a space, a line break"),
    ],
    ids=["key-colon", "key-newline", "token-newline", "token-space"],
)
def test_exotel_credentials_no_applet_sends_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    """Exotel credentials its applet could never present as Basic credentials (a key
    holding ':', a key or token holding a space or a line break): the gateway does not
    start, the CLI line naming the setting (the token's value not shown). A key with ':'
    crashed the startup with a traceback (ExotelVerifier's ValueError in the router's
    lifespan); with a line break every stream was refused 403 "wrong Exotel credentials".
    The values of the applet's URL start it."""
    monkeypatch.setenv("GATEWAY_EXOTEL_API_KEY", "exotel-key")
    monkeypatch.setenv("GATEWAY_EXOTEL_API_TOKEN", "exotel-token-0123")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    (line,) = setting_errors(refused.value)
    assert line.startswith(f"{name}: {words}"), line
    if name == "GATEWAY_EXOTEL_API_TOKEN":
        assert value.strip() not in line
    monkeypatch.setenv(name, value.strip().replace(":", "-").replace(" ", "-"))
    settings = Settings()
    assert settings.exotel_api_key == "exotel-key"
    assert settings.exotel_api_token is not None


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("-----BEGIN PRIVATE KEY-----", id="a-header-alone"),
        pytest.param(_pem(application_key()).replace("\n", "\\n"), id="line-breaks-escaped"),
        pytest.param(_pem(ec.generate_private_key(ec.SECP256R1())), id="not-rsa"),
    ],
)
def test_a_vonage_private_key_that_cannot_sign_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A GATEWAY_VONAGE_PRIVATE_KEY that is no PEM RSA private key (a header alone, its
    line breaks written as ``\\n``, another kind of key) cannot sign the Voice API's RS256
    JWTs: the gateway does not start, the line naming the setting without its value.
    Before, it started; every transfer then failed, logged as ``component: vonage-api``
    (the Vonage API blamed for the gateway's setting), and every call was cut at
    shutdown. The application's RSA key, as the dashboard's ``private.key`` holds it,
    starts it."""
    monkeypatch.setenv("GATEWAY_VONAGE_PRIVATE_KEY", value)
    with pytest.raises(ValidationError, match="vonage_private_key") as refused:
        Settings()
    (line,) = setting_errors(refused.value)
    assert line == (
        "GATEWAY_VONAGE_PRIVATE_KEY: must be the PEM of the Vonage application's RSA "
        "private key (its private.key file, unencrypted, line breaks kept)"
    )
    pem = _pem(application_key())
    monkeypatch.setenv("GATEWAY_VONAGE_PRIVATE_KEY", pem)
    key = Settings().vonage_private_key
    assert key is not None
    assert key.get_secret_value() == pem


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        ([], {"GATEWAY_LOG_LEVEL": "verbose"}, "gateway: GATEWAY_LOG_LEVEL: must be one of"),
        ([], {"GATEWAY_LOG_LEVEL": "warn"}, "gateway: GATEWAY_LOG_LEVEL: must be one of"),
        (["--log-level", "loud"], {}, "argument --log-level: invalid choice: 'LOUD'"),
    ],
)
def test_an_unknown_log_level_stops_serve_with_one_line_naming_it(
    args: list[str], env: dict[str, str], words: str
) -> None:
    """GATEWAY_LOG_LEVEL and ``--log-level`` were not checked: ``gateway serve`` died in
    configure_logging with logging's traceback (``ValueError: Unknown level``), exit 1.
    Now: exit 2 and one line naming the setting or the option and the levels."""
    stderr = serve_refused(env, *args)
    assert words in stderr
    assert "Traceback" not in stderr


def test_log_levels_are_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """``info``, `` Warning `` and ``trace`` (uvicorn's) are levels uvicorn knows."""
    for given, level in (("info", "INFO"), (" Warning ", "WARNING"), ("trace", "TRACE")):
        monkeypatch.setenv("GATEWAY_LOG_LEVEL", given)
        assert Settings().log_level == level


def test_log_formats_are_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """GATEWAY_LOG_FORMAT=JSON stopped the start (``Input should be 'text' or 'json'``)
    while GATEWAY_LOG_LEVEL takes any case: both do now; another format still stops it."""
    for given, log_format in (("JSON", "json"), (" Json ", "json"), ("TEXT", "text")):
        monkeypatch.setenv("GATEWAY_LOG_FORMAT", given)
        assert Settings().log_format == log_format
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "XML")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()


@pytest.mark.parametrize(
    ("env", "words", "secret"),
    [
        (
            {"GATEWAY_SECRET_KEY": "short-but-real-secret"},
            "GATEWAY_SECRET_KEY: must have at least 32 characters",
            "short-but-real-secret",
        ),
        (
            {"GATEWAY_DIALOGFLOW_AUTH": "basic:agent-pass-typo"},
            "GATEWAY_DIALOGFLOW_AUTH: must be basic:USER:PASSWORD or bearer:TOKEN",
            "agent-pass-typo",
        ),
        (
            {"GATEWAY_REDIS_URL": "redis://:hunter2-redis-pw@h:notaport"},
            "GATEWAY_REDIS_URL: redis:// URL: the port is not a number",
            "hunter2-redis-pw",
        ),
        (  # a key no Authorization header can carry (Starlette reads headers as latin-1,
            # the key was compared as UTF-8: it never matched, every request was a 401)
            {"GATEWAY_ADMIN_KEYS": "ops-key-1-of-the-gateway,clé-secrète-admin"},
            "GATEWAY_ADMIN_KEYS: holds a key that is no bearer token (RFC 6750",
            "secrète",
        ),
        (
            {"GATEWAY_ADMIN_KEYS": "ops key with spaces"},
            "GATEWAY_ADMIN_KEYS: holds a key that is no bearer token (RFC 6750",
            "ops key with spaces",
        ),
        (  # a key that can be guessed: there was no minimum length
            {"GATEWAY_ADMIN_KEYS": "ops-key-of-the-gateway-1,admin-1234"},
            "GATEWAY_ADMIN_KEYS: holds a key shorter than 16 characters",
            "admin-1234",
        ),
        (  # /metrics does not slow guesses down: a token as long as an admin key
            {"GATEWAY_METRICS_TOKEN": "metrics-123"},
            "GATEWAY_METRICS_TOKEN: is shorter than 16 characters",
            "metrics-123",
        ),
        (
            {"GATEWAY_METRICS_TOKEN": "a metrics token with spaces"},
            "GATEWAY_METRICS_TOKEN: is no bearer token (RFC 6750",
            "with spaces",
        ),
        (  # several tokens (a rotation): each one as long as a single token must be
            {"GATEWAY_METRICS_TOKEN": "metrics-token-of-prom-1, metrics-12"},
            "GATEWAY_METRICS_TOKEN: token 2 of 2 is shorter than 16 characters",
            "metrics-12",
        ),
        (
            {"GATEWAY_METRICS_TOKEN": "metrics-token-of-prom-1,metrics token 2"},
            "GATEWAY_METRICS_TOKEN: token 2 of 2 is no bearer token (RFC 6750",
            "token 2,",
        ),
    ],
)
def test_a_refused_credential_is_named_but_not_shown(
    env: dict[str, str], words: str, secret: str
) -> None:
    """``gateway serve``'s line for an invalid setting showed the value it got, a
    credential too (``GATEWAY_SECRET_KEY: must have at least 32 characters (got
    '<the key>')``, a Redis URL's password) on stderr, the container's log. Credentials
    are named without their value; a URL is shown with its password as ``***``."""
    stderr = serve_refused(env)
    assert words in stderr
    assert secret not in stderr


def test_admin_keys_take_every_bearer_token() -> None:
    """RFC 6750's b64token: letters, digits, ``-._~+/`` and trailing ``=`` (a base64 or
    base64url key as it is)."""
    keys = Settings(admin_keys=" a+b/C9aaaaaaaaaa== , x-y_z~1.2.3.4.5.6.7 ").admin_keys
    assert keys == frozenset({"a+b/C9aaaaaaaaaa==", "x-y_z~1.2.3.4.5.6.7"})


def test_gateway_metrics_token_takes_several_tokens_each_checked() -> None:
    """GATEWAY_METRICS_TOKEN held one token, so rotating it refused the scrapers until
    each had the new one (a window of 401s). It takes several now, comma-separated (spaces
    and empty entries ignored); each is checked as the single one was, and one too short
    or no bearer token stops the start (test_a_refused_credential_is_named_but_not_shown),
    named by its place, never shown. A value naming none is refused."""
    settings = Settings(metrics_token=" metrics-token-old-0001 , metrics-token-new-0002,, ")
    assert settings.metrics_tokens == ("metrics-token-old-0001", "metrics-token-new-0002")
    assert "metrics-token" not in repr(settings)
    assert Settings(metrics_token="metrics-token-old-0001").metrics_tokens == (
        "metrics-token-old-0001",
    )
    assert Settings().metrics_tokens == ()
    for value, words in (
        ("metrics-token-old-0001,short-one", "token 2 of 2 is shorter than 16 characters"),
        ("metrics-token-old-0001,,x,metrics-token-new-0002", "token 2 of 3 is shorter"),
        ("metrics-token-old-0001,metrics-token-n\u00e9w", "token 2 of 2 is no bearer token"),
        (" , ", "names no token"),
    ):
        with pytest.raises(ValidationError) as refused:
            Settings(metrics_token=value)
        assert words in str(refused.value), value


@pytest.mark.parametrize("short", ["k", "admin-key", "fifteen-chars-x"])
def test_an_admin_key_shorter_than_16_characters_is_refused(short: str) -> None:
    """GATEWAY_ADMIN_KEYS had no minimum length: a 2-character key (the whole admin API)
    was taken. A key of fewer than 16 characters is refused (``gateway serve`` stops,
    naming the setting and not showing the key: test_a_refused_credential_is_named_but_not_shown);
    16 characters are enough."""
    assert len(short) < 16
    with pytest.raises(ValidationError) as refused:
        Settings(admin_keys=f"a-long-admin-key-0001,{short}")
    assert "shorter than 16 characters" in str(refused.value)
    assert Settings(admin_keys="sixteen-chars-xx").admin_keys == {"sixteen-chars-xx"}


@pytest.mark.parametrize(
    "url",
    [
        "https://gw.example.com/?x=1",
        "https://gw.example.com/base?x=1",
        "https://gw.example.com/#frag",
        "https://gw.example.com#frag",
        "https://gw.example.com/?",  # an empty query still ends the path: ...?/twilio/...
        "https://gw.example.com/#",
    ],
)
def test_a_public_url_with_a_query_or_fragment_is_refused(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Paths are appended to it: the signed webhook URLs and status callbacks made from
    ``https://gw.example.com/?x=1`` were ``https://gw.example.com/?x=1/twilio/...``."""
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", url)
    with pytest.raises(ValidationError, match="public_url") as refused:
        Settings()
    assert "must have no query or fragment" in str(refused.value)
    assert Settings(public_url="https://gw.example.com/base/").public_url.endswith("/base/")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GATEWAY_PIPELINE": "http://user:core-pw-4711@[::1/turn"}, "GATEWAY_PIPELINE="),
        ({"GATEWAY_PIPELINE": "rasa+http://[rasa"}, "GATEWAY_PIPELINE="),
        ({"GATEWAY_PIPELINES": '{"app": "https://user:core-pw-4711@[x"}'}, "GATEWAY_PIPELINES["),
    ],
)
def test_a_core_url_urllib_cannot_split_stops_the_start_with_one_line(
    env: dict[str, str], words: str
) -> None:
    """A core URL with an unclosed ``[`` (an IPv6 host) made ``gateway serve`` die with
    urllib's traceback (``ValueError: Invalid IPv6 URL``, exit 1). Now: exit 2 and one
    line naming the setting, the URL's password not shown."""
    stderr = serve_refused(env)
    assert "Traceback" not in stderr
    assert stderr.startswith(f"gateway: {words}")
    assert "not a valid URL" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert "core-pw-4711" not in stderr


def test_a_json_setting_that_is_not_json_says_so() -> None:
    """GATEWAY_CALL_OVERRIDES (a JSON object) that is not JSON stopped ``gateway serve``
    with pydantic-settings' words, which say neither what is wrong nor where: ``error
    parsing value for GATEWAY_CALL_OVERRIDES from source "EnvSettingsSource"``. Now, as
    GATEWAY_PIPELINES does: not valid JSON, and the parser's place."""
    stderr = serve_refused({"GATEWAY_CALL_OVERRIDES": '{"twilio": {"barge_in": tru}}'})
    assert stderr == (
        "gateway: GATEWAY_CALL_OVERRIDES is not valid JSON: "
        "Expecting value: line 1 column 25 (char 24)\n"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_BOTPRESS_URL", "chat.botpress.cloud"),
        ("GATEWAY_VOICEFLOW_RUNTIME_URL", "http://[::1"),
        ("GATEWAY_TWILIO_API_BASE_URL", "api.twilio.com"),
        ("GATEWAY_TELNYX_API_BASE_URL", "ftp://api.telnyx.com"),
        ("GATEWAY_VONAGE_API_BASE_URL", "https://"),
        ("GATEWAY_PLIVO_API_BASE_URL", ""),
    ],
)
def test_a_base_url_that_is_no_http_url_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A core's or carrier API's base URL without a scheme or host was taken: the gateway
    started, and every turn of that core (every REST hang-up of that carrier) failed.
    It stops the start with one line naming the setting."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert [line.split(":")[0] for line in setting_errors(raised.value)] == [name]
    assert "must be an http:// or https:// URL with a host" in str(raised.value)


@pytest.mark.parametrize(
    ("env", "args"), [({"GATEWAY_HOST": ""}, ()), ({"GATEWAY_HOST": " "}, ()), ({}, ("--host=",))]
)
def test_an_empty_host_stops_the_start_instead_of_listening_everywhere(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    """GATEWAY_HOST="" (a template's unset variable) or ``--host ""`` started the gateway
    listening on every interface, IPv4 and IPv6 (``Uvicorn running on http://:8080``),
    where an unset GATEWAY_HOST listens on 127.0.0.1 only. It stops the start, naming
    the setting."""
    stderr = serve_refused(env, *args)
    assert stderr.startswith("gateway: GATEWAY_HOST: is empty, which would listen on every ")
    assert len(stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("env", "args"),
    [({"GATEWAY_HOST": "no-such-host.invalid"}, ()), ({}, ("--host", "no-such-host.invalid"))],
)
def test_a_host_that_does_not_resolve_stops_the_start_naming_the_setting(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    """GATEWAY_HOST (or ``--host``) naming no host (``.invalid`` never resolves, RFC 6761)
    stopped ``gateway serve`` after its whole startup with uvicorn's ``[Errno -2] Name or
    service not known``, naming neither the setting nor the host. Now: the exit status of a
    server that did not start (3, as for a port already in use) and one ERROR line naming
    both, before the app starts."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(free_port()), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_LOG_LEVEL": "info", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].endswith(
        "ERROR gateway.server cannot listen on GATEWAY_HOST (--host) 'no-such-host.invalid': "
        "Name or service not known"
    ), done.stderr
    assert "Traceback" not in done.stderr
    assert "Application startup" not in done.stderr  # stopped before the app started


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"GATEWAY_PIPELINE_RETRIES": "-1"},
            "GATEWAY_PIPELINE_RETRIES: Input should be greater than or equal to 0 (got '-1')",
        ),
        (
            {"GATEWAY_PIPELINE_RETRIES": "11"},
            "GATEWAY_PIPELINE_RETRIES: Input should be less than or equal to 10 (got '11')",
        ),
        (
            {"GATEWAY_PIPELINE_RETRY_MAX_WAIT_S": "-0.5"},
            "GATEWAY_PIPELINE_RETRY_MAX_WAIT_S: Input should be greater than or equal to 0 "
            "(got '-0.5')",
        ),
        (
            {"GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S": "-1"},
            "GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S: Input should be greater than or equal to "
            "0 (got '-1')",
        ),
        (
            {
                "GATEWAY_PIPELINE_RETRY_MAX_WAIT_S": "2",
                "GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S": "5",
            },
            "the settings: GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S (5 s) must be at most "
            "GATEWAY_PIPELINE_RETRY_MAX_WAIT_S (2 s): a 429 without Retry-After would never "
            "be sent again",
        ),
    ],
)
def test_a_retry_limit_out_of_range_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    """The core retry limits are settings (were constants): a negative count or wait, more
    than 10 retries, or a default wait the max wait would never allow stops the start
    with one line naming the setting; 0 retries (never sent again) and 0 s waits start."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value) == [line]
    for name in env:
        monkeypatch.setenv(name, "0")
    settings = Settings()
    for name in env:
        assert getattr(settings, name.removeprefix("GATEWAY_").lower()) == 0


def test_an_unset_default_retry_wait_is_lowered_to_the_max_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GATEWAY_PIPELINE_RETRY_MAX_WAIT_S=0.5 alone starts: the default wait of a 429
    without Retry-After (1 s, unset) is lowered to it, as the V1 byte burst is raised to
    the body bound; only one set above the max wait is refused."""
    monkeypatch.setenv("GATEWAY_PIPELINE_RETRY_MAX_WAIT_S", "0.5")
    assert Settings().pipeline_retry_default_wait_s == 0.5
    monkeypatch.setenv("GATEWAY_PIPELINE_RETRY_MAX_WAIT_S", "20")
    assert Settings().pipeline_retry_default_wait_s == 1.0


def test_negative_retries_stop_gateway_serve_naming_the_setting() -> None:
    """``gateway serve`` with GATEWAY_PIPELINE_RETRIES=-1 exits 2 with one line naming it
    (the setting did not exist: the count was a constant)."""
    stderr = serve_refused({"GATEWAY_PIPELINE_RETRIES": "-1"})
    assert (
        "gateway: GATEWAY_PIPELINE_RETRIES: Input should be greater than or equal to 0 (got '-1')"
    ) in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://:p@ss-w0rd@redis.example:6379", "'ftp://***@redis.example:6379'"),
        ("redis://user:p@ss-w0rd@host:notaport", "'redis://***@host:notaport'"),
        (
            "redis+cluster://:p@ss-w0rd@h1:7000,h2:7000/3",
            "'redis+cluster://***@h1:7000,h2:7000/3'",
        ),
        # a query value holding "@" or a password holding "&token=": the userinfo and the
        # value overlap (which one it is cannot be told), all of it is hidden; the second
        # showed its part before the "&" ('ftp://:w0rd&token=***')
        ("ftp://redis.example?password=p@ss-w0rd", "'ftp://***'"),
        ("ftp://:w0rd&token=p@ss-w0rd@redis.example:6379", "'ftp://***'"),
    ],
    ids=["at-sign", "user-and-at-sign", "cluster-hosts", "query-password", "query-in-password"],
)
def test_an_invalid_redis_url_is_quoted_without_any_of_its_password(url: str, shown: str) -> None:
    """``gateway serve`` refusing GATEWAY_REDIS_URL quotes it with its userinfo hidden: a
    password holding ``@`` (``redis://:p@ss@host``) had its part after the first ``@``
    shown (``redis://:***@ss@host``). Now all of the userinfo up to the last ``@`` is
    ``***``, the hosts of a cluster URL are kept, and a ``password=`` parameter is
    hidden too."""
    stderr = serve_refused({"GATEWAY_REDIS_URL": url})
    assert "ss-w0rd" not in stderr, stderr
    assert "w0rd" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if "GATEWAY_REDIS_URL" in line]
    assert line.endswith(f"(got {shown})"), line


FOLLOWS = "an '@' follows the host"
ENCODE = "must have it percent-encoded: %2F, %3F, %23"


@pytest.mark.parametrize(
    ("url", "password", "problem"),
    [
        ("redis://:Xq7/Zk9@host", "Xq7/Zk9", FOLLOWS),
        ("redis://:Xq7?Zk9@host:6379", "Xq7?Zk9", FOLLOWS),
        ("rediss://:Xq7#Zk9@host:6379/0", "Xq7#Zk9", FOLLOWS),
        ("redis://Uj4:7731/Zk9@host:6379/0", "Uj4:7731/Zk9", FOLLOWS),
        ("redis://:Xq7?socket_timeout=Zk9@host", "Xq7?socket_timeout=Zk9", "no host"),
        ("redis://:7731?socket_timeout=Zk9@host", "7731?socket_timeout=Zk9", "no host"),
        ("redis://h:Xq7/0?password=p@Zk9", "Zk9", "the port is not a number"),
        ("unix://:Xq7/Zk9@/run/redis.sock", "Xq7/Zk9", FOLLOWS),
        ("redis+sentinel://:Xq7/Zk9@s1:26379/0/mymaster", "Xq7/Zk9", "follows the hosts"),
        ("redis+sentinel://:Xq7?Zk9@s1:26379,s2:26379/mymaster", "Xq7?Zk9", "follows the hosts"),
        ("redis+sentinel://Uj4:7731/Zk9@s1:26379/mymaster", "Uj4:7731/Zk9", "follows the hosts"),
        ("redis+cluster://:Xq7#Zk9@n1:7000,n2:7001", "Xq7#Zk9", "follows the hosts"),
    ],
    ids=[
        "slash",
        "question-mark",
        "hash",
        "user-and-numeric-password-start",
        "query-name-in-password",
        "numeric-port-and-query-name",
        "query-password-and-bad-port",
        "unix-slash",
        "sentinel-slash",
        "sentinel-question-mark",
        "sentinel-user-and-numeric-start",
        "cluster-hash",
    ],
)
def test_a_redis_url_whose_password_holds_a_delimiter_is_refused_quoting_none_of_it(
    url: str, password: str, problem: str
) -> None:
    """A password holding an unencoded ``/``, ``?`` or ``#`` ends the URL's authority
    early: redis-py's and the parser's messages quoted its parts as a port, a db, a node
    or a query name (``Port could not be cast to integer value as 'Xq7'``, ``nodes are
    host:port, not ':Xq7'``, ``must be a number, not 'Zk9@host:6379/0'``), and
    ``unix://:Xq7/Zk9@/run/redis.sock`` was taken, its socket ``/Zk9@/run/redis.sock``.
    The real ``gateway serve`` now refuses each, saying what is wrong and to
    percent-encode the password, and no piece of the user or password (split at the
    delimiters) appears in what it writes."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(free_port())],
        env={**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    output = done.stdout + done.stderr
    for piece in re.split(r"[/?#:=@]", password):
        if piece and piece not in ("p", "password"):  # the parameter's name, shown as given
            assert piece not in output, output
    [line] = [line for line in done.stderr.splitlines() if "GATEWAY_REDIS_URL" in line]
    assert problem in line, line
    assert ENCODE in line, line
    assert "Traceback" not in output


# ---------------------------------------------------------------- deploy/'s placeholders

REFUSED = "is a placeholder of deploy/'s examples (CHANGE-ME): replace it with your own value"
COMMENTED_PLACEHOLDERS = re.compile(r'#\s*(GATEWAY_\w+)\s*[:=]\s*"?([^"\s]*CHANGE-ME[^"\s]*)"?')


def _refusal(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> list[str]:
    """setting_errors' lines (``gateway serve``'s) for the environment ``name=value``."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    monkeypatch.delenv(name)
    return setting_errors(refused.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_ADMIN_KEYS", "CHANGE-ME-aaaaaaaaaaaaaaaaaaaa"),
        # shorter than an admin key may be: still the placeholder's message, not "shorter"
        ("GATEWAY_ADMIN_KEYS", "ops-key-1-of-the-gateway, CHANGE-ME"),
        ("GATEWAY_APP_KEYS", "shop,CHANGE-ME"),
        ("GATEWAY_ALEXA_SKILL_IDS", "amzn1.ask.skill.CHANGE-ME"),
        ("GATEWAY_GOOGLE_PROJECT_IDS", "my-project,CHANGE-ME"),
        ("GATEWAY_GOOGLE_TRUSTED_ACCOUNTS", "CHANGE-ME@example.com"),
        ("GATEWAY_VOICEFLOW_API_KEYS", "VF.DM.CHANGE-ME"),
        ("GATEWAY_VOICEFLOW_CORS_ORIGINS", "https://a.example.com, https://CHANGE-ME.example.com"),
        # lower-cased when split: the check sees the value as given
        ("GATEWAY_BARGE_IN_BACKCHANNELS", "okay,CHANGE-ME"),
    ],
)
def test_a_placeholder_in_a_comma_separated_setting_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """The placeholder check saw a comma-separated setting only once it was split (a set
    or a tuple, not a string), so it never refused one: GATEWAY_ADMIN_KEYS=CHANGE-ME-...
    started the gateway with an admin key anybody can read in deploy/. Each item is
    checked now, refused with the words of a plain setting's placeholder."""
    [plain] = _refusal(monkeypatch, "GATEWAY_SECRET_KEY", "CHANGE-ME-" + "k" * 32)
    assert plain.startswith(f"GATEWAY_SECRET_KEY: {REFUSED}")
    [line] = _refusal(monkeypatch, name, value)
    assert line.removesuffix(f" (got {value!r})") == plain.replace("GATEWAY_SECRET_KEY", name)
    monkeypatch.setenv(name, value.replace("CHANGE-ME", "replaced-by-the-operator-0001"))
    Settings()  # the value replaced: taken


def test_a_placeholder_in_an_already_split_setting_is_refused() -> None:
    """Settings given a list (not the environment's string) are checked item by item; a
    secret setting given as a SecretStr by its secret value (it escaped the check)."""
    for field, value in (
        ("app_keys", ["shop", "CHANGE-ME"]),
        ("admin_keys", frozenset({"CHANGE-ME-aaaaaaaaaaaaaaaaaaaa"})),
        ("voiceflow_cors_origins", ("https://CHANGE-ME.example.com",)),
        # a secret given as a SecretStr (not the environment's string) is checked too
        ("secret_key", SecretStr("CHANGE-ME-" + "x" * 40)),
    ):
        with pytest.raises(ValidationError, match=re.escape(REFUSED)) as refused:
            Settings.model_validate({field: value})
        assert [e["loc"] for e in refused.value.errors()] == [(field,)]


def test_each_commented_placeholder_of_deploy_stops_the_start_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/.env.example and kubernetes/secret.yaml list optional settings commented
    out, with CHANGE-ME values (``# GATEWAY_ALEXA_SKILL_IDS=amzn1.ask.skill.CHANGE-ME``).
    One an operator uncomments and leaves so stops the start, naming it; the
    comma-separated ones (app keys, skill ids, project ids, Voiceflow keys) started."""
    found = {
        match[1]: match[2]
        for path in ("deploy/.env.example", "deploy/kubernetes/secret.yaml")
        for match in COMMENTED_PLACEHOLDERS.finditer((ROOT / path).read_text(encoding="utf-8"))
    }
    assert {"GATEWAY_APP_KEYS", "GATEWAY_ALEXA_SKILL_IDS", "GATEWAY_GOOGLE_PROJECT_IDS"} <= set(
        found
    )
    for name, value in found.items():
        [line] = _refusal(monkeypatch, name, value)
        assert line.startswith(f"{name}: {REFUSED}"), line


def test_serve_refuses_an_admin_key_left_as_the_placeholder_without_showing_it() -> None:
    """The real ``gateway serve`` started with GATEWAY_ADMIN_KEYS=CHANGE-ME-...; it stops
    now (exit 2), one line naming the setting, the key not shown."""
    stderr = serve_refused({"GATEWAY_ADMIN_KEYS": "ops-key-1-of-the-gateway,CHANGE-ME-aaaa1234"})
    assert stderr == f"gateway: GATEWAY_ADMIN_KEYS: {REFUSED}, or unset it\n"


@pytest.mark.parametrize("prefix", ["gw{app}", "{gw}", "gw{", "gw}x"])
def test_a_redis_prefix_with_a_brace_stops_the_start(prefix: str) -> None:
    """Redis Cluster hashes a key by its first ``{...}``: a GATEWAY_REDIS_PREFIX holding
    a brace took the place of the session's hash tag (``{gw}:{s:1}:lock`` hashes ``gw``;
    ``gw{:{s:1}`` hashes ``:{s:1``... per key), and every multi-key script failed with
    CROSSSLOT at the first turn, long after a start that said nothing. The settings refuse
    it, and ``gateway serve`` stops (exit 2) naming the setting and the brace."""
    with pytest.raises(ValidationError, match="Redis Cluster would take the prefix's braces"):
        Settings(redis_prefix=prefix)
    stderr = serve_refused({"GATEWAY_REDIS_PREFIX": prefix})
    assert stderr.startswith("gateway: GATEWAY_REDIS_PREFIX: holds '"), stderr
    assert "CROSSSLOT" in stderr
    assert len(stderr.splitlines()) == 1
    assert Settings(redis_prefix="gw-prod:eu.1").redis_prefix == "gw-prod:eu.1"
