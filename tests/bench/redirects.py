"""Redirect throughput and answer-to-PostgreSQL delay, against a baseline from the same run.

    python -m tests.bench.redirects [--seconds 8] [--connections 64] [--workers 2] [--runs 3]
    python -m tests.bench.redirects --quick      # what CI runs: a few seconds, nothing lost?

Needs `wrk`; nginx-light for the limit's row. Uses DATABASE_URL/REDIS_URL when set, else
embedded servers. Prints:
- req/s and p99 of nginx `return 302` (2 workers, no access log: the limit on this box), a
  bare aiohttp `302` (2 processes, uvloop: the framework's ceiling) and `tracker serve` on
  /c/{slug}, medians of --runs interleaved runs with their spread, and the ratios;
- whether every answered click reached PostgreSQL, and how long the backlog took to drain;
- at a nominal rate (a Python client, --rate clicks/s), the delay from each 302 to its row;
- wrk held at half of tracker's peak (each connection pausing between requests): latency p99;
- sustained: wrk at the peak for --sustain seconds, then every answered click in PostgreSQL,
  answer → row p99, and what Redis still holds per click once the backlog drained.
Numbers vary with the machine; only the ratios taken side by side mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
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
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from tracker.embedded import servers

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bare_worker(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "https://shop.example/lp"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/c/{slug}", redirect)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=2048).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def wrk(url: str, seconds: int, connections: int, pause_ms: float = 0.0) -> dict[str, float]:
    """wrk's figures; with pause_ms, each connection waits that long between requests (a
    rate of about connections × 1000 / (pause_ms + latency) per second)."""
    script: list[str] = []
    if pause_ms:
        lua = Path(tempfile.mkstemp(suffix=".lua")[1])
        lua.write_text(f"function delay()\n  return {pause_ms:.3f}\nend\n")
        script = ["-s", str(lua)]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *script,
         "-H", f"User-Agent: {UA}", url],
        capture_output=True, text=True, check=True).stdout
    if script:
        Path(script[1]).unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def percentile(name: str) -> float:
        found = re.search(name + r"%\s+([\d.]+)(us|ms|s)", out)
        return float(found.group(1)) * scale[found.group(2)] if found else float("nan")

    return {"rps": rps, "total": total, "errors": int(errors.group(1)) if errors else 0,
            "p50_ms": percentile("50"), "p99_ms": percentile("99")}


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url, allow_redirects=False) as r:
                    if r.status < 500:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


async def nominal_delay(base: str, pg: asyncpg.Connection, redis: aioredis.Redis, prefix: str,
                        rate: int, seconds: int, latencies: list[float]) -> dict[str, float]:
    """Clicks at `rate`/s on a campaign of their own (into `latencies`, how long each 302
    took); then, once the backlog drained, how long after its answer each row was written
    (PostgreSQL's written_at - ts: polling for rows from here measured the poll, not the
    writer, once the database held millions of clicks)."""
    slug, campaign_id = await make_campaign(base)
    async with aiohttp.ClientSession(headers={"User-Agent": UA}) as http:
        async def one() -> None:
            sent = time.monotonic()
            async with http.get(f"{base}/c/{slug}", allow_redirects=False) as r:
                assert r.status == 302
                latencies.append(time.monotonic() - sent)

        tasks = []
        started = time.monotonic()
        for i in range(rate * seconds):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    await drain(redis, prefix, time.monotonic())
    lag = await pg.fetchrow(
        "SELECT count(*) AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY written_at - ts) AS p50,"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY written_at - ts) AS p99,"
        " max(written_at - ts) AS max FROM clicks WHERE campaign_id = $1", campaign_id)
    return {"n": lag["n"], "answered": len(latencies), "p50_ms": lag["p50"].total_seconds() * 1000,
            "p99_ms": lag["p99"].total_seconds() * 1000, "max_ms": lag["max"].total_seconds() * 1000}


NGINX_CONF = """
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=2048;
        location / {{ return 302 https://shop.example/lp; }}
    }}
}}
"""


async def make_campaign(base: str, token: str = "b") -> tuple[str, int]:
    """(slug, id) of a new CPC campaign on the service at `base` (the benchmarks' shape)."""
    slug = f"bench{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/campaigns", headers={"Authorization": f"Bearer {token}"},
                             json={"slug": slug, "cost_model": "cpc", "cost_value": "0.10",
                                   "destination_url": "https://shop.example/lp?cid={click_id}&s={sub1}"}) as r:
            assert r.status == 201, await r.text()
            return slug, int((await r.json())["id"])


