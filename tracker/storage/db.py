"""PostgreSQL connections: one pool per worker, JSON columns decoded with orjson.

Behind PgBouncer in transaction mode, each transaction may run on another server connection:
nothing may outlive a transaction on the server. The service keeps no session state (no temp
tables, session advisory locks, LISTEN or SET); what asyncpg keeps is its cache of prepared
statements, which `?pgbouncer=true` in DATABASE_URL turns off (the parameter other tools use
for this; ours, taken out before asyncpg reads the URL). Off by default: a cached statement
saves a round trip and a parse, and halved the time of a click lookup here.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

# PostgreSQL going or gone, and not answering at all: what callers wait out or answer 503
# for, rather than blame on a statement.
GONE = (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)
UNREACHABLE = GONE + (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)


POOLER = "pgbouncer"
_YES, _NO = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def options(dsn: str) -> tuple[str, dict[str, Any]]:
    """(the URL asyncpg is given, keyword arguments for asyncpg) for DATABASE_URL."""
    parts = urlsplit(dsn)
    pairs = [p for p in parts.query.split("&") if p]
    ours = [p.partition("=")[2].lower() for p in pairs if p.partition("=")[0] == POOLER]
    if not ours:
        return dsn, {}
    if ours[-1] not in _YES + _NO:
        raise ValueError(f"DATABASE_URL: {POOLER}= must be true or false, not {ours[-1]!r}")
    rest = "&".join(p for p in pairs if p.partition("=")[0] != POOLER)
    plain = urlunsplit(parts._replace(query=rest))
    return plain, ({"statement_cache_size": 0} if ours[-1] in _YES else {})


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
    dsn, pooled = options(dsn)
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=0, max_size=max_size, init=init_connection, reset=_no_reset,
        timeout=CONNECT_TIMEOUT,
        # Reports and lookups may wait this long; beyond it a request gets a clean 503.
        command_timeout=30, **pooled,
    )
    return pool


PING = "SELECT 1"


async def ping(pool: asyncpg.Pool) -> None:
    await pool.fetchval(PING)


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    kwargs.setdefault("timeout", CONNECT_TIMEOUT)
    dsn, pooled = options(dsn)
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **(pooled | kwargs))
    await init_connection(conn)
    return conn
