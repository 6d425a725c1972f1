"""The batch writer alone: replays, poison events, claiming a dead writer's entries."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import pytest
import orjson
import redis.asyncio as aioredis

from tracker.ingest.writer import BatchWriter
from tracker.redis_keys import keys_for
from tracker.settings import Settings
from tracker.storage import db

from ..api.test_reports import click, impression
from ..conftest import Running, eventually, flush


def writer_for(settings: Settings, redis: aioredis.Redis, **kwargs: int) -> BatchWriter:
    options = {"batch_size": 500, "wait_ms": 10, "claim_idle_ms": 30_000} | kwargs
    return BatchWriter(redis, lambda: db.connect(settings.database_url),
                       keys_for(settings), **options)


async def add(redis: aioredis.Redis, settings: Settings, events: list[dict]) -> None:  # type: ignore[type-arg]
    for event in events:
        await redis.xadd(keys_for(settings).stream, {"e": orjson.dumps(event)})


async def counts(pg: asyncpg.Connection) -> tuple[int, int, int, int]:
    row = await pg.fetchrow("""
        SELECT (SELECT count(*) FROM clicks) AS clicks,
               (SELECT count(*) FROM impressions) AS impressions,
               (SELECT coalesce(sum(clicks + bot_clicks), 0) FROM rollup_15m) AS rolled_clicks,
               (SELECT coalesce(sum(impressions + bot_impressions), 0) FROM rollup_15m) AS rolled_imps""")
    return tuple(row)  # type: ignore[return-value]


async def test_a_replayed_batch_changes_nothing(quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="replay")
    now = datetime.now(UTC)
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    await add(redis, s.settings, [click(c["id"], now, pub=str(i % 3)) for i in range(50)]
              + [impression(c["id"], now) for _ in range(20)])
    batch = await writer._read(0, ">")
    assert len(batch) == 70
    await writer.write(batch)
    first = await counts(pg)
    assert first == (50, 20, 50, 20)
    rollups = await pg.fetch("SELECT * FROM rollup_15m ORDER BY pub")
    # The writer died after COMMIT, before XACK: the same entries come again.
    await writer.write(batch)
    await writer.write(batch[10:30])
    assert await counts(pg) == first
    assert await pg.fetch("SELECT * FROM rollup_15m ORDER BY pub") == rollups
    await redis.aclose()


async def test_a_poison_event_goes_to_dead_letters_and_the_rest_is_written(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="poison")
    now = datetime.now(UTC)
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    good = [click(c["id"], now, sub1=f"ok{i}") for i in range(9)]
    # PostgreSQL refuses NUL in text: the whole batch fails until the culprit stands alone.
    refused = click(c["id"], now, sub1="bad\x00value")
    malformed = {"type": "click", "id": "not-a-ulid"}
    await add(redis, s.settings, good[:4] + [refused] + good[4:] + [malformed])
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    assert await writer.step(block=False) == 11
    assert await counts(pg) == (9, 0, 9, 0)
    dead = await pg.fetch("SELECT payload, error FROM dead_letters ORDER BY id")
    assert len(dead) == 2
    assert any("bad\\u0000value" in d["payload"] for d in dead)
    assert any("not-a-ulid" in d["payload"] for d in dead)
    assert await redis.xlen(keys_for(s.settings).stream) == 0
    await redis.aclose()


async def test_entries_left_by_a_dead_writer_are_claimed(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="claim")
    now = datetime.now(UTC)
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = keys_for(s.settings)
    dead = writer_for(s.settings, redis, batch_size=40)
    await dead.ensure_group()
    await add(redis, s.settings, [click(c["id"], now) for _ in range(100)])
    assert len(await dead._read(0, ">")) == 40  # read, then the process died
    live = writer_for(s.settings, redis, claim_idle_ms=200)
    await asyncio.sleep(0.3)
    while await live.step(block=False):
        pass
    assert await counts(pg) == (100, 0, 100, 0)
    pending = await redis.xpending(keys.stream, keys.group)
    assert pending["pending"] == 0
    assert await redis.xlen(keys.stream) == 0
    await redis.aclose()


async def test_dead_letters_replay_once_the_cause_is_gone(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """An event refused for a reason since fixed (here: kept by hand) goes back through the
    stream and is stored once; `tracker dead-letters` reports what is kept."""
    import subprocess
    import sys

    from tracker.replay import replay, show

    s = quiet_service
    c = await s.create_campaign(slug="again")
    event = click(c["id"], datetime.now(UTC))
    await pg.execute("INSERT INTO dead_letters (stream_id, payload, error) VALUES ('1-0', $1, $2)",
                     orjson.dumps(event).decode(), "InvalidTextRepresentationError('x')")
    assert "InvalidTextRepresentationError" in await show(s.settings.database_url)
    env = {"DATABASE_URL": s.settings.database_url, "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "tracker", "dead-letters"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "InvalidTextRepresentationError" in listed.stdout
    assert await replay(s.settings) == 1
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    await flush(s)
    assert await counts(pg) == (1, 0, 1, 0)
    assert await replay(s.settings) == 0


BAD_EVENTS = {
    # JSON null where PostgreSQL has NOT NULL: SQLSTATE 23502, the event's fault.
    "null sub1": {"sub1": None},
    "null visitor": {"visitor_id": None},
    "null destination": {"destination": None},
    # Wrong types, which asyncpg could not even encode.
    "number sub2": {"sub2": 5},
    "list pub": {"pub": ["a"]},
    "string flag": {"is_bot": "no"},
    "string campaign": {"campaign_id": "7"},
    "number cost": {"cost": 0.25},
    "exponent cost": {"cost": "1e3"},
    "object id": {"id": {"x": 1}},
}
MISSING = ["id", "campaign_id", "visitor_id", "is_unique", "is_bot", "destination", "type"]


async def test_nulls_wrong_types_and_missing_keys_go_alone_to_dead_letters(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """Each bad event stands alone in dead_letters; every good one around it is stored; no
    writer retries a batch forever."""
    s = quiet_service
    c = await s.create_campaign(slug="mixed")
    now = datetime.now(UTC)
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    bad = [click(c["id"], now) | change for change in BAD_EVENTS.values()]
    bad += [{k: v for k, v in click(c["id"], now).items() if k != key} for key in MISSING]
    good = [click(c["id"], now, sub1=f"ok{i}") for i in range(len(bad) + 1)]
    mixed = [event for pair in zip(good, bad) for event in pair] + good[len(bad):]
    await add(redis, s.settings, mixed)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    assert await asyncio.wait_for(writer.step(block=False), 30) == len(mixed)
    assert await counts(pg) == (len(good), 0, len(good), 0)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == len(bad)
    assert await redis.xlen(keys_for(s.settings).stream) == 0
    await redis.aclose()


async def test_a_row_a_constraint_refuses_is_split_out_not_retried_forever(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """Class 23 (integrity constraint) blames the row, as class 22 does."""
    s = quiet_service
    c = await s.create_campaign(slug="checked")
    now = datetime.now(UTC)
    await pg.execute("ALTER TABLE clicks ADD CONSTRAINT no_forbidden CHECK (sub5 <> 'forbidden')")
    try:
        redis = aioredis.Redis.from_url(s.settings.redis_url)
        events = [click(c["id"], now, sub1=str(i)) for i in range(7)]
        events.insert(3, click(c["id"], now, sub5="forbidden"))
        await add(redis, s.settings, events)
        writer = writer_for(s.settings, redis)
        await writer.ensure_group()
        assert await asyncio.wait_for(writer.step(block=False), 30) == 8
        assert await counts(pg) == (7, 0, 7, 0)
        dead = await pg.fetch("SELECT payload, error FROM dead_letters")
        assert len(dead) == 1 and "forbidden" in dead[0]["payload"]
        assert "CheckViolation" in dead[0]["error"]
        await redis.aclose()
    finally:
        await pg.execute("ALTER TABLE clicks DROP CONSTRAINT no_forbidden")


async def test_replay_ends_while_writers_refuse_the_same_events_again(
        service: Running, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running writer sends a permanently bad event straight back to dead_letters under a
    new id: the replay takes only what was there when it started, and ends. (One row per
    chunk, so that the writer refuses the first ones while the replay still runs.)"""
    import tracker.replay
    from tracker.replay import replay

    monkeypatch.setattr(tracker.replay, "CHUNK", 1)
    s = service
    c = await s.create_campaign(slug="forever")
    poison = orjson.dumps(click(c["id"], datetime.now(UTC), sub1="nul\x00byte")).decode()
    await pg.executemany("INSERT INTO dead_letters (stream_id, payload, error) VALUES ($1, $2, 'x')",
                         [(f"{i}-0", poison) for i in range(POISON)])
    replayed = await asyncio.wait_for(
        replay(s.settings), 60)
    assert replayed == POISON
    # The writer refused each again: back in dead_letters once each, under their new ids.
    async def refused_again() -> bool:
        return bool(await pg.fetchval("SELECT count(*) FROM dead_letters") == POISON)

    assert await eventually(refused_again, timeout=30)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE error = 'x'") == 0


