"""PostgreSQL connections: one pool per worker, JSON columns decoded with orjson."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson


async def init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
        )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection,
        # Reports and lookups may wait this long; beyond it a request gets a clean 503.
        command_timeout=30,
    )
    return pool


PING = "SELECT 1"


async def ping(pool: asyncpg.Pool) -> None:
    await pool.fetchval(PING)


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn
