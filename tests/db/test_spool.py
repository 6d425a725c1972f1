"""Spool files left behind (a worker died while Redis was away) are replayed by whichever
worker starts next; a line torn by the crash is skipped, the rest kept. A big file is
streamed, a replay cut short is replayed whole, and fsync never runs on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tracker.ids import new_id
from tracker.ingest.buffer import EventBuffer
from tracker.ingest.entries import decoded
from tracker.ingest.spool import REPLAY_CHUNK, Spool
from tracker.redis_keys import keys_for
from tracker.settings import Settings

from ..api.test_reports import click, impression
from ..conftest import eventually, free_port, start


async def test_a_dead_workers_spool_is_replayed(settings: Settings, pg: asyncpg.Connection) -> None:
    runner, running = await start(settings)
    try:
        campaign = await running.create_campaign(slug="spooled")
    finally:
        await running.close()
        await runner.cleanup()
    now = datetime.now(UTC)
    folder = settings.data_dir / "spool"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [orjson.dumps({"kind": "click", "event": {k: v for k, v in click(campaign["id"], now).items()
                                                      if k != "is_unique"},
                           "visitor": f"v{i}", "bot": False}) for i in range(7)]
    lines.append(orjson.dumps({"kind": "event", "event": impression(campaign["id"], now)}))
    (folder / "12345-dead.spool").write_bytes(b"\n".join(lines) + b'\n{"kind": "cli')

    runner, running = await start(settings)
    try:
        async def replayed() -> bool:
            return (await pg.fetchval("SELECT count(*) FROM clicks"),
                    await pg.fetchval("SELECT count(*) FROM impressions")) == (7, 1)

        assert await eventually(replayed, timeout=15)
        assert not list(folder.glob("*.spool"))
        assert await pg.fetchval("SELECT count(*) FROM clicks WHERE is_unique") == 7
    finally:
        await running.close()
        await runner.cleanup()


def spooled_impressions(folder: Path, count: int, campaign_id: int = 1) -> list[str]:
    """A spool file left by a dead worker: `count` impressions of about 1 KB a line, and the
    line a crash tore. Returns the events' ids."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    events = [impression(campaign_id, now, sub1=f"{i:08d}" + "x" * 900) for i in range(count)]
    with open(folder / "12345-dead.spool", "wb") as spool:
        for event in events:
            spool.write(orjson.dumps({"kind": "event", "event": event}) + b"\n")
        spool.write(b'{"kind": "ev')
    return [e["id"] for e in events]


async def stream_ids(settings: Settings) -> list[str]:
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        entries = [entry for stream in keys_for(settings).streams
                   for entry in await redis.xrange(stream)]
    finally:
        await redis.aclose()
    return [event["id"] for _, fields in entries for event in decoded(fields)]


@contextlib.asynccontextmanager
async def redis_at(url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        yield redis
    finally:
        await redis.aclose()


def buffer_of(redis: aioredis.Redis, settings: Settings) -> EventBuffer:
    return EventBuffer(redis, keys_for(settings), click_ttl=60, unique_window=3600)


@pytest.mark.slow
async def test_a_replay_holds_one_chunk_of_a_big_file_at_a_time(settings: Settings,
                                                                tmp_path: Path) -> None:
    """A long outage leaves hundreds of MB: the replay streams the file instead of reading
    it whole. Peak memory stays far below the file's size (not a timing: a count of bytes)."""
    folder = tmp_path / "spool"
    ids = spooled_impressions(folder, 48 * REPLAY_CHUNK)  # 24,000 lines, about 26 MB
    size = (folder / "12345-dead.spool").stat().st_size
    async with redis_at(settings.redis_url) as redis:
        spool = Spool(folder, buffer_of(redis, settings))
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            replayed = await spool.replay()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert replayed == len(ids)
    # Reading it whole held the file twice over (its bytes, then its lines) and every event
    # parsed: several times its size. A chunk of 500 events in flight is a few MB.
    assert peak - before < size / 2, (peak - before, size)
    assert sorted(await stream_ids(settings)) == sorted(ids)
    assert not list(folder.iterdir())


class FailingBuffer(EventBuffer):
    """Redis that goes away again after `allowed` events of a replay."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, allowed: int) -> None:
        super().__init__(redis, keys_for(settings), click_ttl=60, unique_window=3600)
        self.allowed = allowed

    async def record(self, impression_id: str, campaign_id: int, visitor_id: str,
                     line: str) -> None:
        if self.allowed <= 0:
            raise RedisConnectionError("gone again")
        self.allowed -= 1
        await super().record(impression_id, campaign_id, visitor_id, line)


async def test_a_replay_cut_short_keeps_the_file_and_is_replayed_whole(settings: Settings,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    ids = spooled_impressions(folder, REPLAY_CHUNK * 3)
    async with redis_at(settings.redis_url) as redis:
        buffer = FailingBuffer(redis, settings, allowed=REPLAY_CHUNK + 10)  # into chunk two
        spool = Spool(folder, buffer)
        with pytest.raises(RedisConnectionError):
            await spool.replay()
        assert (folder / "12345-dead.spool").exists()
        buffer.allowed = len(ids)
        assert await spool.replay() == len(ids)
    assert not list(folder.iterdir())
    sent = await stream_ids(settings)
    assert sorted(set(sent)) == sorted(ids)  # all of them; the first ones twice (PG keeps one)


async def test_fsync_runs_off_the_event_loop_and_stop_waits_for_it(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    threads: list[int] = []
    finished: list[int] = []
    syncing, disk_done = threading.Event(), threading.Event()

    def observed_fsync(fd: int) -> None:
        threads.append(threading.get_ident())
        syncing.set()
        if len(threads) == 1:
            disk_done.wait(10)  # a slow disk: the first fsync lasts until the test says
        real_fsync(fd)
        finished.append(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    folder = tmp_path / "spool"
    # Redis is away (nothing listens there): the spool keeps its file and syncs it.
    async with redis_at(f"redis://127.0.0.1:{free_port()}/0") as away:
        spool = Spool(folder, buffer_of(away, settings))
        spool.start()
        try:
            spool.append_impression(str(new_id()), 1, "v", "a line")

            async def is_syncing() -> bool:
                return syncing.is_set()

            assert await eventually(is_syncing)
            spool.append_impression(str(new_id()), 1, "v", "a line")  # while the first fsync runs
            stopping = asyncio.create_task(spool.stop())
            await asyncio.sleep(0.3)
            assert not stopping.done()  # it waits for the fsync under way...
            disk_done.set()
            await stopping
        finally:
            disk_done.set()
            await spool.stop()  # (a no-op once stopped)

    assert threads and threading.get_ident() not in threads  # never on the event loop
    assert len(finished) == len(threads) >= 2  # ...then syncs the line that came meanwhile
    (path,) = folder.glob("*.spool")
    assert len(path.read_bytes().splitlines()) == 2
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and closes the file: its lock is free
