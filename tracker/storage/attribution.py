"""A conversion's touches: the clicks of its visitor, or of its customer on any device, in the
lookback window before it (tracker/attribution.py credits them).

One statement, both indexes: PostgreSQL answers the OR with a BitmapOr of clicks_visitor and
clicks_customer in each daily partition the window overlaps, and prunes the rest by ts (at
plan time, or at executor start when a cached generic plan is reused). Measured in one run
against a UNION and a UNION ALL of two index scans (300k clicks, 65 daily partitions, a
30-day window):
the same partitions and indexes, the same execution time, and the OR plans fastest (median
3.9 ms against 6.0 and 6.5: one Append over the partitions instead of two).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from ..attribution import Touch
from ..ids import uuid_to_id

COLUMNS = "id, ts, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, is_bot"

# Newest first, then turned around: when a path has more touches than the limit, the ones
# nearest the conversion (the converting click, last_click's whole answer) are those kept.
# `customer_id <> ''` is written out, not left to $2: it is what lets the planner use the
# partial index clicks_customer, and it keeps the clicks of every anonymous customer apart.
TOUCHES = f"""
SELECT {COLUMNS}
FROM clicks
WHERE (visitor_id = $1 OR (customer_id <> '' AND customer_id = $2))
  AND ts >= $3 AND ts <= $4
  AND NOT is_bot
ORDER BY ts DESC, id DESC
LIMIT $5
"""

# One click as a touch, by its id and time (the time names its partition), bots included:
# the click a conversion is attributed to is shown whatever it was flagged.
CLICK = f"SELECT {COLUMNS} FROM clicks WHERE id = $1 AND ts = $2"

async def touches(pool: asyncpg.Pool | asyncpg.Connection, visitor_id: str, customer_id: str,
                  before: datetime, lookback: timedelta, limit: int = 1000) -> list[Touch]:
    """The clicks (not bots) of `visitor_id` or of `customer_id` with a time in
    [before - lookback, before], oldest first; the newest `limit` of them when there are more."""
    # A conversion that came without a visitor ('') must not match every click that has
    # none either: NULL equals nothing.
    rows = await pool.fetch(TOUCHES, visitor_id or None, customer_id, before - lookback,
                            before, limit)
    return [touch(row) for row in reversed(rows)]


async def click(pool: asyncpg.Pool | asyncpg.Connection, click_uuid: UUID,
                ts: datetime) -> Touch | None:
    """The click `click_uuid` made at `ts` as a touch, or None when it is not in PostgreSQL
    (yet: a conversion can arrive before the batch writer has stored its click)."""
    row = await pool.fetchrow(CLICK, click_uuid, ts)
    return None if row is None else touch(row)


def touch(row: asyncpg.Record) -> Touch:
    return Touch(
        click_id=uuid_to_id(row["id"]), ts=row["ts"], campaign_id=row["campaign_id"],
        pub=row["pub"], sub1=row["sub1"], sub2=row["sub2"], sub3=row["sub3"],
        sub4=row["sub4"], sub5=row["sub5"], is_bot=row["is_bot"],
    )
