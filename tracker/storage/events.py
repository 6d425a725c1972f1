"""Writing a batch of clicks and impressions exactly once, in the caller's transaction.

A batch is nearly always new. Its rows are COPYed straight into the partitioned tables, and
the rollup deltas are summed here from the rows as they stream out and upserted in one
statement: no staging, no second pass over the rows in PostgreSQL. The COPY goes out in
pieces of CHUNK rows (text format, storage/rows.py), so PostgreSQL parses and indexes the
first rows while Python builds the next.

A batch written before (the writer died between COMMIT and XACK; two writers held the same
entries; the same event twice in one batch) meets its own rows: the COPY fails with
unique_violation and `write` raises Replayed. The caller rolls its transaction back and
calls again with replayed=True: the rows then go through INSERT ... ON CONFLICT DO NOTHING
RETURNING, and only those really inserted are folded. A replay inserts nothing twice and
folds nothing twice.

No session state: no temp table, nothing prepared that a later transaction relies on, so
the writer's connection may come through PgBouncer in transaction mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import asyncpg

from . import rows
from .rows import CLICK_COLUMNS, IMPRESSION_COLUMNS, BadEvent

DIMS = "pub, sub1, sub2, sub3, sub4, sub5, country, device"
BUCKET = "date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
BUCKET_MS = 15 * 60 * 1000

# Rollup rows are locked in this order by both roads (ORDER BY the key's columns), so that
# writers in several workers never deadlock on them.
_FOLD_ORDER = "ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"
_FOLD_CONFLICT = """ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
        impressions = r.impressions + excluded.impressions,
        bot_impressions = r.bot_impressions + excluded.bot_impressions,
        clicks = r.clicks + excluded.clicks,
        unique_clicks = r.unique_clicks + excluded.unique_clicks,
        bot_clicks = r.bot_clicks + excluded.bot_clicks,
        cost = r.cost + excluded.cost"""
_ROLLUP_COLUMNS = (f"bucket, campaign_id, {DIMS}, impressions, bot_impressions, clicks, "
                   "unique_clicks, bot_clicks, cost")

# A new batch's deltas, summed in Python (Rollup), one array per column.
FOLD = f"""
INSERT INTO rollup_15m AS r ({_ROLLUP_COLUMNS})
SELECT bucket, campaign_id, {DIMS}, impressions, bot_impressions, clicks, unique_clicks,
       bot_clicks, cost::numeric
