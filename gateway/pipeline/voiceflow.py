"""The Voiceflow core: its Dialog Manager API (``GATEWAY_PIPELINE=voiceflow:[versionID]``).

Spec: shared/specs/CORES.md, "Voiceflow Dialog Manager / Conversations API", (a) and (b).
The user id is the gateway session's key (``<channel>:<session id>``, URL-quoted: a session
id one channel's client proposed never reaches another channel's conversation in
Voiceflow). Each turn is either

- ``POST {GATEWAY_VOICEFLOW_RUNTIME_URL}/state/user/{userID}/interact`` (the state
  interact endpoint; answer: a JSON array of traces, or ``{trace: [...]}`` with
  ``verbose``), or, with GATEWAY_VOICEFLOW_PROJECT_ID set,
- ``POST .../v2/project/{projectID}/user/{userID}/interact/stream`` (SSE: ``event:
  trace`` with a trace as ``data``, then ``event: end``), each trace forwarded as an
  item as it arrives;

with ``Authorization: <GATEWAY_VOICEFLOW_API_KEY>`` (no ``Bearer``), ``versionID`` (the
spec's, else GATEWAY_VOICEFLOW_VERSION_ID; the stream endpoint takes it as its
``?environment=`` query parameter, whose default is ``development``) and the body
``{"action": ..., "config": {"tts": GATEWAY_VOICEFLOW_TTS, "stripSSML": false}}``: the
runtime's ``stripSSML`` removes whatever looks like a tag from ``speak`` messages
(general-runtime ``lib/services/filter``, ``sanitizeSSML``: the regex ``</?[^>]+(>|$)``),
so a voice agent's pauses and voices were lost before they reached Alexa or Google,
``Hi<break/>there`` became ``Hithere``, and plain text lost words (``5 < 6 & 7 > 2`` became
``5  2``); the SSML is read here instead (:func:`_spoken`).

Input -> action: ``#intro`` -> ``{"type": "launch"}``; ``#silence`` -> ``{"type":
"no-reply"}``; another action ``#name`` -> ``{"type": "name"}`` (a custom action's path);
the name of a ``choice`` button of the last turn -> that button's ``request``; text ->
``{"type": "text", "payload": text}``. An ``intent`` or ``event`` request of a Voiceflow
socket client (channel ``voiceflow``) is sent as it came (:data:`PASSED_ON`), with its
entities and confidence.

Traces -> items:

- ``text`` -> ``payload.message`` (else the slate's text); ``speak`` -> its ``message``
  as text, or, when it carries SSML markup (a voice agent's ``<voice name="Joanna">Hi
  </voice>``; :func:`gateway.ssml.ssml_in_text`), as the item's ``ssml`` (a ``<speak>``
  document) with its words as ``text``; with ``src`` as the item's ``audio`` when an
  http(s) URL (``data:`` TTS is left to the gateway's own speech); a ``speak`` of type
  ``audio`` -> an audio item, and so is each ``<audio src>`` (http(s)) of SSML that says
  nothing else (:func:`gateway.ssml.audio_only`); the SSML of one turn's messages read up
  to one bound (:class:`gateway.ssml.SsmlBound`, as the channels read an answer's: past
  it a message says its words read leniently, or only its ``src``; one WARNING a turn,
  bounded: :func:`_spoken`);
  ``stream`` (the audio player step) -> its http(s) ``src`` as an audio item (none for
  its ``PAUSE``/``END`` actions);
- ``visual`` (image) -> ``image``; ``cardV2`` -> title/description text, ``imageUrl``
  and its buttons; ``carousel`` -> one such item per card;
- ``choice`` -> the quick replies in the item's ``code`` (gateway/pipeline/cores.py),
  kept for the next turn;
- ``end`` -> the Response ends the session; ``no-reply {timeout}`` -> the Response's
  ``attributes.noReplyTimeoutMs`` (the core's silence timeout, ms; the next ``#silence``
  answers it);
- ``completion`` traces (``start``/``content``/``end``) -> one text item at ``end``; a
  completion whose ``end`` never comes (the traces or the stream end first, or another
  ``start`` comes) -> the text received as one item then (at the end of the turn, or
  before the next completion), with a WARNING naming Voiceflow and the missing end;
- a trace of another type with ``paths``/``defaultPath`` (a custom action) -> the
  command item ``#<type>`` with ``payload`` as code, or the transfer action
  (:func:`gateway.events.transfer_item`) when the type is ``transfer`` or ``handoff``
  and the payload names a ``target`` (a string, or JSON ``{"target", "reason"}``); a
  ``transfer``/``handoff`` naming none is not carried out (no item, one WARNING line:
  :class:`gateway.pipeline.cores.UntargetedHandoffs`);
- ``debug``, ``log``, ``flow``, ``block``, ``path`` and other traces are dropped; the
  types of those it does not know (not in ``_IGNORED``) are logged at DEBUG, one line
  per turn (:func:`gateway.pipeline.cores.log_dropped`).

A non-2xx status, invalid JSON, an answer that is not a list of traces, a ``choice``,
``cardV2`` or ``carousel`` whose ``buttons``/``cards`` are not an array, or a stream that
breaks off (the connection dropped, or the body ended without ``event: end``) is a
PipelineError: the traces received before a cut were forwarded already, a completion not
ended is dropped, and the turn fails, as every streaming core's cut answer does (a cut
answer is not taken for the whole one).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Final, Self
from urllib.parse import quote
from xml.sax.saxutils import escape

import httpx
from httpx_sse import SSEError

from gateway.events import (
    INTRO,
    MAX_TIMEOUT_S,
    SILENCE,
    Input,
    Response,
    ResponseItem,
    is_command,
)
from gateway.pipeline.base import PipelineConfigError, PipelineError, PipelineOutput
from gateway.pipeline.cores import (
    DEFAULT_RETRY,
    PooledCore,
    RetryPolicy,
    UntargetedHandoffs,
    bounded_sse,
    buttons_item,
    card_item,
    check_status,
    checked_json,
    chosen,
    command_item,
    core_client,
    core_json,
    core_stream,
    is_url,
    log_dropped,
    objects_in,
    read_json,
    talking_to,
    transfer_to,
)
from gateway.ratelimit import RefusalLog
from gateway.sessions import Session
from gateway.settings import Settings
from gateway.ssml import (
    SSML_ANSWER_MAX_CHARS,
    SsmlBound,
    audio_only,
    loose_text,
    read_ssml_in_text,
    ssml_markup,
)

log = logging.getLogger(__name__)

_IGNORED = frozenset({"debug", "log", "flow", "block", "path", "goto", "entity-filling",
                      "channel-action", "knowledgeBase"})  # fmt: skip


_ACTIONS = {INTRO: "launch", SILENCE: "no-reply"}
"""The Dialog Manager action types of the gateway's actions; another ``#name`` is ``name``."""


