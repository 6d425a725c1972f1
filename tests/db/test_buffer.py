"""The Redis step of the hot path on a real Redis: the events of one round go in one script
call per shard, as one stream entry; uniqueness per visitor, campaign and window; a click
found from its id before its row is committed."""

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
    me = str(new_id())            # returning: a cookie brought it
    others = [str(new_id()) for _ in range(3)]  # new: ids made for these clicks
    ms = int(time.time() * 1000)
    # (visitor, bot, new visitor): mine five times (once as a bot, never unique), then the
    # new visitors, then mine on another campaign.
    plan = [(me, False, False)] * 3 + [(me, True, False)] + [(me, False, False)] + \
        [(v, False, True) for v in others]
    try:
        # Each id spells its visit's shard, as RequestTracker stamps them.
        clicks = [(buffer.stamp(str(new_id(ms)), 7, v), v, bot, new) for v, bot, new in plan]
        other = buffer.stamp(str(new_id(ms)), 8, me)
        # All in one tick: one script call per shard carries them.
        unique = await asyncio.gather(
            *(buffer.record_click(click_id, 7, v, bot, _line(click_id, 7, v, sub1=f"s{n}"), new)
              for n, (click_id, v, bot, new) in enumerate(clicks)),
            buffer.record_click(other, 8, me, False, _line(other, 8, me)))
        assert unique == [True, False, False, False, False, True, True, True, True]

        entries = [f for stream in keys.streams for _, f in await redis.xrange(stream)]
        assert len(entries) == len({keys.visit_shard(c, v) for c, v in
                                    [(7, v) for _, v, _, _ in clicks] + [(8, me)]})
        # In the stream as answered, each line completed with is_unique, and found from its
        # id alone (read-your-writes) as the same line.
        stored = {e["id"]: e for f in entries for e in decoded(f)}
        assert len(stored) == len(clicks) + 1
        for (click_id, _, _, _), expected, n in zip(clicks, unique, range(len(clicks))):
            event = stored[click_id]
            assert event["is_unique"] is expected and event["sub1"] == f"s{n}"
            assert {"type": "click", **(await buffer.recent_click(click_id) or {})} == event
        backlog = sum(int(n or 0) for n in await redis.mget(
            [keys.backlog(n) for n in range(keys.shards)]))
        assert backlog == len(clicks) + 1

        # The next round: every visitor seen on campaign 7 now, the bot's click marked nobody.
        again = [buffer.stamp(str(new_id()), 7, v) for v in [me, *others]]
        assert await asyncio.gather(*(
            buffer.record_click(c, 7, v, False, _line(c, 7, v))
            for c, v in zip(again, [me, *others]))) == [False] * 4
    finally:
        await redis.aclose()


async def test_a_window_over_makes_a_visitor_unique_again(settings: Settings) -> None:
    """Marks live in one hash per window; a mark from the window before still counts until
    a whole window has passed since it."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = keys_for(settings)
    buffer = EventBuffer(redis, keys, click_ttl=60, unique_window=2)
    visitor = str(new_id())
    try:
        def click() -> str:
            return buffer.stamp(str(new_id()), 5, visitor)

        first = click()
        assert await buffer.record_click(first, 5, visitor, False, _line(first, 5, visitor))
        seen_at = time.time()
        while True:  # across the windows' boundary, until 2 s after the unique click
            c = click()
            unique = await buffer.record_click(c, 5, visitor, False, _line(c, 5, visitor))
            elapsed = time.time() - seen_at
            if unique:
                assert elapsed >= 1.95, elapsed
                break
            assert elapsed < 2.2, "unique again once the window has passed"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_an_append_that_fails_leaves_no_visitor_seen(settings: Settings) -> None:
    """The script marks uniqueness after its append: when the append fails (here the
    stream's key holds a string), nobody is marked, so the click replayed from the spool
    later is still the visitor's unique one."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = keys_for(settings)
    buffer = EventBuffer(redis, keys, click_ttl=60, unique_window=3600)
    visitor = str(new_id())
    click_id = buffer.stamp(str(new_id()), 9, visitor)
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
        assert await buffer.recent_line(click_id) is None
        await redis.delete(keys.streams[shard])
        again = buffer.stamp(str(new_id()), 9, visitor)
        assert await buffer.record_click(again, 9, visitor, False, _line(again, 9, visitor))
    finally:
        await redis.delete(keys.streams[shard])
        await redis.aclose()


async def test_marks_of_the_window_before_last_are_unlinked(settings: Settings) -> None:
    """Each window's marks stay through the next window, then go (UNLINK: freed off Redis's
    main thread) before their own expiry would free them on it."""
    from tracker.ingest.marks import OldMarks

    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = keys_for(settings)
    window = 3600
    now_ms = int(time.time() * 1000)
    current = now_ms // (window * 1000)
    names = {w: [keys.seen(shard, 4, w) for shard in range(keys.shards)]
             for w in (current - 2, current - 1, current)}
    try:
        for group in names.values():
            for name in group:
                await redis.hset(name, "visitor", now_ms)
        marks = OldMarks(redis, keys, lambda: [4, 99], window)
        assert await marks.forget(now_ms) == keys.shards
        for w, group in names.items():
            for name in group:
                assert await redis.exists(name) == (w != current - 2)
    finally:
        for group in names.values():
            await redis.delete(*group)
        await redis.aclose()
