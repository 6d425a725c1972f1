"""Every live campaign in process memory: a click never waits on PostgreSQL, and a slug that
is not here is unknown (404) without a query, so probing random links costs the database
nothing.

Kept fresh three ways:
- a change made through any worker is announced on a Redis channel, and every worker reloads
  that one campaign at once; the worker that made it also leaves it in Redis for a few
  minutes before it answers, so that a click a millisecond later on another worker (which has
  not read the announcement yet) still finds it: an unknown slug costs one Redis read;
- every `refresh_seconds`, one cheap query asks PostgreSQL whether any campaign changed since
  the last load (it catches announcements missed while Redis was away), and reloads all if so;
- each load from PostgreSQL is saved to a snapshot file, from which a worker that starts while
  PostgreSQL is away serves the campaigns as last known until PostgreSQL answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from . import metrics
from .campaigns import SLUG, Campaign
from .redis_keys import Keys
from .storage import campaigns as store
from .redis_client import Client, ready

log = logging.getLogger(__name__)

RETRY_CAP_SECONDS = 5.0
# How long a changed campaign stays in Redis for workers that have not loaded it yet: far
# longer than any announcement or refresh takes.
RECENT_SECONDS = 300
SNAPSHOT_FIELDS = ("id", "slug", "status", "destination_url", "rotation", "fallback_url",
                   "cost_model", "cost_value", "currency", "payouts", "postback_url",
                   "postback_token", "postback_secrets", "postback_on")


class CampaignCache:
    def __init__(self, pool: asyncpg.Pool, redis: Client, keys: Keys,
                 snapshot: Path, refresh_seconds: float) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._channel = keys.campaigns_channel
        self._snapshot = snapshot
        self._refresh_seconds = refresh_seconds
        self._by_slug: dict[str, Campaign] = {}
        self._by_id: dict[int, Campaign] = {}
        # Deleted campaigns met by conversions of their old clicks, loaded once.
        self._gone: dict[int, Campaign] = {}
        self._version: str | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Whether campaigns are known at all (from PostgreSQL or the snapshot): until then a
        # click cannot be told apart from an unknown link.
        self.loaded = False
        self._warned: set[str] = set()

    async def start(self) -> None:
        """Load from PostgreSQL if it answers now, else from the snapshot; never fails."""
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - served from the snapshot meanwhile
            self._warn("postgres", exc)
            self._load_snapshot()
        self._tasks = [asyncio.create_task(self._refresh_loop(), name="campaign-refresh"),
                       asyncio.create_task(self._listen(), name="campaign-listen")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def get(self, slug: str) -> Campaign | None:
        return self._by_slug.get(slug)

    def ids(self) -> list[int]:
        """The ids of the campaigns in memory."""
        return list(self._by_id)

    def _set(self, by_slug: dict[str, Campaign]) -> None:
        self._by_slug = by_slug
        self._by_id = {c.id: c for c in by_slug.values()}

    async def by_id(self, campaign_id: int) -> Campaign | None:
        """The campaign of a click, for its conversions: live ones from memory; one that is
        not there (deleted, or made a moment ago elsewhere) from PostgreSQL."""
        campaign = self._by_id.get(campaign_id) or self._gone.get(campaign_id)
        if campaign is not None:
            return campaign
        row = await store.get_any(self._pool, campaign_id)
        if row is None:
            return None
        campaign = Campaign.from_row(row)
        if row["deleted_at"] is not None:
            self._gone[campaign_id] = campaign
        return campaign

    async def find(self, slug: str) -> Campaign | None:
        """A slug not in memory: made a moment ago through another worker, or unknown. One
        Redis read decides; never a PostgreSQL query."""
        if not SLUG.fullmatch(slug):
            return None
        try:
            raw = await self._redis.get(self._keys.campaign(slug))
        except RedisError:
            return None
        if raw is None:
            return None
        try:
            campaign = _campaign_of(orjson.loads(raw))
        except (ValueError, KeyError, TypeError):
            return None
        if campaign.slug != slug:
            return None
        self._set(self._by_slug | {slug: campaign})
        return campaign

    # -- loading ---------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Reload everything if PostgreSQL says something changed; return whether it did."""
        async with self._lock:
            version = await store.version(self._pool)
            if version == self._version:
                return False
            rows = await store.all_live(self._pool)
            self._set({r["slug"]: Campaign.from_row(r) for r in rows})
            self._version = version
            self.loaded = True
        await self._save_snapshot(rows)
        return True

    async def reload(self, campaign_id: int) -> asyncpg.Record | None:
        """Reload one campaign now (announced as changed); everything, if nothing is known
        yet (PostgreSQL answers again). Returns its row (None: deleted)."""
        if not self.loaded:
            await self.refresh()
            return await store.get(self._pool, campaign_id)
        async with self._lock:
            row = await store.get(self._pool, campaign_id)
            by_slug = {slug: c for slug, c in self._by_slug.items() if c.id != campaign_id}
            if row is not None:
                by_slug[row["slug"]] = Campaign.from_row(row)
            self._set(by_slug)
            # The next refresh compares versions again and saves the snapshot.
            self._version = None
        return row

    async def changed(self, campaign_id: int) -> None:
        """Apply a change made here at once, leave the campaign where other workers look for
        a slug they do not know yet, and tell them."""
        old_slugs = {c.slug for c in self._by_slug.values() if c.id == campaign_id}
        row = await self.reload(campaign_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for slug in old_slugs - {row["slug"] if row is not None else ""}:
                    pipe.delete(self._keys.campaign(slug))
                if row is not None:
                    pipe.set(self._keys.campaign(row["slug"]), orjson.dumps(_json_of(row)),
                             ex=RECENT_SECONDS)
                await pipe.execute()
            # Not in the pipeline: a Cluster pipeline carries only commands bound to a slot.
            await self._redis.publish(self._channel, str(campaign_id))
        except RedisError as exc:
            metrics.BACKEND_ERRORS.labels("redis").inc()
            self._warn("redis", exc)

    # -- the snapshot ----------------------------------------------------------------------

    async def _save_snapshot(self, rows: list[Any]) -> None:
        data = orjson.dumps([_json_of(r) for r in rows])
        try:
            await asyncio.to_thread(_write_atomically, self._snapshot, data)
        except OSError as exc:
            log.warning("could not save the campaign snapshot %s: %r", self._snapshot, exc)

    def _load_snapshot(self) -> None:
        try:
            rows = orjson.loads(self._snapshot.read_bytes())
            campaigns = {r["slug"]: _campaign_of(r) for r in rows}
        except FileNotFoundError:
            log.warning("PostgreSQL is away and no campaign snapshot exists yet (%s): links "
                        "answer 503 until PostgreSQL answers", self._snapshot)
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("the campaign snapshot %s is unreadable: %r", self._snapshot, exc)
            return
        self._set(campaigns)
        self.loaded = True
        log.warning("PostgreSQL is away: serving %d campaigns as last known (%s)",
                    len(campaigns), self._snapshot)

    # -- background ------------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        """Every refresh_seconds; sooner, with backoff, until the first load from PostgreSQL."""
        delay = 0.5
        while True:
            await asyncio.sleep(delay if self._version is None else self._refresh_seconds)
            try:
                await self.refresh()
                metrics.BACKEND_UP.labels("postgres").set(1)
                self._recovered("postgres")
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving what we have
                metrics.BACKEND_ERRORS.labels("postgres").inc()
                metrics.BACKEND_UP.labels("postgres").set(0)
                self._warn("postgres", exc)
                delay = min(delay * 2, RETRY_CAP_SECONDS)

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            try:
                await ready(self._redis)
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._recovered("redis")
                    delay = 0.5
                    # Changes announced while we were not subscribed.
                    with contextlib.suppress(Exception):
                        await self.refresh()
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None and message["type"] == "message":
                            with contextlib.suppress(ValueError):
                                await self.reload(int(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep listening through outages
                backend = "redis" if isinstance(exc, RedisError) else "postgres"
                metrics.BACKEND_ERRORS.labels(backend).inc()
                self._warn(backend, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_SECONDS)

    def _warn(self, backend: str, exc: BaseException) -> None:
        # Once per backend and kind of failure, not once per retry: an outage is one line.
        cause = f"{backend}:{type(exc).__name__}"
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning("campaign cache: %s unavailable (%r); retrying", backend, exc)

    def _recovered(self, backend: str) -> None:
        gone = {cause for cause in self._warned if cause.startswith(f"{backend}:")}
        if gone:
            self._warned -= gone
            log.info("campaign cache: %s answers again", backend)


def _json_of(row: Any) -> dict[str, Any]:
    """What a worker needs of a campaign row, as JSON (the snapshot, the Redis copy)."""
    return {k: (str(row[k]) if k == "cost_value" else row[k]) for k in SNAPSHOT_FIELDS}


def _campaign_of(data: dict[str, Any]) -> Campaign:
    return Campaign.from_row(data | {"cost_value": Decimal(data["cost_value"])})


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (several workers write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{time.monotonic_ns()}")
    with open(partial, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
