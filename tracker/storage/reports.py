"""Reports over the rollups: the daily or hourly ones by campaign alone when the report
needs no other dimension, else the 15-minute ones by every dimension
(sql/006_campaign_rollups.sql).

Local days and hours are cut at the rollup's bucket starts, which is exact in every IANA zone
for 15-minute buckets: every offset (+03:30 Tehran, +05:45 Kathmandu, -03:30 St John's) is a
whole number of 15-minute steps. Hourly buckets are exact only where the zone's offset is a
whole number of hours and daily ones only for UTC's own days, so they are read only there.
Hours are keyed by their UTC instant, so the hour a DST change repeats stays two rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

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
# Traffic and conversions side by side: clicks by click time; conversions by conversion or
# click time, as the report asks ($4).
EVENTS = """(
    SELECT {dims}, {no_event} impressions, clicks, unique_clicks, bot_clicks, cost,
           0::bigint AS conversions, 0::numeric AS revenue, 0::bigint AS pending_conversions,
           0::numeric AS pending_revenue
    FROM {traffic} WHERE bucket >= $1 AND bucket < $2
    UNION ALL
    SELECT {dims}, {event} 0, 0, 0, 0, cost, conversions, revenue, pending_conversions,
           pending_revenue
    FROM {conversions} WHERE basis = $4 AND bucket >= $1 AND bucket < $2
) e LEFT JOIN campaigns k ON k.id = e.campaign_id"""
FINE_EVENTS = EVENTS.format(
    dims="bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device",
    no_event="NULL::text AS event,", event="event,", traffic="rollup_15m",
    conversions="conversion_rollup_15m")
CAMPAIGN_EVENTS = {grain: EVENTS.format(dims="bucket, campaign_id", no_event="", event="",
                                         traffic=f"rollup_campaign_{grain}",
                                         conversions=f"conversion_rollup_campaign_{grain}")
                   for grain in ("1h", "1d")}

# Local days from daily rows where whole UTC days allow (sql/006_campaign_rollups.sql): a
# range of whole hours in a zone of whole-hour offsets is its UTC days [d1, d2) from the
# daily rows, each counted on its UTC date, plus the hourly rows of the partial UTC days at
# its ends; grouped by local day, the hours of [d1, d2) whose local date is not their UTC
# date are moved from the one to the other (subtracted, added). Istanbul's 30 days read
# 6,000 daily rows and ~40,000 hourly ones instead of 144,000 hourly ones.
UTC_DAY = "(bucket AT TIME ZONE 'UTC')::date"
LOCAL_DAY = "(bucket AT TIME ZONE $3)::date"
TRAFFIC = "{s}impressions, {s}clicks, {s}unique_clicks, {s}bot_clicks, {s}cost, 0::bigint, " \
          "0::numeric, 0::bigint, 0::numeric"
CONVERSIONS = "0::bigint, 0::bigint, 0::bigint, 0::bigint, {s}cost, {s}conversions, " \
              "{s}revenue, {s}pending_conversions, {s}pending_revenue"
NAMES = ("impressions", "clicks", "unique_clicks", "bot_clicks", "cost", "conversions",
         "revenue", "pending_conversions", "pending_revenue")


def _part(grain: str, day: str, sign: str, condition: str) -> str:
    """Traffic and conversions of one campaign rollup, signed, keyed by a day."""
    traffic = TRAFFIC.format(s=sign).split(", ")
    names = ", ".join(f"{v} AS {n}" for v, n in zip(traffic, NAMES))
    return (f"SELECT campaign_id, {day} AS local_day, {names} "
            f"FROM rollup_campaign_{grain} WHERE {condition} UNION ALL "
            f"SELECT campaign_id, {day}, {CONVERSIONS.format(s=sign)} "
            f"FROM conversion_rollup_campaign_{grain} WHERE basis = $4 AND {condition}")


def _moved_hours(tz: str, d1: datetime, d2: datetime) -> list[datetime]:
    """The UTC hours of [d1, d2) whose date in `tz` is not their UTC date."""
    zone = ZoneInfo(tz)
    hours = []
    when = d1
    while when < d2:
        if when.astimezone(zone).date() != when.date():
            hours.append(when)
        when += HOUR
    return hours


def _days_and_hours(query: ReportQuery, params: list[Any]) -> str | None:
    """The events of `query` from daily rows and the hourly ones around them, or None when
    the range holds no whole UTC day."""
    d1 = EPOCH + -((EPOCH - query.start) // DAY) * DAY
    d2 = EPOCH + ((query.end - EPOCH) // DAY) * DAY
    if d1 >= d2:
        return None
    params += [d1, d2]
    lo, hi = f"${len(params) - 1}", f"${len(params)}"
    parts = [_part("1d", UTC_DAY, "", f"bucket >= {lo} AND bucket < {hi}"),
             _part("1h", LOCAL_DAY, "", f"(bucket >= $1 AND bucket < {lo} "
                                        f"OR bucket >= {hi} AND bucket < $2)")]
    if "day" in query.group_by:
        params.append(_moved_hours(query.tz, d1, d2))
        moved = f"bucket = ANY(${len(params)}::timestamptz[])"
        parts += [_part("1h", UTC_DAY, "-", moved), _part("1h", LOCAL_DAY, "", moved)]
    return "(" + " UNION ALL ".join(parts) + ") e LEFT JOIN campaigns k ON k.id = e.campaign_id"


# What the campaign rollups can answer: they know the campaign and the time, nothing else.
CAMPAIGN_GROUPS = frozenset(["campaign", "day", "hour"])
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# No zone keeps an offset for less than this (DST lasts months): sampling the range this
# often finds every offset a zone has in it.
OFFSET_SAMPLE = timedelta(hours=6)

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


def _on_step(when: datetime, step: timedelta) -> bool:
    return (when - EPOCH) % step == timedelta(0)


def _offsets(tz: str, start: datetime, end: datetime, step: timedelta) -> bool:
    """Whether `tz`'s offset from UTC is a whole number of `step`s all through [start, end]."""
    zone = ZoneInfo(tz)
    when = start
    while True:
        offset = when.astimezone(zone).utcoffset()
        if offset is None or offset % step:
            return False
        if when >= end:
            return True
        when = min(when + OFFSET_SAMPLE, end)


def campaign_grain(query: ReportQuery) -> str | None:
    """The campaign rollup ("1d" or "1h") that answers `query` exactly, None when only the
    15-minute rollups can: no dimension but campaign and time, a range of whole UTC days or
    hours, and local days (and hours) that start on the buckets' UTC boundaries."""
    if query.pub is not None or not CAMPAIGN_GROUPS.issuperset(query.group_by):
        return None
    local = {"day", "hour"}.intersection(query.group_by)
    for grain, step in (("1d", DAY), ("1h", HOUR)):
        if grain == "1d" and "hour" in local:
            continue
        if not (_on_step(query.start, step) and _on_step(query.end, step)):
            continue
        if not local or _offsets(query.tz, query.start, query.end, step):
            return grain
    return None


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
    grain = campaign_grain(query)
    events = FINE_EVENTS if grain is None else CAMPAIGN_EVENTS[grain]
    groups = GROUPS | {"campaign": "e.campaign_id"}
    if grain == "1h" and "hour" not in query.group_by:
        mixed = _days_and_hours(query, params)
        if mixed is not None:
            events, groups = mixed, groups | {"day": "e.local_day"}
    keys = [f"{groups[g]} AS {g}" for g in query.group_by]
    select = ", ".join(keys + [SUMS])
    sql = f"SELECT {select} FROM {events} WHERE {' AND '.join(where)}"
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
