"""The Redis step of the hot path: dedupe, read-your-writes copy and the durable append,
in one round trip per event-loop tick.

Every tracking request makes exactly one call here. The calls of all requests handled in one
tick of the event loop are sent together as one pipeline (one write, one read on one
connection), so a burst costs a handful of round trips instead of one per request.

What a Redis failure does: the call raises (redis.RedisError) and nothing of the event is left
in Redis. The script appends to the stream *before* it writes any "seen" key, so a key that
says a visitor was seen never exists for an event that is not buffered.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .. import metrics
from ..redis_client import Client, Command, send
from ..redis_keys import Keys

# The clicks of one tick and one shard, in order, in one call: a script call costs Redis as
# much again as the commands inside it, and each reply costs the worker a parse.
# KEYS: 1 stream, then per click: its copy (read-your-writes), and its uniqueness key unless
#       it is a bot's
# ARGV: 1 click copy TTL, 2 uniqueness window, then per click: its event JSON without the
#       closing brace, '1' if a uniqueness key follows its copy in KEYS else '0'
# Each event is completed with is_unique so the stream and the copy agree; its entry names
# the copy (field k), which the writer deletes once the click's row is committed. A visitor's
# second click in the same call sees the first one's key: one unique click.
RECORD_CLICKS = """
local out = {}
local k = 2
for i = 3, #ARGV, 2 do
    local copy = KEYS[k]
    k = k + 1
    local seen = nil
    local unique = 'false'
    if ARGV[i + 1] == '1' then
        seen = KEYS[k]
        k = k + 1
        if redis.call('EXISTS', seen) == 0 then unique = 'true' end
    end
    local event = ARGV[i] .. ',"is_unique":' .. unique .. '}'
    redis.call('XADD', KEYS[1], '*', 'e', event, 'k', copy)
    redis.call('SET', copy, event, 'EX', ARGV[1])
    if unique == 'true' then
        redis.call('SET', seen, '1', 'EX', ARGV[2])
        out[#out + 1] = 1
    else
        out[#out + 1] = 0
    end
end
return out
"""


# Records a conversion's new state if nobody changed it since it was read (compare and set on
# its version): concurrent postbacks for one conversion are decided one after the other, and
# the loser reads the winner's state and decides again (a duplicate, usually). The stream
# entry and the state are written together, so a state never exists for an unbuffered event.
# KEYS: 1 stream, 2 the click's conversion states (a hash), 3 the "complete since" marker,
#       4 the conversion id's pointer to its click
# ARGV: 1 the conversion's field name, 2 the version read (0: none), 3 the new version,
#       4 event JSON, 5 history entry JSON, 6 TTL, 7 now (ms), 8 pointer value
RECORD_CONVERSION = """
local field = ARGV[1]
local seen = redis.call('HGET', KEYS[2], 'v:' .. field) or '0'
if seen ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[1], '*', 'e', ARGV[4])
redis.call('HSET', KEYS[2], 'v:' .. field, ARGV[3], 'e:' .. field, ARGV[4],
           'h:' .. field .. ':' .. ARGV[3], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], ARGV[7], 'NX')
redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[6])
return 1
"""
SCRIPTS = (RECORD_CLICKS, RECORD_CONVERSION)


class EventBuffer:
    def __init__(self, redis: Client, keys: Keys, click_ttl: int, unique_window: int) -> None:
        self._redis = redis
        self._keys = keys
        self._click_ttl = click_ttl
        self._unique_window = unique_window
        self._click_sha = hashlib.sha1(RECORD_CLICKS.encode()).hexdigest()
        self._conversion_sha = hashlib.sha1(RECORD_CONVERSION.encode()).hexdigest()
        self._queued: list[tuple[Command, asyncio.Future[Any]]] = []
        # This tick's clicks by shard: (event JSON, copy key, uniqueness key or None, future).
        self._clicks: dict[int, list[tuple[bytes, str, str | None, asyncio.Future[Any]]]] = {}
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def stamp(self, click_id: str, campaign_id: int, visitor_id: str) -> str:
        """A new click id spelling the shard of the visit (see Keys)."""
        return self._keys.stamp(click_id, self._keys.visit_shard(campaign_id, visitor_id))

    async def record_click(self, event: dict[str, Any], visitor_id: str, is_bot: bool) -> bool:
        """Buffer a click; return whether it is the visitor's first on this campaign within
        the window. Bots never take a visitor's uniqueness."""
        # The click id spells this shard (RequestTracker stamps it): one slot for its keys.
        keys = self._keys
        shard = keys.visit_shard(event["campaign_id"], visitor_id)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._clicks.setdefault(shard, []).append((
            orjson.dumps(event)[:-1], keys.click(event["id"], shard),
            None if is_bot else keys.unique(shard, event["campaign_id"], visitor_id), future))
        self._schedule()
        return bool(await future)

    async def record(self, event: dict[str, Any]) -> None:
        """Buffer an event that needs no dedupe (an impression)."""
        stream = self._keys.streams[self._keys.visit_shard(event["campaign_id"], event["visitor_id"])]
        await self._call(("XADD", stream, "*", "e", orjson.dumps(event)))

    async def record_conversion(self, keys: list[str], args: list[Any]) -> bool:
        """Compare-and-set a conversion's state and buffer its event (RECORD_CONVERSION)."""
        done = await self._call(("EVALSHA", self._conversion_sha, len(keys), *keys, *args))
        return bool(done)

    def call(self, *command: Any) -> asyncio.Future[Any]:
        """Any command, sent in this tick's pipeline."""
        return self._call(command)

    async def ping(self) -> None:
        await self._redis.ping()

    async def recent_click(self, click_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._keys.click(click_id))
        if raw is None:
            return None
        event: dict[str, Any] = orjson.loads(raw)
        return event

    # -- one pipeline per tick -------------------------------------------------------------

    def _call(self, command: Command) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((command, future))
        self._schedule()
        return future

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Runs after every callback already due in this tick: those requests join in.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        for shard, clicks in self._clicks.items():
            keys: list[str] = [self._keys.streams[shard]]
            args: list[Any] = [self._click_ttl, self._unique_window]
            for body, copy, seen, _ in clicks:
                keys.append(copy)
                if seen is not None:
                    keys.append(seen)
                args += (body, b"0" if seen is None else b"1")
            together: asyncio.Future[Any] = loop.create_future()
            together.add_done_callback(_fan_out([future for *_, future in clicks]))
            batch.append((("EVALSHA", self._click_sha, len(keys), *keys, *args), together))
        self._clicks = {}
        task = loop.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        metrics.BUFFER_PIPELINE.observe(len(batch))
        try:
            results = await self._pipeline([command for command, _ in batch])
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted or was flushed since we last loaded the scripts.
                for source in SCRIPTS:
                    await self._redis.script_load(source)
                again = await self._pipeline([batch[i][0] for i in missing])
                for i, result in zip(missing, again):
                    results[i] = result
        except Exception as exc:  # noqa: BLE001 - every caller learns of it
            error = exc if isinstance(exc, RedisError) else RedisError(repr(exc))
            results = [error] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():  # the request was cancelled (client went away)
                continue
            if isinstance(result, Exception):
                future.set_exception(result if isinstance(result, RedisError)
                                     else ResponseError(repr(result)))
            else:
                future.set_result(result)

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        return await send(self._redis, commands)


def _fan_out(futures: list[asyncio.Future[Any]]) -> Any:
    """The callback that hands each click its part of the call's answer (or its error)."""
    def done(together: asyncio.Future[Any]) -> None:
        error = together.exception()
        results = [] if error is not None else together.result()
        for i, future in enumerate(futures):
            if future.done():  # the request was cancelled (client went away)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(results[i])
    return done
