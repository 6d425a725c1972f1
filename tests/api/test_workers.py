"""What holds across workers and over time: campaign changes reach every worker, partitions
exist ahead, GeoIP2 files decide the country."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, timedelta
from pathlib import Path

import asyncpg

from tracker.keys import UPKEEP
from tracker.settings import Settings

from ..conftest import Running, eventually, free_port, start


async def test_a_change_made_on_one_worker_reaches_the_others(settings: Settings) -> None:
    runner_a, a = await start(settings)
    runner_b, b = await start(settings.with_(listen=f"127.0.0.1:{free_port()}"))
    try:
        campaign = await a.create_campaign(slug="shared")
        assert (await b.click("shared")).headers["Location"].startswith("https://shop.example/lp")
        status, _ = await a.api("PATCH", f"/api/campaigns/{campaign['id']}",
                                json={"destination_url": "https://moved.example/"})
        assert status == 200

        async def b_follows() -> bool:
            return (await b.click("shared")).headers.get("Location") == "https://moved.example/"

        assert await eventually(b_follows, timeout=5)
        await a.api("PATCH", f"/api/campaigns/{campaign['id']}", json={"status": "paused"})

        async def b_paused() -> bool:
            return (await b.click("shared")).status == 404

        assert await eventually(b_paused, timeout=5)
        await a.api("DELETE", f"/api/campaigns/{campaign['id']}")
        await a.api("PATCH", f"/api/campaigns/{campaign['id']}", json={"status": "active"})
        await asyncio.sleep(0.3)
        assert (await b.click("shared")).status == 404
    finally:
        for runner, running in [(runner_a, a), (runner_b, b)]:
            await running.close()
            await runner.cleanup()


async def test_daily_partitions_exist_ahead_and_take_the_rows(service: Running,
                                                            pg: asyncpg.Connection) -> None:
    # No clock read here: a test that straddles midnight UTC must agree with itself. The days
    # ahead count from the day upkeep worked from, the partition from the row's own ts.
    upkeep = service.app[UPKEEP]

    async def first_pass() -> date | None:
        return upkeep.last_pass

    today = await eventually(first_pass)
    assert today is not None
    names = {r["relname"] for r in await pg.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'clicks'")}
    for days in range(-2, 8):
        assert f"clicks_{(today + timedelta(days=days)):%Y%m%d}" in names
    await service.create_campaign(slug="part")
    await service.click("part")
    row = await eventually(lambda: pg.fetchrow("SELECT tableoid::regclass::text AS part, ts "
                                               "FROM clicks"))
    assert row["part"] == f"clicks_{row['ts'].astimezone(UTC):%Y%m%d}"


async def test_country_comes_from_a_geoip2_file_before_any_header(
        settings: Settings, pg: asyncpg.Connection, tmp_path: Path) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-Country", ipv4_compatible=True)
    writer.insert_network(IPSet(["127.0.0.0/8"]), {"country": {"iso_code": "NZ"}})
    writer.to_db_file(str(tmp_path / "country.mmdb"))
    runner, running = await start(settings.with_(geoip_db=str(tmp_path / "country.mmdb")))
    try:
        await running.create_campaign(slug="geo2")
        await running.click("geo2", headers={"CF-IPCountry": "DE"})
        assert await eventually(lambda: pg.fetchval("SELECT country FROM clicks")) == "NZ"
    finally:
        await running.close()
        await runner.cleanup()
