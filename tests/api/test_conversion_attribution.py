"""GET /api/conversions/{id}/attribution through the service: the visitor's clicks before the
conversion, each with its credit."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from ..conftest import Running, flush
from .test_postback import click_id_of, postback


async def test_a_visitors_clicks_share_the_credit(quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="mt1")
    await s.create_campaign(slug="mt2")
    visitor = "01JD00000000000000000VISIT"
    clicks = []
    for slug in ("mt1", "mt2", "mt1"):
        r = await s.click(slug, "pub=p", headers={"Cookie": f"tv={visitor}"})
        clicks.append(click_id_of(r.headers["Location"]))
        # Touches are ordered by time: two clicks in one millisecond have no order (their ids
        # are random within it, as unguessable ids must be).
        await asyncio.sleep(0.002)
    other = await s.click("mt1", "pub=p")  # another visitor: not a touch
    await flush(s)
    status, body = await postback(s, f"click_id={clicks[-1]}&amount=10")
    assert status == 200, body
    conversion = body["conversion_id"]

    status, last = await s.api("GET", f"/api/conversions/{conversion}/attribution")
    assert status == 200, last
    assert last["model"] == "last_click"
    assert [t["click_id"] for t in last["touches"]] == clicks
    assert [Decimal(t["credit"]) for t in last["touches"]] == [0, 0, 1]
    assert click_id_of(other.headers["Location"]) not in {t["click_id"] for t in last["touches"]}

    status, linear = await s.api("GET", f"/api/conversions/{conversion}/attribution?model=linear")
    credits = [Decimal(t["credit"]) for t in linear["touches"]]
    assert sum(credits) == 1 and max(credits) - min(credits) <= Decimal("0.000001")
    status, body = await s.api("GET", f"/api/conversions/{conversion}/attribution?model=magic")
    assert (status, body["error"]["field"]) == (400, "model")
    status, body = await s.api("GET", "/api/conversions/01JD0000000000000000000000/attribution")
    assert (status, body["error"]["code"]) == (404, "unknown_conversion")
