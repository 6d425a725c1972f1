"""The Redis step of the hot path on a real Redis: the events of one round go in one script
call per shard, as one stream entry, in order."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from tracker.ids import new_id
from tracker.ingest.buffer import EventBuffer
from tracker.ingest.entries import decoded
from tracker.redis_keys import keys_for
from tracker.settings import Settings
from tracker.storage import lines


def _line(click_id: str, campaign_id: int, visitor_id: str, sub1: str = "") -> str:
    return lines.click_line(click_id, campaign_id, visitor_id, {"sub1": sub1}, "203.0.113.0",
                            "TR", "mobile", "Mozilla/5.0", "", False, "https://shop.example/", "0")


async def test_one_round_of_clicks_is_one_entry_and_a_visitor_is_unique_once(
        settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = keys_for(settings)
    buffer = EventBuffer(redis, keys, click_ttl=60, unique_window=3600)
    me = "01JD00000000000000000VISIT"
    others = [f"01JD00000000000000000OTHE{i}" for i in range(3)]
    ms = int(time.time() * 1000)  # one millisecond: one copies hash, one entry per shard
    visitors = [me] * 5 + others + [me]
    # Each id spells its visit's shard, as RequestTracker stamps them.
    clicks = [(buffer.stamp(str(new_id(ms)), 7, v), v, n == 8) for n, v in enumerate(visitors)]
    try:
        # All in one tick: one script call per shard carries them, in this order.
        unique = await asyncio.gather(*(
            buffer.record_click(click_id, 7, visitor, bot, _line(click_id, 7, visitor, sub1=f"s{n}"))
            for n, (click_id, visitor, bot) in enumerate(clicks)))
        assert unique == [True, False, False, False, False, True, True, True, False]

        entries = [f for stream in keys.streams for _, f in await redis.xrange(stream)]
        assert len(entries) == len({keys.visit_shard(7, v) for _, v, _ in clicks})
        # In the stream as answered: each line completed with is_unique; its copy the same
        # line, in the hash the entry names, under the id the entry lists.
        stored = {e["id"]: e for f in entries for e in decoded(f)}
        assert len(stored) == len(clicks)
        for (click_id, _, _), expected, n in zip(clicks, unique, range(len(clicks))):
            event = stored[click_id]
            assert event["is_unique"] is expected and event["sub1"] == f"s{n}"
            copy = await redis.hget(*keys.copy_of(click_id))
            assert copy is not None and {"type": "click", **lines.click_event(copy)} == event
        for f in entries:
            assert set(f[b"k"].split(b",")) == {
                e["id"].encode() for e in decoded(f)}
            for copied in f[b"k"].split(b","):
                assert await redis.hexists(f[b"h"], copied)
        backlog = sum(int(n or 0) for n in await redis.mget(
            [keys.backlog(n) for n in range(keys.shards)]))
        assert backlog == len(clicks)
    finally:
        await redis.aclose()


async def test_an_append_that_fails_leaves_no_visitor_seen(settings: Settings) -> None:
    """The script marks uniqueness before its append: when the append fails (here the
    stream's key holds a string), the marks are taken back, so the click replayed from the
    spool later is still the visitor's unique one."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = keys_for(settings)
    buffer = EventBuffer(redis, keys, click_ttl=60, unique_window=3600)
    visitor = "01JD0000000000000000FAILED"
    click_id = str(new_id())
    shard = keys.visit_shard(9, visitor)
    try:
        await redis.delete(keys.streams[shard])
        await redis.set(keys.streams[shard], "not a stream")
        try:
            await buffer.record_click(click_id, 9, visitor, False, _line(click_id, 9, visitor))
        except Exception as exc:  # noqa: BLE001 - the error is the point
            assert "WRONGTYPE" in str(exc)
        else:
            raise AssertionError("the append should have failed")
        assert not await redis.exists(keys.unique(shard, 9, visitor))
        assert await redis.hget(*keys.copy_of(click_id)) is None
        await redis.delete(keys.streams[shard])
        again = str(new_id())
        assert await buffer.record_click(again, 9, visitor, False, _line(again, 9, visitor))
    finally:
        await redis.delete(keys.streams[shard])
        await redis.aclose()
