"""Reports over the rollups: by campaign alone (quarter hours, hours, days) when the report
needs no other dimension, else by every dimension (15-minute buckets)
(sql/007_campaign_rollups.sql).

Local days and hours are cut at bucket starts. 15-minute buckets are exact in every IANA zone:
every offset (+03:30 Tehran, +05:45 Kathmandu, -03:30 St John's) is a whole number of
15-minute steps. A report by campaign and local day reads the UTC days it covers from the
daily rows, and the hours (or quarter hours, where a local day cuts an hour) at its ends and
wherever a local date differs from the UTC date. Hours are keyed by their UTC instant, so the
hour a DST change repeats stays two rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from . import campaigns

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

# The sums of a report's record, in order after its keys; then its currency.
NAMES = ("impressions", "clicks", "unique_clicks", "bot_clicks", "cost", "conversions",
         "revenue", "pending_conversions", "pending_revenue")
AMOUNTS = frozenset(["cost", "revenue", "pending_revenue"])
# Counts as bigint and amounts as numeric(38, 9) text (every stored amount has 9 places):
# asyncpg reads a numeric (what sum() makes of bigints too) as a Decimal built from its text,
# which took most of a 6,000-row report's time; the handler reads amounts as whole 10^-9 units.
SUMS = ", ".join(f"sum({n})::numeric(38, 9)::text AS {n}" if n in AMOUNTS
                 else f"sum({n})::bigint AS {n}" for n in NAMES)
# A row's currency: its campaigns', when they share one. Most accounts have one currency:
# then it is every row's, and the rows need no join with campaigns (a quarter of a 30-day
# report by local day in Kolkata was that join).
CURRENCY_OF_CAMPAIGNS = "CASE WHEN min(k.currency) = max(k.currency) THEN min(k.currency) END"
WITH_CAMPAIGNS = " LEFT JOIN campaigns k ON k.id = e.campaign_id"
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
) e"""
FINE_EVENTS = EVENTS.format(
    dims="bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device",
    no_event="NULL::text AS event,", event="event,", traffic="rollup_15m",
    conversions="conversion_rollup_15m")
HOURLY_EVENTS = EVENTS.format(dims="bucket, campaign_id", no_event="", event="",
                              traffic="rollup_campaign_1h",
                              conversions="conversion_rollup_campaign_1h")

# Reports by campaign and local day, from signed pieces of the campaign rollups keyed by a
# day: the daily rows of the UTC days [d1, d2) the range covers, each on its UTC date; the
# hours and quarter hours of the range outside them, on their local date; and, grouped by
# day, the hours and quarters of [d1, d2) whose local date is not their UTC date, taken off
# the one (-) and put on the other. Istanbul's 30 days read 6,000 daily rows and ~40,000
# hourly ones; the 15-minute rollups held 10 million.
UTC_DAY = "(bucket AT TIME ZONE 'UTC')::date"
LOCAL_DAY = "(bucket AT TIME ZONE $3)::date"
TRAFFIC = ("{s}impressions", "{s}clicks", "{s}unique_clicks", "{s}bot_clicks", "{s}cost",
           "0::bigint", "0::numeric", "0::bigint", "0::numeric")
CONVERSIONS = ("0::bigint", "0::bigint", "0::bigint", "0::bigint", "{s}cost", "{s}conversions",
               "{s}revenue", "{s}pending_conversions", "{s}pending_revenue")
DAY_GROUPS = frozenset(["campaign", "day"])
# What the hourly rollups can answer (hours of whole-hour zones): campaign and time.
HOURLY_GROUPS = frozenset(["campaign", "day", "hour"])
QUARTER = timedelta(minutes=15)
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


