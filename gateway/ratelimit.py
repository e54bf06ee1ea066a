"""Per-client token buckets: how many times something may happen, per client, per second.

Used by Flowstorm V2 to slow down session-id guessing: each "unknown session"
answer takes a token from the client IP's bucket, and a client whose bucket is
empty is refused (429) before its session is even looked up.

The buckets live in this process (a dict, at most ``max_clients`` of them; full
buckets are dropped first, then the least recently used). So with N gateway
instances behind a load balancer a client gets up to N times the allowance; that
still caps guessing at a few per second per instance instead of hundreds, and it
keeps the check free of I/O (a Redis round trip per refused guess would make
the limiter itself a cost an attacker can impose).

Clients are keyed by :func:`client_key`: an IPv4 address (an IPv4-mapped IPv6 one as
that IPv4 address) on its own, an IPv6 address by its /64, the block one host (a home
line, a cloud server) gets, whose 2**64 addresses it may use in turn.

The same bucket bounds the log lines of refused requests (:class:`RefusalLog`): a
client hammering an endpoint with a bad key or a forged signature gets its first
refusals logged at WARNING, then one a minute, the rest at DEBUG.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from gateway.protocol.errors import RequestVerificationError

MAX_CLIENT_CHARS: Final = 64
"""The characters of a client key :class:`TokenBuckets` keeps: a longer one is cut to
its first 64 (an IP address has at most 45). Behind a proxy whose ``X-Forwarded-For``
uvicorn trusts, the client address is that header's text, of any length: uncut, each of
``max_clients`` buckets could hold kilobytes."""
MAX_RETRY_AFTER_S: Final = 86_400
"""The longest ``Retry-After`` (s) :meth:`TokenBuckets.retry_after_s` gives: a day."""


IPV6_CLIENT_PREFIX: Final = 64
"""The prefix length (bits) of the IPv6 block :func:`client_key` counts as one client: a
/64 is the smallest block a network assigns one subscriber or host (RFC 6177, RFC 7421),
and a host picks its addresses in it freely (SLAAC privacy addresses, RFC 8981)."""


def client_key(address: str) -> str:
    """The key of client ``address`` (``request.client.host``: an IP address, or, behind a
    proxy whose X-Forwarded-For uvicorn trusts, whatever text that header held) in
    :class:`TokenBuckets`: an IPv4 address as it is (``203.0.113.7``); an IPv4-mapped IPv6
    one as its IPv4 address (``::ffff:203.0.113.7`` -> ``203.0.113.7``, one client however
    written); another IPv6 address as its /64 (:data:`IPV6_CLIENT_PREFIX`:
    ``2001:db8:1:2:a::1`` -> ``2001:db8:1:2::/64``, its zone dropped), so a client cannot
    take a new allowance with each address of its block. Text that is no IP address (or is
    longer than :data:`MAX_CLIENT_CHARS`) is returned as it is (the buckets cut it). Never
    raises."""
    if len(address) > MAX_CLIENT_CHARS:
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    block = ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False)
    return f"{block.network_address}/{IPV6_CLIENT_PREFIX}"


class TokenBuckets:
    """One token bucket per client key (:func:`client_key` of an address; at most
    :data:`MAX_CLIENT_CHARS` characters of it count, so the keys a client makes up share its
    own bucket past them).

    A bucket holds at most ``burst`` tokens and refills at ``per_s`` tokens per
    second. :meth:`allowed` tells whether a client has a token left (without
    taking it), :meth:`take` takes one, :meth:`retry_after_s` says when the next
    token comes. ``clock`` returns monotonic seconds.

    A refilled bucket holds nothing a missing one would not, so each :meth:`take` drops
    those refilled by then, earliest first, from a heap of ``(refilled at, client)`` (one
    entry per take; an entry whose bucket was taken from since is skipped, and the heap is
    rebuilt from the buckets when it holds more than twice as many entries). Past
    ``max_clients`` the least recently used buckets go. Each take costs O(log n)
    amortized: before, a take past ``max_clients`` scanned every bucket for refilled ones
    (46 ms at the default 65,536), so a flood of wrong keys from that many addresses (an
    IPv6 /47) stalled the event loop for each request.
    """

    def __init__(
        self,
        burst: int,
        per_s: float,
        *,
        max_clients: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or per_s <= 0 or max_clients < 1:
            raise ValueError("burst and max_clients must be >= 1, per_s > 0")
        self.burst = float(burst)
        self.per_s = per_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._refills: list[tuple[float, str]] = []  # heap of (refilled at, client)

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, client: str, now: float | None = None) -> float:
        """The tokens of ``client``'s bucket at clock time ``now`` (default: the clock's)."""
        entry = self._buckets.get(client[:MAX_CLIENT_CHARS])
        if entry is None:
            return self.burst
        tokens, at = entry
        now = self._clock() if now is None else now
        return min(self.burst, tokens + (now - at) * self.per_s)

    def allowed(self, client: str) -> bool:
        """Whether ``client`` has at least one token."""
        return self._level(client) >= 1.0

    def retry_after_s(self, client: str) -> int:
        """Whole seconds until ``client`` has a token again (0 when it has one), at most
        :data:`MAX_RETRY_AFTER_S` (a rate near zero would give an infinite wait)."""
        missing = 1.0 - self._level(client)
        if missing <= 0:
            return 0
        return max(1, math.ceil(min(missing / self.per_s, MAX_RETRY_AFTER_S)))

    def take(self, client: str) -> None:
        """Take one token from ``client``'s bucket (it may go down to zero, not below);
        drop the buckets refilled by now, then the least recently used past
        ``max_clients`` (class doc)."""
        client = client[:MAX_CLIENT_CHARS]
        now = self._clock()
        self._drop_refilled(now)
        level = max(0.0, self._level(client, now) - 1.0)
        self._buckets[client] = (level, now)
        self._buckets.move_to_end(client)
        heapq.heappush(self._refills, (self._refilled_at(level, now), client))
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        if len(self._refills) > 2 * len(self._buckets) + 16:
            self._refills = [(self._refilled_at(*e), c) for c, e in self._buckets.items()]
            heapq.heapify(self._refills)

    def _refilled_at(self, tokens: float, at: float) -> float:
        """When a bucket left with ``tokens`` at clock time ``at`` is full again."""
        return at + (self.burst - tokens) / self.per_s

    def _drop_refilled(self, now: float) -> None:
        """Drop the buckets full again at ``now`` (O(log n) each); a heap entry of a bucket
        taken from since (or already dropped) is dropped alone."""
        heap = self._refills
        while heap and heap[0][0] <= now:
            refilled_at, client = heapq.heappop(heap)
            entry = self._buckets.get(client)
            if entry is not None and self._refilled_at(*entry) == refilled_at:
                del self._buckets[client]


LOGGED_REFUSALS_BURST: Final = 5
"""Refusals logged at WARNING in a row before :data:`LOGGED_REFUSALS_EVERY_S` applies."""
LOGGED_REFUSALS_EVERY_S: Final = 60.0
"""After the burst, one refusal per this many seconds is logged at WARNING (s)."""


class RefusalLog:
    """The log level of each refusal of one endpoint family (one per app and channel: the
    admin API, a webhook channel, a carrier; all peers together, so the WARNING lines are
    bounded however many addresses a flood comes from, and one channel's flood does not
    use up another's): WARNING while a token bucket of ``burst`` tokens, refilled one per
    ``every_s`` s, has one, else DEBUG. ``clock`` returns monotonic seconds. ``what``
    is the participle a WARNING line after some at DEBUG counts them with (``refused``;
    ``reported`` for errors a platform reports, which are no refusals)."""

    def __init__(
        self,
        burst: int = LOGGED_REFUSALS_BURST,
        every_s: float = LOGGED_REFUSALS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        what: str = "refused",
    ) -> None:
        self._bucket = TokenBuckets(burst, 1 / every_s, max_clients=1, clock=clock)
        self._quiet = 0
        self.what = what
        """How the WARNING line's count names the lines logged at DEBUG (``N more <what>``)."""

    def level(self) -> tuple[int, int]:
        """The level of the next refusal's line, and how many refusals were logged at DEBUG
        since the last WARNING line (0 on a DEBUG line)."""
        if not self._bucket.allowed(""):
            self._quiet += 1
            return logging.DEBUG, 0
        self._bucket.take("")
        quiet, self._quiet = self._quiet, 0
        return logging.WARNING, quiet

    def log(self, logger: logging.Logger, msg: str, *args: object) -> None:
        """Log one refusal on ``logger`` (``msg % args``) at the :meth:`level` it gets; a
        WARNING line after some at DEBUG ends with ``(N more refused since, logged at
        DEBUG)`` (:attr:`what` for ``refused``)."""
        level, quiet = self.level()
        if not logger.isEnabledFor(level):
            return
        if quiet:
            msg += " (%d more %s since, logged at DEBUG)"
            args = (*args, quiet, self.what)
        logger.log(level, msg, *args, stacklevel=2)  # the caller's line, not this one


class VerifierLogs:
    """The refusal lines of one request verifier (one per app; the Alexa and Google
    verifiers are one), on ``logger`` as ``<platform> request refused: ...``: ``refusals``
    bounds those of requests that fail a check (a flood of forged ones in a bounded burst
    at WARNING, the rest at DEBUG); ``outages`` those of requests refused because a
    component the verifier needs fails (the outage's first at WARNING naming the
    component, then one a minute while it lasts). So forged requests cannot hide an
    outage, nor an outage the forgeries."""

    def __init__(self, logger: logging.Logger, platform: str) -> None:
        self.refusals = RefusalLog()
        self.outages = RefusalLog(burst=1)
        self._logger = logger
        self._platform = platform

    def log_refused(self, exc: RequestVerificationError[Any], component: str | None = None) -> None:
        """Log ``exc`` without a traceback: ``<platform> request refused: <reason>: <message>
        (<detail>)`` at the level ``refusals`` gives; with ``(component: <component>)`` at
        the level ``outages`` gives when ``component`` (whose outage refused it) is named."""
        detail = f" ({exc.detail})" if exc.detail else ""
        line, args = "%s request refused: %s: %s%s", (exc.reason.value, exc.message, detail)
        if component is None:
            self.refusals.log(self._logger, line, self._platform, *args)
        else:
            line += " (component: %s)"
            self.outages.log(self._logger, line, self._platform, *args, component)


def refusal_log(state: Any, name: str) -> RefusalLog:
    """The :class:`RefusalLog` of the refusals ``name`` (a channel: ``Twilio``, ``Plivo``;
    the admin API: ``admin``; a kind of refusal with a bucket of its own: ``Twilio
    saturated``) of one app, made on its first use; ``state`` is the app's ``app.state`` (they are
    kept in its ``refusal_logs``, a dict name -> RefusalLog)."""
    logs: dict[str, RefusalLog] | None = getattr(state, "refusal_logs", None)
    if logs is None:
        logs = {}
        state.refusal_logs = logs
    found = logs.get(name)
    if found is None:
        found = logs[name] = RefusalLog()
    return found
