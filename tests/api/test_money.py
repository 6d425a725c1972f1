"""Money end to end: whatever cost a campaign accepts, its clicks and impressions are stored
and reported exactly (N events cost N × the unit cost, as decimals), CPM included."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

from tracker import money

from ..conftest import Running, flush

# Every string the campaign API accepts as a cost: up to 12 integer digits, up to 6 decimals.
COSTS = st.builds(
    lambda whole, fraction: whole + (f".{fraction}" if fraction else ""),
    st.from_regex(r"0|[1-9][0-9]{0,11}", fullmatch=True),
    st.from_regex(r"[0-9]{0,6}", fullmatch=True),
)


async def _events(s: Running, slug: str, clicks: int, impressions: int) -> None:
    for _ in range(clicks):
        assert (await s.click(slug)).status == 302
    for _ in range(impressions):
        async with s.track.get(s.url(f"/i/{slug}")) as r:
            assert r.status == 200


async def _reported_cost(s: Running, campaign_id: int) -> str:
    status, report = await s.api("GET", f"/api/reports?campaign={campaign_id}")
    assert status == 200, report
    cost: str = report["totals"]["cost"]
    return cost


async def test_a_cpm_cost_with_four_decimals_is_stored_not_dead_lettered(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    campaign = await s.create_campaign(slug="cpm4", cost_model="cpm", cost_value="1.2345")
    await _events(s, "cpm4", clicks=0, impressions=3)
    await flush(s)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    costs = [r["cost"] for r in await pg.fetch("SELECT cost FROM impressions")]
    assert costs == [Decimal("0.0012345")] * 3
    assert await _reported_cost(s, campaign["id"]) == "0.0037035"


@hypothesis_settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cost=COSTS, model=st.sampled_from(["cpc", "cpm"]),
       clicks=st.integers(0, 4), impressions=st.integers(0, 4))
async def test_any_accepted_cost_is_stored_and_reported_exactly(
        quiet_service: Running, pg: asyncpg.Connection, cost: str, model: str, clicks: int,
        impressions: int) -> None:
    s = quiet_service
    slug = f"m{uuid.uuid4().hex[:12]}"
    campaign = await s.create_campaign(slug=slug, cost_model=model, cost_value=cost)
    unit = Decimal(cost) if model == "cpc" else Decimal(cost) / 1000
    billed = clicks if model == "cpc" else impressions
    await _events(s, slug, clicks, impressions)
    await flush(s)

    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    stored = await pg.fetchrow(
        """SELECT (SELECT count(*) FROM clicks WHERE campaign_id = $1) AS clicks,
                  (SELECT count(*) FROM impressions WHERE campaign_id = $1) AS impressions,
                  (SELECT coalesce(sum(cost), 0) FROM clicks WHERE campaign_id = $1)
                + (SELECT coalesce(sum(cost), 0) FROM impressions WHERE campaign_id = $1) AS cost""",
        campaign["id"])
    assert (stored["clicks"], stored["impressions"]) == (clicks, impressions)
    assert stored["cost"] == billed * unit
    assert Decimal(await _reported_cost(s, campaign["id"])) == billed * unit
    assert await _reported_cost(s, campaign["id"]) == money.to_str(billed * unit)
