"""The per-client token buckets (gateway/ratelimit.py) on a controlled clock."""

from __future__ import annotations

import pytest

from gateway.ratelimit import MAX_RETRY_AFTER_S, TokenBuckets


def test_burst_then_refill_per_client() -> None:
    now = [0.0]
    buckets = TokenBuckets(3, 0.5, clock=lambda: now[0])
    for _ in range(3):
        assert buckets.allowed("a")
        buckets.take("a")
    assert not buckets.allowed("a")
    assert buckets.retry_after_s("a") == 2  # one token at 0.5/s
    assert buckets.allowed("b")  # other clients are untouched
    now[0] = 2.0
    assert buckets.allowed("a")
    assert buckets.retry_after_s("a") == 0
    now[0] = 100.0
    buckets.take("a")  # refilled to the burst, not beyond
    buckets.take("a")
    buckets.take("a")
    assert not buckets.allowed("a")


def test_a_rate_near_zero_gives_a_bounded_retry_after() -> None:
    """GATEWAY_ADMIN_FAILURES_PER_S=1e-320 (the settings take any rate above 0) made the
    wait infinite and math.ceil raise OverflowError: a locked-out admin request got a
    500. The wait is now at most a day."""
    buckets = TokenBuckets(1, 1e-320, clock=lambda: 0.0)
    buckets.take("a")
    assert buckets.retry_after_s("a") == MAX_RETRY_AFTER_S == 86_400
    assert TokenBuckets(1, 1e-3, clock=lambda: 0.0).retry_after_s("a") == 0


def test_buckets_are_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(2, 1.0, max_clients=3, clock=lambda: now[0])
    for client in ("a", "b", "c"):
        buckets.take(client)
        buckets.take(client)
    buckets.take("d")  # a fourth client: the least recently used bucket goes
    assert len(buckets) == 3
    assert buckets.allowed("a")  # forgotten: a full bucket again
    now[0] = 10.0
    buckets.take("e")  # refilled buckets hold nothing and go first
    assert len(buckets) == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBuckets(0, 1.0)
