"""Gateway settings, read from the environment with the prefix ``GATEWAY_``.

Every setting has an embedded default, so ``gateway serve`` runs with none set:
memory sessions, the demo pipeline, no network and no keys.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.events import MAX_TIMEOUT_S
from gateway.protocol.values import MAX_ID_CHARS, KeyDigests
from gateway.speech.endofturn import BACKCHANNELS
from gateway.speech.tts import FIRST_CLAUSE_CHARS, MAX_AUDIO_S

Carrier = Literal["twilio", "telnyx", "vonage", "plivo", "exotel"]
"""The phone carriers whose calls run on the shared call engine."""
VONAGE_SAMPLE_RATES: Final = (8000, 16000, 24000)
"""The rates (Hz) a Vonage answer's ``audio/l16;rate=`` may ask for (adapters/vonage/
protocol.py RATES): GATEWAY_VONAGE_SAMPLE_RATE must be one."""


PLACEHOLDER: Final = "CHANGE-ME"
"""The marker of the values in deploy/ (.env.example, kubernetes/secret.yaml) that must be
replaced before use: a setting holding it is refused."""
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750 section 2.1's ``b64token``: what ``Authorization: Bearer`` carries (an admin
key with a space, a comma or a non-ASCII letter could never be sent as one)."""
MIN_ADMIN_KEY_CHARS: Final = 16
"""The fewest characters of a GATEWAY_ADMIN_KEYS key: a shorter one is refused at start
(an admin key grants the whole admin API; a short one can be guessed)."""
MAX_CALLS_TIMEOUT_S: Final = 60.0
"""The longest GATEWAY_CALLS_TIMEOUT_S (s). POST /v1/calls of a Telnyx call mints the
call's stream token (good :data:`gateway.io.call.TOKEN_TTL_S`, 300 s) before it sends the
dial, and binds the token to the call when the dial's answer comes, within this timeout
(adapters/telnyx/routes.py ``TelnyxDialer.placed``). With no bound an answer could come
after the token expired: the call was placed but neither bound nor hung up (its stream
refused, the callee hearing nothing). A fifth of the token's life at most, so the rest
is left for the call to ring and its stream to open."""
MAX_PIPELINE_RETRIES: Final = 10
"""The most GATEWAY_PIPELINE_RETRIES: every retry is a request more to a core that is
refusing them (one answering ``Retry-After: 0`` is sent them back to back, the turn's time
bounding only the waits), so the count is bounded; more is a configuration mistake."""
LOG_LEVELS: Final = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The values of GATEWAY_LOG_LEVEL (and ``gateway serve --log-level``), any case: the
levels uvicorn knows (TRACE, below DEBUG, is uvicorn's: it names it in logging when
``gateway serve`` imports it)."""


class CallOverride(BaseModel):
    """One carrier's own call behaviour (a value of GATEWAY_CALL_OVERRIDES); a field left
    unset is the generic GATEWAY_CALL_* setting (``barge_in_max_backchannel_ms``:
    GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS). Times are ms of audio. Raises
    pydantic.ValidationError for an unknown field or a value out of range."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    barge_in: bool | None = None
    barge_in_min_speech_ms: int | None = Field(default=None, ge=0)
    barge_in_max_backchannel_ms: int | None = Field(default=None, ge=0)
    dtmf_mode: Literal["digit", "collect"] | None = None
    dtmf_timeout_ms: int | None = Field(default=None, gt=0)
    frame_ms: int | None = Field(default=None, ge=20, le=40)


class CallBehaviour(BaseModel):
    """The call behaviour one carrier's calls get (:meth:`Settings.call_behaviour`)."""

    model_config = ConfigDict(frozen=True)

    barge_in: bool
    barge_in_min_speech_ms: int
    barge_in_max_backchannel_ms: int
    dtmf_mode: Literal["digit", "collect"]
    dtmf_timeout_ms: int
    frame_ms: int


