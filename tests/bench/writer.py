"""Batch writer throughput against a plain COPY of the same rows (the limit), same run.

    python -m tests.bench.writer [--events 100000] [--batch 5000]

Uses DATABASE_URL/REDIS_URL when set, else embedded servers. Fills the Redis stream with
synthetic clicks as the hot path buffers them (their lines, --round to an entry, through the
real script), then, batch by batch, times one BatchWriter step (XREADGROUP, COPY into
clicks, the rollups folded by PostgreSQL, COMMIT, XACK) and right after it bare COPYs of the
same rows, so that every figure is taken under the same load (this machine is shared):

- the limit, as this benchmark has always measured it: the rows as a plain program holds
  them (uuid, datetime, address and amount as text, asyncpg's default encoders), COPYed into
  an unindexed temp table (no WAL, no index, no partition);
- the same rows as the writer sends them (COPY's text format, storage/rows.py), same table;
- a plain COPY into clicks itself (partitioned, indexed, logged): what DESIGN.md calls "the
  same table" (the same rows under fresh ids, since the writer stored the originals).

Ratios are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tracker.embedded import servers
from tracker.ids import new_id
from tracker.redis_keys import Keys
from tracker.ingest.buffer import EventBuffer
from tracker.ingest.writer import BatchWriter
from tracker.storage import db, partitions, rows
from tracker.storage.migrations import migrate


def synthetic(n: int) -> list[dict[str, object]]:
    """Clicks of campaigns that cannot exist (negative ids), spread over the last minute."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return [{"type": "click", "id": str(new_id(now_ms - i % 60_000)), "campaign_id": -1 - i % 5,
             "visitor_id": str(new_id()), "pub": f"pub{i % 50}", "sub1": f"s{i % 200}",
             "ip": "203.0.113.0", "country": "TR", "device": "mobile", "user_agent": "Mozilla/5.0",
             "is_bot": i % 20 == 0, "is_unique": i % 3 == 0, "destination": "https://shop.example/lp",
             "cost": "0.25"} for i in range(n)]


def plain(event: dict[str, Any]) -> tuple[Any, ...]:
    """The row as a plain program holds it: what this benchmark's limit always COPYed."""
    row: list[Any] = list(rows.click_row(event))
    row[0] = uuid.UUID(row[0])
    row[1] = datetime.fromtimestamp((row[0].int >> 80) / 1000, UTC)
    row[2] = int(row[2])
    row[28], row[31] = row[28] == "t", row[31] == "t"  # is_bot, is_unique
    return tuple(row)


def text(event: dict[str, Any]) -> bytes:
    return ("\t".join(rows.click_row(event, copy=True)) + "\n").encode()


async def timed_copy(conn: Any, table: str, records: list[Any]) -> float:
    started = time.perf_counter()
    async with conn.transaction():
        if isinstance(records[0], bytes):
            await conn.copy_to_table(table, source=io.BytesIO(b"".join(records)),
                                     columns=rows.CLICK_COLUMNS, format="text")
        else:
            await conn.copy_records_to_table(table, records=records, columns=rows.CLICK_COLUMNS)
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="trkw"))
    try:
        await measure(args, data)
    finally:
        shutil.rmtree(data, ignore_errors=True)  # the embedded servers' data, tens of MB


