"""Operator API: reports."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from .. import money
from ..errors import bad_request
from ..keys import PG
from ..storage import campaigns as campaign_store
from ..storage import reports as store
from .common import json_response

BUCKET = timedelta(minutes=15)
MAX_RANGE = timedelta(days=3660)
# The sums a report's record holds after its keys, in order (storage.reports.NAMES), and the
# places of the amounts among them (numeric text).
SUMMED = store.NAMES
CLICKS = SUMMED.index("clicks")
AMOUNTS = frozenset(i for i, name in enumerate(SUMMED) if name in store.AMOUNTS)


def _zone(raw: str) -> ZoneInfo:
    try:
        if not raw or len(raw) > 64 or ".." in raw or raw.startswith("/"):
            raise ValueError
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad_request("invalid_tz", "tz must be an IANA time zone such as Europe/Istanbul",
                          "tz") from None


def _instant(raw: str, name: str, zone: ZoneInfo, end: bool) -> datetime:
    """A date (a whole local day; `to` includes it) or an ISO 8601 time (naive: local)."""
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            if end:
                day += timedelta(days=1)
            return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request("invalid_time", f"{name} must be YYYY-MM-DD or an ISO 8601 time",
                          name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone)
    return when.astimezone(UTC)


def _floor(when: datetime) -> datetime:
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    return epoch + ((when - epoch) // BUCKET) * BUCKET


def _ratio(num: int, den: int) -> float | None:
    # Python divides whole numbers correctly rounded; money ratios are of nanos alike.
    return None if not den else round(num / den, 6)


def metrics_of(row: dict[str, Any], impressions: int, clicks: int, unique_clicks: int,
               bot_clicks: int, cost: int, conversions: int, revenue: int,
               pending_conversions: int, pending_revenue: int) -> dict[str, Any]:
    """Puts a row's figures into it, from its sums (in the order of SUMMED; money
    in whole units of 10^-9, money.nanos). A report by campaign and day has 6,000 rows."""
    row.update(
        impressions=impressions,
        clicks=clicks,
        unique_clicks=unique_clicks,
        bot_clicks=bot_clicks,
        conversions=conversions,
        pending_conversions=pending_conversions,
        revenue=money.nanos_to_str(revenue),
        pending_revenue=money.nanos_to_str(pending_revenue),
        cost=money.nanos_to_str(cost),
        profit=money.nanos_to_str(revenue - cost),
        ctr=_ratio(clicks, impressions),
        cr=_ratio(conversions, clicks),
        epc=money.nanos_per_unit(revenue, clicks),
        cpc=money.nanos_per_unit(cost, clicks),
        cpa=money.nanos_per_unit(cost, conversions),
        roi=_ratio(revenue - cost, cost),
        roas=_ratio(revenue, cost),
    )
    return row


def _group_by(request: web.Request) -> tuple[str, ...]:
    names: list[str] = []
    for raw in request.query.getall("group_by", []):
        for name in raw.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in store.GROUPS:
                raise bad_request(
                    "invalid_group_by",
                    f"group_by {name!r} is not one of " + ", ".join(store.GROUPS), "group_by")
            if name not in names:
                names.append(name)
    return tuple(names)


async def get(request: web.Request) -> web.Response:
    q = request.query
    tz_name = q.get("tz", "UTC") or "UTC"
    zone = _zone(tz_name)
    now = datetime.now(UTC)
    today = now.astimezone(zone).date()
    start = _instant(q["from"], "from", zone, end=False) if q.get("from") else \
        _instant(today.isoformat(), "from", zone, end=False)
    end = _instant(q["to"], "to", zone, end=True) if q.get("to") else \
        _instant(today.isoformat(), "to", zone, end=True)
    start, end = _floor(start), _floor(end + BUCKET - timedelta(microseconds=1))
    if end <= start:
        raise bad_request("invalid_range", "from must be before to", "from")
    if end - start > MAX_RANGE:
        raise bad_request("invalid_range", "a report spans at most 3660 days", "from")
    group_by = _group_by(request)
    date_basis = q.get("date_basis", "conversion") or "conversion"
    if date_basis not in store.DATE_BASES:
        raise bad_request("invalid_date_basis", "date_basis must be conversion or click",
                          "date_basis")
    pool = request.app[PG]
    campaign_ids = None
    if q.get("campaign"):
        campaign_ids = await campaign_store.ids_matching(pool, q["campaign"])
    pub = q.get("pub") if "pub" in q else None
    if not await store.zone_known(pool, tz_name):
        raise bad_request("invalid_tz", f"tz {tz_name!r} is not known to the database", "tz")
    query = store.ReportQuery(start, end, tz_name, group_by, campaign_ids, pub, date_basis)
    records = await store.run(pool, query) if campaign_ids != [] else []
    names = {}
    if "campaign" in group_by and records:
        names = await campaign_store.labels(pool, sorted({r["campaign"] for r in records}))
    rows = []
    totals = [0] * len(SUMMED)
    currencies: set[str | None] = set()
    keys = len(group_by)
    for record in records:
        if record[keys + CLICKS] is None:
            continue  # no bucket matched: an ungrouped sum over nothing
        sums = [money.nanos(v) if i in AMOUNTS else v
                for i, v in enumerate(record[keys:keys + len(SUMMED)])]
        for i, value in enumerate(sums):
            totals[i] += value
        currency = record["currency"].strip() if record["currency"] else None
        currencies.add(currency)
        row: dict[str, Any] = {}
        for g in group_by:
            _key(row, g, record[g], zone, names)
        metrics_of(row, *sums)
        # The money of a row is in its campaigns' currency; null when they differ.
        row["currency"] = currency
        rows.append(row)
    return json_response({
        "from": start.isoformat().replace("+00:00", "Z"),
        "to": end.isoformat().replace("+00:00", "Z"),
        "tz": tz_name,
        "group_by": list(group_by),
        "date_basis": date_basis,
        "rows": rows,
        "totals": metrics_of({}, *totals) | {
            "currency": next(iter(currencies)) if len(currencies) == 1 else None},
    })


def _key(row: dict[str, Any], group: str, value: Any, zone: ZoneInfo,
         names: dict[int, tuple[str, str, str]]) -> None:
    """Puts the row's key for `group` into it."""
    if group == "campaign":
        slug, name, currency = names.get(value, ("", "", ""))
        # The row's money is in the campaign's currency; totals add currencies as they are.
        row.update(campaign_id=value, campaign=slug, campaign_name=name, currency=currency)
    elif group == "day":
        row["day"] = value.isoformat()
    elif group == "hour":
        row["hour"] = value.astimezone(zone).isoformat()
    else:
        row[group] = value
