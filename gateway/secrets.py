"""The gateway's one secret key, and the per-purpose keys derived from it.

Everything the gateway signs (Voiceflow sessionKeys, Twilio stream tokens, TTS
file ids) is keyed by ``derive_key(master, purpose)``: HKDF-SHA256 (RFC 5869,
from ``cryptography``) of the master key with ``info = purpose``, so a key of one
purpose tells nothing about another's. Purposes in use: :data:`VOICEFLOW_SESSION_KEY`,
:data:`TWILIO_STREAM_TOKEN`, :data:`TTS_ID`, :data:`LOG_SESSION_REF`.

Where the master key comes from (:func:`load_secret_keys`, at app startup):

1. ``GATEWAY_SECRET_KEY`` (at least 32 characters): every instance configured
   with it shares it (``source="setting"``).
2. Else, with ``GATEWAY_REDIS_URL``: ``SET {prefix}:secret-key <random> NX`` then
   ``GET`` — the first instance to start creates it, every later one reads the
   same value, so N instances agree with nothing but a Redis URL
   (``source="redis"``). The key has no TTL; deleting it (and restarting every
   instance) rotates it.
3. Else a random key per process, with a WARNING (``source="process"``): what
   it signs stops working when the process restarts and is not accepted by
   other instances.

When Redis does not answer at startup the gateway still starts (its store
answers 503 until Redis is back, as before): it holds a random per-process
key meanwhile (a WARNING) and retries in the background, every second up to
every 5 s, adopting the shared key as soon as Redis answers. Consumers therefore
read :meth:`SecretKeys.key` when they need a key, never once at startup. What
other instances must accept (stream tokens) is signed only with a key they share:
:meth:`SecretKeys.shared_key` raises :class:`SharedKeyPending` (a StoreUnavailable:
answered 503) until the shared key is read (:attr:`SecretKeys.pending`), as a
token signed with the per-process key meanwhile failed on every other instance, and on
this one once the shared key was adopted.

The per-purpose settings (``GATEWAY_VOICEFLOW_SECRET``,
``GATEWAY_TWILIO_STREAM_SECRET``, ``GATEWAY_LOG_HASH_KEY``) still override the
derived key of their purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Final, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.exceptions import RedisError

from gateway.redisconn import REDIS_ERRORS, RedisClient
from gateway.sessions import StoreUnavailable

log = logging.getLogger(__name__)

VOICEFLOW_SESSION_KEY: Final = "voiceflow-session-key"
"""Purpose of the key that signs Voiceflow sessionKeys (HS256)."""
TWILIO_STREAM_TOKEN: Final = "twilio-stream-token"
"""Purpose of the key of Twilio per-call stream tokens (HMAC-SHA256)."""
TTS_ID: Final = "tts-id"
"""Purpose of the key of TTS file ids."""
LOG_SESSION_REF: Final = "log-session-ref"
"""Purpose of the key of the hashes that name sessions in the log (gateway.logs)."""

KEY_BYTES: Final = 32
"""Length of a derived key (bytes) and of a generated master key (random bytes)."""
REDIS_KEY_SUFFIX: Final = "secret-key"
"""The Redis key of the shared master key is ``{prefix}:secret-key``."""

SHARED_KEY_CHECK_S: Final = 30.0
"""How often (s) an instance checks that Redis still holds the shared key it signs with."""

Source = Literal["setting", "redis", "process"]


class SharedKeyPending(StoreUnavailable):
    """A key every instance must share was asked for while the shared master key is not
    known yet: Redis (GATEWAY_REDIS_URL) did not answer at startup and the background
    read has not adopted its key (:attr:`SecretKeys.pending`). A StoreUnavailable: the
    answer is 503 with ``Retry-After``, as for the store itself. The message names the
    purpose and where the key comes from."""


def derive_key(master: bytes, purpose: str) -> bytes:
    """The 32-byte key of ``purpose`` (e.g. ``"tts-id"``): HKDF-SHA256(master, info=purpose).

    No salt (the master key is uniformly random or a user's long secret); the
    same ``master`` and ``purpose`` always give the same key, on every instance.
    Raises ValueError for an empty master key or purpose.
    """
    if not master:
        raise ValueError("the master key must not be empty")
    if not purpose:
        raise ValueError("the purpose must not be empty")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose.encode())
    return hkdf.derive(master)


@dataclass
class SecretKeys:
    """The master key of this process and where it came from; derives purpose keys.

    ``source`` is ``setting`` (GATEWAY_SECRET_KEY), ``redis`` (shared through
    Redis) or ``process`` (random, this process only). The master may be
    replaced (:meth:`adopt`) when Redis answers after a failed startup read, or holds
    another key later (:func:`_keep_shared`), so read :meth:`key` when a key is needed.
    ``warned`` is True when :func:`load_secret_keys` logged the WARNING that the key is
    random per process (what signs with it need not say so again). ``pending`` is True
    while the key shared through Redis is expected and not read yet (Redis did not
    answer at startup): :meth:`shared_key` refuses then.
    """

    master: bytes
    source: Source
    warned: bool = field(default=False, repr=False)
    pending: bool = False
    _derived: dict[str, bytes] = field(default_factory=dict, repr=False)
    _retry: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def random(cls) -> SecretKeys:
        """A random per-process master key (``source="process"``)."""
        return cls(secrets.token_bytes(KEY_BYTES), "process")

    @property
    def shared(self) -> bool:
        """Whether every instance configured alike has the same master key."""
        return self.source != "process"

    def key(self, purpose: str) -> bytes:
        """The 32-byte key of ``purpose`` (:func:`derive_key`, cached)."""
        derived = self._derived.get(purpose)
        if derived is None:
            derived = self._derived[purpose] = derive_key(self.master, purpose)
        return derived

    def shared_key(self, purpose: str) -> bytes:
        """The key of ``purpose`` (:meth:`key`) for what other instances must accept (a
        stream token, verified wherever the carrier connects).

        Raises :class:`SharedKeyPending` while :attr:`pending` (the shared key is not
        read from Redis yet): the per-process key would sign what no other instance
        accepts, nor this one once it adopts the shared key."""
        if self.pending:
            raise SharedKeyPending(
                f"the {purpose} key is not known yet: the gateway's shared secret key has "
                "not been read from Redis (GATEWAY_REDIS_URL did not answer at startup; "
                "it is read again every few seconds)"
            )
        return self.key(purpose)

    def adopt(self, master: bytes, source: Source) -> None:
        """Use ``master`` from now on (what was signed with the old key stops verifying)."""
        self.master, self.source, self.pending = master, source, False
        self._derived.clear()

    async def aclose(self) -> None:
        """Stop the background retry, if one runs."""
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._retry})  # a failure was logged (_log_end)
            self._retry = None


async def shared_master_key(
    redis: RedisClient, prefix: str, candidate: bytes | None = None
) -> bytes:
    """The master key under ``{prefix}:secret-key``, created (NX) if absent: ``candidate``
    (a master key already in use) or a fresh random one.

    Two round trips: ``SET NX``, then ``GET`` (whoever won the race, every caller reads
    the same value). The value is bytes as Redis holds them, never decoded: a key this
    gateway made is hex text, one written by another hand may be any bytes (not UTF-8:
    its ``candidate`` was decoded to put it back, which raised UnicodeDecodeError and
    ended the background check for good). Raises RedisError.
    """
    name = f"{prefix}:{REDIS_KEY_SUFFIX}"
    fresh: bytes | str = candidate if candidate else secrets.token_hex(KEY_BYTES)
    await redis.set(name, fresh, nx=True)
    value = await redis.get(name)
    if not value:  # deleted between the two commands: try once more
        await redis.set(name, secrets.token_hex(KEY_BYTES), nx=True)
        value = await redis.get(name)
    if not value:
        raise RedisError(f"{name} vanished while it was read")
    return value if isinstance(value, bytes) else str(value).encode()


async def load_secret_keys(
    secret_key: str | None,
    redis: RedisClient | None,
    *,
    prefix: str = "gw",
    timeout_s: float = 5.0,
    retry_max_s: float = 5.0,
    check_s: float = SHARED_KEY_CHECK_S,
) -> SecretKeys:
    """The process's SecretKeys, from the setting, Redis or chance (see the module doc).

    ``secret_key`` is GATEWAY_SECRET_KEY (already checked to be >= 32 characters).
    With ``redis`` and no ``secret_key`` the shared key is read within ``timeout_s``;
    when Redis fails, a random key is used, a WARNING logged, and a background task
    retries (1 s doubling up to ``retry_max_s``) until it adopts the shared key. Then
    the task checks it every ``check_s`` s (see :func:`_keep_shared`). Never raises for
    a Redis failure; call :meth:`SecretKeys.aclose` at shutdown.
    """
    if secret_key:
        return SecretKeys(secret_key.encode("utf-8"), "setting")
    if redis is None:
        log.warning(
            "GATEWAY_SECRET_KEY and GATEWAY_REDIS_URL are unset: Voiceflow sessionKeys, "
            "Twilio stream tokens and TTS file ids are signed with a random per-process key; "
            "they stop working when this process restarts and are not accepted by other "
            "gateway instances (set either one to share the key)"
        )
        keys = SecretKeys.random()
        keys.warned = True
        return keys
    try:
        async with asyncio.timeout(timeout_s):
            keys = SecretKeys(await shared_master_key(redis, prefix), "redis")
    except (*REDIS_ERRORS, OSError, TimeoutError) as exc:
        log.warning(
            "the shared secret key could not be read from Redis (%s): signing with a random "
            "per-process key until Redis answers (stream tokens and Voiceflow handshakes "
            "are refused meanwhile)",
            exc or type(exc).__name__,
        )
        keys = SecretKeys.random()
        keys.warned = keys.pending = True
    keys._retry = asyncio.create_task(_keep_shared(keys, redis, prefix, retry_max_s, check_s))
    keys._retry.add_done_callback(_log_end)
    return keys


def _log_end(task: asyncio.Task[None]) -> None:
    """Log at ERROR, with its traceback, a background key task that ended by an error
    (it runs until cancelled): the shared key is no longer read or checked, which
    would otherwise go unsaid until instances' tokens failed each other."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.error(
        "the shared secret key is no longer read or checked in Redis (its task failed: "
        "%r); instances may sign with different keys until this one restarts",
        exc,
        exc_info=exc,
    )


