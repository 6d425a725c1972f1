"""Starting and staying up through outages, on throwaway servers of the tests' own (never the
shared ones): a worker starts with what it can reach, answers redirects from the campaigns as
last known, and catches up when PostgreSQL and Redis come back. An unknown slug never costs a
query."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from tracker.embedded import EmbeddedPostgres
from tracker.settings import Settings
from tracker.storage import db
from tracker.storage.migrations import migrate

from ..conftest import BROWSER, OwnRedis, PgProxy, Served, eventually, start


def throwaway_postgres() -> EmbeddedPostgres:
    # Short path: PostgreSQL's socket path is bounded.
    return EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="trkd")))


async def clicks_in(database_url: str) -> int:
    conn = await db.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM clicks")
        return count
    finally:
        await conn.close()


async def test_serve_starts_while_postgres_and_redis_are_down(tmp_path: Path) -> None:
    postgres, redis = throwaway_postgres(), OwnRedis(tmp_path)
    postgres.start()
    redis.start()
    urls = (postgres.url, redis.url)
    data = tmp_path / "data"
    first = Served(urls, data, "down")
    try:
        # A first run knows the campaign and keeps a snapshot of it.
        await first.ready()
        snapshot = data / "campaigns.json"

        async def saved() -> bool:
            return snapshot.exists() and b'"down"' in snapshot.read_bytes()

        assert await eventually(saved, timeout=10)
        first.stop()
        postgres.stop()
        redis.stop()

        # Both down: the service starts all the same, and answers redirects.
        second = Served(urls, data, prefix=first.prefix)
        try:
            await second.healthy()
            answered = []
            async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
                for i in range(20):
                    async with http.get(f"{second.base}/c/down?sub1={i}", allow_redirects=False) as r:
                        assert r.status == 302, await r.text()
                        answered.append(r.headers["Location"])
                async with http.get(f"{second.base}/readyz") as r:
                    body = await r.json()
                    assert r.status == 503 and {"postgres", "redis"} <= set(body["not_ready"])
            assert len(set(answered)) == 20

            # They come back: every event answered during the outage reaches PostgreSQL.
            postgres.start()
            redis.start()

            async def stored() -> bool:
                try:
                    return await clicks_in(postgres.url) == 20
                except (OSError, asyncpg.PostgresError):
                    return False

            assert await eventually(stored, timeout=60), second.output.read_text()
            await asyncio.sleep(1.0)  # nothing doubled
            assert await clicks_in(postgres.url) == 20
            second.stop()
        finally:
            await second.close()
    finally:
        await first.close()
        redis.stop()
        postgres.stop()


async def test_a_worker_with_nothing_known_answers_503_until_postgres_answers(
        settings: Settings, tmp_path: Path) -> None:
    """No snapshot and PostgreSQL away since start: a link may well be real, so not a 404;
    once PostgreSQL answers, campaigns load without a restart."""
    postgres = throwaway_postgres()
    postgres.start()
    url = postgres.url
    postgres.stop()
    runner, running = await start(settings.with_(database_url=url, data_dir=tmp_path / "fresh"))
    try:
        r = await running.click("anything")
        assert r.status == 503
        status, body = await running.api("GET", "/readyz", headers={})
        assert status == 503 and "postgres" in body["not_ready"]
        postgres.start()
        await migrate(url)
        campaign = await running.create_campaign(slug="later")
        assert campaign["slug"] == "later"
        assert (await running.click("later")).status == 302
        assert (await running.click("anything")).status == 404
    finally:
        await running.close()
        await runner.cleanup()
        postgres.stop()


async def test_unknown_slugs_never_reach_postgres(settings: Settings, backing: tuple[str, str]) -> None:
    proxy = PgProxy(backing[0])
    await proxy.start()
    # Slow periodic refresh and no postback polling: only what the probes cause is counted.
    runner, running = await start(settings.with_(database_url=proxy.url,
                                                 campaign_refresh_seconds=3600),
                                  run_deliverer=False)
    try:
        await running.create_campaign(slug="known")
        await asyncio.sleep(1.0)  # the start's loads and the creation's reload are done
        before = proxy.statements
        limit = asyncio.Semaphore(50)

        async def probe() -> int:
            async with limit:
                return (await running.click(secrets.token_urlsafe(9))).status

        statuses = await asyncio.gather(*(probe() for _ in range(10_000)))
        assert set(statuses) == {404}
        assert proxy.statements == before, f"{proxy.statements - before} statements reached PostgreSQL"
        assert (await running.click("known")).status == 302

        # PostgreSQL away: still a 404 for unknown slugs (never a 500), still a 302 for ours.
        await proxy.stop()
        assert (await running.click(secrets.token_urlsafe(9))).status == 404
        assert (await running.click("known")).status == 302
    finally:
        await running.close()
        await runner.cleanup()
        await proxy.stop()


async def test_a_start_during_an_outage_serves_live_campaigns_as_last_known(
        settings: Settings, backing: tuple[str, str]) -> None:
    """A deleted campaign stays deleted in the snapshot; a paused one stays paused."""
    proxy = PgProxy(backing[0])
    await proxy.start()
    settings = settings.with_(database_url=proxy.url)
    runner, running = await start(settings)
    try:
        await running.create_campaign(slug="live")
        gone = await running.create_campaign(slug="gone")
        paused = await running.create_campaign(slug="resting")
        await running.api("DELETE", f"/api/campaigns/{gone['id']}")
        await running.api("PATCH", f"/api/campaigns/{paused['id']}", json={"status": "paused"})
        snapshot = settings.data_dir / "campaigns.json"

        async def saved() -> bool:
            if not snapshot.exists():
                return False
            rows = {r["slug"]: r["status"] for r in orjson.loads(snapshot.read_bytes())}
            return rows == {"live": "active", "resting": "paused"}

        assert await eventually(saved, timeout=10)
    finally:
        await running.close()
        await runner.cleanup()
    await proxy.stop()  # PostgreSQL away from here on
    runner, running = await start(settings)
    try:
        assert (await running.click("live")).status == 302
        assert (await running.click("gone")).status == 404
        assert (await running.click("resting")).status == 404
    finally:
        await running.close()
        await runner.cleanup()
