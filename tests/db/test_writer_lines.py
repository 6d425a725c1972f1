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


# The campaign rollups of every grain must equal the 15-minute rollups regrouped.
REGROUPED = """
SELECT g.grain, date_bin(g.step, r.bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
       r.campaign_id, sum(r.impressions), sum(r.bot_impressions), sum(r.clicks),
       sum(r.unique_clicks), sum(r.bot_clicks), sum(r.cost)
FROM rollup_15m r, (VALUES ('15m', interval '15 minutes'), ('1h', interval '1 hour'),
                           ('1d', interval '1 day')) AS g (grain, step)
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
CAMPAIGNS = """
SELECT grain, bucket, campaign_id, impressions, bot_impressions, clicks, unique_clicks,
       bot_clicks, cost
FROM (SELECT '15m' AS grain, * FROM rollup_campaign_15m UNION ALL
      SELECT '1h', * FROM rollup_campaign_1h UNION ALL
      SELECT '1d', * FROM rollup_campaign_1d) AS c
WHERE clicks <> 0 OR impressions <> 0 OR bot_clicks <> 0 OR bot_impressions <> 0
ORDER BY 1, 2, 3"""


async def campaign_rollups_agree(pg: asyncpg.Connection) -> bool:
    regrouped = [tuple(r) for r in await pg.fetch(REGROUPED)]
    return bool(regrouped) and regrouped == [tuple(r) for r in await pg.fetch(CAMPAIGNS)]


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
        assert await campaign_rollups_agree(pg)
        await writer.write(batch)
        await writer.write(batch[:1])
        assert await counts(pg) == (60, 60, 60, 60)
        assert [tuple(r) for r in await pg.fetch(ROLLED)] == recount
        assert await campaign_rollups_agree(pg)
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


async def test_a_change_to_the_rollups_outside_the_writer_reaches_the_campaign_rollups(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """A tool's (or an operator's) insert, update and delete of 15-minute rows are carried
    over to the campaign rollups by 007's triggers, as ever; only the writer's own fold
    does that itself."""
    c = (await quiet_service.create_campaign(slug="manual"))["id"]
    await pg.execute("INSERT INTO rollup_15m (bucket, campaign_id, pub, clicks, cost) VALUES "
                     "('2026-01-01 10:15+00', $1, 'a', 3, 0.3), ('2026-01-01 11:45+00', $1, 'b', 2, 0.2)", c)
    await pg.execute("UPDATE rollup_15m SET clicks = clicks + 5 WHERE pub = 'a'")
    await pg.execute("DELETE FROM rollup_15m WHERE pub = 'b'")
    assert await campaign_rollups_agree(pg)
    assert await pg.fetchval("SELECT clicks FROM rollup_campaign_1d WHERE campaign_id = $1", c) == 8