async def _keep_shared(
    keys: SecretKeys, redis: RedisClient, prefix: str, cap: float, check_s: float
) -> None:
    """Read the shared key until Redis answers (1 s doubling up to ``cap``), then check it
    every ``check_s``: a Redis that lost its data (restarted without persistence) no
    longer holds it, and an instance started since stored a new one, which it signed
    with while this one kept the old: their tokens and sessionKeys failed each other,
    and nothing said so. This instance puts its key back when it is gone (NX: the
    first to do so wins) and adopts the one Redis holds when it differs."""
    delay = 1.0
    while keys.source != "redis":
        await asyncio.sleep(delay)
        try:
            master = await shared_master_key(redis, prefix)
        except (*REDIS_ERRORS, OSError) as exc:
            log.debug("shared secret key still unavailable: %s", exc)
            delay = min(delay * 2, cap)
            continue
        keys.adopt(master, "redis")
        log.info("the shared secret key was read from Redis; it is used from now on")
    while True:
        await asyncio.sleep(check_s)
        try:
            master = await shared_master_key(redis, prefix, keys.master)
        except (*REDIS_ERRORS, OSError) as exc:
            log.debug("shared secret key not checked: %s", exc)
            continue
        if master != keys.master:
            keys.adopt(master, "redis")
            log.warning(
                "the shared secret key in Redis is not the one this instance used (Redis "
                "lost its data?): adopted; what was signed with the old one (stream "
                "tokens, Voiceflow sessionKeys) no longer verifies"
            )
