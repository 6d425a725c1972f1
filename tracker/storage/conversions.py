"""Conversion rows: written by the batch writer, read by lookups and the recorder.

A batch may hold several versions of one conversion, and two writers may hold versions of
the same conversion at once, in any order. So the row keeps whichever version is highest,
the history keeps every version once, and the rollups get, for each row that changed, its
new contribution minus its old one. The rows a batch touches are locked first (advisory
locks on their ids, in id order), so the old state read is the committed one and two
writers never fold the same change twice; locks are taken after the click fold and before
the conversion fold in every transaction, one order for all, so writers never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg

COLUMNS = (
    "id", "version", "click_id", "click_ts", "campaign_id", "event", "txid", "status",
    "old_status", "raw_status", "amount", "currency", "revenue", "cost", "order_value",
    "customer_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5", "country",
    "device", "source", "created_at", "ts", "source_net", "postback",
)

TYPES = {"id": "uuid", "version": "integer", "click_id": "uuid", "click_ts": "timestamptz",
         "campaign_id": "bigint", "created_at": "timestamptz", "ts": "timestamptz"}
# The batch's versions as one array per column (text unless named above; PostgreSQL casts the
# amounts and the network): per-transaction state only, so no temp table and no session.
INCOMING = "unnest({}) AS incoming ({})".format(
    ", ".join(f"${i}::{TYPES.get(c, 'text')}[]" for i, c in enumerate(COLUMNS, 1)),
    ", ".join(COLUMNS))

# Two-key advisory locks (class 7311): a space of their own, apart from the single-key
# locks of migrations and partition upkeep. Transaction-level: released at COMMIT.
LOCK_BATCH = """
SELECT count(pg_advisory_xact_lock(7311, hashtext(id::text)))
FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS ids (id) ORDER BY id) ids
"""

BUCKET = "date_bin('15 minutes', {ts}, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
DIMS = "pub, sub1, sub2, sub3, sub4, sub5, country, device"

# Runs after LOCK_BATCH, as its own statement: its snapshot then holds every committed change
# of the locked rows.
APPLY = f"""
WITH staged AS (
    SELECT id, version, click_id, click_ts, campaign_id, event, txid, status, old_status,
           raw_status, amount::numeric AS amount, upper(currency) AS currency,
           revenue::numeric AS revenue, cost::numeric AS cost,
           nullif(order_value, '')::numeric AS order_value, customer_id, visitor_id,
           {DIMS}, source, created_at, ts, source_net::cidr AS source_net, postback
    FROM {INCOMING}
), latest AS (
    SELECT DISTINCT ON (id) * FROM staged ORDER BY id, version DESC
), old AS (
    SELECT c.id, c.status, c.revenue, c.cost FROM conversions c JOIN latest l USING (id)
), applied AS (
    INSERT INTO conversions AS c (id, click_id, click_ts, campaign_id, event, txid, version,
        status, raw_status, amount, currency, revenue, cost, order_value, customer_id,
        visitor_id, {DIMS}, source, created_at, updated_at)
    SELECT id, click_id, click_ts, campaign_id, event, txid, version, status, raw_status,
           amount, currency, revenue, cost, order_value, customer_id, visitor_id, {DIMS},
           source, created_at, ts
    FROM latest
    ON CONFLICT (id) DO UPDATE SET
        version = excluded.version, status = excluded.status,
        raw_status = excluded.raw_status, amount = excluded.amount,
        currency = excluded.currency, revenue = excluded.revenue, cost = excluded.cost,
        order_value = excluded.order_value, customer_id = excluded.customer_id,
        updated_at = excluded.updated_at, written_at = now()
    WHERE c.version < excluded.version
    RETURNING c.id, c.status, c.revenue, c.cost, c.campaign_id, c.event, c.created_at,
              c.click_ts, {", ".join("c." + d for d in DIMS.split(", "))}
), history AS (
    INSERT INTO conversion_history (conversion_id, version, ts, old_status, new_status,
                                    raw_status, amount, currency, revenue, source_net, source)
    SELECT id, version, ts, old_status, status, raw_status, amount, currency, revenue,
           source_net, source
    FROM staged
    ON CONFLICT DO NOTHING
    RETURNING conversion_id, version
), deliveries AS (
    INSERT INTO postback_deliveries (conversion_id, version, campaign_id, url, created_at,
                                     next_try_at)
    SELECT s.id, s.version, s.campaign_id, s.postback, now(), now()
    FROM staged s JOIN history h ON h.conversion_id = s.id AND h.version = s.version
    WHERE s.postback <> ''
    ORDER BY s.id, s.version
    ON CONFLICT DO NOTHING
    RETURNING 1
), changes AS (
    -- What each changed row adds: its new contribution minus its old one.
    SELECT a.campaign_id, a.event, a.created_at, a.click_ts,
           {", ".join("a." + d for d in DIMS.split(", "))},
           (a.status = 'approved')::int - coalesce((o.status = 'approved')::int, 0) AS conversions,
           (CASE WHEN a.status = 'approved' THEN a.revenue ELSE 0 END)
             - (CASE WHEN o.status = 'approved' THEN o.revenue ELSE 0 END) AS revenue,
           (a.status = 'pending')::int - coalesce((o.status = 'pending')::int, 0) AS pending,
           (CASE WHEN a.status = 'pending' THEN a.revenue ELSE 0 END)
             - (CASE WHEN o.status = 'pending' THEN o.revenue ELSE 0 END) AS pending_revenue,
           a.cost - coalesce(o.cost, 0) AS cost
    FROM applied a LEFT JOIN old o USING (id)
), folded AS (
    INSERT INTO conversion_rollup_15m AS r (basis, bucket, campaign_id, {DIMS}, event,
        conversions, revenue, pending_conversions, pending_revenue, cost)
    SELECT b.basis, b.bucket, campaign_id, {DIMS}, event, sum(conversions), sum(revenue),
           sum(pending), sum(pending_revenue), sum(cost)
    FROM changes CROSS JOIN LATERAL (VALUES
        ('conversion', {BUCKET.format(ts="created_at")}),
        ('click', {BUCKET.format(ts="click_ts")})) AS b(basis, bucket)
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
    ON CONFLICT (basis, bucket, campaign_id, dims) DO UPDATE SET
        conversions = r.conversions + excluded.conversions,
        revenue = r.revenue + excluded.revenue,
        pending_conversions = r.pending_conversions + excluded.pending_conversions,
        pending_revenue = r.pending_revenue + excluded.pending_revenue,
        cost = r.cost + excluded.cost
    RETURNING 1
)
SELECT (SELECT count(*) FROM applied), (SELECT count(*) FROM history),
       (SELECT count(*) FROM deliveries), (SELECT count(*) FROM folded)
