"""The core pipeline protocol: one turn in, response items streamed out, then the Response."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Protocol

from gateway.events import Input, Response, ResponseItem
from gateway.sessions import Session

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the client request being served; sent to the core as ``X-Request-Id``."""

TURN_DEADLINE: ContextVar[float | None] = ContextVar("turn_deadline", default=None)
"""When the running turn's core time ends: the event loop's clock (``loop.time()``, s) at
which the turn engine's GATEWAY_TURN_TIMEOUT_S cancels the pipeline; None outside a turn
(a core driven directly, as in tests). Set by the engine around each turn's pipeline; a
core client reads it to know how long it may still wait (the retry after a core's
``Retry-After``: :func:`gateway.pipeline.cores.send_retried`, which also heeds the
channel's :data:`ANSWER_DEADLINE` while it is ahead)."""

ANSWER_DEADLINE: ContextVar[float | None] = ContextVar("answer_deadline", default=None)
"""When the channel that started the turn answers whatever the turn has come to: the event
loop's clock (``loop.time()``, s) of a webhook's deadline (GATEWAY_ALEXA_DEADLINE_S,
..._GOOGLE_..., ..._DIALOGFLOW_..., less the time the request took to read; a turn still
running then is answered "still working"); None for a channel that hands the turn's
events out as they come (it waits for the turn's end). Set by the webhook driver
(:func:`gateway.io.webhook.run_turn`) as it starts the turn, whose task keeps it (a copy
of the context). While it is ahead it bounds the turn's waits: the wait for the session's
lock (a turn not started by then is not run: ``Conversation._lock_wait_s``), a core's retry
that would end past it is not made (:func:`gateway.pipeline.cores.send_retried`), and no
``#error`` turn is started that would have less than GATEWAY_ERROR_TURN_MIN_S before it.
Once it has passed (the platform heard "still working") it bounds nothing else (a turn
that has its lock runs on): the pipeline's own
timeout is GATEWAY_TURN_TIMEOUT_S either way, and a late turn goes on within it as on a
streaming channel (its retry, its ``#error`` turn) and saves the session."""


def shown_seconds(seconds: float) -> str:
    """``seconds`` (s, 0 or more) as a message gives a time, without its unit: to 0.1 s
    (``1``, ``2.5``, ``3600``; ``1.2`` for 1.23456), but a time under 0.05 s other than
    0 to one significant digit (``0.04``, ``0.003``: rounded it was ``0``, a limit or a
    wait no one set); ``forever`` for ``math.inf``. Pure; never raises."""
    if math.isinf(seconds):
        return "forever"
    if 0 < abs(seconds) < 0.05:
        return f"{seconds:.1g}"
    return f"{round(seconds, 1):g}"


class ConnectWatch:
    """What one run of a turn's pipeline knows of its core's connections: ``cut`` is set
    when its time ran out (``expired()``, the run's timeout's: True once it fired) while
    a connection to the core was being opened (its TCP connect or TLS handshake
    cancelled), so the core could not be reached in the turn's time, where a core that
    was reached did not answer in it. Made by the engine for each run
    (:data:`CONNECT_WATCH`), marked by the core's HTTP client
    (:func:`gateway.pipeline.cores.send_retried`)."""

    __slots__ = ("cut", "expired")

    def __init__(self, expired: Callable[[], bool]) -> None:
        self.expired = expired
        self.cut = False


CONNECT_WATCH: ContextVar[ConnectWatch | None] = ContextVar("connect_watch", default=None)
"""The running turn's :class:`ConnectWatch`; None outside a turn."""

PipelineOutput = ResponseItem | Response
"""What a pipeline yields: any number of ResponseItems, then exactly one Response."""


class PipelineError(Exception):
    """The core pipeline failed: it could not be reached, timed out or answered garbage.

    The turn engine turns it into an ErrorEvent with source ``pipeline`` (or the
    ``#error`` turn when GATEWAY_ERROR_TURN is on, but not after one with
    ``unreachable``: the ``#error`` turn would go to the same core).

    ``unreachable`` (keyword, default False): no connection to the core was made
    (refused, no route, the connect timed out: :func:`gateway.pipeline.cores.connection_failed`;
    or the turn's time ran out while it was being made: :class:`ConnectWatch`), so the core
    cannot have seen the turn.
    """

    def __init__(self, *args: object, unreachable: bool = False) -> None:
        super().__init__(*args)
        self.unreachable = unreachable