FROM unnest($1::timestamptz[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::bigint[],
            $13::bigint[], $14::bigint[], $15::bigint[], $16::text[])
     AS d ({_ROLLUP_COLUMNS})
{_FOLD_ORDER}
{_FOLD_CONFLICT}
"""

_TYPES = {"id": "uuid", "ts": "timestamptz", "campaign_id": "bigint", "ip": "inet",
          "is_unique": "boolean", "is_bot": "boolean", "cost": "numeric"}


def _unnest(columns: tuple[str, ...], first: int) -> str:
    """The rows, from one text[] parameter per column ($first on), cast to their types."""
    arrays = ", ".join(f"${first + i}::text[]" for i in range(len(columns)))
    casts = ", ".join(f"{c}::{_TYPES[c]}" if c in _TYPES else c for c in columns)
    return f"(SELECT {casts} FROM unnest({arrays}) AS incoming ({', '.join(columns)})) AS rows"


# The replayed road: both tables inserted and folded in ONE statement, only the rows really
# inserted reaching the fold.
INSERT_AND_FOLD = f"""
WITH new_clicks AS (
    INSERT INTO clicks ({", ".join(CLICK_COLUMNS)})
    SELECT * FROM {_unnest(CLICK_COLUMNS, 1)}
    ON CONFLICT DO NOTHING
    RETURNING ts, campaign_id, {DIMS}, is_unique, is_bot, cost
), new_impressions AS (
    INSERT INTO impressions ({", ".join(IMPRESSION_COLUMNS)})
    SELECT * FROM {_unnest(IMPRESSION_COLUMNS, len(CLICK_COLUMNS) + 1)}
    ON CONFLICT DO NOTHING
    RETURNING ts, campaign_id, {DIMS}, is_bot, cost
), new_events AS (
    SELECT ts, campaign_id, {DIMS}, true AS is_click, is_unique, is_bot, cost FROM new_clicks
    UNION ALL
    SELECT ts, campaign_id, {DIMS}, false, false, is_bot, cost FROM new_impressions
), folded AS (
    INSERT INTO rollup_15m AS r ({_ROLLUP_COLUMNS})
    SELECT {BUCKET}, campaign_id, {DIMS},
           count(*) FILTER (WHERE NOT is_click AND NOT is_bot),
           count(*) FILTER (WHERE NOT is_click AND is_bot),
           count(*) FILTER (WHERE is_click AND NOT is_bot),
           count(*) FILTER (WHERE is_click AND is_unique AND NOT is_bot),
           count(*) FILTER (WHERE is_click AND is_bot),
           coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0)
    FROM new_events
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    {_FOLD_ORDER}
    {_FOLD_CONFLICT}
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_clicks), (SELECT count(*) FROM new_impressions)
"""

INSERT_DEAD_LETTER = "INSERT INTO dead_letters (stream_id, payload, error) VALUES ($1, $2, $3)"


class Replayed(Exception):
    """Some of the batch's rows are stored already: roll back, write it again with
    replayed=True."""


@dataclass
class Written:
    clicks: int = 0
    impressions: int = 0
    # (the caller's key of an event, why it can never be stored): for dead_letters.
    refused: list[tuple[Any, str]] = field(default_factory=list)


# Rows per piece of a COPY: PostgreSQL starts on a piece while the next is being built.
CHUNK = 500

# (campaign_id, pub, sub1..sub5, country, device) of a row.
_CLICK_KEY = itemgetter(2, 4, 5, 6, 7, 8, 9, rows.CLICK_COUNTRY, rows.CLICK_COUNTRY + 1)
_IMPRESSION_KEY = itemgetter(2, 4, 5, 6, 7, 8, 9, rows.IMPRESSION_COUNTRY,
                             rows.IMPRESSION_COUNTRY + 1)
_NANOS: dict[str, int] = {}


def _nanos(cost: str) -> int:
    """A cost (checked text, at most 9 decimals) in units of 10⁻⁹: sums stay exact and
    cheap."""
    found = _NANOS.get(cost)
    if found is None:
        whole, _, frac = cost.partition(".")
        if len(_NANOS) >= 10_000:
            _NANOS.clear()
        found = _NANOS[cost] = int(whole + frac.ljust(9, "0"))
    return found


class Rollup:
    """What the fold would compute from the rows, summed as they go by: per 15-minute bucket,
    campaign and dimensions, [impressions, bot impressions, clicks, unique clicks, bot
    clicks, cost in nanos]."""

    def __init__(self) -> None:
        self._rows: dict[tuple[Any, ...], list[int]] = {}
        self.clicks = 0
        self.impressions = 0

    def _row(self, row: tuple[Any, ...], key: Callable[..., tuple[Any, ...]]) -> list[int]:
        ms = int(row[0][:12], 16)
        group = (ms - ms % BUCKET_MS, *key(row))
        counts = self._rows.get(group)
        if counts is None:
            counts = self._rows[group] = [0, 0, 0, 0, 0, 0]
        return counts

    def click(self, row: tuple[Any, ...]) -> None:
        self.clicks += 1
        counts = self._row(row, _CLICK_KEY)
        if row[rows.CLICK_BOT] == "t":  # counted apart, never billed
            counts[4] += 1
        else:
            counts[2] += 1
            counts[3] += row[rows.CLICK_UNIQUE] == "t"
            counts[5] += _nanos(row[rows.CLICK_COST])

    def impression(self, row: tuple[Any, ...]) -> None:
        self.impressions += 1
        counts = self._row(row, _IMPRESSION_KEY)
        if row[rows.IMPRESSION_BOT] == "t":
            counts[1] += 1
        else:
            counts[0] += 1
            counts[5] += _nanos(row[rows.IMPRESSION_COST])

    def __bool__(self) -> bool:
        return bool(self._rows)

    def arrays(self) -> list[list[Any]]:
        """FOLD's parameters."""
        columns: list[list[Any]] = [[] for _ in range(16)]
        for (bucket, campaign_id, *dims), counts in self._rows.items():
            values = (datetime.fromtimestamp(bucket / 1000, UTC), int(campaign_id), *dims,
                      *counts[:5], f"{counts[5] // 10**9}.{counts[5] % 10**9:09d}")
            for column, value in zip(columns, values):
                column.append(value)
        return columns


