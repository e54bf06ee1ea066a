"""The per-client token buckets (gateway/ratelimit.py) on a controlled clock."""

from __future__ import annotations

import pytest

from gateway.ratelimit import MAX_RETRY_AFTER_S, TokenBuckets, client_key


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


def test_client_keys_count_an_ipv6_client_per_64() -> None:
    """IPv4 per address, IPv4-mapped IPv6 as its IPv4 address, IPv6 per /64 (however
    written, its zone dropped); text that is no address as it is."""
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("::ffff:203.0.113.7") == client_key("::ffff:cb00:7107") == "203.0.113.7"
    assert client_key("2001:db8:1:2:a::1") == "2001:db8:1:2::/64"
    assert client_key("2001:DB8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_key("unknown") == "unknown"
    assert client_key("0" + "A" * 16_000) == "0" + "A" * 16_000
