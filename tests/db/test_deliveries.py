"""Outbound postbacks as a traffic source sees them: a real receiver on 127.0.0.1, delivery
rows as the batch writer leaves them, and what is kept of every try."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tracker.app import DELIVERER_STOP_SECONDS
from tracker.outbound.deliverer import Deliverer
from tracker.settings import Settings
from tracker.storage import db, deliveries

from ..conftest import eventually, start

HANG = -1  # a scripted answer: never answer


class Receiver:
    """A traffic source's postback endpoint: each path answers with the next status of its
    script (the last one repeats), or never (HANG), after `delay` seconds."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[int]] = {}
        self.hits: list[tuple[str, int]] = []  # (path, status answered or HANG)
        self.delay = 0.0
        self._leaving = asyncio.Event()
        self.base = ""
        self._runner: web.AppRunner | None = None

    def url(self, path: str, *answers: int) -> str:
        if answers:
            self.scripts[path] = list(answers)
        return f"{self.base}{path}?click=abc&payout=1.50"

    def count(self, path: str, status: int | None = None) -> int:
        return sum(1 for p, s in self.hits if p == path and (status is None or s == status))

    async def _handle(self, request: web.Request) -> web.Response:
        script = self.scripts.get(request.path, [200])
        answer = script[min(self.count(request.path), len(script) - 1)]
        self.hits.append((request.path, answer))
        if answer == HANG:
            await self._leaving.wait()
            return web.Response(status=200)
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=answer, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        self.port = port

    async def stop(self) -> None:
        self._leaving.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def outbound(settings: Settings) -> Settings:
    """Private targets allowed (the receiver is on 127.0.0.1), quick retries."""
    return settings.with_(postback_allow_private=True, postback_backoff_ms=100,
                          postback_timeout_seconds=1)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(settings.database_url)
    yield p
    await p.close()


@contextlib.asynccontextmanager
async def delivering(pool: asyncpg.Pool, settings: Settings,
                     **options: Any) -> AsyncIterator[Deliverer]:
    deliverer = Deliverer(pool, settings, **options)
    deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop(0.5)


async def add_delivery(pg: asyncpg.Connection, url: str, *,
                       age: timedelta = timedelta(0)) -> tuple[int, UUID]:
    """A delivery as the batch writer makes it, with the conversion's change."""
    conversion_id = uuid4()
    delivery_id = await pg.fetchval(
        "INSERT INTO postback_deliveries (conversion_id, version, campaign_id, url, created_at, "
        "next_try_at) VALUES ($1, 1, 7, $2, now() - $3::interval, now()) RETURNING id",
        conversion_id, url, age)
    return delivery_id, conversion_id


async def delivery(pg: asyncpg.Connection, delivery_id: int) -> asyncpg.Record:
    return await pg.fetchrow("SELECT * FROM postback_deliveries WHERE id = $1", delivery_id)


async def tries(pg: asyncpg.Connection, delivery_id: int) -> list[asyncpg.Record]:
    return list(await pg.fetch(
        "SELECT * FROM postback_tries WHERE delivery_id = $1 ORDER BY n", delivery_id))


async def state_becomes(pg: asyncpg.Connection, delivery_id: int, state: str,
                        timeout: float = 10.0) -> asyncpg.Record:
    async def reached() -> asyncpg.Record | None:
        row = await delivery(pg, delivery_id)
        return row if row["state"] == state else None

    row = await eventually(reached, timeout)
    assert row is not None, dict(await delivery(pg, delivery_id))
    return row


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("tracker_outbound_postbacks_total",
                                     {"outcome": outcome}) or 0.0


def lag_observations() -> float:
    return REGISTRY.get_sample_value("tracker_outbound_postback_lag_seconds_count") or 0.0


# -- retries -------------------------------------------------------------------------------