class PipelineConfigError(ValueError):
    """A core cannot be set up from the settings: an unknown GATEWAY_PIPELINE scheme,
    a missing credential or a malformed URL. Raised at startup (``make_pipeline``),
    with a message naming the setting to fix (quoting the spec only as :func:`shown_spec`
    gives it: the message goes to stderr and the logs)."""


_QUERY_VALUE = re.compile(r"(?<=[?&;])([^=&;#\s]*=)[^&;#\s]*")


def hide_userinfo(url: str) -> str:
    """``url`` with the userinfo of its authority (``user:password@``) written ``***@``:
    ``redis://:p@ss@host:6379`` is ``redis://***@host:6379``; the hosts of a Sentinel or
    Cluster URL (``redis+sentinel://:pw@h1:26379,h2:26379/0/mymaster``) are kept.

    The userinfo runs from the first ``//`` to the last ``@`` of the text: RFC 3986
    (section 3.2.1) has a password percent-encode ``@``, ``/``, ``?`` and ``#``, but
    pasted ones hold them as they are, and a ``@`` cut at the first one left the rest of
    the password shown. A ``@`` in a path or query hides the text before it too (shown
    less, never a password). A text without ``//`` or without ``@`` after it is returned
    as it is. Pure; never raises."""
    head, slashes, rest = url.partition("//")
    if not slashes or "@" not in rest:
        return url
    return f"{head}//***@{rest.rpartition('@')[2]}"


def hide_url_secrets(url: str, values: re.Pattern[str] = _QUERY_VALUE) -> str:
    """``url`` with its userinfo (as :func:`hide_userinfo` finds it: from the first ``//``
    to the last ``@``) and the values of the query parameters ``values`` matches (group 1:
    the text before the value, ``name=``; the rest of the match: the value) hidden
    together: each run of hidden characters, found on ``url`` as given, is written
    ``***`` once. The two overlap when a password holds ``?``, ``&`` or ``;`` and ``=``
    (``https://u:pw;k=v@host``) or a query value holds ``@`` (``//host?password=p@ss``):
    either redaction made first hid the other's part (the ``@``, or the query's name)
    and left the rest of the secret shown; both found on the text as given hide it all.
    Pure; never raises."""
    hidden: list[tuple[int, int]] = [(m.end(1), m.end()) for m in values.finditer(url)]
    head, slashes, rest = url.partition("//")
    if slashes and "@" in rest:
        hidden.append((len(head) + 2, len(head) + 2 + rest.rindex("@")))
    runs: list[list[int]] = []  # [start, end) of each run of hidden characters
    for start, end in sorted(hidden):
        if runs and start <= runs[-1][1]:  # overlapping or adjoining: one run
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    out: list[str] = []
    shown_from = 0
    for start, end in runs:
        out += [url[shown_from:start], "***"]
        shown_from = end
    out.append(url[shown_from:])
    return "".join(out)


def shown_spec(spec: str) -> str:
    """``spec`` (a core spec, stripped) as an error message may quote it: a URL's userinfo
    (``user:password@``, :func:`hide_userinfo`) and the values of its query parameters
    (a webhook's ``?token=``) replaced by ``***`` (:func:`hide_url_secrets`: a password
    holding ``;k=`` is all hidden)."""
    return hide_url_secrets(spec.strip())


class Pipeline(Protocol):
    """A conversational core: the NLP/dialogue side of the bot.

    ``process`` runs one turn. It may read and change ``session.attributes`` and
    ``session.pipeline_state``; the turn engine saves them when the turn
    succeeds and discards them when it fails, but for the ``pipeline_state`` keys
    the core names in an optional ``durable_state`` attribute (a collection of key
    names: what the core made on its side and cannot get again, a Chat API user
    key, say), which a failed turn keeps. It yields ResponseItems as soon as
    they are known (channels that stream forward each at once), then one
    Response whose ``items`` may hold further items. Failures raise
    PipelineError; the engine bounds the whole turn by GATEWAY_TURN_TIMEOUT_S.
    """

    name: str

    def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        """Run one turn of ``session`` on ``input`` (an async generator)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
