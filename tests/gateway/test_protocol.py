"""The shared pure kit's input checks: load_json's bounds and texts, timestamps, time zones.

(tests/test_parsers_fuzz.py checks the same with hostile input at random.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import (
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnsafeValue,
    check_time_zone,
    clipped,
    guarded_decoder,
    json_depth,
    load_json,
    parse_timestamp,
)
from gateway.protocol.load import _long_number, number_run


def refusal(data: str | bytes, **options: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        load_json(data, **options)
    return caught.value


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), 400, "nested deeper than 64"),
        ('{"a":' * 5000 + "1" + "}" * 5000, 400, "nested deeper than 64"),
        ("[" * 100_000, 400, "nested deeper than 64"),  # never closed
        ("9" * 5000, 400, "number longer than 100 characters"),
        ('{"n":-' + "1" * 101 + "}", 400, "number longer than 100"),
        ("1." + "0" * 200, 400, "number longer than 100"),
        ("1e999", 400, "out of range"),
        ("[NaN]", 400, "NaN, which is not JSON"),
        ("-Infinity", 400, "-Infinity, which is not JSON"),
        ('"\\ud800"', 400, "lone UTF-16 surrogate"),
        ('{"\\udfff": 1}', 400, "lone UTF-16 surrogate"),
        ('"a\ud800"', 400, "lone UTF-16 surrogate"),
        (b'["\\ud800"]', 400, "lone UTF-16 surrogate"),
        (b'{"x": ["' + b"[{" * 100 + b'"], "n": 1e999}', 400, "out of range"),
        ('{"s": "' + "{" * 100 + '", "n": ' + "2" * 101 + "}", 400, "number longer than 100"),
        (b'{"a": "\xff"}', 400, "not UTF-8: bad byte at byte 7"),
        ('{"a": 1,}', 400, "Malformed JSON at character 8"),
        (b'{"\xc3\xa9": x}', 400, "Malformed JSON at byte 7"),
        ("", 400, "Malformed JSON at character 0"),
    ],
)
def test_refusals_name_the_problem(data: str | bytes, status: int, says: str) -> None:
    error = refusal(data)
    assert error.status == status
    assert says in error.text


@pytest.mark.parametrize("data", [str, lambda text: text.encode()])
def test_a_key_given_twice_is_refused_at_any_depth(data: Any) -> None:
    """A member whose key came before was read as the last one given, silently: a V2 body
    ``{"type": "Input", ..., "type": "Log"}`` became a Log and the Input was lost."""
    for text, key in [
        ('{"type": "Input", "input": {}, "type": "Log"}', "'type'"),
        ('[1, {"a": {"b": [{"c": 1, "c": 1}]}}]', "'c'"),
        ('{"x": 1, "y": 2, "x": 1, "y": 3}', "'x'"),  # the first key that comes again
        ('{"%s": 1, "%s": 2}', "'%s'"),
        ('{"\\u00e9": 1, "é": 2}', "'é'"),  # the same key however it is written
        ('{"' + "k" * 500 + '": 1, "' + "k" * 500 + '": 2}', "'" + "k" * 64 + "'…"),
    ]:
        error = refusal(data(text), what="The body")
        assert (error.status, error.text) == (400, f"The body holds the key {key} more than once.")
    assert load_json(data('[{"a": 1}, {"a": 2}, {"A": 1, "a": 2, "a ": 3}]')) == [
        {"a": 1},
        {"a": 2},
        {"A": 1, "a": 2, "a ": 3},
    ]
    with pytest.raises(UnsafeValue):  # the fast paths' decoder leaves it to load_json
        guarded_decoder().decode('{"a": {"b": 1, "b": 2}}')


def test_size_is_413_and_counted_in_utf8_bytes() -> None:
    assert refusal(b"[" + b"1," * 60 + b"1]", max_bytes=100).status == 413
    assert refusal('"' + "é" * 60 + '"', max_bytes=100).status == 413  # 122 bytes, 62 chars
    assert load_json('"' + "é" * 40 + '"', max_bytes=100) == "é" * 40


def test_within_bounds_it_is_the_standard_parser() -> None:
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(deepest) == MAX_JSON_DEPTH
    assert load_json(deepest) is not None
    number = "1" * MAX_NUMBER_CHARS
    assert load_json(number) == int(number)
    assert load_json('{"s": "[[[[[[ ' + "9" * 500 + '", "pair": "\\ud83d\\ude00"}') == {
        "s": "[[[[[[ " + "9" * 500,
        "pair": "😀",
    }
    assert load_json(b'[1.5, -0, true, null, "\\\\ud800"]') == [1.5, 0, True, None, "\\ud800"]
    # brackets and digits inside strings count for neither bound
    assert load_json(b'{"s": "' + b"[{" * 100 + b"7" * 200 + b'"}') == {"s": "[{" * 100 + "7" * 200}
    error = refusal(b"[1, NaN]", what="The frame")
    assert error.text == "The frame holds NaN, which is not JSON."


# pieces of text around the number-length bound: runs of number characters a little
# shorter or longer than the bound, the characters that end or hide them (quotes,
# escapes, letters, non-ASCII digits and letters, a lone surrogate)
_PIECES = st.one_of(
    st.integers(0, 12).flatmap(
        lambda extra: st.text(alphabet="-+0123456789.eE", min_size=extra, max_size=extra)
    ),
    st.sampled_from(["1" * 99, "9" * 100, "7" * 101, "-1" + "0" * 99, "1e" + "5" * 98]),
    st.text(alphabet='"\\ {}[],:aEfx\u0660\uff11é😀\n', max_size=4),
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PIECES, max_size=12), st.sampled_from([0, 1, 3, 10, 100]), st.booleans())
def test_number_run_decides_as_the_regex_did(pieces: list[str], bound: int, lone: bool) -> None:
    """number_run on the UTF-8 bytes answers what the regex search of the text did."""
    text = "".join(pieces) + ("\ud800" if lone else "")
    expected = _long_number(bound).search(text) is not None
    assert number_run(text.encode("utf-8", "surrogatepass"), bound) is expected


@pytest.mark.parametrize("data", [str, lambda text: text.encode()])
def test_number_length_bound_at_the_boundary(data: Any) -> None:
    """100 characters pass and 101 are refused, counted with sign and exponent, outside
    strings only; the bytes and the str of a text are judged alike."""
    for number in ("1" * 100, "-" + "1" * 99, "1e-" + "0" * 96 + "5", "1." + "0" * 98):
        assert load_json(data('{"n": ' + number + "}")) == {"n": json_value(number)}
    for number in ("1" * 101, "-" + "1" * 100, "1e-" + "0" * 97 + "5", "1." + "0" * 99):
        error = refusal(data('{"n": ' + number + "}"))
        assert error.text == "The JSON holds a number longer than 100 characters."
    assert load_json(data('["' + "1" * 101 + '", "é"]')) == ["1" * 101, "é"]
    assert load_json(data('"é' + "1" * 500 + '"')) == "é" + "1" * 500
    assert load_json(data("[" + ", ".join(["1" * 100] * 3) + "]")) == [int("1" * 100)] * 3
    assert refusal(data("[1, 2, " + "3" * 101 + "]"), max_number_chars=100).status == 400
    assert load_json(data("[12345]"), max_number_chars=5) == [12345]
    assert refusal(data("[123456]"), max_number_chars=5).status == 400


def json_value(number: str) -> float | int:
    return float(number) if "." in number or "e" in number else int(number)


def test_names_and_offsets_in_the_texts() -> None:
    error = refusal(b'{"a":', what="The frame")
    assert error.text == "Malformed JSON at byte 5: Expecting value."
    with pytest.raises(ProtocolError, match="at byte 105:"):
        load_json(b'{"a":', offset=100)
    with pytest.raises(ProtocolError, match=r"^The frame is nested deeper"):
        load_json("[[[]]]", max_depth=2, what="The frame")


def test_hostile_texts_are_refused() -> None:
    """Hostile JSON texts are refused (or read) by the bounded loader. That it takes time
    linear in their size is measured by ``python bench/json_linear.py`` (CPU time at n and
    2n), not here: a wall-clock bound fails on a loaded machine."""
    for text in (
        '"' + '\\"' * 300_000,  # escaped quotes: a string that never ends
        "[" * 1_000_000,
        '"' * 1_000_001,
        "9" * 1_000_000,
    ):
        with pytest.raises(ProtocolError):
            load_json(text)
    assert len(load_json("[" + "1," * 500_000 + "1]")) == 500_001


@pytest.mark.parametrize(
    ("raw", "moment"),
    [
        ("2024-06-01T12:00:00Z", datetime(2024, 6, 1, 12, tzinfo=UTC)),
        ("2024-06-01T14:00:00+02:00", datetime(2024, 6, 1, 12, tzinfo=UTC)),
        ("2024-06-01T12:00:00", datetime(2024, 6, 1, 12, tzinfo=UTC)),  # naive: UTC
        ("0001-01-01T01:00:00+01:00", datetime(1, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_become_aware_utc(raw: str, moment: datetime) -> None:
    assert parse_timestamp(raw) == moment


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("0001-01-01T00:00:00+01:00", "out of range"),
        ("9999-12-31T23:59:59-01:00", "out of range"),
        ("yesterday", "not ISO 8601"),
        ("2024-13-01T00:00:00Z", "not ISO 8601"),
        (1717243200, "must be an ISO 8601 string, not int"),
        (None, "not NoneType"),
    ],
)
def test_timestamps_utc_cannot_hold_are_refused(raw: object, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_timestamp(raw, what="request.timestamp")


def test_time_zones_are_keys_of_the_database_not_paths() -> None:
    assert check_time_zone("Europe/Prague") == "Europe/Prague"
    assert check_time_zone("UTC") == "UTC"
    for name in (
        "America",
        "America/",
        "../../etc/passwd",
        "/etc/localtime",
        "zone.tab",
        "",
        "x" * 300,
    ):
        with pytest.raises(ProtocolError, match="unknown IANA time zone"):
            check_time_zone(name, what="userTimezone")


def test_remote_and_local_protocol_errors_are_apart() -> None:
    """ProtocolError is the peer's mistake (RemoteProtocolError); LocalProtocolError is ours
    and is not caught by the handlers that answer the peer."""
    assert ProtocolError is RemoteProtocolError
    remote = ProtocolError("Unknown event type", expected="Init", got="'Input'", status=409)
    assert isinstance(remote, RemoteProtocolError)
    assert (remote.text, remote.status) == ("Unknown event type: expected Init, got 'Input'", 409)
    assert str(remote) == remote.text
    local = LocalProtocolError("send() in state", expected="OPEN", got="CLOSED")
    assert (local.text, local.expected, local.got) == (
        "send() in state: expected OPEN, got CLOSED",
        "OPEN",
        "CLOSED",
    )
    assert not isinstance(local, RemoteProtocolError)
    with pytest.raises(LocalProtocolError):  # passes through a handler of the peer's errors
        try:
            raise local
        except ProtocolError:
            pytest.fail("a LocalProtocolError was taken for the peer's mistake")


def test_clipped_quotes_a_client_s_value_cut_to_64_characters() -> None:
    assert clipped("hello") == "'hello'"
    assert clipped("x" * 64) == repr("x" * 64)  # no cut, no ellipsis
    assert clipped("x" * 1_000_000) == repr("x" * 64) + "…"
    assert clipped("x" * 100, 8) == "'xxxxxxxx'…"
    assert clipped("ab\ncd" * 100, quote=False) == ("ab\ncd" * 100)[:64] + "…"
    assert clipped("abc", quote=False) == "abc"
    assert clipped(None) == "None"
    assert clipped(7) == "7"
    assert clipped(["y" * 1000] * 1000).endswith("…")
    assert len(clipped(["y" * 1000] * 1000)) == 65
    assert clipped({"k": 1}) == "{'k': 1}"
    assert clipped(10**5000) == "<int>"  # past the int-to-str digit limit: never raises
