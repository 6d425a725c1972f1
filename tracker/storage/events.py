"""Writing a batch of events: COPY into a temp table, insert what is new, fold only the
newly inserted rows into the rollups, all in the caller's transaction. A replayed batch
inserts nothing and so folds nothing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import asyncpg

from ..ids import decode_id

CLICK_COLUMNS = (
    "id", "ts", "campaign_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5",
    "ext_click_id", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
    "customer_id", "ip", "country", "device", "user_agent", "referer", "is_unique", "is_bot",
    "destination", "cost",
)
IMPRESSION_COLUMNS = (
    "id", "ts", "campaign_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5",
    "ip", "country", "device", "user_agent", "is_bot", "cost",
)

# Temp tables live as long as the writer's connection; rows vanish at each commit. Address and
# amount are staged as text: PostgreSQL's parsers are far cheaper than Python's ipaddress and
# Decimal.
CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS incoming_clicks (LIKE clicks) ON COMMIT DELETE ROWS;
ALTER TABLE incoming_clicks ALTER COLUMN ip TYPE text, ALTER COLUMN cost TYPE text,
    DROP COLUMN written_at;
CREATE TEMP TABLE IF NOT EXISTS incoming_impressions (LIKE impressions) ON COMMIT DELETE ROWS;
ALTER TABLE incoming_impressions ALTER COLUMN ip TYPE text, ALTER COLUMN cost TYPE text,
    DROP COLUMN written_at;
"""


def _staged(columns: tuple[str, ...]) -> tuple[str, str]:
    """(column list, the SELECT list that turns staged rows into table rows)."""
    casts = {"ip": "ip::inet", "cost": "cost::numeric"}
    return ", ".join(columns), ", ".join(casts.get(c, c) for c in columns)

BUCKET = "date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
DIMS = "pub, sub1, sub2, sub3, sub4, sub5, country, device"

# Both event tables are inserted and folded in ONE statement: the rollup rows a batch touches
# are then locked once, in one order (ORDER BY), so writers in several workers never deadlock
# on them. Only the rows really inserted reach the fold: a replayed batch folds nothing.
INSERT_AND_FOLD = f"""
WITH new_clicks AS (
    INSERT INTO clicks ({_staged(CLICK_COLUMNS)[0]})
    SELECT {_staged(CLICK_COLUMNS)[1]} FROM incoming_clicks
    ON CONFLICT DO NOTHING
    RETURNING ts, campaign_id, {DIMS}, is_unique, is_bot, cost
), new_impressions AS (
    INSERT INTO impressions ({_staged(IMPRESSION_COLUMNS)[0]})
    SELECT {_staged(IMPRESSION_COLUMNS)[1]} FROM incoming_impressions
    ON CONFLICT DO NOTHING
    RETURNING ts, campaign_id, {DIMS}, is_bot, cost
), new_events AS (
    SELECT ts, campaign_id, {DIMS}, true AS is_click, is_unique, is_bot, cost FROM new_clicks
    UNION ALL
    SELECT ts, campaign_id, {DIMS}, false, false, is_bot, cost FROM new_impressions
), folded AS (
    INSERT INTO rollup_15m AS r (bucket, campaign_id, {DIMS}, impressions, bot_impressions,
                                 clicks, unique_clicks, bot_clicks, cost)
    SELECT {BUCKET}, campaign_id, {DIMS},
           count(*) FILTER (WHERE NOT is_click AND NOT is_bot),
           count(*) FILTER (WHERE NOT is_click AND is_bot),
           count(*) FILTER (WHERE is_click AND NOT is_bot),
           count(*) FILTER (WHERE is_click AND is_unique AND NOT is_bot),
           count(*) FILTER (WHERE is_click AND is_bot),
           coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0)
    FROM new_events
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
        impressions = r.impressions + excluded.impressions,
        bot_impressions = r.bot_impressions + excluded.bot_impressions,
        clicks = r.clicks + excluded.clicks,
        unique_clicks = r.unique_clicks + excluded.unique_clicks,
        bot_clicks = r.bot_clicks + excluded.bot_clicks,
        cost = r.cost + excluded.cost
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_clicks), (SELECT count(*) FROM new_impressions)
"""

INSERT_DEAD_LETTER = "INSERT INTO dead_letters (stream_id, payload, error) VALUES ($1, $2, $3)"


class BadEvent(ValueError):
    """An event that can never be stored as it is (malformed in the buffer)."""


_DECIMAL = re.compile(r"-?[0-9]{1,14}(\.[0-9]{1,6})?")


def _ip(value: Any) -> str | None:
    # Staged as text; PostgreSQL parses it (in C) when it casts to inet.
    if not value:
        return None
    if not isinstance(value, str) or len(value) > 45:
        raise BadEvent(f"bad ip {value!r}")
    return value


def _money(value: Any) -> str:
    # Staged as text and cast to numeric by PostgreSQL; checked here so that a bad amount is
    # refused alone instead of failing its batch.
    if not value:
        return "0"
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise BadEvent(f"bad amount {value!r}")
    return value


def _common(event: dict[str, Any]) -> tuple[Any, ...]:
    return decode_id(event["id"])


def click_record(event: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return _common(event) + (
            int(event["campaign_id"]), event["visitor_id"],
            event.get("pub", ""), event.get("sub1", ""), event.get("sub2", ""),
            event.get("sub3", ""), event.get("sub4", ""), event.get("sub5", ""),
            event.get("ext_click_id", ""), event.get("utm_source", ""),
            event.get("utm_medium", ""), event.get("utm_campaign", ""),
            event.get("utm_term", ""), event.get("utm_content", ""),
            event.get("customer_id", ""), _ip(event.get("ip")), event.get("country", ""),
            event.get("device", ""), event.get("user_agent", ""), event.get("referer", ""),
            bool(event["is_unique"]), bool(event["is_bot"]), event["destination"],
            _money(event.get("cost")),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise BadEvent(f"malformed click: {exc!r}") from None


def impression_record(event: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return _common(event) + (
            int(event["campaign_id"]), event["visitor_id"],
            event.get("pub", ""), event.get("sub1", ""), event.get("sub2", ""),
            event.get("sub3", ""), event.get("sub4", ""), event.get("sub5", ""),
            _ip(event.get("ip")), event.get("country", ""), event.get("device", ""),
            event.get("user_agent", ""), bool(event["is_bot"]), _money(event.get("cost")),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise BadEvent(f"malformed impression: {exc!r}") from None


async def prepare(conn: asyncpg.Connection) -> None:
    await conn.execute(CREATE_STAGING)


async def write(conn: asyncpg.Connection, clicks: Sequence[tuple[Any, ...]],
                impressions: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
    """Insert a batch inside the caller's transaction; return (new clicks, new impressions)."""
    if clicks:
        await conn.copy_records_to_table("incoming_clicks", records=clicks, columns=CLICK_COLUMNS)
    if impressions:
        await conn.copy_records_to_table(
            "incoming_impressions", records=impressions, columns=IMPRESSION_COLUMNS)
    if not clicks and not impressions:
        return 0, 0
    row = await conn.fetchrow(INSERT_AND_FOLD)
    return int(row[0]), int(row[1])


async def dead_letter(conn: asyncpg.Connection, stream_id: str, payload: str, error: str) -> None:
    await conn.execute(INSERT_DEAD_LETTER, stream_id, payload, error[:2000])
