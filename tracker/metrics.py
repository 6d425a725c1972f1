"""Every metric, declared once. Labels are closed sets: never a slug, a sub id or an IP.

With several workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
`tracker serve`) sums every worker into the one /metrics answer.

Everything in the registry is a figure of this instance, so a sum across instances is right.
Figures of the whole deployment (the shared stream's backlog) are GlobalGauges instead: read
at scrape time and exported by one instance at a time (lease.py). Aggregate them with max,
which stays right while two instances both export during a handover of the lease.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric


class GlobalGauge:
    """A figure of the whole deployment, not of this instance. Never in the registry: a sample
    there is exported by every worker's and every instance's /metrics, and multiprocess mode
    cannot take one back. render() adds it when this instance holds the gauges lease."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation


# Sub-millisecond buckets: a redirect answers in well under 1 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
)

HTTP_REQUESTS = Counter(
    "tracker_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "tracker_http_request_duration_seconds", "Time to answer a request",
    ["route", "status"], buckets=LATENCY_BUCKETS,
)
EVENTS = Counter(
    "tracker_events_total", "Tracking events by type and outcome", ["type", "outcome"]
)
EVENTS_DROPPED = Counter(
    "tracker_events_dropped_total", "Events not recorded, by reason", ["type", "reason"]
)
BUFFER_PIPELINE = Histogram(
    "tracker_buffer_pipeline_commands", "Tracking events sent to Redis in one pipeline",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_ROWS = Histogram(
    "tracker_batch_rows", "Events per batch written to PostgreSQL",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
BATCH_DURATION = Histogram(
    "tracker_batch_duration_seconds", "Time to write one batch to PostgreSQL",
    buckets=LATENCY_BUCKETS + (10.0,),
)
BATCH_FAILURES = Counter("tracker_batch_failures_total", "Batches that failed and will be retried")
EVENTS_WRITTEN = Counter(
    "tracker_events_written_total", "Events newly inserted into PostgreSQL", ["type"]
)
SPOOL = Counter(
    "tracker_spool_events_total",
    "Events written to the local spool while Redis was away, and replayed from it", ["action"]
)
EVENTS_CLAIMED = Counter(
    "tracker_events_claimed_total", "Pending events claimed from writers that stopped"
)
BACKLOG = GlobalGauge(
    "tracker_write_backlog_events", "Events accepted but not yet in PostgreSQL",
)
BACKLOG_AGE = GlobalGauge(
    "tracker_write_backlog_oldest_age_seconds", "Age of the oldest event not yet in PostgreSQL",
)
# Exported with the backlog, so that an alert compares the two from the same instance.
BACKLOG_LIMIT = GlobalGauge(
    "tracker_write_backlog_limit_events",
    "TRACKER_BACKLOG_LIMIT: from this many events in the backlog, /readyz answers 503",
)
POSTBACKS = Counter(
    "tracker_outbound_postbacks_total",
    "Outbound postback tries by outcome (delivered, retry, failed, refused)", ["outcome"]
)
POSTBACK_LAG = Histogram(
    "tracker_outbound_postback_lag_seconds",
    "From a conversion's change being stored to its outbound postback delivered",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
             86400.0),
)
BACKEND_ERRORS = Counter(
    "tracker_backend_errors_total", "Errors talking to PostgreSQL or Redis", ["backend"]
)
BACKEND_UP = Gauge(
    "tracker_backend_up", "1 while every worker reaches the backend, 0 while one does not",
    ["backend"], multiprocess_mode="livemin",
)
DEAD_LETTERS = Counter(
    "tracker_dead_letters_total", "Events PostgreSQL refused for their values, kept in dead_letters"
)
WRITE_LAG = Histogram(
    "tracker_write_lag_seconds",
    "Per batch: from the oldest event's answer (its entry in the stream) to its commit",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)


class DropReason(StrEnum):
    """Why a tracking request recorded nothing: a closed set, each counted."""

    UNKNOWN_CAMPAIGN = "unknown_campaign"
    CAMPAIGN_PAUSED = "campaign_paused"
    INVALID_PARAMS = "invalid_params"
    BUFFER_UNAVAILABLE = "buffer_unavailable"
    NOT_READY = "not_ready"  # campaigns not loaded yet (PostgreSQL away since start, no snapshot)
    INTERNAL_ERROR = "internal_error"
    # Conversions only.
    UNKNOWN_CLICK = "unknown_click"
    INVALID_TRANSITION = "invalid_transition"
    UNAUTHORIZED = "unauthorized"
    CURRENCY_UNSUPPORTED = "currency_unsupported"


class Tally:
    """The hot path's counts, added up in plain numbers and handed to prometheus_client once
    per event-loop tick.

    In multiprocess mode every increment takes a lock, asks the kernel for the process id and
    writes a memory-mapped file: a click's three series cost about a tenth of its CPU. Under
    load one tick answers dozens of requests, and they share one write per series. What a
    tick counted is written by a callback it schedules, which runs before any callback
    scheduled after it: a request that arrives after an answer (/metrics) sees its counts.

    Takes children (labels() already applied, which costs as much as an increment)."""

    def __init__(self) -> None:
        self._counts: dict[Any, int] = {}
        self._sums: dict[Any, float] = {}                 # histogram child → sum of values
        self._buckets: dict[tuple[Any, int], int] = {}    # (child, bucket index) → count
        self._scheduled = False

    def inc(self, counter: Any) -> None:
        counts = self._counts
        counts[counter] = counts.get(counter, 0) + 1
        if not self._scheduled:
            self._schedule()

    def observe(self, histogram: Any, value: float) -> None:
        # The bucket observe() picks: the first upper bound >= value (the last one is +Inf).
        key = (histogram, bisect_left(histogram._upper_bounds, value))
        self._buckets[key] = self._buckets.get(key, 0) + 1
        self._sums[histogram] = self._sums.get(histogram, 0.0) + value
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the loop (a script, a test): at once
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        counts, self._counts = self._counts, {}
        sums, self._sums = self._sums, {}
        buckets, self._buckets = self._buckets, {}
        for counter, n in counts.items():
            counter.inc(n)
        # What Histogram.observe() writes per value, written once per tick here: its sum and
        # its buckets' values (tests/unit/test_metrics.py holds this to observe()'s result).
        for histogram, total in sums.items():
            histogram._sum.inc(total)
        for (histogram, index), n in buckets.items():
            histogram._buckets[index].inc(n)


TALLY = Tally()


def dropped(kind: str, reason: DropReason) -> None:
    EVENTS.labels(kind, "rejected").inc()
    EVENTS_DROPPED.labels(kind, reason.value).inc()


class _Figures:
    """The global figures of one scrape, as a collector."""

    def __init__(self, figures: Mapping[GlobalGauge, float]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        for gauge, value in self._figures.items():
            yield GaugeMetricFamily(gauge.name, gauge.documentation, value=value)


def render(figures: Mapping[GlobalGauge, float] | None = None) -> tuple[bytes, str]:
    """The text exposition of this process, or of every worker under multiprocess mode, with
    the global figures given (none: this instance does not export them)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)
    if figures:
        registry.register(_Figures(figures))
    return generate_latest(registry), CONTENT_TYPE_LATEST
