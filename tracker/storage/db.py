"""PostgreSQL connections: one pool per worker, JSON columns decoded with orjson."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson

# PostgreSQL going or gone, and not answering at all: what callers wait out or answer 503
# for, rather than blame on a statement.
GONE = (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)
UNREACHABLE = GONE + (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)


async def init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
        )


# A server that does not answer a connection attempt (down, firewalled) costs this long.
CONNECT_TIMEOUT = 5.0


async def _no_reset(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool beyond asyncpg's own rollback
    of an open transaction: nothing. Our pooled sessions keep no state (no LISTEN, no session
    advisory locks, no SET), and asyncpg's default (`RESET ALL; UNLISTEN *; ...`) is one more
    round trip that every pooled query waits for: a third of a click lookup's time."""


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    """A pool that connects on first use, not at creation: a worker starts, and serves
    redirects, while PostgreSQL is away."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=0, max_size=max_size, init=init_connection, reset=_no_reset,
        timeout=CONNECT_TIMEOUT,
        # Reports and lookups may wait this long; beyond it a request gets a clean 503.
        command_timeout=30,
    )
    return pool


PING = "SELECT 1"


async def ping(pool: asyncpg.Pool) -> None:
    await pool.fetchval(PING)


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    kwargs.setdefault("timeout", CONNECT_TIMEOUT)
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn
