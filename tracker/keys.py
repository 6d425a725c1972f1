"""Typed keys for what the app holds."""

from __future__ import annotations

import asyncpg
from .redis_client import Client
from aiohttp import web

from .campaign_cache import CampaignCache
from .conversion.fx import FxRates
from .conversion.record import ConversionRecorder
from .ingest.buffer import EventBuffer
from .redis_keys import Keys
from .ingest.track import RequestTracker
from .ingest.writer import BatchWriter
from .lease import Lease
from .outbound.deliverer import Deliverer
from .settings import Settings
from .upkeep import PartitionUpkeep

SETTINGS = web.AppKey("settings", Settings)
PG = web.AppKey("pg", asyncpg.Pool)
FX = web.AppKey("fx", FxRates)
REDIS: web.AppKey[Client] = web.AppKey("redis")
REDIS_KEYS = web.AppKey("redis_keys", Keys)
CAMPAIGNS = web.AppKey("campaigns", CampaignCache)
BUFFER = web.AppKey("buffer", EventBuffer)
TRACKER = web.AppKey("tracker", RequestTracker)
WRITER = web.AppKey("writer", BatchWriter)
CONVERSIONS = web.AppKey("conversions", ConversionRecorder)
UPKEEP = web.AppKey("upkeep", PartitionUpkeep)
DELIVERER = web.AppKey("deliverer", Deliverer)
# Held by one instance at a time: that one exports the global gauges (metrics.GlobalGauge).
GAUGES_LEASE = web.AppKey("gauges_lease", Lease)
# Tests run the writer by hand to stop it mid-batch; the service always runs it.
RUN_WRITER = web.AppKey("run_writer", bool)
# Tests that watch delivery rows keep them still; the service always delivers.
RUN_DELIVERER = web.AppKey("run_deliverer", bool)
# Which of the supervisor's workers this is (0 .. TRACKER_WORKERS-1).
WORKER_SLOT = web.AppKey("worker_slot", int)
