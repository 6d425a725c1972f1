"""Spool files left behind (a worker died while Redis was away) are replayed by whichever
worker starts next; a line torn by the crash is skipped, the rest kept."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import orjson

from tracker.settings import Settings

from ..api.test_reports import click, impression
from ..conftest import eventually, start


async def test_a_dead_workers_spool_is_replayed(settings: Settings, pg: asyncpg.Connection) -> None:
    runner, running = await start(settings)
    try:
        campaign = await running.create_campaign(slug="spooled")
    finally:
        await running.close()
        await runner.cleanup()
    now = datetime.now(UTC)
    folder = settings.data_dir / "spool"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [orjson.dumps({"kind": "click", "event": {k: v for k, v in click(campaign["id"], now).items()
                                                      if k != "is_unique"},
                           "visitor": f"v{i}", "bot": False}) for i in range(7)]
    lines.append(orjson.dumps({"kind": "event", "event": impression(campaign["id"], now)}))
    (folder / "12345-dead.spool").write_bytes(b"\n".join(lines) + b'\n{"kind": "cli')

    runner, running = await start(settings)
    try:
        async def replayed() -> bool:
            return (await pg.fetchval("SELECT count(*) FROM clicks"),
                    await pg.fetchval("SELECT count(*) FROM impressions")) == (7, 1)

        assert await eventually(replayed, timeout=15)
        assert not list(folder.glob("*.spool"))
        assert await pg.fetchval("SELECT count(*) FROM clicks WHERE is_unique") == 7
    finally:
        await running.close()
        await runner.cleanup()
