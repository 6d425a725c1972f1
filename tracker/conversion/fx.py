"""Revenue in the campaign's currency: a conversion's amount converted at the operator's
exchange rates of the conversion's day (PUT /api/fx-rates).

On day D a pair's rate is the latest one dated D or before. From A to B, the rate may be
stored directly (1 A = r B: multiply), inversely (1 B = r A: divide), or against a common base
(1 X = a A and 1 X = b B: amount / a × b). When several of those exist, the freshest wins
(the one whose oldest rate is the most recent), then direct, inverse, common base, and the
base first in alphabetical order: a rate set today beats a stale direct one.

Decimal arithmetic only: the product of an amount and a rate is exact (at most 42 digits), so
the one division is the one rounding, at 50 digits, before the result is rounded half-even
to the 9 places a conversion's revenue keeps.

Each worker keeps what it looked up for FRESH_SECONDS per (pair, day), so a burst of
postbacks costs one query, and a PUT on any worker is seen by every worker within that time.
A pair not known, or no longer fresh, is always asked of PostgreSQL before it is called
unsupported: a PUT followed at once by a postback on another worker works. When PostgreSQL
does not answer (or not within REFRESH_WAIT_SECONDS), the last rate this worker knew for the
pair is used; with none, FxUnavailable (the caller answers 503 and the network tries again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from typing import Any

import asyncpg

from .. import metrics, money
from ..storage import fx as store
from ..storage.db import UNREACHABLE

FRESH_SECONDS = 1.0
# A refresh that takes longer than this (PostgreSQL slowed down, or gone without refusing
# connections) is not waited for when a last known rate exists.
REFRESH_WAIT_SECONDS = 0.5
# (pair, day) entries kept: far more than the pairs and days a worker converts in a day.
MAX_ENTRIES = 10_000

CONTEXT = Context(prec=50, rounding=ROUND_HALF_EVEN,
                  traps=[InvalidOperation, DivisionByZero, Overflow])
PLACES = Decimal(1).scaleb(-money.EVENT_PLACES)
# conversions.revenue is numeric(21, 9): 12 digits before the point.
LIMIT = Decimal(10) ** money.INTEGER_DIGITS

Key = tuple[str, str, date]


class CurrencyUnsupported(LookupError):
    """No rate path between the two currencies on or before that day; `currency` is the one
    without any rate (the source currency when both have some but no path joins them)."""

    def __init__(self, currency: str, message: str = "") -> None:
        super().__init__(message or f"no exchange rate for {currency}")
        self.currency = currency


class FxUnavailable(Exception):
    """PostgreSQL did not answer and this worker knows no rate for the pair: try later."""


class AmountTooLarge(ValueError):
    """The converted amount has more than 12 digits before the point: it cannot be stored."""


@dataclass(frozen=True, slots=True)
class RatePath:
    """How to convert: amount × multiply / divide. `day`: the oldest date of its rates."""

    multiply: Decimal | None
    divide: Decimal | None
    day: date

    def apply(self, amount: Decimal) -> Decimal:
        value = amount
        if self.multiply is not None:
            value = CONTEXT.multiply(value, self.multiply)
        if self.divide is not None:
            value = CONTEXT.divide(value, self.divide)
        if CONTEXT.abs(value) >= LIMIT:
            raise AmountTooLarge(f"{amount} converts to {value:f}, more than "
                                 f"{money.INTEGER_DIGITS} digits before the point")
        return value.quantize(PLACES, context=CONTEXT)


# Among paths of the same freshness: direct, then inverse, then a common base.
_DIRECT, _INVERSE, _VIA = 0, 1, 2


def choose(rows: Sequence[Any], from_currency: str, to_currency: str) -> RatePath | None:
    """The path from one currency to the other among the rates in force (rows of base,
    quote, rate, day); None when there is none."""
    rates: dict[tuple[str, str], tuple[Decimal, date]] = {
        (r["base"], r["quote"]): (r["rate"], r["day"]) for r in rows}
    found: list[tuple[int, int, str, RatePath]] = []
    if (direct := rates.get((from_currency, to_currency))) is not None:
        found.append((-direct[1].toordinal(), _DIRECT, "", RatePath(direct[0], None, direct[1])))
    if (inverse := rates.get((to_currency, from_currency))) is not None:
        found.append((-inverse[1].toordinal(), _INVERSE, "",
                      RatePath(None, inverse[0], inverse[1])))
    for (base, quote), (rate_from, day_from) in rates.items():
        if quote != from_currency or (base, to_currency) not in rates:
            continue
        rate_to, day_to = rates[(base, to_currency)]
        oldest = min(day_from, day_to)
        found.append((-oldest.toordinal(), _VIA, base, RatePath(rate_to, rate_from, oldest)))
    if not found:
        return None
    return min(found, key=lambda f: f[:3])[3]


class FxRates:
    """One worker's view of the exchange rates; see the module's docstring."""

    def __init__(self, pool: asyncpg.Pool, *, fresh_seconds: float = FRESH_SECONDS,
                 refresh_wait: float = REFRESH_WAIT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._fresh_seconds = fresh_seconds
        self._refresh_wait = refresh_wait
        self._clock = clock
        # (from, to, day) → (path, when the query that found it started). Kept past its
        # freshness: it is the last known rate when PostgreSQL is away.
        self._known: dict[Key, tuple[RatePath, float]] = {}
        # Lookups under way: concurrent conversions of one pair and day share one query.
        self._loading: dict[Key, tuple[asyncio.Task[RatePath], float]] = {}
        # Entries found before this moment are stale (this worker's own PUT: see forget).
        self._fresh_after = float("-inf")
        # After PostgreSQL failed to answer, last known rates are used without asking again
        # until this moment: a burst during an outage costs one failed query, not one each.
        self._down_until = float("-inf")

    async def convert(self, amount: Decimal, from_currency: str, to_currency: str,
                      day: date) -> Decimal:
        if from_currency == to_currency:
            return amount
        path = await self._path((from_currency, to_currency, day))
        return path.apply(amount)

    def forget(self) -> None:
        """Ask PostgreSQL again at the next conversion (after a PUT on this worker); the last
        known rates stay for an outage."""
        self._fresh_after = self._clock()
        self._loading.clear()

    async def _path(self, key: Key) -> RatePath:
        now = self._clock()
        known = self._known.get(key)
        if known is not None and known[1] >= self._fresh_after \
                and now - known[1] < self._fresh_seconds:
            return known[0]
        last = known[0] if known is not None else self._last_known(key)
        if last is not None and now < self._down_until:
            return last
        loading = self._loading.get(key)
        if loading is None:
            task = asyncio.create_task(self._load(key, now))
            task.add_done_callback(lambda done: self._loaded(key, done))
            loading = self._loading[key] = (task, now)
        task, started = loading
        # Waited on, never awaited: a waiter that is cancelled must not cancel the query the
        # others wait on too.
        timeout = None if last is None else max(0.0, started + self._refresh_wait - now)
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            assert last is not None
            return last
        try:
            return task.result()
        except UNREACHABLE as exc:
            if last is None:
                from_currency, to_currency, day = key
                raise FxUnavailable(f"PostgreSQL did not answer and no rate from "
                                    f"{from_currency} to {to_currency} is known for {day}") from exc
            return last

    async def _load(self, key: Key, started: float) -> RatePath:
        from_currency, to_currency, day = key
        try:
            rows = await store.touching(self._pool, day, [from_currency, to_currency])
        except UNREACHABLE:
            metrics.BACKEND_ERRORS.labels("postgres").inc()
            self._down_until = self._clock() + self._fresh_seconds
            raise
        path = choose(rows, from_currency, to_currency)
        if path is None:
            known = {currency for row in rows for currency in (row["base"], row["quote"])}
            missing = to_currency if from_currency in known and to_currency not in known \
                else from_currency
            raise CurrencyUnsupported(missing, f"no exchange rate from {from_currency} to "
                                               f"{to_currency} on or before {day}")
        self._remember(key, path, started)
        return path

    def _loaded(self, key: Key, task: asyncio.Task[RatePath]) -> None:
        loading = self._loading.get(key)
        if loading is not None and loading[0] is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone (a timeout, a cancel)

    def _remember(self, key: Key, path: RatePath, started: float) -> None:
        current = self._known.get(key)
        if current is not None and current[1] > started:
            return  # a lookup that started later has answered already
        self._known.pop(key, None)  # to the end of the eviction order
        self._known[key] = (path, started)
        if len(self._known) > MAX_ENTRIES:
            del self._known[next(iter(self._known))]

    def _last_known(self, key: Key) -> RatePath | None:
        """The rate last found for this pair on the latest day up to this one (a day that
        began during an outage is converted at the rate of the day before)."""
        from_currency, to_currency, day = key
        best: tuple[date, RatePath] | None = None
        for (f, t, d), (path, _) in self._known.items():
            if f == from_currency and t == to_currency and d <= day \
                    and (best is None or d > best[0]):
                best = (d, path)
        return best[1] if best is not None else None
