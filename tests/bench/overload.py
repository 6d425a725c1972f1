"""Worker memory under overload, PostgreSQL stopped for a minute under load (DESIGN.md:
≤ 150 MB per worker; the backlog grows in Redis, not in the workers).

    python -m tests.bench.overload [--before 20] [--outage-seconds 60] [--after 20]
    python -m tests.bench.overload --quick       # 5 s, 10 s outage, 5 s

Starts a PostgreSQL of its own (initdb in a temporary folder, its own port: Debian's binaries
from /usr/lib/postgresql, else pgserver's), so that stopping it disturbs no one; Redis is
REDIS_URL's (own key prefix) or an embedded one. Runs `tracker serve` with 2 workers, drives
/c/{slug} with wrk (-t1 -c64) for before + outage + after seconds, stops PostgreSQL
(`pg_ctl stop -m fast`) `before` seconds in and starts it again `outage` seconds later, then
waits for the backlog to drain. Every second it samples each worker's RSS (psutil) and the
backlog (the events its counter holds). Prints the max RSS per worker, the backlog's peak,
the drain time, and whether every click wrk saw answered 302 is in PostgreSQL (and in the rollups). Exit status 1
when one is missing. Needs `wrk`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import redis.asyncio as aioredis

from tracker.embedded import servers

from .redirects import UA, free_port, make_campaign, wait_http

MB = 1024 * 1024


def postgres_bin() -> Path:
    """Debian's newest PostgreSQL binaries, else the ones pgserver ships."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    import pgserver  # noqa: F401 - only for where its binaries are

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


class ThrowawayPostgres:
    """initdb in a temporary folder, on a port of its own; run as `postgres` when we are
    root (initdb refuses root)."""

    def __init__(self, folder: Path) -> None:
        self.bin = postgres_bin()
        self.folder = folder
        self.data = folder / "pgdata"
        self.port = free_port()
        self.user: str | None = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            shutil.chown(self.folder, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.folder / "log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")


class Sampler:
    """Each worker's RSS, the backlog, and what /readyz and /metrics say of it, once a
    second."""

    def __init__(self, serve: psutil.Process, redis: aioredis.Redis, stream: str,
                 base: str) -> None:
        self.serve = serve
        self.redis = redis
        self.stream = stream
        self.counter = stream.removesuffix("events") + "backlog"
        self.base = base
        self.rss: dict[int, list[tuple[float, int]]] = {}
        self.backlog: list[tuple[float, int]] = []
        self.supervisor_rss = 0
        self.over_limit_seconds = 0  # /readyz: 503 naming the backlog
        self.gauge_max = 0.0  # /metrics: tracker_write_backlog_events

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while not stop.is_set():
                now = time.monotonic()
                with contextlib.suppress(psutil.Error):
                    self.supervisor_rss = max(self.supervisor_rss, self.serve.memory_info().rss)
                    for child in self.serve.children():
                        with contextlib.suppress(psutil.Error):
                            if "spawn_main" in " ".join(child.cmdline()):
                                self.rss.setdefault(child.pid, []).append(
                                    (now, child.memory_info().rss))
                with contextlib.suppress(Exception):
                    # Events, not entries (an entry holds a round's events): the counter the
                    # scripts keep beside the stream.
                    self.backlog.append((now, int(await self.redis.get(self.counter) or 0)))
                with contextlib.suppress(Exception):
                    async with http.get(f"{self.base}/readyz") as r:
                        body = await r.json()
                        if r.status == 503 and "backlog" in body.get("not_ready", []):
                            self.over_limit_seconds += 1
                    async with http.get(f"{self.base}/metrics") as r:
                        found = re.search(r"^tracker_write_backlog_events(?:\{[^}]*\})? (\S+)",
                                          await r.text(), re.M)
                        if found:
                            self.gauge_max = max(self.gauge_max, float(found.group(1)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.monotonic() - now)))


def wrk_counts(out: str) -> tuple[int, int, float]:
    """(requests wrk completed, those not 2xx/3xx, req/s)."""
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return total, int(bad.group(1)) if bad else 0, rps