"""

STATE = """
SELECT version, status, raw_status, amount, currency, revenue, cost, order_value, created_at
FROM conversions WHERE id = $1
"""

VIEW_COLUMNS = """c.id, c.click_id, c.click_ts, c.campaign_id, k.slug AS campaign, c.event,
    c.txid, c.version, c.status, c.raw_status, c.amount, c.currency, c.revenue,
    k.currency AS campaign_currency, c.cost, c.order_value, c.customer_id, c.visitor_id,
    c.pub, c.sub1, c.sub2, c.sub3, c.sub4, c.sub5, c.country, c.device, c.source,
    c.created_at, c.updated_at"""
GET = f"""
SELECT {VIEW_COLUMNS} FROM conversions c LEFT JOIN campaigns k ON k.id = c.campaign_id
WHERE c.id = $1
"""
OF_CLICK = f"""
SELECT {VIEW_COLUMNS} FROM conversions c LEFT JOIN campaigns k ON k.id = c.campaign_id
WHERE c.click_id = $1 ORDER BY c.created_at, c.id
"""
HISTORY = """
SELECT version, ts, old_status, new_status, raw_status, amount, currency, revenue,
       host(source_net) || '/' || masklen(source_net) AS source_net, source
FROM conversion_history WHERE conversion_id = $1 ORDER BY version
"""


async def write(conn: asyncpg.Connection, records: Sequence[tuple[Any, ...]]) -> int:
    """Apply a batch of conversion versions inside the caller's transaction; return how
    many new versions it recorded (a replayed batch records none and folds nothing)."""
    if not records:
        return 0
    columns = [list(column) for column in zip(*records)]
    await conn.fetchval(LOCK_BATCH, columns[0])
    row = await conn.fetchrow(APPLY, *columns)
    return int(row[1])


async def state(pool: asyncpg.Pool, conversion_uuid: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(STATE, conversion_uuid)
    return row


async def get(pool: asyncpg.Pool, conversion_uuid: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(GET, conversion_uuid)
    return row


async def of_click(pool: asyncpg.Pool, click_uuid: UUID) -> list[asyncpg.Record]:
    return list(await pool.fetch(OF_CLICK, click_uuid))


async def history(pool: asyncpg.Pool, conversion_uuid: UUID) -> list[asyncpg.Record]:
    return list(await pool.fetch(HISTORY, conversion_uuid))
