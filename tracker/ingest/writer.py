"""The batch writer: Redis Stream → PostgreSQL, exactly once.

XREADGROUP about N events (or what came within T ms; an entry holds a round of the hot
path's events) → one transaction that COPYs them in, inserts what is new and folds it into
rollups → COMMIT → XACK + XDEL, the entries out of the sets that found their clicks for
read-your-writes (PostgreSQL answers for them now). A crash anywhere before the
XACK leaves the entries pending; this writer retries them, the next worker of its slot reads
them at start, or, once its heartbeat has expired, another writer claims them; the replay
inserts nothing twice. Knows nothing of HTTP.

Sharded (Redis Cluster), every writer reads every shard's stream in one pipelined round and
writes what it got as one batch; a shard's entries are acknowledged beside its stream, one
script per shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .. import metrics
from ..storage import conversions as conversion_store
from ..storage import events as store
from ..redis_client import Client, send
from ..redis_keys import Keys
from ..storage import rows
from ..storage import lines
from .entries import CLICKS, IMPRESSIONS, RECENT, SINGLE, counted, fields_of, pieces, size

log = logging.getLogger(__name__)

Entry = tuple[str, dict[bytes, bytes]]
Taken = tuple[int, list[Entry]]  # a shard, and entries read from its stream
# A piece of a batch: a label for dead_letters (its entry's id, and a line's place in it once
# a refused batch is split that far), its kind (CLICKS, IMPRESSIONS: lines; SINGLE: one JSON
# event) and its bytes.
Item = tuple[str, bytes, bytes]
Connect = Callable[[], Awaitable[asyncpg.Connection]]

# Errors that blame a row's values, not PostgreSQL nor our code: SQLSTATE class 22 (data
# exception: bad encoding, out of range, a NUL byte) and class 23 (integrity constraint: a
# null where none may be). Only these split a batch to find the culprit, who goes alone to
# dead_letters. Anything else (connection lost, server restarting, a missing table) retries
# the whole batch after a pause and shows in tracker_batch_failures_total, so an outage never
# sends good events to dead_letters.
DATA_ERROR_CLASSES = ("22", "23")


def blames_a_row(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate or "")[:2] in DATA_ERROR_CLASSES


# Written entries are acknowledged and leave the stream; the backlog counter loses the
# events of each entry acknowledged here first (XACK says 1 once per entry, whoever acks
# it: a replayed or claimed batch is not taken off twice), and is reset when the stream is
# empty (a tool's uncounted entries, an entry deleted while pending, cannot leave it off for
# good); the entries leave the sets that named them for read-your-writes (PostgreSQL answers
# for their clicks now: what Redis keeps of a stored click is its uniqueness mark alone).
# KEYS: 1 stream, 2 backlog counter, then recent sets
# ARGV: 1 group, 2 E, then E x (entry id, events it added to the backlog), then per recent
#       set, in KEYS order: how many entry ids, the ids
ACK_AND_DELETE = """
local group = ARGV[1]
local last = 2 + 2 * tonumber(ARGV[2])
local done = 0
local ids = {}
for i = 3, last, 2 do
    if redis.call('XACK', KEYS[1], group, ARGV[i]) == 1 then done = done + tonumber(ARGV[i + 1]) end
    ids[#ids + 1] = ARGV[i]
end
for i = 1, #ids, 4000 do
    redis.call('XDEL', KEYS[1], unpack(ids, i, math.min(i + 3999, #ids)))
end
local at = last + 1
for k = 3, #KEYS do
    local n = tonumber(ARGV[at])
    for i = at + 1, at + n, 4000 do
        redis.call('SREM', KEYS[k], unpack(ARGV, i, math.min(i + 3999, at + n)))
    end
    at = at + n + 1
end
if redis.call('XLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[2])
elseif done > 0 and redis.call('DECRBY', KEYS[2], done) < 0 then
    redis.call('SET', KEYS[2], 0)
end
return done
"""


# Removes a consumer from the group only if it is gone (no heartbeat) and holds nothing:
# DELCONSUMER drops the pending entries of the consumer it deletes, so checking and deleting
# must be one step (a restarted writer of the same name could read a batch in between).
# KEYS: stream, the consumer's heartbeat key; ARGV: group, consumer
REMOVE_IF_GONE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -2 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# A read at least this full means load: worth lingering for a fuller batch.
LINGER_FROM = 32
# Sharded, an idle writer looks at every stream this often (a blocking read waits on one
# stream only).
POLL_MS = 20


def consumer_name(data_dir: Path | None = None, slot: int = 0) -> str:
    """The writer's name in the consumer group: stable across restarts of the same install
    (host, data folder, worker slot), so a restarted worker finds its own pending batch at
    once; without a data folder (tools, tests), a name of its own."""
    if data_dir is None:
        return f"{socket.gethostname()}:{os.getpid()}-{os.urandom(3).hex()}"
    install = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{install}:{slot}"


class BatchWriter:
    def __init__(self, redis: Client, connect: Connect, keys: Keys, *,
                 batch_size: int, wait_ms: int, claim_idle_ms: int, linger_ms: int = 0,
                 consumer: str | None = None) -> None:
        self._redis = redis
        self._connect = connect
        self._keys = keys
        self.batch_size = batch_size
        self.wait_ms = wait_ms
        self.claim_idle_ms = claim_idle_ms
        self.linger_ms = linger_ms
        self.consumer = consumer or consumer_name()
        self._conn: asyncpg.Connection | None = None
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._shards = range(keys.shards)
        # Entries read but not yet committed: retried before anything new is read.
        self._held: list[Taken] = []
        # One step at a time: a drain() beside run() (a test's flush, an operator's) must not
        # read over the held batch nor share the connection mid-transaction.
        self._stepping = asyncio.Lock()
        # Events per entry in what was read lately (see _entries_for); a guess to start with,
        # low enough that a first read under load stays a batch's worth.
        self._per_entry = 16.0
        self._ack_sha = hashlib.sha1(ACK_AND_DELETE.encode()).hexdigest()
        self._remove_script = redis.register_script(REMOVE_IF_GONE)
        self._warned: set[str] = set()
        # Looked up once: the loop sets them on every step.
        self._up = {b: metrics.BACKEND_UP.labels(b) for b in ("postgres", "redis")}

    # -- lifecycle -------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        for shard in self._shards:
            await self._ensure_group(shard)

    async def _ensure_group(self, shard: int) -> None:
        try:
            await self._redis.xgroup_create(self._keys.streams[shard], self._keys.group, id="0",
                                            mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Write until stop(). Says it is alive all along, from a task of its own: a writer
        that waits out a PostgreSQL outage holding a batch is busy, not dead."""
        heartbeat = asyncio.create_task(self._heartbeat(), name="writer-heartbeat")
        try:
            try:
                await self._until_ok(self._alive)
                await self._until_ok(self.ensure_group)
                # Our own pending entries: what this slot read before it was killed.
                # (A batch never holds more entries than batch_size: this reads all of it.)
                self._held = await self._until_ok(lambda: self._read_all("0", self.batch_size))
            except _Stopped:
                return
            backoff = 0.05
            while not self._stopping.is_set():
                try:
                    if await self.step():
                        self._up["postgres"].set(1)
                    self._up["redis"].set(1)
                    backoff = 0.05
                    self._recovered()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the writer must outlive any one failure
                    self._note_failure(exc)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if not self._stopping.is_set():  # cancelled: the connection may be mid-batch
                await self._close_conn()

    async def close(self) -> None:
        """Leaving for good: say so, so that whatever this writer still holds pending (a batch
        it could not finish) is claimed by a live writer at once, not after claim_idle_ms."""
        with contextlib.suppress(RedisError, OSError):
            async with self._redis.pipeline(transaction=False) as pipe:
                for shard in self._shards:
                    pipe.delete(self._keys.writer_alive(self.consumer, shard))
                await pipe.execute()
        await self._close_conn()

    def stop(self) -> None:
        self._stopping.set()

    async def drain(self, deadline: float) -> None:
        """Write what is buffered until the stream is empty or `deadline` (monotonic) passes."""
        while time.monotonic() < deadline:
            try:
                if not await self.step(block=False):
                    return
            except Exception as exc:  # noqa: BLE001
                self._note_failure(exc)
                return

    # -- one step --------------------------------------------------------------------------

    async def step(self, block: bool = True) -> int:
        """Read one batch (held, claimed or new), write it, ack it; return its size."""
        async with self._stepping:
            return await self._step(block)

    async def _step(self, block: bool) -> int:
        now = time.monotonic()
        if not self._held:
            self._held = await self._take(now, block)
        batch = [entry for _, entries in self._held for entry in entries]
        if not batch:
            self._held = []
            return 0
        events = await self.write(batch)
        await self._ack(self._held)
        self._held = []
        return events

    async def _take(self, now: float, block: bool) -> list[Taken]:
        """The next batch: a gone writer's pending entries when it is time to look, else new
        ones."""
        if now >= self._next_claim:
            self._next_claim = now + max(self.claim_idle_ms / 2000, 0.05)
            claimed = await self.claim()
            if claimed:
                return claimed
        if len(self._shards) == 1:
            return await self._take_one(block)
        per_shard = self._per_shard(self._entries_for(self.batch_size))
        taken = await self._read_all(">", per_shard)
        count = _count(taken)
        if count < self.batch_size // 2 and any(len(e) == per_shard for _, e in taken):
            # Entries held fewer events than guessed: the rest of a batch, now that we know.
            taken += await self._read_all(
                ">", self._per_shard(self._entries_for(self.batch_size - count)))
            count = _count(taken)
        if not count:
            if block:
                await self._sleep(min(self.wait_ms, POLL_MS) / 1000)
            return []
        if block and self.linger_ms and LINGER_FROM <= count < self.batch_size:
            await asyncio.sleep(self.linger_ms / 1000)
            taken += await self._read_all(
                ">", self._per_shard(self._entries_for(self.batch_size - count)))
        return taken

    async def _take_one(self, block: bool) -> list[Taken]:
        """Unsharded: one blocking read of the one stream."""
        batch = await self._read(0, ">", block=self.wait_ms if block else None)
        count = _size(batch)
        if block and self.linger_ms and LINGER_FROM <= count < self.batch_size:
            # Under load, wait a moment for a fuller batch: each transaction's fixed cost
            # (COPY set-up, planning, the commit's fsync) is shared by more events. A trickle
            # is written at once, so light load keeps its low lag.
            await asyncio.sleep(self.linger_ms / 1000)
            batch += await self._read(0, ">", count=self._entries_for(self.batch_size - count))
        return [(0, batch)] if batch else []

    def _per_shard(self, count: int) -> int:
        return max(1, -(-count // len(self._shards)))

    def _entries_for(self, events: int) -> int:
        """How many entries to read for about `events` events: an entry holds a round of the
        hot path's events, more of them the busier it is, so the writer goes by what the
        entries it read lately held."""
        return max(1, round(events / self._per_entry))

    def _learn(self, entries: list[Entry]) -> None:
        if entries:
            self._per_entry = max(1.0, _size(entries) / len(entries))

    async def claim(self) -> list[Taken]:
        """The pending entries of writers that are gone (no heartbeat for claim_idle_ms), up to
        a batch; consumers that are gone and hold nothing more are removed from the group. A
        live writer's entries are never taken, however long it has held them."""
        taken: list[Taken] = []
        room = self.batch_size  # events
        for shard in self._shards:
            for _ in range(2):  # a second time when the entries held fewer events than guessed
                asked = self._entries_for(room)
                entries = await self._claim(shard, asked)
                if entries:
                    self._learn(entries)
                    taken.append((shard, entries))
                    room -= _size(entries)
                if len(entries) < asked or room <= 0:
                    break
            if room <= 0:
                break
        claimed = _count(taken)
        if claimed:
            metrics.EVENTS_CLAIMED.inc(claimed)
            log.info("claimed %d pending events from writers that are gone", claimed)
        return taken

    async def _claim(self, shard: int, room: int) -> list[Entry]:
        stream, group = self._keys.streams[shard], self._keys.group
        try:
            consumers = [c for c in await self._redis.xinfo_consumers(stream, group)
                         if _s(c["name"]) != self.consumer]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            await self._ensure_group(shard)
            return []
        if not consumers:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for consumer in consumers:
                pipe.exists(self._keys.writer_alive(_s(consumer["name"]), shard))
            alive = await pipe.execute()
        entries: list[Entry] = []
        for consumer, is_alive in zip(consumers, alive):
            if is_alive:
                continue
            name = _s(consumer["name"])
            if int(consumer["pending"]) and len(entries) < room:
                ids: list[Any] = [p["message_id"] for p in await self._redis.xpending_range(
                    stream, group, min="-", max="+", count=room - len(entries),
                    consumername=name)]
                # Heartbeats come every quarter of claim_idle_ms, so every entry of a writer
                # whose key expired is older than three quarters of it: half takes them all,
                # while a second writer claiming within that half gets none of them.
                claimed: Any = await self._redis.xclaim(
                    stream, group, self.consumer, min_idle_time=self.claim_idle_ms // 2,
                    message_ids=ids)
                entries += [(_s(i), f) for i, f in claimed if f]
            await self._remove_script(keys=[stream, self._keys.writer_alive(name, shard)],
                                      args=[group, name])
        return entries

    async def _alive(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in self._shards:
                pipe.set(self._keys.writer_alive(self.consumer, shard), os.getpid(),
                         px=self.claim_idle_ms)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.claim_idle_ms / 4000)
            try:
                await self._alive()
            except Exception as exc:  # noqa: BLE001 - Redis away: nothing to claim from us then
                self._note_failure(exc, count=False)

    async def _read(self, shard: int, start: str, block: int | None = None,
                    count: int | None = None) -> list[Entry]:
        """`count` entries, or (None) about a batch's worth of events: entries hold as many
        events as the round that made them, so when the first read's entries held fewer
        than guessed, the rest of the batch is read too, now that their size is known."""
        if count is not None:
            (entries,) = await self._reads([shard], start, count, block)
            return entries
        asked = self._entries_for(self.batch_size)
        (entries,) = await self._reads([shard], start, asked, block)
        if start == ">" and len(entries) == asked and _size(entries) < self.batch_size // 2:
            (more,) = await self._reads([shard], start,
                                        self._entries_for(self.batch_size - _size(entries)))
            entries += more
        return entries

    async def _read_all(self, start: str, count: int | None = None) -> list[Taken]:
        """One non-blocking read of every shard's stream, in one pipelined round."""
        read = await self._reads(self._shards, start, count)
        return [(shard, entries) for shard, entries in zip(self._shards, read) if entries]

    async def _reads(self, shards: Iterable[int], start: str, count: int | None,
                     block: int | None = None) -> list[list[Entry]]:
        """XREADGROUP of each shard's stream, in one round trip; a missing group is made
        (none yet, or Redis came back empty: the events arriving from now on, and the
        spool's replay, need it) and reads as nothing."""
        shards = list(shards)
        wait = () if block is None else ("BLOCK", block)
        replies = await send(self._redis, [
            ("XREADGROUP", "GROUP", self._keys.group, self.consumer, "COUNT",
             count or self._entries_for(self.batch_size), *wait, "STREAMS",
             self._keys.streams[shard], start)
            for shard in shards])
        read: list[list[Entry]] = []
        for shard, reply in zip(shards, replies):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                log.warning("the stream's consumer group is missing; creating it")
                await self._ensure_group(shard)
                reply = None
            elif isinstance(reply, Exception):
                raise reply
            entries = _entries(reply)
            self._learn(entries)
            read.append(entries)
        return read

    async def _ack(self, taken: list[Taken]) -> None:
        # One script per shard, in its slot: its entries acknowledged, deleted, taken off
        # the backlog and out of the recent sets.
        commands = []
        for shard, entries in taken:
            recent: dict[bytes, list[str]] = {}
            args: list[Any] = [self._keys.group, len(entries)]
            for entry_id, fields in entries:
                args += (entry_id, counted(fields))
                named = fields.get(RECENT)
                if named:
                    for name in named.split(b","):
                        recent.setdefault(name, []).append(entry_id)
            for ids in recent.values():
                args += (len(ids), *ids)
            commands.append(("EVALSHA", self._ack_sha, 2 + len(recent), self._keys.streams[shard],
                             self._keys.backlog(shard), *recent, *args))
        replies = await send(self._redis, commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis restarted or was flushed since: load the script, then ack again (acking
            # twice is harmless).
            await self._redis.script_load(ACK_AND_DELETE)
            replies = await send(self._redis, commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    # -- PostgreSQL ------------------------------------------------------------------------

    async def write(self, batch: list[Entry]) -> int:
        """Store a batch exactly once; how many events it held. A batch PostgreSQL refuses
        for its data is split until the refused event stands alone; that one goes to
        dead_letters."""
        started = time.perf_counter()
        items, count = _items(batch)
        conn = await self._connection()
        try:
            await self._write_split(conn, items)
        except BaseException:
            # The connection may be broken or mid-transaction: start the retry on a new one.
            await self._close_conn()
            raise
        metrics.BATCH_ROWS.observe(count)
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)
        # Stream ids start with the millisecond the event was appended, just before its answer.
        metrics.WRITE_LAG.observe(max(0.0, time.time() - int(batch[0][0].split("-", 1)[0]) / 1000))
        return count

    async def _write_split(self, conn: asyncpg.Connection, items: list[Item]) -> None:
        batch = store.Batch()
        conversions: list[tuple[Any, ...]] = []
        bad: list[tuple[Item, str]] = []
        for item in items:
            kind = item[1]
            if kind is CLICKS:
                batch.click_lines.append((item, item[2]))
            elif kind is IMPRESSIONS:
                batch.impression_lines.append((item, item[2]))
            else:
                try:
                    event = orjson.loads(item[2])
                    kind = event["type"]
                    if kind == "click":
                        batch.clicks.append((item, event))
                    elif kind == "impression":
                        batch.impressions.append((item, event))
                    elif kind == "conversion":
                        conversions.append(rows.conversion_record(event))
                    else:
                        raise rows.BadEvent(f"unknown event type {kind!r}")
                except (KeyError, TypeError, orjson.JSONDecodeError, rows.BadEvent) as exc:
                    bad.append((item, repr(exc)))
        try:
            try:
                counts = await self._transaction(conn, batch, conversions, bad)
            except store.Replayed:
                # Written before, in part or whole (a crash between COMMIT and XACK, a claimed
                # batch): rolled back; now only what is new is inserted and folded.
                counts = await self._transaction(conn, batch, conversions, bad, replayed=True)
        except asyncpg.PostgresError as exc:
            if not blames_a_row(exc):
                raise
            if len(items) == 1:
                label, kind, raw = items[0]
                if kind is not SINGLE and b"\n" in raw:  # a round's lines: one by one now
                    await self._write_split(conn, [(f"{label}/{n}", kind, line)
                                                   for n, line in enumerate(raw.split(b"\n"))])
                    return
                log.error("event %s refused by PostgreSQL, kept in dead_letters: %r", label, exc)
                async with conn.transaction():
                    await store.dead_letters(conn, [(label, _payload(items[0]), repr(exc))])
                metrics.DEAD_LETTERS.inc()
                return
            half = len(items) // 2
            await self._write_split(conn, items[:half])
            await self._write_split(conn, items[half:])
            return
        new_clicks, new_impressions, new_conversions, refused = counts
        metrics.DEAD_LETTERS.inc(refused)
        metrics.EVENTS_WRITTEN.labels("click").inc(new_clicks)
        metrics.EVENTS_WRITTEN.labels("impression").inc(new_impressions)
        metrics.EVENTS_WRITTEN.labels("conversion").inc(new_conversions)

    @staticmethod
    async def _transaction(conn: asyncpg.Connection, batch: store.Batch,
                           conversions: list[tuple[Any, ...]], bad: list[tuple[Item, str]], *,
                           replayed: bool = False) -> tuple[int, int, int, int]:
        """One transaction: (new clicks, new impressions, new conversion versions, events
        kept in dead_letters)."""
        async with conn.transaction():
            written = await store.write(conn, batch, replayed=replayed)
            # After the clicks' fold: one lock order for every writer (storage/conversions.py).
            new_conversions = await conversion_store.write(conn, conversions)
            refused = bad + written.refused
            if refused:
                await store.dead_letters(
                    conn, [(item[0], _payload(item), error) for item, error in refused])
        return written.clicks, written.impressions, new_conversions, len(refused)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
        return self._conn

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    # -- bookkeeping -----------------------------------------------------------------------

    async def backlog(self) -> tuple[int, float]:
        """(events not yet in PostgreSQL, age in seconds of the oldest), over every shard."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard, stream in enumerate(self._keys.streams):
                pipe.get(self._keys.backlog(shard))
                pipe.xrange(stream, count=1)
            replies = await pipe.execute()
        length = sum(max(0, int(n or 0)) for n in replies[0::2])
        firsts = [int(_s(first[0][0]).split("-")[0]) for first in replies[1::2] if first]
        age = max(0.0, time.time() - min(firsts) / 1000) if firsts else 0.0
        return length, age

    def _note_failure(self, exc: BaseException, count: bool = True) -> None:
        backend = "redis" if isinstance(exc, RedisError) else "postgres"
        self._up[backend].set(0)
        if count:
            metrics.BATCH_FAILURES.inc()
            metrics.BACKEND_ERRORS.labels(backend).inc()
        # Once per kind of failure until the writer succeeds again: an outage is one line
        # (tracker_batch_failures_total counts every retry).
        cause = f"{backend}:{type(exc).__name__}"
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning("batch writer: %s error, will retry: %s: %s", backend, type(exc).__name__, exc)

    def _recovered(self) -> None:
        if self._warned:
            self._warned.clear()
            log.info("batch writer: writing again")

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _until_ok(self, call: Callable[[], Awaitable[Any]]) -> Any:
        backoff = 0.05
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if self._stopping.is_set():
                    raise _Stopped from exc
                self._note_failure(exc)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)


class _Stopped(Exception):
    """stop() was called while the writer still waited for Redis to start."""


def _entries(reply: Any) -> list[Entry]:
    """The entries of one stream's XREADGROUP reply: raw from one server ({stream: [...]} in
    RESP3, [[stream, [...]]] in RESP2), parsed ([[stream, [...]]]) from a Cluster pipeline."""
    if not reply:
        return []
    found = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(_s(entry_id), fields) for entry_id, fields in fields_of(found)]


def _size(entries: list[Entry]) -> int:
    return sum(size(fields) for _, fields in entries)


def _count(taken: list[Taken]) -> int:
    """The events of what was taken."""
    return sum(_size(entries) for _, entries in taken)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _items(batch: list[Entry]) -> tuple[list[Item], int]:
    """The pieces of the entries, in order, and how many events they hold."""
    items: list[Item] = []
    count = 0
    for entry_id, fields in batch:
        for kind, raw in pieces(fields):
            items.append((entry_id, kind, raw))
        count += size(fields)
    return items, count


def _payload(item: Item) -> str:
    """The event as text PostgreSQL will take (a payload that is not even valid text, a NUL
    byte or broken UTF-8, must still reach dead_letters, or it would wedge the writer): a
    line as the JSON event it stands for, so that a replay puts back what it holds."""
    _, kind, raw = item
    if kind is not SINGLE:
        try:
            event = (lines.click_event(raw) if kind is CLICKS else lines.impression_event(raw))
            raw = orjson.dumps({"type": "click" if kind is CLICKS else "impression", **event})
        except (ValueError, TypeError):
            pass
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")
