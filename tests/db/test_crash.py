"""A burst of 2,000 concurrent clicks while the batch writer is killed mid-batch, again and
again: every click that got its 302 is in PostgreSQL exactly once, and the rollups agree with
a raw count of the event rows."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from tracker.ids import new_id, uuid_to_id
from tracker.redis_keys import keys_for
from tracker.settings import Settings

from ..conftest import BROWSER, Running, Served, eventually
from .test_writer import writer_for

CLICKS = 2000


async def exactly_once(pg: asyncpg.Connection, answered: set[str], *, exact: bool = True) -> None:
    """Every answered click stored once. With exact=False (the server was killed) a click may
    also be stored whose 302 died with the process: recorded, never answered, retried."""
    rows = await pg.fetch("SELECT id FROM clicks")
    stored = [uuid_to_id(r["id"]) for r in rows]
    assert len(stored) == len(set(stored)), "a click was stored twice"
    missing = answered - set(stored)
    assert not missing, f"{len(missing)} answered clicks are not in PostgreSQL"
    if exact:
        assert set(stored) == answered
    raw = await pg.fetchval("SELECT count(*) FROM clicks")
    rolled = await pg.fetchval("SELECT sum(clicks + bot_clicks) FROM rollup_15m")
    unique_raw = await pg.fetchval("SELECT count(*) FROM clicks WHERE is_unique AND NOT is_bot")
    unique_rolled = await pg.fetchval("SELECT sum(unique_clicks) FROM rollup_15m")
    assert (rolled, unique_rolled) == (raw, unique_raw)
    # Returning visitors: each one unique exactly once, however often its clicks were
    # replayed or claimed on the way in; every other click of theirs a duplicate.
    visitors = await pg.fetchval("SELECT count(DISTINCT visitor_id) FROM clicks")
    per_visitor = await pg.fetch(
        "SELECT count(*) FILTER (WHERE is_unique) AS unique FROM clicks GROUP BY visitor_id")
    assert {r["unique"] for r in per_visitor} == {1}
    assert unique_raw == visitors < raw


# Each visitor clicks this many times: one unique click each, the rest duplicates.
CLICKS_PER_VISITOR = 4


async def burst(base: str, slug: str, n: int, concurrency: int = 100,
                tries: int = 200) -> set[str]:
    """n clicks, `concurrency` at a time, by n / CLICKS_PER_VISITOR returning visitors (each
    sends its own visitor cookie); the click ids of those answered 302 (retrying a click
    whose connection broke, as a browser would; with tries=1, a click that fails is given up)."""
    answered: set[str] = set()
    limit = asyncio.Semaphore(concurrency)
    visitors = [str(new_id()) for _ in range(max(1, n // CLICKS_PER_VISITOR))]
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER},
                                     cookie_jar=aiohttp.DummyCookieJar()) as http:
        async def one(i: int) -> None:
            cookie = {"Cookie": f"tv={visitors[min(i // CLICKS_PER_VISITOR, len(visitors) - 1)]}"}
            async with limit:
                for _ in range(tries):
                    try:
                        async with http.get(f"{base}/c/{slug}?sub1={i}", headers=cookie,
                                            allow_redirects=False) as r:
                            if r.status == 302:
                                answered.add(parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0])
                                return
                    except aiohttp.ClientError:
                        if tries == 1:
                            return
                    await asyncio.sleep(0.05)
                if tries > 1:
                    raise AssertionError(f"click {i} never answered")

        await asyncio.gather(*(one(i) for i in range(n)))
    return answered


async def test_writer_cancelled_mid_batch_loses_and_doubles_nothing(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="burst", cost_model="cpc", cost_value="0.01")
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    killed_holding_a_batch = 0
    done = asyncio.Event()

    async def chaos() -> None:
        nonlocal killed_holding_a_batch
        rng = random.Random(7)
        while not done.is_set():
            # Each incarnation is a new consumer: its predecessor's pending entries must be
            # claimed, as after a crashed process.
            writer = writer_for(s.settings, redis, batch_size=64, claim_idle_ms=150)
            task = asyncio.create_task(writer.run())
            # Wait for it to take a batch, then kill it somewhere inside the write.
            for _ in range(200):
                if writer._held:
                    break
                await asyncio.sleep(0.001)
            await asyncio.sleep(rng.uniform(0, 0.01))
            if writer._held:
                killed_holding_a_batch += 1
            # Python 3.11's wait_for (inside redis-py and asyncpg) can swallow a cancellation
            # that lands as its inner call completes: cancel until the task is really gone.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.05)

    chaos_task = asyncio.create_task(chaos())
    answered = await burst(s.base, "burst", CLICKS)
    done.set()
    await chaos_task
    assert len(answered) == CLICKS
    # A last writer, restarted for good, finishes the job.
    final = writer_for(s.settings, redis, batch_size=500, claim_idle_ms=150)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await final.step(block=False)
        if await redis.xlen(keys_for(s.settings).stream) == 0:
            break
        await asyncio.sleep(0.1)
    await redis.aclose()
    assert killed_holding_a_batch > 0, "no cancellation hit a batch in flight"
    await exactly_once(pg, answered)


@pytest.mark.slow
async def test_worker_process_sigkilled_under_load(backing: tuple[str, str], pg: asyncpg.Connection,
                                                   tmp_path: Path) -> None:
    """`tracker serve` for real: its worker is SIGKILLed twice during the burst; the supervisor
    starts another, which claims what the dead one left pending."""
    served = Served(backing, tmp_path, "kill", TRACKER_WORKERS="1", TRACKER_CLAIM_IDLE_MS="300",
                    TRACKER_BATCH_SIZE="100")
    redis = aioredis.Redis.from_url(backing[1])
    try:
        await served.ready()

        async def killer() -> int:
            kills = 0
            for _ in range(2):
                await asyncio.sleep(0.4)
                children = subprocess.run(["pgrep", "-P", str(served.proc.pid)],
                                          capture_output=True, text=True).stdout.split()
                for child in children:
                    os.kill(int(child), signal.SIGKILL)
                    kills += 1
            return kills

        kill_task = asyncio.create_task(killer())
        answered = await burst(served.base, "kill", CLICKS)
        kills = await kill_task
        assert kills >= 2
        assert len(answered) == CLICKS

        async def all_in() -> bool:
            stored = {uuid_to_id(r["id"]) for r in await pg.fetch("SELECT id FROM clicks")}
            return answered <= stored

        deadline = time.monotonic() + 60
        while not await all_in() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # anything doubled would show up now
        await exactly_once(pg, answered, exact=False)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=20) == 0, "tracker serve did not exit cleanly on SIGTERM"
    finally:
        await served.close(redis)
        await redis.aclose()


@pytest.mark.slow
async def test_sigterm_under_load_loses_nothing_and_exits_in_time(
        backing: tuple[str, str], pg: asyncpg.Connection, tmp_path: Path) -> None:
    """SIGTERM while clicks pour in: the service stops accepting, answers what is in flight,
    exits 0 within 10 s; every click it answered reaches PostgreSQL (what its writers had no
    time to flush waits in the stream for the next start, here a writer of the test's own)."""
    served = Served(backing, tmp_path, "term", TRACKER_WORKERS="2")
    redis = aioredis.Redis.from_url(backing[1])
    try:
        await served.ready()
        stopped_in: list[float] = []

        async def terminate() -> None:
            await asyncio.sleep(0.5)
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            while served.proc.poll() is None and time.monotonic() - started < 15:
                await asyncio.sleep(0.05)
            stopped_in.append(time.monotonic() - started)

        stopper = asyncio.create_task(terminate())
        answered = await burst(served.base, "term", 20_000, concurrency=50, tries=1)
        await stopper
        assert served.proc.wait(timeout=20) == 0
        assert stopped_in[0] < 10, stopped_in
        assert 0 < len(answered) < 20_000, "SIGTERM did not land during the burst"
        stream = keys_for(Settings.from_env().with_(redis_prefix=served.prefix)).stream
        print(f"answered {len(answered)}; stopped in {stopped_in[0]:.2f} s;"
              f" left in the stream {await redis.xlen(stream)}")
        # The next start's writer: drain what the stopped service left in the stream.
        writer = writer_for(Settings(database_url=backing[0], redis_prefix=served.prefix), redis,
                            claim_idle_ms=100)
        await asyncio.sleep(0.2)
        deadline = time.monotonic() + 60
        while await redis.xlen(stream) and time.monotonic() < deadline:
            await writer.step(block=False)
        await exactly_once(pg, answered, exact=False)
    finally:
        await served.close(redis)
        await redis.aclose()


@pytest.mark.slow
async def test_sigkill_of_every_process_then_a_restart_recovers_at_once(
        backing: tuple[str, str], pg: asyncpg.Connection, tmp_path: Path) -> None:
    """The supervisor and both workers SIGKILLed under load, then `tracker serve` again: each
    worker slot reads the batch its predecessor left pending, so every answered click is
    stored within seconds, not after the claim time (set to 60 s here to show it)."""
    data = tmp_path / "data"
    env = {"TRACKER_WORKERS": "2", "TRACKER_CLAIM_IDLE_MS": "60000"}
    served = Served(backing, data, "all", **env)
    redis = aioredis.Redis.from_url(backing[1])
    again: Served | None = None
    try:
        await served.ready()

        async def kill_everything() -> None:
            await asyncio.sleep(1.0)
            served.kill_everything()

        killer = asyncio.create_task(kill_everything())
        answered = await burst(served.base, "all", 20_000, concurrency=50, tries=1)
        await killer
        served.proc.wait()
        assert 0 < len(answered) < 20_000, "the kill did not land during the burst"

        restarted = time.monotonic()
        again = Served(backing, data, prefix=served.prefix, port=served.port, **env)

        async def all_in() -> bool:
            stored = {uuid_to_id(r["id"]) for r in await pg.fetch("SELECT id FROM clicks")}
            return answered <= stored

        assert await eventually(all_in, timeout=55)
        recovered_in = time.monotonic() - restarted
        print(f"answered {len(answered)} before SIGKILL; every one in PostgreSQL "
              f"{recovered_in:.2f} s after the restart (process start included)")
        await asyncio.sleep(0.5)  # anything doubled would show up now
        await exactly_once(pg, answered, exact=False)
        await again.healthy()  # (a SIGTERM before its handler exists would just kill it)
        again.stop()
    finally:
        if again is not None:
            await again.close()
        await served.close(redis)
        await redis.aclose()
