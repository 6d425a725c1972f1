"""Converting amounts at the operator's dated exchange rates (tracker/conversion/fx.py),
against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tracker.conversion.fx import AmountTooLarge, CurrencyUnsupported, FxRates, FxUnavailable
from tracker.storage import db
from tracker.storage import fx as store

from ..conftest import PgProxy, Running, eventually

D = date(2024, 5, 1)


@pytest_asyncio.fixture(loop_scope="session")
async def pool(backing: tuple[str, str], pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(backing[0])
    yield p
    await p.close()


async def rates(conn: asyncpg.Pool | asyncpg.Connection, day: date, base: str,
                **quotes: str) -> None:
    await store.upsert(conn, day, base, {q: Decimal(r) for q, r in quotes.items()})


async def test_the_same_currency_is_unchanged(pool: asyncpg.Pool) -> None:
    fx = FxRates(pool)
    assert await fx.convert(Decimal("12.345678"), "EUR", "EUR", D) == Decimal("12.345678")


async def test_a_direct_pair_multiplies_exactly(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "EUR", USD="1.1")
    fx = FxRates(pool)
    got = await fx.convert(Decimal("10"), "EUR", "USD", D)
    assert got == Decimal("11") and str(got) == "11.000000000"
    # 0.1 × 3 is 0.3 here, not 0.30000000000000004.
    await rates(pool, D, "EUR", GBP="0.1")
    assert str(await fx.convert(Decimal("3"), "EUR", "GBP", D)) == "0.300000000"


async def test_an_inverse_pair_divides(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "USD", EUR="0.8", TRY="3")
    fx = FxRates(pool)
    assert str(await fx.convert(Decimal("10"), "EUR", "USD", D)) == "12.500000000"
    # 1/3, rounded half-even at the ninth place.
    assert str(await fx.convert(Decimal("1"), "TRY", "USD", D)) == "0.333333333"
    assert str(await fx.convert(Decimal("2"), "TRY", "USD", D)) == "0.666666667"


async def test_via_a_common_base(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "USD", EUR="0.92", TRY="34.1")
    fx = FxRates(pool)
    with localcontext() as ctx:
        ctx.prec = 100
        expected = (Decimal("100") / Decimal("0.92") * Decimal("34.1")).quantize(Decimal("1e-9"))
    got = await fx.convert(Decimal("100"), "EUR", "TRY", D)
    assert got == expected and str(got) == "3706.521739130"
    assert str(await fx.convert(Decimal("3706.52"), "TRY", "EUR", D)) == "99.999953079"


async def test_rounding_is_half_even_at_the_ninth_place(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "EUR", USD="0.5")
    fx = FxRates(pool)
    assert str(await fx.convert(Decimal("0.000000001"), "EUR", "USD", D)) == "0E-9"
    assert str(await fx.convert(Decimal("0.000000003"), "EUR", "USD", D)) == "2E-9"
    assert await fx.convert(Decimal("0.000000005"), "EUR", "USD", D) == Decimal("0.000000002")


async def test_many_digits_are_kept_until_the_end(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "USD", JPY="151.123456789012", KWD="0.307654321098")
    fx = FxRates(pool)
    amount = Decimal("987654321012.345678")  # 12 + 6 digits, the most a postback may send
    with localcontext() as ctx:
        ctx.prec = 200
        exact = amount * Decimal("0.307654321098") / Decimal("151.123456789012")
    assert await fx.convert(amount, "JPY", "KWD", D) == exact.quantize(Decimal("1e-9"))


async def test_a_day_uses_the_latest_rate_dated_on_or_before_it(pool: asyncpg.Pool) -> None:
    await rates(pool, D - timedelta(days=3), "EUR", USD="1.05")
    await rates(pool, D, "EUR", USD="1.1")
    await rates(pool, D + timedelta(days=2), "EUR", USD="1.2")
    fx = FxRates(pool)

    async def at(day: date) -> str:
        return str(await fx.convert(Decimal("10"), "EUR", "USD", day))

    assert await at(D - timedelta(days=3)) == "10.500000000"
    assert await at(D - timedelta(days=1)) == "10.500000000"
    assert await at(D) == "11.000000000"
    assert await at(D + timedelta(days=1)) == "11.000000000"
    assert await at(D + timedelta(days=30)) == "12.000000000"
    with pytest.raises(CurrencyUnsupported):
        await at(D - timedelta(days=4))


async def test_the_freshest_path_wins(pool: asyncpg.Pool) -> None:
    await rates(pool, D - timedelta(days=10), "EUR", USD="1.0")
    await rates(pool, D, "USD", EUR="0.8")
    fx = FxRates(pool)
    # The inverse rate, set on D, beats the direct one set ten days before.
    assert str(await fx.convert(Decimal("10"), "EUR", "USD", D)) == "12.500000000"
    # Before D only the direct one was in force.
    day_before = D - timedelta(days=1)
    assert str(await fx.convert(Decimal("10"), "EUR", "USD", day_before)) == "10.000000000"
    # Same day: direct first.
    await rates(pool, D, "EUR", USD="1.3")
    assert str(await FxRates(pool).convert(Decimal("10"), "EUR", "USD", D)) == "13.000000000"


async def test_no_rate_path_is_unsupported(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "USD", EUR="0.92")
    await rates(pool, D, "GBP", TRY="40")
    fx = FxRates(pool)
    for source, target, missing in [("JPY", "USD", "JPY"), ("USD", "JPY", "JPY"),
                                    ("EUR", "TRY", "EUR"), ("CHF", "SEK", "CHF")]:
        with pytest.raises(CurrencyUnsupported) as info:
            await fx.convert(Decimal("1"), source, target, D)
        assert info.value.currency == missing
        assert f"from {source} to {target} on or before 2024-05-01" in str(info.value)


async def test_an_amount_too_large_to_store_is_refused(pool: asyncpg.Pool) -> None:
    await rates(pool, D, "USD", TRY="34.1")
    fx = FxRates(pool)
    assert await fx.convert(Decimal("29325513196.480938"), "USD", "TRY", D) < 10**12
    with pytest.raises(AmountTooLarge):
        await fx.convert(Decimal("999999999999.999999"), "USD", "TRY", D)


async def test_a_burst_costs_one_query(backing: tuple[str, str], pg: asyncpg.Connection) -> None:
    await rates(pg, D, "USD", EUR="0.92", TRY="34.1")
    proxy = PgProxy(backing[0])
    await proxy.start()
    pool = await db.create_pool(proxy.url)
    try:
        fx = FxRates(pool)
        await fx.convert(Decimal("1"), "USD", "TRY", D)  # the connection is made
        # What one lookup costs on the wire (the query, and the pool's reset on release).
        before = proxy.statements
        await fx.convert(Decimal("1"), "USD", "EUR", D)
        one_lookup = proxy.statements - before
        assert one_lookup >= 1

        before = proxy.statements
        got = await asyncio.gather(*(fx.convert(Decimal(i), "EUR", "TRY", D)
                                     for i in range(1, 201)))
        assert proxy.statements - before == one_lookup
        assert got[99] == (await fx.convert(Decimal(100), "EUR", "TRY", D))
        for i in range(200):
            await fx.convert(Decimal(i), "EUR", "TRY", D)
        assert proxy.statements - before == one_lookup
    finally:
        await pool.close()
        await proxy.stop()


async def test_a_put_is_seen_by_every_worker_within_a_second(
        service: Running, backing: tuple[str, str]) -> None:
    today = datetime.now(UTC).date()
    first = await db.create_pool(backing[0])
    second = await db.create_pool(backing[0])
    try:
        a, b = FxRates(first), FxRates(second)
        status, _ = await service.api("PUT", "/api/fx-rates",
                                      json={"base": "EUR", "rates": {"USD": "1.1"}})
        assert status == 200
        assert await a.convert(Decimal("10"), "EUR", "USD", today) == Decimal("11")
        put_at = time.monotonic()
        status, _ = await service.api("PUT", "/api/fx-rates",
                                      json={"base": "EUR", "rates": {"USD": "1.2", "GBP": "0.85"}})
        assert status == 200
        # A worker that had not looked the pair up asks PostgreSQL at once.
        assert await b.convert(Decimal("10"), "EUR", "USD", today) == Decimal("12")
        # A pair nobody knew a moment ago is asked for, not called unsupported.
        assert await a.convert(Decimal("10"), "EUR", "GBP", today) == Decimal("8.5")

        async def updated() -> bool:
            return await a.convert(Decimal("10"), "EUR", "USD", today) == Decimal("12")

        assert await eventually(updated, timeout=3)
        assert time.monotonic() - put_at < 1.5
    finally:
        await first.close()
        await second.close()


async def test_postgresql_away_uses_the_last_known_rate(
        backing: tuple[str, str], pg: asyncpg.Connection) -> None:
    await rates(pg, D, "USD", EUR="0.8")
    proxy = PgProxy(backing[0])
    await proxy.start()
    pool = await db.create_pool(proxy.url)
    try:
        fx = FxRates(pool, fresh_seconds=0.05)
        assert str(await fx.convert(Decimal("10"), "EUR", "USD", D)) == "12.500000000"
        await proxy.stop()
        await asyncio.sleep(0.1)
        for _ in range(3):
            assert str(await fx.convert(Decimal("10"), "EUR", "USD", D)) == "12.500000000"
            await asyncio.sleep(0.06)
        # A day that began during the outage: the rate of the latest day known before it.
        assert str(await fx.convert(Decimal("1"), "EUR", "USD", D + timedelta(days=1))) == \
            "1.250000000"
        # Never looked up: there is nothing to fall back on.
        with pytest.raises(FxUnavailable):
            await fx.convert(Decimal("10"), "USD", "EUR", D)
        with pytest.raises(FxUnavailable):
            await fx.convert(Decimal("10"), "EUR", "USD", D - timedelta(days=1))
    finally:
        pool.terminate()
        await proxy.stop()


class SlowAfterFirst:
    """A pool whose first query answers and every later one hangs (PostgreSQL slowed down
    to a crawl, or gone without refusing connections)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.queries = 0
        self.release = asyncio.Event()

    async def fetch(self, *args: Any) -> list[dict[str, Any]]:
        self.queries += 1
        if self.queries > 1:
            await self.release.wait()
        return self.rows


async def test_a_hanging_postgresql_is_not_waited_for_past_the_bound() -> None:
    slow = SlowAfterFirst([{"base": "USD", "quote": "EUR", "rate": Decimal("0.8"), "day": D}])
    fx = FxRates(slow, fresh_seconds=0.01, refresh_wait=0.2)  # type: ignore[arg-type]
    assert await fx.convert(Decimal("10"), "EUR", "USD", D) == Decimal("12.5")
    await asyncio.sleep(0.02)
    started = time.monotonic()
    got = await asyncio.gather(*(fx.convert(Decimal("10"), "EUR", "USD", D) for _ in range(50)))
    assert set(got) == {Decimal("12.5")}
    assert time.monotonic() - started < 0.5
    # One hanging query for all of them; later ones do not wait at all once the bound passed.
    assert slow.queries == 2
    started = time.monotonic()
    await fx.convert(Decimal("10"), "EUR", "USD", D)
    assert time.monotonic() - started < 0.05
    assert slow.queries == 2
    slow.release.set()  # the hanging query answers at last, and is what the cache holds
    await asyncio.sleep(0.01)
    assert await fx.convert(Decimal("10"), "EUR", "USD", D) == Decimal("12.5")