async def _copy_text(events: Sequence[tuple[Any, dict[str, Any]]],
                     build: Callable[..., tuple[Any, ...]], refused: list[tuple[Any, str]],
                     seen: Callable[[tuple[Any, ...]], None]) -> AsyncIterator[bytes]:
    """COPY's text format for (key, event) pairs, CHUNK rows a piece, built as the COPY asks
    for them; the events that can never be stored are set aside in `refused`."""
    lines: list[str] = []
    for key, event in events:
        try:
            row = build(event, copy=True)
        except BadEvent as exc:
            refused.append((key, repr(exc)))
            continue
        seen(row)
        lines.append("\t".join(row))
        if len(lines) >= CHUNK:
            lines.append("")
            yield "\n".join(lines).encode()
            lines = []
    if lines:
        lines.append("")
        yield "\n".join(lines).encode()


async def write(conn: asyncpg.Connection, clicks: Sequence[tuple[Any, dict[str, Any]]],
                impressions: Sequence[tuple[Any, dict[str, Any]]], *,
                replayed: bool = False) -> Written:
    """Store a batch of (key, event) pairs inside the caller's transaction. Raises Replayed
    when some of the rows exist (the transaction is then aborted: roll it back and call
    again with replayed=True)."""
    written = Written()
    if replayed:
        return await _insert_new(conn, clicks, impressions, written)
    rollup = Rollup()
    try:
        if clicks:
            await conn.copy_to_table(
                "clicks", columns=CLICK_COLUMNS, format="text",
                source=_copy_text(clicks, rows.click_row, written.refused, rollup.click))
        if impressions:
            await conn.copy_to_table(
                "impressions", columns=IMPRESSION_COLUMNS, format="text",
                source=_copy_text(impressions, rows.impression_row, written.refused,
                                  rollup.impression))
    except asyncpg.UniqueViolationError as exc:
        raise Replayed(str(exc)) from exc
    if rollup:
        await conn.execute(FOLD, *rollup.arrays())
    written.clicks, written.impressions = rollup.clicks, rollup.impressions
    return written


async def _insert_new(conn: asyncpg.Connection, clicks: Sequence[tuple[Any, dict[str, Any]]],
                      impressions: Sequence[tuple[Any, dict[str, Any]]],
                      written: Written) -> Written:
    click_rows = _built(clicks, rows.click_row, written.refused)
    impression_rows = _built(impressions, rows.impression_row, written.refused)
    if click_rows or impression_rows:
        row = await conn.fetchrow(INSERT_AND_FOLD, *_columns(click_rows, len(CLICK_COLUMNS)),
                                  *_columns(impression_rows, len(IMPRESSION_COLUMNS)))
        written.clicks, written.impressions = int(row[0]), int(row[1])
    return written


def _built(events: Sequence[tuple[Any, dict[str, Any]]], build: Callable[..., tuple[Any, ...]],
           refused: list[tuple[Any, str]]) -> list[tuple[Any, ...]]:
    built = []
    for key, event in events:
        try:
            built.append(build(event))
        except BadEvent as exc:
            refused.append((key, repr(exc)))
    return built


def _columns(built: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*built)] if built else [[] for _ in range(width)]


async def dead_letters(conn: asyncpg.Connection, kept: Sequence[tuple[str, str, str]]) -> None:
    """Keep (stream id, payload, error) of events refused for good."""
    await conn.executemany(INSERT_DEAD_LETTER, [(i, p, e[:2000]) for i, p, e in kept])
