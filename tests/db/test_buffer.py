"""The Redis step of the hot path on a real Redis: the clicks of one tick go in one call per
shard, in order."""

from __future__ import annotations

import asyncio

import orjson
import redis.asyncio as aioredis

from tracker.ids import new_id
from tracker.ingest.buffer import EventBuffer
from tracker.redis_keys import keys_for
from tracker.settings import Settings


def _click(campaign_id: int) -> dict[str, object]:
    return {"type": "click", "id": str(new_id()), "campaign_id": campaign_id, "cost": "0"}


async def test_one_tick_of_clicks_is_one_call_and_a_visitor_is_unique_once(
        settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = keys_for(settings)
    buffer = EventBuffer(redis, keys, click_ttl=60, unique_window=3600)
    try:
        mine = [_click(7) for _ in range(5)]
        others = [_click(7) for _ in range(3)]
        bot = _click(7)
        # All in one tick: one script call per shard carries them, in this order.
        unique = await asyncio.gather(
            *(buffer.record_click(e, "01JD00000000000000000VISIT", False) for e in mine),
            *(buffer.record_click(e, f"01JD00000000000000000OTHE{i}", False)
              for i, e in enumerate(others)),
            buffer.record_click(bot, "01JD00000000000000000VISIT", True))
        assert unique == [True, False, False, False, False, True, True, True, False]

        # In the stream as answered, each with its copy named, the copy saying the same.
        entries = [f for stream in keys.streams for _, f in await redis.xrange(stream)]
        events = {orjson.loads(f[b"e"])["id"]: (orjson.loads(f[b"e"]), f[b"k"]) for f in entries}
        assert len(events) == 9
        for e, expected in zip([*mine, *others, bot], unique):
            stored, copy = events[str(e["id"])]
            assert stored["is_unique"] is expected
            assert orjson.loads(await redis.get(copy)) == stored
    finally:
        await redis.aclose()

