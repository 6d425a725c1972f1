"""Daily partitions of the event tables: made one table and day at a time, dropped by
retention (sql/003_partitions.sql). Each call is one statement, so one transaction: a day that
cannot be made does not stop the others."""

from __future__ import annotations

from datetime import date

import asyncpg

# The partitioned event tables, each with a `<table>_default` partition.
TABLES = ("clicks", "impressions")

CREATE_PARTITION = "SELECT tracker_create_partition($1, $2)"
DROP_PARTITIONS = "SELECT tracker_drop_partitions($1)"
PRUNE_DEFAULT = "SELECT tracker_prune_default($1)"


def partition_name(table: str, day: date) -> str:
    return f"{table}_{day:%Y%m%d}"


async def create_partition(conn: asyncpg.Connection | asyncpg.Pool, table: str,
                           day: date) -> int | None:
    """Make `table`'s partition for the UTC `day`, taking over that day's rows from DEFAULT.
    Returns None when it already existed, else how many rows it took over."""
    moved: int | None = await conn.fetchval(CREATE_PARTITION, table, day)
    return moved


async def drop_partitions(conn: asyncpg.Connection | asyncpg.Pool, keep_days: int) -> int:
    """Drop whole daily partitions older than `keep_days`; return how many."""
    dropped: int = await conn.fetchval(DROP_PARTITIONS, keep_days)
    return dropped


async def prune_default(conn: asyncpg.Connection | asyncpg.Pool, keep_days: int) -> int:
    """Delete DEFAULT partitions' rows older than `keep_days`; return how many."""
    deleted: int = await conn.fetchval(PRUNE_DEFAULT, keep_days)
    return deleted
