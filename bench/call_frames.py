"""CPU per frame of a phone call's hot paths, in the event loop's thread: this tree beside another.

On a shared, busy machine the wall-clock load of bench/carrier_calls.py (calls per core,
gaps, turns) measures the machine as much as the gateway; this bench measures what the
gateway's own code costs per frame, in CPU time of the thread that runs the event loop
(``time.thread_time``), so the figure hardly depends on other load:

- **inbound**: one Twilio call's stream served by the real call runner (gateway/io/call.py,
  the Twilio call, the speech stage's VAD pass, the action runner) through an in-memory
  socket: ``connected``, ``start``, then ``--frames`` 20 ms ``media`` frames of μ-law
  silence as fast as they are taken (the path of every inbound frame: JSON, base64, the
  call's state, the VAD, the barge-in and silence checks). The socket layer (uvicorn,
  Starlette) is not in it: bench/carrier_calls.py's bare relay measures that;
- **outbound**: ``--senders`` paced senders (gateway/io/websocket.py ``PacedSender``, as a
  call's, 60 ms ahead) each playing Twilio ``media`` frames to an in-memory socket for
  ``--seconds`` s of wall time: the loop's CPU per frame sent, pacing included (timers,
  wake-ups, the guarded send).

``--old /work/main`` measures another checkout the same way (each measurement in a
fresh process with that tree first on ``sys.path``), interleaved round by round with
this tree's; the medians of ``--rounds`` rounds are printed side by side.

    python bench/call_frames.py [--old /work/main] [--rounds 3] [--frames 20000]
        [--senders 100] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
STREAM = "MZ" + "0" * 32
SILENCE = base64.b64encode(b"\xff" * 160).decode()


def start_message(call_sid: str, custom_parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """Twilio's ``start`` message (sequence number 1) of stream :data:`STREAM` for call
    ``call_sid``: the inbound track, μ-law at 8000 Hz (shared/specs CARRIERS.md); also
    the one bench/carrier_calls.py sends."""
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": STREAM,
        "start": {
            "streamSid": STREAM,
            "accountSid": "AC" + "0" * 32,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": custom_parameters or {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


def media(seq: int) -> str:
    """Twilio's inbound ``media`` message number ``seq`` (bench/carrier_calls.py's shape)."""
    return (
        f'{{"event": "media", "sequenceNumber": "{seq}", "streamSid": "{STREAM}", "media": '
        f'{{"track": "inbound", "chunk": "{seq}", "timestamp": "{seq * 20}", '
        f'"payload": "{SILENCE}"}}}}'
    )


class MemorySocket:
    """The part of Starlette's WebSocket the call runner uses, in memory: ``frames`` to
    receive (then a disconnect); sends are counted."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.taken = 0
        self.sent = 0

    async def receive(self) -> dict[str, Any]:
        if self.taken % 25 == 0:
            await asyncio.sleep(0)  # the loop's other tasks (the turn, the sender) run too
        if self.taken >= len(self.frames):
            return {"type": "websocket.disconnect", "code": 1000}
        frame = self.frames[self.taken]
        self.taken += 1
        return {"type": "websocket.receive", "text": frame}

    async def send_text(self, text: str) -> None:
        self.sent += 1

    async def send_bytes(self, data: bytes) -> None:
        self.sent += 1

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


async def inbound(n: int) -> float:
    """CPU µs (loop thread) per inbound media frame of one call (module doc)."""
    from pydantic import SecretStr

    from adapters.twilio.protocol import TwilioCall
    from gateway.app import create_app
    from gateway.io.call import CallRunner, call_config
    from gateway.settings import Settings

    settings = Settings().model_copy(
        update={
            "public_url": "https://gateway.bench.example",
            "twilio_auth_token": SecretStr("bench-auth-token-0123456789abcdef"),
            "silence_timeout_ms": 600_000,
        }
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        frames = [
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            json.dumps(start_message("CA1")),
            *(media(i) for i in range(2, n + 2)),
        ]
        ws = MemorySocket(frames)
        call = TwilioCall("CA1", call_config(settings, "twilio"))
        runner = CallRunner(
            ws,  # type: ignore[arg-type]
            app.state.gateway,
            call.twilio,
            call.config,
            call_id="CA1",
            call=call,
        )
        t0 = time.thread_time()
        await runner.serve()
        return (time.thread_time() - t0) * 1e6 / n


async def outbound(senders: int, seconds: float) -> float:
    """CPU µs (loop thread) per paced outbound frame, ``senders`` calls at once (module doc)."""
    from adapters.twilio.protocol import TwilioCodec
    from gateway.io.websocket import PacedSender, WebSocketDriver

    codec = TwilioCodec(20)
    codec.started(STREAM)
    frames = codec.mulaw_frames(b"\xff" * 160 * int(seconds * 60 + 100))
    sockets = [MemorySocket([]) for _ in range(senders)]
    tasks = []
    for ws in sockets:
        driver: WebSocketDriver[Any] = WebSocketDriver(
            ws,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            log=logging.getLogger("bench"),
            name="bench",
            send_timeout_s=10.0,
        )
        sender: PacedSender[str] = PacedSender(driver.send_text, 20, 60)
        tasks.append(asyncio.create_task(sender.run()))
        sender.play(frames, codec.mark("end"))
        await asyncio.sleep(0.02 / senders)  # calls start at different times
    await asyncio.sleep(0.2)
    sent0 = sum(ws.sent for ws in sockets)
    t0 = time.thread_time()
    await asyncio.sleep(seconds)
    cpu = time.thread_time() - t0
    sent = sum(ws.sent for ws in sockets) - sent0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return cpu * 1e6 / max(sent, 1)


def measure(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """One round of both measurements in a fresh process importing ``tree``'s gateway."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        *("--frames", str(args.frames), "--senders", str(args.senders)),
        *("--seconds", str(args.seconds)),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        cmd, cwd=tree, env=env, capture_output=True, text=True, check=True, timeout=600
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old", help="another checkout measured the same way, interleaved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=20000, help="inbound frames per round")
    parser.add_argument("--senders", type=int, default=100, help="paced senders at once")
    parser.add_argument("--seconds", type=float, default=3.0, help="outbound wall time per round")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        logging.disable(logging.WARNING)
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            figures = {
                "inbound": asyncio.run(inbound(args.frames)),
                "outbound": asyncio.run(outbound(args.senders, args.seconds)),
            }
        print(json.dumps(figures))
        return
    trees = [("this tree", HERE)] + ([("old", Path(args.old))] if args.old else [])
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for i in range(args.rounds):
        for name, tree in trees:
            figures = measure(tree, args)
            rounds[name].append(figures)
            print(
                f"round {i + 1} {name:<9} inbound {figures['inbound']:6.1f} µs/frame  "
                f"outbound {figures['outbound']:6.1f} µs/frame",
                flush=True,
            )
    print(
        f"Loop-thread CPU per frame, median of {args.rounds} rounds "
        f"({args.frames} inbound frames; {args.senders} paced senders for {args.seconds:g} s):"
    )
    for name, tree in trees:
        inb = statistics.median(r["inbound"] for r in rounds[name])
        out = statistics.median(r["outbound"] for r in rounds[name])
        # a call: 50 inbound frames a second, and 50 outbound while the bot speaks
        print(
            f"  {name:<9} ({tree}): inbound {inb:6.1f} µs/frame, outbound {out:6.1f} µs/frame "
            f"(= {inb * 50:5.0f} µs CPU per call-second listening, "
            f"{(inb + out) * 50:5.0f} while the bot speaks)"
        )


if __name__ == "__main__":
    main()