class _Turn:
    """What the traces of one turn left for its Response; ``untargeted`` logs the
    core's handoffs that name no target; ``ssml`` reads the SSML of the turn's ``speak``
    messages up to one bound for the whole answer (:class:`gateway.ssml.SsmlBound`, as
    every channel reads an answer's SSML), ``cut_ssml`` counts those cut or left out
    there (:func:`_spoken`)."""

    def __init__(self, untargeted: UntargetedHandoffs) -> None:
        self.untargeted = untargeted
        self.ssml = SsmlBound()
        self.cut_ssml = 0
        self.ended = False
        self.no_reply_ms: int | None = None
        self.buttons: list[dict[str, Any]] = []
        self.completion: list[str] = []
        self.unknown: dict[str, None] = {}  # types of traces dropped unknown, in order


class VoiceflowPipeline(PooledCore):
    """A Voiceflow agent through the Dialog Manager API (see the module doc).

    ``retry`` (a :class:`~gateway.pipeline.cores.RetryPolicy`: GATEWAY_PIPELINE_RETRIES and
    its limits) says how a request the core refused unprocessed is sent again."""

    name = "voiceflow"

    def __init__(
        self,
        *,
        api_key: str,
        version_id: str,
        runtime_url: str = "https://general-runtime.voiceflow.com",
        project_id: str | None = None,
        tts: bool = False,
        max_response_bytes: int = 1_048_576,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient,
    ) -> None:
        self._base = runtime_url.rstrip("/")
        self._project = project_id
        self._headers = {"Authorization": api_key, "versionID": version_id}
        self._secrets = (api_key,)  # hidden in the logged body of an error answer
        self._environment = {"environment": version_id}  # the interact stream's choice
        self._config = {"tts": tts, "stripSSML": False}  # the SSML is read here: _spoken
        self._max = max_response_bytes
        self._retry = retry
        self._client = client
        self.untargeted_handoffs = UntargetedHandoffs(log, "Voiceflow", "the payload names none")
        """The lines of transfer/handoff custom actions that name no target (not carried
        out)."""
        self.cut_ssml = RefusalLog()
        """The WARNING lines of answers whose ``speak`` messages hold more SSML than one
        answer reads (:meth:`_log_cut_ssml`): a burst, then one a minute, the rest at
        DEBUG."""

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The agent of GATEWAY_VOICEFLOW_API_KEY; ``voiceflow:<versionID>`` picks a version.

        Raises PipelineConfigError naming GATEWAY_VOICEFLOW_API_KEY when it is unset.
        """
        if settings.voiceflow_api_key is None or not settings.voiceflow_api_key.get_secret_value():
            raise PipelineConfigError(
                "needs GATEWAY_VOICEFLOW_API_KEY (the agent's Dialog Manager API key, VF.DM....)"
            )
        version = spec.strip().split(":", 1)[1].strip() or settings.voiceflow_version_id
        return cls(
            api_key=settings.voiceflow_api_key.get_secret_value(),
            version_id=version,
            runtime_url=settings.voiceflow_runtime_url,
            project_id=settings.voiceflow_project_id,
            tts=settings.voiceflow_tts,
            max_response_bytes=settings.pipeline_max_response_bytes,
            retry=RetryPolicy.of(settings),
            client=core_client(settings),
        )

    def action(self, session: Session, input: Input) -> dict[str, Any]:
        """The Dialog Manager action for ``input`` (see the module doc)."""
        request = _socket_request(session, input)
        if request is not None:
            return request
        if input.action:
            return {"type": _ACTIONS.get(input.action, input.action.removeprefix("#"))}
        return chosen(session.pipeline_state, input.text) or {"type": "text", "payload": input.text}

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        """Send the turn to Voiceflow; yield the traces' items, then the Response."""
        body = {"action": self.action(session, input), "config": self._config}
        user = quote(session.key, safe="")
        turn = _Turn(self.untargeted_handoffs)
        with talking_to("Voiceflow"):
            if self._project:
                project = quote(self._project, safe="")
                async with core_stream(
                    self._client,
                    "POST",
                    f"{self._base}/v2/project/{project}/user/{user}/interact/stream",
                    core="Voiceflow",
                    label=self.name,
                    retry=self._retry,
                    params=self._environment,
                    json=body,
                    headers={**self._headers, "Accept": "text/event-stream"},
                ) as answer:
                    await check_status(answer, "Voiceflow", self._secrets)
                    async for trace in self._stream(answer):
                        for item in _items(trace, turn):
                            yield item
            else:
                url = f"{self._base}/state/user/{user}/interact"
                async with core_stream(
                    self._client,
                    "POST",
                    url,
                    core="Voiceflow",
                    label=self.name,
                    retry=self._retry,
                    json=body,
                    headers=self._headers,
                ) as answer:
                    traces = await read_json(answer, self._max, "Voiceflow", self._secrets)
                if isinstance(traces, dict) and isinstance(traces.get("trace"), list):
                    traces = traces["trace"]  # verbose=true
                if not isinstance(traces, list):
                    raise PipelineError("Voiceflow answered something else than a list of traces")
                for trace in traces:
                    for item in _items(trace, turn):
                        yield item
        ended = "the stream ended" if self._project else "the list of traces ended"
        for item in _unended_completion(turn, ended):
            yield item
        log_dropped(log, "Voiceflow", "traces", turn.unknown)
        self._log_cut_ssml(turn)
        session.pipeline_state["buttons"] = turn.buttons
        attributes = {"noReplyTimeoutMs": turn.no_reply_ms} if turn.no_reply_ms else {}
        yield Response(session_ended=turn.ended, attributes=attributes)

    def _log_cut_ssml(self, turn: _Turn) -> None:
        """One WARNING line (bounded: :attr:`cut_ssml`) for a turn whose ``speak``
        messages held more SSML than one answer reads
        (:data:`gateway.ssml.SSML_ANSWER_MAX_CHARS`, all together: :func:`_spoken`), as
        the webhooks log theirs (gateway/io/webhook.py, ``_log_cut_ssml``): the message
        at the bound cut there (its words said, its markup left out), how many later ones
        left out (their audio only). Nothing when none was."""
        if not turn.cut_ssml:
            return
        later = turn.cut_ssml - 1
        self.cut_ssml.log(
            log,
            "Voiceflow's answer holds more SSML than one answer reads (%d characters, all "
            "speak messages together): a message cut there (its words said, its markup "
            "left out)%s",
            SSML_ANSWER_MAX_CHARS,
            f", the SSML of {later} later message{'s' if later > 1 else ''} left out "
            "(their audio only)"
            if later
            else "",
        )

    async def _stream(self, answer: httpx.Response) -> AsyncIterator[Any]:
        """The traces of an interact stream, as they arrive, until ``event: end``."""
        try:
            async for event in bounded_sse(answer, self._max, "Voiceflow"):
                if event.event == "end":
                    return
                if event.event != "trace":
                    continue
                yield checked_json(event.data, "Voiceflow streamed an invalid trace")
        except SSEError as exc:
            raise PipelineError(f"Voiceflow's stream is not an event stream: {exc}") from exc
        raise PipelineError("Voiceflow's stream ended without its end event")


