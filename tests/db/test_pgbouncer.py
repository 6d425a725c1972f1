"""The service behind PgBouncer in transaction mode (Debian's `pgbouncer`; these tests skip,
saying how to install it, when it is absent, and fail under TRACKER_REQUIRE_TOOLS=1).

PgBouncer's pool here has a few server connections for every client: anything the service
left on the server between transactions (a prepared statement, a temp table, a session
lock) would land on another client's transaction or be missing from its own next one. The
whole suite can also run through one (TRACKER_TEST_PGBOUNCER=1, see .ci/run); these tests
run in every suite.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from tracker.settings import Settings
from tracker.storage import db

from ..api.test_postback import click_id_of, postback
from ..api.test_reports import click, impression
from ..conftest import eventually, flush, start
from ..pgbouncer import PgBouncer
from .test_schema import two_migrate_at_once
from .test_writer import ROLLED, RECOUNT, add, counts, writer_for


def _through(bouncer: PgBouncer, direct_url: str) -> str:
    return bouncer.url(direct_url.rsplit("/", 1)[1].split("?")[0])


async def test_clicks_lookups_postbacks_and_reports_through_pgbouncer(
        pgbouncer: PgBouncer, direct_backing: tuple[str, str], settings: Settings,
        pg: asyncpg.Connection) -> None:
    direct = await db.connect(direct_backing[0])
    through = settings.with_(database_url=_through(pgbouncer, direct_backing[0]))
    runner, s = await start(through)
    try:
        await s.create_campaign(slug="pooled", payouts=[{"event": "sale", "amount": "3.00"}])
        answers = await asyncio.gather(*(s.click("pooled", f"pub=p{i % 3}&sub1={i}")
                                         for i in range(60)))
        ids = [click_id_of(r.headers["Location"]) for r in answers]
        await flush(s)
        # Many lookups at once: far more clients than PgBouncer has server connections.
        looked = await asyncio.gather(*(s.api("GET", f"/api/clicks/{i}") for i in ids))
        assert [status for status, _ in looked] == [200] * 60
        for click_id in ids[:10]:
            status, body = await postback(s, f"click_id={click_id}&event=sale&txid=t-{click_id}")
            assert status == 200 and body["status"] == "accepted", body
        await flush(s)

        async def converted() -> bool:
            return bool(await direct.fetchval("SELECT count(*) FROM conversions") == 10)

        assert await eventually(converted)
        status, report = await s.api("GET", "/api/reports?group_by=campaign")
        assert status == 200, report
        assert (report["totals"]["clicks"], report["totals"]["conversions"]) == (60, 10)
        assert report["totals"]["revenue"] == "30"
        assert await direct.fetchval("SELECT count(*) FROM clicks") == 60
    finally:
        await s.close()
        await runner.cleanup()
        await direct.close()


async def test_a_replayed_batch_through_pgbouncer_changes_nothing(
        pgbouncer: PgBouncer, direct_backing: tuple[str, str], settings: Settings,
        pg: asyncpg.Connection) -> None:
    """The writer's road for a batch stored before (its transaction rolled back, the rows
    inserted again from arrays) works on whatever server connection each transaction gets."""
    through = settings.with_(database_url=_through(pgbouncer, direct_backing[0]))
    redis = aioredis.Redis.from_url(through.redis_url)
    writer = writer_for(through, redis)
    await writer.ensure_group()
    now = datetime.now(UTC)
    await add(redis, through, [click(7, now, pub=str(i % 3)) for i in range(40)]
              + [impression(7, now) for _ in range(10)])
    batch = await writer._read(0, ">")
    await writer.write(batch[:20])
    await writer.write(batch)
    await writer.write(batch)
    assert await counts(pg) == (40, 10, 40, 10)
    assert [tuple(r) for r in await pg.fetch(ROLLED)] == [tuple(r) for r in await pg.fetch(RECOUNT)]
    await writer.close()
    await redis.aclose()


async def test_two_instances_migrate_a_new_database_at_once_through_pgbouncer(
        pgbouncer: PgBouncer, direct_backing: tuple[str, str], tmp_path: Path) -> None:
    """Every instance migrates on start. Through PgBouncer a session lock could be taken on
    one server connection and released on another: the migrations' lock lives in their
    transactions, and each is applied once."""
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = await db.connect(direct_backing[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await two_migrate_at_once(pgbouncer.url(name))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
