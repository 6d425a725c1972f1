"""GET /i/{slug}: the impression pixel answers its GIF whatever happens."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import asyncpg

from tracker.handlers.tracking import GIF
from tracker.settings import Settings

from ..conftest import OwnRedis, Running, eventually, start


async def _pixel(service: Running, path: str, **kwargs: object) -> tuple[int, bytes, dict[str, str]]:
    async with service.http.get(service.url(path), **kwargs) as r:  # type: ignore[arg-type]
        return r.status, await r.read(), dict(r.headers)


async def test_pixel_records_an_impression(service: Running, pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="imp", cost_model="cpm", cost_value="2.50")
    status, body, headers = await _pixel(service, "/i/imp?pub=site1&sub1=top")
    assert status == 200 and body == GIF
    assert headers["Content-Type"] == "image/gif"
    assert headers["Cache-Control"] == "no-store"
    row = await eventually(lambda: pg.fetchrow("SELECT * FROM impressions"))
    assert row["pub"] == "site1" and row["sub1"] == "top" and not row["is_bot"]
    assert row["cost"] == Decimal("0.0025")


async def test_pixel_answers_the_gif_even_when_nothing_can_be_recorded(service: Running) -> None:
    for path in ["/i/unknown", "/i/a%00b", "/i/x?pub=" + "a" * 5000, "/i/imp?sub1=%FF%FE"]:
        status, body, headers = await _pixel(service, path)
        assert status == 200 and body == GIF, path
        assert headers["Cache-Control"] == "no-store"


async def test_a_redis_outage_loses_no_event(settings: Settings, pg: asyncpg.Connection,
                                            tmp_path: Path) -> None:
    """A Redis of the test's own dies under a running worker: redirects and pixels still
    answer, the events wait in the local spool, and when Redis is back (empty: it kept no
    data) every one of them reaches PostgreSQL exactly once."""
    own = OwnRedis(tmp_path)
    own.start()
    runner, running = await start(settings.with_(redis_url=own.url))
    try:
        await running.create_campaign(slug="down")
        assert (await running.click("down")).status == 302
        # Stored before the outage: this Redis keeps nothing on disk (deploy/ runs it with AOF),
        # and a sharded writer looks at its streams every 20 ms.
        assert await eventually(lambda: _count(pg, "clicks", 1))
        own.stop()
        before = dropped("click"), dropped("impression")
        answered = []
        for i in range(20):
            r = await running.click("down", f"sub1={i}")
            assert r.status == 302 and r.headers["Location"].startswith("https://shop.example/lp")
            assert "tlc" in r.cookies  # recorded: the last-click cookie names it
            answered.append(r.cookies["tlc"].value)
        for _ in range(5):
            status, body, _ = await _pixel(running, "/i/down")
            assert status == 200 and body == GIF
        assert (dropped("click"), dropped("impression")) == before
        assert list((tmp_path / "spool").glob("*.spool"))
        status, body = await running.api("GET", f"/api/clicks/{answered[0]}")
        assert status == 503  # cannot say yet: it may be in the spool

        own.start()

        async def all_in() -> bool:
            clicks = await pg.fetchval("SELECT count(*) FROM clicks")
            impressions = await pg.fetchval("SELECT count(*) FROM impressions")
            return (clicks, impressions) == (21, 5)

        assert await eventually(all_in, timeout=20)
        await asyncio.sleep(1.5)  # a second replay would show up now
        assert await pg.fetchval("SELECT count(DISTINCT id) FROM clicks") == 21
        assert await pg.fetchval("SELECT sum(clicks) FROM rollup_15m") == 21
        assert await pg.fetchval("SELECT sum(impressions) FROM rollup_15m") == 5
        assert not list((tmp_path / "spool").glob("*.spool"))
        status, body = await running.api("GET", f"/api/clicks/{answered[0]}")
        assert status == 200 and body["sub1"] == "0"
    finally:
        await running.close()
        await runner.cleanup()
        own.stop()


def dropped(kind: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "tracker_events_dropped_total", {"type": kind, "reason": "buffer_unavailable"})
    return value or 0.0


async def test_redirect_answers_within_seconds_when_redis_hangs(settings: Settings,
                                                                tmp_path: Path) -> None:
    """A Redis that stops answering (not down: stuck) must not hold visitors hostage."""
    import threading
    import time

    import redis

    own = OwnRedis(tmp_path)
    own.start()
    runner, running = await start(settings.with_(redis_url=own.url))
    try:
        await running.create_campaign(slug="stuck")
        assert (await running.click("stuck")).status == 302
        # redis-py 8 gives up on a reply after 5 s by default: as long as the sleep itself.
        stuck = redis.Redis.from_url(own.url, socket_timeout=30)
        sleeper = threading.Thread(target=lambda: stuck.execute_command("DEBUG", "SLEEP", "5"))
        sleeper.start()
        time.sleep(0.2)
        started = time.monotonic()
        r = await running.click("stuck")
        waited = time.monotonic() - started
        assert r.status == 302 and r.headers["Location"].startswith("https://shop.example/lp")
        assert waited < 4.5, waited
        sleeper.join()
        stuck.close()
    finally:
        await running.close()
        await runner.cleanup()
        own.stop()


async def _count(pg: asyncpg.Connection, table: str, n: int) -> bool:
    return await pg.fetchval(f"SELECT count(*) FROM {table}") == n
