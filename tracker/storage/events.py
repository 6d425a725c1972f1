"""Writing a batch of clicks and impressions exactly once, in the caller's transaction.

A batch is nearly always new. Its rows are COPYed straight into the partitioned tables: the
hot path's lines as they came from the stream (storage/lines.py: no Python touches a row on
the way), and the rows of JSON events (a tool's replay, an older stream) built by
storage/rows.py. PostgreSQL folds what each statement inserted into the rollups
(sql/008_fold_in_postgres.sql: a statement trigger over the inserted rows, on while the
writer's transaction says so): no staging, no second pass over the rows in Python.

A batch written before (the writer died between COMMIT and XACK; two writers held the same
entries; the same event twice in one batch) meets its own rows: the COPY fails with
unique_violation and `write` raises Replayed. The caller rolls its transaction back and
calls again with replayed=True: the rows then go through INSERT ... ON CONFLICT DO NOTHING,
and only those really inserted reach the trigger. A replay inserts nothing twice and folds
nothing twice.

No session state: no temp table, nothing prepared that a later transaction relies on (the
fold's setting is the transaction's own), so the writer's connection may come through
PgBouncer in transaction mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import rows
from .lines import CLICK_COLUMNS, IMPRESSION_COLUMNS, values
from .rows import BadEvent

# The writer's transactions fold what they insert (sql/008); nobody else's do.
FOLD_ON = "SELECT set_config('tracker.fold', 'on', true)"

_TYPES = {"id": "uuid", "ts": "timestamptz", "campaign_id": "bigint", "ip": "inet",
          "is_unique": "boolean", "is_bot": "boolean", "cost": "numeric"}


def _unnest(columns: tuple[str, ...], first: int) -> str:
    """The rows, from one text[] parameter per column ($first on), cast to their types."""
    arrays = ", ".join(f"${first + i}::text[]" for i in range(len(columns)))
    casts = ", ".join(f"{c}::{_TYPES[c]}" if c in _TYPES else c for c in columns)
    return f"(SELECT {casts} FROM unnest({arrays}) AS incoming ({', '.join(columns)})) AS rows"


# The replayed road: both tables in ONE statement, only the rows really inserted counted
# (and folded, by the tables' triggers).
INSERT_NEW = f"""
WITH new_clicks AS (
    INSERT INTO clicks ({", ".join(CLICK_COLUMNS)})
    SELECT * FROM {_unnest(CLICK_COLUMNS, 1)}
    ON CONFLICT DO NOTHING
    RETURNING 1
), new_impressions AS (
    INSERT INTO impressions ({", ".join(IMPRESSION_COLUMNS)})
    SELECT * FROM {_unnest(IMPRESSION_COLUMNS, len(CLICK_COLUMNS) + 1)}
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_clicks), (SELECT count(*) FROM new_impressions)
"""

INSERT_DEAD_LETTER = "INSERT INTO dead_letters (stream_id, payload, error) VALUES ($1, $2, $3)"


class Replayed(Exception):
    """Some of the batch's rows are stored already: roll back, write it again with
    replayed=True."""


@dataclass
class Batch:
    """What one transaction stores: the hot path's lines ((key, lines joined by newlines),
    a stream entry's worth each) and JSON events ((key, event))."""

    click_lines: list[tuple[Any, bytes]] = field(default_factory=list)
    impression_lines: list[tuple[Any, bytes]] = field(default_factory=list)
    clicks: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    impressions: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Written:
    clicks: int = 0
    impressions: int = 0
    # (the caller's key of an event, why it can never be stored): for dead_letters.
    refused: list[tuple[Any, str]] = field(default_factory=list)


# JSON rows per piece of a COPY: PostgreSQL starts on a piece while the next is built.
CHUNK = 500
# Bytes of lines per COPY message.
PIECE = 1 << 20


