"""Click lookups and 30-day reports with 10 million clicks stored (DESIGN.md's figures:
lookup p99 ≤ 2 ms, a 30-day report ≤ 100 ms).

    python -m tests.bench.lookups [--clicks 10000000] [--keep]
    python -m tests.bench.lookups --quick        # 100k clicks, to try it

Creates a database `bench_lookups` on DATABASE_URL's server (or on an embedded PostgreSQL
when it is unset) and drops it at the end unless --keep; Redis is REDIS_URL's (own key
prefix) or embedded. Clicks are generated inside PostgreSQL (INSERT … SELECT over
generate_series, one UTC day per statement, two sessions at once) into the service's own
tables, and each day's new rows are folded into the rollups in the same statement, the way
the batch writer folds a batch. Then a `tracker serve` (2 workers) on that database answers:
- `GET /api/clicks/{id}` for random existing ids, driven by wrk (Lua picks the ids), at a
  few concurrencies: p50/p99 as wrk measures them;
- `GET /api/reports` over the last 30 whole days, one request at a time: p50/p99 per shape.
Numbers vary with the machine; the load generator shares its 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from tracker.embedded import servers
from tracker.ids import uuid_to_id
from tracker.storage import partitions
from tracker.storage.migrations import migrate

from .redirects import free_port, wait_http

DATABASE = "bench_lookups"
CAMPAIGNS = 200
DAYS = 31
TOKEN = "bench"

# One UTC day of clicks: $1 the day's start, $2 how many. Times rise through the day (the id's
# first 48 bits are its millisecond, the rest random, as tracker.ids.new_id makes them).
# Skewed choices (random()^k) give a few big campaigns, publishers and countries and a long
# tail, as real traffic has. Bots are 5% and cost nothing; a click is unique 60% of the time.
# The fold sums what the batch writer's fold sums (sql/008), for clicks alone; the campaign
# rollups follow from rollup_15m by its triggers (sql/007).
GENERATE_DAY = """
WITH new_clicks AS (
    INSERT INTO clicks (id, ts, campaign_id, visitor_id, pub, sub1, sub2, utm_source,
                        utm_medium, utm_campaign, ip, country, device, user_agent, referer,
                        is_unique, is_bot, destination, cost, written_at)
    SELECT (lpad(to_hex(ms), 12, '0') || substr(md5(r1::text || g::text), 1, 20))::uuid,
           ts, campaign_id,
           substr(md5(r2::text), 1, 26),
           'pub' || floor(40 * r3 ^ 2)::int,
           'cr' || floor(12 * r4 ^ 1.5)::int,
           CASE WHEN r5 < 0.3 THEN 'kw' || floor(500 * r5)::int ELSE '' END,
           'network' || campaign_id % 7, 'cpc', 'camp' || campaign_id,
           ('10.' || floor(256 * r2)::int || '.' || floor(256 * r3)::int || '.'
                  || floor(256 * r6)::int)::inet,
           (ARRAY['US','DE','TR','GB','FR','BR','IN','ID','MX','ES','IT','PL','NL','JP',
                  'CA'])[1 + floor(15 * r6 ^ 2)::int],
           (ARRAY['mobile','desktop','tablet'])[1 + floor(3 * r4 ^ 2)::int],
           'Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) '
               || 'Chrome/124.0 Mobile Safari/537.36',
           CASE WHEN r5 < 0.5 THEN 'https://news.example/article/' || floor(1000 * r1)::int
                ELSE '' END,
           NOT bot AND r6 < 0.6, bot,
           'https://shop.example/lp?c=' || campaign_id,
           CASE WHEN bot THEN 0 ELSE 0.05 END,
           ts + interval '150 milliseconds'
    FROM (
        SELECT g, ms, timestamptz 'epoch' + ms * interval '1 millisecond' AS ts,
               1 + floor(200 * random() ^ 2)::int AS campaign_id, random() < 0.05 AS bot,
               random() AS r1, random() AS r2, random() AS r3, random() AS r4,
               random() AS r5, random() AS r6
        FROM (SELECT g, (extract(epoch FROM $1::timestamptz) * 1000)::bigint
                        + floor((g + random()) * 86400000 / $2)::bigint AS ms
              FROM generate_series(0, $2 - 1) g) s
    ) r
    RETURNING ts, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device,
              is_unique, is_bot, cost
)
INSERT INTO rollup_15m AS r (bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country,
                             device, impressions, bot_impressions, clicks, unique_clicks,
                             bot_clicks, cost)
