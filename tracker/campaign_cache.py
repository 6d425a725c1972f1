"""Campaigns in process memory, so a click never waits on PostgreSQL.

Loaded whole at start; a change made by any worker is announced on a Redis channel and every
worker reloads that one campaign. A slug this worker has not seen yet (created a moment ago
elsewhere) is looked up once and remembered; unknown slugs are remembered as unknown for a
moment so that a scan of random slugs cannot hammer the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics
from .campaigns import Campaign
from .storage import campaigns as store

log = logging.getLogger(__name__)

NEGATIVE_TTL = 2.0
FULL_RELOAD_EVERY = 60.0  # a safety net for a missed announcement (Redis blip)


class CampaignCache:
    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, channel: str) -> None:
        self._pool = pool
        self._redis = redis
        self._channel = channel
        self._by_slug: dict[str, Campaign] = {}
        self._missing: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reload_all()
        self._task = asyncio.create_task(self._listen(), name="campaign-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def get(self, slug: str) -> Campaign | None:
        campaign = self._by_slug.get(slug)
        if campaign is not None:
            return campaign
        missing_since = self._missing.get(slug)
        if missing_since is not None and time.monotonic() - missing_since < NEGATIVE_TTL:
            return None
        row = await store.get_live_by_slug(self._pool, slug)
        if row is None:
            if len(self._missing) > 100_000:
                self._missing.clear()
            self._missing[slug] = time.monotonic()
            return None
        campaign = Campaign.from_row(row)
        self._by_slug[slug] = campaign
        return campaign

    async def reload_all(self) -> None:
        rows = await store.all_live(self._pool)
        self._by_slug = {r["slug"]: Campaign.from_row(r) for r in rows}
        self._missing.clear()

    async def reload(self, campaign_id: int) -> None:
        row = await store.get(self._pool, campaign_id)
        for slug, cached in list(self._by_slug.items()):
            if cached.id == campaign_id:
                del self._by_slug[slug]
        if row is not None:
            self._by_slug[row["slug"]] = Campaign.from_row(row)
            self._missing.pop(row["slug"], None)

    async def changed(self, campaign_id: int) -> None:
        """Apply a change here at once and tell the other workers."""
        await self.reload(campaign_id)
        try:
            await self._redis.publish(self._channel, str(campaign_id))
        except RedisError:
            metrics.BACKEND_ERRORS.labels("redis").inc()
            log.warning("could not announce a campaign change; others reload within %ss",
                        FULL_RELOAD_EVERY)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    # Changes made while we were not subscribed.
                    await self.reload_all()
                    next_full = time.monotonic() + FULL_RELOAD_EVERY
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None and message["type"] == "message":
                            with contextlib.suppress(ValueError):
                                await self.reload(int(message["data"]))
                        if time.monotonic() >= next_full:
                            await self.reload_all()
                            next_full = time.monotonic() + FULL_RELOAD_EVERY
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep listening through outages
                metrics.BACKEND_ERRORS.labels(
                    "redis" if isinstance(exc, RedisError) else "postgres").inc()
                log.warning("campaign cache listener: %r; retrying", exc)
                await asyncio.sleep(1.0)