async def measure(args: argparse.Namespace, data: Path) -> None:
    with servers(os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", ""), data) as found:
        db_url, redis_url = found.database_url, found.redis_url
        await migrate(db_url)
        conn = await db.connect(db_url)
        texted = await db.connect(db_url)
        today = datetime.now(UTC).date()
        for table in partitions.TABLES:  # the events span the last minute: today, maybe yesterday
            for day in (today - timedelta(days=1), today):
                await partitions.create_partition(conn, table, day)
        redis = aioredis.Redis.from_url(redis_url)
        keys = Keys(f"w{uuid.uuid4().hex[:8]}:")
        events = synthetic(args.events)
        # As the hot path buffers them: lines, a round of them per stream entry, through the
        # real script.
        buffer = EventBuffer(redis, keys, click_ttl=600, unique_window=600)
        for start in range(0, len(events), args.round):
            await asyncio.gather(*(
                buffer.record_click(e["id"], e["campaign_id"], e["visitor_id"], e["is_bot"],
                                    "\t".join(rows.click_row(e, copy=True)[:-1]), True)
                for e in events[start:start + args.round]))
        plain_rows = [plain(e) for e in events]
        texted_rows = [text(e) for e in events]
        same_table_rows = [plain(e) for e in synthetic(args.events)]
        for c in (conn, texted):
            await c.execute("CREATE TEMP TABLE copy_limit (LIKE clicks INCLUDING DEFAULTS)")
        writer = BatchWriter(redis, lambda: db.connect(db_url), keys, batch_size=args.batch,
                             wait_ms=10, claim_idle_ms=60_000)
        await writer.ensure_group()
        times = {"writer": 0.0, "plain": 0.0, "texted": 0.0, "clicks": 0.0, "write": 0.0}
        write = writer.write

        async def timed_write(batch: Any) -> int:
            # The PostgreSQL side of a step (COPY, the fold, COMMIT), apart from the Redis
            # side (XREADGROUP, XACK).
            started = time.perf_counter()
            written = await write(batch)
            times["write"] += time.perf_counter() - started
            return written

        writer.write = timed_write  # type: ignore[method-assign]
        done = 0
        while True:
            started = time.perf_counter()
            n = await writer.step(block=False)
            if not n:
                break
            times["writer"] += time.perf_counter() - started
            part = slice(done, done + n)
            times["plain"] += await timed_copy(conn, "copy_limit", plain_rows[part])
            times["texted"] += await timed_copy(texted, "copy_limit", texted_rows[part])
            times["clicks"] += await timed_copy(texted, "clicks", same_table_rows[part])
            done += n
            # Unindexed and unlogged, the limit tables only grow: keep them small.
            await conn.execute("TRUNCATE copy_limit")
            await texted.execute("TRUNCATE copy_limit")
        written = await conn.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::uuid[])",
                                      [r[0] for r in plain_rows[:1000]])
        await redis.delete(keys.stream, keys.backlog(0))
        # Synthetic campaigns have negative ids: take their rows away again.
        await conn.execute("DELETE FROM clicks WHERE campaign_id < 0")
        await conn.execute("DELETE FROM rollup_15m WHERE campaign_id < 0")
        await redis.aclose()
        await conn.close()
        await texted.close()
    rate = {k: done / v for k, v in times.items()}
    print(f"\n{done} events in batches of {args.batch}, each figure batch by batch beside the others")
    print(f"{'path':<66} {'events/s':>10} {'x limit':>8}")
    for key, name in (("plain", "plain COPY into an unindexed temp table (the limit)"),
                      ("texted", "the same, rows as the writer sends them (text COPY)"),
                      ("clicks", "plain COPY into clicks itself (partitioned, indexed, logged)"),
                      ("writer", "batch writer: stream → COPY, rollups folded → XACK")):
        print(f"{name:<66} {rate[key]:>10.0f} {rate[key] / rate['plain']:>8.2f}")
    print(f"batch writer × the writer's own COPY: {rate['writer'] / rate['texted']:.2f}; "
          f"× the COPY into clicks: {rate['writer'] / rate['clicks']:.2f}")
    print(f"of a writer step, write() (COPY, fold, COMMIT) took "
          f"{times['write'] / times['writer']:.0%}, the Redis side the rest; write() alone "
          f"{rate['write'] / rate['plain']:.2f} × the limit")
    print(f"(spot check: {written}/1000 sampled events found in clicks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--round", type=int, default=32,
                        help="events per stream entry (a round of the hot path)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