class Settings(BaseSettings):
    """All configuration of one gateway process.

    Environment variables are the field names upper-cased with the prefix
    ``GATEWAY_`` (for example ``GATEWAY_REDIS_URL``). Times carry their unit in
    the name (``_s`` seconds, ``_ms`` milliseconds); sizes are bytes.
    """

    # no setting is a number without end: "inf" or "nan" (which float() reads) would turn a
    # bound off by accident (a NaN rate refuses nothing), so it is refused at startup
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", allow_inf_nan=False)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    redis_url: str | None = Field(
        default=None,
        description=(
            "redis://, rediss://, unix://, redis+sentinel://host:port[,...]/db/service_name "
            "or redis+cluster://host:port[,...] (gateway/redisconn.py); unset means "
            "in-process memory sessions."
        ),
    )
    redis_prefix: str = Field(
        default="gw",
        description="Prefix of every Redis key; keys of one session share a hash tag, so it "
        "may hold no `{` or `}` (a prefix with one stops the start).",
    )

    redis_max_connections: int = Field(
        default=64, gt=0, description="Connections per process; turns wait for a free one."
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Master key (>= 32 characters) from which every signing key is derived "
        "(HKDF-SHA256 per purpose: Voiceflow sessionKeys, Twilio stream tokens, TTS file ids). "
        "Unset: with GATEWAY_REDIS_URL one random key is created in Redis "
        "(`<prefix>:secret-key`, set-if-absent) and shared by every instance; without Redis, "
        "random per process (a WARNING is logged).",
    )

    pipeline: str = Field(
        default="demo",
        description="The core of every application key not in GATEWAY_PIPELINES: `demo` "
        "(built-in dialogue), an http(s):// URL of the core webhook, `rasa+http(s)://host:5005`, "
        "`voiceflow:[versionID]`, `botpress:[webhookId]`, "
        "`dialogflow-cx:projects/P/locations/L/agents/A` or `openai+http(s)://host/v1` "
        "(gateway/pipeline/__init__.py).",
    )
    pipelines: str | None = Field(
        default=None,
        description="Application key -> core spec (as GATEWAY_PIPELINE): a JSON object, or "
        'the path of a TOML file of `key = "spec"` lines; keys not in it get GATEWAY_PIPELINE.',
    )
    pipeline_connect_timeout_s: float = Field(
        default=3.0,
        gt=0,
        description="Connecting to any core (s); the turn is bounded by GATEWAY_TURN_TIMEOUT_S.",
    )
    pipeline_max_response_bytes: int = Field(
        default=1_048_576, gt=0, description="Largest answer of a core per turn (bytes)."
    )
    pipeline_retries: int = Field(
        default=1,
        ge=0,
        le=MAX_PIPELINE_RETRIES,
        description="How many times a request a core refused unprocessed (HTTP 429, or 503 "
        "with Retry-After) is sent again, each after the wait it asks for, while that fits in "
        "the turn (gateway/pipeline/cores.py, send_retried); 0: never sent again.",
    )
    pipeline_retry_max_wait_s: float = Field(
        default=10.0,
        ge=0,
        description="Longest Retry-After (s) a refused request is sent again after: a core "
        "asking for more is not waited for (the turn fails at once).",
    )
    pipeline_retry_default_wait_s: float = Field(
        default=1.0,
        ge=0,
        description="Wait (s) before sending again a request refused with HTTP 429 and no "
        "readable Retry-After; at most GATEWAY_PIPELINE_RETRY_MAX_WAIT_S (unset: lowered to "
        "it).",
    )
    # -- cores (issue 15): each core's own settings; secrets never in the spec
    rasa_token: SecretStr | None = Field(
        default=None, description="Rasa: sent as `?token=` (the REST channel's auth), if set."
    )
    rasa_stream: bool = Field(
        default=True,
        description="Rasa: ask for `?stream=true` (each bot message forwarded as it comes); "
        "a Rasa that answers one JSON array anyway is read as such.",
    )
    rasa_intro_message: str = Field(
        default="/greet",
        description="Rasa: the message sent for `#intro` (`/greet` is the intent of "
        "`rasa init`'s bot; `/session_start` runs action_session_start).",
    )
    voiceflow_api_key: SecretStr | None = Field(
        default=None, description="Voiceflow: the Dialog Manager API key `VF.DM....` (required)."
    )
    voiceflow_version_id: str = Field(
        default="production",
        description="Voiceflow: the `versionID` header (`development`, `production` or an "
        "id) unless the spec names one (`voiceflow:<versionID>`).",
    )
    voiceflow_runtime_url: str = Field(
        default="https://general-runtime.voiceflow.com",
        description="Voiceflow: the Dialog Manager runtime's base URL.",
    )
    voiceflow_project_id: str | None = Field(
        default=None,
        description="Voiceflow: with it the streaming interact endpoint "
        "(`/v2/project/{projectID}/user/{userID}/interact/stream`) is used, traces forwarded "
        "as they come; without it the state interact endpoint (one JSON array).",
    )
    voiceflow_tts: bool = Field(
        default=False,
        description="Voiceflow: ask for its own TTS (`config.tts`); `speak` traces' http(s) "
        "`src` become the items' audio.",
    )
    botpress_url: str = Field(
        default="https://chat.botpress.cloud",
        description="Botpress: the Chat API's base URL (the webhook id is appended).",
    )
    botpress_webhook_id: str | None = Field(
        default=None,
        description="Botpress: the Chat integration's webhook id unless the spec names it "
        "(`botpress:<webhookId>`).",
    )
    botpress_encryption_key: SecretStr | None = Field(
        default=None,
        description="Botpress: the Chat integration's Encryption Key (manual mode: the user key "
        "is an HS256 JWT of the user id); unset: users are created with POST /users.",
    )
    botpress_idle_s: float = Field(
        default=1.0,
        gt=0,
        description="Botpress: the bot's turn is over after this gap with no bot message (the "
        "Chat API has no end-of-turn marker), or at once after a choice, a transfer or the end.",
    )
    botpress_reply_timeout_s: float = Field(
        default=8.0,
        gt=0,
        description="Botpress: wait for the bot's first message of a turn; none by then is a "
        "pipeline error (after `#intro` and other actions: an empty answer).",
    )

    app_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated allowed application keys; empty allows any non-empty key.",
    )
    public_url: str = Field(
        default="http://localhost:8080",
        description="Base URL under which clients and platforms reach this gateway; unset: "
        "http://localhost:{port} (GATEWAY_PORT or --port).",
    )

    console_enabled: bool = Field(
        default=True,
        description="Serve the browser console (a Flowstorm Socket V1 client) at /console.",
    )

    turn_timeout_s: float = Field(default=10.0, gt=0, description="Pipeline time per turn.")
    session_timeout_s: int = Field(
        default=1800,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Idle time after which a session expires (at most 365 days).",
    )
    lock_wait_s: float = Field(
        default=15.0, gt=0, description="How long a turn waits for the session lock."
    )
    lock_lease_s: float = Field(
        default=3.0,
        ge=0.3,
        description="Lease of a session lock in Redis; the running turn renews it every "
        "third of it, so a turn of a crashed instance frees its session within one lease.",
    )
    error_turn: bool = Field(
        default=False,
        description="On a pipeline failure run the `#error` turn before giving an ErrorEvent.",
    )
    error_turn_min_s: float = Field(
        default=2.0,
        gt=0,
        description="Least core time (s) of the `#error` turn: it gets what is left of the "
        "turn's GATEWAY_TURN_TIMEOUT_S, but at least this, so a turn with GATEWAY_ERROR_TURN "
        "takes at most GATEWAY_TURN_TIMEOUT_S + this.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, gt=0, description="Largest text/JSON request body or WebSocket text."
    )
    max_log_entries: int = Field(default=500, gt=0, description="Client log entries kept.")
    max_log_chars: int = Field(
        default=100_000,
        gt=0,
        description="Characters of client log text kept with a session, all entries "
        "together (the oldest go first; a longer entry is cut).",
    )
    max_attributes_bytes: int = Field(
        default=65_536,
        gt=0,
        description="Bytes of JSON a session's attributes may take: a turn whose client "
        "attributes (Flowstorm V1 Request `attributes`) would take them past it, and make "
        "them larger, is refused (an Error of source `client`), the session unchanged; "
        "attributes a core leaves past it are kept, with a WARNING naming the core.",
    )
    shutdown_timeout_s: int = Field(
        default=30,
        gt=0,
        description="On SIGTERM: stop accepting, then wait at most this long (from the "
        "signal) for open requests and connections, and for the answers of turns running on "
        "Flowstorm V1 and Voiceflow sockets, before closing them (running turns then get "
        "GATEWAY_LOCK_WAIT_S + GATEWAY_TURN_TIMEOUT_S + 1 s more to save their sessions). "
        "Keep it longer than GATEWAY_LOCK_WAIT_S + GATEWAY_TURN_TIMEOUT_S: an HTTP turn "
        "still running when it ends is answered 500.",
    )
    # Connection limits of `gateway serve` (gateway/server.py)
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A request's headers must arrive within this time of the connection "
        "(on a kept-alive connection: of the request's first byte); else 408 and close.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A request body must arrive within this time of the headers, plus 1 s "
        "per GATEWAY_BODY_MIN_RATE bytes received; else 408 (or, once answered, close).",
    )
    body_min_rate: int = Field(
        default=500,
        gt=0,
        description="Bytes per second that extend a body's deadline by one second; a "
        "body arriving at least this fast is never cut (streamed audio is 8-32 kB/s).",
    )
    send_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A connection whose send buffer stays full this long (the peer does "
        "not read) is closed: WebSocket close 1008, HTTP aborted.",
    )
    max_connections: int | None = Field(
        default=None,
        gt=0,
        description="Open client connections (HTTP and WebSocket) per process; beyond it the "
        "longest-waiting idle or slow connection is closed to make room, else the new one "
        "gets 503. Unset: 2/3 of (the open-file limit - 128 - GATEWAY_REDIS_MAX_CONNECTIONS), "
        "at most 10000.",
    )
    keep_alive_timeout_s: int = Field(
        default=75,
        gt=0,
        description="An idle kept-alive HTTP connection is closed after this time. Longer "
        "than the idle timeout of the proxy or load balancer in front (60 s for ingress-nginx "
        "upstreams and AWS ALB): a proxy that reuses a connection the gateway has just closed "
        "answers its client 502 (a POST, such as a platform's webhook, is not retried).",
    )
    log_level: str = Field(
        default="INFO",
        description="TRACE, DEBUG, INFO, WARNING, ERROR or CRITICAL (any case); another value "
        "stops the gateway at startup.",
    )
    access_log: bool = Field(
        default=False,
        description="Log a line per HTTP request (uvicorn's access log, credential query "
        "values hidden). Off: a turn already logs its own line (channel, session, outcome, "
        "latency, request id), and the access line costs about as much again.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text` or `json` (any case); `json` writes one JSON object per line.",
    )
    log_hash_key: SecretStr | None = Field(
        default=None,
        description="Overrides the key of the hash that names sessions in the log (session "
        "ids are credentials and are never logged); unset: the master key's `log-session-ref` "
        "key (GATEWAY_SECRET_KEY, or shared through Redis; random per process without either).",
    )
    memory_max_sessions: int = Field(
        default=100_000,
        gt=0,
        description="Memory store (no GATEWAY_REDIS_URL): most sessions kept; when full, the "
        "session idle the longest is dropped (logged at WARNING).",
    )
    not_found_burst: int = Field(
        default=20,
        gt=0,
        description="Flowstorm V2: 'unknown session' answers one client IP may get at once; "
        "beyond it (and the refill rate) its requests with a session cookie get 429.",
    )
    not_found_per_s: float = Field(
        default=0.5,
        gt=0,
        description="Flowstorm V2: refill rate of that allowance ('unknown session' answers "
        "per second and client IP, counted per process).",
    )

    # Speech: recognition, synthesis, endpointing
    speech_warm_up: bool = Field(
        default=False,
        description="Load the TTS voice and a recognizer worker at startup (in the background) "
        "so the first spoken turn is not slowed by model loading (~2-5 s).",
    )
    stt_max_streams: int = Field(
        default=4, gt=0, description="Concurrent recognitions (each a pocketsphinx worker)."
    )
    stt_queue: int = Field(
        default=4,
        ge=0,
        description="Recognitions that may wait for a free recognizer when all "
        "GATEWAY_STT_MAX_STREAMS are busy; beyond that a new audio turn is refused at once "
        "(V1 Error source `stt`, V2 HTTP 503 + Retry-After, Twilio busy line). 0: no waiting.",
    )
    stt_queue_wait_ms: int = Field(
        default=3000,
        gt=0,
        description="Longest wait of a queued recognition for a recognizer; then it is "
        "refused as busy.",
    )
    tts_provider: Literal["piper", "espeak-ng"] = Field(
        default="piper", description="`piper` (neural, offline) or `espeak-ng` (lighter)."
    )
    tts_voice: str | None = Field(
        default=None,
        description="Piper: path of an .onnx voice (default the en_US joe voice); "
        "espeak-ng: a voice name (default en-us).",
    )
    tts_cache_ttl_s: int = Field(
        default=86_400,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Life of a TTS link's spec and file in Redis (at most 365 days).",
    )
    tts_max_chars: int = Field(
        default=1500,
        gt=0,
        description="Characters (SSML markup included) of one response item that are "
        "spoken (1500: about 100 s of speech); the rest of a longer item is sent as text "
        "only.",
    )
    tts_max_audio_s: float = Field(
        default=MAX_AUDIO_S,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Seconds of audio one response item gives at most: synthesis of an "
        "item stops there (the audio so far is kept; one WARNING), so text that is far "
        "longer spoken than written (symbols, numbers, SSML pauses) cannot hold the TTS "
        "thread for minutes. The default fits the speech of GATEWAY_TTS_MAX_CHARS' 1500 "
        "characters.",
    )
    tts_max_running: int = Field(
        default=1,
        gt=0,
        description="Syntheses running at once per process (Piper synthesizes one piece "
        "at a time per process anyway).",
    )
    tts_queue_size: int = Field(
        default=8,
        ge=0,
        description="Syntheses that may wait for a running one; beyond that a /file/tts "
        "miss gets 503 + Retry-After and streamed speech an Error with source `tts`.",
    )
    tts_threads: int = Field(
        default=1, gt=0, description="ONNX Runtime threads of one Piper synthesis."
    )
    tts_first_clause_chars: int = Field(
        default=FIRST_CLAUSE_CHARS,
        ge=0,
        description="Piper: an item's first piece ends at its first clause end (a comma "
        "too) once it holds this many characters, or before a phrase when its first clause "
        "is long, so its first audio comes sooner ('Okay,' of 'Okay, done.' in about a third "
        "of the time; a call then sends one more piece and mark for such an item); 0: the "
        "first piece ends at a sentence end.",
    )
    tts_prefetch: bool = Field(
        default=False,
        description="Synthesize each linked item in the background as soon as its link is "
        "issued, while the TTS queue is at most half full (never delays a turn).",
    )
    tts_cache_max_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Memory TTS cache size (no Redis)."
    )
    vad_aggressiveness: int = Field(default=2, ge=0, le=3, description="WebRTC VAD mode 0..3.")
    vad_energy_floor: int = Field(
        default=50,
        ge=0,
        description="Frames quieter than this RMS (16-bit samples, of 32768) are silence "
        "whatever the VAD says: ends WebRTC VAD's 100-250 ms hangover after the last word "
        "on a quiet line, so the end-of-turn silence counts real silence. 0: the VAD alone.",
    )
    vad_min_speech_ms: int = Field(
        default=150, ge=0, description="Voiced audio that starts speech (noise stays below)."
    )
    vad_trailing_silence_ms: int = Field(
        default=700,
        gt=0,
        description="Silence after speech that ends an utterance (the long end of turn: "
        "while the partial transcript ends mid-phrase or on a filler).",
    )
    end_of_turn_short_ms: int = Field(
        default=250,
        ge=0,
        description="Adaptive end of turn: the silence that ends an utterance whose partial "
        "transcript reads as complete (gateway/speech/endofturn.py); 0: always "
        "GATEWAY_VAD_TRAILING_SILENCE_MS (no adaptation).",
    )
    end_of_turn_tentative_ms: int = Field(
        default=120,
        ge=0,
        description="While the short end-of-turn silence applies, end the utterance "
        "tentatively after this much of it: the recognizer's final search runs during the "
        "rest of the silence, so the transcript is ready when it ends; speech resuming "
        "takes the end back (one utterance). 0: off (the final search starts at the end).",
    )
    stt_silence_tail_ms: int = Field(
        default=300,
        ge=0,
        description="Trailing silence after the last voiced frame given to the recognizer; "
        "the rest of the silence before the end of turn is held back (fed only if the caller "
        "speaks again), saving the recognizer's CPU on audio that cannot change its result. "
        "0: the recognizer is given all of it.",
    )
    silence_timeout_ms: int = Field(
        default=5000, gt=0, description="No speech for this long gives the `#silence` input."
    )
    max_audio_s: float = Field(
        default=30.0, gt=0, description="Longest utterance accepted (audio time)."
    )
    max_audio_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="Largest audio request body (V2 files)."
    )

    # Alexa, Google, Dialogflow
    alexa_verify: bool = Field(
        default=True,
        description="Verify Alexa request signatures; `false` only for local development.",
    )
    alexa_skill_ids: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated skill ids (applicationId) served on /alexa; with "
        "verification on and none set, /alexa refuses requests (503).",
    )
    alexa_catch_all_intent: str = Field(
        default="CatchAllIntent",
        min_length=1,
        description="Intent whose AMAZON.SearchQuery slot carries the user's free text.",
    )
    alexa_catch_all_slot: str = Field(
        default="query", min_length=1, description="The catch-all intent's slot name."
    )
    flowstorm_v1_frame_burst: int = Field(
        default=3000,
        gt=0,
        description="Flowstorm Socket V1: frames (text or binary, audio included) a "
        "connection may send at once; beyond it and GATEWAY_FLOWSTORM_V1_FRAMES_PER_S it "
        "gets an Error (source `client`) and is closed 1008. Frames that piled up while "
        "the gateway was busy (audio backpressure) are not counted against it; the burst "
        "covers a network stall (375 frames a second behind 8 s of it).",
    )
    flowstorm_v1_frames_per_s: float = Field(
        default=1000,
        gt=0,
        description="Flowstorm Socket V1: frames a second a connection may send, sustained "
        "(real-time audio in 20 ms frames is 50; 2.7 ms AudioWorklet quanta at 48 kHz 375).",
    )
    flowstorm_v1_bytes_per_s: float = Field(
        default=262_144,
        gt=0,
        description="Flowstorm Socket V1: bytes a second a connection may send, sustained "
        "(text frames as UTF-8, audio included; beyond it and "
        "GATEWAY_FLOWSTORM_V1_BYTE_BURST it gets an Error (source `client`) and is closed "
        "1008): 256 KiB, 8 times the most audio V1 takes (16 kHz 16-bit mono PCM, 32,000 "
        "bytes a second) with room for its text events, far below what "
        "GATEWAY_FLOWSTORM_V1_FRAMES_PER_S frames of GATEWAY_MAX_BODY_BYTES each would be.",
    )
    flowstorm_v1_byte_burst: int = Field(
        default=4 * 1_048_576,
        gt=0,
        description="Flowstorm Socket V1: bytes a connection may send at once (see "
        "GATEWAY_FLOWSTORM_V1_BYTES_PER_S; bytes that piled up while the gateway was busy "
        "are not counted against it). 4 MiB: four frames of the default "
        "GATEWAY_MAX_BODY_BYTES, or 2 minutes of 32,000-byte-a-second audio delivered at "
        "once after a network stall (the frame burst covers 8 s). At least "
        "GATEWAY_MAX_BODY_BYTES (one frame of the largest size must fit); unset, it is "
        "raised to GATEWAY_MAX_BODY_BYTES when that is larger.",
    )
    flowstorm_v2_marker_wait_s: float = Field(
        default=3.0,
        gt=0,
        description="How long a V2 `GET /client` waits for a recognition to start on its "
        "session before it ends with an empty answer.",
    )
    alexa_deadline_s: float = Field(
        default=6.5,
        gt=0,
        lt=8,
        description="Time /alexa gives a turn before answering 'still working' (Alexa waits 8 s).",
    )
    google_verify: bool = Field(
        default=True,
        description="Verify the Google-Assistant-Signature JWT on /google; `false` only for "
        "local development.",
    )
    google_project_ids: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated Actions project ids (the JWT audience); with "
        "verification on and none set, /google refuses requests (503).",
    )
    google_trusted_accounts: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated Google account emails (e.g. a monitoring probe's "
        "service account) whose ID tokens /google accepts besides Google Assistant's own "
        "request tokens: the token must still have a project id of "
        "GATEWAY_GOOGLE_PROJECT_IDS as audience, and carry this `email` with "
        "`email_verified` true. Unset (the default), every token naming an account "
        "(`sub`, `azp` or `email`) is refused (401, reason `account_token`): any Google "
        "Cloud service account can get a Google-signed ID token for any audience, your "
        "project id too, while Assistant's tokens name no account.",
    )
    google_deadline_s: float = Field(
        default=9.0,
        gt=0,
        lt=10,
        description="Time /google gives a turn before answering 'still working' (Google: 10 s).",
    )
    dialogflow_auth: SecretStr | None = Field(
        default=None,
        description="`basic:USER:PASSWORD` or `bearer:TOKEN` required on /dialogflow; unset "
        "(with GATEWAY_DIALOGFLOW_VERIFY on), /dialogflow refuses requests (503).",
    )
    dialogflow_verify: bool = Field(
        default=True,
        description="Require GATEWAY_DIALOGFLOW_AUTH on /dialogflow; `false` (and no auth set) "
        "opens it to anyone, only for local development.",
    )
    dialogflow_deadline_s: float = Field(
        default=4.5,
        gt=0,
        lt=30,
        description="Time /dialogflow gives a turn before answering 'still working' "
        "(Dialogflow ES waits 5 s, CX 5 s by default).",
    )
    voice_still_working_text: str = Field(
        default="I am still working on that. Please ask me again in a moment.",
        min_length=1,
        description="Said by voice assistants when a turn outlives the platform's deadline.",
    )
    voice_error_text: str = Field(
        default="Sorry, something went wrong. Please try again.",
        min_length=1,
        description="Said by voice assistants when the core pipeline or the gateway failed.",
    )

    # Phone calls on every carrier (gateway/io/call.py call_config): the generic behaviour,
    # a carrier's own in GATEWAY_CALL_OVERRIDES (and Twilio's GATEWAY_TWILIO_* aliases)
    call_barge_in: bool = Field(
        default=True,
        description="The caller's speech (or a key press) interrupts the bot's audio.",
    )
    call_barge_in_min_speech_ms: int = Field(
        default=150,
        ge=0,
        description="Speech that must last this long (audio ms) before it interrupts the bot.",
    )
    call_dtmf_mode: Literal["digit", "collect"] = Field(
        default="digit",
        description="`digit`: each key is an input; `collect`: keys until `#`, a pause or "
        "64 keys (gateway/protocol/call.py MAX_DTMF_DIGITS).",
    )
    call_dtmf_timeout_ms: int = Field(
        default=2000, gt=0, description="`collect` mode: a pause this long ends the digits."
    )
    call_frame_ms: int = Field(
        default=20,
        ge=20,
        le=40,
        description="Outbound audio per frame (ms) on carriers whose frames may vary "
        "(Twilio, Plivo); Telnyx and Vonage take 20 ms, Exotel its own chunks.",
    )
    call_final_mark_grace_s: float = Field(
        default=5.0,
        gt=0,
        description="After the expected end of a call's last audio (the final mark sent "
        "after it), how long the mark may take to come back before the call is hung up "
        "(or transferred) anyway.",
    )
    call_overrides: dict[Carrier, CallOverride] = Field(
        default_factory=dict,
        description="Per-carrier call behaviour over the GATEWAY_CALL_* settings, JSON: "
        '`{"telnyx": {"dtmf_mode": "collect", "dtmf_timeout_ms": 3000}, "vonage": '
        '{"barge_in": false}}` (fields: barge_in, barge_in_min_speech_ms, '
        "barge_in_max_backchannel_ms (over GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS), dtmf_mode, "
        "dtmf_timeout_ms, frame_ms).",
    )

    # Twilio
    twilio_auth_token: SecretStr | None = Field(
        default=None,
        description="Twilio auth token: X-Twilio-Signature is verified on /twilio/* when set "
        "(requests signed with a webhook shared key: GATEWAY_TWILIO_WEBHOOK_SHARED_KEY; both "
        "unset: not verified, local development only; a WARNING is logged at startup).",
    )
    twilio_webhook_shared_key: SecretStr | None = Field(
        default=None,
        description="The secret of the SharedKey of a Twilio Webhooks Rule: a request with "
        "X-Twilio-Webhooks-Signature-Settings (`key=...,algorithm=HMAC_SHA256`) is verified "
        "with it and the header's algorithm (a supported one: HMAC_SHA1, HMAC_SHA256); unset: "
        "such requests are refused (403 naming this setting, a WARNING). Set alone, it "
        "enables verification: requests without the header then need the auth token.",
    )
    twilio_account_sid: str | None = Field(
        default=None,
        description="Twilio account SID (AC...); with the auth token, calls are hung up "
        "through the REST API (Calls/{CallSid} Status=completed), else by closing the stream.",
    )
    twilio_api_base_url: str = Field(
        default="https://api.twilio.com",
        description="Base URL of the Twilio REST API used for hanging up.",
    )
    twilio_stream_secret: SecretStr | None = Field(
        default=None,
        description="Overrides the key of the one-time per-call stream tokens; unset: the "
        "master key's `twilio-stream-token` key when it is shared (GATEWAY_SECRET_KEY or "
        "Redis), else derived from the auth token, else random per process (one instance).",
    )
    twilio_stream_token_ttl_s: int = Field(
        default=120, gt=0, description="How long a stream token from /twilio/voice is valid."
    )
    twilio_app_key: str = Field(
        default="twilio",
        min_length=1,
        description="Application key of calls whose webhook URL carries no `?key=`.",
    )
    twilio_barge_in: bool | None = Field(
        default=None,
        description="Twilio's own GATEWAY_CALL_BARGE_IN (unset: that one).",
    )
    twilio_barge_in_min_speech_ms: int | None = Field(
        default=None,
        ge=0,
        description="Twilio's own GATEWAY_CALL_BARGE_IN_MIN_SPEECH_MS (unset: that one).",
    )
    barge_in_backchannels: Annotated[tuple[str, ...], NoDecode] = Field(
        default=BACKCHANNELS,
        description="Comma-separated backchannels and fillers that, said over the bot on a "
        "call, do not interrupt it (its audio pauses and resumes; Plivo's and Exotel's, which "
        "cannot be paused, plays on); fillers such as `um` and noise (no words) never do.",
    )
    barge_in_max_backchannel_ms: int = Field(
        default=1000,
        ge=0,
        description="Voiced speech over the bot this long interrupts it even before a word "
        "is recognised (longer than any backchannel); 0: any speech of "
        "GATEWAY_CALL_BARGE_IN_MIN_SPEECH_MS interrupts at once (no pause and judging). A "
        "carrier's own: `barge_in_max_backchannel_ms` in GATEWAY_CALL_OVERRIDES.",
    )
    twilio_dtmf_mode: Literal["digit", "collect"] | None = Field(
        default=None, description="Twilio's own GATEWAY_CALL_DTMF_MODE (unset: that one)."
    )
    twilio_dtmf_timeout_ms: int | None = Field(
        default=None,
        gt=0,
        description="Twilio's own GATEWAY_CALL_DTMF_TIMEOUT_MS (unset: that one).",
    )
    twilio_start_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A media stream that has not sent `start` this long after it was "
        "accepted is closed (WebSocket close 1008).",
    )
    twilio_frame_ms: int | None = Field(
        default=None,
        ge=20,
        le=40,
        description="Twilio's own GATEWAY_CALL_FRAME_MS: outbound μ-law frame length (ms).",
    )
    twilio_send_ahead_ms: int = Field(
        default=60,
        ge=0,
        description="How far outbound audio may run ahead of real time (jitter margin).",
    )
    twilio_busy_text: str = Field(
        default="Sorry, all our lines are busy. Please call again later.",
        min_length=1,
        description="Said (TwiML <Say>, then <Hangup/>) to a new call while speech "
        "recognition is saturated (GATEWAY_STT_MAX_STREAMS busy, GATEWAY_STT_QUEUE full).",
    )

    # The admin API (gateway/admin.py): push and session view (gateway/push.py), calls
    admin_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        repr=False,  # credentials, as the SecretStr settings: not in repr(settings)
        description="Comma-separated keys of the admin API (`POST /v1/push`, "
        "`GET /v1/sessions/{id}`, `POST /v1/calls`), sent as `Authorization: Bearer KEY`, "
        "each an RFC 6750 bearer token (letters, digits, `-._~+/`, then any `=`) of at "
        "least 16 characters; unset: the admin API refuses every request (403).",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token `GET`/`HEAD /metrics` require (`Authorization: Bearer "
        "TOKEN`; without it or with another: 401 and a `WWW-Authenticate: Bearer` "
        "challenge), a bearer token (letters, digits, `-._~+/`, then any `=`) of at least "
        "16 characters; several, comma-separated, are each taken (to rotate it without "
        "refusing the scraper); admin keys are not taken there. Unset: /metrics answers "
        "whoever reaches the port (with GATEWAY_REDIS_URL set, one INFO line at startup "
        "says so).",
    )
    admin_failures_burst: int = Field(
        default=10,
        gt=0,
        description="Admin API: wrong admin keys one client address may send at once; beyond "
        "it (and the refill rate) every admin request of that address gets 429 with "
        "`Retry-After` before its key is looked at (counted per process). The same "
        "allowance, counted apart, bounds wrong GATEWAY_METRICS_TOKEN tokens on /metrics.",
    )
    admin_failures_per_s: float = Field(
        default=0.1,
        gt=0,
        description="Admin API: refill rate of that allowance (wrong admin keys per second "
        "and client address, counted per process); also that of wrong metrics tokens.",
    )
    calls_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time per call-control REST request to a carrier (s), at most "
        f"{MAX_CALLS_TIMEOUT_S:g}: a dial's stream token must still be good when the "
        "dial's answer comes.",
    )
    twilio_machine_detection: Literal["Enable", "DetectMessageEnd"] = Field(
        default="Enable",
        description="Twilio `MachineDetection` of outbound calls when a request asks for "
        "answering-machine detection (asynchronous, AsyncAmd=true).",
    )
    telnyx_api_key: SecretStr | None = Field(
        default=None,
        description="Telnyx API key (Bearer) for Call Control: outbound calls, transfer, "
        "hang-up; one that is no bearer token stops the start.",
    )
    telnyx_connection_id: str | None = Field(
        default=None,
        description="Telnyx Call Control application (connection) id outbound calls are placed "
        "from.",
    )
    telnyx_api_base_url: str = Field(
        default="https://api.telnyx.com", description="Base URL of the Telnyx REST API."
    )
    telnyx_public_key: str | None = Field(
        default=None,
        description="Telnyx webhook public key (base64 of 32 Ed25519 bytes, Mission Control "
        "portal): Call Control webhooks are verified with it; unset: refused.",
    )
    vonage_application_id: str | None = Field(
        default=None, description="Vonage application id (the `application_id` of API JWTs)."
    )
    vonage_private_key: SecretStr | None = Field(
        default=None,
        description="The Vonage application's private key (PEM) that signs API JWTs (RS256); "
        "anything but an unencrypted RSA private key stops the start.",
    )
    vonage_api_base_url: str = Field(
        default="https://api.nexmo.com", description="Base URL of the Vonage Voice API."
    )
    vonage_signature_secret: SecretStr | None = Field(
        default=None,
        description="The Vonage account's signature secret (Dashboard -> Settings): signed "
        "webhooks (the answer URL) are verified with it (HS256 JWT); unset: refused.",
    )
    vonage_sample_rate: int = Field(
        default=16000,
        description="The rate of the Vonage WebSocket's linear PCM (Hz): 16000, 8000 or 24000.",
    )
    plivo_auth_id: str | None = Field(
        default=None,
        description="Plivo Auth ID (Basic auth user); one that is not letters and digits "
        "stops the start.",
    )
    plivo_auth_token: SecretStr | None = Field(
        default=None, description="Plivo Auth Token (Basic auth password)."
    )
    plivo_api_base_url: str = Field(
        default="https://api.plivo.com", description="Base URL of the Plivo REST API."
    )
    exotel_api_key: str | None = Field(
        default=None,
        description="Exotel API key: the Voicebot applet's stream URL carries it as Basic "
        "auth (wss://KEY:TOKEN@host/exotel/stream); unset (or no token): streams refused.",
    )
    exotel_api_token: SecretStr | None = Field(
        default=None, description="Exotel API token (the Basic auth password of the stream)."
    )
    # proactive push, outbox and session view (/v1/push, /v1/sessions/{id}; gateway/push.py)
    outbox_max: int = Field(
        default=100,
        gt=0,
        description="Undelivered events a session's outbox holds; a push beyond is refused "
        "(`outbox-full`). Twice as many events are kept for clients that resume.",
    )
    outbox_ttl_s: int = Field(
        default=3600,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Time an outbox's events (queued pushes, events kept for resume) live "
        "after its last append; its numbering (seq) lives as long as its session, plus this.",
    )
    push_ack_ms: int = Field(
        default=1000,
        gt=0,
        description="How long a push waits for a live connection (on any instance) to confirm "
        "it sent the push before answering `queued`.",
    )

    # Voiceflow socket.io (/v4/interact/socket)
    voiceflow_secret: SecretStr | None = Field(
        default=None,
        description="Overrides the key (>= 32 characters) that signs Voiceflow sessionKeys "
        "(HS256 JWTs); the same on every instance. Unset: the master key's "
        "`voiceflow-session-key` key (see GATEWAY_SECRET_KEY; shared through Redis).",
    )
    voiceflow_session_key_ttl_s: int = Field(
        default=86_400,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="How long a Voiceflow sessionKey can resume its session after the key's "
        "issue or the session's last activity, whichever is later: the key of an active "
        "conversation does not expire (the session itself also ends after "
        "GATEWAY_SESSION_TIMEOUT_S idle).",
    )
    voiceflow_session_key_max_age_s: int = Field(
        default=604_800,
        ge=0,
        le=MAX_TIMEOUT_S,
        description="The oldest a Voiceflow sessionKey may be (from its issue) to resume its "
        "session, however active the session: an older one gets `newSessionRequired: "
        "true` as a forged one does, so a key leaked once does not open its session for "
        "as long as the session lives; a connection whose key reaches it is told "
        '`session.ended {reason: "session_key_expired"}` then (or, while an action runs, '
        "when it has ended). 0: no limit.",
    )
    voiceflow_api_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        repr=False,  # credentials, as the SecretStr settings: not in repr(settings)
        description="Comma-separated API keys accepted as client.start `authorization`; "
        "unset: not checked.",
    )
    voiceflow_cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("*",),
        description="Comma-separated origins allowed to open the socket.io connection from a "
        "browser; `*` any (the connection carries no cookies), empty: same origin only.",
    )
    voiceflow_restart_grace_s: float = Field(
        default=2.0,
        ge=0,
        description="On SIGTERM/SIGINT, time given to tell connected clients `server.restart` "
        "and close their connections before the server stops; running actions get its first "
        "half to end (their traces and `completed` first); a client whose action still runs "
        "is told once it has ended, within GATEWAY_SHUTDOWN_TIMEOUT_S.",
    )
    voiceflow_answer_ttl_s: int = Field(
        default=600,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="How long the answer of an action whose client left while it ran "
        "(traces and `completed`) is kept for the session's next connection (client.start "
        "with its sessionKey, on any instance), which gets it once; at most 4 answers and "
        "256 KiB per session.",
    )

    # Dialogflow CX and OpenAI-compatible cores
    dialogflow_cx_credentials: str | None = Field(
        default=None,
        description="Path of the Google service-account JSON key the `dialogflow-cx:` core "
        "authenticates with (scope cloud-platform); its `token_uri` is the OAuth token endpoint.",
    )
    dialogflow_cx_language: str | None = Field(
        default=None,
        description="`queryInput.languageCode` sent to Dialogflow CX; unset: the turn's locale.",
    )
    dialogflow_cx_endpoint: str | None = Field(
        default=None,
        description="Base URL of the Dialogflow CX API; unset: "
        "`https://<location>-dialogflow.googleapis.com` (`dialogflow.googleapis.com` for global).",
    )
    dialogflow_cx_environment: str | None = Field(
        default=None,
        description="Environment id of the agent (`.../environments/<id>/sessions/...`); "
        "unset: the draft.",
    )
    dialogflow_cx_welcome_event: str = Field(
        default="WELCOME", description="The event `#intro` triggers (`queryInput.event`)."
    )
    dialogflow_cx_no_input_event: str = Field(
        default="sys.no-input-default", description="The event `#silence` triggers."
    )
    dialogflow_cx_handoff_target: str | None = Field(
        default=None,
        description="Transfer target (E.164 number or SIP URI) of a `liveAgentHandoff` whose "
        "metadata names none.",
    )
    dialogflow_cx_streaming: bool = Field(
        default=False,
        description="Use `:serverStreamingDetectIntent`, forwarding PARTIAL responses' messages "
        "as they arrive (fulfillments with partial response enabled).",
    )
    openai_api_key: SecretStr | None = Field(
        default=None, description="Bearer key of the `openai+http(s)://` core."
    )
    openai_model: str | None = Field(
        default=None, description="`model` of the chat completions requests (required)."
    )
    openai_system_prompt: str = Field(
        default="You are a helpful voice assistant. Answer briefly, in plain sentences.",
        description="The system message that starts every conversation.",
    )
    openai_max_history: int = Field(
        default=20,
        gt=0,
        description="User and assistant messages kept in the session (the oldest dropped first).",
    )
    openai_temperature: float | None = Field(
        default=None, ge=0, le=2, description="`temperature` of the requests; unset: the server's."
    )
    openai_max_tokens: int | None = Field(
        default=None, gt=0, description="`max_tokens` of the requests; unset: the server's."
    )
    openai_tools: bool = Field(
        default=True,
        description="Offer the model the `end_session` and `transfer` tools.",
    )
    openai_transfer_target: str | None = Field(
        default=None,
        description="Where the model's `transfer` tool hands the conversation (E.164 number "
        "or SIP URI); unset: the tool is not offered.",
    )

    @field_validator("log_level", mode="after")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        """One of :data:`LOG_LEVELS` (any case), upper-cased: another value stopped
        ``gateway serve`` with logging's traceback (``Unknown level``)."""
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format_any_case(cls, value: object) -> object:
        """GATEWAY_LOG_FORMAT in any case (``JSON``, `` Text ``), lower-cased, as
        GATEWAY_LOG_LEVEL takes any case: ``JSON`` stopped the start."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_url_form(cls, value: str | None) -> str | None:
        """A malformed GATEWAY_REDIS_URL stops the gateway at startup, saying why."""
        if value:
            from gateway.redisconn import parse_redis_url

            parse_redis_url(value)
        return value

    @field_validator("redis_prefix", mode="after")
    @classmethod
    def _redis_prefix_without_braces(cls, value: str) -> str:
        """A GATEWAY_REDIS_PREFIX holding ``{`` or ``}`` stops the start: Redis Cluster
        hashes a key by its first ``{...}`` (its hash tag), so a brace of the prefix would
        take the place of the session's hash tag (or the tag would go unclosed): the keys
        of one session would land on different slots and every multi-key script fail with
        CROSSSLOT, or all sessions on one slot."""
        braces = sorted({c for c in value if c in "{}"})
        if braces:
            raise ValueError(
                f"holds {' and '.join(repr(c) for c in braces)}: Redis Cluster would take the "
                "prefix's braces for the keys' hash tag (the keys of one session on different "
                "slots: CROSSSLOT); use letters, digits, '-', '_', ':' or '.'"
            )
        return value

    @field_validator("host", mode="after")
    @classmethod
    def _check_host(cls, value: str) -> str:
        """An address to bind: an empty GATEWAY_HOST (``--host ""``; a template's unset
        variable, ``GATEWAY_HOST=${HOST}``) made uvicorn listen on every interface, IPv4
        and IPv6, not on the default 127.0.0.1."""
        if not value.strip():
            raise ValueError(
                "is empty, which would listen on every interface: give the address to bind "
                "(127.0.0.1: this machine only; 0.0.0.0: every interface)"
            )
        return value

    @field_validator(
        "voiceflow_runtime_url",
        "botpress_url",
        "twilio_api_base_url",
        "telnyx_api_base_url",
        "vonage_api_base_url",
        "plivo_api_base_url",
        mode="after",
    )
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        """A core's or carrier API's base URL is an http(s):// URL with a host. Anything
        else (``chat.botpress.cloud``, ``http://[::1``) started the gateway, and each turn
        of the core (each hang-up of the carrier) then failed on it."""
        try:
            parts = urlsplit(value)
        except ValueError:  # urllib's text may quote the netloc (a password)
            raise ValueError("must be an http:// or https:// URL with a host") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("public_url", mode="after")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        """An http(s):// URL with a host and no query or fragment: links and stream URLs
        are made from it (without a scheme they were relative links, and Twilio got
        ``ws:///host/...``; paths are appended to it, so with a ``?`` or ``#``, even an
        empty one, the signed webhook URLs and status callbacks were malformed:
        ``https://host/?x=1/twilio/status?key=...``). One urllib cannot split
        (``http://u:pw@[::1``) gets the same message, not urllib's ``Invalid IPv6 URL``."""
        try:
            parts = urlsplit(value)
        except ValueError:  # urllib's text may quote the netloc (a password)
            raise ValueError("must be an http:// or https:// URL with a host") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if "?" in value or "#" in value:
            raise ValueError(
                "must have no query or fragment (the gateway appends its paths to it): "
                "use the base URL, e.g. https://gateway.example.com or "
                "https://gateway.example.com/prefix"
            )
        return value

    @model_validator(mode="after")
    def _public_url_on_port(self) -> Settings:
        """GATEWAY_PUBLIC_URL unset: ``http://localhost:{port}``, so that the links of a
        gateway served on another port than 8080 (``gateway serve --port 9000``) lead
        back to it (before, they named port 8080 whatever the port). Port 0 (the OS
        picks one) keeps ``http://localhost:8080``: no URL can name it in advance."""
        if "public_url" not in self.model_fields_set and self.port:
            self.public_url = f"http://localhost:{self.port}"
        return self

    @property
    def turn_max_s(self) -> float:
        """The longest core time of one turn (s): GATEWAY_TURN_TIMEOUT_S, plus
        GATEWAY_ERROR_TURN_MIN_S with GATEWAY_ERROR_TURN (the ``#error`` turn after a try
        that used the whole timeout has that much: gateway/conversation.py ``_process``).
        What the waits for a running turn (shutdown drain, a page's answer) count on."""
        return self.turn_timeout_s + (self.error_turn_min_s if self.error_turn else 0.0)

    @model_validator(mode="after")
    def _v1_byte_burst_holds_a_frame(self) -> Settings:
        """GATEWAY_FLOWSTORM_V1_BYTE_BURST holds one frame of GATEWAY_MAX_BODY_BYTES: a
        smaller burst would refuse (1008) a frame the gateway accepts, for its size
        alone. Unset, it is raised to GATEWAY_MAX_BODY_BYTES; set below it: ValueError."""
        if self.flowstorm_v1_byte_burst >= self.max_body_bytes:
            return self
        if "flowstorm_v1_byte_burst" not in self.model_fields_set:
            self.flowstorm_v1_byte_burst = self.max_body_bytes
            return self
        raise ValueError(
            f"GATEWAY_FLOWSTORM_V1_BYTE_BURST ({self.flowstorm_v1_byte_burst}) must be at "
            f"least GATEWAY_MAX_BODY_BYTES ({self.max_body_bytes}): a V1 frame of the "
            "largest size accepted must fit in the burst"
        )

    @model_validator(mode="after")
    def _retry_default_wait_within_max(self) -> Settings:
        """GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S is at most GATEWAY_PIPELINE_RETRY_MAX_WAIT_S:
        a longer default wait is more than the gateway waits, so a 429 without
        ``Retry-After`` would never be sent again, whatever GATEWAY_PIPELINE_RETRIES says.
        Unset, it is lowered to GATEWAY_PIPELINE_RETRY_MAX_WAIT_S (a max wait of 0: only a
        ``Retry-After: 0`` or none is sent again, at once); set above it: ValueError."""
        if self.pipeline_retry_default_wait_s <= self.pipeline_retry_max_wait_s:
            return self
        if "pipeline_retry_default_wait_s" not in self.model_fields_set:
            self.pipeline_retry_default_wait_s = self.pipeline_retry_max_wait_s
            return self
        raise ValueError(
            f"GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S ({self.pipeline_retry_default_wait_s:g} s) "
            "must be at most GATEWAY_PIPELINE_RETRY_MAX_WAIT_S "
            f"({self.pipeline_retry_max_wait_s:g} s): a 429 without Retry-After would never "
            "be sent again"
        )

    @field_validator("telnyx_public_key", mode="after")
    @classmethod
    def _check_telnyx_public_key(cls, value: str | None) -> str | None:
        """A key that is not base64 of 32 raw Ed25519 bytes (as the Mission Control
        portal shows it) stops the gateway at startup (else every Telnyx webhook failed
        with a 500). Unset or empty: Telnyx webhooks are refused (403)."""
        if not value:
            return value
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("must be base64 of the 32 raw bytes of an Ed25519 public key")
        return value

    @field_validator("telnyx_api_key", mode="after")
    @classmethod
    def _check_telnyx_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        """A Telnyx API key that is no RFC 6750 bearer token (a space, a line break such
        as a secret file's last newline, a non-ASCII character) stops the gateway at
        startup, naming GATEWAY_TELNYX_API_KEY without its value: no ``Authorization:
        Bearer`` header can carry it, so every Call Control command (hang-up, transfer,
        dial, a move at shutdown) failed, logged as Telnyx's API being unreachable or
        not as the setting's fault. Unset or empty: Telnyx's API is not configured."""
        key = value.get_secret_value() if value is not None else ""
        if key and not _B64TOKEN.fullmatch(key):
            raise ValueError(
                "is no bearer token (RFC 6750 section 2.1: letters, digits and -._~+/, then "
                "any '='; no spaces or line breaks, such as a secret file's last newline): "
                "no Authorization header could carry it to Telnyx's API"
            )
        return value

    @field_validator("plivo_auth_id", mode="after")
    @classmethod
    def _check_plivo_auth_id(cls, value: str | None) -> str | None:
        """A Plivo Auth ID that is not letters and digits (as Plivo's console shows it: a
        space, a line break, a ``/``) stops the gateway at startup, naming
        GATEWAY_PLIVO_AUTH_ID: it is a path segment of every Plivo API URL
        (``/v1/Account/{auth_id}/...``), so every hang-up, transfer and move at shutdown
        failed (a line break: no URL at all; a ``/``: another endpoint), the transfer
        logged as Plivo's API's fault. Unset or empty: Plivo's API is not configured."""
        if value and not (value.isascii() and value.isalnum()):
            raise ValueError(
                "must be letters and digits, as Plivo's console shows the Auth ID (no "
                "spaces or line breaks): it is a path segment of every Plivo API URL"
            )
        return value

    @field_validator("exotel_api_key", "exotel_api_token", mode="after")
    @classmethod
    def _check_exotel_credentials(
        cls, value: str | SecretStr | None, info: ValidationInfo
    ) -> str | SecretStr | None:
        """An Exotel API key holding ``:`` (no Basic user-id can, RFC 7617 section 2), or a
        key or token holding a space, a line break (a secret file's last newline) or
        another control character, stops the gateway at startup naming the setting (the
        token's value not shown): the key with ``:`` crashed the startup with a traceback
        (:class:`adapters.exotel.verify.ExotelVerifier`), and with a space or line break
        every stream was refused 403 as "wrong Exotel credentials", Exotel's applet never
        sending them so. Unset or empty: streams refused (not configured)."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value or ""
        if info.field_name == "exotel_api_key" and ":" in text:
            raise ValueError("holds ':', which no Basic user-id can (the applet URL's KEY:TOKEN)")
        if any(char.isspace() or not char.isprintable() for char in text):
            raise ValueError(
                "holds a space, a line break or another control character (a secret file's "
                "last newline?): Exotel's Basic credentials never do"
            )
        return value

    @field_validator("vonage_private_key", mode="after")
    @classmethod
    def _check_vonage_private_key(cls, value: SecretStr | None) -> SecretStr | None:
        """A key that is not the PEM of an unencrypted RSA private key (what the Vonage
        dashboard's ``private.key`` holds, and RS256 signs the Voice API's JWTs with)
        stops the gateway at startup, naming GATEWAY_VONAGE_PRIVATE_KEY (else the
        gateway started, and every transfer failed, logged as the Vonage API's fault,
        and every call was cut at shutdown instead of moved). Unset or empty: the Voice
        API is not configured."""
        pem = value.get_secret_value() if value is not None else ""
        if not pem:
            return value
        try:
            key = load_pem_private_key(pem.encode("utf-8"), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(
                "must be the PEM of the Vonage application's RSA private key (its "
                "private.key file, unencrypted, line breaks kept)"
            )
        return value

    @field_validator("calls_timeout_s", mode="after")
    @classmethod
    def _check_calls_timeout(cls, value: float) -> float:
        """A timeout past :data:`MAX_CALLS_TIMEOUT_S` stops the gateway at startup (else a
        dial answered that late found its stream token expired: a call neither bound to
        its stream nor hung up)."""
        if value > MAX_CALLS_TIMEOUT_S:
            raise ValueError(
                f"must be at most {MAX_CALLS_TIMEOUT_S:g} s, not {value:g}: a dial's stream "
                "token (good 300 s) is bound to its call when the dial's answer comes, and "
                "must still be good while the call rings"
            )
        return value

    @field_validator("vonage_sample_rate", mode="after")
    @classmethod
    def _check_vonage_sample_rate(cls, value: int) -> int:
        """A rate the Vonage answer cannot ask for stops the gateway at startup (else
        every answer would fail)."""
        if value not in VONAGE_SAMPLE_RATES:
            rates = ", ".join(map(str, VONAGE_SAMPLE_RATES[:-1]))
            raise ValueError(f"must be {rates} or {VONAGE_SAMPLE_RATES[-1]} (Hz), not {value}")
        return value

    @field_validator("app_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object, info: ValidationInfo) -> object:
        """Comma-separated keys. GATEWAY_APP_KEYS that names none (``" , "``) is refused:
        an empty allow-list would allow every key; so is one with a key over MAX_ID_CHARS
        (256) characters: channels refuse a longer key (Flowstorm V1/V2), and the push API
        could not name it. GATEWAY_ADMIN_KEYS with a key that is no RFC 6750 bearer token, or
        one shorter than :data:`MIN_ADMIN_KEY_CHARS`, is refused (ValueError, the key not
        shown). GATEWAY_ADMIN_KEYS comes here split already (:meth:`_split_lists`, which
        runs first), so a string is GATEWAY_APP_KEYS; an admin key list naming none is
        taken as unset (the admin API refuses every request)."""
        if isinstance(value, str):
            keys = frozenset(k.strip() for k in value.split(",") if k.strip())
            if value.strip() and not keys:
                raise ValueError("names no key: list the keys, or unset it to allow any key")
            value = keys
        keys_given = value if info.field_name == "app_keys" and isinstance(value, Iterable) else ()
        if any(isinstance(k, str) and len(k) > MAX_ID_CHARS for k in keys_given):
            raise ValueError(
                f"holds a key longer than {MAX_ID_CHARS} characters: no channel could use it "
                "(Flowstorm V1/V2 refuse it, the push API cannot name it)"
            )
        if info.field_name == "admin_keys" and isinstance(value, Iterable):
            admin = [key for key in value if isinstance(key, str)]
            # never a key itself in these messages: it is a credential, and they go to the log
            if any(not _B64TOKEN.fullmatch(key) for key in admin):
                raise ValueError(
                    "holds a key that is no bearer token (RFC 6750 section 2.1: letters, "
                    "digits and -._~+/, then any '='): it could never match an "
                    "Authorization header"
                )
            if any(len(key) < MIN_ADMIN_KEY_CHARS for key in admin):
                raise ValueError(
                    f"holds a key shorter than {MIN_ADMIN_KEY_CHARS} characters: an admin key "
                    f"must have at least {MIN_ADMIN_KEY_CHARS} (a short key can be guessed)"
                )
        return value

    @field_validator("metrics_token", mode="after")
    @classmethod
    def _metrics_token_form(cls, value: SecretStr | None) -> SecretStr | None:
        """GATEWAY_METRICS_TOKEN: comma-separated tokens (several while a scraper's token is
        rotated: the new one added, the scrapers moved to it, the old one dropped), spaces
        around them and empty entries ignored. Each must be an RFC 6750 bearer token (else
        no ``Authorization`` header could carry it) of at least :data:`MIN_ADMIN_KEY_CHARS`
        characters (a short one can be guessed), as an admin key must; ValueError
        otherwise, naming the token by its place (``token 2 of 3``) when there are several,
        never showing it. A value naming no token is refused too (unset it to open
        /metrics). Kept as the tokens joined by commas (:attr:`metrics_tokens` gives them)."""
        if value is None:
            return None
        tokens = [t.strip() for t in value.get_secret_value().split(",") if t.strip()]
        if not tokens:
            raise ValueError("names no token: give one or more, or unset it to open /metrics")
        for place, token in enumerate(tokens, 1):
            which = f"token {place} of {len(tokens)} " if len(tokens) > 1 else ""
            if not _B64TOKEN.fullmatch(token):
                raise ValueError(
                    f"{which}is no bearer token (RFC 6750 section 2.1: letters, digits and "
                    "-._~+/, then any '='): it could never match an Authorization header"
                )
            if len(token) < MIN_ADMIN_KEY_CHARS:
                raise ValueError(
                    f"{which}is shorter than {MIN_ADMIN_KEY_CHARS} characters "
                    "(a short token can be guessed)"
                )
        return SecretStr(",".join(tokens))

    @property
    def metrics_tokens(self) -> tuple[str, ...]:
        """The tokens of GATEWAY_METRICS_TOKEN, in their order (empty when it is unset):
        ``/metrics`` takes any of them (gateway/metricsauth.py)."""
        if self.metrics_token is None:
            return ()
        # split again as the validator does: model_copy(update=...) does not validate
        tokens = self.metrics_token.get_secret_value().split(",")
        return tuple(t.strip() for t in tokens if t.strip())

    def call_behaviour(self, carrier: str) -> CallBehaviour:
        """The call behaviour of ``carrier``: GATEWAY_CALL_* (and
        GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS) under GATEWAY_CALL_OVERRIDES' entry for it,
        under (Twilio) the GATEWAY_TWILIO_* aliases that are set."""
        values = {
            "barge_in": self.call_barge_in,
            "barge_in_min_speech_ms": self.call_barge_in_min_speech_ms,
            "barge_in_max_backchannel_ms": self.barge_in_max_backchannel_ms,
            "dtmf_mode": self.call_dtmf_mode,
            "dtmf_timeout_ms": self.call_dtmf_timeout_ms,
            "frame_ms": self.call_frame_ms,
        }
        layers = [next((o for c, o in self.call_overrides.items() if c == carrier), None)]
        if carrier == "twilio":
            layers.append(
                CallOverride(
                    barge_in=self.twilio_barge_in,
                    barge_in_min_speech_ms=self.twilio_barge_in_min_speech_ms,
                    dtmf_mode=self.twilio_dtmf_mode,
                    dtmf_timeout_ms=self.twilio_dtmf_timeout_ms,
                    frame_ms=self.twilio_frame_ms,
                )
            )
        for layer in layers:
            if layer is not None:
                values.update(layer.model_dump(exclude_none=True))
        return CallBehaviour.model_validate(values)

    _key_digests: dict[str, tuple[object, KeyDigests]] = PrivateAttr(default_factory=dict)
    """Per key setting: the setting's value and the :class:`KeyDigests` of its keys."""

    def model_post_init(self, context: object, /) -> None:
        """Hash the configured keys once, at construction (:meth:`_digests_of`)."""
        super().model_post_init(context)
        for digests in ("admin_key_digests", "metrics_token_digests", "voiceflow_api_key_digests"):
            getattr(self, digests)

    def _digests_of(self, name: str, value: object, keys: Iterable[str]) -> KeyDigests:
        """The :class:`KeyDigests` of ``keys``, the keys of the setting ``name`` whose
        value is ``value``: made once for that value (the same object), again for another
        (a copy made with ``model_copy(update=...)``, which does not validate)."""
        known = self._key_digests.get(name)
        if known is not None and known[0] is value:
            return known[1]
        digests = KeyDigests(keys)
        # a new dict, not a change of this one: model_copy shares it with the copy
        self._key_digests = {**self._key_digests, name: (value, digests)}
        return digests

    @property
    def admin_key_digests(self) -> KeyDigests:
        """The digests of GATEWAY_ADMIN_KEYS, hashed once (gateway/admin.py checks a key
        sent with :func:`~gateway.protocol.key_valid` against them)."""
        return self._digests_of("admin_keys", self.admin_keys, self.admin_keys)

    @property
    def metrics_token_digests(self) -> KeyDigests:
        """The digests of :attr:`metrics_tokens`, hashed once (gateway/metricsauth.py)."""
        return self._digests_of("metrics_token", self.metrics_token, self.metrics_tokens)

    @property
    def voiceflow_api_key_digests(self) -> KeyDigests:
        """The digests of GATEWAY_VOICEFLOW_API_KEYS, hashed once (a client.start's
        ``authorization`` is checked against them, adapters/voiceflow/protocol.py)."""
        return self._digests_of(
            "voiceflow_api_keys", self.voiceflow_api_keys, self.voiceflow_api_keys
        )

    def key_allowed(self, key: str | None) -> bool:
        """Whether an application key may open sessions (any non-empty key when unset)."""
        if not key:
            return False
        return not self.app_keys or key in self.app_keys

    @field_validator(
        "alexa_skill_ids",
        "google_project_ids",
        "google_trusted_accounts",
        "admin_keys",
        "voiceflow_api_keys",
        "barge_in_backchannels",
        "voiceflow_cors_origins",
        mode="before",
    )
    @classmethod
    def _split_lists(cls, value: object, info: ValidationInfo) -> object:
        """A comma-separated value: its items, spaces around them and empty ones dropped
        (backchannels lower-cased)."""
        if not isinstance(value, str):
            return value
        items = [item.strip() for item in value.split(",") if item.strip()]
        if info.field_name == "barge_in_backchannels":
            return tuple(item.lower() for item in items)
        return tuple(items) if info.field_name == "voiceflow_cors_origins" else frozenset(items)

    @field_validator("dialogflow_auth", mode="after")
    @classmethod
    def _check_dialogflow_auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme, _, rest = value.get_secret_value().partition(":")
        if scheme.lower() == "basic" and ":" in rest and rest.split(":", 1)[0]:
            return value
        if scheme.lower() == "bearer" and rest:
            return value
        raise ValueError("must be basic:USER:PASSWORD or bearer:TOKEN")

    @field_validator("voiceflow_secret", "secret_key", mode="after")
    @classmethod
    def _check_voiceflow_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < 32:
            raise ValueError("must have at least 32 characters")
        if len("".join(value.get_secret_value().split())) < 32:  # spaces are no secret
            raise ValueError("must have at least 32 characters that are not whitespace")
        return value

    # Keep this the LAST validator of the class: pydantic runs "before" validators in the
    # reverse order of their definition, so it runs first, on the value as it came (the
    # environment's string), before the splitters (_split_lists, _split_keys) and before a
    # check of a field of its own could refuse the placeholder with another message.
    @field_validator("*", mode="before")
    @classmethod
    def _no_placeholder(cls, value: object) -> object:
        """A value still holding deploy/'s placeholder marker (:data:`PLACEHOLDER`) stops
        the gateway at startup: the examples' ``CHANGE-ME-...`` master key is long enough
        to pass as one, and a key everybody can read signs nothing. Every item of a list
        (a comma-separated setting, GATEWAY_ADMIN_KEYS and the like) and every value of a
        JSON object is checked as well: a list already split (``Settings(app_keys=[...])``)
        escaped the check before.

        Raises:
            ValueError: the value, or one of its items, holds :data:`PLACEHOLDER`.
        """
        if _holds_placeholder(value):
            raise ValueError(
                f"is a placeholder of deploy/'s examples ({PLACEHOLDER}): replace it with "
                "your own value, or unset it"
            )
        return value


def _holds_placeholder(value: object) -> bool:
    """Whether ``value`` (a string or SecretStr, or a list, tuple, set or mapping of them,
    nested) holds :data:`PLACEHOLDER` (a mapping: in a key or a value; a SecretStr: its secret)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        return PLACEHOLDER in value
    if isinstance(value, Mapping):
        return any(_holds_placeholder(k) or _holds_placeholder(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_placeholder(item) for item in value)
    return False


ENV_PREFIX: Final = "GATEWAY_"
"""The prefix of every setting's environment variable (:class:`Settings`)."""
OTHER_VARIABLES: Final = frozenset(
    {
        # deploy/compose.yaml's interpolation: the load balancer's host port and the
        # project network's subnet; set in deploy/.env, they reach the replicas (env_file)
        "GATEWAY_HTTP_PORT",
        "GATEWAY_NETWORK_SUBNET",
        # the tests' own (tests/conftest.py), inherited by the gateways they start
        "GATEWAY_TEST_REDIS_URL",
        "GATEWAY_TEST_START_TIMEOUT_S",
    }
)
"""The documented ``GATEWAY_*`` environment variables that are no setting:
:func:`unknown_settings` does not report them."""


def setting_names() -> frozenset[str]:
    """The environment variable of every :class:`Settings` field (``GATEWAY_PORT``, ...),
    upper case."""
    return frozenset(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)


def unknown_settings(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``GATEWAY_*`` names of ``environ`` (``os.environ``) that name no setting and
    are not in :data:`OTHER_VARIABLES` (a typo, ``GATEWAY_PORTT``, which Settings ignores:
    ``extra="ignore"``), sorted, each with the setting it most likely meant (difflib's
    closest name, compared without the prefix) or None. Names are compared in upper
    case, as pydantic-settings reads them (``gateway_port`` is GATEWAY_PORT); values
    are never read."""
    known = setting_names()
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(
            upper.removeprefix(ENV_PREFIX),
            [known_name.removeprefix(ENV_PREFIX) for known_name in sorted(known)],
            n=1,
        )
        found.append((name, f"{ENV_PREFIX}{close[0]}" if close else None))
    return found
