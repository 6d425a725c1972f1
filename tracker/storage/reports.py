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
    # Conversions are not recorded yet; every row of clicks and impressions has no event.
    "event": "NULL::text",
}

SUMS = """sum(impressions) AS impressions, sum(clicks) AS clicks,
    sum(unique_clicks) AS unique_clicks, sum(bot_clicks) AS bot_clicks, sum(cost) AS cost"""

CHECK_ZONE = "SELECT now() AT TIME ZONE $1"


@dataclass(frozen=True)
class ReportQuery:
    start: datetime
    end: datetime
    tz: str
    group_by: tuple[str, ...]
    campaign_ids: list[int] | None
    pub: str | None


def build(query: ReportQuery) -> tuple[str, list[Any]]:
    params: list[Any] = [query.start, query.end, query.tz]
    where = ["bucket >= $1", "bucket < $2"]
    if query.campaign_ids is not None:
        params.append(query.campaign_ids)
        where.append(f"campaign_id = ANY(${len(params)}::bigint[])")
    if query.pub is not None:
        params.append(query.pub)
        where.append(f"pub = ${len(params)}")
    # $3 must appear in the statement even when no group uses it.
    where.append("$3::text IS NOT NULL")
    keys = [f"{GROUPS[g]} AS {g}" for g in query.group_by]
    select = ", ".join(keys + [SUMS])
    sql = f"SELECT {select} FROM rollup_15m WHERE {' AND '.join(where)}"
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
