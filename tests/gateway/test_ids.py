"""The random ids the gateway makes: request ids and session ids (gateway/turn.py)."""

from __future__ import annotations

import re
import uuid

from gateway.turn import new_session_id, uuid4_hex


def test_uuid4_hex_is_a_version_4_uuid_as_32_lowercase_hex_digits() -> None:
    ids = [uuid4_hex() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", text)
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == text
    # the 122 random bits are used: every other hex digit takes every value somewhere
    for place in (0, 11, 13, 17, 31):
        assert {text[place] for text in ids} == set("0123456789abcdef")
    assert {text[16] for text in ids} == set("89ab")


def test_new_session_id_has_str_uuid4_form() -> None:
    text = new_session_id()
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 4
    assert parsed.variant == uuid.RFC_4122
