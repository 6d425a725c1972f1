"""PostgreSQL goes away under a running worker (a throwaway server of the test's own):
redirects keep answering, /readyz names PostgreSQL, and when it returns the backlog drains
with nothing lost and nothing doubled."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncpg
import pytest

from tracker.embedded import embedded_postgres
from tracker.settings import Settings
from tracker.storage.migrations import migrate

from ..conftest import start


@pytest.mark.slow
async def test_redirects_survive_a_postgres_outage_and_the_backlog_drains(settings: Settings) -> None:
    folder = Path(tempfile.mkdtemp(prefix="trko"))
    outage = embedded_postgres(folder)
    db_url = outage.__enter__()
    await migrate(db_url)
    runner, running = await start(settings.with_(database_url=db_url))
    try:
        await running.create_campaign(slug="outage")
        assert (await running.click("outage")).status == 302
        outage.__exit__(None, None, None)  # PostgreSQL stops

        answers = [await running.click("outage", f"sub1={i}") for i in range(50)]
        assert all(r.status == 302 for r in answers)
        status, body = await running.api("GET", "/readyz", headers={})
        assert status == 503 and "postgres" in body["not_ready"]
        assert body["backlog"]["events"] >= 50

        outage = embedded_postgres(folder)  # back, same data, same address
        assert outage.__enter__() == db_url
        conn = await asyncpg.connect(db_url)
        try:
            for _ in range(200):
                if await conn.fetchval("SELECT count(*) FROM clicks") == 51:
                    break
                await asyncio.sleep(0.1)
            assert await conn.fetchval("SELECT count(*) FROM clicks") == 51
            assert await conn.fetchval("SELECT count(DISTINCT sub1) FROM clicks") == 51
            assert await conn.fetchval("SELECT sum(clicks) FROM rollup_15m") == 51
        finally:
            await conn.close()
        status, body = await running.api("GET", "/readyz", headers={})
        assert status == 200, body
    finally:
        await running.close()
        await runner.cleanup()
        outage.__exit__(None, None, None)