PASSED_ON: Final = frozenset({"intent", "event"})
"""Request types of a Voiceflow socket client (``attributes.voiceflowAction``, set by
adapters/voiceflow) that the Dialog Manager is sent as they came: their payload (an
intent's name, entities and confidence; an event's name) is what the agent acts on."""


def _socket_request(session: Session, input: Input) -> dict[str, Any] | None:
    """The request a Voiceflow socket client sent, when it is one of :data:`PASSED_ON`
    (its payload checked by the adapter, adapters/voiceflow/protocol.py); None otherwise,
    and on any other channel (whose clients' attributes are theirs to name)."""
    if session.channel != "voiceflow":
        return None
    raw = input.attributes.get("voiceflowAction")
    if not isinstance(raw, dict) or raw.get("type") not in PASSED_ON:
        return None
    payload = raw.get("payload")
    return {"type": raw["type"], "payload": payload} if isinstance(payload, dict) else None


def _items(trace: Any, turn: _Turn) -> list[ResponseItem]:
    """The items of one trace; what it means for the Response goes in ``turn``."""
    if not isinstance(trace, dict) or not isinstance(trace.get("type"), str):
        raise PipelineError("Voiceflow sent a trace without a type")
    kind: str = trace["type"]
    payload = trace.get("payload")
    body: dict[str, Any] = payload if isinstance(payload, dict) else {}
    if kind == "text":
        text = body.get("message") if isinstance(body.get("message"), str) else _slate(body)
        return [ResponseItem(text=text)] if text else []
    if kind == "speak":
        src = body.get("src")
        if body.get("type") == "audio":
            return [ResponseItem(audio=src)] if is_url(src) else []
        message = body.get("message")
        if not isinstance(message, str) or not message:
            return []
        return _spoken(message, src if is_url(src) else None, turn)
    if kind == "stream":  # the audio player step: play ``src`` (not its PAUSE/END)
        src = body.get("src")
        playing = body.get("action") not in ("PAUSE", "END")
        return [ResponseItem(audio=src)] if playing and is_url(src) else []
    if kind == "visual":
        image = body.get("image")
        return [ResponseItem(image=image)] if is_url(image) else []
    if kind == "choice":
        buttons = [_button(b) for b in objects_in(body, "buttons", "Voiceflow", kind)]
        turn.buttons.extend(buttons)
        return [buttons_item(buttons)] if buttons else []
    if kind == "cardV2":
        return [_card(body, turn)]
    if kind == "carousel":
        return [_card(c, turn) for c in objects_in(body, "cards", "Voiceflow", kind)]
    if kind == "end":
        turn.ended = True
        return []
    if kind == "no-reply":
        timeout = body.get("timeout")
        if isinstance(timeout, int | float) and timeout > 0:
            if not timeout <= MAX_TIMEOUT_S:  # 1e308 s: no int of ms (NaN too)
                raise PipelineError(
                    f"Voiceflow's no-reply timeout is out of range (over {MAX_TIMEOUT_S} s)"
                )
            turn.no_reply_ms = int(timeout * 1000)
        return []
    if kind in ("completion", "completion-start", "completion-continue", "completion-end"):
        state = body.get("state") or kind.removeprefix("completion-")
        # a start while one is pending: that one's end never came (delivered, not merged)
        begun = _unended_completion(turn, "another began") if state == "start" else []
        if isinstance(body.get("content"), str):
            turn.completion.append(body["content"])
        if state == "end" and turn.completion:
            text, turn.completion = "".join(turn.completion).strip(), []
            return [ResponseItem(text=text)] if text else []
        return begun
    if kind in _IGNORED:
        return []
    if not ("paths" in trace or "defaultPath" in trace):
        turn.unknown[kind] = None  # not a custom action: logged at the end of the turn
        return []
    return _custom_action(kind, payload, turn)


