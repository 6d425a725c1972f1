"""Outbound postback deliveries: the outbox (postback_deliveries) and the tries made for each
(postback_tries). Rows are made by the batch writer with the conversion's change; here they
are claimed, their tries recorded, released and read back. Why an outbox: see
tracker/outbound/deliverer.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ..outbound.retry import Outcome

# One statement: the rows are locked only while it runs (SKIP LOCKED lets other deliverers
# pass them by meanwhile), and what keeps them ours afterwards is the lease: next_try_at
# pushed past the try's timeout. A deliverer that dies mid-try leaves the row due again
# once the lease is over, so it is retried, never lost.
CLAIM = """
WITH due AS (
    SELECT id FROM postback_deliveries
    WHERE state = 'pending' AND next_try_at <= now()
    ORDER BY next_try_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE postback_deliveries d
SET next_try_at = now() + make_interval(secs => $2)
FROM due WHERE d.id = due.id
RETURNING d.id, d.conversion_id, d.version, d.url, d.tries, d.created_at
"""

# Fenced by the try count: a late answer from a deliverer whose lease ran out (another one
# has claimed the row and made this try since, or the delivery is over) changes nothing.
FINISH_TRY = """
UPDATE postback_deliveries
SET tries = $2,
    state = $3,
    next_try_at = coalesce($4, next_try_at),
    finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END,
    last_error = $5
WHERE id = $1 AND tries = $2 - 1 AND state = 'pending'
"""

INSERT_TRY = """
INSERT INTO postback_tries (delivery_id, n, ts, http_status, latency_ms, error)
VALUES ($1, $2, $3, $4, $5, $6)
"""

# A deliverer leaving with tries cut short hands their rows back at once, rather than
# leaving them leased; only rows that no one has tried since.
RELEASE = """
UPDATE postback_deliveries d
SET next_try_at = now()
FROM unnest($1::bigint[], $2::integer[]) AS held (id, tries)
WHERE d.id = held.id AND d.tries = held.tries AND d.state = 'pending'
"""

FOR_CONVERSION = """
SELECT d.id, d.version, d.url, d.state, d.next_try_at, d.created_at, d.finished_at,
       d.last_error, t.n, t.ts, t.http_status, t.latency_ms, t.error
FROM postback_deliveries d
LEFT JOIN postback_tries t ON t.delivery_id = d.id
WHERE d.conversion_id = $1
ORDER BY d.version, d.id, t.n
"""

STATE_AFTER = {
    Outcome.DELIVERED: "delivered",
    Outcome.RETRY: "pending",
    Outcome.FAILED: "failed",
    Outcome.REFUSED: "failed",
}


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: what a try needs."""

    id: int
    conversion_id: UUID
    version: int
    url: str
    tries: int
    created_at: datetime


async def claim(db: asyncpg.Pool | asyncpg.Connection, limit: int,
                lease_seconds: float) -> list[Delivery]:
    """Up to `limit` due deliveries, oldest due first, leased for `lease_seconds`."""
    rows = await db.fetch(CLAIM, limit, float(lease_seconds))
    return [Delivery(r["id"], r["conversion_id"], r["version"], r["url"], r["tries"],
                     r["created_at"]) for r in rows]


async def record_try(conn: asyncpg.Connection, delivery_id: int, n: int,
                     http_status: int | None, latency_ms: float, error: str | None,
                     outcome: Outcome, next_try_at: datetime | None, *,
                     at: datetime) -> bool:
    """Keep try `n` (made at `at`) and move the delivery on: delivered, failed, or pending
    until `next_try_at`. False, recording nothing, when try `n` is no longer ours to record
    (the lease ran out and the row moved on without us)."""
    if outcome is Outcome.DELIVERED:
        last_error = None
    else:
        last_error = error or (f"HTTP {http_status}" if http_status is not None else None)
    async with conn.transaction():
        done = await conn.execute(FINISH_TRY, delivery_id, n, STATE_AFTER[outcome],
                                  next_try_at if outcome is Outcome.RETRY else None, last_error)
        if done != "UPDATE 1":
            return False
        await conn.execute(INSERT_TRY, delivery_id, n, at, http_status,
                           round(latency_ms, 3), error)
    return True


async def release(db: asyncpg.Pool | asyncpg.Connection,
                  held: Sequence[tuple[int, int]]) -> None:
    """Make (delivery id, tries when claimed) due now: tries abandoned when leaving."""
    if held:
        await db.execute(RELEASE, [i for i, _ in held], [t for _, t in held])


async def for_conversion(db: asyncpg.Pool | asyncpg.Connection,
                         conversion_id: UUID) -> list[dict[str, Any]]:
    """The conversion's deliveries (one per version that called the postback URL), with
    every try, ready for JSON."""
    deliveries: dict[int, dict[str, Any]] = {}
    for row in await db.fetch(FOR_CONVERSION, conversion_id):
        delivery = deliveries.get(row["id"])
        if delivery is None:
            pending = row["state"] == "pending"
            delivery = deliveries[row["id"]] = {
                "id": row["id"],
                "version": row["version"],
                "url": row["url"],
                "state": row["state"],
                "tries": [],
                "next_try_at": _iso(row["next_try_at"]) if pending else None,
                "created_at": _iso(row["created_at"]),
                "finished_at": _iso(row["finished_at"]),
                "last_error": row["last_error"],
            }
        if row["n"] is not None:
            latency = row["latency_ms"]
            delivery["tries"].append({
                "n": row["n"],
                "time": _iso(row["ts"]),
                "http_status": row["http_status"],
                "latency_ms": float(latency) if latency is not None else None,
                "error": row["error"],
            })
    return list(deliveries.values())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