async def drain(redis: aioredis.Redis, prefix: str, since: float) -> float:
    """Seconds from `since` until the stream is empty (at most 120)."""
    while await redis.xlen(f"{prefix}events") > 0 and time.monotonic() - since < 120:
        await asyncio.sleep(0.05)
    return time.monotonic() - since


async def sustain(base: str, pg: asyncpg.Connection, redis: aioredis.Redis, prefix: str,
                  args: argparse.Namespace) -> dict[str, float]:
    """wrk at the peak for args.sustain seconds on a campaign of its own; then what reached
    PostgreSQL, how late, and Redis's growth per answered click once the backlog drained."""
    slug, campaign_id = await make_campaign(base)
    memory_before = int((await redis.info("memory"))["used_memory"])
    run = wrk(f"{base}/c/{slug}?sub1=bench", args.sustain, args.connections)
    drained = await drain(redis, prefix, time.monotonic())
    memory_after = int((await redis.info("memory"))["used_memory"])
    answered = run["total"] - run["errors"]
    lag = await pg.fetchrow(
        "SELECT count(*) AS n, percentile_cont(0.99) WITHIN GROUP (ORDER BY written_at - ts) AS p99,"
        " max(written_at - ts) AS max FROM clicks WHERE campaign_id = $1", campaign_id)
    rolled = await pg.fetchval("SELECT sum(clicks) FROM rollup_15m WHERE campaign_id = $1", campaign_id)
    return {"rps": run["rps"], "answered": answered, "stored": lag["n"], "rolled": rolled or 0,
            "drained": drained, "p99_ms": lag["p99"].total_seconds() * 1000,
            "max_ms": lag["max"].total_seconds() * 1000,
            "bytes": (memory_after - memory_before) / max(answered, 1)}