def _floor(when: datetime, step: timedelta) -> datetime:
    return EPOCH + ((when - EPOCH) // step) * step


def _whole_hour_offsets(tz: str, start: datetime, end: datetime) -> bool:
    """Whether `tz` is a whole number of hours from UTC all through [start, end]."""
    zone = ZoneInfo(tz)
    when = start
    while True:
        offset = when.astimezone(zone).utcoffset()
        if offset is None or offset % HOUR:
            return False
        if when >= end:
            return True
        when = min(when + OFFSET_SAMPLE, end)


def hourly(query: ReportQuery) -> bool:
    """Whether the hourly rollups by campaign answer `query` exactly: no dimension but
    campaign and time, whole UTC hours, and a zone whose hours start on UTC hours."""
    return (query.pub is None and HOURLY_GROUPS.issuperset(query.group_by)
            and _on_step(query.start, HOUR) and _on_step(query.end, HOUR)
            and _whole_hour_offsets(query.tz, query.start, query.end))


@dataclass
class Pieces:
    """Which campaign rollup rows make up a report by campaign and local day."""

    days: tuple[datetime, datetime] | None = None  # [d1, d2) of the daily rows
    # grain ("1h", "15m") → buckets counted on their local date
    edges: dict[str, list[datetime]] = field(default_factory=lambda: {"1h": [], "15m": []})
    # grain → buckets of [d1, d2) moved from their UTC date to their local date
    moved: dict[str, list[datetime]] = field(default_factory=lambda: {"1h": [], "15m": []})


def pieces(query: ReportQuery) -> Pieces:
    by_day = "day" in query.group_by
    zone = ZoneInfo(query.tz)
    found = Pieces()
    d1, d2 = _floor(query.start, DAY), _floor(query.end, DAY)
    if d1 < query.start:
        d1 += DAY
    if d1 < d2:
        found.days = (d1, d2)
    hour = _floor(query.start, HOUR)
    while hour < query.end:
        if found.days and d1 <= hour < d2:
            if not by_day:  # the daily rows are the whole of it
                hour = d2
                continue
            dates = [(hour + i * QUARTER).astimezone(zone).date() for i in range(4)]
            if dates[0] != hour.date() and dates[3] == dates[0]:
                found.moved["1h"].append(hour)
            else:
                found.moved["15m"] += [hour + i * QUARTER for i in range(4)
                                       if dates[i] != hour.date()]
            hour += HOUR
            continue
        quarters = [q for q in (hour + i * QUARTER for i in range(4))
                    if query.start <= q < query.end]
        if len(quarters) == 4 and (not by_day or len({q.astimezone(zone).date()
                                                       for q in quarters}) == 1):
            found.edges["1h"].append(hour)
        else:
            found.edges["15m"] += quarters
        hour += HOUR
    return found


def _part(grain: str, day: str, sign: str, condition: str) -> str:
    """Traffic and conversions of one campaign rollup, signed, keyed by a day (within the
    report's range, $1 and $2, as every piece is)."""
    condition = f"bucket >= $1 AND bucket < $2 AND {condition}"
    names = ", ".join(f"{v.format(s=sign)} AS {n}" for v, n in zip(TRAFFIC, NAMES))
    conversions = ", ".join(v.format(s=sign) for v in CONVERSIONS)
    return (f"SELECT campaign_id, {day} AS day, {names} "
            f"FROM rollup_campaign_{grain} WHERE {condition} UNION ALL "
            f"SELECT campaign_id, {day}, {conversions} "
            f"FROM conversion_rollup_campaign_{grain} WHERE basis = $4 AND {condition}")


def _pieces_events(found: Pieces, params: list[Any]) -> str:
    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    parts = []
    if found.days is not None:
        parts.append(_part("1d", UTC_DAY, "",
                           f"bucket >= {param(found.days[0])} AND bucket < {param(found.days[1])}"))
    for grain in ("1h", "15m"):
        if found.edges[grain]:
            parts.append(_part(grain, LOCAL_DAY, "",
                               f"bucket = ANY({param(found.edges[grain])}::timestamptz[])"))
        if found.moved[grain]:
            moved = f"bucket = ANY({param(found.moved[grain])}::timestamptz[])"
            parts += [_part(grain, UTC_DAY, "-", moved), _part(grain, LOCAL_DAY, "", moved)]
    return "(" + " UNION ALL ".join(parts) + ") e"


def build(query: ReportQuery, currency: str | None = None) -> tuple[str, list[Any]]:
    """The report's statement; `currency`, when every campaign it may count has that one."""
    params: list[Any] = [query.start, query.end, query.tz, query.date_basis]
    # $3 must appear in the statement even when no group uses it.
    where = ["$3::text IS NOT NULL"]
    if query.campaign_ids is not None:
        params.append(query.campaign_ids)
        where.append(f"e.campaign_id = ANY(${len(params)}::bigint[])")
    if query.pub is not None:
        params.append(query.pub)
        where.append(f"e.pub = ${len(params)}")
    groups = GROUPS | {"campaign": "e.campaign_id"}
    if query.pub is None and DAY_GROUPS.issuperset(query.group_by):
        events = _pieces_events(pieces(query), params)
        groups |= {"day": "e.day"}
    elif hourly(query):
        events = HOURLY_EVENTS
    else:
        events = FINE_EVENTS
    keys = [f"{groups[g]} AS {g}" for g in query.group_by]
    if currency is None:
        keys.append(SUMS + f", {CURRENCY_OF_CAMPAIGNS} AS currency")
        events += WITH_CAMPAIGNS
    else:
        params.append(currency)
        keys.append(SUMS + f", ${len(params)}::text AS currency")
    sql = f"SELECT {', '.join(keys)} FROM {events} WHERE {' AND '.join(where)}"
    if query.group_by:
        positions = ", ".join(str(i) for i in range(1, len(query.group_by) + 1))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    return sql, params


async def run(pool: asyncpg.Pool, query: ReportQuery) -> list[asyncpg.Record]:
    sql, params = build(query, await campaigns.shared_currency(pool, query.campaign_ids))
    return list(await pool.fetch(sql, *params))


async def zone_known(pool: asyncpg.Pool, tz: str) -> bool:
    try:
        await pool.fetchval(CHECK_ZONE, tz)
    except asyncpg.InvalidParameterValueError:
        return False
    return True
