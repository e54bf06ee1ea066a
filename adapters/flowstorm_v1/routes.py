"""Flowstorm Socket V1 over WebSocket: ``/socket`` and ``/socket/``.

Thin I/O around :class:`adapters.flowstorm_v1.protocol.V1Connection` (spec:
shared/specs/flowstorm-socket-v1.md). One receive loop reads frames and carries
out the actions the protocol returns; each turn runs through the turn engine
and is forwarded by a task of its own, so the loop keeps reading while a turn
runs and notices a client that goes away. On disconnect only the forwarding is
cancelled: the engine's turn completes and saves the session.

Close codes: 1008 unknown or missing application key (after an Error frame),
1009 a frame larger than GATEWAY_MAX_BODY_BYTES, 1011 an unexpected failure of
the gateway. Every other problem is an Error frame and the connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from adapters.flowstorm_v1.protocol import (
    CLOSE_INTERNAL,
    Action,
    Close,
    Send,
    StartTurn,
    StoreLogs,
    V1Connection,
    error_frame,
)
from gateway.conversation import TurnRejected
from gateway.deps import Gateway, gateway_of
from gateway.sessions import StoreError

log = logging.getLogger(__name__)

router = APIRouter(tags=["Flowstorm Socket V1"])

_SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)
"""What sending on a socket the client has left raises (Starlette/uvicorn)."""


class _Socket:
    """One accepted V1 WebSocket: the receive loop, turn forwarders and log writers."""

    def __init__(self, ws: WebSocket, gw: Gateway) -> None:
        self.ws = ws
        self.gw = gw
        self.conn = V1Connection(
            gw.settings.key_allowed, max_frame_bytes=gw.settings.max_body_bytes
        )
        self.open = True
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the connection until the client leaves or the protocol closes it."""
        try:
            while self.open:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.open = False
                    break
                text, data = message.get("text"), message.get("bytes")
                if text is not None:
                    actions = self.conn.receive_text(text)
                elif data is not None:
                    actions = self.conn.receive_bytes(data)
                else:
                    continue
                await self._do(actions)
        except (WebSocketDisconnect, OSError):
            self.open = False
        except Exception:
            log.exception("Flowstorm V1 socket failed")
            await self._close(CLOSE_INTERNAL, "Internal gateway error.")
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.open = False
        for task in list(self._tasks):  # forwarding only; the engine's turns go on
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for action in self.conn.connection_lost():
            if isinstance(action, StoreLogs):
                self._start_logs(action)
        await asyncio.gather(*self._log_tasks, return_exceptions=True)

    async def _do(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.text)
            elif isinstance(action, Close):
                await self._close(action.code, action.reason)
            elif isinstance(action, StartTurn):
                self._spawn(self._forward(action), self._tasks)
            else:
                self._start_logs(action)

    def _spawn(self, coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _start_logs(self, action: StoreLogs) -> None:
        self._spawn(self._store_logs(action), self._log_tasks)

    async def _send(self, text: str) -> None:
        if not self.open:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except _SEND_ERRORS:
                self.open = False

    async def _close(self, code: int, reason: str) -> None:
        if not self.open:
            return
        self.open = False
        async with self._send_lock:
            with contextlib.suppress(*_SEND_ERRORS):
                await self.ws.close(code, reason[:120])  # a close reason is at most 123 bytes

    async def _forward(self, start: StartTurn) -> None:
        """Send one turn's frames; the Response and what follows go out after its stream ends."""
        conn = self.conn
        held: list[Action] = []
        try:
            try:
                async for event in self.gw.conversation.turn(start.ctx, start.input):
                    actions = conn.turn_event(event)
                    if conn.turn_over:
                        held.extend(actions)
                    else:
                        await self._do(actions)
            except TurnRejected as exc:
                held.extend(conn.turn_rejected(exc))
            else:
                held.extend(conn.turn_finished())
        except Exception:  # a gateway bug (the engine broke its order): never a silent hang
            log.exception("forwarding a turn of session %s failed", start.ctx.key)
            await self._send(error_frame("Internal gateway error.", "gateway").text)
            await self._close(CLOSE_INTERNAL, "Internal gateway error.")
            return
        await self._do(held)

    async def _store_logs(self, action: StoreLogs) -> None:
        try:
            stored = await self.gw.conversation.log(action.ctx, action.entries)
        except StoreError as exc:
            log.warning("client logs of session %s not stored: %s", action.ctx.key, exc)
            stored = False
        except Exception:
            log.exception("storing client logs of session %s failed", action.ctx.key)
            return
        if not stored and self.open:
            self.conn.logs_not_stored(action.entries)


@router.websocket("/socket")
@router.websocket("/socket/")
async def socket_v1(websocket: WebSocket) -> None:
    """Flowstorm Socket V1: Init -> Ready, then Request/Input turns (see module doc)."""
    gw = gateway_of(websocket)
    try:
        await websocket.accept()
    except _SEND_ERRORS:
        return
    await _Socket(websocket, gw).run()
