"""Leaving in an explicit, bounded order: in-flight requests answered, the writer's batch
finished or cancelled and awaited, the stream drained, then everything closed."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import pytest
import redis.asyncio as aioredis

from tracker.settings import Settings
from tracker.storage import db

from ..conftest import start
from .test_writer import writer_for


async def test_a_writer_stuck_at_shutdown_is_awaited_before_the_drain(
        settings: Settings, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    """The writer's batch hangs behind a lock longer than the worker may take to leave: the
    writer is cancelled and awaited before the drain uses a connection (never its own while
    it is mid-statement), the whole shutdown stays under the supervisor's 10 s, and what could
    not be written waits in the stream, where the next writer stores it once."""
    runner, running = await start(settings)
    await running.create_campaign(slug="stuck")
    blocker = await db.connect(settings.database_url)
    lock = blocker.transaction()
    await lock.start()
    await blocker.execute("LOCK TABLE rollup_15m IN ACCESS EXCLUSIVE MODE")
    try:
        for i in range(10):
            assert (await running.click("stuck", f"sub1={i}")).status == 302
        await asyncio.sleep(0.5)  # the writer has taken the batch and waits on the lock
        await running.close()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            leaving = asyncio.create_task(runner.cleanup())
            await asyncio.sleep(6.0)  # past every timeout of the old and the new order
            await lock.rollback()
            await asyncio.wait_for(leaving, 15)
        took = time.monotonic() - started
    finally:
        await blocker.close()
    assert "another operation is in progress" not in caplog.text
    assert took < 10, took  # under the supervisor's kill
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        writer = writer_for(settings, redis, claim_idle_ms=100)
        await asyncio.sleep(0.2)
        while await writer.step(block=False):
            pass
        await writer.close()
    finally:
        await redis.aclose()
    assert await pg.fetchval("SELECT count(*) FROM clicks") == 10
    assert await pg.fetchval("SELECT count(DISTINCT sub1) FROM clicks") == 10
