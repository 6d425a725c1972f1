"""GET /api/reports over the rollups (15-minute ones by every dimension; hourly and daily
ones by campaign)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tracker.ids import new_id

from ..conftest import Running, flush


async def buffer_events(s: Running, events: list[dict[str, Any]]) -> None:
    """Put events into the write buffer as the hot path does, at chosen times."""
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    for event in events:
        await redis.xadd(f"{s.settings.redis_prefix}events", {"e": orjson.dumps(event)})
    await redis.aclose()
    await flush(s)


def click(campaign_id: int, when: datetime, **fields: Any) -> dict[str, Any]:
    return {"type": "click", "id": str(new_id(int(when.timestamp() * 1000))),
            "campaign_id": campaign_id, "visitor_id": str(new_id()), "is_unique": True,
            "is_bot": False, "destination": "https://shop.example/", "cost": "0"} | fields


def impression(campaign_id: int, when: datetime, **fields: Any) -> dict[str, Any]:
    return {"type": "impression", "id": str(new_id(int(when.timestamp() * 1000))),
            "campaign_id": campaign_id, "visitor_id": str(new_id()), "is_bot": False,
            "cost": "0"} | fields


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize("tz, day_starts_utc", [
    ("Asia/Tehran", "2026-11-09T20:30:00"),      # +03:30
    ("America/St_Johns", "2026-11-10T03:30:00"),  # -03:30 (standard time in November)
    ("Asia/Kathmandu", "2026-11-09T18:15:00"),   # +05:45
    ("Asia/Kolkata", "2026-11-09T18:30:00"),     # +05:30
    # Whole-hour zones and UTC: answered from the hourly and daily rollups by campaign.
    ("Europe/Istanbul", "2026-11-09T21:00:00"),  # +03:00
    ("America/New_York", "2026-11-10T05:00:00"),  # -05:00
    ("UTC", "2026-11-10T00:00:00"),
])
async def test_local_days_are_cut_exactly_in_half_and_quarter_hour_zones(
        quiet_service: Running, tz: str, day_starts_utc: str) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="tz")
    start = utc(day_starts_utc)  # local midnight starting 2026-11-10
    ms = timedelta(milliseconds=1)
    end = start + timedelta(days=1)
    await buffer_events(s, [
        click(c["id"], start - ms),        # 2026-11-09, last millisecond
        click(c["id"], start),             # 2026-11-10, first millisecond
        click(c["id"], start + timedelta(minutes=14)),
        click(c["id"], end - ms),          # 2026-11-10, last millisecond
        click(c["id"], end),               # 2026-11-11
    ])
    status, body = await s.api(
        "GET", f"/api/reports?from=2026-11-09&to=2026-11-11&tz={tz}&group_by=day")
    assert status == 200, body
    assert [(r["day"], r["clicks"]) for r in body["rows"]] == \
        [("2026-11-09", 1), ("2026-11-10", 3), ("2026-11-11", 1)]
    assert body["totals"]["clicks"] == 5
    # One local day alone.
    status, body = await s.api("GET", f"/api/reports?from=2026-11-10&to=2026-11-10&tz={tz}")
    assert body["totals"]["clicks"] == 3
    # Hours start at local :00, whatever minute that is in UTC.
    status, body = await s.api(
        "GET", f"/api/reports?from=2026-11-10&to=2026-11-10&tz={tz}&group_by=hour")
    hours = [(r["hour"], r["clicks"]) for r in body["rows"]]
    assert hours[0][0].startswith("2026-11-10T00:00:00") and hours[0][1] == 2
    assert hours[-1][0].startswith("2026-11-10T23:00:00") and hours[-1][1] == 1


async def test_counts_costs_and_ratios(quiet_service: Running) -> None:
    s = quiet_service
    cpc = await s.create_campaign(slug="cpc", cost_model="cpc", cost_value="0.25")
    cpm = await s.create_campaign(slug="cpm", cost_model="cpm", cost_value="2.00")
    now = datetime.now(UTC)
    events = [
        click(cpc["id"], now, pub="a", cost="0.25"),
        click(cpc["id"], now, pub="a", cost="0.25", is_unique=False),
        click(cpc["id"], now, pub="b", cost="0.25", country="TR", device="mobile"),
        click(cpc["id"], now, pub="a", cost="0", is_bot=True, is_unique=False),
    ] + [impression(cpc["id"], now, pub="a") for _ in range(6)] \
      + [impression(cpm["id"], now, pub="a", cost="0.002") for _ in range(500)] \
      + [impression(cpm["id"], now, pub="a", is_bot=True)]
    await buffer_events(s, events)

    status, body = await s.api("GET", "/api/reports?group_by=campaign")
    assert status == 200, body
    rows = {r["campaign"]: r for r in body["rows"]}
    assert (rows["cpc"]["clicks"], rows["cpc"]["unique_clicks"], rows["cpc"]["bot_clicks"]) == (3, 2, 1)
    assert rows["cpc"]["impressions"] == 6 and rows["cpc"]["cost"] == "0.75"
    assert rows["cpc"]["cpc"] == "0.25" and rows["cpc"]["ctr"] == 0.5
    assert rows["cpc"]["currency"] == "USD"
    assert rows["cpm"]["impressions"] == 500 and rows["cpm"]["cost"] == "1"
    assert rows["cpm"]["clicks"] == 0 and rows["cpm"]["cpc"] is None and rows["cpm"]["ctr"] == 0
    totals = body["totals"]
    assert totals["cost"] == "1.75" and totals["clicks"] == 3 and totals["impressions"] == 506
    assert totals["conversions"] == 0 and totals["cr"] == 0 and totals["cpa"] is None
    assert totals["revenue"] == "0" and totals["profit"] == "-1.75" and totals["roi"] == -1.0
    for key in ["impressions", "clicks", "unique_clicks", "bot_clicks", "conversions", "revenue",
                "cost", "profit", "ctr", "cr", "epc", "cpc", "cpa", "roi", "roas"]:
        assert key in totals and key in body["rows"][0]

    status, body = await s.api("GET", "/api/reports?group_by=pub,country,device&campaign=cpc")
    got = [(r["pub"], r["country"], r["device"], r["clicks"], r["bot_clicks"]) for r in body["rows"]]
    assert got == [("a", "", "", 2, 1), ("b", "TR", "mobile", 1, 0)]
    status, body = await s.api("GET", f"/api/reports?campaign={cpc['id']}&pub=b")
    assert body["totals"]["clicks"] == 1 and body["totals"]["cost"] == "0.25"
    status, body = await s.api("GET", "/api/reports?campaign=nope")
    assert status == 200 and body["rows"] == [] and body["totals"]["clicks"] == 0
    assert body["totals"]["ctr"] is None


@pytest.mark.parametrize("query, field", [
    ("tz=Mars/Olympus", "tz"),
    ("tz=../../etc/passwd", "tz"),
    ("group_by=campaign,color", "group_by"),
    ("from=yesterday", "from"),
    ("to=2026-13-01", "to"),
    ("from=2026-11-10&to=2026-11-01", "from"),
])
async def test_bad_report_parameters_are_named(service: Running, query: str, field: str) -> None:
    status, body = await service.api("GET", f"/api/reports?{query}")
    assert status == 400, body
    assert body["error"]["field"] == field


async def test_reports_by_campaign_and_time_agree_with_reports_by_every_dimension(
        quiet_service: Running) -> None:
    """Reports that need only the campaign and the time read the hourly and daily rollups;
    those must equal the 15-minute rollups through every kind of change the writer makes
    (new rows, rows added to, replays) and through a batch of conversions."""
    s = quiet_service
    a = await s.create_campaign(slug="a", cost_model="cpc", cost_value="0.10")
    b = await s.create_campaign(slug="b")
    day = utc("2026-11-10T00:00:00")
    # The second batch falls in the first one's buckets, with the same dimensions: the
    # writer adds to rows it made (ON CONFLICT … UPDATE).
    events = [click(c["id"], day + timedelta(minutes=53 * (i % 30)), pub=f"p{i % 3}",
                    is_bot=i % 7 == 0, is_unique=i % 2 == 0, cost="0.10")
              for i in range(60) for c in (a, b)]
    await buffer_events(s, events[:60])
    await buffer_events(s, events[60:] + [impression(a["id"], day, pub="p1")])
    # The same batch again (a crash before its ack): the writer inserts and folds nothing.
    await buffer_events(s, events[:10])

    async def rows(query: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        status, body = await s.api("GET", f"/api/reports?from=2026-11-09&to=2026-11-12&{query}")
        assert status == 200, body
        found: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        for r in body["rows"]:
            key = (r.get("campaign"), r.get("day"))
            old = found.get(key, (0, 0, 0, 0, Decimal(0)))
            found[key] = (old[0] + r["impressions"], old[1] + r["clicks"],
                          old[2] + r["unique_clicks"], old[3] + r["bot_clicks"],
                          old[4] + Decimal(r["cost"]))
        return found

    for tz in ("UTC", "Europe/Istanbul", "Asia/Kathmandu"):
        by_campaign = await rows(f"tz={tz}&group_by=campaign,day")
        by_everything = await rows(f"tz={tz}&group_by=campaign,day,pub,country,device")
        assert by_campaign == by_everything and len(by_campaign) > 2, tz
    total = sum(v[1] + v[3] for v in (await rows("tz=UTC&group_by=campaign")).values())
    assert total == len(events)


async def test_local_days_follow_daylight_saving_inside_the_range(quiet_service: Running) -> None:
    """A range whose ends are UTC midnights (London in winter) in a zone that is not UTC all
    through it: summer's local days start an hour before UTC's."""
    s = quiet_service
    c = await s.create_campaign(slug="dst")
    await buffer_events(s, [click(c["id"], utc("2026-06-10T22:30:00")),   # 06-10 23:30 BST
                            click(c["id"], utc("2026-06-10T23:30:00"))])  # 06-11 00:30 BST
    status, body = await s.api(
        "GET", "/api/reports?from=2026-03-01&to=2026-11-30&tz=Europe/London&group_by=day")
    assert status == 200, body
    assert [(r["day"], r["clicks"]) for r in body["rows"]] == [("2026-06-10", 1), ("2026-06-11", 1)]


async def test_a_rows_currency_is_its_campaigns_and_none_where_they_differ(
        quiet_service: Running) -> None:
    s = quiet_service
    usd = await s.create_campaign(slug="in-usd", cost_model="cpc", cost_value="0.25")
    eur = await s.create_campaign(slug="in-eur", cost_model="cpc", cost_value="0.30",
                                  currency="EUR")
    now = datetime.now(UTC)
    await buffer_events(s, [click(usd["id"], now, cost="0.25"), click(eur["id"], now, cost="0.3")])

    async def report(query: str) -> dict[str, Any]:
        status, body = await s.api("GET", f"/api/reports?{query}")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    by_campaign = await report("group_by=campaign")
    assert {r["campaign"]: r["currency"] for r in by_campaign["rows"]} == {
        "in-usd": "USD", "in-eur": "EUR"}
    assert by_campaign["totals"]["currency"] is None
    for query in ("group_by=day", "group_by=pub", "group_by=hour"):
        body = await report(query)
        assert [r["currency"] for r in body["rows"]] == [None], query
        assert body["rows"][0]["cost"] == "0.55" and body["totals"]["currency"] is None
    for query in ("group_by=day&campaign=in-eur", "group_by=pub&campaign=in-eur"):
        body = await report(query)
        assert [(r["currency"], r["cost"]) for r in body["rows"]] == [("EUR", "0.3")], query
        assert body["totals"]["currency"] == "EUR"
