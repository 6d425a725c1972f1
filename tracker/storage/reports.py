"""Reports over the 15-minute rollups.

Local days and hours are cut at the rollup's bucket starts, which is exact in every IANA zone:
every offset (+03:30 Tehran, +05:45 Kathmandu, -03:30 St John's) is a whole number of
15-minute steps. Hours are keyed by their UTC instant, so the hour a DST change repeats stays
two rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# group_by name → SQL over rollup_15m ($3 is the IANA zone). Fixed strings only: user input
# picks among them, never writes SQL.
GROUPS: dict[str, str] = {
    "campaign": "campaign_id",
    "pub": "pub",
    "sub1": "sub1", "sub2": "sub2", "sub3": "sub3", "sub4": "sub4", "sub5": "sub5",
    "country": "country",
    "device": "device",
    "day": "(bucket AT TIME ZONE $3)::date",
    "hour": "bucket - make_interval(mins => extract(minute FROM bucket AT TIME ZONE $3)::int)",
    # Traffic has no goal: grouped by event, clicks and impressions are the row whose event
    # is null, and each goal's conversions a row of its own.
    "event": "event",
}
DATE_BASES = ("conversion", "click")

SUMS = """sum(impressions) AS impressions, sum(clicks) AS clicks,
    sum(unique_clicks) AS unique_clicks, sum(bot_clicks) AS bot_clicks, sum(cost) AS cost,
    sum(conversions) AS conversions, sum(revenue) AS revenue,
    sum(pending_conversions) AS pending_conversions, sum(pending_revenue) AS pending_revenue,
    CASE WHEN min(k.currency) = max(k.currency) THEN min(k.currency) END AS currency"""
DIMS = "bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device"
# Traffic and conversions side by side: clicks by click time; conversions by conversion or
# click time, as the report asks ($4).
EVENTS = f"""(
    SELECT {DIMS}, NULL::text AS event, impressions, clicks, unique_clicks, bot_clicks, cost,
           0::bigint AS conversions, 0::numeric AS revenue, 0::bigint AS pending_conversions,
           0::numeric AS pending_revenue
    FROM rollup_15m WHERE bucket >= $1 AND bucket < $2
    UNION ALL
    SELECT {DIMS}, event, 0, 0, 0, 0, cost, conversions, revenue, pending_conversions,
           pending_revenue
    FROM conversion_rollup_15m WHERE basis = $4 AND bucket >= $1 AND bucket < $2
) e LEFT JOIN campaigns k ON k.id = e.campaign_id"""

CHECK_ZONE = "SELECT now() AT TIME ZONE $1"


@dataclass(frozen=True)
class ReportQuery:
    start: datetime
    end: datetime
    tz: str
    group_by: tuple[str, ...]
    campaign_ids: list[int] | None
    pub: str | None
    date_basis: str = "conversion"


def build(query: ReportQuery) -> tuple[str, list[Any]]:
    params: list[Any] = [query.start, query.end, query.tz, query.date_basis]
    # $3 must appear in the statement even when no group uses it.
    where = ["$3::text IS NOT NULL"]
    if query.campaign_ids is not None:
        params.append(query.campaign_ids)
        where.append(f"e.campaign_id = ANY(${len(params)}::bigint[])")
    if query.pub is not None:
        params.append(query.pub)
        where.append(f"e.pub = ${len(params)}")
    keys = [f"{GROUPS[g] if g != 'campaign' else 'e.campaign_id'} AS {g}" for g in query.group_by]
    select = ", ".join(keys + [SUMS])
    sql = f"SELECT {select} FROM {EVENTS} WHERE {' AND '.join(where)}"
    if query.group_by:
        positions = ", ".join(str(i) for i in range(1, len(query.group_by) + 1))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    return sql, params


async def run(pool: asyncpg.Pool, query: ReportQuery) -> list[asyncpg.Record]:
    sql, params = build(query)
    return list(await pool.fetch(sql, *params))


async def zone_known(pool: asyncpg.Pool, tz: str) -> bool:
    try:
        await pool.fetchval(CHECK_ZONE, tz)
    except asyncpg.InvalidParameterValueError:
        return False
    return True
