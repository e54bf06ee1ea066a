"""The per-call stream tokens of the carriers' answers (gateway/io/call.py CallTokens):
a token that is not ASCII is malformed, refused with VerificationRefused (the upgrade's
403) and never another exception (the carriers' upgrades: the refusals of
tests/adapters/test_carrier_calls.py)."""

from __future__ import annotations

import pytest

from gateway.callcodec import RETRY_WINDOW_S, VerificationRefused
from gateway.io.call import (
    CallTokens,
    first_answered_at,
    signed_issue_time,
    stream_key,
    use_signature_for_request,
)
from gateway.nonces import MemoryNonceStore

NOW = 1_000_000.0
TOKENS = CallTokens(b"k" * 32)
ISSUED = TOKENS.issue("call-1", NOW)


@pytest.mark.parametrize(
    "token",
    [
        "abc.é",  # in the MAC
        ISSUED[:-1] + "é",  # a good token's MAC, its last digit replaced
        "abc.\udce9",  # a lone surrogate (an undecodable byte kept as is), in the MAC
        "\udce9." + ISSUED.partition(".")[2],  # in the body
    ],
    ids=["mac", "issued-mac", "surrogate-mac", "surrogate-body"],  # ISSUED's nonce is random
)
def test_a_token_that_is_not_ascii_is_refused_as_malformed(token: str) -> None:
    with pytest.raises(VerificationRefused, match="malformed") as refused:
        TOKENS.check(token, NOW)
    assert refused.value.status == 403


async def test_a_signed_request_again_is_a_retry_within_the_retry_window_only() -> None:
    """:func:`use_signature_for_request` (the real in-memory one-time key store, its clock
    stepped): the same request again is a retry (True) within ``retry_s`` of the first and
    while the stream token its answer carries is unused; after ``retry_s`` (the token still
    inside its replay window, ``ttl_s``), or once that stream was admitted (the carrier got
    the answer: it connected), it is refused as a replay, as another request is at once.
    Before, the same request was answered again for the whole replay window, its stream
    credential handed out again after the stream had started or the call had ended."""
    now = [1000.0]
    store = MemoryNonceStore(clock=lambda: now[0])
    replay = VerificationRefused("replayed", status=401)
    stream = stream_key("vonage", "0123456789abcdef")

    async def send(request: str) -> bool:
        return await use_signature_for_request(
            store, "vonage:token:k", request, 330, replay, retry_s=60, stream=stream
        )

    assert await send("a") is False  # the first
    now[0] += 59
    assert await send("a") is True  # the carrier's retry
    with pytest.raises(VerificationRefused) as refused:
        await send("b")  # another request with the token
    assert refused.value is replay
    now[0] += 2  # past the retry window, inside the replay window
    with pytest.raises(VerificationRefused):
        await send("a")
    assert await store.used("vonage:token:k")  # the token stays used

    now[0] += 1000  # a token of its own, its stream admitted
    assert await send("c") is False
    assert await send("c") is True
    assert await store.use_once(stream, 300)  # the stream token used (gateway.io.call.use_token)
    with pytest.raises(VerificationRefused):
        await send("c")


async def test_an_answer_without_a_signed_time_is_issued_at_its_first_answer_s_slot() -> None:
    """:func:`first_answered_at` (the real in-memory store, its clock stepped with the
    Unix time): a signed request whose signature carries no time (Plivo's V3) gets its
    stream token issued at the start of the retry window's slot of its first answer; its
    retry, within the window but in the next slot, gets that same time (the same token
    bytes), as one in the same slot does; another request gets its own. Unmarked (the
    store failed between the first request's marks): the retry's own slot."""
    now = [1_000_000 * RETRY_WINDOW_S + RETRY_WINDOW_S - 1.0]  # the slot's last second
    store = MemoryNonceStore(clock=lambda: now[0])
    slot = int(now[0]) // RETRY_WINDOW_S * RETRY_WINDOW_S
    assert await first_answered_at(store, "plivo:r:a", now[0], retry=False) == slot
    assert await first_answered_at(store, "plivo:r:a", now[0], retry=True) == slot
    now[0] += 2  # the next slot, within the retry window
    assert await first_answered_at(store, "plivo:r:a", now[0], retry=True) == slot
    assert await first_answered_at(store, "plivo:r:b", now[0], retry=False) == slot + RETRY_WINDOW_S
    assert await first_answered_at(store, "plivo:r:c", now[0], retry=True) == slot + RETRY_WINDOW_S
    tokens = [TOKENS.issue("call-1", at, "00ff") for at in (slot, slot, slot + RETRY_WINDOW_S)]
    assert tokens[0] == tokens[1] != tokens[2]


async def test_a_retried_answer_s_token_is_good_for_its_ttl_from_every_answer() -> None:
    """:func:`signed_issue_time`: a token issued at the signed time plus the tolerance is
    the same for the first answer and its retries (a function of the signed time alone)
    and good for its whole TTL from each: a Telnyx or Vonage request whose signed time is
    the tolerance old, a Plivo first answer in its slot's first second and its retry one
    window later (the slot after). Issued at the signed time itself, such a token was good
    for no time (the tolerance old) or the TTL less up to a window (Plivo)."""
    signed_at = 1_000_000
    token = TOKENS.issue("call-1", signed_issue_time(signed_at, 300), "00ff")
    TOKENS.check(token, signed_at + 300 + TOKENS.ttl_s)  # answered at signed_at + 300
    with pytest.raises(VerificationRefused, match="expired"):
        TOKENS.check(token, signed_at + 300 + TOKENS.ttl_s + 1)

    now = [1_000_000.0 * RETRY_WINDOW_S]  # a slot's first second
    store = MemoryNonceStore(clock=lambda: now[0])
    first = await first_answered_at(store, "plivo:r:a", now[0], retry=False)
    issued = signed_issue_time(first, 2 * RETRY_WINDOW_S)
    now[0] += RETRY_WINDOW_S - 0.5  # the retry, in the next slot
    retried = await first_answered_at(store, "plivo:r:a", now[0], retry=True)
    assert signed_issue_time(retried, 2 * RETRY_WINDOW_S) == issued
    TOKENS.check(TOKENS.issue("call-1", issued, "00ff"), now[0] + TOKENS.ttl_s)
