"""Paced senders on an overloaded event loop, in loop time: this tree beside others.

bench/carrier_calls.py measures outbound gaps in wall-clock time with real sockets; on a
shared, busy machine its figures under overload mostly measure the machine. This bench
plays the same pacing (gateway/io/websocket.py ``PacedSender`` and its clock: 20 ms
frames, 60 ms ahead) on a *driven* event loop (tests/gateway/io/driven_loop.py): a real
asyncio loop on a virtual clock in which every loop iteration takes ``--lag-ms`` (±
``--jitter``, seeded) and every send ``--send-us``: a loop lagging by exactly that much.
The figures are the same on every run and every machine; they show how the pacing
degrades when the loop lags, not what the loop costs (bench/call_frames.py).

For each tree, calls and lag it prints, per call, over ``--frames`` frames each:
frames/s each call got (50 is real time), outbound gap p50/p99/max between consecutive
frames (ms), underruns (frames that arrived after the audio before them had played, % of
frames) and the most audio the carrier held when a frame arrived (ms; the send-ahead,
60 ms, must bound it).

``--old /work/wt-old`` (comma-separated for several) runs other checkouts' senders
(each in a fresh process with that tree first on ``sys.path``; the driven loop is this
tree's).

    python bench/paced_lag.py [--old /work/wt-old] [--calls 50,100,200]
        [--lag-ms 0,5,10,20,30,45] [--jitter 0.5] [--send-us 100] [--frames 250]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def measure(
    calls: int, lag_ms: float, jitter: float, send_us: float, frames: int
) -> dict[str, Any]:
    """One run in this process (the gateway on ``sys.path`` is the tree measured)."""
    spec = importlib.util.spec_from_file_location(
        "driven_loop", HERE / "tests" / "gateway" / "io" / "driven_loop.py"
    )
    assert spec is not None
    assert spec.loader is not None
    driven = importlib.util.module_from_spec(spec)
    sys.modules["driven_loop"] = driven  # its dataclasses look their module up
    spec.loader.exec_module(driven)
    try:
        peers = driven.drive(
            lambda loop: driven.play_calls(
                loop, calls, frames, lag_ms / 1000, send_us / 1e6, jitter=jitter
            )
        )
    except TimeoutError:
        return {"error": "collapsed: the calls' audio was not all sent in 60 s of loop time"}
    gaps = [g for p in peers for g in p.media_gaps()]
    took = [p.times[-1] - p.times[0] for p in peers]
    return {
        "fps": frames / (sum(took) / len(took)),
        "gap50": pct(gaps, 0.5) * 1000,
        "gap99": pct(gaps, 0.99) * 1000,
        "gapmax": max(gaps) * 1000,
        "under": 100 * sum(p.underruns for p in peers) / (calls * frames),
        "held": max(p.most_buffered_s for p in peers) * 1000,
    }


def run(tree: Path, calls: int, lag_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure"]
    cmd += ["--calls", str(calls), "--lag-ms", str(lag_ms), "--jitter", str(args.jitter)]
    cmd += ["--send-us", str(args.send_us), "--frames", str(args.frames)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    if out.stdout.startswith('{"error"'):
        return {"error": json.loads(out.stdout)["error"]}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old", help="other checkouts, comma-separated")
    parser.add_argument("--calls", default="50,100,200")
    parser.add_argument("--lag-ms", default="0,5,10,20,30,45")
    parser.add_argument("--jitter", type=float, default=0.5, help="each iteration: lag × (1 ± j)")
    parser.add_argument("--send-us", type=float, default=100.0, help="loop time of one send")
    parser.add_argument("--frames", type=int, default=250, help="frames per call (20 ms each)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        calls, lag_ms = int(args.calls), float(args.lag_ms)
        print(json.dumps(measure(calls, lag_ms, args.jitter, args.send_us, args.frames)))
        return
    trees = [("this", HERE)] + [(Path(o).name, Path(o)) for o in (args.old or "").split(",") if o]
    print(
        f"Paced senders on a driven loop: 20 ms frames, 60 ms ahead, {args.frames} frames a "
        f"call, lag ±{args.jitter:.0%} per iteration, {args.send_us:g} µs per send (loop time)"
    )
    print("calls lag ms tree              frames/s/call gap p50 gap p99 gap max underrun%  held ms")
    for calls in (int(c) for c in args.calls.split(",")):
        for lag_ms in (float(x) for x in args.lag_ms.split(",")):
            for name, tree in trees:
                r = run(tree, calls, lag_ms, args)
                if "error" in r:
                    print(f"{calls:>5} {lag_ms:>6g} {name:<17} {r['error']}")
                    continue
                print(
                    f"{calls:>5} {lag_ms:>6g} {name:<17} {r['fps']:>13.1f} {r['gap50']:>7.1f} "
                    f"{r['gap99']:>7.1f} {r['gapmax']:>7.1f} {r['under']:>9.2f} {r['held']:>8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
