"""The hang guard (tests/conftest.py ``unless_hung``): only its own deadline is "hung";
a TimeoutError of the code it awaits is that code's, and propagates as it is."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import unless_hung


async def test_the_guard_s_own_deadline_fails_the_test_as_hung() -> None:
    with pytest.raises(pytest.fail.Exception, match="hung: the wait"):
        await unless_hung(asyncio.Event().wait(), "the wait", within_s=0.01)


async def test_a_timeout_error_of_the_awaited_code_propagates_as_itself() -> None:
    async def product() -> None:
        raise TimeoutError("the product's own")

    with pytest.raises(TimeoutError, match="the product's own"):
        await unless_hung(product(), "the product")


async def test_a_deadline_of_the_awaited_code_firing_is_not_a_hang() -> None:
    async def product() -> None:
        async with asyncio.timeout(0.01):  # the product's own timeout, well inside 30 s
            await asyncio.Event().wait()

    with pytest.raises(TimeoutError):  # not the guard's pytest.fail (no TimeoutError)
        await unless_hung(product(), "the product")


async def test_the_guard_returns_what_it_awaited() -> None:
    async def product() -> int:
        return 7

    assert await unless_hung(product(), "the product") == 7