def _spoken(message: str, audio: str | None, turn: _Turn) -> list[ResponseItem]:
    """The items of a ``speak`` message: SSML (a voice agent's ``<voice name="Joanna">Hi
    </voice>``, ``Hi<break time="500ms"/>there``; :func:`gateway.ssml.ssml_in_text`) as the
    item's ``ssml``, a ``<speak>`` document, with its words as ``text`` (what a screen
    shows); plain text as ``text``. SSML of sounds alone (``<audio src="https://..."/>``,
    no words: :func:`gateway.ssml.audio_only`) is one audio item per sound (the trace's own
    ``src``, when given, alone: its rendering of the whole message), as a ``speak`` of type
    ``audio`` is. Before, the markup was the item's text: voice assistants and the
    gateway's own speech read the tags out, text clients showed them; and a message of
    sounds alone was an item with neither text nor audio, which a text client (the
    Voiceflow socket's) was shown nothing of and the gateway's own speech synthesized.

    The SSML is read up to the turn's bound (``turn.ssml``, a
    :class:`gateway.ssml.SsmlBound`, one for all its messages, as every channel reads an
    answer's SSML) before it is parsed: the message at the bound
    (:data:`gateway.ssml.SSML_ANSWER_MAX_CHARS`) says its words up to it, read leniently
    (``text``; no ``ssml``: its markup is lost, and SSML cut there is no fault of the
    core's; words beginning with ``#`` get an ``ssml`` of those words alone, within what
    the bound read, :func:`_words_ssml`: else the item would be a ``#command``, neither
    said nor shown), a later one its ``src`` alone (no item without one); of SSML that is not
    well-formed, the words up to :data:`gateway.ssml.LOOSE_ANSWER_MAX_CHARS` (the
    ``ssml`` as far as read). ``turn.cut_ssml`` counts the messages cut or left out
    (logged once per turn). Before, a turn of 30 messages of 30 KB of SSML held the
    event loop for 2.4 to 4 s (each parsed up to three times and read leniently whole)."""
    document = ssml_markup(message)  # (a scan of its tags, no parse)
    if document is None:
        return [ResponseItem(text=message, audio=audio)]
    bound = turn.ssml
    taken, cut = bound.take(document)
    if cut:  # at the answer's bound: its words up to it, its markup lost; later, none
        turn.cut_ssml += 1
        words = loose_text(bound.lenient(taken)) if taken else ""
        if not (words or audio):
            return []
        item = ResponseItem(text=words or None, audio=audio)
        if is_command(item):  # words beginning with '#' ("#1 hit"): speech all the same
            item = item.model_copy(update={"ssml": _words_ssml(words, len(taken))})
        return [item]
    read = read_ssml_in_text(message)
    assert read is not None  # (ssml_markup found SSML markup in it)
    ssml, spoken = read
    if spoken == "":  # no words: maybe sounds alone
        sounds = audio_only(ssml)
        if sounds is not None:
            return [ResponseItem(audio=src) for src in ([audio] if audio else sounds)]
    if spoken is None:  # not well-formed: its words as the channels read them
        ssml = bound.lenient(ssml)
    words = loose_text(ssml) if spoken is None else spoken
    if not (words or ssml or audio):
        return []
    return [ResponseItem(text=words or None, ssml=ssml or None, audio=audio)]


