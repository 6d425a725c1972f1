"""Revenue from postbacks and payout rules, cost models, and how reports show conversions."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tracker.ids import decode_id, new_id

from ..conftest import Running, flush
from .test_postback import new_click, postback, report


async def test_payout_rules_cpa_cost_and_every_ratio(quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="rules", cost_model="cpa", cost_value="1.50",
                            payouts=[{"event": "lead", "amount": "2"},
                                     {"event": "sale", "percent": "10"}])
    a, b = await new_click(s, "rules"), await new_click(s, "rules")
    assert (await postback(s, f"click_id={a}&event=lead"))[0] == 200
    assert (await postback(s, f"click_id={b}&event=sale&order_value=200&txid=1"))[0] == 200
    assert (await postback(s, f"click_id={a}&event=sale&order_value=50&txid=2&status=pending"))[0] == 200
    # An amount in the postback wins over the rule.
    assert (await postback(s, f"click_id={b}&event=lead&amount=0.5"))[0] == 200
    await flush(s)
    totals = (await report(s))["totals"]
    expected = {
        "clicks": 2, "conversions": 3, "revenue": "22.5", "pending_conversions": 1,
        "pending_revenue": "5", "cost": "4.5", "profit": "18", "cr": 1.5, "epc": "11.25",
        "cpa": "1.5", "roi": 4.0, "roas": 5.0, "currency": "USD",
    }
    assert {k: totals[k] for k in expected} == expected


async def test_revshare_costs_a_share_of_approved_revenue_fixed_at_approval(
        quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="share", cost_model="revshare", cost_value="30")
    click = await new_click(s, "share")
    await postback(s, f"click_id={click}&amount=10&status=pending")
    await flush(s)
    assert (await report(s))["totals"]["cost"] == "0"
    await postback(s, f"click_id={click}&amount=10&status=approved")
    await flush(s)
    totals = (await report(s))["totals"]
    assert (totals["revenue"], totals["cost"], totals["profit"]) == ("10", "3", "7")
    await postback(s, f"click_id={click}&status=reversed")
    await flush(s)
    totals = (await report(s))["totals"]
    assert (totals["revenue"], totals["cost"]) == ("0", "0")


async def test_group_by_event_gives_one_row_per_goal(quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="goals")
    a, b = await new_click(s, "goals"), await new_click(s, "goals")
    await postback(s, f"click_id={a}&event=lead&amount=1")
    await postback(s, f"click_id={b}&event=lead&amount=1")
    await postback(s, f"click_id={b}&event=sale&amount=30&status=pending")
    await flush(s)
    rows = {r["event"]: r for r in (await report(s, "group_by=event"))["rows"]}
    assert set(rows) == {None, "lead", "sale"}
    # Traffic has no goal: clicks are in the event-less row, each goal's conversions in its own.
    assert (rows[None]["clicks"], rows[None]["conversions"]) == (2, 0)
    assert (rows["lead"]["conversions"], rows["lead"]["revenue"]) == (2, "2")
    assert (rows["sale"]["pending_conversions"], rows["sale"]["pending_revenue"]) == (1, "30")


async def old_click(s: Running, pg: asyncpg.Connection, campaign_id: int, days_ago: int) -> str:
    click_id = str(new_id(int((time.time() - days_ago * 86400) * 1000)))
    uuid, ts = decode_id(click_id)
    await pg.execute(
        "INSERT INTO clicks (id, ts, campaign_id, visitor_id, is_unique, is_bot, destination, "
        "pub) VALUES ($1, $2, $3, 'v', true, false, 'https://shop.example/', 'old')",
        uuid, ts, campaign_id)
    return click_id


async def test_date_basis_counts_by_conversion_time_or_by_click_time(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    campaign = await s.create_campaign(slug="basis")
    # A click from three days ago, found in PostgreSQL (Redis no longer holds it).
    click = await old_click(s, pg, campaign["id"], days_ago=3)
    status, body = await postback(s, f"click_id={click}&amount=9")
    assert (status, body["status"]) == (200, "accepted"), body
    await flush(s)
    day = (datetime.now(UTC) - timedelta(days=3)).date().isoformat()
    today = datetime.now(UTC).date().isoformat()

    async def conversions(query: str) -> Any:
        return (await report(s, query))["totals"]["conversions"]
    assert await conversions(f"from={day}&to={day}&date_basis=click") == 1
    assert await conversions(f"from={day}&to={day}") == 0
    assert await conversions(f"from={today}&to={today}") == 1
    assert await conversions(f"from={today}&to={today}&date_basis=click") == 0
    status, body = await s.api("GET", "/api/reports?date_basis=sideways")
    assert (status, body["error"]["field"]) == (400, "date_basis")
