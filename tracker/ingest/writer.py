"""The batch writer: Redis Stream → PostgreSQL, exactly once.

XREADGROUP up to N events (or what came within T ms) → one transaction that COPYs them in,
inserts what is new and folds it into rollups → COMMIT → XACK + XDEL, and the committed
clicks' Redis copies deleted (PostgreSQL answers for them now). A crash anywhere before the
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

log = logging.getLogger(__name__)

Entry = tuple[str, dict[bytes, bytes]]
Taken = tuple[int, list[Entry]]  # a shard, and entries read from its stream
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


# Written entries are acknowledged and leave the stream, so its length is the backlog; the
# copies of the clicks among them go too (what Redis keeps of a stored click is its
# uniqueness key alone).
# KEYS: stream, click copies...; ARGV: group, ids...
ACK_AND_DELETE = """
local group = ARGV[1]
for i = 2, #ARGV, 4000 do
    local ids = {unpack(ARGV, i, math.min(i + 3999, #ARGV))}
    redis.call('XACK', KEYS[1], group, unpack(ids))
    redis.call('XDEL', KEYS[1], unpack(ids))
end
for i = 2, #KEYS, 4000 do
    redis.call('UNLINK', unpack(KEYS, i, math.min(i + 3999, #KEYS)))
end
return #ARGV - 1
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
                self._held = await self._until_ok(lambda: self._read_all("0"))
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
        now = time.monotonic()
        if not self._held:
            self._held = await self._take(now, block)
        batch = [entry for _, entries in self._held for entry in entries]
        if not batch:
            self._held = []
            return 0
        await self.write(batch)
        await self._ack(self._held)
        self._held = []
        return len(batch)

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
        taken = await self._read_all(">", self._per_shard(self.batch_size))
        count = _count(taken)
        if not count:
            if block:
                await self._sleep(min(self.wait_ms, POLL_MS) / 1000)
            return []
        if block and self.linger_ms and LINGER_FROM <= count < self.batch_size:
            await asyncio.sleep(self.linger_ms / 1000)
            taken += await self._read_all(">", self._per_shard(self.batch_size - count))
        return taken

    async def _take_one(self, block: bool) -> list[Taken]:
        """Unsharded: one blocking read of the one stream."""
        batch = await self._read(0, ">", block=self.wait_ms if block else None)
        if block and self.linger_ms and LINGER_FROM <= len(batch) < self.batch_size:
            # Under load, wait a moment for a fuller batch: each transaction's fixed cost
            # (COPY set-up, planning, the commit's fsync) is shared by more events. A trickle
            # is written at once, so light load keeps its low lag.
            await asyncio.sleep(self.linger_ms / 1000)
            batch += await self._read(0, ">", count=self.batch_size - len(batch))
        return [(0, batch)] if batch else []

    def _per_shard(self, count: int) -> int:
        return max(1, -(-count // len(self._shards)))

    async def claim(self) -> list[Taken]:
        """The pending entries of writers that are gone (no heartbeat for claim_idle_ms), up to
        a batch; consumers that are gone and hold nothing more are removed from the group. A
        live writer's entries are never taken, however long it has held them."""
        taken: list[Taken] = []
        room = self.batch_size
        for shard in self._shards:
            entries = await self._claim(shard, room)
            if entries:
                taken.append((shard, entries))
                room -= len(entries)
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
        (entries,) = await self._reads([shard], start, count, block)
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
             count or self.batch_size, *wait, "STREAMS", self._keys.streams[shard], start)
            for shard in shards])
        read: list[list[Entry]] = []
        for shard, reply in zip(shards, replies):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                log.warning("the stream's consumer group is missing; creating it")
                await self._ensure_group(shard)
                reply = None
            elif isinstance(reply, Exception):
                raise reply
            read.append(_entries(reply))
        return read

    async def _ack(self, taken: list[Taken]) -> None:
        # One script per shard, in its slot, so the ids are encoded and sent once for both
        # commands; the copies of the clicks written go with them.
        commands = [("EVALSHA", self._ack_sha, 1 + sum(b"k" in f for _, f in entries),
                     self._keys.streams[shard], *(f[b"k"] for _, f in entries if b"k" in f),
                     self._keys.group, *(entry_id for entry_id, _ in entries))
                    for shard, entries in taken]
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

    async def write(self, batch: list[Entry]) -> None:
        """Store a batch exactly once. A batch PostgreSQL refuses for its data is split until
        the refused event stands alone; that one goes to dead_letters."""
        started = time.perf_counter()
        conn = await self._connection()
        try:
            await self._write_split(conn, batch)
        except BaseException:
            # The connection may be broken or mid-transaction: start the retry on a new one.
            await self._close_conn()
            raise
        metrics.BATCH_ROWS.observe(len(batch))
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)
        # Stream ids start with the millisecond the event was appended, just before its answer.
        metrics.WRITE_LAG.observe(max(0.0, time.time() - int(batch[0][0].split("-", 1)[0]) / 1000))

    async def _write_split(self, conn: asyncpg.Connection, batch: list[Entry]) -> None:
        clicks: list[tuple[Entry, dict[str, Any]]] = []
        impressions: list[tuple[Entry, dict[str, Any]]] = []
        conversions: list[tuple[Any, ...]] = []
        bad: list[tuple[Entry, str]] = []
        for entry in batch:
            try:
                event = orjson.loads(entry[1][b"e"])
                kind = event["type"]
                if kind == "click":
                    clicks.append((entry, event))
                elif kind == "impression":
                    impressions.append((entry, event))
                elif kind == "conversion":
                    conversions.append(rows.conversion_record(event))
                else:
                    raise rows.BadEvent(f"unknown event type {kind!r}")
            except (KeyError, TypeError, orjson.JSONDecodeError, rows.BadEvent) as exc:
                bad.append((entry, repr(exc)))
        try:
            try:
                counts = await self._transaction(conn, clicks, impressions, conversions, bad)
            except store.Replayed:
                # Written before, in part or whole (a crash between COMMIT and XACK, a claimed
                # batch): rolled back; now only what is new is inserted and folded.
                counts = await self._transaction(conn, clicks, impressions, conversions, bad,
                                                 replayed=True)
        except asyncpg.PostgresError as exc:
            if not blames_a_row(exc):
                raise
            if len(batch) == 1:
                log.error("event %s refused by PostgreSQL, kept in dead_letters: %r", batch[0][0], exc)
                async with conn.transaction():
                    await store.dead_letters(conn, [(batch[0][0], _payload(batch[0][1]), repr(exc))])
                metrics.DEAD_LETTERS.inc()
                return
            half = len(batch) // 2
            await self._write_split(conn, batch[:half])
            await self._write_split(conn, batch[half:])
            return
        new_clicks, new_impressions, new_conversions, refused = counts
        metrics.DEAD_LETTERS.inc(refused)
        metrics.EVENTS_WRITTEN.labels("click").inc(new_clicks)
        metrics.EVENTS_WRITTEN.labels("impression").inc(new_impressions)
        metrics.EVENTS_WRITTEN.labels("conversion").inc(new_conversions)

    @staticmethod
    async def _transaction(conn: asyncpg.Connection,
                           clicks: list[tuple[Entry, dict[str, Any]]],
                           impressions: list[tuple[Entry, dict[str, Any]]],
                           conversions: list[tuple[Any, ...]], bad: list[tuple[Entry, str]], *,
                           replayed: bool = False) -> tuple[int, int, int, int]:
        """One transaction: (new clicks, new impressions, new conversion versions, events
        kept in dead_letters)."""
        async with conn.transaction():
            written = await store.write(conn, clicks, impressions, replayed=replayed)
            # After the clicks' fold: one lock order for every writer (storage/conversions.py).
            new_conversions = await conversion_store.write(conn, conversions)
            refused = bad + written.refused
            if refused:
                await store.dead_letters(
                    conn, [(entry_id, _payload(fields), error)
                           for (entry_id, fields), error in refused])
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
            for stream in self._keys.streams:
                pipe.xlen(stream)
                pipe.xrange(stream, count=1)
            replies = await pipe.execute()
        length = sum(int(n) for n in replies[0::2])
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
    """The entries of one stream's XREADGROUP reply: raw from one server ({stream: [[id,
    [field, value, ...]], ...]} in RESP3, [[stream, [...]]] in RESP2), parsed ([[stream, [(id,
    {field: value})]]]) from a Cluster pipeline. An entry deleted while pending reads without
    fields: skipped."""
    if not reply:
        return []
    entries = []
    for entry_id, fields in (next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]):
        if not fields:
            continue
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2]))
        entries.append((_s(entry_id), fields))
    return entries


def _count(taken: list[Taken]) -> int:
    return sum(len(entries) for _, entries in taken)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _payload(fields: dict[bytes, bytes]) -> str:
    """The entry as text PostgreSQL will take: a payload that is not even valid text (a NUL
    byte, broken UTF-8) must still reach dead_letters, or it would wedge the writer."""
    raw = fields.get(b"e", b"")
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")
