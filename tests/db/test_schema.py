"""`tracker migrate`, partition upkeep and retention, against a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tracker.storage.migrations import migration_files

ROOT = Path(__file__).resolve().parents[2]


def _database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def test_migrate_applies_once_and_records_versions(backing: tuple[str, str]) -> None:
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(backing[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _database(backing[0], name)
    try:
        env = os.environ | {"DATABASE_URL": url}
        first = subprocess.run([sys.executable, "-m", "tracker", "migrate"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert "applied: 001_core.sql" in first.stdout
        again = subprocess.run([sys.executable, "-m", "tracker", "migrate"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "up to date" in again.stdout
        conn = await asyncpg.connect(url)
        assert [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations "
                                                   "ORDER BY version")] == \
            [path.name for _, path in migration_files()]
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_bad_settings_stop_the_service_with_a_clear_message() -> None:
    env = os.environ | {"TRACKER_WORKERS": "many"}
    result = subprocess.run([sys.executable, "-m", "tracker", "serve"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TRACKER_WORKERS must be an integer" in result.stderr


async def test_retention_drops_whole_old_partitions_and_keeps_rollups(pg: asyncpg.Connection) -> None:
    await pg.execute("SELECT tracker_create_partition('clicks', (now() AT TIME ZONE 'UTC')::date)")
    await pg.execute("CREATE TABLE clicks_20200101 PARTITION OF clicks "
                     "FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00')")
    await pg.execute("INSERT INTO rollup_15m (bucket, campaign_id, clicks) "
                     "VALUES ('2020-01-01 10:00+00', 1, 5)")
    dropped = await pg.fetchval("SELECT tracker_drop_partitions(30)")
    assert dropped >= 1
    assert await pg.fetchval("SELECT to_regclass('clicks_20200101')") is None
    assert await pg.fetchval("SELECT to_regclass('clicks_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD'))")
    assert await pg.fetchval("SELECT sum(clicks) FROM rollup_15m") == 5