SELECT date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id, pub,
       sub1, sub2, sub3, sub4, sub5, country, device, 0, 0,
       count(*) FILTER (WHERE NOT is_bot), count(*) FILTER (WHERE is_unique AND NOT is_bot),
       count(*) FILTER (WHERE is_bot), coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0)
FROM new_clicks
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
    clicks = r.clicks + excluded.clicks,
    unique_clicks = r.unique_clicks + excluded.unique_clicks,
    bot_clicks = r.bot_clicks + excluded.bot_clicks,
    cost = r.cost + excluded.cost
"""

CREATE_CAMPAIGNS = """
INSERT INTO campaigns (slug, name, destination_url, cost_model, cost_value, currency)
SELECT 'bench-' || i, 'Bench campaign ' || i, 'https://shop.example/lp?c=' || i || '&cid={click_id}',
       'cpc', 0.05, 'USD'
FROM generate_series(1, $1) i
"""
SAMPLE_IDS = "SELECT id FROM clicks TABLESAMPLE SYSTEM ($1) LIMIT $2"


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server of `server_url` (a DSN URL, or pgserver's
    socket URL, whose database is its path too)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def generate(db_url: str, clicks: int) -> tuple[float, int]:
    """Fill the tables; return (seconds, rollup rows)."""
    started = time.monotonic()
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=i) for i in range(DAYS, 0, -1)]
    conn = await asyncpg.connect(db_url)
    try:
        # Partitions for every day of the data, and today and ahead for the live service.
        for table in partitions.TABLES:
            for day in days + [today, today + timedelta(days=1)]:
                await partitions.create_partition(conn, table, day)
        await conn.execute(CREATE_CAMPAIGNS, CAMPAIGNS)
    finally:
        await conn.close()
    queue: asyncio.Queue[tuple[date, int]] = asyncio.Queue()
    for i, day in enumerate(days):
        queue.put_nowait((day, clicks // DAYS + (1 if i < clicks % DAYS else 0)))

    async def session() -> None:
        conn = await asyncpg.connect(db_url, command_timeout=None)
        try:
            while not queue.empty():
                day, n = queue.get_nowait()
                start = datetime(day.year, day.month, day.day, tzinfo=UTC)
                await conn.execute(GENERATE_DAY, start, n)
                print(f"  {day}: {n} clicks", file=sys.stderr, flush=True)
        finally:
            await conn.close()

    # Two sessions: one per core of this machine.
    await asyncio.gather(session(), session())
    conn = await asyncpg.connect(db_url, command_timeout=None)
    try:
        # What autovacuum would have done to an insert-only table by now (statistics, and
        # the visibility map that index-only scans need).
        await conn.execute("VACUUM ANALYZE clicks")
        await conn.execute("VACUUM ANALYZE rollup_15m")
        rollups: int = await conn.fetchval("SELECT count(*) FROM rollup_15m")
    finally:
        await conn.close()
    return time.monotonic() - started, rollups


WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
math.randomseed(os.time())
request = function()
    return wrk.format("GET", paths[math.random(#paths)], {["Authorization"] = "Bearer %s"})
end
"""


