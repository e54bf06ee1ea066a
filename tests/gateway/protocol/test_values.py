"""The kit's coercion of loosely typed values and its validation of models."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from gateway.protocol import (
    ProtocolError,
    check_language_tag,
    finite_number,
    flag,
    integer,
    media_type,
    strict_flag,
    text,
    validate,
)


@pytest.mark.parametrize(
    "tag", ["en", "en-US", "en_US", "pt-BR", "zh-Hant-TW", "es-419", "x-klingon", "i-enochian"]
)
def test_language_tags(tag: str) -> None:
    assert check_language_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["zh_TW_#Hant", "sr_RS_#Latn", "zh__#Hant", "en__POSIX", "ja_JP_JP_#u-ca-japanese"]
)
def test_java_locale_strings_are_language_tags(tag: str) -> None:
    """What Java's ``Locale.toString()`` (and so Jackson, a Kotlin Flowstorm client's
    ``en_US``) writes for a locale with a script, a variant without a country or an
    extension: ``_#`` before the script, ``__`` for an empty country. The ``_`` form is
    accepted for Java's sake; these were refused (400 / an Error) as no language tag."""
    assert check_language_tag(tag) == tag


@pytest.mark.parametrize(
    "tag",
    [
        "",
        "e",
        "x",
        "-en",
        "en-",
        "en--US",
        "en_#",
        "en#Latn",
        "en-#Latn",
        "en___US",
        "en US",
        "en-US\n",
        "<b>",
        "en-abcdefghi",
        "é",
    ],
)
def test_no_language_tags(tag: str) -> None:
    with pytest.raises(ProtocolError, match="is not a language tag"):
        check_language_tag(tag, what="locale")


def test_a_language_tag_is_bounded() -> None:
    tag = "en" + "-abcdefgh" * 7  # valid subtags, 65 characters
    with pytest.raises(ProtocolError, match="at most 64 characters"):
        check_language_tag(tag)
    assert check_language_tag(tag[:-1]) == tag[:-1]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (0.5, True),
        ("yes", True),
        (" ON ", True),
        ("true", True),
        ("no", False),
        ("maybe", False),
        (None, False),
        ([1], False),
    ],
)
def test_flag(value: Any, expected: bool) -> None:
    assert flag(value) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("Yes", True), (" off ", False), ("0", False), ("", None), ("maybe", None)],
)
def test_strict_flag(raw: str, expected: bool | None) -> None:
    assert strict_flag(raw) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        (3.0, 3),
        (3.5, None),
        (" 42 ", 42),
        ("4x", None),
        ("²", None),  # a digit to str.isdigit, not to int()
        ("9" * 100, int("9" * 100)),
        ("9" * 101, None),  # longer than MAX_INTEGER_DIGITS: no conversion
        ("9" * 5000, None),  # past int()'s 4,300 digits (it raised ValueError)
        ("", None),
        (True, None),
        (None, None),
    ],
)
def test_integer(value: Any, expected: int | None) -> None:
    assert integer(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, True),
        (1.5, True),
        (-(10**30), True),
        (int(sys.float_info.max), True),  # the largest float, as an int
        (10**400, False),  # too large for a float: math.isfinite raised OverflowError
        (-(10**400), False),
        (float("nan"), False),  # PyJWT's and Python's JSON take NaN: it passes every comparison
        (float("inf"), False),
        (float("-inf"), False),
        (True, False),
        ("1", False),
        (None, False),
    ],
)
def test_finite_number(value: Any, expected: bool) -> None:
    assert finite_number(value) is expected


def test_text() -> None:
    assert text("en-US") == "en-US"
    assert text("") is None
    assert text(5) is None


class Point(BaseModel):
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/json", "application/json"),
        (" Text/Plain ; charset=UTF-8", "text/plain"),
        ("audio/x-l16;rate=16000", "audio/x-l16"),
        ("", ""),
        (None, ""),
    ],
)
def test_media_type(value: str | None, expected: str) -> None:
    assert media_type(value) == expected


def test_validate_a_model_and_name_the_field() -> None:
    assert validate(Point, {"x": 1, "y": 2}, what="point") == Point(x=1, y=2)
    with pytest.raises(ProtocolError) as caught:
        validate(Point, {"x": 1, "y": "far"}, what="point")
    assert caught.value.text.startswith("Invalid point: y: ")
    assert caught.value.status == 400
    with pytest.raises(ProtocolError, match=r"^Invalid point: payload\.x: "):
        validate(Point, {"y": 1}, what="point", prefix="payload")
    with pytest.raises(ProtocolError, match=r"^Invalid point: body: "):
        validate(Point, [], what="point", empty="body")


def test_validate_through_a_type_adapter() -> None:
    pairs = TypeAdapter(dict[str, int])
    assert validate(pairs, {"a": 1}, what="pairs") == {"a": 1}
    with pytest.raises(ProtocolError, match=r"^Invalid pairs: a: "):
        validate(pairs, {"a": "x"}, what="pairs")
