"""Several `tracker serve` instances on one Redis, as behind a load balancer: a figure of the
whole deployment (the shared stream's backlog) is exported by exactly one of them, so that a
sum across instances counts it once; when that one leaves, another takes over."""

from __future__ import annotations

import uuid
from pathlib import Path

import aiohttp
import pytest

from ..api.test_ops import samples
from ..conftest import Served, eventually

GLOBAL = ("tracker_write_backlog_events", "tracker_write_backlog_oldest_age_seconds",
          "tracker_write_backlog_limit_events")
SCRAPES = 6


async def exports(http: aiohttp.ClientSession, served: Served) -> list[bool]:
    """For each of SCRAPES scrapes (each on a new connection, so that they reach different
    workers of the instance): whether it exported the global gauges, all or none."""
    found = []
    for _ in range(SCRAPES):
        async with http.get(f"{served.base}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        present = {family for family in GLOBAL if samples(text, family)}
        assert present in (set(), set(GLOBAL)), present
        found.append(bool(present))
    return found


@pytest.mark.slow
async def test_the_global_gauges_are_exported_by_exactly_one_instance(
        backing: tuple[str, str], tmp_path: Path) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}:"
    one = Served(backing, tmp_path / "one", prefix=prefix, TRACKER_WORKERS="2")
    two = Served(backing, tmp_path / "two", prefix=prefix, TRACKER_WORKERS="2")
    try:
        await one.healthy()
        await two.healthy()
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as http:

            async def census() -> tuple[Served, Served] | None:
                """(holder, the other) once every scrape of one exports and none of the
                other does."""
                first, second = await exports(http, one), await exports(http, two)
                if all(first) and not any(second):
                    return one, two
                if all(second) and not any(first):
                    return two, one
                return None

            settled = await eventually(census, timeout=20)
            assert settled, "never exactly one instance exporting the global gauges"
            holder, other = settled
            # It stays so: the holder renews its lease, the other does not take it.
            assert await census() == (holder, other)

            # /readyz's backlog check works on every instance, holder or not.
            for served in (holder, other):
                async with http.get(f"{served.base}/readyz") as r:
                    body = await r.json()
                    assert r.status == 200 and body["backlog"]["events"] == 0, body

            async def taken_over() -> bool:
                return all(await exports(http, other))

            holder.stop()
            assert await eventually(taken_over, timeout=20), "the other instance never took over"
    finally:
        await one.close()
        await two.close()
