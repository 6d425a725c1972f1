"""A conversion's touches as PostgreSQL finds them: the visitor's clicks and the customer's
clicks on other devices in the window, nothing else; both indexes used, partitions pruned."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import asyncpg

from tracker.ids import decode_id, new_id
from tracker.storage import attribution as store

CONVERTED = datetime(2022, 6, 30, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)

INSERT = """
INSERT INTO clicks (id, ts, campaign_id, visitor_id, customer_id, pub, sub1, is_unique, is_bot,
                    destination)
VALUES ($1, $2, $3, $4, $5, $6, $7, true, $8, 'https://shop.example/')
"""


CHILDREN = "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = $1::regclass"
NOISE = """
INSERT INTO clicks (id, ts, campaign_id, visitor_id, customer_id, is_unique, is_bot, destination)
SELECT gen_random_uuid(), '2021-03-01'::timestamptz + (g % 1728) * interval '1000 seconds',
       1, 'v' || g, CASE WHEN g % 3 = 0 THEN 'c' || g ELSE '' END, true, false, 'x'
FROM generate_series(1, 4000) g
"""


async def click(pg: asyncpg.Connection, visitor: str, ts: datetime, *, customer: str = "",
                bot: bool = False, campaign_id: int = 1, pub: str = "", sub1: str = "") -> str:
    """Store a click made at `ts` (to the millisecond, as ids are) straight into PostgreSQL;
    return its id."""
    click_id = str(new_id(int(ts.timestamp() * 1000)))
    click_uuid, at = decode_id(click_id)
    await pg.execute(INSERT, click_uuid, at, campaign_id, visitor, customer, pub, sub1, bot)
    return click_id


async def found(pg: asyncpg.Connection, visitor: str, customer: str = "",
                before: datetime = CONVERTED, lookback: timedelta = WINDOW,
                limit: int = 1000) -> list[str]:
    return [t.click_id for t in await store.touches(pg, visitor, customer, before, lookback, limit)]


async def test_the_visitors_clicks_in_the_window_oldest_first(pg: asyncpg.Connection) -> None:
    oldest = await click(pg, "v1", CONVERTED - timedelta(days=29), campaign_id=7, pub="news",
                         sub1="banner")
    middle = await click(pg, "v1", CONVERTED - timedelta(days=3), campaign_id=8)
    latest = await click(pg, "v1", CONVERTED - timedelta(minutes=5), campaign_id=7)
    await click(pg, "v1", CONVERTED - timedelta(days=31))        # before the window
    await click(pg, "v1", CONVERTED + timedelta(minutes=1))      # after the conversion
    await click(pg, "v1", CONVERTED - timedelta(days=2), bot=True)
    await click(pg, "v2", CONVERTED - timedelta(days=1))         # somebody else

    touches = await store.touches(pg, "v1", "", CONVERTED, WINDOW)

    assert [t.click_id for t in touches] == [oldest, middle, latest]
    first = touches[0]
    assert (first.ts, first.campaign_id, first.pub, first.sub1, first.is_bot) == (
        CONVERTED - timedelta(days=29), 7, "news", "banner", False)


async def test_the_customers_clicks_on_another_device_are_touches(pg: asyncpg.Connection) -> None:
    # The phone's clicks carried the customer id; the laptop converts as the same customer.
    phone = await click(pg, "phone", CONVERTED - timedelta(days=10), customer="cust-1")
    laptop = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    also_laptop = await click(pg, "laptop", CONVERTED - timedelta(hours=2), customer="cust-1")
    await click(pg, "phone", CONVERTED - timedelta(days=9))      # no customer id on it
    await click(pg, "tablet", CONVERTED - timedelta(days=8), customer="cust-2")
    await click(pg, "phone", CONVERTED - timedelta(days=40), customer="cust-1")  # too old
    await click(pg, "phone", CONVERTED - timedelta(days=5), customer="cust-1", bot=True)

    assert await found(pg, "laptop", "cust-1") == [phone, laptop, also_laptop]
    # Found once though both the visitor and the customer match it.
    assert (await found(pg, "laptop", "cust-1")).count(also_laptop) == 1


async def test_an_empty_customer_id_links_nobody(pg: asyncpg.Connection) -> None:
    own = await click(pg, "v1", CONVERTED - timedelta(days=1))
    await click(pg, "v2", CONVERTED - timedelta(days=1))
    await click(pg, "v3", CONVERTED - timedelta(days=2))
    assert await found(pg, "v1", "") == [own]


async def test_an_empty_visitor_id_links_nobody(pg: asyncpg.Connection) -> None:
    mine = await click(pg, "phone", CONVERTED - timedelta(days=1), customer="cust-1")
    await click(pg, "", CONVERTED - timedelta(days=2))
    assert await found(pg, "", "cust-1") == [mine]
    assert await found(pg, "", "") == []


async def test_the_window_includes_both_ends(pg: asyncpg.Connection) -> None:
    start = CONVERTED - WINDOW
    milli = timedelta(milliseconds=1)
    at_start = await click(pg, "v1", start)
    at_conversion = await click(pg, "v1", CONVERTED)
    await click(pg, "v1", start - milli)
    await click(pg, "v1", CONVERTED + milli)
    assert await found(pg, "v1") == [at_start, at_conversion]
    assert await found(pg, "v1", lookback=timedelta(days=7)) == [at_conversion]


async def test_past_the_limit_the_touches_nearest_the_conversion_are_kept(
        pg: asyncpg.Connection) -> None:
    ids = [await click(pg, "v1", CONVERTED - timedelta(days=d)) for d in (5, 4, 3, 2, 1)]
    assert await found(pg, "v1", limit=3) == ids[2:]


async def test_the_lookup_uses_both_indexes_and_reads_only_the_windows_days(
        pg: asyncpg.Connection) -> None:
    days = [date(2021, 3, 1) + timedelta(days=i) for i in range(20)]
    for day in days:
        await pg.execute("SELECT tracker_create_partition('clicks', $1)", day)
    # Other people's clicks, so that an index is worth something.
    await pg.execute(NOISE)
    await pg.execute("ANALYZE clicks")
    before = datetime(2021, 3, 10, 12, tzinfo=UTC)
    args = ("v1", "cust-1", before - timedelta(days=3), before, 1000)
    window = {f"clicks_{day:%Y%m%d}" for day in days
              if date(2021, 3, 7) <= day <= date(2021, 3, 10)}
    visitor_indexes = {r[0] for r in await pg.fetch(CHILDREN, "clicks_visitor")}
    customer_indexes = {r[0] for r in await pg.fetch(CHILDREN, "clicks_customer")}
    partitions = len(await pg.fetch(CHILDREN, "clicks"))

    async with pg.transaction():
        # Which plan is cheapest on a few thousand rows says little about ten million: this
        # proves the indexes can serve the query (both arms of the OR), not that they always
        # win.
        await pg.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await pg.fetch("EXPLAIN " + store.TOUCHES, *args))
    scanned = set(re.findall(r"\bclicks_\w+", plan))
    assert {name for name in scanned if re.fullmatch(r"clicks_\d{8}", name)} == window, plan
    assert "clicks_default" not in scanned and "Seq Scan" not in plan, plan
    for part in window:  # both indexes, in every day of the window
        assert any(i.startswith(part + "_") for i in scanned & visitor_indexes), plan
        assert any(i.startswith(part + "_") for i in scanned & customer_indexes), plan

    # A reused (generic) plan cannot know the window when it is made: it prunes as it runs.
    async with pg.transaction():
        await pg.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await pg.execute("PREPARE touches_generic(text, text, timestamptz, timestamptz, int) AS "
                         + store.TOUCHES)
        rows = await pg.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE touches_generic('v1', "
                              f"'cust-1', '{args[2].isoformat()}', '{before.isoformat()}', 1000)")
        await pg.execute("DEALLOCATE touches_generic")
    generic = "\n".join(r[0] for r in rows)
    assert f"Subplans Removed: {partitions - len(window)}" in generic, generic
    assert {name for name in re.findall(r"\bclicks_\w+", generic)
            if re.fullmatch(r"clicks_\d{8}", name)} == window, generic
