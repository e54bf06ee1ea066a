"""The per-client token buckets (gateway/ratelimit.py) on a controlled clock."""

from __future__ import annotations

import time

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


def test_a_take_past_the_bound_does_not_scan_every_bucket() -> None:
    """A take past ``max_clients`` scanned every bucket for refilled ones: 46 ms at the
    default 65,536 (the admin API's and /metrics' tables of wrong keys, Flowstorm V2's of
    unknown sessions), so once a flood of wrong keys from that many addresses filled a
    table, each further wrong key stalled the event loop that long. Refilled buckets now
    leave by a heap of their refill times: a take costs microseconds, full table or not,
    and the bounds and the order of eviction stay as they were."""
    now = [0.0]
    buckets = TokenBuckets(10, 0.1, max_clients=65_536, clock=lambda: now[0])
    for i in range(65_536):  # every bucket taken from, none refilled (for 10 s)
        buckets.take(f"10.0.{i >> 8}.{i & 255}")
    started = time.perf_counter()
    for i in range(200):
        buckets.take(f"10.1.0.{i}")
    spent = time.perf_counter() - started
    assert spent < 1.0, f"{spent / 200 * 1000:.1f} ms per take"
    assert len(buckets) == 65_536
    assert buckets.allowed("10.0.0.0")  # the least recently used went, forgotten
    assert not buckets.allowed("10.1.0.0") or buckets.retry_after_s("10.1.0.0") == 0
    now[0] = 9.0
    buckets.take("10.2.0.0")  # nothing refilled yet: only the LRU bucket goes
    assert len(buckets) == 65_536
    now[0] = 15.0
    buckets.take("10.2.0.1")  # the others refilled at 10: they hold nothing and go
    assert len(buckets) == 2  # "10.2.0.0" is full at 19 only
    assert buckets.retry_after_s("10.2.0.0") == 0
    assert buckets.retry_after_s("10.2.0.1") == 0


def test_buckets_taken_from_again_are_dropped_only_once_refilled() -> None:
    now = [0.0]
    buckets = TokenBuckets(2, 1.0, max_clients=10, clock=lambda: now[0])
    buckets.take("a")  # 1 token left at 0: full at 1
    now[0] = 0.5
    buckets.take("a")  # 0.5 left: full at 2; its first heap entry (1) is stale now
    for _ in range(100):  # the heap of refill times stays bounded
        buckets.take("b")
    assert len(buckets._refills) <= 2 * len(buckets) + 16
    now[0] = 1.5
    buckets.take("c")
    assert len(buckets) == 3  # "a" not full until 2: kept (its stale entry skipped)
    assert "a" in buckets._buckets
    now[0] = 2.0
    buckets.take("c")
    assert "a" not in buckets._buckets


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
