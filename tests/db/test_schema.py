"""`tracker migrate` and retention, against a real PostgreSQL (upkeep: test_partitions.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tracker.keys import PG
from tracker.storage import db, partitions
from tracker.storage.migrations import migration_files
from tracker.upkeep import PartitionUpkeep

from ..api.test_reports import buffer_events, click, impression
from ..conftest import Running

ROOT = Path(__file__).resolve().parents[2]


def _database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def test_migrate_applies_once_and_records_versions(backing: tuple[str, str]) -> None:
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = await db.connect(backing[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _database(backing[0], name)
    try:
        env = os.environ | {"DATABASE_URL": url}
        first = subprocess.run([sys.executable, "-m", "tracker", "migrate"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        names = [path.name for _, path in migration_files()]
        assert names[:2] == ["001_core.sql", "002_money.sql"]
        assert "applied: " + ", ".join(names) in first.stdout
        again = subprocess.run([sys.executable, "-m", "tracker", "migrate"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "up to date" in again.stdout
        conn = await db.connect(url)
        assert [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations "
                                                   "ORDER BY version")] == \
            [path.name for _, path in migration_files()]
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_two_instances_migrating_a_new_database_at_once_apply_each_migration_once(
        backing: tuple[str, str]) -> None:
    """Every instance migrates on start: started together, one applies each migration, the
    other waits for it and finds it done (tests/db/test_pgbouncer.py: the same through
    PgBouncer)."""
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = await db.connect(backing[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _database(backing[0], name)
    try:
        await two_migrate_at_once(url)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_bad_settings_stop_the_service_with_a_clear_message() -> None:
    env = os.environ | {"TRACKER_WORKERS": "many"}
    result = subprocess.run([sys.executable, "-m", "tracker", "serve"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TRACKER_WORKERS must be an integer" in result.stderr


async def test_retention_drops_old_raw_events_and_keeps_their_reports(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="old")
    old, older = date(2020, 1, 1), date(2020, 1, 2)
    for table in partitions.TABLES:  # the old day has a partition; the one after it has not
        await pg.execute(f"DROP TABLE IF EXISTS {table}_20200101")
        await partitions.create_partition(pg, table, old)
    today = datetime.now(UTC)
    later = today + timedelta(days=40)  # in DEFAULT too, but recent: retention keeps it
    await buffer_events(s, [
        *(click(c["id"], at(old, 10 + i)) for i in range(3)),
        *(impression(c["id"], at(old, 11 + i)) for i in range(2)),
        *(click(c["id"], at(older, 9 + i)) for i in range(2)),
        impression(c["id"], at(older, 9)),
        click(c["id"], today), impression(c["id"], today), click(c["id"], later),
    ])
    counts = "SELECT (SELECT count(*) FROM clicks), (SELECT count(*) FROM impressions)"
    assert tuple(await pg.fetchrow(counts)) == (7, 4)
    assert await pg.fetchval("SELECT count(*) FROM clicks_default WHERE ts < '2021-01-01'") == 2

    await PartitionUpkeep(s.app[PG], days_ahead=7, retention_days=30).run_once()

    assert await pg.fetchval("SELECT to_regclass('clicks_20200101')") is None
    assert await pg.fetchval("SELECT to_regclass('impressions_20200101')") is None
    assert tuple(await pg.fetchrow(counts)) == (2, 1)  # today's and the later one
    assert await pg.fetchval("SELECT min(ts) FROM clicks") > today - timedelta(minutes=1)
    status, body = await s.api(
        "GET", "/api/reports?from=2020-01-01&to=2020-01-02&tz=UTC&group_by=day")
    assert status == 200, body
    assert [(r["day"], r["clicks"], r["impressions"]) for r in body["rows"]] == \
        [("2020-01-01", 3, 2), ("2020-01-02", 2, 1)]


def at(day: date, hour: int) -> datetime:
    return datetime.combine(day, time(hour), UTC)


async def two_migrate_at_once(url: str) -> None:
    """Two migrations of the database at `url` at once: each file applied once, by one."""
    import asyncio

    from tracker.storage.migrations import migrate

    first, second = await asyncio.gather(migrate(url), migrate(url))
    names = [path.name for _, path in migration_files()]
    assert sorted(first + second) == sorted(names)
    conn = await db.connect(url)
    assert [r["name"] for r in await conn.fetch(
        "SELECT name FROM schema_migrations ORDER BY version")] == names
    await conn.close()
