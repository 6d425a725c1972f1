"""Partition upkeep against a real PostgreSQL: a day's DEFAULT rows never block its partition,
and nothing about upkeep keeps a worker from starting."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg
from prometheus_client import REGISTRY

from tracker.ids import decode_id, new_id
from tracker.keys import PG
from tracker.settings import Settings
from tracker.storage import db
from tracker.storage import partitions as db_partitions
from tracker.upkeep import PartitionUpkeep

from ..api.test_reports import buffer_events, click, impression
from ..conftest import Running, eventually, start

ROLLUPS = "SELECT * FROM rollup_15m ORDER BY bucket, campaign_id, dims"
WHERE = "SELECT tableoid::regclass::text AS part, count(*) AS n FROM {} WHERE id = $1 GROUP BY 1"


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), UTC)


async def where(pg: asyncpg.Connection, table: str, event: dict[str, Any]) -> list[tuple[str, int]]:
    """The partitions holding the event, and how many rows of it each holds."""
    event_id, _ = decode_id(event["id"])
    return [(r["part"], r["n"]) for r in await pg.fetch(WHERE.format(table), event_id)]


async def test_upkeep_moves_a_days_default_rows_into_its_new_partition(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="later")
    day = datetime.now(UTC).date() + timedelta(days=10)  # beyond the 7 days made ahead
    await pg.execute(f"DROP TABLE IF EXISTS clicks_{day:%Y%m%d}, impressions_{day:%Y%m%d}")
    early, late = click(c["id"], noon(day)), click(c["id"], noon(day) + timedelta(hours=11))
    shown = impression(c["id"], noon(day))
    long_ago = click(c["id"], noon(date(2019, 6, 1)))  # a day upkeep does not make
    await buffer_events(s, [early, late, shown, long_ago])
    assert await where(pg, "clicks", early) == [("clicks_default", 1)]
    assert await where(pg, "impressions", shown) == [("impressions_default", 1)]
    rollups = await pg.fetch(ROLLUPS)

    await PartitionUpkeep(s.app[PG], days_ahead=12, retention_days=0).run_once()

    for event in (early, late):
        assert await where(pg, "clicks", event) == [(f"clicks_{day:%Y%m%d}", 1)]
    assert await where(pg, "impressions", shown) == [(f"impressions_{day:%Y%m%d}", 1)]
    assert await where(pg, "clicks", long_ago) == [("clicks_default", 1)]
    assert await pg.fetchval("SELECT count(*) FROM clicks") == 3
    assert await pg.fetch(ROLLUPS) == rollups  # they counted these rows when first written


async def test_a_worker_starts_and_answers_while_a_default_row_blocks_a_day(
        settings: Settings, pg: asyncpg.Connection) -> None:
    day = datetime.now(UTC).date() + timedelta(days=settings.partition_days_ahead)
    part = f"clicks_{day:%Y%m%d}"
    await pg.execute(f"DROP TABLE IF EXISTS {part}")
    event_id, ts = decode_id(str(new_id(int(noon(day).timestamp() * 1000))))
    await pg.execute("INSERT INTO clicks (id, ts, campaign_id, visitor_id, is_unique, is_bot, "
                     "destination) VALUES ($1, $2, 1, 'v', true, false, 'https://shop.example/')",
                     event_id, ts)
    assert await pg.fetchval("SELECT tableoid::regclass::text FROM clicks") == "clicks_default"

    runner, running = await start(settings)
    try:
        await running.create_campaign(slug="blocked")
        r = await running.click("blocked")
        assert r.status == 302 and r.headers["Location"].startswith("https://shop.example/lp")

        async def moved() -> bool:
            return await pg.fetchval("SELECT tableoid::regclass::text FROM clicks WHERE id = $1",
                                     event_id) == part

        assert await eventually(moved)  # upkeep, in the background, made the day all the same
    finally:
        await running.close()
        await runner.cleanup()


class Unreachable:
    """A pool whose first `failures` connections are refused, as while PostgreSQL is away."""

    def __init__(self, pool: asyncpg.Pool, failures: int) -> None:
        self.pool, self.failures = pool, failures

    def acquire(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("connection refused")
        return self.pool.acquire()


def postgres_errors() -> float:
    return REGISTRY.get_sample_value("tracker_backend_errors_total", {"backend": "postgres"}) or 0.0


async def test_upkeep_retries_while_postgres_is_unreachable(settings: Settings,
                                                            pg: asyncpg.Connection) -> None:
    day = datetime.now(UTC).date() + timedelta(days=14)
    await pg.execute(f"DROP TABLE IF EXISTS clicks_{day:%Y%m%d}")
    pool = await db.create_pool(settings.database_url)
    errors = postgres_errors()
    upkeep = PartitionUpkeep(Unreachable(pool, failures=3), days_ahead=14, retention_days=0,
                             retry_first=0.01, retry_max=0.05)
    upkeep.start()  # returns at once: nobody waits for upkeep
    try:
        async def made() -> bool:
            return bool(await pg.fetchval(f"SELECT to_regclass('clicks_{day:%Y%m%d}')"))

        assert await eventually(made)
        assert postgres_errors() - errors == 3
    finally:
        await upkeep.stop()
        await pool.close()


async def test_workers_making_the_same_days_at_once_never_collide(settings: Settings,
                                                                  pg: asyncpg.Connection) -> None:
    """Several workers (hosts) start together: the one advisory lock lets one CREATE each."""
    today = datetime.now(UTC).date()
    days = [today + timedelta(days=n) for n in range(15, 21)]
    for day in days:
        await pg.execute(f"DROP TABLE IF EXISTS clicks_{day:%Y%m%d}, impressions_{day:%Y%m%d}")
    blocked = click(1, noon(days[-1]))
    event_id, ts = decode_id(blocked["id"])
    await pg.execute("INSERT INTO clicks (id, ts, campaign_id, visitor_id, is_unique, is_bot, "
                     "destination) VALUES ($1, $2, 1, 'v', true, false, 'https://shop.example/')",
                     event_id, ts)
    pool = await db.create_pool(settings.database_url, max_size=4)
    errors = postgres_errors()
    try:
        await asyncio.gather(*(PartitionUpkeep(pool, days_ahead=20, retention_days=0).run_once()
                               for _ in range(4)))
    finally:
        await pool.close()
    assert postgres_errors() == errors
    for day in days:
        assert await pg.fetchval(f"SELECT to_regclass('impressions_{day:%Y%m%d}')")
    assert await where(pg, "clicks", blocked) == [(f"clicks_{days[-1]:%Y%m%d}", 1)]


OLD_PARTITIONS = """
SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
WHERE p.relname IN ('clicks', 'impressions') AND c.relname ~ '_[0-9]{8}$'
  AND right(c.relname, 8) < to_char($1::date, 'YYYYMMDD')"""


async def test_two_instances_running_upkeep_and_retention_at_once_do_each_thing_once(
        settings: Settings, pg: asyncpg.Connection) -> None:
    """Every instance runs the same upkeep at the same moment (here while a third holds the
    lock, so that both find it busy and wait): no errors, and between them each missing
    partition made once, each DEFAULT row moved once, each old partition dropped once, each
    old DEFAULT row deleted once."""
    today = datetime.now(UTC).date()
    cutoff = date(2020, 6, 1)  # retention keeps what is newer (other tests' old days too)
    keep = (today - cutoff).days
    old_days = [date(2020, 1, d) for d in (1, 2, 3)]
    for day in old_days:
        for table in ("clicks", "impressions"):
            await db_partitions.create_partition(pg, table, day)
    ahead = [today + timedelta(days=n) for n in range(21, 25)]
    for day in ahead:
        await pg.execute(f"DROP TABLE IF EXISTS clicks_{day:%Y%m%d}, impressions_{day:%Y%m%d}")
    insert = ("INSERT INTO clicks (id, ts, campaign_id, visitor_id, is_unique, is_bot, "
              "destination) VALUES ($1, $2, 1, 'v', true, false, 'https://shop.example/')")
    waiting, ancient = click(1, noon(ahead[-1])), click(1, noon(date(2019, 5, 1)))
    for event in (waiting, ancient):
        await pg.execute(insert, *decode_id(event["id"]))
    old = await pg.fetchval(OLD_PARTITIONS, cutoff)
    assert old >= 6
    missing = await pg.fetchval(
        "SELECT count(*) FROM unnest($1::text[]) AS t (name) WHERE to_regclass(name) IS NULL",
        [f"{t}_{today + timedelta(days=n):%Y%m%d}" for t in ("clicks", "impressions")
         for n in range(-2, 25)])
    pools = [await db.create_pool(settings.database_url, max_size=2) for _ in range(2)]
    errors = postgres_errors()
    holder = await db.connect(settings.database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(hashtext('tracker_partitions'))")
            both = asyncio.gather(*(PartitionUpkeep(pool, days_ahead=24, retention_days=keep)
                                    .run_once() for pool in pools))
            await asyncio.sleep(0.3)
        passes = await both
    finally:
        await holder.close()
        for pool in pools:
            await pool.close()
    assert postgres_errors() == errors
    assert sum(p.created for p in passes) == missing > 0
    assert sum(p.moved for p in passes) == 1
    assert sum(p.dropped for p in passes) == old
    assert sum(p.pruned for p in passes) == 1
    assert await pg.fetchval(OLD_PARTITIONS, cutoff) == 0
    assert await where(pg, "clicks", waiting) == [(f"clicks_{ahead[-1]:%Y%m%d}", 1)]
    assert await where(pg, "clicks", ancient) == []
