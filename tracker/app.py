"""create_app(settings) → the aiohttp application of one worker.

Resources open in this order and close in reverse: PostgreSQL, exchange rates, Redis, the
tracking pieces (buffer, spool, request tracker), campaign cache, conversion recorder,
partition upkeep, postback deliverer, batch
writer, gauges lease. Nothing here waits for PostgreSQL or Redis to answer: a worker starts,
and answers redirects, during an outage of either, and catches up in the background.

Leaving (SIGTERM, see worker.py): the servers stop accepting and answer what is in flight
(IN_FLIGHT_SECONDS); the deliverer stops claiming (on_shutdown) while its tries in flight go
on; the batch writer finishes its batch (WRITER_STOP_SECONDS) and drains the stream
(DRAIN_SECONDS); then the deliverer's tries still in flight DELIVERER_STOP_SECONDS after it
stopped claiming are cancelled and handed back; then the rest closes (CLOSE_SECONDS each).
The deliverer closes after the writer so that its grace runs alongside the writer's flush, not
after it: it adds at most its release (deliverer.RELEASE_SECONDS) to the leaving. Together
they stay under the supervisor's 10 s before it kills a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from redis.exceptions import RedisError
from aiohttp import web

from . import routes
from .campaign_cache import CampaignCache
from .conversion.fx import FxRates
from .conversion.guard import PostbackGuard
from .conversion.record import ConversionRecorder
from .ingest.buffer import EventBuffer
from .ingest.marks import OldMarks
from .redis_keys import Keys
from .ingest.spool import Spool
from .ingest.track import RequestTracker
from .ingest.visitor import Countries, UserAgents
from .ingest.writer import BatchWriter, consumer_name
from .keys import (BUFFER, CAMPAIGNS, CONVERSIONS, DELIVERER, FX, GAUGES_LEASE, PG, REDIS,
                   REDIS_KEYS, RUN_DELIVERER, RUN_WRITER, SETTINGS, TRACKER, UPKEEP, WORKER_SLOT,
                   WRITER)
from .lease import Lease, gauges_key, instance_name
from .middleware import observe
from .outbound.deliverer import Deliverer
from .redis_client import connect as connect_redis
from .redis_pipe import RedisPipe
from .redis_pipe import supports as supports_pipe
from .redis_keys import keys_for
from .settings import Settings
from .storage import db
from .upkeep import PartitionUpkeep

log = logging.getLogger(__name__)

IN_FLIGHT_SECONDS = 2.0
WRITER_STOP_SECONDS = 1.5
DRAIN_SECONDS = 3.0
CLOSE_SECONDS = 1.0
# Tries in flight when leaving may finish within this much after the deliverer stopped
# claiming (most receivers answer well within it); what is left is tried again later.
DELIVERER_STOP_SECONDS = 1.0
REDIS_CONNECTIONS = 256
REDIS_WAIT_SECONDS = 2.0


async def postgres(app: web.Application) -> AsyncIterator[None]:
    app[PG] = pool = await db.create_pool(app[SETTINGS].database_url)
    yield
    try:
        await asyncio.wait_for(pool.close(), CLOSE_SECONDS)
    except (asyncio.TimeoutError, OSError):
        pool.terminate()


async def fx_rates(app: web.Application) -> AsyncIterator[None]:
    # Nothing to open or close: rates are looked up on first use, through the pool.
    app[FX] = FxRates(app[PG])
    yield


async def redis_client(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url = settings.redis_url
    app[REDIS] = connect_redis(url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_WAIT_SECONDS)
    app[REDIS_KEYS] = keys_for(settings)
    yield
    try:
        await asyncio.wait_for(app[REDIS].aclose(), CLOSE_SECONDS)
    except (asyncio.TimeoutError, OSError):
        pass


async def tracking(app: web.Application) -> AsyncIterator[None]:
    """The hot path's pieces: the Redis buffer, the spool behind it, the request tracker."""
    settings = app[SETTINGS]
    url = settings.redis_url
    pipe = RedisPipe(url, REDIS_WAIT_SECONDS) if supports_pipe(url) else None
    app[BUFFER] = buffer = EventBuffer(app[REDIS], app[REDIS_KEYS], settings.click_cache_ttl,
                                       settings.unique_window, pipe)
    countries = Countries(settings.geoip_db, settings.country_header)
    spool = Spool(settings.data_dir / "spool", buffer)
    app[TRACKER] = RequestTracker(buffer, spool, UserAgents(), countries, settings.proxy_hops)
    spool.start()
    yield
    await spool.stop()  # fsync'd and closed: a later start replays what it holds
    countries.close()
    await buffer.close()


