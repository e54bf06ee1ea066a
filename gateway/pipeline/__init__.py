"""Core pipeline clients and their selection: one core per application key.

A core is named by a spec (GATEWAY_PIPELINE, and per application key GATEWAY_PIPELINES):

==============================================  ==============================================
spec                                            core (class, imported only when named)
==============================================  ==============================================
``demo``                                        the built-in dialogue (:class:`DemoPipeline`)
``http://...``, ``https://...``                 the webhook contract (:class:`HttpPipeline`)
``rasa+http://host:5005``, ``rasa+https://``    Rasa REST channel (``rasa:RasaPipeline``)
``voiceflow:`` or ``voiceflow:<versionID>``     Voiceflow Dialog Manager API
``botpress:`` or ``botpress:<webhookId>``       Botpress Chat API
``dialogflow-cx:projects/P/locations/L/...``    Dialogflow CX detectIntent
``openai+https://host/v1``, ``openai+http://``  OpenAI-compatible chat completions
==============================================  ==============================================

Secrets come from each core's own settings (GATEWAY_VOICEFLOW_API_KEY,
GATEWAY_BOTPRESS_..., GATEWAY_OPENAI_API_KEY, ...), never from the spec. Every core
class has ``from_url(spec, settings)`` raising :class:`PipelineConfigError` with a
message naming the setting to fix; :func:`make_pipeline` builds them all at startup,
so an unknown scheme or a missing credential stops the gateway before it serves.
"""

from __future__ import annotations

import importlib
import json
import time
import tomllib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from gateway import metrics
from gateway.events import Input, Response
from gateway.pipeline.base import (
    Pipeline,
    PipelineConfigError,
    PipelineError,
    PipelineOutput,
    shown_spec,
)
from gateway.pipeline.demo import DemoPipeline
from gateway.pipeline.http import HttpPipeline
from gateway.sessions import Session
from gateway.settings import Settings

__all__ = [
    "CORES",
    "CoreRouter",
    "DemoPipeline",
    "HttpPipeline",
    "Pipeline",
    "PipelineConfigError",
    "PipelineError",
    "PipelineOutput",
    "core_class",
    "make_pipeline",
    "pipeline_specs",
]

CORES: Mapping[str, str] = {
    "demo": "gateway.pipeline.demo:DemoPipeline",
    "http": "gateway.pipeline.http:HttpPipeline",
    "https": "gateway.pipeline.http:HttpPipeline",
    "rasa+http": "gateway.pipeline.rasa:RasaPipeline",
    "rasa+https": "gateway.pipeline.rasa:RasaPipeline",
    "voiceflow": "gateway.pipeline.voiceflow:VoiceflowPipeline",
    "botpress": "gateway.pipeline.botpress:BotpressPipeline",
    "dialogflow-cx": "gateway.pipeline.dialogflow_cx:DialogflowCxPipeline",
    "openai+http": "gateway.pipeline.openai:OpenAIPipeline",
    "openai+https": "gateway.pipeline.openai:OpenAIPipeline",
}
"""Spec scheme -> ``module:Class`` of its core, imported only when a spec names it."""


class CoreFactory(Protocol):
    """A core class: ``from_url(spec, settings)`` makes one or raises PipelineConfigError."""

    def from_url(self, spec: str, settings: Settings) -> Pipeline:
        """The core ``spec`` names, configured from ``settings``."""
        ...


def scheme_of(spec: str) -> str:
    """The scheme of a core spec: ``demo``, or what comes before the first ``:``."""
    spec = spec.strip()
    return "demo" if spec == "demo" else spec.split(":", 1)[0].lower()


