"""A circuit breaker per Redis client: a Redis that hangs costs one timeout, not one per
turn, phone call or speech link.

A Redis that stops answering (stopped with SIGSTOP, a network partition, a blackholed
route) makes every command wait for the client's timeout (gateway/redisconn.py: 3 s to
connect, 5 s to read). Without a breaker every turn meanwhile waits those seconds before
its 503, and the connection pool fills with waiting calls. With it, the first call that
*hangs* (Redis did not answer, :func:`gateway.redisconn.unanswered`, and the call timed
out or took ``slow_s`` or more to fail) *opens* the breaker: for a cool-down every call
is refused at once (:class:`CircuitOpen`) without touching Redis. When the cool-down
ends, the next call goes through alone as a *probe* (half-open; the others are still
refused): an answer (also an error reply), or a failure that comes at once (Redis down
and refusing: calls fail fast without the breaker) *closes* the breaker; a probe that
hangs opens it again for twice the cool-down, up to ``max_cool_down_s``. Calls already
on their way when it opens finish as they would have (their failures do not count
again, and their callers log them at DEBUG: the breaker's WARNING is the outage's
line, not one per call that was waiting). A Redis that refuses connections
(restarting, down) never opens it: each call fails at once on its own, and the first
call after Redis is back is served. Such an
outage is still logged once, not once per call: the first call that fails at once is
logged by its caller as before, with one WARNING of the breaker (``... cannot be
reached``); the callers of the calls that fail after it log them at DEBUG
(:func:`outage_level`), and ``gateway_redis_unreachable_total`` counts them all; the
first answer after it is one INFO (``... answers again``, with the count).

One breaker per client object (so per gateway process and GATEWAY_REDIS_URL), kept on
the client itself (:func:`breaker_of`) and shared by every user of that client: the
session store, the outbox/journal, the bus's publishes and subscribes, the one-time
nonces and the TTS link cache (so ``GET /file/tts``). Once a call of any of them hangs,
every user's calls are refused at once until the probe, whoever makes it, gets an
answer. Left outside:
the background loops, which wait and retry on their own schedule (the bus's
subscription reader, the secret-key refresh, python-socketio's manager, which has a
client of its own), and the startup's secret-key load.

Pure bookkeeping, no I/O and no task: a caller asks :meth:`CircuitBreaker.admit` before
a call and reports its end to :meth:`CircuitBreaker.record`, or has
:meth:`CircuitBreaker.guard` do both around the call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import metrics
from gateway.redisconn import UNANSWERED_ERRORS, unanswered

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half-open"]

_T = TypeVar("_T")

_TIMEOUTS = (RedisTimeoutError, TimeoutError)
"""A call that ended with one of these waited its whole deadline: it hung."""

_NO_TICKET = -1
"""The ticket of a call let through while the breaker is not closed (:meth:`CircuitBreaker.
pass_through`): its end changes nothing."""


class CircuitOpen(RedisError):
    """A call refused by an open :class:`CircuitBreaker` without asking Redis; the message
    says why and when Redis will be asked again (``retry_in_s`` seconds from now, 0 while
    the probe is on its way)."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    """The breaker of one Redis client's callers (see the module doc).

    ``cool_down_s`` (default 1 s): how long it stays open after it opens; each probe that
    finds Redis still hanging doubles it, up to ``max_cool_down_s`` (default 5 s); it
    starts again from ``cool_down_s`` once the breaker closes. ``slow_s`` (default 1 s):
    a call that Redis did not answer hung when it timed out or took this long to fail.
    ``clock`` gives monotonic seconds. ``name`` names Redis in the messages and logs.

    Logs one WARNING when it opens and one when it closes (with the calls refused
    meanwhile), an INFO per failed probe; ``gateway_redis_breaker_open`` is 1 while it is
    open or half-open and ``gateway_redis_refused_total`` counts the refused calls
    (gateway/metrics.py, per process). While closed, calls that fail at once because
    Redis cannot be reached are one WARNING when the first fails and one INFO when a
    call is answered again (module doc); ``gateway_redis_unreachable_total`` counts them.

    Raises ValueError when a cool-down is not positive or the maximum is below the start.
    """

    def __init__(
        self,
        *,
        cool_down_s: float = 1.0,
        max_cool_down_s: float = 5.0,
        slow_s: float = 1.0,
        name: str = "Redis",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cool_down_s <= 0 or max_cool_down_s < cool_down_s or slow_s <= 0:
            raise ValueError(
                "the cool-downs and slow_s must be positive, the maximum at least the start"
            )
        self.cool_down_s = cool_down_s
        self.max_cool_down_s = max_cool_down_s
        self.slow_s = slow_s
        self.name = name
        self._clock = clock
        self._state: BreakerState = "closed"
        self._epoch = 0  # changes with every state change: a call's ticket is its epoch
        self._until = 0.0  # clock time the cool-down ends (open)
        self._cool_down = cool_down_s  # the current cool-down
        self._cause = ""  # why it opened (the error's text)
        self._opened_at = 0.0
        self.opened = 0
        """How many times it opened from closed (failed probes not counted)."""
        self.probes = 0
        """How many probes it let through."""
        self.refused = 0
        """Calls refused at once while it was open or a probe was on its way."""
        self._refused_since_open = 0
        self._unreachable_since: float | None = None
        """Clock time the first call failed at once (Redis cannot be reached), while
        closed; None while calls are answered."""
        self._unreachable_calls = 0
        self._attentive = False
        """Whether an answer changes something (half-open, or calls failed at once):
        one check on the path of every answered call (:meth:`record`)."""

    @property
    def state(self) -> BreakerState:
        """``closed`` (calls go through), ``open`` (refused; the next call after the
        cool-down becomes the probe) or ``half-open`` (the probe is on its way; the
        others are refused)."""
        return self._state

    @property
    def cool_down(self) -> float:
        """The current cool-down (s): ``cool_down_s`` doubled per failed probe, capped."""
        return self._cool_down

    def retry_in(self) -> float:
        """Seconds until the next call goes through as the probe: 0 when closed, or when
        open and the cool-down is over, or while the probe is on its way."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._until - self._clock())

    def admit(self) -> int:
        """A call may go to Redis: returns its ticket for :meth:`record`. When the breaker
        is open and its cool-down is over this call is the probe (the breaker is
        half-open until it is recorded).

        Raises CircuitOpen (at once, Redis not asked) while the breaker is open or the
        probe is on its way.
        """
        if self._state == "closed":
            return self._epoch
        if self._state == "open":
            now = self._clock()
            if now >= self._until:
                self._state = "half-open"
                self._attentive = True
                self._epoch += 1
                self.probes += 1
                return self._epoch
            message = (
                f"{self.name} did not answer ({self._cause}); "
                f"it will be asked again in {self._until - now:.1f} s"
            )
            retry_in = self._until - now
        else:
            message = f"{self.name} did not answer ({self._cause}); it is being asked again now"
            retry_in = 0.0
        self.refused += 1
        self._refused_since_open += 1
        metrics.REDIS_REFUSED.inc()
        raise CircuitOpen(message, retry_in)

    def pass_through(self) -> int:
        """A call that goes to Redis even while the breaker is open (a lock's release,
        a renewal: what keeps already running transactions whole). Its ticket for
        :meth:`record`: its failure opens a closed breaker, it is never the probe."""
        return self._epoch if self._state == "closed" else _NO_TICKET

    def record(self, ticket: int, error: BaseException | None, elapsed_s: float = 0.0) -> None:
        """The call of ``ticket`` ended after ``elapsed_s`` seconds: answered (``error``
        None), or with ``error``.

        A call that hung (Redis did not answer, :func:`gateway.redisconn.unanswered`, and
        it timed out or took ``slow_s`` or more) opens a closed breaker; a probe that hung
        opens it again with twice the cool-down. A probe that Redis answered (also an
        error reply) or that failed at once (Redis refuses: calls fail fast on their
        own) closes it. A probe that ended otherwise (cancelled, the pool of this
        process full) proves nothing: the next call becomes the probe. While closed, a
        call that failed at once (Redis cannot be reached) and the first answer after
        such failures are logged once each (module doc). Calls admitted before the last
        change of state change nothing; the errors of such calls (and of calls let
        through, :meth:`pass_through`) that did not get an answer while the breaker is
        open or half-open are marked for :func:`outage_level` (DEBUG: the breaker logged
        the outage; not one WARNING per turn that was waiting when it opened).
        """
        if ticket != self._epoch:
            if error is not None and self._state != "closed" and _outage_error(error):
                # on its way when a hang opened it (or a lock's release, a renewal let
                # through): the breaker logged this outage; its caller logs it at DEBUG
                setattr(error, _LOGGED, True)
            return
        if error is None:  # the usual case: one check
            if self._attentive:
                self._answered()
            return
        failed = unanswered(error)
        if failed and (isinstance(error, _TIMEOUTS) or elapsed_s >= self.slow_s):
            if self._state == "closed":
                self._open(self.cool_down_s, error)
            else:
                self._open(min(2 * self._cool_down, self.max_cool_down_s), error)
        elif isinstance(error, ResponseError):  # an error reply is an answer
            if self._attentive:
                self._answered()
        elif self._state == "half-open":
            if failed:
                self._close(f"it fails at once now: {error}")
            else:  # not a verdict: the cool-down is over, the next call probes
                self._state = "open"
                self._attentive = self._unreachable_since is not None
                self._epoch += 1
                self._until = self._clock()
        elif failed:  # closed (no other state has a current ticket): failed at once
            self._unreachable(error)

    def _answered(self) -> None:
        """Redis answered a current call while half-open (the probe: close) or after
        calls failed at once (say it is reachable again)."""
        if self._state == "half-open":
            self._close("it answered")
        elif self._unreachable_since is not None:
            self._reachable()

    async def guard(self, call: Callable[[], Awaitable[_T]], *, always: bool = False) -> _T:
        """``call()`` awaited under this breaker: its result, or what it raised, which is
        recorded (:meth:`record`, with the time it took).

        Raises CircuitOpen at once, ``call`` not made, while the breaker is open or the
        probe is on its way (:meth:`admit`), unless ``always``: then the call goes
        through as :meth:`pass_through` says (a lock's release or renewal).
        """
        ticket = self.pass_through() if always else self.admit()
        sent = time.monotonic()
        try:
            result = await call()
        except BaseException as exc:
            self.record(ticket, exc, time.monotonic() - sent)
            raise
        self.record(ticket, None)
        return result

    def _unreachable(self, error: BaseException) -> None:
        """A call failed at once, Redis not reached, while closed: the first of an outage
        logs one WARNING (its caller logs it as before); the others are marked for
        :func:`outage_level` (their callers log them at DEBUG). Each is counted."""
        metrics.REDIS_UNREACHABLE.inc()
        self._unreachable_calls += 1
        if self._unreachable_since is not None:
            setattr(error, _LOGGED, True)
            return
        self._unreachable_since = self._clock()
        self._attentive = True
        log.warning(
            "%s cannot be reached (%s): its calls fail at once; the next failures are "
            "logged at DEBUG and counted in gateway_redis_unreachable_total until it "
            "answers again",
            self.name,
            str(error) or type(error).__name__,
        )

    def _reachable(self) -> None:
        """A call was answered after calls failed at once: one INFO with their count."""
        assert self._unreachable_since is not None
        log.info(
            "%s answers again after %.1f s: %d call(s) failed meanwhile",
            self.name,
            self._clock() - self._unreachable_since,
            self._unreachable_calls,
        )
        self._unreachable_since = None
        self._unreachable_calls = 0
        self._attentive = self._state == "half-open"

    def _open(self, cool_down: float, error: BaseException) -> None:
        probe_failed = self._state == "half-open"
        self._state = "open"
        self._attentive = self._unreachable_since is not None
        self._epoch += 1
        self._cool_down = cool_down
        self._until = self._clock() + cool_down
        self._cause = str(error) or type(error).__name__
        metrics.REDIS_BREAKER_OPEN.set(1)
        if probe_failed:
            log.info(
                "%s still does not answer (%s): asked again in %.1f s",
                self.name,
                self._cause,
                cool_down,
            )
            return
        self.opened += 1
        self._opened_at = self._clock()
        self._refused_since_open = 0
        log.warning(
            "%s did not answer (%s): its calls are refused for %.1f s, then one asks again "
            "(up to every %.1f s while it hangs)",
            self.name,
            self._cause,
            cool_down,
            self.max_cool_down_s,
        )

    def _close(self, why: str) -> None:
        self._state = "closed"
        self._epoch += 1
        self._cool_down = self.cool_down_s
        self._unreachable_since = None  # this line says how it ended
        self._unreachable_calls = 0
        self._attentive = False
        metrics.REDIS_BREAKER_OPEN.set(0)
        log.warning(
            "%s is asked again after %.1f s (%s): %d call(s) were refused meanwhile",
            self.name,
            self._clock() - self._opened_at,
            why,
            self._refused_since_open,
        )


