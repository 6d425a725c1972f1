"""Operator API: reports."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
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
COUNTS = ("impressions", "clicks", "unique_clicks", "bot_clicks", "conversions",
          "pending_conversions")
AMOUNTS = ("cost", "revenue", "pending_revenue")


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


def _ratio(num: Decimal | int, den: Decimal | int) -> float | None:
    return None if not den else round(float(Decimal(num) / Decimal(den)), 6)


def metrics_of(sums: dict[str, Any]) -> dict[str, Any]:
    impressions, clicks = sums["impressions"], sums["clicks"]
    cost: Decimal = sums["cost"]
    conversions = sums["conversions"]
    revenue: Decimal = sums["revenue"]
    return {
        "impressions": impressions,
        "clicks": clicks,
        "unique_clicks": sums["unique_clicks"],
        "bot_clicks": sums["bot_clicks"],
        "conversions": conversions,
        "pending_conversions": sums["pending_conversions"],
        "revenue": money.to_str(revenue),
        "pending_revenue": money.to_str(sums["pending_revenue"]),
        "cost": money.to_str(cost),
        "profit": money.to_str(revenue - cost),
        "ctr": _ratio(clicks, impressions),
        "cr": _ratio(conversions, clicks),
        "epc": money.per_unit(revenue, clicks),
        "cpc": money.per_unit(cost, clicks),
        "cpa": money.per_unit(cost, conversions),
        "roi": _ratio(revenue - cost, cost),
        "roas": _ratio(revenue, cost),
    }


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
    records = [dict(r) for r in await store.run(pool, query)] if campaign_ids != [] else []
    names = {}
    if "campaign" in group_by and records:
        names = await campaign_store.labels(pool, sorted({r["campaign"] for r in records}))
    rows = []
    totals: dict[str, Any] = {k: 0 for k in COUNTS} | {k: Decimal(0) for k in AMOUNTS}
    currencies: set[str | None] = set()
    for record in records:
        if all(record[k] is None for k in COUNTS):
            continue  # no bucket matched: an ungrouped sum over nothing
        sums = ({k: int(record[k] or 0) for k in COUNTS}
                | {k: record[k] or Decimal(0) for k in AMOUNTS})
        for k in totals:
            totals[k] += sums[k]
        currency = record["currency"].strip() if record["currency"] else None
        currencies.add(currency)
        row: dict[str, Any] = {}
        for g in group_by:
            row |= _key(g, record[g], zone, names)
        # The money of a row is in its campaigns' currency; null when they differ.
        rows.append(row | metrics_of(sums) | {"currency": currency})
    return json_response({
        "from": start.isoformat().replace("+00:00", "Z"),
        "to": end.isoformat().replace("+00:00", "Z"),
        "tz": tz_name,
        "group_by": list(group_by),
        "date_basis": date_basis,
        "rows": rows,
        "totals": metrics_of(totals) | {
            "currency": next(iter(currencies)) if len(currencies) == 1 else None},
    })


def _key(group: str, value: Any, zone: ZoneInfo,
         names: dict[int, tuple[str, str, str]]) -> dict[str, Any]:
    if group == "campaign":
        slug, name, currency = names.get(value, ("", "", ""))
        # The row's money is in the campaign's currency; totals add currencies as they are.
        return {"campaign_id": value, "campaign": slug, "campaign_name": name,
                "currency": currency}
    if group == "day":
        return {"day": value.isoformat()}
    if group == "hour":
        return {"hour": value.astimezone(zone).isoformat()}
    return {group: value}
