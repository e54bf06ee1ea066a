"""When a Botpress turn ends: after the idle gap, or at once after a choice, transfer or end.

Serves the fake Botpress Chat API of the tests (tests/gateway/pipeline/fake_botpress.py,
bot messages 50 ms apart) and runs turns through the turn engine with
GATEWAY_BOTPRESS_IDLE_S = ``--idle`` (default 1.0, the setting's default). For each kind
of turn it prints the median time to the first item and to the turn's Response, over
``--turns`` turns, in the same run: a plain text answer still waits one idle gap (the
Chat API has no end-of-turn marker); ``#intro`` (ends with a choice), ``agent`` (a
transfer) and ``bye`` (the end event) should end about one message gap after their last
message instead of ``--idle`` later.

    PYTHONPATH=. python bench/botpress_turn_end.py [--idle 1.0] [--turns 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from gateway.events import Input, ResponseEvent, ResponseItemEvent
from tests.conftest import serve
from tests.gateway.pipeline.fake_botpress import WEBHOOK_ID, make_botpress
from tests.gateway.turns import ctx, engine

KINDS = {"text": "hello", "choice": "#intro", "transfer": "agent", "end": "bye"}


async def main(idle_s: float, turns: int) -> None:
    async with serve(make_botpress()) as url:
        conv = engine(pipeline=f"botpress:{WEBHOOK_ID}", botpress_url=url, botpress_idle_s=idle_s)
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in KINDS}
        for n in range(turns):
            for kind, said in KINDS.items():
                session = f"s{n}-{kind}"
                await conv.turn(ctx(session), Input.of("hi")).collect()  # user, conversation
                first, done = times[kind]
                started = time.perf_counter()
                async for event in conv.turn(ctx(session), Input.of(said)):
                    if isinstance(event, ResponseItemEvent) and len(first) == len(done):
                        first.append(time.perf_counter() - started)
                    if isinstance(event, ResponseEvent):
                        done.append(time.perf_counter() - started)
        await conv.pipeline.aclose()
    print(f"idle gap {idle_s:g} s, {turns} turns each; median seconds")
    print(f"{'turn':<10}{'first item':>12}{'Response':>12}")
    for kind, (first, done) in times.items():
        print(f"{kind:<10}{statistics.median(first):>12.3f}{statistics.median(done):>12.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=1.0, help="GATEWAY_BOTPRESS_IDLE_S (s)")
    parser.add_argument("--turns", type=int, default=5, help="turns of each kind")
    args = parser.parse_args()
    asyncio.run(main(args.idle, args.turns))
