"""Letting go of the uniqueness marks of windows gone by, off Redis's main thread.

Visitors are marked in one hash per campaign, shard and uniqueness window (ingest/buffer.py,
Keys.seen). A hash is needed while its window lasts and through the next one; it carries an
expiry an eighth of a window later still, but Redis frees an expired key on its main thread,
which for a busy campaign's day of visitors (millions of fields) would stall every request
for a while. So every worker, each eighth of a window, UNLINKs the hashes of the window
before last for every campaign it knows (Redis frees them in a background thread); the
expiry is only the safety net for a campaign deleted meanwhile. Unlinking is idempotent: N
instances doing it at once cost a few commands each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from ..redis_client import Client, send
from ..redis_keys import Keys

log = logging.getLogger(__name__)

CHUNK = 500


class OldMarks:
    def __init__(self, redis: Client, keys: Keys, campaign_ids: Callable[[], list[int]],
                 window_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._campaign_ids = campaign_ids
        self._window_ms = window_seconds * 1000
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="old-marks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def forget(self, now_ms: int | None = None) -> int:
        """UNLINK the window before last's hashes of every known campaign; how many went."""
        window = (int(time.time() * 1000) if now_ms is None else now_ms) // self._window_ms
        names = [self._keys.seen(shard, campaign_id, window - 2)
                 for campaign_id in self._campaign_ids() for shard in range(self._keys.shards)]
        gone = 0
        for start in range(0, len(names), CHUNK):
            # One key a command: on a Cluster the keys of one call must share a slot.
            replies = await send(self._redis, [("UNLINK", name) for name in names[start:start + CHUNK]])
            gone += sum(r for r in replies if isinstance(r, int))
        return gone

    async def _run(self) -> None:
        pause = max(self._window_ms / 8000, 1.0)
        while True:
            await asyncio.sleep(pause)
            try:
                await self.forget()
            except RedisError as exc:  # Redis away: the next pass, or the expiry, does it
                log.debug("old uniqueness marks not unlinked: %r", exc)
