"""The signed-postback replay guard against a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as aioredis

from tracker.conversion.security import (forget_signature, remember_signature, replay_key,
                                         sign)


@pytest_asyncio.fixture(loop_scope="session")
async def redis(backing: tuple[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(backing[1])
    yield client
    await client.aclose()


def a_key() -> str:
    return replay_key(f"t{uuid.uuid4().hex[:8]}:", sign([("cid", "x")], "secret", 1_700_000_000))


async def test_a_signature_is_first_once_then_a_replay(redis: aioredis.Redis) -> None:
    key = a_key()
    try:
        assert await remember_signature(redis, key, 600) is True
        assert await remember_signature(redis, key, 600) is False
        assert await remember_signature(redis, key, 600) is False
        assert 598 <= await redis.ttl(key) <= 600
    finally:
        await redis.delete(key)


async def test_concurrent_sendings_have_exactly_one_first(redis: aioredis.Redis) -> None:
    key = a_key()
    try:
        firsts = await asyncio.gather(*(remember_signature(redis, key, 60) for _ in range(50)))
        assert firsts.count(True) == 1
    finally:
        await redis.delete(key)


async def test_forgotten_after_the_ttl_or_when_told(redis: aioredis.Redis) -> None:
    key = a_key()
    try:
        assert await remember_signature(redis, key, 1)
        await asyncio.sleep(1.2)
        assert await remember_signature(redis, key, 60)
        await forget_signature(redis, key)
        assert await remember_signature(redis, key, 60)
    finally:
        await redis.delete(key)
