"""Exchange rates: on `day`, 1 `base` = `rate` `quote` (sql/004_conversions.sql)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import asyncpg

# Setting a rate again for the same day replaces it: the operator corrects a typo.
UPSERT = """
INSERT INTO fx_rates (day, base, quote, rate)
SELECT $1::date, $2::text, t.quote, t.rate
FROM unnest($3::text[], $4::numeric[]) AS t(quote, rate)
ON CONFLICT (base, quote, day) DO UPDATE SET rate = EXCLUDED.rate, updated_at = now()
RETURNING day, base, quote, rate, updated_at"""

# The rate of each pair in force on a day: the latest dated that day or before.
IN_FORCE = """
SELECT DISTINCT ON (base, quote) day, base, quote, rate, updated_at
FROM fx_rates
WHERE day <= $1 AND ($2::text IS NULL OR base = $2)
ORDER BY base, quote, day DESC"""

# Every rate in force on a day that names either currency: enough for the direct pair, the
# inverse one and every common base, in one round trip.
TOUCHING = """
SELECT DISTINCT ON (base, quote) day, base, quote, rate
FROM fx_rates
WHERE day <= $1 AND (base = ANY($2::text[]) OR quote = ANY($2::text[]))
ORDER BY base, quote, day DESC"""


async def upsert(conn: asyncpg.Connection | asyncpg.Pool, day: date, base: str,
                 rates: dict[str, Decimal]) -> list[asyncpg.Record]:
    quotes = list(rates)
    rows: list[asyncpg.Record] = await conn.fetch(
        UPSERT, day, base, quotes, [rates[q] for q in quotes])
    return rows


async def in_force(conn: asyncpg.Connection | asyncpg.Pool, day: date,
                   base: str | None = None) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(IN_FORCE, day, base)
    return rows


async def touching(conn: asyncpg.Connection | asyncpg.Pool, day: date,
                   currencies: list[str]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(TOUCHING, day, currencies)
    return rows