POISON = 200


async def test_a_live_writer_waiting_out_postgres_keeps_its_batch(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """A long PostgreSQL outage (here: for one writer only) must not make writers steal each
    other's batches: the writer is alive, only busy."""
    s = quiet_service
    c = await s.create_campaign(slug="busy")
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = keys_for(s.settings)
    await add(redis, s.settings, [click(c["id"], datetime.now(UTC)) for _ in range(50)])
    away = asyncio.Event()
    away.set()

    async def connect() -> asyncpg.Connection:
        if away.is_set():
            raise OSError("PostgreSQL is away (for this writer)")
        return await db.connect(s.settings.database_url)

    busy = BatchWriter(redis, connect, keys, batch_size=500, wait_ms=10, claim_idle_ms=300,
                       consumer="busy-writer")
    task = asyncio.create_task(busy.run())
    try:
        assert await eventually(lambda: _holds(busy), timeout=10)
        other = writer_for(s.settings, redis, claim_idle_ms=300)
        for _ in range(15):  # five times the claim time
            await other.step(block=False)
            await asyncio.sleep(0.1)
        assert await counts(pg) == (0, 0, 0, 0)
        held = await redis.xpending_range(keys.stream, keys.group, "-", "+", 100,
                                          consumername="busy-writer")
        assert len(held) == 50
        away.clear()  # PostgreSQL is back for it: it writes its own batch
        assert await eventually(lambda: _stored(pg, 50), timeout=20)
    finally:
        busy.stop()
        await asyncio.wait_for(task, 10)
        await busy.close()
        await redis.aclose()


async def test_drains_beside_the_running_writer_store_every_event_once(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """drain() while run() writes (a test's flush, a shutdown racing a batch): one step at a
    time, so no batch is read over another's, no connection is shared mid-transaction, and
    when a drain returns what was buffered before it is stored."""
    s = quiet_service
    c = await s.create_campaign(slug="drains")
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = keys_for(s.settings)
    writer = writer_for(s.settings, redis, batch_size=20)
    task = asyncio.create_task(writer.run())
    try:
        total = 0
        for round_ in range(5):
            await add(redis, s.settings, [click(c["id"], datetime.now(UTC), sub1=f"{round_}-{i}")
                                          for i in range(60)])
            total += 60
            await asyncio.gather(*(writer.drain(time.monotonic() + 30)
                                   for _ in range(3)))
            assert await pg.fetchval("SELECT count(*) FROM clicks") == total
        assert await counts(pg) == (total, 0, total, 0)
        assert (await redis.xpending(keys.stream, keys.group))["pending"] == 0
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)
        await writer.close()
        await redis.aclose()


async def test_gone_writers_are_claimed_from_then_removed_from_the_group(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    c = await s.create_campaign(slug="gone")
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = keys_for(s.settings)
    await add(redis, s.settings, [click(c["id"], datetime.now(UTC)) for _ in range(30)])
    holder = writer_for(s.settings, redis, batch_size=30)
    await holder.ensure_group()
    assert len(await holder._read(0, ">")) == 30  # read, then its process died
    await redis.xgroup_createconsumer(keys.stream, keys.group, "left-empty")
    live = writer_for(s.settings, redis, claim_idle_ms=200)
    await live._alive()
    await asyncio.sleep(0.3)
    while await live.step(block=False):
        pass
    assert await counts(pg) == (30, 0, 30, 0)
    names = [n["name"].decode() for n in await redis.xinfo_consumers(keys.stream, keys.group)]
    assert names == [live.consumer]
    await redis.aclose()


async def _holds(writer: BatchWriter) -> bool:
    return bool(writer._held)


async def _stored(pg: asyncpg.Connection, n: int) -> bool:
    return bool(await pg.fetchval("SELECT count(*) FROM clicks") == n)


async def test_a_batch_read_after_the_last_heartbeat_is_claimed_not_orphaned(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """A writer says it is alive, reads a batch a moment later and dies: when its heartbeat
    expires, that batch is younger than the claim time. It must wait to be claimed; removing
    its consumer from the group would drop the entries from the pending list for good."""
    s = quiet_service
    c = await s.create_campaign(slug="orphan")
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = keys_for(s.settings)
    await add(redis, s.settings, [click(c["id"], datetime.now(UTC)) for _ in range(20)])
    dying = writer_for(s.settings, redis, claim_idle_ms=400)
    await dying.ensure_group()
    await dying._alive()
    await asyncio.sleep(0.3)
    assert len(await dying._read(0, ">")) == 20  # then it died
    await asyncio.sleep(0.15)  # its heartbeat has expired; its batch is 150 ms old
    live = writer_for(s.settings, redis, claim_idle_ms=400)
    deadline = asyncio.get_running_loop().time() + 10
    while await redis.xlen(keys.stream) and asyncio.get_running_loop().time() < deadline:
        await live.step(block=False)
        await asyncio.sleep(0.05)
    assert await counts(pg) == (20, 0, 20, 0)
    await redis.aclose()


RECOUNT = """
SELECT date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, campaign_id,
       pub, sub1, sub2, sub3, sub4, sub5, country, device,
       count(*) FILTER (WHERE NOT is_click AND NOT is_bot) AS impressions,
       count(*) FILTER (WHERE NOT is_click AND is_bot) AS bot_impressions,
       count(*) FILTER (WHERE is_click AND NOT is_bot) AS clicks,
       count(*) FILTER (WHERE is_click AND is_unique AND NOT is_bot) AS unique_clicks,
       count(*) FILTER (WHERE is_click AND is_bot) AS bot_clicks,
       coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0) AS cost
FROM (SELECT ts, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device, true AS is_click,
             is_unique, is_bot, cost FROM clicks
      UNION ALL
      SELECT ts, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device, false, false,
             is_bot, cost FROM impressions) AS e
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"""
ROLLED = """
SELECT bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device, impressions,
       bot_impressions, clicks, unique_clicks, bot_clicks, cost
FROM rollup_15m ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"""


def assorted(campaigns: list[int], now: datetime) -> list[dict]:  # type: ignore[type-arg]
    """Clicks and impressions over two campaigns, two quarter hours and several dimensions:
    bots, repeat visitors, CPC costs and CPM costs with nine decimals."""
    from datetime import timedelta

    events: list[dict] = []  # type: ignore[type-arg]
    for i in range(60):
        when = now - timedelta(minutes=20 * (i % 2))
        fields = {"pub": f"p{i % 3}", "sub1": f"s{i % 4}", "country": "TR" if i % 5 else "DE",
                  "device": "mobile" if i % 2 else "desktop", "ip": "203.0.113.0"}
        events.append(click(campaigns[i % 2], when, is_bot=i % 7 == 0, is_unique=i % 3 == 0,
                            cost="0" if i % 7 == 0 else ("0.25" if i % 2 else "1.000000001"),
                            **fields))
        events.append(impression(campaigns[i % 2], when, is_bot=i % 11 == 0,
                                 cost="0" if i % 11 == 0 else "0.000250001", **fields))
    return events


async def test_a_new_batchs_rollups_equal_a_recount_of_its_rows(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """The rollups of a batch stored on the first try are summed from the batch itself, not
    from the stored rows: they must still be exactly what a recount of the rows gives."""
    s = quiet_service
    campaigns = [(await s.create_campaign(slug=f"sum{i}"))["id"] for i in range(2)]
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    await add(redis, s.settings, assorted(campaigns, datetime.now(UTC)))
    assert await writer.step(block=False) == 120
    assert await counts(pg) == (60, 60, 60, 60)
    rolled = [tuple(r) for r in await pg.fetch(ROLLED)]
    assert rolled == [tuple(r) for r in await pg.fetch(RECOUNT)]
    assert len(rolled) > 10
    await redis.aclose()


async def test_a_batch_stored_in_part_before_stores_and_counts_only_the_rest(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """A batch whose first part was committed before (a writer died between COMMIT and
    XACK, another claimed a bigger batch around it), holding one event twice besides: the
    first try meets rows it holds and is rolled back; the second stores only what is new,
    once each, and the rollups count each event once."""
    s = quiet_service
    campaigns = [(await s.create_campaign(slug=f"part{i}"))["id"] for i in range(2)]
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    events = assorted(campaigns, datetime.now(UTC))
    await add(redis, s.settings, events + events[-1:])  # the last event twice in the stream
    batch = await writer._read(0, ">")
    assert len(batch) == 121
    await writer.write(batch[:50])
    assert await counts(pg) == (25, 25, 25, 25)
    await writer.write(batch)
    assert await counts(pg) == (60, 60, 60, 60)
    assert [tuple(r) for r in await pg.fetch(ROLLED)] == [tuple(r) for r in await pg.fetch(RECOUNT)]
    await redis.aclose()


async def test_what_text_copy_must_escape_is_stored_as_sent(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    """Rows travel as COPY's text format: tabs, line breaks, backslashes (a literal \\N
    too) in what visitors send must arrive as they were, and an absent address as NULL."""
    s = quiet_service
    c = await s.create_campaign(slug="escapes")
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    tricky = {"sub1": "\\N", "sub2": "tab\there", "user_agent": "line\nbreak\r\nand \\ slash",
              "referer": "\\", "pub": "ünïcödé 🙂", "ip": "2001:db8::1"}
    events = [click(c["id"], datetime.now(UTC), **tricky),
              click(c["id"], datetime.now(UTC), sub1="plain"),
              impression(c["id"], datetime.now(UTC), sub3="a\tb\\c")]
    await add(redis, s.settings, events)
    writer = writer_for(s.settings, redis)
    await writer.ensure_group()
    assert await writer.step(block=False) == 3
    stored = await pg.fetchrow("SELECT sub1, sub2, user_agent, referer, pub, host(ip) AS ip "
                               "FROM clicks WHERE sub1 <> 'plain'")
    assert dict(stored) == tricky
    assert await pg.fetchval("SELECT ip FROM clicks WHERE sub1 = 'plain'") is None
    assert await pg.fetchval("SELECT sub3 FROM impressions") == "a\tb\\c"
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    await redis.aclose()
