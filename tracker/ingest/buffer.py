"""The Redis step of the hot path: uniqueness, the durable append and what read-your-writes
needs, in one round trip for many requests.

Every tracking request makes exactly one call here. The calls that arrive while the previous
round is in flight (or, when none is, within one event-loop tick) go together in the next
round: one write and one read on one connection. The events of a round, per shard, go in one
script call that appends them as ONE stream entry (what an entry holds: ingest/entries.py),
so a burst costs a handful of round trips, script calls and entries instead of one per
request; the busier the worker, the fuller each round. Each event is told its result by a
callback, from inside the reply's arrival: no task, no future per request.

Uniqueness: a visitor whose id was made for this very click (no cookie) is new, so its click
is unique without asking; only a returning visitor's click is checked. Either way the
visitor is marked in the campaign's hash of the current window (`Keys.seen`: one HSET a
campaign per round, not a key per click), after the append: a mark never exists for an event
that is not buffered. A click is unique when the visitor has no mark in the current window
and none younger than the window in the one before.

Read-your-writes: the entry is named in a set per millisecond of click ids (`Keys.recent`),
so a lookup finds a click before its row is committed from its id alone; the writer takes
the entry out once committed.

What a Redis failure does: every event of the round gets the RedisError and nothing of the
script's is left in Redis (the append is its first write).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from .. import metrics
from ..redis_client import Client, Command, send
from ..redis_keys import Keys
from ..redis_pipe import RedisPipe
from ..storage import lines
from .entries import CLICKS, fields_of

log = logging.getLogger(__name__)

# One round's events of one shard, in ONE stream entry: a script call costs Redis as much
# again as the commands inside it, an entry per event cost the writer a read, an
# acknowledgement and a delete each, a key per mark or copy far more than a field of a hash.
# KEYS: 1 stream, 2 backlog counter, then R recent sets, then per campaign: the current and
#       the previous window's seen hash
# ARGV: 1 recent sets' TTL (s), 2 now (ms), 3 window (ms), 4 when the current window's hash
#       may go (unix ms), 5 R, 6 the recent sets' names (the entry's `k`), 7 campaigns, then
#       per campaign: U returning clicks, N new visitors, U x (visitor, line without its
#       is_unique), N x visitor; then C and the C whole click lines (new visitors', bots')
#       joined by newlines, then I and the I impression lines so joined (one argument each:
#       an argument per line cost Redis a string each, twice)
# Returns 1 or 0 for each returning click, in order: unique or not. A visitor's second click
# in the same call is not unique.
RECORD_EVENTS = r"""
local now, window = ARGV[2], tonumber(ARGV[3])
local out, clicks, marking = {}, {}, {}
local recent = tonumber(ARGV[5])
local k = 3 + recent
local a = 8
for _ = 1, tonumber(ARGV[7]) do
    local cur, prev = KEYS[k], KEYS[k + 1]
    k = k + 2
    local u, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    a = a + 2
    local marks = {}
    if u > 0 then
        local visitors = {}
        for i = 1, u do visitors[i] = ARGV[a + 2 * i - 2] end
        local here = redis.call('HMGET', cur, unpack(visitors))
        local before = redis.call('HMGET', prev, unpack(visitors))
        local taken = {}
        for i = 1, u do
            local v = visitors[i]
            if here[i] or taken[v] or (before[i] and tonumber(now) - tonumber(before[i]) < window) then
                out[#out + 1] = 0
                clicks[#clicks + 1] = ARGV[a + 2 * i - 1] .. '\tf'
            else
                out[#out + 1] = 1
                clicks[#clicks + 1] = ARGV[a + 2 * i - 1] .. '\tt'
                taken[v] = true
                marks[#marks + 1] = v
                marks[#marks + 1] = now
            end
        end
        a = a + 2 * u
    end
    for i = a, a + n - 1 do
        marks[#marks + 1] = ARGV[i]
        marks[#marks + 1] = now
    end
    a = a + n
    if #marks > 0 then marking[#marking + 1] = {cur, marks} end
end
local whole = tonumber(ARGV[a])
if whole > 0 then clicks[#clicks + 1] = ARGV[a + 1] end
local count = #out + whole
local impressions = tonumber(ARGV[a + 2])
local fields = {'n', count + impressions}
if count > 0 then
    fields[3], fields[4] = 'c', table.concat(clicks, '\n')
    fields[5], fields[6] = 'k', ARGV[6]
end
if impressions > 0 then
    fields[#fields + 1] = 'i'
    fields[#fields + 1] = ARGV[a + 3]
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('INCRBY', KEYS[2], count + impressions)
for i = 3, 2 + recent do
    redis.call('SADD', KEYS[i], id)
    redis.call('EXPIRE', KEYS[i], ARGV[1])
end
for _, m in ipairs(marking) do
    redis.call('HSET', m[1], unpack(m[2]))
    redis.call('PEXPIREAT', m[1], ARGV[4])
end
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
# Rounds in flight at once: while one is, the next calls gather and go together when it is
# answered (fewer, fuller rounds under load; none waits when idle).
MAX_IN_FLIGHT = 1
# Events in one script call at most (Lua's unpack has a limit, and a call blocks Redis).
MAX_CALL = 1000
# A window's seen hash may go this long after the next window ended (see marks.py, which
# unlinks it before then, off Redis's main thread).
MARKS_GRACE = 8  # the window's eighth

# Called once with an event's result (a click: 1 if unique, else 0), or with the RedisError
# that kept it out of Redis.
Done = Callable[[Any], None]


class _Call:
    """One script call's events: the events of one shard in one round."""

    __slots__ = ("campaigns", "whole", "whole_done", "impressions", "impressions_done",
                 "recent", "size")

    def __init__(self) -> None:
        # campaign id: ([(visitor, line, done)] of returning clicks, [visitor] new ones)
        self.campaigns: dict[int, tuple[list[tuple[str, str, Done]], list[str]]] = {}
        self.whole: list[str] = []
        self.whole_done: list[tuple[Done, int]] = []
        self.impressions: list[str] = []
        self.impressions_done: list[Done] = []
        self.recent: dict[str, None] = {}
        self.size = 0

    def command(self, sha: str, keys: Keys, shard: int, recent_ttl: int, window_ms: int,
                now_ms: int) -> Command:
        window = now_ms // window_ms
        recent = [keys.recent(shard, prefix) for prefix in self.recent]
        names: list[Any] = [keys.streams[shard], keys.backlog(shard), *recent]
        args: list[Any] = [recent_ttl, now_ms, window_ms,
                           (window + 2) * window_ms + window_ms // MARKS_GRACE,
                           len(recent), ",".join(recent), len(self.campaigns)]
        for campaign_id, (returning, new) in self.campaigns.items():
            names += (keys.seen(shard, campaign_id, window), keys.seen(shard, campaign_id, window - 1))
            args += (len(returning), len(new))
            for visitor, line, _ in returning:
                args += (visitor, line)
            args += new
        args += (len(self.whole), "\n".join(self.whole),
                 len(self.impressions), "\n".join(self.impressions))
        return ("EVALSHA", sha, len(names), *names, *args)

    def deliver(self, result: Any) -> None:
        """Each event its part of the reply (or the error)."""
        if not isinstance(result, Exception):
            expected = sum(len(returning) for returning, _ in self.campaigns.values())
            if not isinstance(result, list) or len(result) != expected:
                result = ResponseError(f"unexpected reply to the events script: {result!r:.80}")
        flags = iter(()) if isinstance(result, Exception) else iter(result)
        for returning, _ in self.campaigns.values():
            for _, _, done in returning:
                _tell(done, result if isinstance(result, Exception) else next(flags))
        for done, unique in self.whole_done:
            _tell(done, result if isinstance(result, Exception) else unique)
        for done in self.impressions_done:
            _tell(done, result if isinstance(result, Exception) else 0)


def _tell(done: Done, result: Any) -> None:
    try:
        done(result)
    except Exception:  # noqa: BLE001 - one event's bug must not silence the others
        log.exception("an event's callback failed")


class EventBuffer:
    def __init__(self, redis: Client, keys: Keys, click_ttl: int, unique_window: int,
                 pipe: RedisPipe | None = None) -> None:
        self._redis = redis
        # One server: each round goes through our own pipelined connection (see
        # redis_pipe.py); a Cluster (or TLS) through redis-py.
        self._pipe = pipe
        self._keys = keys
        self._recent_ttl = click_ttl
        self._window_ms = unique_window * 1000
        self._events_sha = hashlib.sha1(RECORD_EVENTS.encode()).hexdigest()
        self._conversion_sha = hashlib.sha1(RECORD_CONVERSION.encode()).hexdigest()
        self._queued: list[tuple[Command, asyncio.Future[Any]]] = []
        # The next round's events: script calls by shard (the last one is filling).
        self._calls: dict[int, list[_Call]] = {}
        self._flush_scheduled = False
        self._in_flight = 0
        self._sending: set[asyncio.Task[None]] = set()

    def stamp(self, click_id: str, campaign_id: int, visitor_id: str) -> str:
        """A new click id spelling the shard of the visit (see Keys)."""
        return self._keys.stamp(click_id, self._keys.visit_shard(campaign_id, visitor_id))

    def _call_for(self, shard: int) -> _Call:
        calls = self._calls.get(shard)
        if calls is None:
            calls = self._calls[shard] = [_Call()]
        elif calls[-1].size >= MAX_CALL:
            calls.append(_Call())
        call = calls[-1]
        call.size += 1
        return call

    def add_click(self, click_id: str, campaign_id: int, visitor_id: str, is_bot: bool,
                  new_visitor: bool, line: str, done: Done) -> None:
        """Buffer a click in the next round: its line (storage/lines.py) without is_unique;
        `done` learns whether it is the visitor's first on this campaign within the window
        (1 or 0), or the error. A bot's click is never unique and marks nobody; a new
        visitor's (an id made for this click) always is."""
        # The click id spells this shard (RequestTracker stamps it): one slot for its keys.
        shard = self._keys.visit_shard(campaign_id, visitor_id)
        call = self._call_for(shard)
        call.recent[click_id[:10]] = None
        if is_bot:
            call.whole.append(line + "\tf")
            call.whole_done.append((done, 0))
            self._schedule()
            return
        visitors = call.campaigns.get(campaign_id)
        if visitors is None:
            visitors = call.campaigns[campaign_id] = ([], [])
        if new_visitor:
            visitors[1].append(visitor_id)
            call.whole.append(line + "\tt")
            call.whole_done.append((done, 1))
        else:
            visitors[0].append((visitor_id, line, done))
        self._schedule()

    def add(self, impression_id: str, campaign_id: int, visitor_id: str, line: str,
            done: Done) -> None:
        """Buffer an impression (its line): no uniqueness, no read-your-writes."""
        call = self._call_for(self._keys.visit_shard(campaign_id, visitor_id))
        call.impressions.append(line)
        call.impressions_done.append(done)
        self._schedule()

    async def record_click(self, click_id: str, campaign_id: int, visitor_id: str,
                           is_bot: bool, line: str, new_visitor: bool = False) -> bool:
        """add_click, awaited: whether the click is unique."""
        future = asyncio.get_running_loop().create_future()
        self.add_click(click_id, campaign_id, visitor_id, is_bot, new_visitor, line,
                       _settle(future))
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

    async def recent_line(self, click_id: str) -> bytes | None:
        """A click's line while its row is not committed: from the entries named in the
        set of its id's millisecond (two rounds; None once committed, or never issued)."""
        click_id = click_id.upper()
        entry_ids = await self.call("SMEMBERS", self._keys.recent_of(click_id))
        if not entry_ids:
            return None
        stream = self._keys.click_stream(click_id)
        replies = await asyncio.gather(*(self.call("XRANGE", stream, e, e) for e in entry_ids))
        try:
            wanted = f"{lines.ulid_number(click_id):032x}".encode()
        except ValueError:
            return None
        for reply in replies:
            for _, fields in fields_of(reply):
                for line in fields.get(CLICKS, b"").split(b"\n"):
                    if line.startswith(wanted):
                        return line
        return None

    async def recent_click(self, click_id: str) -> dict[str, Any] | None:
        """recent_line as the click's fields (storage/lines.click_event)."""
        line = await self.recent_line(click_id)
        return None if line is None else lines.click_event(line)

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
        now_ms = int(time.time() * 1000)
        for shard, calls in self._calls.items():
            for call in calls:
                batch.append((call.command(self._events_sha, self._keys, shard,
                                           self._recent_ttl, self._window_ms, now_ms), call))
        self._calls = {}
        if not batch:
            return
        self._in_flight += 1
        metrics.BUFFER_PIPELINE.observe(len(batch))
        if self._pipe is not None:
            self._pipe.send_soon([command for command, _ in batch],
                                 lambda results: self._received(batch, results))
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
        if self._queued or self._calls:
            self._schedule()

    async def _send(self, batch: list[tuple[Command, Any]],
                    results: list[Any] | None = None) -> None:
        """A round through redis-py (a Cluster), or again once the scripts are loaded."""
        error: Exception | None = None
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
            error = exc if isinstance(exc, RedisError) else RedisError(repr(exc))
        self._in_flight -= 1
        _deliver(batch, error if error is not None or results is None else results)
        if self._queued or self._calls:
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


def _deliver(batch: list[tuple[Command, Any]], results: list[Any] | Exception | None) -> None:
    if results is None:
        results = RedisError("no reply")
    for i, (_, receiver) in enumerate(batch):
        result = results if isinstance(results, Exception) else results[i]
        if isinstance(result, Exception) and not isinstance(result, RedisError):
            result = ResponseError(repr(result))
        if type(receiver) is _Call:
            receiver.deliver(result)
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