def start_nginx(port: int) -> subprocess.Popen[bytes] | None:
    """nginx `return 302`, 2 workers, no access log: the limit on this box. None (with a
    message) when Debian's nginx-light is not installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        print("nginx row skipped: install Debian's nginx-light (apt-get install nginx-light)")
        return None
    folder = Path(tempfile.mkdtemp(prefix="trkn"))
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=folder, port=port))
    return subprocess.Popen([binary, "-p", str(folder), "-c", str(conf), "-e", "stderr"],
                            stderr=subprocess.DEVNULL)


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}–{max(values):.0f}" if len(values) > 1 else "-"


async def run(args: argparse.Namespace) -> int:
    """Returns the exit status: 1 when an answered click is missing from PostgreSQL."""
    data = Path(tempfile.mkdtemp(prefix="trkb"))
    rows: dict[str, list[dict[str, float]]] = {"nginx": [], "bare": [], "tracker": []}
    with servers(os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", ""), data) as found:
        db_url, redis_url = found.database_url, found.redis_url
        # The baselines: nginx's `return 302` (the limit) and a bare aiohttp 302 (the
        # framework's ceiling), with as many processes as tracker's workers.
        nginx_port, bare_port = free_port(), free_port()
        nginx = start_nginx(nginx_port)
        ctx = multiprocessing.get_context("spawn")
        bare = [ctx.Process(target=_bare_worker, args=(bare_port,), daemon=True) for _ in range(args.workers)]
        for p in bare:
            p.start()

        port = free_port()
        prefix = f"b{uuid.uuid4().hex[:8]}:"
        env = os.environ | {"DATABASE_URL": db_url, "REDIS_URL": redis_url, "TRACKER_API_TOKEN": "b",
                            "TRACKER_LISTEN": f"127.0.0.1:{port}", "TRACKER_WORKERS": str(args.workers),
                            "TRACKER_DATA_DIR": str(data), "TRACKER_REDIS_PREFIX": prefix,
                            "TRACKER_LOG_LEVEL": "WARNING",
                            # Keys that leave a shared Redis within minutes, not a day (yet
                            # outlive the sustained run, whose Redis bytes are measured).
                            "TRACKER_CLICK_CACHE_TTL": "60", "TRACKER_UNIQUE_WINDOW": "900"}
        proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env)
        base = f"http://127.0.0.1:{port}"
        pg = None
        delays: dict[str, float] = {}
        latencies: list[float] = []
        half: dict[str, float] = {}
        sustained: dict[str, float] = {}
        try:
            if nginx is not None:
                await wait_http(f"http://127.0.0.1:{nginx_port}/c/x")
            await wait_http(f"http://127.0.0.1:{bare_port}/c/x")
            await wait_http(f"{base}/healthz")
            slug, campaign_id = await make_campaign(base)
            pg = await asyncpg.connect(db_url)
            redis = aioredis.Redis.from_url(redis_url)
            memory_before = int((await redis.info("memory"))["used_memory"])
            # Interleaved, so that a slow moment of the machine falls on every row alike.
            for _ in range(args.runs):
                if nginx is not None:
                    rows["nginx"].append(wrk(f"http://127.0.0.1:{nginx_port}/c/x", args.seconds, args.connections))
                rows["bare"].append(wrk(f"http://127.0.0.1:{bare_port}/c/x", args.seconds, args.connections))
                rows["tracker"].append(wrk(f"{base}/c/{slug}?sub1=bench", args.seconds, args.connections))
            load_end = time.monotonic()
            drained = await drain(redis, prefix, load_end)
            # What Redis still holds for the clicks once their rows are committed (the
            # read-your-writes copy, the uniqueness key: DESIGN.md's figure is ≤ 150 bytes).
            memory_after = int((await redis.info("memory"))["used_memory"])
            stored = await pg.fetchval("SELECT count(*) FROM clicks WHERE campaign_id = $1", campaign_id)
            lag = await pg.fetchrow(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY written_at - ts) AS p50,"
                " percentile_cont(0.99) WITHIN GROUP (ORDER BY written_at - ts) AS p99,"
                " max(written_at - ts) AS max FROM clicks WHERE campaign_id = $1", campaign_id)
            rolled = await pg.fetchval("SELECT sum(clicks) FROM rollup_15m WHERE campaign_id = $1", campaign_id)
            if not args.quick:
                delays = await nominal_delay(base, pg, redis, prefix, args.rate,
                                             args.nominal_seconds, latencies)
                # Half the peak: each connection pauses so that together they ask about half
                # of tracker's median rate.
                peak = statistics.median(r["rps"] for r in rows["tracker"])
                half = wrk(f"{base}/c/{slug}?sub1=bench", args.seconds, args.connections,
                           pause_ms=args.connections * 1000 / (peak / 2))
                half["peak"] = peak
            if args.sustain:
                sustained = await sustain(base, pg, redis, prefix, args)
            await redis.delete(f"{prefix}events")
            await redis.aclose()
        finally:
            if pg is not None:
                await pg.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            for p in bare:
                p.kill()
            if nginx is not None:
                nginx.terminate()
                nginx.wait(timeout=10)

    median = {name: statistics.median(r["rps"] for r in runs) for name, runs in rows.items() if runs}
    print(f"\n{args.runs} run(s) of wrk -t1 -c{args.connections} {args.seconds} s each, interleaved; "
          f"medians, and the spread over the runs")
    print(f"{'server':<34} {'req/s':>9} {'spread':>13} {'p99 ms':>8} {'x nginx':>8} {'x bare':>7}")
    names = {"nginx": "nginx return 302 (the limit)", "bare": "bare aiohttp 302 (framework)",
             "tracker": "tracker /c/{slug}"}
    for name, runs in rows.items():
        if not runs:
            continue
        x_nginx = f"{median[name] / median['nginx']:.2f}" if "nginx" in median else "-"
        p99 = statistics.median(r["p99_ms"] for r in runs)
        print(f"{names[name]:<34} {median[name]:>9.0f} {spread([r['rps'] for r in runs]):>13} "
              f"{p99:>8.2f} {x_nginx:>8} {median[name] / median['bare']:>7.2f}")
    answered = int(sum(r["total"] - r["errors"] for r in rows["tracker"]))
    errors = int(sum(r["errors"] for r in rows["tracker"]))
    print(f"\nburst: {answered} clicks answered 302 ({errors} errors); "
          f"{stored} rows in PostgreSQL, rollups count {rolled}; backlog drained {drained:.2f} s after the load")
    print(f"Redis after the drain: {(memory_after - memory_before) / max(answered, 1):.0f} bytes "
          f"per answered click (used_memory growth; the goal is ≤ 150)")
    ms = lambda d: d.total_seconds() * 1000  # noqa: E731
    print(f"burst: answer → row (written_at - ts) p50 {ms(lag['p50']):.0f} ms, "
          f"p99 {ms(lag['p99']):.0f} ms, max {ms(lag['max']):.0f} ms")
    if half:
        print(f"at half the peak ({half['peak'] / 2:.0f}/s asked, {half['rps']:.0f}/s answered, "
              f"wrk -c{args.connections} pausing between requests): "
              f"latency p50 {half['p50_ms']:.2f} ms, p99 {half['p99_ms']:.2f} ms (the goal is ≤ 5)")
    if sustained:
        print(f"sustained {args.sustain} s at the peak: {sustained['rps']:.0f}/s, "
              f"{sustained['answered']:.0f} answered, {sustained['stored']:.0f} rows, rollups "
              f"{sustained['rolled']:.0f}; backlog drained {sustained['drained']:.2f} s after; "
              f"answer → row p99 {sustained['p99_ms']:.0f} ms, max {sustained['max_ms']:.0f} ms "
              f"(the goal is ≤ 2000)")
        print(f"Redis after the sustained run drained: {sustained['bytes']:.0f} bytes per answered "
              f"click (used_memory growth; the goal is ≤ 150)")
    if delays:
        print(f"nominal {args.rate}/s for {args.nominal_seconds} s: 302 → row (written_at - ts) "
              f"p50 {delays['p50_ms']:.0f} ms, p99 {delays['p99_ms']:.0f} ms, max {delays['max_ms']:.0f} ms "
              f"({delays['n']:.0f} rows for {delays['answered']:.0f} answers)")
        latencies.sort()
        print(f"nominal {args.rate}/s: redirect latency (Python client, same cores) "
              f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")
        if delays["n"] < delays["answered"]:
            print("LOST: some clicks answered at the nominal rate are not in PostgreSQL")
            return 1
    # wrk counts answers it read; a click answered as wrk stopped may be stored uncounted,
    # so more rows than answers is fine, fewer is a lost click.
    if sustained and (sustained["stored"] < sustained["answered"]
                      or sustained["rolled"] != sustained["stored"]):
        print("LOST in the sustained run: answered clicks missing from PostgreSQL")
        return 1
    if stored < answered or rolled != stored:
        print(f"LOST: {answered - stored} answered clicks are not in PostgreSQL "
              f"(rollups {rolled}, rows {stored})")
        return 1
    print("nothing lost: every answered click is in PostgreSQL, rollups equal the rows")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--nominal-seconds", type=int, default=10)
    parser.add_argument("--sustain", type=int, default=60,
                        help="seconds of wrk at the peak after the runs (0: none)")
    parser.add_argument("--quick", action="store_true",
                        help="one 2-second run, no nominal-rate part: checks nothing was lost "
                             "and prints the ratios (CI runs this; it asserts no timing)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.runs, args.sustain = 2, 1, 0
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
