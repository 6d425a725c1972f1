"""Campaign rows."""

from __future__ import annotations

from typing import Any

import asyncpg

COLUMNS = """id, slug, name, destination_url, rotation, fallback_url, cost_model, cost_value,
    currency, payouts, postback_url, status, postback_token, postback_secrets, postback_on,
    created_at, updated_at"""
WRITABLE = ("slug", "name", "destination_url", "rotation", "fallback_url", "cost_model",
            "cost_value", "currency", "payouts", "postback_url", "status", "postback_token",
            "postback_secrets", "postback_on")

GET = f"SELECT {COLUMNS} FROM campaigns WHERE id = $1 AND deleted_at IS NULL"
GET_FOR_UPDATE = GET + " FOR UPDATE"
# Deleted ones too: a click made before its campaign was deleted may still convert.
GET_ANY = f"SELECT {COLUMNS}, deleted_at FROM campaigns WHERE id = $1"
LIST_PAGE = f"""
SELECT {COLUMNS} FROM campaigns
WHERE deleted_at IS NULL AND id > $1
ORDER BY id LIMIT $2"""
ALL_LIVE = f"SELECT {COLUMNS} FROM campaigns WHERE deleted_at IS NULL"
# One digest of every campaign's (id, updated_at), deleted ones included: it changes with any
# committed change, whatever order transactions commit in (a max(updated_at) would miss a
# change committed after a later one).
VERSION = """
SELECT md5(coalesce(string_agg(id::text || ':' || updated_at::text, ',' ORDER BY id), ''))
FROM campaigns"""
SOFT_DELETE = """
UPDATE campaigns SET deleted_at = now(), updated_at = now()
WHERE id = $1 AND deleted_at IS NULL RETURNING slug"""
LABELS_BY_IDS = "SELECT id, slug, name, currency FROM campaigns WHERE id = ANY($1::bigint[])"
SHARED_CURRENCY = """SELECT CASE WHEN min(currency) = max(currency) THEN min(currency) END
FROM campaigns WHERE $1::bigint[] IS NULL OR id = ANY($1::bigint[])"""
IDS_BY_SLUG_OR_ID = "SELECT id FROM campaigns WHERE slug = $1 OR id::text = $1"


class SlugTaken(Exception):
    pass


async def insert(conn: asyncpg.Connection | asyncpg.Pool, values: dict[str, Any]) -> asyncpg.Record:
    names = [n for n in WRITABLE if n in values]
    sql = (f"INSERT INTO campaigns ({', '.join(names)}) "
           f"VALUES ({', '.join(f'${i}' for i in range(1, len(names) + 1))}) "
           f"RETURNING {COLUMNS}")
    try:
        row: asyncpg.Record = await conn.fetchrow(sql, *(values[n] for n in names))
    except asyncpg.UniqueViolationError:
        raise SlugTaken(values.get("slug")) from None
    return row


async def update(conn: asyncpg.Connection, campaign_id: int, values: dict[str, Any]) -> asyncpg.Record | None:
    names = [n for n in WRITABLE if n in values]
    sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
    sql = (f"UPDATE campaigns SET {sets}, updated_at = now() "
           f"WHERE id = $1 AND deleted_at IS NULL RETURNING {COLUMNS}")
    try:
        row: asyncpg.Record | None = await conn.fetchrow(sql, campaign_id, *(values[n] for n in names))
    except asyncpg.UniqueViolationError:
        raise SlugTaken(values.get("slug")) from None
    return row


async def get(conn: asyncpg.Connection | asyncpg.Pool, campaign_id: int,
              *, for_update: bool = False) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        GET_FOR_UPDATE if for_update else GET, campaign_id)
    return row


async def list_page(pool: asyncpg.Pool, after_id: int, limit: int) -> list[asyncpg.Record]:
    return list(await pool.fetch(LIST_PAGE, after_id, limit))


async def all_live(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch(ALL_LIVE))


async def version(pool: asyncpg.Pool) -> str:
    digest: str = await pool.fetchval(VERSION)
    return digest


async def soft_delete(pool: asyncpg.Pool, campaign_id: int) -> str | None:
    slug: str | None = await pool.fetchval(SOFT_DELETE, campaign_id)
    return slug


async def labels(pool: asyncpg.Pool, ids: list[int]) -> dict[int, tuple[str, str, str]]:
    """(slug, name, currency) of campaigns, deleted ones included: their past still reports."""
    rows = await pool.fetch(LABELS_BY_IDS, ids)
    return {r["id"]: (r["slug"], r["name"], r["currency"]) for r in rows}


async def shared_currency(pool: asyncpg.Pool, ids: list[int] | None) -> str | None:
    """The currency every campaign of `ids` (None: every campaign, deleted ones too) has, or
    None when they have more than one."""
    currency: str | None = await pool.fetchval(SHARED_CURRENCY, ids)
    return currency


async def ids_matching(pool: asyncpg.Pool, slug_or_id: str) -> list[int]:
    """Campaigns a report filter names, by slug or id; deleted ones too (their past counts)."""
    return [r["id"] for r in await pool.fetch(IDS_BY_SLUG_OR_ID, slug_or_id)]


async def get_any(conn: asyncpg.Connection | asyncpg.Pool, campaign_id: int) -> asyncpg.Record | None:
    """A campaign by id, deleted or not."""
    row: asyncpg.Record | None = await conn.fetchrow(GET_ANY, campaign_id)
    return row
