"""What the WebSocket adapters share: sending on a socket the peer may leave at any time."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect

SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)
"""What sending on a socket the peer has left raises (Starlette/uvicorn)."""


class GuardedSocket:
    """An accepted WebSocket whose sends are serialised and never raise.

    ``open`` turns False when the peer has gone (a send failed) or the socket was
    closed; sends after that are dropped. Subclasses run the receive loop and may
    set ``open`` to False themselves when the peer disconnects.
    """

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.open = True
        self._send_lock = asyncio.Lock()

    async def _send(self, text: str) -> None:
        """Send one text frame, unless the socket is no longer open."""
        if not self.open:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except SEND_ERRORS:
                self.open = False

    async def _send_bytes(self, data: bytes) -> None:
        """Send one binary frame, unless the socket is no longer open."""
        if not self.open:
            return
        async with self._send_lock:
            try:
                await self.ws.send_bytes(data)
            except SEND_ERRORS:
                self.open = False

    async def _close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` (cut to 120 characters: at most 123 bytes)."""
        if not self.open:
            return
        self.open = False
        async with self._send_lock:
            with contextlib.suppress(*SEND_ERRORS):
                await self.ws.close(code, reason[:120])