def _outage_error(error: BaseException) -> bool:
    """Whether ``error`` says Redis was not asked or did not answer (also a pool of this
    process with no free connection: its holders wait on the same Redis), not an error
    reply, a cancellation or a bug (:data:`gateway.redisconn.UNANSWERED_ERRORS`)."""
    return isinstance(error, UNANSWERED_ERRORS)


_LOGGED = "_gateway_outage_logged"
"""Set (True) on the error of a call that failed at once during an outage the breaker
logged already (:meth:`CircuitBreaker._unreachable`; see :func:`refused_by_breaker`)."""

_ATTRIBUTE = "_gateway_breaker"
"""The attribute of a Redis client object that holds its breaker (:func:`breaker_of`)."""


def breaker_of(client: object) -> CircuitBreaker:
    """The :class:`CircuitBreaker` of Redis client ``client``, shared by every user of it
    (the session store, outbox, bus, nonces, TTS cache of one gateway process): kept on
    the client object, made with the defaults the first time it is asked for (or set by
    :func:`share_breaker`). A client made by another part of the program (a test's, the
    socket.io manager's) has a breaker of its own."""
    breaker = getattr(client, _ATTRIBUTE, None)
    if not isinstance(breaker, CircuitBreaker):
        breaker = CircuitBreaker()
        setattr(client, _ATTRIBUTE, breaker)
    return breaker


