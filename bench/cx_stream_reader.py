"""The Dialogflow CX streamed-array reader on a large answer cut small, no server.

A 1 MB serverStreamingDetectIntent answer (a JSON array: many small elements, or one
large element) is fed to :class:`gateway.pipeline.dialogflow_cx.JsonArrayReader` in
pieces of ``--piece`` characters; printed per shape: the time (and its ratio to one
``json.loads`` of the whole text in the same run, the baseline), the characters handed
to the JSON decoder per character read (at most 2: linear) and the decoder's runs.
The reader before it re-parsed its whole buffer on each piece: for one 1 MB element in
1 KB pieces, about 0.5 GB handed to the decoder (a ratio near 500).

    python bench/cx_stream_reader.py [--piece 1024] [--size 1048576]
"""

from __future__ import annotations

import argparse
import json
import time

from gateway.pipeline.dialogflow_cx import JsonArrayReader


def answers(size: int) -> dict[str, str]:
    """The two shapes of about ``size`` characters, as JSON text."""
    message = {"text": {"text": ["x" * 90]}}
    one = len(json.dumps(message)) + 2
    many = [{"queryResult": {"responseMessages": [message] * 3}}] * (size // (3 * one))
    large = [{"queryResult": {"responseMessages": [message] * (size // one)}}]
    return {"many elements": json.dumps(many), "one large element": json.dumps(large)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--piece", type=int, default=1024, help="characters per piece")
    parser.add_argument("--size", type=int, default=1_048_576, help="answer size, characters")
    args = parser.parse_args()
    for shape, text in answers(args.size).items():
        pieces = [text[i : i + args.piece] for i in range(0, len(text), args.piece)]
        reader = JsonArrayReader()
        started = time.perf_counter()
        count = sum(1 for piece in pieces for _ in reader.feed(piece))
        reader.finish()
        took = time.perf_counter() - started
        started = time.perf_counter()
        json.loads(text)  # the baseline: the whole answer parsed at once, no streaming
        whole = time.perf_counter() - started
        print(
            f"{shape:>18}: {len(text):,} chars in {len(pieces):,} pieces, {count:,} elements, "
            f"{took * 1000:.1f} ms ({took / whole:.1f}x json.loads of the whole text, "
            f"{whole * 1000:.1f} ms), decoded/read {reader.decoded / reader.read:.2f}, "
            f"{reader.parses:,} parses"
        )


if __name__ == "__main__":
    main()
