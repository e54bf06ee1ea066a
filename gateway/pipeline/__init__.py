"""Core pipeline clients: the protocol, the built-in demo and the HTTP webhook."""

from __future__ import annotations

from gateway.pipeline.base import Pipeline, PipelineConfigError, PipelineError, PipelineOutput
from gateway.pipeline.demo import DemoPipeline
from gateway.pipeline.http import HttpPipeline
from gateway.settings import Settings

__all__ = [
    "DemoPipeline",
    "HttpPipeline",
    "Pipeline",
    "PipelineConfigError",
    "PipelineError",
    "PipelineOutput",
]


def make_pipeline(settings: Settings) -> Pipeline:
    """The pipeline GATEWAY_PIPELINE names: ``demo`` or an http(s):// webhook URL.

    Raises ValueError for anything else.
    """
    spec = settings.pipeline.strip()
    if spec == "demo":
        return DemoPipeline()
    if spec.startswith(("http://", "https://")):
        return HttpPipeline(
            spec,
            connect_timeout_s=settings.pipeline_connect_timeout_s,
            max_response_bytes=settings.pipeline_max_response_bytes,
        )
    raise ValueError(f"GATEWAY_PIPELINE must be 'demo' or an http(s):// URL, not {spec!r}")
