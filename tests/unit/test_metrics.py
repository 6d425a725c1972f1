"""The hot path's counts reach prometheus_client once per event-loop tick (metrics.Tally),
with the same values as an increment or observe() per request."""

from __future__ import annotations

import asyncio
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram

from tracker.metrics import LATENCY_BUCKETS, Tally

VALUES = [0.00005, 0.0001, 0.0003, 0.001, 0.001, 0.0011, 0.07, 4.9, 5.0, 7.5, 0.0]


def samples(metric: Counter | Histogram) -> list[tuple[str, list[tuple[str, str]], float]]:
    return sorted((s.name.split("_", 2)[-1], sorted(s.labels.items()), s.value)
                  for family in metric.collect() for s in family.samples
                  if not s.name.endswith("_created"))


async def test_a_tick_of_counts_is_what_one_call_per_request_writes() -> None:
    registry = CollectorRegistry()
    name = f"t{uuid.uuid4().hex[:8]}"
    direct_h = Histogram(f"{name}_a_seconds", "", ["route"], buckets=LATENCY_BUCKETS,
                         registry=registry)
    tallied_h = Histogram(f"{name}_b_seconds", "", ["route"], buckets=LATENCY_BUCKETS,
                          registry=registry)
    direct_c = Counter(f"{name}_a_total", "", ["route"], registry=registry)
    tallied_c = Counter(f"{name}_b_total", "", ["route"], registry=registry)
    tally = Tally()
    for value in VALUES:
        for route in ("x", "y"):
            direct_h.labels(route).observe(value)
            tally.observe(tallied_h.labels(route), value)
        direct_c.labels("x").inc()
        tally.inc(tallied_c.labels("x"))
    await asyncio.sleep(0)  # the tick's counts are written by the next one
    assert samples(tallied_h) == samples(direct_h)
    assert samples(tallied_c) == samples(direct_c)
    # And again: a later tick adds to what is there.
    tally.inc(tallied_c.labels("x"))
    direct_c.labels("x").inc()
    await asyncio.sleep(0)
    assert samples(tallied_c) == samples(direct_c)


def test_outside_an_event_loop_counts_are_written_at_once() -> None:
    registry = CollectorRegistry()
    counter = Counter(f"t{uuid.uuid4().hex[:8]}_total", "", registry=registry)
    Tally().inc(counter)
    assert samples(counter)[0][2] == 1.0
