"""Property tests: every parser a client reaches raises only its declared errors on hostile
input (tests/fuzz.py: targets, seeds, generators).

Sized for CI (a few seconds in all); bench/fuzz_parsers.py is the long run of the same
targets (>= 1,000,000 inputs). Two sources of input per target:

- tests/fuzz.py's hostile generator, driven by a hypothesis-drawn Random (nesting
  thousands deep, numbers of thousands of digits, huge strings, lone surrogates,
  wrong types, text-level damage of golden messages);
- hypothesis's own JSON values and unicode text spliced into the golden messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol import MAX_JSON_DEPTH, ProtocolError, json_depth, load_json
from tests.fuzz import Target, hostile, splice, targets

TARGETS = targets()
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never flakes on a new find
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """Quiet the Alexa and Google verifiers' refusal lines, none of them under test (their
    RefusalLogs: the first few at WARNING, then one a minute, the rest, hundreds here, at
    DEBUG)."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _run(target: Target, text: str) -> None:
    with contextlib.suppress(*target.declared):
        target.run(text)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
"""Any JSON value (NaN and infinities included: json.dumps writes them as tokens)."""


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_hostile_input_raises_only_declared_errors(target: Target, rng: random.Random) -> None:
    _run(target, hostile(rng, target.seeds))


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@FUZZ
@given(rng=st.randoms(use_true_random=False), value=JSON_VALUES, raw=st.text(max_size=40))
def test_hypothesis_values_in_golden_messages_raise_only_declared_errors(
    target: Target, rng: random.Random, value: Any, raw: str
) -> None:
    seed = rng.choice(target.seeds)
    _run(target, splice(rng, seed, json.dumps(value)))
    _run(target, splice(rng, seed, raw))  # raw text: usually malformed
    _run(target, raw)


# ------------------------------------------------------------- load_json's contract


def _depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth_of, value), default=0)
    return 0


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, list):
        return all(map(_finite, value))
    return True


@settings(max_examples=100, deadline=None)
@given(value=JSON_VALUES, ascii_only=st.booleans())
def test_values_within_bounds_load_as_the_standard_parser_reads_them(
    value: Any, ascii_only: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert json_depth(text) == _depth_of(value)
    if not _finite(value):
        with pytest.raises(ProtocolError):
            load_json(text)
        return
    assert load_json(text) == json.loads(text)
    assert load_json(text.encode()) == json.loads(text)


@settings(max_examples=100, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_every_refusal_is_a_protocol_error_with_a_status_and_a_text(rng: random.Random) -> None:
    text = hostile(rng, ())
    refusal: ProtocolError | None = None
    try:
        load_json(text, max_bytes=100_000)
    except ProtocolError as exc:
        refusal = exc
    if refusal is None:
        assert json_depth(text) <= MAX_JSON_DEPTH
    else:
        assert refusal.status in (400, 413)
        assert refusal.text