async def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="trko"))
    folder.chmod(0o711)  # PostgreSQL's user must reach its folder inside
    pg = ThrowawayPostgres(folder / "pg")
    pg.init()
    pg.start()
    with servers("unused", os.environ.get("REDIS_URL", ""), folder) as found:
        redis_url = found.redis_url
        prefix = f"o{uuid.uuid4().hex[:8]}:"
        stream = f"{prefix}events"
        port = free_port()
        env = os.environ | {"DATABASE_URL": pg.url, "REDIS_URL": redis_url,
                            "TRACKER_API_TOKEN": "o", "TRACKER_LISTEN": f"127.0.0.1:{port}",
                            "TRACKER_WORKERS": "2", "TRACKER_DATA_DIR": str(folder / "data"),
                            "TRACKER_REDIS_PREFIX": prefix, "TRACKER_LOG_LEVEL": "WARNING",
                            # Keys that leave a shared Redis within minutes, not a day.
                            "TRACKER_CLICK_CACHE_TTL": "300", "TRACKER_UNIQUE_WINDOW": "300",
                            "TRACKER_BACKLOG_LIMIT": str(args.backlog_limit)}
        proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env)
        redis = aioredis.Redis.from_url(redis_url)
        base = f"http://127.0.0.1:{port}"
        pg_down = False
        try:
            await wait_http(f"{base}/healthz")
            slug, campaign_id = await make_campaign(base, token="o")
            sampler = Sampler(psutil.Process(proc.pid), redis, stream, base)
            stop_sampling = asyncio.Event()
            sampling = asyncio.create_task(sampler.run(stop_sampling))
            await asyncio.sleep(1.5)  # the workers' resting size first

            seconds = args.before + args.outage_seconds + args.after
            started = time.monotonic()
            load = await asyncio.create_subprocess_exec(
                "wrk", "-t1", "-c64", f"-d{seconds}s", "-H", f"User-Agent: {UA}",
                f"{base}/c/{slug}", stdout=asyncio.subprocess.PIPE)
            await asyncio.sleep(args.before)
            print(f"{time.monotonic() - started:5.1f} s: stopping PostgreSQL", file=sys.stderr)
            await asyncio.to_thread(pg.stop)
            pg_down = True
            stopped = time.monotonic()
            await asyncio.sleep(max(0.0, args.before + args.outage_seconds - (time.monotonic() - started)))
            print(f"{time.monotonic() - started:5.1f} s: starting PostgreSQL", file=sys.stderr)
            await asyncio.to_thread(pg.start)
            pg_down = False
            restarted = time.monotonic()
            out, _ = await load.communicate()
            load_end = time.monotonic()
            answered_total, refused, rps = wrk_counts(out.decode())
            answered = answered_total - refused
            peak = max((n for _, n in sampler.backlog), default=0)
            while time.monotonic() - load_end < args.drain_limit:
                if int(await redis.xlen(stream)) == 0:
                    break
                await asyncio.sleep(0.1)
            drained = time.monotonic()
            stop_sampling.set()
            await sampling
            conn = await asyncpg.connect(pg.url)
            stored = await conn.fetchval("SELECT count(*) FROM clicks WHERE campaign_id = $1",
                                         campaign_id)
            rolled = await conn.fetchval("SELECT sum(clicks + bot_clicks) FROM rollup_15m "
                                         "WHERE campaign_id = $1", campaign_id)
            await conn.close()
            left = int(await redis.xlen(stream))
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                keys = [k async for k in redis.scan_iter(f"{prefix}*", count=10_000)]
                for i in range(0, len(keys), 1000):
                    await redis.delete(*keys[i:i + 1000])
            await redis.aclose()
            if not pg_down:
                pg.stop()
    shutil.rmtree(folder, ignore_errors=True)

    print(f"\nwrk -t1 -c64 for {seconds} s on /c/{{slug}}: PostgreSQL stopped from "
          f"{args.before} s to {args.before + args.outage_seconds} s; 2 workers")
    print(f"answered {answered} clicks with 302 ({rps:.0f}/s), {refused} other answers")
    phases = {"at rest": (0.0, started), "load": (started, stopped),
              "PG stopped": (stopped, restarted), "load again": (restarted, load_end),
              "drain": (load_end, drained + 1)}
    print("max RSS per worker and phase, MB")
    print(f"{'worker':>8} " + " ".join(f"{name:>11}" for name in phases) + f" {'max':>7}")
    worst = 0
    for pid, samples in sampler.rss.items():
        worst = max(worst, max(rss for _, rss in samples))
        cells = []
        for lo, hi in phases.values():
            inside = [rss for t, rss in samples if lo <= t < hi]
            cells.append(f"{max(inside) / MB:>11.1f}" if inside else f"{'-':>11}")
        print(f"{pid:>8} " + " ".join(cells) + f" {max(rss for _, rss in samples) / MB:>7.1f}")
    print(f"supervisor max RSS {sampler.supervisor_rss / MB:.1f} MB")
    print(f"backlog peak {peak} events in the Redis stream; drained {drained - restarted:.1f} s "
          f"after PostgreSQL restarted ({drained - load_end:.1f} s after the load ended); "
          f"{left} left")
    print(f"backlog limit {args.backlog_limit}: /readyz answered 503 for the backlog in "
          f"{sampler.over_limit_seconds} samples; tracker_write_backlog_events peaked at "
          f"{sampler.gauge_max:.0f}")
    verdict = "within" if worst <= 150 * MB else "OVER"
    print(f"max worker RSS {worst / MB:.1f} MB: {verdict} the 150 MB figure")
    if stored < answered or rolled != stored:
        print(f"LOST: {answered - stored} answered clicks are not in PostgreSQL "
              f"(rows {stored}, rollups {rolled})")
        return 1
    print(f"nothing lost: {stored} rows in PostgreSQL ≥ {answered} answered, rollups equal the rows")
    return 0 if worst <= 150 * MB else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=int, default=20, help="seconds of load before the outage")
    parser.add_argument("--outage-seconds", type=int, default=60)
    parser.add_argument("--after", type=int, default=20, help="seconds of load after it")
    parser.add_argument("--drain-limit", type=int, default=120,
                        help="seconds to wait for the backlog after the load")
    parser.add_argument("--backlog-limit", type=int, default=None,
                        help="TRACKER_BACKLOG_LIMIT, which the outage should pass "
                             "(default 100000, 20000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5 s, a 10 s outage, 5 s")
    args = parser.parse_args()
    if args.quick:
        args.before, args.outage_seconds, args.after = 5, 10, 5
    if args.backlog_limit is None:
        args.backlog_limit = 20_000 if args.quick else 100_000
    if shutil.which("wrk") is None:
        sys.exit("needs wrk (apt-get install wrk)")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
