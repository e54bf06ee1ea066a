"""The Rasa core: its REST channel (``GATEWAY_PIPELINE=rasa+http://host:5005``).

Spec: shared/specs/CORES.md, "Rasa REST channel". Each turn is
``POST {base}/webhooks/rest/webhook[?stream=true][&token=...]`` with
``{"sender": <session key>, "message": <text>, "metadata": {...}}`` (the key,
``<channel>:<session id>``, not the id: a session id one channel's client proposed never
reaches another channel's conversation in Rasa's tracker); the answer is a
JSON array of bot messages, or with ``?stream=true`` NDJSON (one message per line,
sent as ``text/event-stream`` but with no ``data:`` prefix), each message forwarded as
an item as its line arrives; a last line without its line end (Rasa ends every one) was
cut off: a PipelineError (a stream cut between lines cannot be told from a whole one).
A Rasa that ignores ``stream`` and answers one array is read as such.

Input -> ``message``: text as it is; ``#intro`` -> GATEWAY_RASA_INTRO_MESSAGE
(``/greet``); another action ``#name`` -> the intent ``/name``; the name of a button of
the last turn -> that button's ``payload``. ``metadata`` carries ``channel``,
``appKey``, ``locale``, ``turn`` and the turn's input attributes.

Message -> items (in Rasa's own order):

- ``text`` -> an item with the text (Rasa already splits on blank lines);
- ``buttons: [{title, payload}]`` -> the quick replies in the item's ``code``
  (gateway/pipeline/cores.py: ``{"buttons": [{"name": title, "request": {"type":
  "text", "payload": payload}}]}``; no payload: the title, no title: the payload, a
  null one as none), on the text's item when both came together; an
  empty list (an ``elements`` card without buttons, sent as ``title : subtitle``) gives
  the text alone;
- ``image`` -> an item with ``image``;
- ``attachment``: ``{type: image|audio|video, payload: {url|src}}`` -> that media field;
  an http(s) URL, or ``{payload: {url|src}}`` without a type, -> the media field its
  path's extension names (:func:`gateway.pipeline.cores.media_kind`: ``song.mp3`` audio,
  ``cat.png`` image, ``clip.mp4`` video); anything else (``menu.pdf``, a URL without an
  extension, not http(s)) -> the command item ``#attachment`` with it as code;
- ``custom`` -> ``{"transfer": "<target>"}`` or ``{"transfer": {target, reason}}`` is
  the transfer action (:func:`gateway.events.transfer_item`), one that names no target
  is not carried out (no item, one WARNING line:
  :class:`gateway.pipeline.cores.UntargetedHandoffs`); ``{"end_session": true}``
  ends the session (Rasa has no end of its own); ``{"ssml": ...}``, ``{"audio": url}``
  give such an item (``text``, the SSML's spoken text, a string or absent); any other
  object is the command item ``#custom`` with it as code.

A non-2xx status, invalid JSON, an answer that is not an array of objects, a message whose
``recipient_id`` is not the ``sender`` (Rasa addresses each message to the sender it
answers: one for another is another user's, never shown), whose
``text`` (or a ``custom`` ``ssml``'s ``text``) is not a string, buttons that are not an
array, or an answer over GATEWAY_PIPELINE_MAX_RESPONSE_BYTES is a PipelineError naming
Rasa.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from gateway.events import INTRO, Input, Response, ResponseItem
from gateway.pipeline.base import PipelineConfigError, PipelineError, PipelineOutput
from gateway.pipeline.cores import (
    DEFAULT_RETRY,
    MEDIA_KINDS,
    PooledCore,
    RetryPolicy,
    UntargetedHandoffs,
    bounded_lines,
    button,
    buttons_item,
    check_status,
    checked_json,
    chosen,
    command_item,
    core_client,
    core_stream,
    is_url,
    media_kind,
    read_json,
    talking_to,
    transfer_to,
)
from gateway.protocol import media_type
from gateway.sessions import Session
from gateway.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/rest/webhook"

_STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")


class RasaPipeline(PooledCore):
    """A Rasa bot's REST channel (see the module doc).

    ``url`` is the webhook URL; ``token`` goes in ``?token=``; ``retry`` (a
    :class:`~gateway.pipeline.cores.RetryPolicy`: GATEWAY_PIPELINE_RETRIES and its
    limits) says how a request the core refused unprocessed is sent again. Raises
    PipelineError as the module doc says.
    """

    name = "rasa"

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        stream: bool = True,
        intro_message: str = "/greet",
        max_response_bytes: int = 1_048_576,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient,
    ) -> None:
        self.url = url
        self._params = {"stream": "true"} if stream else {}
        if token:
            self._params["token"] = token
        self._secrets = (token,)  # hidden in the logged body of an error answer
        self._intro = intro_message
        self._max = max_response_bytes
        self._retry = retry
        self._client = client
        self.untargeted_handoffs = UntargetedHandoffs(log, "Rasa", "the custom names none")
        """The lines of ``custom`` transfers that name no target (not carried out)."""

    @classmethod
    def from_url(cls, spec: str, settings: Settings) -> Self:
        """The Rasa server at ``spec`` (``rasa+http(s)://host:port[/prefix]``; the scheme
        in any case, ``RASA+HTTP://`` too, as RFC 3986 section 3.1 has it).

        The REST webhook path is appended unless the spec ends with it. Raises
        PipelineConfigError for a spec that is not ``rasa+<URL>``, without a host, or
        with a query or fragment (the path would be appended after it: every turn a 404;
        the REST channel's ``?token=`` is GATEWAY_RASA_TOKEN).
        """
        prefix, plus, url = spec.strip().partition("+")
        if not plus or prefix.lower() != "rasa":
            raise PipelineConfigError("not a Rasa URL; use rasa+http://host:5005")
        parts = urlsplit(url)
        if not parts.hostname:
            raise PipelineConfigError("no host; use rasa+http://host:5005")
        url = parts.scheme + url[len(parts.scheme) :]  # urlsplit gives the scheme lower-cased
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise PipelineConfigError(
                "the Rasa URL takes no query or fragment (use rasa+http://host:5005[/prefix]); "
                "the REST channel's token goes in GATEWAY_RASA_TOKEN"
            )
        url = url.rstrip("/")
        if not url.endswith(WEBHOOK_PATH):
            url += WEBHOOK_PATH
        token = settings.rasa_token.get_secret_value() if settings.rasa_token else None
        return cls(
            url,
            token=token,
            stream=settings.rasa_stream,
            intro_message=settings.rasa_intro_message,
            max_response_bytes=settings.pipeline_max_response_bytes,
            retry=RetryPolicy.of(settings),
            client=core_client(settings),
        )

    def message(self, session: Session, input: Input) -> str:
        """The ``message`` sent for ``input`` (see the module doc)."""
        if input.action == INTRO:
            return self._intro
        if input.action:
            return "/" + input.action.removeprefix("#")
        request = chosen(session.pipeline_state, input.text)
        if request is not None and isinstance(request.get("payload"), str):
            return str(request["payload"])
        return input.text

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        """Send the turn to Rasa; yield its messages' items, then the Response."""
        body = {
            "sender": session.key,
            "message": self.message(session, input),
            "metadata": {
                "channel": session.channel,
                "appKey": session.app_key,
                "locale": input.locale or session.locale,
                "turn": session.turn_count + 1,
                **({"attributes": input.attributes} if input.attributes else {}),
            },
        }
        offered: list[dict[str, Any]] = []
        ended = False
        with talking_to("Rasa"):
            async with core_stream(
                self._client,
                "POST",
                self.url,
                core="Rasa",
                label=self.name,
                retry=self._retry,
                params=self._params,
                json=body,
            ) as answer:
                async for message in self._messages(answer):
                    for item in self._items(message, offered, session.key):
                        if item is None:
                            ended = True
                        else:
                            yield item
        session.pipeline_state["buttons"] = offered
        yield Response(session_ended=ended)

    async def _messages(self, answer: httpx.Response) -> AsyncIterator[Any]:
        """Rasa's messages as they arrive: one per line of a stream, else the JSON array's."""
        await check_status(answer, "Rasa", self._secrets)
        kind = media_type(answer.headers.get("content-type"))
        if kind in _STREAM_TYPES:
            # Rasa ends each line (json.dumps(message) + "\n"): a last one without its end
            # was cut off (there is no end marker: a cut between lines cannot be told)
            async for line in bounded_lines(answer, self._max, "Rasa", terminated=True):
                yield checked_json(line, "Rasa streamed an invalid line")
            return
        messages = await read_json(answer, self._max, "Rasa", self._secrets)
        if not isinstance(messages, list):
            raise PipelineError("Rasa answered something else than an array")
        for message in messages:
            yield message

    def _items(
        self, message: Any, offered: list[dict[str, Any]], sender: str
    ) -> list[ResponseItem | None]:
        """The items of one bot message to ``sender`` (None: the session ends); see the
        module doc."""
        if not isinstance(message, dict):
            raise PipelineError("Rasa sent a message that is not an object")
        recipient = message.get("recipient_id")
        if recipient is not None and recipient != sender:  # not this session's: not shown
            raise PipelineError("Rasa sent a message for another recipient than the sender")
        out: list[ResponseItem | None] = []
        text = message.get("text")
        if text is not None and not isinstance(text, str):
            raise PipelineError("Rasa sent a message whose text is not a string")
        buttons = message.get("buttons")
        if buttons is not None and not isinstance(buttons, list):
            raise PipelineError("Rasa sent buttons that are not an array")
        # an element of a carousel without buttons comes as "buttons": [] (Rasa's
        # send_elements): no quick replies, only its text
        mapped = [_button(b) for b in buttons or [] if isinstance(b, dict)]
        if mapped:
            offered.extend(mapped)
            out.append(buttons_item(mapped, text))
        elif text:
            out.append(ResponseItem(text=text))
        if (custom := message.get("custom")) is not None:
            out.extend(_custom(custom, self.untargeted_handoffs))
        if is_url(image := message.get("image")):
            out.append(ResponseItem(image=image))
        if (attachment := message.get("attachment")) is not None:
            out.append(_attachment(attachment))
        return out


def _button(b: dict[str, Any]) -> dict[str, Any]:
    """The quick reply of one Rasa button ``{title, payload}``: named by its title, else
    its payload; its request the text of its payload, else its title (a payload that is
    no string as its JSON). A null field is an absent one: Rasa leaves out only a
    message's own null fields, so a domain's empty ``payload:`` comes as null (once sent
    as the text ``"null"``, a null title shown as ``"None"``)."""
    title, payload = b.get("title"), b.get("payload")
    if payload is None:
        payload = title if title is not None else ""
    name = title if title is not None else payload
    sent = payload if isinstance(payload, str) else json.dumps(payload)
    return button(
        name if isinstance(name, str) else json.dumps(name), {"type": "text", "payload": sent}
    )


def _custom(custom: Any, untargeted: UntargetedHandoffs) -> list[ResponseItem | None]:
    if not isinstance(custom, dict):
        return [command_item("custom", custom)]
    transfer = transfer_to(custom.get("transfer"), custom.get("reason"))
    if transfer is not None:
        return [transfer]
    if "transfer" in custom:  # one naming no target: not carried out, nor a #custom
        untargeted.log("transfer")
        custom = {k: v for k, v in custom.items() if k not in ("transfer", "reason")}
        if not custom:
            return []
    out: list[ResponseItem | None] = []
    if isinstance(custom.get("ssml"), str):
        spoken = custom.get("text")
        if spoken is not None and not isinstance(spoken, str):
            raise PipelineError("Rasa sent a custom ssml whose text is not a string")
        out.append(ResponseItem(ssml=custom["ssml"], text=spoken))
    elif isinstance(custom.get("text"), str) and custom["text"].strip():
        # a text alone (``{"end_session": true, "text": "Bye"}``) is said: it was dropped
        out.append(ResponseItem(text=custom["text"]))
    if is_url(custom.get("audio")):
        out.append(ResponseItem(audio=custom["audio"]))
    if custom.get("end_session") is True:
        out.append(None)
    rest = {k: v for k, v in custom.items() if k not in ("ssml", "text", "audio", "end_session")}
    if rest or not out:
        out.append(command_item("custom", custom))
    return out


def _attachment(attachment: Any) -> ResponseItem:
    """The item of an ``attachment``: its media field when it is an http(s) URL of a
    known kind (the ``type`` given, else :func:`media_kind` of the URL), else the command
    item ``#attachment`` with it as code (a link to a document, say)."""
    kind: Any = None
    url: Any = attachment
    if isinstance(attachment, dict):
        payload = attachment.get("payload")
        url = payload.get("url") or payload.get("src") if isinstance(payload, dict) else None
        kind = attachment.get("type")
    if kind is None:
        kind = media_kind(url)
    if kind in MEDIA_KINDS and is_url(url):
        return ResponseItem(**{kind: url})
    return command_item("attachment", attachment)
