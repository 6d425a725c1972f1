"""Events PostgreSQL refused, kept with the reason; replayed once the cause is fixed."""

from __future__ import annotations

from typing import Any

import asyncpg

COUNT_BY_ERROR = """
SELECT left(error, 120) AS error, count(*) AS events, min(created_at) AS first, max(created_at) AS last
FROM dead_letters GROUP BY 1 ORDER BY 2 DESC"""
LAST_ID = "SELECT coalesce(max(id), 0) FROM dead_letters"
TAKE = """
SELECT id, payload FROM dead_letters WHERE id <= $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"""
FORGET = "DELETE FROM dead_letters WHERE id = ANY($1::bigint[])"


async def summary(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(COUNT_BY_ERROR))


async def last_id(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval(LAST_ID)
    return value


async def take(conn: asyncpg.Connection, limit: int, up_to: int) -> list[asyncpg.Record]:
    """Rows to replay, oldest first, none newer than `up_to`; locked until the caller's
    transaction ends."""
    return list(await conn.fetch(TAKE, limit, up_to))


async def forget(conn: asyncpg.Connection, ids: list[Any]) -> None:
    await conn.execute(FORGET, ids)
