"""The gauges lease on a real Redis: one holder at a time, kept by renewing, handed over when
its holder leaves or stops renewing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as aioredis

from tracker.lease import Lease, gauges_key

from ..conftest import eventually


@pytest_asyncio.fixture(loop_scope="session")
async def redis(backing: tuple[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(backing[1])
    yield client
    await client.aclose()


def key() -> str:
    return gauges_key(f"t{uuid.uuid4().hex[:8]}:")


async def test_one_holder_at_a_time_until_it_releases(redis: aioredis.Redis) -> None:
    lease = key()
    a, b = Lease(redis, lease, "host-a:1"), Lease(redis, lease, "host-b:1")
    assert await a.renew() and a.held
    assert not await b.renew() and not b.held
    assert await a.renew(), "the holder keeps it"
    assert await redis.get(lease) == b"host-a:1"
    assert 0 < await redis.pttl(lease) <= 15_000
    await b.release()  # not b's: nothing happens
    assert await redis.get(lease) == b"host-a:1"
    await a.release()
    assert not a.held
    assert await b.renew() and b.held
    assert not await a.renew()


async def test_a_holder_that_stops_renewing_loses_it_to_another(redis: aioredis.Redis) -> None:
    lease = key()
    a = Lease(redis, lease, "host-a:1", ttl=0.3)
    b = Lease(redis, lease, "host-b:1", ttl=0.3)
    assert await a.renew()
    assert not await b.renew()
    # a is cut off (no renewal): its own belief lapses, and b takes over once Redis expires it.
    assert await eventually(lambda: _not(a.held), timeout=5)
    assert await eventually(b.renew, timeout=5)
    assert not await a.renew()


async def test_every_worker_of_one_instance_holds_the_same_lease(redis: aioredis.Redis) -> None:
    lease = key()
    worker1, worker2 = Lease(redis, lease, "host-a:1"), Lease(redis, lease, "host-a:1")
    other = Lease(redis, lease, "host-b:1")
    assert await worker1.renew() and await worker2.renew()
    assert not await other.renew()


async def test_a_started_lease_is_taken_and_released_on_stop(redis: aioredis.Redis) -> None:
    lease = key()
    a = Lease(redis, lease, "host-a:1", renew_every=0.05)
    a.start()
    try:
        assert await eventually(lambda: _now(a.held))
    finally:
        await a.stop()
    assert not a.held and await redis.exists(lease) == 0


async def _not(value: bool) -> bool:
    return not value


async def _now(value: bool) -> bool:
    return value
