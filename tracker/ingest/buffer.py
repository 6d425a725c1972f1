"""The Redis step of the hot path: dedupe, read-your-writes copy and the durable append,
in one round trip.

Every tracking request makes exactly one call here. A later change will coalesce the calls of
all requests of an event-loop tick into one pipeline; callers won't notice.

What a Redis failure does: the call raises (redis.RedisError) and nothing of the event is left
in Redis. The script appends to the stream *before* it writes any "seen" key, so a key that
says a visitor was seen never exists for an event that is not buffered.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

# KEYS: 1 stream, 2 click copy (read-your-writes), 3 uniqueness key (absent for bots)
# ARGV: 1 event JSON without its closing brace, 2 click copy TTL, 3 uniqueness window
# The script completes the JSON with is_unique so the stream and the copy agree.
RECORD_CLICK = """
local unique = 'false'
if #KEYS >= 3 and redis.call('EXISTS', KEYS[3]) == 0 then unique = 'true' end
local event = ARGV[1] .. ',"is_unique":' .. unique .. '}'
redis.call('XADD', KEYS[1], '*', 'e', event)
redis.call('SET', KEYS[2], event, 'EX', ARGV[2])
if unique == 'true' then redis.call('SET', KEYS[3], '1', 'EX', ARGV[3]) end
if unique == 'true' then return 1 end
return 0
"""


class Keys:
    """Every Redis key and channel name, built in one place."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}events"
        self.group = "writers"
        self.campaigns_channel = f"{prefix}campaigns"

    def click(self, click_id: str) -> str:
        return f"{self.prefix}click:{click_id}"

    def unique(self, campaign_id: int, visitor_id: str) -> str:
        return f"{self.prefix}u:{campaign_id}:{visitor_id}"


class EventBuffer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, click_ttl: int, unique_window: int) -> None:
        self._redis = redis
        self._keys = keys
        self._click_ttl = click_ttl
        self._unique_window = unique_window
        self._record_click = redis.register_script(RECORD_CLICK)

    async def record_click(self, event: dict[str, Any], visitor_id: str, is_bot: bool) -> bool:
        """Buffer a click; return whether it is the visitor's first on this campaign within
        the window. Bots never take a visitor's uniqueness."""
        keys = [self._keys.stream, self._keys.click(event["id"])]
        if not is_bot:
            keys.append(self._keys.unique(event["campaign_id"], visitor_id))
        body = orjson.dumps(event)[:-1]
        unique = await self._record_click(keys=keys, args=[body, self._click_ttl, self._unique_window])
        return bool(unique)

    async def record(self, event: dict[str, Any]) -> None:
        """Buffer an event that needs no dedupe (an impression)."""
        await self._redis.xadd(self._keys.stream, {"e": orjson.dumps(event)})

    async def recent_click(self, click_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._keys.click(click_id))
        if raw is None:
            return None
        event: dict[str, Any] = orjson.loads(raw)
        return event
