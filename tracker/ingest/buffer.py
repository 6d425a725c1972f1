"""The Redis step of the hot path: dedupe, read-your-writes copy and the durable append,
in one round trip for many requests.

Every tracking request makes exactly one call here. The calls that arrive while the previous
round is in flight (or, when none is, within one event-loop tick) go together in the next
round: one write and one read on one connection. The events of a round, per shard, go in one
script call that appends them as ONE stream entry (storage of an entry: ingest/entries.py),
so a burst costs a handful of round trips, script calls and entries instead of one per
request; the busier the worker, the fuller each round.

What a Redis failure does: the call raises (redis.RedisError) and nothing of the event is left
in Redis: a uniqueness key the script set before a failed append is deleted again, so a key
that says a visitor was seen never exists for an event that is not buffered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from .. import metrics
from ..redis_client import Client, Command, send
from ..redis_keys import Keys
from ..redis_pipe import RedisPipe
from ..storage import lines

log = logging.getLogger(__name__)

# The events of one round, one shard and one copies hash, in order, in ONE stream entry: a
# script call costs Redis as much again as the commands inside it, an entry per event cost
# the writer a read, an acknowledgement and a delete each, and a key per copy cost more than
# a field of one hash. (What an entry holds: ingest/entries.py.)
# KEYS: 1 stream, 2 copies hash, 3 backlog counter, then a uniqueness key per click that has
#       one (kind 'u')
# ARGV: 1 copies TTL, 2 uniqueness window, then per event: kind ('u' a click with a
#       uniqueness key, 'b' a bot's click, which takes none, 'i' an impression), id, line (a
#       click's without its last column, is_unique, which is appended here, so that the
#       stream and the copy agree)
# A visitor's second click in the same call finds the first one's key: one unique click. The
# uniqueness keys are set (SET NX: the check and the mark in one command) before the
# append; if the append fails they are deleted again, so that no key says "seen" for an
# event that is not buffered.
RECORD_EVENTS = r"""
local out, clicks, ids, copies, impressions, marked = {}, {}, {}, {}, {}, {}
local k = 4
for i = 3, #ARGV, 3 do
    local kind = ARGV[i]
    if kind == 'i' then
        impressions[#impressions + 1] = ARGV[i + 2]
        out[#out + 1] = 0
    else
        local unique = 0
        if kind == 'u' then
            if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[2]) then
                unique = 1
                marked[#marked + 1] = KEYS[k]
            end
            k = k + 1
        end
        local line = ARGV[i + 2] .. (unique == 1 and '\tt' or '\tf')
        clicks[#clicks + 1] = line
        ids[#ids + 1] = ARGV[i + 1]
        copies[#copies + 1] = ARGV[i + 1]
        copies[#copies + 1] = line
        out[#out + 1] = unique
    end
end
local fields = {'n', #clicks + #impressions}
if #clicks > 0 then
    fields[3], fields[4] = 'c', table.concat(clicks, '\n')
    fields[5], fields[6] = 'h', KEYS[2]
    fields[7], fields[8] = 'k', table.concat(ids, ',')
end
if #impressions > 0 then
    fields[#fields + 1] = 'i'
    fields[#fields + 1] = table.concat(impressions, '\n')
end
local added = redis.pcall('XADD', KEYS[1], '*', unpack(fields))
if type(added) == 'table' and added.err then
    for j = 1, #marked, 1000 do
        redis.call('DEL', unpack(marked, j, math.min(j + 999, #marked)))
    end
    return added
end
redis.call('INCRBY', KEYS[3], #clicks + #impressions)
for j = 1, #copies, 1000 do
    redis.call('HSET', KEYS[2], unpack(copies, j, math.min(j + 999, #copies)))
end
if #copies > 0 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return out
"""


# Records a conversion's new state if nobody changed it since it was read (compare and set on
# its version): concurrent postbacks for one conversion are decided one after the other, and
# the loser reads the winner's state and decides again (a duplicate, usually). The stream
# entry and the state are written together, so a state never exists for an unbuffered event.
# KEYS: 1 stream, 2 the click's conversion states (a hash), 3 the "complete since" marker,
#       4 the conversion id's pointer to its click, 5 the stream's backlog counter
# ARGV: 1 the conversion's field name, 2 the version read (0: none), 3 the new version,
#       4 event JSON, 5 history entry JSON, 6 TTL, 7 now (ms), 8 pointer value
RECORD_CONVERSION = """
local field = ARGV[1]
local seen = redis.call('HGET', KEYS[2], 'v:' .. field) or '0'
if seen ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[1], '*', 'e', ARGV[4], 'n', 1)
redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[2], 'v:' .. field, ARGV[3], 'e:' .. field, ARGV[4],
           'h:' .. field .. ':' .. ARGV[3], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], ARGV[7], 'NX')
redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[6])
return 1
"""
SCRIPTS = (RECORD_EVENTS, RECORD_CONVERSION)
# Rounds of this tick's calls in flight at once: while one is, the next ticks' calls gather
# and go together when it is answered (fewer, fuller rounds under load; none waits when idle).
MAX_IN_FLIGHT = 1


# Called once with an event's result (a click: 1 if unique, else 0), or with the RedisError
# that kept it out of Redis.
Done = Callable[[Any], None]
# An event waiting for its round: (kind, id, body, uniqueness key or None, who to tell).
_Pending = tuple[bytes, str, str, "str | None", Done]


class EventBuffer:
    def __init__(self, redis: Client, keys: Keys, click_ttl: int, unique_window: int,
                 pipe: RedisPipe | None = None) -> None:
        self._redis = redis
        # One server: each round goes through our own pipelined connection (see
        # redis_pipe.py); a Cluster (or TLS) through redis-py.
        self._pipe = pipe
        self._keys = keys
        self._click_ttl = click_ttl
        self._unique_window = unique_window
        self._events_sha = hashlib.sha1(RECORD_EVENTS.encode()).hexdigest()
        self._conversion_sha = hashlib.sha1(RECORD_CONVERSION.encode()).hexdigest()
        self._queued: list[tuple[Command, asyncio.Future[Any]]] = []
        # The events waiting for the next round, by (shard, the first 8 characters of their
        # ids: their copies hash).
        self._events: dict[tuple[int, str], list[_Pending]] = {}
        self._flush_scheduled = False
        self._in_flight = 0
        self._sending: set[asyncio.Task[None]] = set()

    def stamp(self, click_id: str, campaign_id: int, visitor_id: str) -> str:
        """A new click id spelling the shard of the visit (see Keys)."""
        return self._keys.stamp(click_id, self._keys.visit_shard(campaign_id, visitor_id))

    def add_click(self, click_id: str, campaign_id: int, visitor_id: str, is_bot: bool,
                  line: str, done: Done) -> None:
        """Buffer a click (its line, storage/lines.py, without is_unique) in the next round;
        `done` learns whether it is the visitor's first on this campaign within the window
        (1 or 0), or the error. Bots never take a visitor's uniqueness."""
        # The click id spells this shard (RequestTracker stamps it): one slot for its keys.
        keys = self._keys
        shard = keys.visit_shard(campaign_id, visitor_id)
        pending = (b"b", click_id, line, None, done) if is_bot else (
            b"u", click_id, line, keys.unique(shard, campaign_id, visitor_id), done)
        group = self._events.get((shard, click_id[:8]))
        if group is None:
            self._events[(shard, click_id[:8])] = [pending]
        else:
            group.append(pending)
        self._schedule()

    def add(self, impression_id: str, campaign_id: int, visitor_id: str, line: str,
            done: Done) -> None:
        """Buffer an impression (its line): no dedupe, no copy."""
        shard = self._keys.visit_shard(campaign_id, visitor_id)
        self._events.setdefault((shard, impression_id[:8]), []).append(
            (b"i", impression_id, line, None, done))
        self._schedule()

    async def record_click(self, click_id: str, campaign_id: int, visitor_id: str,
                           is_bot: bool, line: str) -> bool:
        """add_click, awaited: whether the click is unique."""
        future = asyncio.get_running_loop().create_future()
        self.add_click(click_id, campaign_id, visitor_id, is_bot, line, _settle(future))
        return bool(await future)

    async def record(self, impression_id: str, campaign_id: int, visitor_id: str,
                     line: str) -> None:
        """add, awaited."""
        future = asyncio.get_running_loop().create_future()
        self.add(impression_id, campaign_id, visitor_id, line, _settle(future))
        await future

    async def record_conversion(self, keys: list[str], args: list[Any]) -> bool:
        """Compare-and-set a conversion's state and buffer its event (RECORD_CONVERSION)."""
        done = await self._call(("EVALSHA", self._conversion_sha, len(keys), *keys, *args))
        return bool(done)

    def call(self, *command: Any) -> asyncio.Future[Any]:
        """Any command, sent in the next round."""
        return self._call(command)

    async def ping(self) -> None:
        await self._redis.ping()

    async def recent_click(self, click_id: str) -> dict[str, Any] | None:
        """A click's copy, while its row is not committed (storage/lines.click_event)."""
        raw = await self._redis.hget(*self._keys.copy_of(click_id))
        return None if raw is None else lines.click_event(raw)

    # -- one round at a time -----------------------------------------------------------------

    def _call(self, command: Command) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((command, future))
        self._schedule()
        return future

    def _schedule(self) -> None:
        if not self._flush_scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            # Runs after every callback already due in this tick: those requests join in.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch: list[tuple[Command, Any]] = list(self._queued)
        self._queued = []
        streams = self._keys.streams
        for (shard, prefix), events in self._events.items():
            keys: list[str] = [streams[shard], self._keys.copies(shard, prefix),
                               self._keys.backlog(shard)]
            args: list[Any] = [self._click_ttl, self._unique_window]
            for kind, event_id, body, seen, _ in events:
                if seen is not None:
                    keys.append(seen)
                args += (kind, event_id, body)
            batch.append((("EVALSHA", self._events_sha, len(keys), *keys, *args), events))
        self._events = {}
        if not batch:
            return
        self._in_flight += 1
        metrics.BUFFER_PIPELINE.observe(len(batch))
        commands = [command for command, _ in batch]
        if self._pipe is not None:
            self._pipe.send_soon(commands, lambda results: self._received(batch, results))
        else:
            self._spawn(self._send(batch))

    def _received(self, batch: list[tuple[Command, Any]], results: list[Any] | Exception) -> None:
        """A round's replies (or its error), handed to each event and call."""
        if not isinstance(results, Exception) and any(
                isinstance(r, NoScriptError) for r in results):
            # Redis restarted or was flushed since we last loaded the scripts.
            self._spawn(self._send(batch, results))
            return
        self._in_flight -= 1
        _deliver(batch, results)
        if self._queued or self._events:
            self._schedule()

    async def _send(self, batch: list[tuple[Command, Any]],
                    results: list[Any] | None = None) -> None:
        """A round through redis-py (a Cluster), or again once the scripts are loaded."""
        try:
            if results is None:
                results = await send(self._redis, [command for command, _ in batch])
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                for source in SCRIPTS:
                    await self._redis.script_load(source)
                again = await self._pipeline([batch[i][0] for i in missing])
                for i, result in zip(missing, again):
                    results[i] = result
        except Exception as exc:  # noqa: BLE001 - every caller learns of it
            results = None
            error: Exception = exc if isinstance(exc, RedisError) else RedisError(repr(exc))
        self._in_flight -= 1
        _deliver(batch, error if results is None else results)
        if self._queued or self._events:
            self._schedule()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        if self._pipe is not None:
            return await self._pipe.send(commands)
        return await send(self._redis, commands)

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()


def _deliver(batch: list[tuple[Command, Any]], results: list[Any] | Exception) -> None:
    for i, (_, receiver) in enumerate(batch):
        result = results if isinstance(results, Exception) else results[i]
        if isinstance(result, Exception) and not isinstance(result, RedisError):
            result = ResponseError(repr(result))
        if type(receiver) is list:
            # One script call's events: each its own part of the reply (or the error).
            if not isinstance(result, (list, Exception)) or (
                    type(result) is list and len(result) != len(receiver)):
                result = ResponseError(f"unexpected reply to the events script: {result!r:.80}")
            for n, pending in enumerate(receiver):
                try:
                    pending[4](result if isinstance(result, Exception) else result[n])
                except Exception:  # noqa: BLE001 - one event's bug must not silence the others
                    log.exception("an event's callback failed")
        elif not receiver.done():  # a plain call; its caller may have been cancelled
            if isinstance(result, Exception):
                receiver.set_exception(result)
            else:
                receiver.set_result(result)


def _settle(future: asyncio.Future[Any]) -> Done:
    """A Done that settles the future (unless its waiter was cancelled)."""
    def done(result: Any) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    return done
