"""`tracker dead-letters [--replay]`: what PostgreSQL refused, and putting it back.

A replay appends each kept event to the stream again and forgets it, in one transaction per
chunk: an event the writers refuse again comes back to dead_letters, one they now accept is
stored once (its id is fixed, so a replay repeated after a crash counts nothing twice).
"""

from __future__ import annotations

from .redis_client import connect
from .redis_keys import keys_for
from .settings import Settings
from .storage import db
from .storage import dead_letters as store

CHUNK = 1000


async def show(database_url: str) -> str:
    conn = await db.connect(database_url)
    try:
        rows = await store.summary(conn)
    finally:
        await conn.close()
    if not rows:
        return "no dead letters"
    return "\n".join(f"{r['events']:>8}  {r['first']:%Y-%m-%d %H:%M} .. {r['last']:%Y-%m-%d %H:%M}  {r['error']}"
                     for r in rows)


async def replay(settings: Settings) -> int:
    """Put every dead letter present now back into the stream; return how many.

    Only those present when the replay starts: an event the writers refuse again comes back
    as a new row while we work, and chasing it would replay forever."""
    conn = await db.connect(settings.database_url)
    redis = connect(settings.redis_url, max_connections=4, timeout=10.0)
    stream = keys_for(settings).stream
    replayed = 0
    try:
        up_to = await store.last_id(conn)
        while True:
            async with conn.transaction():
                rows = await store.take(conn, CHUNK, up_to)
                if not rows:
                    return replayed
                async with redis.pipeline(transaction=False) as pipe:
                    for row in rows:
                        pipe.xadd(stream, {"e": row["payload"].encode()})
                    await pipe.execute()
                await store.forget(conn, [row["id"] for row in rows])
            replayed += len(rows)
    finally:
        await conn.close()
        await redis.aclose()
