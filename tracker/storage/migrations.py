"""Applies sql/NNN_name.sql in order, once each, recording what was applied.

Safe to run from several processes at once: each migration is applied in a transaction of
its own, under a transaction-level advisory lock, after reading the ledger again under it. A
session lock would not do behind PgBouncer in transaction mode: taken on one server
connection, it could be released on another, or never.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from . import db

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent.parent / "sql"
_NAME = re.compile(r"(\d{3,})_[a-z0-9_]+\.sql")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
LOCK = "SELECT pg_advisory_xact_lock(hashtext('tracker_migrations'))"
APPLIED = "SELECT version FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"


def migration_files(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    versions = [v for v, _ in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migrations in {sql_dir} share a number")
    return found


async def migrate(dsn: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply what is missing; return the names applied (empty when up to date)."""
    conn = await db.connect(dsn)
    applied_now: list[str] = []
    try:
        while True:
            async with conn.transaction():
                await conn.execute(LOCK)
                await conn.execute(CREATE_LEDGER)
                done = {r["version"] for r in await conn.fetch(APPLIED)}
                missing = [(v, p) for v, p in migration_files(sql_dir) if v not in done]
                if not missing:
                    return applied_now
                version, path = missing[0]
                await conn.execute(path.read_text())
                await conn.execute(RECORD, version, path.name)
            log.debug("applied migration %s", path.name)
            applied_now.append(path.name)
    finally:
        await conn.close()
