"""Speech saturation: audio turns beyond the recognizers' capacity, with and without a bound.

Run: ``python bench/stt_saturation.py [--audio 8] [--text 20]``.

Starts ``gateway serve`` (memory sessions, demo pipeline, pocketsphinx) with one
recognizer (GATEWAY_STT_MAX_STREAMS=1) twice:

* **bounded**: GATEWAY_STT_QUEUE=1, GATEWAY_STT_QUEUE_WAIT_MS=3000 (admission control);
* **unbounded** (the same run's baseline, the behaviour before admission control):
  GATEWAY_STT_QUEUE=10000, GATEWAY_STT_QUEUE_WAIT_MS=600000: every utterance waits.

Against each it sends ``--audio`` Flowstorm V2 audio turns (a Piper sentence as
``audio/wav``, 16 kHz) and ``--text`` V2 text turns (``tts=None``) all at once, and
prints for the audio turns how many were answered (200) and refused (503), with
latency p50/max of each, and the text turns' p50/max; plus the text turns alone on
an idle gateway. Wall-clock figures: they vary with machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gateway.speech.audio import encode_wav, resample  # noqa: E402
from gateway.speech.tts import PiperSynthesizer  # noqa: E402
from tests.speech import padded  # noqa: E402

KEY = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Gateway:
    """A ``gateway serve`` child process with extra GATEWAY_* settings."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            cwd=ROOT,
        )

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("the gateway did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


async def audio_turn(client: httpx.AsyncClient, wav: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    answer = await client.put(
        f"/client?key={KEY}&tts=None", headers={"Content-Type": "audio/wav"}, content=wav
    )
    return answer.status_code, time.perf_counter() - start


async def text_turn(client: httpx.AsyncClient) -> tuple[int, float]:
    start = time.perf_counter()
    answer = await client.put(
        f"/client?key={KEY}&tts=None",
        headers={"Content-Type": "text/plain"},
        content="my name is Ada",
    )
    assert "Nice to meet you, Ada." in answer.text, answer.text
    return answer.status_code, time.perf_counter() - start


def summary(label: str, results: list[tuple[int, float]], status: int) -> str:
    times = sorted(t for code, t in results if code == status)
    if not times:
        return f"{label}: 0"
    return (
        f"{label}: {len(times):3d}  p50 {statistics.median(times) * 1000:7.0f} ms"
        f"  max {times[-1] * 1000:7.0f} ms"
    )


async def phase(name: str, env: dict[str, str], wav: bytes, n_audio: int, n_text: int) -> None:
    gw = Gateway({"GATEWAY_STT_MAX_STREAMS": "1", **env})
    try:
        await gw.ready()
        limits = httpx.Limits(max_connections=n_audio + n_text + 4)
        async with httpx.AsyncClient(base_url=gw.url, timeout=600, limits=limits) as client:
            code, _ = await audio_turn(client, wav)  # the worker process starts
            assert code == 200, code
            idle = await asyncio.gather(*(text_turn(client) for _ in range(n_text)))
            mixed = await asyncio.gather(
                *(audio_turn(client, wav) for _ in range(n_audio)),
                *(text_turn(client) for _ in range(n_text)),
            )
        audio, text = mixed[:n_audio], mixed[n_audio:]
        print(f"{name}  ({', '.join(f'{k}={v}' for k, v in env.items())})")
        print("  " + summary("audio answered", audio, 200))
        print("  " + summary("audio refused ", audio, 503))
        print("  " + summary("text, with audio", text, 200))
        print("  " + summary("text, idle      ", idle, 200))
    finally:
        gw.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio", type=int, default=8, help="concurrent audio turns")
    parser.add_argument("--text", type=int, default=20, help="concurrent text turns")
    args = parser.parse_args()
    pcm = await PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0).synthesize(
        "tell me about this place"
    )
    wav = encode_wav(resample(padded(pcm), 16000))
    print(f"{args.audio} audio turns (one sentence, 16 kHz WAV) + {args.text} text turns at once")
    await phase(
        "bounded",
        {"GATEWAY_STT_QUEUE": "1", "GATEWAY_STT_QUEUE_WAIT_MS": "3000"},
        wav,
        args.audio,
        args.text,
    )
    await phase(
        "unbounded (baseline)",
        {"GATEWAY_STT_QUEUE": "10000", "GATEWAY_STT_QUEUE_WAIT_MS": "600000"},
        wav,
        args.audio,
        args.text,
    )


if __name__ == "__main__":
    asyncio.run(main())
