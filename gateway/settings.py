"""Gateway settings, read from the environment with the prefix ``GATEWAY_``.

Every setting has an embedded default, so ``gateway serve`` runs with none set:
memory sessions, the demo pipeline, no network and no keys.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """All configuration of one gateway process.

    Environment variables are the field names upper-cased with the prefix
    ``GATEWAY_`` (for example ``GATEWAY_REDIS_URL``). Times carry their unit in
    the name (``_s`` seconds, ``_ms`` milliseconds); sizes are bytes.
    """

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080

    redis_url: str | None = Field(
        default=None,
        description="redis:// or rediss:// URL; unset means in-process memory sessions.",
    )
    redis_prefix: str = Field(
        default="gw",
        description="Prefix of every Redis key; keys of one session share a hash tag.",
    )

    redis_max_connections: int = Field(
        default=64, gt=0, description="Connections per process; turns wait for a free one."
    )

    pipeline: str = Field(
        default="demo",
        description="`demo` (built-in dialogue) or an http(s):// URL of the core webhook.",
    )
    pipeline_connect_timeout_s: float = 3.0
    pipeline_max_response_bytes: int = 1_048_576

    app_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated allowed application keys; empty allows any non-empty key.",
    )
    public_url: str = Field(
        default="http://localhost:8080",
        description="Base URL under which clients and platforms reach this gateway.",
    )

    turn_timeout_s: float = Field(default=10.0, gt=0, description="Pipeline time per turn.")
    session_timeout_s: int = Field(
        default=1800, gt=0, description="Idle time after which a session expires."
    )
    lock_wait_s: float = Field(
        default=15.0, gt=0, description="How long a turn waits for the session lock."
    )
    error_turn: bool = Field(
        default=False,
        description="On a pipeline failure run the `#error` turn before giving an ErrorEvent.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, gt=0, description="Largest text/JSON request body or WebSocket text."
    )
    max_log_entries: int = Field(default=500, gt=0, description="Client log entries kept.")

    @field_validator("app_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(k.strip() for k in value.split(",") if k.strip())
        return value

    def key_allowed(self, key: str | None) -> bool:
        """Whether an application key may open sessions (any non-empty key when unset)."""
        if not key:
            return False
        return not self.app_keys or key in self.app_keys
