"""``GET``/``HEAD /file/tts/{id}.{ext}`` as media players and caches use it: byte ranges
(RFC 9110 section 14; Safari and iOS AVPlayer open audio with ``Range: bytes=0-1`` and
need a 206) and validators (section 13: ``ETag``, ``If-None-Match``, ``If-Range``).
Real uvicorn, real espeak-ng."""

from __future__ import annotations

import asyncio

import httpx

from gateway.speech.tts_cache import RedisTtsCache
from tests.gateway.tts_links import TtsLinks, tts_served

TEXT = "Testing one two three, four five six. This file is long enough to cut in pieces."


async def test_a_byte_range_of_a_tts_file_is_a_206_from_its_first_get(tts_link: TtsLinks) -> None:
    client, speech, counter = tts_link.client, tts_link.speech, tts_link.counter
    path, file_id = await tts_link.issue(TEXT)

    # a player's first request, before anything is synthesized, beside a plain GET
    # of the same link (streamed): one synthesis, a 206 of the same bytes
    streamed, probe = await asyncio.gather(
        client.get(path), client.get(path, headers={"Range": "bytes=0-1"})
    )
    assert streamed.status_code == 200
    body = streamed.content
    size = len(body)
    assert size > 1000
    assert probe.status_code == 206, (probe.status_code, probe.headers)
    assert probe.headers["content-range"] == f"bytes 0-1/{size}"
    assert probe.headers["content-length"] == "2"
    assert probe.headers["content-type"] == "audio/mpeg"
    assert probe.headers["accept-ranges"] == "bytes"
    assert probe.content == body[:2]
    assert counter.calls == 1
    assert await speech.cache.get(file_id, "mp3") == body

    # alone: the player asks for two bytes and hangs up; the file is made all the same
    other_path, _ = await tts_link.issue("Another file, for a player.")
    first = await client.get(other_path, headers={"Range": "bytes=0-1"})
    assert first.status_code == 206
    assert counter.calls == 2
    whole = await client.get(other_path)
    assert whole.status_code == 200
    assert whole.headers["content-length"] == str(len(whole.content))
    assert first.content == whole.content[:2]
    assert first.headers["content-range"] == f"bytes 0-1/{len(whole.content)}"
    assert counter.calls == 2

    # cached: the ranges players and download managers send
    got = await client.get(path)
    assert got.status_code == 200
    assert got.headers["accept-ranges"] == "bytes"
    assert got.content == body
    for asked, start, end in (
        ("bytes=100-199", 100, 199),
        (f"bytes={size - 5}-", size - 5, size - 1),
        ("bytes=-10", size - 10, size - 1),
        ("bytes=10-99999999", 10, size - 1),
        ("bytes=0-", 0, size - 1),
    ):
        part = await client.get(path, headers={"Range": asked})
        assert part.status_code == 206, asked
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}", asked
        assert part.content == body[start : end + 1], asked
        assert part.headers["content-length"] == str(end + 1 - start), asked

    # past the end: 416 with the size; not bytes: ignored (the whole file)
    refused = await client.get(path, headers={"Range": f"bytes={size}-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{size}"
    for ignored in ("items=0-1", "bytes=abc"):
        answer = await client.get(path, headers={"Range": ignored})
        assert answer.status_code == 200, ignored
        assert answer.content == body, ignored

    # If-Range: the ETag of this file gets the range; another validator the whole file
    etag = got.headers["etag"]
    part = await client.get(path, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert part.status_code == 206
    assert part.content == body[:10]
    stale = await client.get(path, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200
    assert stale.content == body

    # HEAD: Range is for GET only (section 14.2); the whole file's headers
    head = await client.head(path, headers={"Range": "bytes=0-1"})
    assert head.status_code == 200
    assert head.headers["content-length"] == str(size)
    assert head.headers["accept-ranges"] == "bytes"
    assert counter.calls == 2


async def test_a_cached_tts_file_has_an_etag_and_a_matching_if_none_match_is_304(
    tts_link: TtsLinks,
) -> None:
    client = tts_link.client
    path, _ = await tts_link.issue("Cache me, please.", "wav")
    await client.get(path)  # synthesized (streamed, no validator yet)

    got = await client.get(path)
    etag = got.headers["etag"]
    assert etag[0] == etag[-1] == '"'
    assert len(etag) > 10
    assert (await client.get(path)).headers["etag"] == etag
    assert (await client.head(path)).headers["etag"] == etag

    for method in ("GET", "HEAD"):
        for tags in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            again = await client.request(method, path, headers={"If-None-Match": tags})
            assert again.status_code == 304, (method, tags)
            assert again.content == b""
            assert again.headers["etag"] == etag
            assert again.headers["cache-control"] == "public, max-age=86400, immutable"
    changed = await client.get(path, headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200
    assert changed.content == got.content


async def test_a_404_for_a_malformed_id_clips_the_id_in_its_detail(tts_link: TtsLinks) -> None:
    client = tts_link.client
    long_id = "x" * 8000
    for method in ("GET", "HEAD"):
        got = await client.request(method, f"/file/tts/{long_id}.mp3")
        assert got.status_code == 404, (method, got.status_code)
        assert got.headers["content-type"] == "application/problem+json"
    got = await client.get(f"/file/tts/{long_id}.mp3")
    detail = got.json()["detail"]
    assert len(got.content) < 400, len(got.content)
    assert detail.startswith("No speech file " + "x" * 65 + "….mp3"), detail
    # a well-shaped id is named whole
    whole = "a" * 64
    assert f"No speech file {whole}.mp3" in (await client.get(f"/file/tts/{whole}.mp3")).text


async def test_a_cached_file_is_served_only_under_its_own_type_after_its_spec_expired(
    redis_url: str, redis_prefix: str
) -> None:
    async with tts_served(redis_url=redis_url, redis_prefix=redis_prefix) as links:
        client, speech = links.client, links.speech
        path, file_id = await links.issue("An mp3 link.")
        body = (await client.get(path)).content
        assert body[:4] != b"RIFF"
        assert len(body) > 1000

        # the spec expires (its life starts when the link is issued), the file lives on
        cache = speech.cache
        assert isinstance(cache, RedisTtsCache)
        assert await cache.redis.delete(cache.spec_key(file_id)) == 1
        assert await speech.cache.spec(file_id) is None
        for ext in ("wav", "mulaw"):
            for method in ("GET", "HEAD"):
                other = await client.request(method, f"/file/tts/{file_id}.{ext}")
                assert other.status_code == 404, (method, ext, other.status_code)
                assert other.headers["content-type"] == "application/problem+json"
        got = await client.get(path)  # its own type is still served from the cache
        assert got.status_code == 200
        assert got.headers["content-type"] == "audio/mpeg"
        assert got.content == body


async def test_if_none_match_star_is_304_before_synthesis_and_its_lines_combine(
    tts_link: TtsLinks,
) -> None:
    """``If-None-Match: *`` is false when a current representation exists (RFC 9110 section
    13.1.2): a registered link is one, synthesized or not, so GET and HEAD answer 304 and
    nothing is synthesized (before: 200, and the GET synthesized the file). An
    ``If-None-Match`` split over several header lines is one list (section 5.3): its
    second line's ETag matches too (before: only the first line was read)."""
    client, speech, counter = tts_link.client, tts_link.speech, tts_link.counter
    path, file_id = await tts_link.issue("Not made yet.")

    for method in ("GET", "HEAD"):
        for tags in ("*", '"other", *', 'W/"x",*'):
            got = await client.request(method, path, headers={"If-None-Match": tags})
            assert got.status_code == 304, (method, tags, got.status_code)
            assert got.content == b""
            assert got.headers["cache-control"] == "no-cache"
    assert counter.calls == 0
    assert await speech.cache.get(file_id, "mp3") is None
    # an unknown link has no current representation: 404 as without the header
    unknown = f"/file/tts/{'a' * 64}.mp3"
    for method in ("GET", "HEAD"):
        got = await client.request(method, unknown, headers={"If-None-Match": "*"})
        assert got.status_code == 404, (method, got.status_code)

    body = (await client.get(path)).content  # synthesized now
    assert counter.calls == 1
    etag = (await client.head(path)).headers["etag"]
    for method in ("GET", "HEAD"):
        star = await client.request(method, path, headers={"If-None-Match": "*"})
        assert star.status_code == 304, method
        assert star.headers["etag"] == etag
        # two header lines: '"other"' then the file's ETag
        lines = httpx.Headers([("If-None-Match", '"other"'), ("If-None-Match", etag)])
        split = await client.request(method, path, headers=lines)
        assert split.status_code == 304, (method, split.status_code)
        assert split.content == b""
        neither = httpx.Headers([("If-None-Match", '"a"'), ("If-None-Match", '"b"')])
        changed = await client.request(method, path, headers=neither)
        assert changed.status_code == 200, method
    assert (await client.get(path, headers=neither)).content == body
    assert counter.calls == 1


async def test_several_ranges_are_one_206_when_they_form_one_span_else_the_whole_file(
    tts_link: TtsLinks,
) -> None:
    """A ``Range`` of several ranges (RFC 9110 section 14.1.2): those that overlap or adjoin,
    in any order, are coalesced into one 206 (section 15.3.7.2); ranges with a gap get the
    whole file (200, no multipart); a range past the end beside a satisfiable one is left
    out (section 14.1.1: the set is satisfiable), 416 only when none is (before: any
    range past the end was a 416)."""
    client = tts_link.client
    path, _ = await tts_link.issue("Several ranges of me.")
    body = (await client.get(path)).content  # synthesized, cached
    size = len(body)
    assert size > 1000
    for asked, start, end in (
        ("bytes=0-1,2-3", 0, 3),
        ("bytes=2-3, 0-1", 0, 3),
        ("bytes=10-20,15-30,31-40", 10, 40),
        (f"bytes=0-1,{size}-", 0, 1),
        (f"bytes={size + 5}-{size + 9}, -4", size - 4, size - 1),
        ("bytes=0-1,-0", 0, 1),
    ):
        part = await client.get(path, headers={"Range": asked})
        assert part.status_code == 206, (asked, part.status_code)
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}", asked
        assert part.content == body[start : end + 1], asked
    for whole in (b"bytes=0-1,5-6", b"bytes=,", b"bytes=0-1,x-y", "bytes=\uff11-2".encode()):
        answer = await client.get(path, headers={b"Range": whole})
        assert answer.status_code == 200, (whole, answer.status_code)
        assert answer.content == body, whole
    refused = await client.get(path, headers={"Range": f"bytes={size}-,-0"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{size}"


async def test_a_range_of_positions_of_thousands_of_digits_is_answered_not_a_500(
    tts_link: TtsLinks,
) -> None:
    """A byte position is any number of digits (RFC 9110 section 14.1.2: ``1*DIGIT``), and
    Python's ``int()`` refuses a string of more than 4,300 digits (ValueError): a ``Range``
    with such a position was an unhandled error (500). Now a position that large is past
    any file: a last-pos or suffix that large reaches the end (206 to the end, or the whole
    file), a first-pos that large is not satisfiable (416), and a last-pos below its
    first-pos is still an invalid range (200), however many digits both have."""
    client = tts_link.client
    path, _ = await tts_link.issue("Huge positions.")
    body = (await client.get(path)).content  # synthesized, cached
    size = len(body)
    huge = "9" * 5000
    for asked, start in ((f"bytes=10-{huge}", 10), (f"bytes=-{huge}", 0)):
        part = await client.get(path, headers={"Range": asked})
        assert part.status_code == 206, (asked[:20], part.status_code)
        assert part.headers["content-range"] == f"bytes {start}-{size - 1}/{size}"
        assert part.content == body[start:]
    refused = await client.get(path, headers={"Range": f"bytes={huge}-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{size}"
    invalid = await client.get(path, headers={"Range": f"bytes={huge}9-{huge}"})
    assert invalid.status_code == 200
    assert invalid.content == body
    zeros = await client.get(path, headers={"Range": f"bytes={'0' * 5000}1-{'0' * 5000}2"})
    assert zeros.status_code == 206
    assert zeros.content == body[1:3]
