"""The long fuzz run: hostile input into every parser a client reaches, no server.

The targets, seeds and generator are tests/fuzz.py's (the same the hypothesis
property tests in tests/test_parsers_fuzz.py use at CI size). Inputs are spread
evenly over the targets; each is parsed once and its outcome counted: accepted,
refused with a declared error (the protocol's own ProtocolError or verification
error), or a **crash** (any other exception). Crashes are printed with the input's
start and where they were raised; the exit status is 1 when there was any.

Baseline in the same run: the inputs of the ``json.load_json`` targets are also
given to the standard library's ``json.loads``; its column counts the exceptions
other than ``JSONDecodeError`` (RecursionError, the 4,300-digit ValueError) that
every parser met before the bounded loader.

    python bench/fuzz_parsers.py [--inputs 1000000] [--workers 2] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import hostile, targets


@dataclass
class Tally:
    """Outcomes of one target's inputs."""

    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    crashes: int = 0
    seconds: float = 0.0
    stdlib_exceptions: int = 0
    examples: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.inputs += other.inputs
        self.accepted += other.accepted
        self.refused += other.refused
        self.crashes += other.crashes
        self.seconds += other.seconds
        self.stdlib_exceptions += other.stdlib_exceptions
        self.examples += other.examples[: max(0, 3 - len(self.examples))]
        self.kinds.update(other.kinds)


def _stdlib(text: str) -> bool:
    """Whether ``json.loads`` raised something other than JSONDecodeError."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    except Exception:
        return True
    return False


def work(job: tuple[int, int]) -> dict[str, Tally]:
    """Run ``per_target`` inputs through every target with a Random seeded ``seed``."""
    seed, per_target = job
    logging.disable(logging.CRITICAL)  # the verifiers log each refusal
    rng = random.Random(seed)
    out: dict[str, Tally] = {}
    for target in targets():
        tally = out.setdefault(target.name, Tally())
        baseline = target.name.startswith("json.load_json(str)")
        for _ in range(per_target):
            text = hostile(rng, target.seeds)
            started = time.perf_counter()
            try:
                target.run(text)
            except target.declared:
                tally.refused += 1
            except Exception as exc:
                tally.crashes += 1
                where = traceback.extract_tb(exc.__traceback__)[-1]
                kind = f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"
                tally.kinds[kind] += 1
                if len(tally.examples) < 3:
                    tally.examples.append(f"{kind}: {str(exc)[:100]!r} <- {text[:160]!r}")
            else:
                tally.accepted += 1
            tally.seconds += time.perf_counter() - started
            tally.inputs += 1
            if baseline and _stdlib(text):
                tally.stdlib_exceptions += 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="in all, over the targets")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    names = [t.name for t in targets()]
    per_target = -(-args.inputs // len(names))  # ceiling
    share = -(-per_target // args.workers)
    jobs = [(args.seed * 1000 + i, share) for i in range(args.workers)]
    started = time.perf_counter()
    if args.workers == 1:
        results = [work(jobs[0])]
    else:
        with multiprocessing.Pool(args.workers) as pool:
            results = pool.map(work, jobs)
    wall = time.perf_counter() - started

    total = Tally()
    print(f"{'target':40} {'inputs':>9} {'accepted':>9} {'refused':>9} {'crashes':>8} {'/s':>7}")
    for name in names:
        tally = Tally()
        for result in results:
            tally.add(result[name])
        total.add(tally)
        rate = tally.inputs / tally.seconds if tally.seconds else 0.0
        print(
            f"{name:40} {tally.inputs:>9} {tally.accepted:>9} {tally.refused:>9} "
            f"{tally.crashes:>8} {rate:>7.0f}"
        )
        if tally.stdlib_exceptions:
            print(
                f"{'  baseline: stdlib json.loads, same inputs':40} {tally.inputs:>9} "
                f"{'':>9} {'':>9} {tally.stdlib_exceptions:>8}   (RecursionError/ValueError)"
            )
        for kind, count in tally.kinds.most_common():
            print(f"    crash x{count}: {kind}")
        for example in tally.examples:
            print(f"    e.g. {example}")
    print(
        f"{'TOTAL':40} {total.inputs:>9} {total.accepted:>9} {total.refused:>9} "
        f"{total.crashes:>8}   wall {wall:.0f} s, {args.workers} worker(s), seed {args.seed}"
    )
    return 1 if total.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
