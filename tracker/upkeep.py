"""Partition upkeep: every worker keeps the daily partitions made ahead and applies retention,
in a background task of its own: at once, then hourly.

Upkeep never holds a worker back nor stops it: a worker answers redirects whether or not
PostgreSQL is there, and the days ahead exist long before they are needed. While PostgreSQL
does not answer, a pass is retried with capped backoff. A table and day that PostgreSQL
refuses is logged once, counted in tracker_backend_errors_total{backend="postgres"} each
time, and tried again at the next pass; the other days are made all the same.

Every instance runs upkeep, possibly at the same moment: each step takes the one partitions
lock, and a step whose lock another instance holds waits for it without holding anything
(storage/partitions.py). A partition is made once, a day's DEFAULT rows are moved once, an
old partition is dropped once, whoever gets there first; the others find it done. A step
still busy after partitions.WAIT is left for the next pass: another instance is at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

from . import metrics
from .storage import partitions
from .storage.db import GONE, UNREACHABLE

log = logging.getLogger(__name__)

EVERY = 3600.0
DAYS_BACK = 2
RETRY_FIRST = 1.0
RETRY_MAX = 60.0

# PostgreSQL going or gone (storage/db.py): the pass is retried with backoff rather than
# blamed on one day.
# What fails one step (one table and day, one retention step) and no other: an error
# PostgreSQL answered with, or a statement past the pool's command timeout (a day with very
# many DEFAULT rows to move), which asyncpg cancels on the server. Retrying that one at once,
# with backoff, would hold the parent's lock again and again: it waits for the next pass.
STEP_FAILED = (asyncpg.PostgresError, asyncio.TimeoutError)


@dataclass
class Pass:
    """What one pass did (what other instances did meanwhile is theirs)."""

    created: int = 0
    moved: int = 0
    dropped: int = 0
    pruned: int = 0


class PartitionUpkeep:
    def __init__(self, pool: asyncpg.Pool, *, days_ahead: int, retention_days: int,
                 every: float = EVERY, retry_first: float = RETRY_FIRST,
                 retry_max: float = RETRY_MAX) -> None:
        self._pool = pool
        self._days_ahead = days_ahead
        self._retention_days = retention_days
        self._every = every
        self._retry_first = retry_first
        self._retry_max = retry_max
        # Never make a day that retention would drop at once.
        self._days_back = min(DAYS_BACK, retention_days) if retention_days else DAYS_BACK
        # Tables and days that failed and were logged: a day that keeps failing is logged once.
        self._failed: set[tuple[str, date]] = set()
        self._task: asyncio.Task[None] | None = None
        # The UTC day the last complete pass counted from (None until one completes).
        self.last_pass: date | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="partition-upkeep")

    async def stop(self) -> None:
        # Cancelling mid-statement is safe: each step is one transaction, rolled back.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        retry = self._retry_first
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - upkeep must outlive any one failure
                metrics.BACKEND_ERRORS.labels("postgres").inc()
                if not isinstance(exc, UNREACHABLE):
                    log.exception("partition upkeep failed; retrying in %.0f s", retry)
                elif retry == self._retry_first:  # once per outage, not once per try
                    log.warning("partition upkeep: PostgreSQL unreachable (%s: %s); retrying "
                                "with backoff", type(exc).__name__, exc)
                await asyncio.sleep(retry)
                retry = min(retry * 2, self._retry_max)
                continue
            retry = self._retry_first
            await asyncio.sleep(self._every)

    async def run_once(self, today: date | None = None) -> Pass:
        """One pass: every table and day from DAYS_BACK ago to days_ahead ahead, then
        retention. Raises only when PostgreSQL cannot be reached."""
        today = today or datetime.now(UTC).date()
        done = Pass()
        async with self._pool.acquire() as conn:
            for table in partitions.TABLES:
                for offset in range(-self._days_back, self._days_ahead + 1):
                    moved = await self._create(conn, table, today + timedelta(days=offset))
                    if moved is not None:
                        done.created += 1
                        done.moved += moved
            if self._retention_days:
                done.dropped, done.pruned = await self._retention(conn)
        oldest = today - timedelta(days=self._days_back)
        self._failed = {(t, d) for t, d in self._failed if d >= oldest}
        self.last_pass = today
        return done

    async def _create(self, conn: asyncpg.Connection, table: str, day: date) -> int | None:
        """The rows the new partition took over from DEFAULT; None when it made none."""
        name = partitions.partition_name(table, day)
        try:
            moved = await partitions.create_partition(conn, table, day)
        except partitions.Busy:
            log.info("partition %s: another instance held the partitions lock throughout; "
                     "left for the next pass", name)
            return None
        except STEP_FAILED as exc:
            if isinstance(exc, GONE):
                raise
            metrics.BACKEND_ERRORS.labels("postgres").inc()
            if (table, day) not in self._failed:
                self._failed.add((table, day))
                log.warning("could not create partition %s (tried again each upkeep, logged "
                            "once): %s: %s", name, type(exc).__name__, exc)
            return None
        if (table, day) in self._failed:
            self._failed.discard((table, day))
            log.info("partition %s is there now", name)
        if moved:
            log.info("created partition %s (took %d rows over from %s_default)",
                     name, moved, table)
        elif moved is not None:
            log.debug("created partition %s", name)
        return moved

    async def _retention(self, conn: asyncpg.Connection) -> tuple[int, int]:
        # Two steps, two transactions: a drop that fails does not keep DEFAULT from pruning.
        dropped = await self._retention_step(conn, partitions.drop_partitions, "partition drop")
        deleted = await self._retention_step(conn, partitions.prune_default, "DEFAULT pruning")
        if dropped or deleted:
            log.info("retention: dropped %d partitions and %d DEFAULT rows older than %d days",
                     dropped, deleted, self._retention_days)
        return dropped, deleted

    async def _retention_step(self, conn: asyncpg.Connection,
                              step: Callable[[asyncpg.Connection, int], Awaitable[int]],
                              what: str) -> int:
        try:
            return await step(conn, self._retention_days)
        except partitions.Busy:
            log.info("%s: another instance held the partitions lock throughout; left for "
                     "the next pass", what)
            return 0
        except STEP_FAILED as exc:
            if isinstance(exc, GONE):
                raise
            metrics.BACKEND_ERRORS.labels("postgres").inc()
            log.warning("%s failed (tried again next upkeep): %s: %s",
                        what, type(exc).__name__, exc)
            return 0
