"""The batch writer's road for the hot path's events: lines appended by the real buffer
script (one entry a round), COPYed as they came, folded into the rollups by PostgreSQL's
trigger; replays, refused lines and the copies that go at commit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from tracker.ingest.buffer import EventBuffer
from tracker.redis_keys import keys_for
from tracker.settings import Settings
from tracker.storage import rows

from ..conftest import Running
from .test_writer import ROLLED, RECOUNT, assorted, counts, writer_for


def _line(event: dict[str, Any]) -> str:
    if event["type"] == "click":
        return "\t".join(rows.click_row({**event, "is_unique": False}, copy=True)[:-1])
    return "\t".join(rows.impression_row(event, copy=True))


async def buffered(buffer: EventBuffer, events: list[dict[str, Any]]) -> None:
    """The events through the hot path's buffer, in one round (uniqueness decided by it)."""
    await asyncio.gather(*(
        buffer.record_click(e["id"], e["campaign_id"], e["visitor_id"], e["is_bot"], _line(e),
                            new_visitor=True)
        if e["type"] == "click" else
        buffer.record(e["id"], e["campaign_id"], e["visitor_id"], _line(e)) for e in events))


async def test_lines_are_stored_and_folded_once_even_when_replayed(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    campaigns = [(await s.create_campaign(slug=f"lines{i}"))["id"] for i in range(2)]
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = keys_for(s.settings)
    buffer = EventBuffer(redis, keys, click_ttl=60, unique_window=3600)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    try:
        await buffered(buffer, assorted(campaigns, datetime.now(UTC)))
        taken = await writer._read_all(">")
        batch = [entry for _, entries in taken for entry in entries]
        assert len(batch) < 120  # entries hold rounds, not events
        assert await writer.write(batch) == 120 and await counts(pg) == (60, 60, 60, 60)
        recount = [tuple(r) for r in await pg.fetch(RECOUNT)]
        assert [tuple(r) for r in await pg.fetch(ROLLED)] == recount
        recent = {name for _, f in batch for name in f[b"k"].split(b",")}
        assert recent
        # The writer died after COMMIT, before XACK: the same entries come again, whole and
        # in part; nothing is stored or counted twice.
        await writer.write(batch)
        await writer.write(batch[:1])
        assert await counts(pg) == (60, 60, 60, 60)
        assert [tuple(r) for r in await pg.fetch(ROLLED)] == recount
        # Acknowledged: out of the stream, the backlog and the sets that named the entries.
        await writer._ack(taken)
        for shard, stream in enumerate(keys.streams):
            assert await redis.xlen(stream) == 0
            assert int(await redis.get(keys.backlog(shard)) or 0) == 0
        for name in recent:
            assert not await redis.exists(name)
    finally:
        await redis.aclose()


async def test_a_line_postgresql_refuses_goes_alone_to_dead_letters(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """A round's lines are COPYed together; one PostgreSQL refuses (here an address no inet
    takes) fails the entry, which is split line by line until that one stands alone. It is
    kept as the JSON event it stands for (what `tracker dead-letters --replay` puts back)."""
    s = quiet_service
    c = (await s.create_campaign(slug="refused"))["id"]
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    buffer = EventBuffer(redis, keys_for(s.settings), click_ttl=60, unique_window=3600)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    from ..api.test_reports import click

    now = datetime.now(UTC)
    good = [click(c, now, sub1=f"ok{i}") for i in range(9)]
    bad = click(c, now, sub1="bad")
    line = _line(bad).replace("\t\\N\t", "\t999.1.2.3\t")
    try:
        await asyncio.gather(
            buffered(buffer, good[:4]),
            buffer.record_click(bad["id"], c, bad["visitor_id"], False, line),
            buffered(buffer, good[4:]))
        assert await writer.step(block=False) == 10
        assert await counts(pg) == (9, 0, 9, 0)
        (dead,) = await pg.fetch("SELECT stream_id, payload, error FROM dead_letters")
        assert "inet" in dead["error"]
        if keys_for(s.settings).shards == 1:  # one entry held all ten: split line by line
            assert "/" in dead["stream_id"]
        assert '"sub1":"bad"' in dead["payload"] and '"ip":"999.1.2.3"' in dead["payload"]
    finally:
        await redis.aclose()