def wrk_latency(url: str, script: Path | None, seconds: int, connections: int
                ) -> dict[str, float]:
    """wrk's figures for `url` (paths from `script` when given)."""
    more = ["-s", str(script)] if script is not None else []
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *more, url],
        capture_output=True, text=True, check=True).stdout
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def pct(p: str) -> float:
        m = re.search(rf"\b{p}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * scale[m.group(2)] if m else float("nan")

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": total, "errors": int(bad.group(1)) if bad else 0,
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50": pct("50"), "p99": pct("99")}


async def time_reports(base: str, queries: dict[str, str], runs: int
                       ) -> dict[str, tuple[list[float], int, int, int]]:
    """For each report: (seconds of each request, one at a time after a warm-up; its rows;
    the clicks it counts; requests that did not answer 200)."""
    found: dict[str, tuple[list[float], int, int, int]] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for name, query in queries.items():
            async with http.get(f"{base}/api/reports?{query}") as r:
                body = await r.json()
            if r.status != 200:
                print(f"{name}: {r.status} {body}", file=sys.stderr)
                found[name] = ([], 0, 0, 1)
                continue
            totals = body["totals"]
            timings, failed = [], 0
            for _ in range(runs):
                started = time.perf_counter()
                async with http.get(f"{base}/api/reports?{query}") as r:
                    await r.read()
                timings.append(time.perf_counter() - started)
                failed += r.status != 200
            found[name] = (timings, len(body["rows"]), totals["clicks"] + totals["bot_clicks"],
                           failed)
    return found


def q(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(args: argparse.Namespace) -> int:
    data = Path(tempfile.mkdtemp(prefix="trkl"))
    with servers(os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", ""), data) as found:
        admin = await asyncpg.connect(found.database_url)
        reuse = args.reuse and await admin.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", DATABASE)
        if not reuse:
            await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
            await admin.execute(f"CREATE DATABASE {DATABASE}")
        db_url = database_url(found.database_url, DATABASE)
        proc = None
        try:
            await migrate(db_url)
            if reuse:
                gen_s, rollups = float("nan"), 0
            else:
                print(f"generating {args.clicks} clicks over {DAYS} days, {CAMPAIGNS} campaigns…",
                      file=sys.stderr)
                gen_s, rollups = await generate(db_url, args.clicks)
            pg = await asyncpg.connect(db_url)
            rollups = rollups or await pg.fetchval("SELECT count(*) FROM rollup_15m")
            stored = await pg.fetchval("SELECT count(*) FROM clicks")
            size = await pg.fetchval("SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) "
                                     "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                     "WHERE i.inhparent = 'clicks'::regclass")
            percent = min(100.0, 300.0 * args.sample / max(stored, 1))
            ids = [uuid_to_id(r["id"]) for r in await pg.fetch(SAMPLE_IDS, percent, args.sample)]
            await pg.close()

            port = free_port()
            env = os.environ | {"DATABASE_URL": db_url, "REDIS_URL": found.redis_url,
                                "TRACKER_API_TOKEN": TOKEN, "TRACKER_LISTEN": f"127.0.0.1:{port}",
                                "TRACKER_WORKERS": "2", "TRACKER_DATA_DIR": str(data),
                                "TRACKER_REDIS_PREFIX": f"l{uuid.uuid4().hex[:8]}:",
                                "TRACKER_LOG_LEVEL": "WARNING"}
            proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env)
            base = f"http://127.0.0.1:{port}"
            await wait_http(f"{base}/healthz")

            paths = data / "paths.txt"
            paths.write_text("".join(f"/api/clicks/{i}\n" for i in ids))
            script = data / "lookups.lua"
            script.write_text(WRK_SCRIPT % (paths, TOKEN))
            wrk_latency(f"{base}/", script, 2, 2)  # warm-up: pools, caches, plans
            # Beside each, /healthz on the same workers at the same concurrency: what this
            # machine's moment allows an aiohttp answer that does no I/O at all.
            lookups, floor = {}, {}
            for c in args.concurrency:
                lookups[c] = wrk_latency(f"{base}/", script, args.seconds, c)
                floor[c] = wrk_latency(f"{base}/healthz", None, args.seconds, c)

            today = datetime.now(UTC).date()
            window = f"from={today - timedelta(days=30)}&to={today - timedelta(days=1)}&tz=UTC"
            # The figure: reports by campaign and time, as a dashboard shows them (the
            # campaign rollups). Then drill-downs by other dimensions, which read the
            # 15-minute rollups: for one campaign (the biggest, and a middling one).
            istanbul = window.replace("tz=UTC", "tz=Europe/Istanbul")
            queries = {
                "group_by=campaign": f"{window}&group_by=campaign",
                "group_by=day": f"{window}&group_by=day",
                "group_by=campaign,day": f"{window}&group_by=campaign,day",
                "group_by=day&campaign=bench-1": f"{window}&group_by=day&campaign=bench-1",
                "group_by=day, tz=Europe/Istanbul": istanbul + "&group_by=day",
                "group_by=campaign, tz=Europe/Istanbul": istanbul + "&group_by=campaign",
                "group_by=day, tz=Asia/Kolkata (+05:30)":
                    window.replace("tz=UTC", "tz=Asia/Kolkata") + "&group_by=day",
            }
            drills = {
                "group_by=pub&campaign=bench-1": f"{window}&group_by=pub&campaign=bench-1",
                "group_by=pub&campaign=bench-50": f"{window}&group_by=pub&campaign=bench-50",
                "group_by=country,device&campaign=bench-50":
                    f"{window}&group_by=country,device&campaign=bench-50",
            }
            reports = await time_reports(base, queries, args.report_runs)
            reports |= await time_reports(base, drills, max(1, args.report_runs // 10))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            if not args.keep:
                await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            await admin.close()
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)

    print(f"\n{stored} clicks over {DAYS} days, {CAMPAIGNS} campaigns: generated with their "
          f"rollups in {gen_s:.0f} s ({stored / gen_s:.0f} clicks/s, VACUUM ANALYZE included); "
          f"clicks take {size}, {rollups} rollup_15m rows ({rollups / max(stored, 1):.2f} per click)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nclick lookup GET /api/clicks/{{id}}, {len(ids)} random existing ids, "
          f"wrk -t1 {args.seconds} s (goal: p99 ≤ 2 ms); load average now {load} on "
          f"{os.cpu_count()} cores")
    print(f"{'connections':>11} {'requests':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8}"
          f"   /healthz beside it: {'p50 ms':>6} {'p99 ms':>6}")
    for c, r in lookups.items():
        print(f"{c:>11} {r['requests']:>9.0f} {r['rps']:>7.0f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
              f"{r['errors']:>8.0f}   {'':>20} {floor[c]['p50']:>6.2f} {floor[c]['p99']:>6.2f}")
    print(f"\n30-day report GET /api/reports ({window}), one at a time, {args.report_runs} runs "
          f"each (goal: ≤ 100 ms)")
    print(f"{'report':<42} {'rows':>6} {'clicks':>9} {'p50 ms':>7} {'p99 ms':>7} {'non-200':>7}")
    for name, (t, rows, counted, failed) in reports.items():
        if name == next(iter(drills)):
            print("drill-downs (15-minute rollups by every dimension):")
        p50 = statistics.median(t) * 1000 if t else float("nan")
        p99 = q(t, 0.99) * 1000 if t else float("nan")
        print(f"{name:<42} {rows:>6} {counted:>9} {p50:>7.1f} {p99:>7.1f} {failed:>7}")
    errors = sum(r["errors"] for r in lookups.values())
    if errors:
        print(f"ERROR: {errors} lookups of existing clicks did not answer 200")
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=10_000_000)
    parser.add_argument("--quick", action="store_true", help="100k clicks, to try it")
    parser.add_argument("--keep", action="store_true", help=f"keep the {DATABASE} database")
    parser.add_argument("--reuse", action="store_true",
                        help=f"measure the {DATABASE} database a --keep run left (no generation)")
    parser.add_argument("--seconds", type=int, default=5, help="wrk seconds per concurrency")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")],
                        default=[1, 4, 16], help="wrk connections, comma-separated")
    parser.add_argument("--sample", type=int, default=5000, help="distinct ids looked up")
    parser.add_argument("--report-runs", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.clicks = 100_000
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
