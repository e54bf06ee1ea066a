"""The running gateway's parts, as the routes of every adapter reach them."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from gateway.conversation import Conversation
from gateway.pipeline.base import Pipeline
from gateway.sessions import SessionStore
from gateway.settings import Settings


@dataclass
class Gateway:
    """Everything routes may use: settings and the turn engine (never the store directly)."""

    settings: Settings
    store: SessionStore
    pipeline: Pipeline
    conversation: Conversation


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The Gateway of the app serving ``conn`` (an HTTP request or a WebSocket)."""
    gw: Gateway = conn.app.state.gateway
    return gw