def share_breaker(client: object, breaker: CircuitBreaker) -> CircuitBreaker:
    """Make ``breaker`` the one of ``client`` (:func:`breaker_of`), before any user asked
    for it; returns it.

    Raises ValueError when ``client`` already has another breaker (its users would go on
    with that one)."""
    current = getattr(client, _ATTRIBUTE, None)
    if current is not None and current is not breaker:
        raise ValueError("this Redis client has a circuit breaker already")
    setattr(client, _ATTRIBUTE, breaker)
    return breaker


def refused_by_breaker(exc: BaseException) -> bool:
    """Whether ``exc`` is a :class:`CircuitOpen`, or an error raised from one (a store's
    own outage error, ``raise ... from exc``): the call was refused by an open breaker,
    which logged the outage once; or the same for the error of a call that failed at
    once while Redis could not be reached, after the first such call (the breaker
    logged that outage once), or of a call on its way when a hang opened the breaker
    (:meth:`CircuitBreaker.record`), or marked by :func:`mark_logged`. Callers log these at
    DEBUG, not one WARNING each (see :func:`outage_level`)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; bounded against a cycle
        if seen is None:
            return False
        if isinstance(seen, CircuitOpen) or getattr(seen, _LOGGED, False):
            return True
        seen = seen.__cause__
    return False


def retry_after_s(exc: BaseException, least_s: int = 1) -> int:
    """The ``Retry-After`` (whole seconds, RFC 9110 section 10.2.3) of an answer refused
    because of the Redis error ``exc``: when an open breaker refused the call
    (:class:`CircuitOpen`, or an error raised from one) the seconds until its cool-down
    ends, rounded up; ``least_s`` at least (also while the probe is on its way, or for
    any other error: a refused or restarting Redis is asked again by the next call)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; bounded against a cycle
        if seen is None:
            break
        if isinstance(seen, CircuitOpen):
            return max(least_s, math.ceil(seen.retry_in_s))
        seen = seen.__cause__
    return least_s


def mark_logged(exc: BaseException) -> None:
    """Mark ``exc`` as the error of an outage its raiser logged once already (as the
    breaker marks the failures after an outage's first): :func:`outage_level` gives
    DEBUG for it."""
    setattr(exc, _LOGGED, True)


def outage_level(exc: BaseException) -> int:
    """The level to log a Redis outage ``exc`` at: DEBUG when the breaker logged the
    outage already (:func:`refused_by_breaker`: an open breaker refused the call, or it
    failed at once in an outage whose first failure was logged), else WARNING."""
    return logging.DEBUG if refused_by_breaker(exc) else logging.WARNING