async def test_a_receiver_failing_three_times_gets_the_postback_on_the_fourth_try(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    delivery_id, conversion_id = await add_delivery(
        pg, receiver.url("/pb", 500, 503, 500, 200))
    retried, delivered, lag = counted("retry"), counted("delivered"), lag_observations()
    async with delivering(pool, outbound):
        row = await state_becomes(pg, delivery_id, "delivered")
    kept = await tries(pg, delivery_id)
    assert [t["http_status"] for t in kept] == [500, 503, 500, 200]
    assert [t["n"] for t in kept] == [1, 2, 3, 4]
    assert all(t["error"] is None for t in kept)
    assert row["tries"] == 4 and row["finished_at"] is not None and row["last_error"] is None
    assert receiver.count("/pb", 200) == 1 and receiver.count("/pb") == 4
    # Each wait honours the doubling backoff (100, 200, 400 ms, less 20% jitter).
    gaps = [(b["ts"] - a["ts"]).total_seconds() for a, b in zip(kept, kept[1:])]
    assert [g >= 0.1 * 2 ** i * 0.8 for i, g in enumerate(gaps)] == [True] * 3, gaps
    assert counted("retry") - retried == 3 and counted("delivered") - delivered == 1
    assert lag_observations() - lag == 1

    # What GET /api/conversions/{id} shows of it.
    shown = await deliveries.for_conversion(pool, conversion_id)
    assert len(shown) == 1
    assert shown[0]["id"] == delivery_id and shown[0]["state"] == "delivered"
    assert shown[0]["url"] == receiver.url("/pb") and shown[0]["version"] == 1
    assert shown[0]["next_try_at"] is None and shown[0]["finished_at"].endswith("Z")
    assert [t["http_status"] for t in shown[0]["tries"]] == [500, 503, 500, 200]
    first = shown[0]["tries"][0]
    assert set(first) == {"n", "time", "http_status", "latency_ms", "error"}
    assert first["time"].endswith("Z") and datetime.fromisoformat(first["time"][:-1])
    assert isinstance(first["latency_ms"], float) and 0 < first["latency_ms"] < 1000


async def test_a_404_fails_after_one_try(outbound: Settings, pg: asyncpg.Connection,
                                         pool: asyncpg.Pool, receiver: Receiver) -> None:
    delivery_id, conversion_id = await add_delivery(pg, receiver.url("/gone", 404))
    async with delivering(pool, outbound):
        row = await state_becomes(pg, delivery_id, "failed")
        await asyncio.sleep(0.3)  # three backoffs' worth: no second try comes
    assert row["tries"] == 1 and row["last_error"] == "HTTP 404"
    assert [t["http_status"] for t in await tries(pg, delivery_id)] == [404]
    assert receiver.count("/gone") == 1
    shown = await deliveries.for_conversion(pool, conversion_id)
    assert shown[0]["state"] == "failed" and shown[0]["last_error"] == "HTTP 404"


async def test_a_receiver_that_never_answers_is_retried_after_each_timeout(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    delivery_id, conversion_id = await add_delivery(pg, receiver.url("/slow", HANG))
    started = time.monotonic()
    async with delivering(pool, outbound):
        async def two_tries() -> bool:
            return (await delivery(pg, delivery_id))["tries"] >= 2

        assert await eventually(two_tries, timeout=10)
    kept = await tries(pg, delivery_id)
    assert len(kept) >= 2 and time.monotonic() - started >= 2.0
    for t in kept:
        assert t["http_status"] is None and t["error"] == "no answer within 1 s"
        assert t["latency_ms"] >= 900
    row = await delivery(pg, delivery_id)
    assert row["state"] == "pending" and row["last_error"] == "no answer within 1 s"
    assert receiver.count("/slow") >= 2
    shown = await deliveries.for_conversion(pool, conversion_id)
    assert shown[0]["next_try_at"] is not None


async def test_retries_end_once_the_delivery_is_older_than_the_retry_window(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    old, _ = await add_delivery(pg, receiver.url("/old", 503),
                                age=timedelta(hours=outbound.postback_retry_hours, minutes=1))
    young, _ = await add_delivery(pg, receiver.url("/young", 503),
                                  age=timedelta(hours=outbound.postback_retry_hours, minutes=-1))
    async with delivering(pool, outbound):
        row = await state_becomes(pg, old, "failed")

        async def retried() -> bool:
            return (await delivery(pg, young))["tries"] >= 2

        assert await eventually(retried)
    assert row["tries"] == 1 and row["last_error"] == "HTTP 503"
    assert receiver.count("/old") == 1
    assert (await delivery(pg, young))["state"] == "pending"


# -- stops, crashes, several workers -------------------------------------------------------


async def test_a_delivery_left_by_a_stopped_worker_is_delivered_once_by_the_next(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    settings = outbound.with_(postback_backoff_ms=500)
    delivery_id, _ = await add_delivery(pg, receiver.url("/again", 500, 200))
    async with delivering(pool, settings):
        async def tried() -> bool:
            return (await delivery(pg, delivery_id))["tries"] == 1

        assert await eventually(tried)
    assert receiver.count("/again") == 1  # stopped before its retry was due

    runner, running = await start(settings)  # a new worker: the whole app
    try:
        await state_becomes(pg, delivery_id, "delivered")
    finally:
        await running.close()
        await runner.cleanup()
    assert [t["http_status"] for t in await tries(pg, delivery_id)] == [500, 200]
    assert receiver.count("/again", 200) == 1 and receiver.count("/again") == 2


async def test_a_try_cut_short_by_a_crash_is_made_again_once_the_lease_ends(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    """The deliverer dies mid-try (its task cancelled, nothing handed back, as on SIGKILL):
    the row stays leased, then another deliverer takes it and delivers it, once."""
    delivery_id, _ = await add_delivery(pg, receiver.url("/crash", HANG, 200))
    crashed = Deliverer(pool, outbound.with_(postback_timeout_seconds=30), lease_seconds=1.0)
    crashed.start()
    try:
        async def in_flight() -> bool:
            return receiver.count("/crash") == 1

        assert await eventually(in_flight)
        killed_at = time.monotonic()
    finally:
        task = crashed._task
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    row = await delivery(pg, delivery_id)
    assert row["state"] == "pending" and row["tries"] == 0  # nothing recorded of that try

    async with delivering(pool, outbound):
        await state_becomes(pg, delivery_id, "delivered")
        taken_after = time.monotonic() - killed_at
    assert taken_after >= 0.5  # not before the lease ran out
    assert [t["http_status"] for t in await tries(pg, delivery_id)] == [200]
    assert receiver.count("/crash", 200) == 1 and receiver.count("/crash") == 2


async def test_two_deliverers_at_once_never_deliver_one_row_twice(
        outbound: Settings, pg: asyncpg.Connection, settings: Settings,
        receiver: Receiver) -> None:
    receiver.delay = 0.02  # tries overlap the other deliverer's claims
    ids = [(await add_delivery(pg, receiver.url(f"/n{i}")))[0] for i in range(60)]
    first = await db.create_pool(settings.database_url)
    second = await db.create_pool(settings.database_url)
    try:
        async with delivering(first, outbound, concurrency=4, poll_seconds=0.01), \
                delivering(second, outbound, concurrency=4, poll_seconds=0.01):
            async def all_delivered() -> bool:
                return await pg.fetchval("SELECT count(*) FROM postback_deliveries "
                                         "WHERE state = 'delivered'") == len(ids)

            assert await eventually(all_delivered, timeout=20)
    finally:
        await first.close()
        await second.close()
    assert len(receiver.hits) == len(ids)
    assert sorted(p for p, _ in receiver.hits) == sorted(f"/n{i}" for i in range(60))
    assert await pg.fetchval("SELECT count(*) FROM postback_tries") == len(ids)


async def test_leaving_hands_back_the_tries_in_flight_within_its_bound(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    delivery_id, _ = await add_delivery(pg, receiver.url("/hang", HANG))
    deliverer = Deliverer(pool, outbound.with_(postback_timeout_seconds=30))
    deliverer.start()

    async def in_flight() -> bool:
        return receiver.count("/hang") == 1

    try:
        assert await eventually(in_flight)
        leased = await delivery(pg, delivery_id)
    finally:
        started = time.monotonic()
        await deliverer.stop(0.2)
        took = time.monotonic() - started
    assert took < 0.6, took
    row = await delivery(pg, delivery_id)
    # Due at once for whoever comes next, not after the 60 s lease.
    assert row["state"] == "pending" and row["tries"] == 0
    assert leased["next_try_at"] - row["next_try_at"] > timedelta(seconds=50)
    assert await pg.fetchval("SELECT next_try_at <= now() FROM postback_deliveries "
                             "WHERE id = $1", delivery_id)


async def test_a_worker_leaving_with_a_try_in_flight_stays_within_its_bound(
        outbound: Settings, pg: asyncpg.Connection, receiver: Receiver) -> None:
    """SIGTERM as worker.py does it: the try in flight has until DELIVERER_STOP_SECONDS after
    leaving began, is then cut short, and its row is handed back, due now."""
    delivery_id, _ = await add_delivery(pg, receiver.url("/stuck", HANG))
    runner, running = await start(outbound.with_(postback_timeout_seconds=30))
    try:
        async def in_flight() -> bool:
            return receiver.count("/stuck") == 1

        assert await eventually(in_flight)
    finally:
        await running.close()
        started = time.monotonic()
        await runner.cleanup()
        took = time.monotonic() - started
    assert DELIVERER_STOP_SECONDS <= took < DELIVERER_STOP_SECONDS + 1.0, took
    row = await delivery(pg, delivery_id)
    assert row["state"] == "pending" and row["tries"] == 0
    assert await pg.fetchval("SELECT next_try_at <= now() FROM postback_deliveries "
                             "WHERE id = $1", delivery_id)


# -- PostgreSQL away -----------------------------------------------------------------------


class Flaky:
    """A pool whose first `failures` claims find PostgreSQL away."""

    def __init__(self, pool: asyncpg.Pool, failures: int) -> None:
        self.pool, self.failures = pool, failures

    async def fetch(self, *args: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("connection refused")
        return await self.pool.fetch(*args)

    def acquire(self) -> Any:
        return self.pool.acquire()


async def test_postgres_away_is_retried_and_logged_once(
        outbound: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool, receiver: Receiver,
        caplog: pytest.LogCaptureFixture) -> None:
    delivery_id, _ = await add_delivery(pg, receiver.url("/later"))
    errors = REGISTRY.get_sample_value("tracker_backend_errors_total",
                                       {"backend": "postgres"}) or 0.0
    with caplog.at_level(logging.INFO, logger="tracker.outbound"):
        async with delivering(Flaky(pool, failures=3), outbound,  # type: ignore[arg-type]
                              retry_first=0.05):
            await state_becomes(pg, delivery_id, "delivered")
    after = REGISTRY.get_sample_value("tracker_backend_errors_total", {"backend": "postgres"})
    assert after == errors + 3
    lines = [r.getMessage() for r in caplog.records if r.name == "tracker.outbound.deliverer"]
    assert sum("PostgreSQL error, will retry" in line for line in lines) == 1, lines
    assert sum("PostgreSQL answers again" in line for line in lines) == 1, lines


# -- the SSRF guard ------------------------------------------------------------------------


async def test_targets_inside_our_network_are_refused_without_a_request(
        settings: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool,
        receiver: Receiver) -> None:
    guarded = settings.with_(postback_allow_private=False, postback_backoff_ms=100,
                             postback_timeout_seconds=1)
    port = receiver.port
    urls = {
        f"http://127.0.0.1:{port}/pb": f"target address 127.0.0.1 is loopback",
        "http://10.0.0.1/pb": "target address 10.0.0.1 is private",
        f"http://[::1]:{port}/pb": "target address ::1 is loopback",
        "http://169.254.169.254/latest/meta-data/": "target address 169.254.169.254 is link-local",
        f"http://localhost:{port}/pb": "target localhost resolves to ",
        f"ftp://127.0.0.1:{port}/pb": "only http and https targets are called, not ftp",
    }
    added = {url: (await add_delivery(pg, url))[0] for url in urls}
    refused = counted("refused")
    async with delivering(pool, guarded):
        for url, delivery_id in added.items():
            row = await state_becomes(pg, delivery_id, "failed")
            assert urls[url] in row["last_error"], (url, row["last_error"])
    for url, delivery_id in added.items():
        [kept] = await tries(pg, delivery_id)
        assert kept["http_status"] is None and urls[url] in kept["error"]
        if "://" in url and not url.startswith("ftp"):
            assert kept["error"].endswith("set TRACKER_POSTBACK_ALLOW_PRIVATE=true to allow")
    assert receiver.hits == []
    assert counted("refused") - refused == len(urls)
