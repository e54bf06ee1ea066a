"""The admin-key check of gateway/admin.py and its setting."""

from __future__ import annotations

import pytest

from gateway.admin import AdminRefused, bearer_token, check_admin_key
from gateway.settings import Settings


def test_bearer_tokens() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_admin_keys_are_checked_and_none_configured_refuses_all() -> None:
    """No token: 401 with a bare Bearer challenge; a wrong key: 401 ``invalid_token``
    (RFC 6750 section 3.1); no keys configured: 403 without a challenge."""
    keys = frozenset({"k1", "k2"})
    check_admin_key(keys, "Bearer k2")
    with pytest.raises(AdminRefused) as missing:
        check_admin_key(keys, None)
    assert missing.value.status == 401
    assert missing.value.challenge == 'Bearer realm="gateway-admin"'
    for wrong_key in ("Bearer k3", "Bearer k1k2", "Bearer K1"):
        with pytest.raises(AdminRefused) as wrong:
            check_admin_key(keys, wrong_key)
        assert wrong.value.status == 401
        assert wrong.value.challenge == 'Bearer realm="gateway-admin", error="invalid_token"'
    with pytest.raises(AdminRefused) as unset:
        check_admin_key(frozenset(), "Bearer k1")
    assert unset.value.status == 403
    assert unset.value.challenge is None


def test_gateway_admin_keys_is_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", " k1, k2 ,,")
    assert Settings().admin_keys == frozenset({"k1", "k2"})