def core_class(spec: str, setting: str = "GATEWAY_PIPELINE") -> CoreFactory:
    """The core class ``spec``'s scheme names (its module imported now).

    Raises PipelineConfigError naming ``setting`` for an unknown scheme or a core
    whose module is not in this build.
    """
    scheme = scheme_of(spec)
    target = CORES.get(scheme) if ":" in spec or scheme == "demo" else None
    if target is None:
        known = ", ".join(f"{s}:" if s != "demo" else s for s in CORES)
        raise PipelineConfigError(
            f"{setting}: unknown core {shown_spec(spec)!r}; use one of the schemes {known}"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise PipelineConfigError(
            f"{setting}: the core {scheme!r} is not available in this build ({module_name})"
        ) from exc
    return cast(CoreFactory, getattr(module, class_name))


def pipeline_specs(settings: Settings) -> dict[str, str]:
    """Application key -> core spec from GATEWAY_PIPELINES (a JSON object or a TOML file).

    A value starting with ``{`` or ``[`` is JSON (an array is refused as not a map);
    anything else is the path of a TOML file whose top-level ``key = "spec"`` pairs (or
    those of its ``[pipelines]`` table) are the map.
    Raises PipelineConfigError naming GATEWAY_PIPELINES when it cannot be read or is not
    a map of non-empty strings.
    """
    raw = (settings.pipelines or "").strip()
    if not raw:
        return {}
    data: Any
    if raw[0] in "{[":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise PipelineConfigError(f"GATEWAY_PIPELINES is not valid JSON: {exc}") from exc
    else:
        try:
            data = tomllib.loads(Path(raw).read_text(encoding="utf-8"))
        except OSError as exc:
            raise PipelineConfigError(
                f"GATEWAY_PIPELINES: cannot read the TOML file {raw!r}: {exc.strerror}"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise PipelineConfigError(f"GATEWAY_PIPELINES: {raw!r} is not TOML: {exc}") from exc
        if isinstance(data.get("pipelines"), dict):
            data = data["pipelines"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v.strip() for k, v in data.items()
    ):
        raise PipelineConfigError(
            "GATEWAY_PIPELINES must map application keys to core specs (strings), "
            'e.g. {"shop": "rasa+http://rasa:5005", "faq": "voiceflow:"}'
        )
    return {k: v.strip() for k, v in data.items()}


class CoreRouter:
    """The pipeline of a gateway: each turn goes to the core of its session's app key.

    ``default`` serves every application key not in ``by_app``. Each turn's core time
    is observed in ``gateway_core_seconds{core}`` and its failures counted in
    ``gateway_core_errors_total{core}`` (gateway/metrics.py). ``aclose`` closes every
    core once (each holds its own pooled HTTP client).
    """

    def __init__(self, default: Pipeline, by_app: Mapping[str, Pipeline] | None = None) -> None:
        self.default = default
        self.by_app = dict(by_app or {})
        names = sorted({p.name for p in self.by_app.values()} - {default.name})
        self.name = "+".join([default.name, *names])

    def core_for(self, app_key: str) -> Pipeline:
        """The core serving ``app_key``."""
        return self.by_app.get(app_key, self.default)

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        """Run the turn on the core of ``session.app_key``; see :class:`Pipeline`."""
        core = self.core_for(session.app_key)
        start = time.perf_counter()
        failed = True
        outputs = core.process(session, input)
        try:
            async for out in outputs:
                if isinstance(out, Response):
                    failed = False  # the consumer may close this generator at the yield
                    yield out
                    break
                yield out
            failed = False
        finally:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()
            metrics.labelled(metrics.CORE_SECONDS, core.name).observe(time.perf_counter() - start)
            if failed:
                metrics.labelled(metrics.CORE_ERRORS, core.name).inc()

    async def aclose(self) -> None:
        """Close every core (each once)."""
        unique = {id(core): core for core in [self.default, *self.by_app.values()]}
        for core in unique.values():
            await core.aclose()


def make_pipeline(settings: Settings) -> CoreRouter:
    """The gateway's pipeline: GATEWAY_PIPELINE's core, and GATEWAY_PIPELINES' per app key.

    Keys naming the same spec share one core (one connection pool). Raises
    PipelineConfigError (a ValueError) naming the setting for an unknown scheme, a
    malformed spec (a URL urllib cannot split too: ``http://[::1``) or GATEWAY_PIPELINES,
    or a missing credential.
    """
    made: dict[str, Pipeline] = {}

    def build(spec: str, setting: str) -> Pipeline:
        spec = spec.strip()
        if spec not in made:
            factory = core_class(spec, setting)
            try:
                made[spec] = factory.from_url(spec, settings)
            except PipelineConfigError as exc:
                raise PipelineConfigError(f"{setting}={shown_spec(spec)!r}: {exc}") from exc
            except ValueError as exc:  # urlsplit's: its text may quote the netloc (a password)
                raise PipelineConfigError(
                    f"{setting}={shown_spec(spec)!r}: not a valid URL (an unclosed '[' of an "
                    "IPv6 host, or a host with characters no host name has)"
                ) from exc
        return made[spec]

    # on a failure the cores made so far are dropped: nothing has connected yet
    default = build(settings.pipeline, "GATEWAY_PIPELINE")
    by_app = {
        key: build(spec, f"GATEWAY_PIPELINES[{key!r}]")
        for key, spec in pipeline_specs(settings).items()
    }
    return CoreRouter(default, by_app)
