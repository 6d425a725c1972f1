"""Postbacks accepted per second end to end, beside the redirect rate of the same run.

    python -m tests.bench.postbacks [--seconds 8] [--connections 64] [--workers 2] [--clicks 60000]

Needs `wrk`. Uses DATABASE_URL/REDIS_URL when set, else embedded servers. `tracker serve`
answers wrk's redirects first (the same run's reference), then the clicks a postback will
name are made through the service, then wrk sends one postback per click (each a new
conversion: `GET /postback?click_id=…&amount=…&txid=…`). Counted as accepted only what
PostgreSQL holds once the backlog drained, so the figure is end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from tracker.embedded import servers

from .redirects import UA, free_port, make_campaign, wait_http, wrk

# wrk sends paths from a file in turn, each once (then it would repeat: a duplicate).
ROUND_ROBIN = """
local paths, n = {}, 0
init = function(args)
  for line in io.lines(args[1]) do n = n + 1; paths[n] = line end
end
local i = 0
request = function()
  i = i + 1
  if i > n then i = 1 end
  return wrk.format("GET", paths[i])
end
"""


def wrk_paths(base: str, paths_file: Path, seconds: int, connections: int) -> dict[str, float]:
    script = paths_file.with_suffix(".lua")
    script.write_text(ROUND_ROBIN)
    # wrk runs the script per thread; one thread, so each path goes once.
    import re
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         "-H", f"User-Agent: {UA}", base, "--", str(paths_file)],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0}
    seconds_taken = float(elapsed.group(1)) * scale[elapsed.group(2)] if elapsed else seconds
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "total": total, "seconds": seconds_taken,
            "errors": int(errors.group(1)) if errors else 0}


async def make_clicks(base: str, slug: str, n: int, concurrency: int = 64) -> list[str]:
    ids: list[str] = []
    remaining = iter(range(n))
    async with aiohttp.ClientSession(headers={"User-Agent": UA},
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def worker() -> None:
            for _ in remaining:
                async with http.get(f"{base}/c/{slug}", allow_redirects=False) as r:
                    ids.append(parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0])
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return ids


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="trkp"))
    with servers(os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", ""), data) as found:
        db_url, redis_url = found.database_url, found.redis_url
        port = free_port()
        prefix = f"b{uuid.uuid4().hex[:8]}:"
        env = os.environ | {"DATABASE_URL": db_url, "REDIS_URL": redis_url, "TRACKER_API_TOKEN": "b",
                            "TRACKER_LISTEN": f"127.0.0.1:{port}", "TRACKER_WORKERS": str(args.workers),
                            "TRACKER_DATA_DIR": str(data), "TRACKER_REDIS_PREFIX": prefix,
                            "TRACKER_LOG_LEVEL": "WARNING", "TRACKER_UNIQUE_WINDOW": "60",
                            "TRACKER_CLICK_CACHE_TTL": "600", "TRACKER_CONVERSION_STATE_TTL": "3600"}
        proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env)
        base = f"http://127.0.0.1:{port}"
        pg = None
        try:
            await wait_http(f"{base}/healthz")
            slug, campaign_id = await make_campaign(base)
            redirects = wrk(f"{base}/c/{slug}", args.seconds, args.connections)
            started = time.monotonic()
            clicks = await make_clicks(base, slug, args.clicks)
            made_in = time.monotonic() - started
            paths = data / "postbacks.txt"
            paths.write_text("".join(f"/postback?click_id={c}&amount=1.5&txid=o{i}\n"
                                     for i, c in enumerate(clicks)))
            pg = await asyncpg.connect(db_url)
            redis = aioredis.Redis.from_url(redis_url)
            before = await pg.fetchval("SELECT count(*) FROM conversions WHERE campaign_id = $1", campaign_id)
            posted = wrk_paths(base, paths, args.seconds, args.connections)
            load_end = time.monotonic()
            while await redis.xlen(f"{prefix}events") > 0 and time.monotonic() - load_end < 120:
                await asyncio.sleep(0.05)
            drained = time.monotonic() - load_end
            stored = await pg.fetchval("SELECT count(*) FROM conversions WHERE campaign_id = $1",
                                       campaign_id) - before
            rolled = await pg.fetchval("SELECT sum(conversions) FROM conversion_rollup_15m "
                                       "WHERE campaign_id = $1 AND basis = 'conversion'", campaign_id)
            await redis.delete(f"{prefix}events")
            await redis.aclose()
        finally:
            if pg is not None:
                await pg.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    accepted_rate = stored / posted["seconds"]
    print(f"\n{'what':<40} {'per second':>11}")
    print(f"{'redirects (wrk, /c/{slug})':<40} {redirects['rps']:>11.0f}")
    print(f"{'postbacks answered (wrk, /postback)':<40} {posted['rps']:>11.0f}")
    print(f"{'postbacks accepted, in PostgreSQL':<40} {accepted_rate:>11.0f}"
          f"   ({accepted_rate / redirects['rps']:.2f} x the redirect rate; goal 5,000/s)")
    print(f"\n{len(clicks)} clicks made for it in {made_in:.1f} s; {posted['total']} postbacks sent in "
          f"{posted['seconds']:.1f} s ({posted['errors']} not 2xx); {stored} new conversions in "
          f"PostgreSQL, rollups count {rolled}; backlog drained {drained:.2f} s after the load")
    if posted["total"] > len(clicks):
        print("NOTE: more postbacks than clicks: the surplus were duplicates; raise --clicks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=60_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
