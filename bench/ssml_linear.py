"""CPU time of reading a core's answer of many tags (gateway.ssml), linear in its size.

Run: ``python bench/ssml_linear.py [--doublings N]``. Prints the CPU time
(``time.process_time``, so other load on the machine barely matters) of
:func:`gateway.ssml.ssml_to_text` on runs of ``<break/>`` of 64 Ki, 128 Ki, ... tags
(half a megabyte and up) followed by a word, against the same run followed by
punctuation (the same parse), and the ratio of each size's time to the previous one's:
about 2 is linear, about 4 quadratic.

This was tests/gateway/test_ssml.py::test_a_core_answer_of_tags_is_read_in_linear_time's
timing (worded < 5 x punctuated + 0.5 s): a speed claim, so it lives here; the test keeps
what the answers read. Before the fix, the scan for punctuation after a parting tag was
tried again at each of the run's partings when none followed: quadratic, about 20 s a
pass against 0.2 s at 64 Ki tags (75 s for the 1 MiB of
GATEWAY_PIPELINE_MAX_RESPONSE_BYTES' default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.ssml import ssml_to_text


def cpu_s(ssml: str, text: str, repeat: int = 3) -> float:
    """Least CPU time of ``repeat`` reads of ``ssml`` (checked to read ``text``), in s."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        assert ssml_to_text(ssml) == text
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doublings", type=int, default=3, help="sizes after 64 Ki tags")
    args = parser.parse_args()
    previous = None
    print(f"{'tags':>8} {'worded s':>9} {'punctuated s':>13} {'worded/punct':>13} {'x prev':>7}")
    for k in range(args.doublings + 1):
        run = "<break/>" * ((1 << 16) << k)
        worded = cpu_s(f"<speak>Wait{run}done.</speak>", "Wait done.")
        punctuated = cpu_s(f"<speak>Wait{run}. Done</speak>", "Wait. Done")
        growth = f"{worded / previous:7.2f}" if previous else f"{'':>7}"
        print(
            f"{(1 << 16) << k:>8} {worded:9.3f} {punctuated:13.3f} "
            f"{worded / punctuated:13.2f} {growth}"
        )
        previous = worded


if __name__ == "__main__":
    main()