_CUT_REFERENCE = re.compile(r"&[a-z]*$")
"""The start of a character reference cut at the end of escaped text (``&am``)."""


def _words_ssml(words: str, room: int) -> str:
    """A ``<speak>`` document saying ``words``, the words (read leniently) of the ``speak``
    message at the turn's SSML bound, for when they would make a ``#command`` item
    without SSML (:func:`gateway.events.is_command`: text beginning with ``#``): an item
    with ``ssml`` is speech, said and shown on every channel. At most ``room`` characters
    (what the bound read of the message: the turn's SSML stays within the bound, which
    the channels read it up to again), the end of the words left out to fit (``text``
    keeps them all); ``<speak></speak>`` when none fit."""
    body = escape(words)[: max(room - len("<speak></speak>"), 0)]
    return f"<speak>{_CUT_REFERENCE.sub('', body)}</speak>"


def _unended_completion(turn: _Turn, why: str) -> list[ResponseItem]:
    """The text of a streamed completion whose ``end`` never came (``why``: the stream or
    the list of traces ended, another completion began), as one item (none when it is blank), logged
    at WARNING (``Voiceflow's completion had no end (...); its N characters delivered as
    one item``); nothing when no completion is pending. Before, that text was dropped:
    the user heard nothing of it."""
    if not turn.completion:
        return []
    text, turn.completion = "".join(turn.completion).strip(), []
    log.warning(
        "Voiceflow's completion had no end (%s); its %d characters delivered as one item",
        why,
        len(text),
    )
    return [ResponseItem(text=text)] if text else []


