"""CPU time of the bounded JSON loader (gateway.protocol.load_json) on hostile texts.

Run: ``python bench/json_linear.py``. Prints the CPU time (``time.process_time``, so
other load on the machine barely matters) of refusing, or reading, each hostile text of
tests/gateway/test_protocol.py::test_hostile_texts_are_refused at n and 2n, and the
ratio: about 2 is linear, about 4 quadratic. That test's wall-clock bound (< 10 s for all)
moved here; the test keeps what is refused and read.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.protocol import ProtocolError, load_json

HOSTILE = {  # name: the text at n (the test's sizes at n = 1)
    "escaped-quotes": lambda n: '"' + '\\"' * 300_000 * n,
    "brackets": lambda n: "[" * 1_000_000 * n,
    "quotes": lambda n: '"' * (1_000_000 * n + 1),
    "digits": lambda n: "9" * 1_000_000 * n,
    "long-list": lambda n: "[" + "1," * 500_000 * n + "1]",
}


def cpu_s(text: str, repeat: int = 3) -> float:
    """Least CPU time of ``repeat`` loads of ``text`` (refused or read), in s."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        with contextlib.suppress(ProtocolError):
            load_json(text)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    print(f"{'text':>15} {'n=1 s':>8} {'n=2 s':>8} {'x prev':>7}")
    for name, text in HOSTILE.items():
        one, two = cpu_s(text(1)), cpu_s(text(2))
        print(f"{name:>15} {one:8.3f} {two:8.3f} {two / one:7.2f}")


if __name__ == "__main__":
    main()