async def _copy_source(lines: Sequence[tuple[Any, bytes]],
                       events: Sequence[tuple[Any, dict[str, Any]]],
                       build: Callable[..., tuple[Any, ...]],
                       refused: list[tuple[Any, str]]) -> AsyncIterator[bytes]:
    """COPY's text format: the lines as they are, PIECE bytes or so a message (a message per
    entry woke PostgreSQL a hundred times a batch), then the JSON events' rows, CHUNK a
    piece; the events that can never be stored are set aside in `refused`."""
    piece: list[bytes] = []
    size = 0
    for _, joined in lines:
        piece += (joined, b"\n")
        size += len(joined)
        if size >= PIECE:
            yield b"".join(piece)
            piece, size = [], 0
    if piece:
        yield b"".join(piece)
    built: list[str] = []
    for key, event in events:
        try:
            built.append("\t".join(build(event, copy=True)))
        except BadEvent as exc:
            refused.append((key, repr(exc)))
            continue
        if len(built) >= CHUNK:
            built.append("")
            yield "\n".join(built).encode()
            built = []
    if built:
        built.append("")
        yield "\n".join(built).encode()


def _copied(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def write(conn: asyncpg.Connection, batch: Batch, *, replayed: bool = False) -> Written:
    """Store a batch inside the caller's transaction. Raises Replayed when some of the rows
    exist (the transaction is then aborted: roll it back and call again with
    replayed=True)."""
    written = Written()
    await conn.execute(FOLD_ON)
    if replayed:
        return await _insert_new(conn, batch, written)
    try:
        if batch.click_lines or batch.clicks:
            written.clicks = _copied(await conn.copy_to_table(
                "clicks", columns=CLICK_COLUMNS, format="text",
                source=_copy_source(batch.click_lines, batch.clicks, rows.click_row,
                                    written.refused)))
        if batch.impression_lines or batch.impressions:
            written.impressions = _copied(await conn.copy_to_table(
                "impressions", columns=IMPRESSION_COLUMNS, format="text",
                source=_copy_source(batch.impression_lines, batch.impressions,
                                    rows.impression_row, written.refused)))
    except asyncpg.UniqueViolationError as exc:
        raise Replayed(str(exc)) from exc
    return written


async def _insert_new(conn: asyncpg.Connection, batch: Batch, written: Written) -> Written:
    click_rows = (_from_lines(batch.click_lines, len(CLICK_COLUMNS), written.refused)
                  + _built(batch.clicks, rows.click_row, written.refused))
    impression_rows = (_from_lines(batch.impression_lines, len(IMPRESSION_COLUMNS),
                                   written.refused)
                       + _built(batch.impressions, rows.impression_row, written.refused))
    if click_rows or impression_rows:
        row = await conn.fetchrow(INSERT_NEW, *_columns(click_rows, len(CLICK_COLUMNS)),
                                  *_columns(impression_rows, len(IMPRESSION_COLUMNS)))
        written.clicks, written.impressions = int(row[0]), int(row[1])
    return written


def _from_lines(lines: Sequence[tuple[Any, bytes]], width: int,
                refused: list[tuple[Any, str]]) -> list[Sequence[Any]]:
    built: list[Sequence[Any]] = []
    for key, joined in lines:
        for line in joined.split(b"\n"):
            fields = values(line)
            if len(fields) == width:
                built.append(fields)
            else:
                refused.append((key, f"a line of {len(fields)} values, not {width}"))
    return built


def _built(events: Sequence[tuple[Any, dict[str, Any]]], build: Callable[..., tuple[Any, ...]],
           refused: list[tuple[Any, str]]) -> list[Sequence[Any]]:
    built: list[Sequence[Any]] = []
    for key, event in events:
        try:
            built.append(build(event))
        except BadEvent as exc:
            refused.append((key, repr(exc)))
    return built


def _columns(built: list[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*built)] if built else [[] for _ in range(width)]


async def dead_letters(conn: asyncpg.Connection, kept: Sequence[tuple[str, str, str]]) -> None:
    """Keep (stream id, payload, error) of events refused for good."""
    await conn.executemany(INSERT_DEAD_LETTER, [(i, p, e[:2000]) for i, p, e in kept])