async def campaign_cache(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cache = CampaignCache(app[PG], app[REDIS], app[REDIS_KEYS],
                          snapshot=settings.data_dir / "campaigns.json",
                          refresh_seconds=settings.campaign_refresh_seconds)
    await cache.start()
    app[CAMPAIGNS] = cache
    # The uniqueness marks of windows gone by go with the campaigns they belong to.
    old_marks = OldMarks(app[REDIS], app[REDIS_KEYS], cache.ids, settings.unique_window)
    old_marks.start()
    yield
    await old_marks.stop()
    await cache.stop()


async def conversions(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    guard = PostbackGuard(app[REDIS], settings.redis_prefix, settings.signature_tolerance_seconds)
    recorder = ConversionRecorder(app[BUFFER], app[REDIS_KEYS], app[PG], app[CAMPAIGNS],
                                  app[FX], guard, settings.conversion_state_ttl)
    app[CONVERSIONS] = recorder
    try:
        await recorder.mark_complete_from_now()
    except RedisError:
        pass  # Redis away: the first conversion recorded sets the mark
    yield


async def partitions(app: web.Application) -> AsyncIterator[None]:
    # In the background: a worker starts and answers whatever upkeep meets (see upkeep.py).
    settings = app[SETTINGS]
    app[UPKEEP] = upkeep = PartitionUpkeep(app[PG], days_ahead=settings.partition_days_ahead,
                                           retention_days=settings.retention_days)
    upkeep.start()
    yield
    await upkeep.stop()


async def postback_deliverer(app: web.Application) -> AsyncIterator[None]:
    app[DELIVERER] = deliverer = Deliverer(app[PG], app[SETTINGS])
    if app[RUN_DELIVERER]:
        deliverer.start()
    yield
    await deliverer.stop(DELIVERER_STOP_SECONDS)


async def stop_claiming_postbacks(app: web.Application) -> None:
    # At the start of leaving, before the cleanup contexts: nothing new is claimed while the
    # writer flushes, and the tries in flight have the writer's time to finish.
    if DELIVERER in app:
        app[DELIVERER].stop_claiming()


async def batch_writer(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    writer = BatchWriter(
        app[REDIS], lambda: db.connect(settings.database_url), app[REDIS_KEYS],
        batch_size=settings.batch_size, wait_ms=settings.batch_wait_ms,
        claim_idle_ms=settings.claim_idle_ms, linger_ms=settings.batch_linger_ms,
        consumer=consumer_name(settings.data_dir, app[WORKER_SLOT]))
    app[WRITER] = writer
    if not app[RUN_WRITER]:
        yield
        await writer.close()
        return
    task = asyncio.create_task(writer.run(), name="batch-writer")
    yield
    # In-flight requests are answered by now: finish the batch in hand, then flush the rest.
    writer.stop()
    await asyncio.wait([task], timeout=WRITER_STOP_SECONDS)
    while not task.done():
        # Stuck on a server that does not answer. (A cancellation can be swallowed by a
        # wait_for inside a library as its call completes: insist until the task is gone.)
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        log.error("batch writer failed: %r", task.exception())
    # Only now may the drain use the writer's connection: the task no longer does. Bounded
    # even when a batch hangs: what it could not write waits in the stream for a writer.
    try:
        await asyncio.wait_for(writer.drain(time.monotonic() + DRAIN_SECONDS), DRAIN_SECONDS)
    except asyncio.TimeoutError:
        log.warning("leaving with events still in the stream; a writer will store them")
    await writer.close()


async def gauges_lease(app: web.Application) -> AsyncIterator[None]:
    # Last to open, so first to close: when leaving, another instance takes over the global
    # gauges while this one still drains.
    settings = app[SETTINGS]
    app[GAUGES_LEASE] = lease = Lease(app[REDIS], gauges_key(settings.redis_prefix),
                                      instance_name(settings.data_dir))
    lease.start()
    yield
    await lease.stop()


def create_app(settings: Settings, *, run_writer: bool = True, run_deliverer: bool = True,
               slot: int = 0) -> web.Application:
    """The app of worker `slot` (0 .. TRACKER_WORKERS-1): the slot names its batch writer, so
    a restarted worker takes up the batch its predecessor in that slot left pending."""
    app = web.Application(middlewares=[observe], client_max_size=256 * 1024)
    app[SETTINGS] = settings
    app[RUN_WRITER] = run_writer
    app[RUN_DELIVERER] = run_deliverer
    app[WORKER_SLOT] = slot
    app.cleanup_ctx.extend(
        [postgres, fx_rates, redis_client, tracking, campaign_cache, conversions, partitions,
         postback_deliverer, batch_writer, gauges_lease])
    app.on_shutdown.append(stop_claiming_postbacks)
    routes.setup(app)
    return app
