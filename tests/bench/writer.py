"""Batch writer throughput against a plain COPY of the same rows (the limit), same run.

    python -m tests.bench.writer [--events 100000] [--batch 5000]

Uses DATABASE_URL/REDIS_URL when set, else embedded servers. Fills the Redis stream with
synthetic clicks, times one BatchWriter draining it into PostgreSQL (dedupe insert + rollup
fold + ack), then times a bare `COPY` of the same rows into an unindexed copy of the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from tracker.embedded import servers
from tracker.ids import new_id
from tracker.redis_keys import Keys
from tracker.ingest.writer import BatchWriter
from tracker.storage import db, partitions
from tracker.storage import events as store
from tracker.storage.migrations import migrate


def synthetic(n: int) -> list[dict[str, object]]:
    """Clicks of campaigns that cannot exist (negative ids), spread over the last minute."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return [{"type": "click", "id": str(new_id(now_ms - i % 60_000)), "campaign_id": -1 - i % 5,
             "visitor_id": str(new_id()), "pub": f"pub{i % 50}", "sub1": f"s{i % 200}",
             "ip": "203.0.113.0", "country": "TR", "device": "mobile", "user_agent": "Mozilla/5.0",
             "is_bot": i % 20 == 0, "is_unique": i % 3 == 0, "destination": "https://shop.example/lp",
             "cost": "0.25"} for i in range(n)]


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="trkw"))
    with servers(os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", ""), data) as found:
        db_url, redis_url = found.database_url, found.redis_url
        await migrate(db_url)
        conn = await db.connect(db_url)
        today = datetime.now(UTC).date()
        for table in partitions.TABLES:  # the events span the last minute: today, maybe yesterday
            for day in (today - timedelta(days=1), today):
                await partitions.create_partition(conn, table, day)
        redis = aioredis.Redis.from_url(redis_url)
        keys = Keys(f"w{uuid.uuid4().hex[:8]}:")
        events = synthetic(args.events)
        async with redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(keys.stream, {"e": orjson.dumps(event)})
            await pipe.execute()
        writer = BatchWriter(redis, lambda: db.connect(db_url), keys, batch_size=args.batch,
                             wait_ms=10, claim_idle_ms=60_000)
        await writer.ensure_group()
        started = time.perf_counter()
        while await writer.step(block=False):
            pass
        writer_s = time.perf_counter() - started
        written = await conn.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::uuid[])",
                                      [store.click_record(e)[0] for e in events[:1000]])

        records = [store.click_record(e) for e in events]
        await conn.execute("CREATE TEMP TABLE copy_limit (LIKE clicks INCLUDING DEFAULTS)")
        started = time.perf_counter()
        for i in range(0, len(records), args.batch):
            await conn.copy_records_to_table("copy_limit", records=records[i:i + args.batch],
                                             columns=store.CLICK_COLUMNS)
        copy_s = time.perf_counter() - started
        await redis.delete(keys.stream)
        # Synthetic campaigns have negative ids: take their rows away again.
        await conn.execute("DELETE FROM clicks WHERE campaign_id < 0")
        await conn.execute("DELETE FROM rollup_15m WHERE campaign_id < 0")
        await redis.aclose()
        await conn.close()
    print(f"\n{'path':<48} {'events/s':>10} {'x COPY':>7}")
    print(f"{'plain COPY into an unindexed table (the limit)':<48} {args.events / copy_s:>10.0f} {1.0:>7.2f}")
    print(f"{'batch writer: stream → dedupe insert + rollups':<48} {args.events / writer_s:>10.0f} "
          f"{copy_s / writer_s:>7.2f}")
    print(f"(spot check: {written}/1000 sampled events found in clicks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
