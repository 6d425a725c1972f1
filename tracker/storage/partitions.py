"""Daily partitions of the event tables: made one table and day at a time, dropped by
retention (sql/003_partitions.sql, sql/006_partition_try_locks.sql). Each call is one
statement, so one transaction: a day that cannot be made does not stop the others.

Every step takes the one partitions lock without waiting for it in PostgreSQL (a transaction
waiting on a lock would hold a server connection, one of PgBouncer's few): when another
instance holds it, the step is tried again after a short pause, holding nothing meanwhile,
for up to `wait` seconds, then raises Busy."""

from __future__ import annotations

import asyncio
import time
from datetime import date

import asyncpg

# The partitioned event tables, each with a `<table>_default` partition.
TABLES = ("clicks", "impressions")

CREATE_PARTITION = "SELECT tracker_create_partition($1, $2)"
DROP_PARTITIONS = "SELECT tracker_drop_partitions($1)"
PRUNE_DEFAULT = "SELECT tracker_prune_default($1)"
# What the functions answer when another instance holds the partitions lock.
BUSY = -1
# A step is usually over in milliseconds; moving a day's DEFAULT rows can take seconds.
WAIT = 30.0
PAUSE_FIRST = 0.02
PAUSE_MAX = 0.5


class Busy(Exception):
    """Another instance held the partitions lock all the time we waited."""


async def _step(conn: asyncpg.Connection | asyncpg.Pool, query: str, *args: object,
                wait: float) -> int | None:
    deadline = time.monotonic() + wait
    pause = PAUSE_FIRST
    while True:
        answer: int | None = await conn.fetchval(query, *args)
        if answer != BUSY:
            return answer
        if time.monotonic() + pause > deadline:
            raise Busy(f"{query} {args}: another instance held the partitions lock")
        await asyncio.sleep(pause)
        pause = min(pause * 2, PAUSE_MAX)


def partition_name(table: str, day: date) -> str:
    return f"{table}_{day:%Y%m%d}"


async def create_partition(conn: asyncpg.Connection | asyncpg.Pool, table: str, day: date, *,
                           wait: float = WAIT) -> int | None:
    """Make `table`'s partition for the UTC `day`, taking over that day's rows from DEFAULT.
    Returns None when it already existed, else how many rows it took over."""
    return await _step(conn, CREATE_PARTITION, table, day, wait=wait)


async def drop_partitions(conn: asyncpg.Connection | asyncpg.Pool, keep_days: int, *,
                          wait: float = WAIT) -> int:
    """Drop whole daily partitions older than `keep_days`; return how many."""
    return await _step(conn, DROP_PARTITIONS, keep_days, wait=wait) or 0


async def prune_default(conn: asyncpg.Connection | asyncpg.Pool, keep_days: int, *,
                        wait: float = WAIT) -> int:
    """Delete DEFAULT partitions' rows older than `keep_days`; return how many."""
    return await _step(conn, PRUNE_DEFAULT, keep_days, wait=wait) or 0