def _slate(body: dict[str, Any]) -> str:
    slate = body.get("slate")
    content = slate.get("content") if isinstance(slate, dict) else None
    lines = []
    for block in content if isinstance(content, list) else []:
        children = block.get("children") if isinstance(block, dict) else None
        children = children if isinstance(children, list) else []  # as the content: no text
        parts = [c.get("text", "") for c in children if isinstance(c, dict)]
        lines.append("".join(p for p in parts if isinstance(p, str)))
    return "\n".join(lines).strip()


def _button(b: dict[str, Any]) -> dict[str, Any]:
    request = b.get("request") if isinstance(b.get("request"), dict) else None
    name = b.get("name")
    if not isinstance(name, str):
        label = (request or {}).get("payload", {})
        name = str(label.get("label", "")) if isinstance(label, dict) else ""
    return {"name": name, "request": request or {"type": "text", "payload": name}}


def _card(card: dict[str, Any], turn: _Turn) -> ResponseItem:
    description = card.get("description")
    if isinstance(description, dict):
        description = description.get("text")
    text = ". ".join(t for t in (card.get("title"), description) if isinstance(t, str) and t)
    buttons = [_button(b) for b in objects_in(card, "buttons", "Voiceflow", "card")]
    turn.buttons.extend(buttons)
    return card_item(text, card.get("imageUrl"), buttons)


def _custom_action(kind: str, payload: Any, turn: _Turn) -> list[ResponseItem]:
    """The item of a custom action: the transfer action for a ``transfer``/``handoff``
    naming a target (none, logged at WARNING, for one naming none), else ``#<kind>``."""
    value = payload
    if isinstance(payload, str):
        try:
            value = core_json(payload)
        except ValueError:
            value = payload
    if kind not in ("transfer", "handoff"):
        return [command_item(kind, value)]
    transfer = transfer_to(value)
    if transfer is None:
        turn.untargeted.log(f"{kind} custom action")
        return []
    return [transfer]
