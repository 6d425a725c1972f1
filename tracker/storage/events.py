"""Writing a batch of events: COPY into a temp table, insert what is new, fold only the
newly inserted rows into the rollups, all in the caller's transaction. A replayed batch
inserts nothing and so folds nothing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from .. import money
from ..ids import decode_id

CLICK_COLUMNS = (
    "id", "ts", "campaign_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5",
    "ext_click_id", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
    "customer_id", "gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid", "ip",
    "country", "device", "user_agent", "referer", "is_unique", "is_bot", "destination", "cost",
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


# Free-text columns of each kind of event, in CLICK_COLUMNS / IMPRESSION_COLUMNS order.
CLICK_TEXTS = ("pub", "sub1", "sub2", "sub3", "sub4", "sub5", "ext_click_id", "utm_source",
               "utm_medium", "utm_campaign", "utm_term", "utm_content", "customer_id",
               "gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid")
IMPRESSION_TEXTS = ("pub", "sub1", "sub2", "sub3", "sub4", "sub5")
TRAIT_TEXTS = ("country", "device", "user_agent")
CLICK_TRAIT_TEXTS = TRAIT_TEXTS + ("referer",)


def _texts(event: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """The named text values ("" when absent). A value asyncpg could not encode (a number,
    a list) is refused here, alone; a null goes on to PostgreSQL, whose NOT NULL refuses it
    as the event's fault (class 23) and the writer sets that event aside."""
    values = tuple(event.get(name, "") for name in names)
    for value in values:
        if value is not None and type(value) is not str:
            raise BadEvent(f"a text field holds {type(value).__name__}: {value!r:.80}")
    return values


def _required_text(event: dict[str, Any], name: str) -> Any:
    value = event[name]
    if value is not None and type(value) is not str:
        raise BadEvent(f"{name} must be a string, not {value!r:.80}")
    return value


def _ip(value: Any) -> str | None:
    # Staged as text; PostgreSQL parses it (in C) when it casts to inet.
    if not value:
        return None
    if not isinstance(value, str) or len(value) > 45:
        raise BadEvent(f"bad ip {value!r}")
    return value


def _flag(event: dict[str, Any], name: str) -> bool:
    value = event[name]
    if type(value) is not bool:
        raise BadEvent(f"{name} must be true or false, not {value!r:.80}")
    return value


def _cost(event: dict[str, Any]) -> str:
    # Staged as text and cast to numeric by PostgreSQL; checked here, by the same rules that
    # made it, so that a bad amount is refused alone instead of failing its batch.
    try:
        return money.event_amount(event.get("cost"))
    except money.MoneyError as exc:
        raise BadEvent(str(exc)) from None


def _head(event: dict[str, Any]) -> tuple[Any, ...]:
    """(id, ts, campaign_id, visitor_id): what every event row starts with."""
    campaign_id = event["campaign_id"]
    if type(campaign_id) is not int:
        raise BadEvent(f"campaign_id must be an integer, not {campaign_id!r:.80}")
    return decode_id(event["id"]) + (campaign_id, _required_text(event, "visitor_id"))


def click_record(event: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return (_head(event) + _texts(event, CLICK_TEXTS) + (_ip(event.get("ip")),)
                + _texts(event, CLICK_TRAIT_TEXTS)
                + (_flag(event, "is_unique"), _flag(event, "is_bot"))
                + (_required_text(event, "destination"), _cost(event)))
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadEvent(f"malformed click: {exc!r}") from None


def impression_record(event: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return (_head(event) + _texts(event, IMPRESSION_TEXTS) + (_ip(event.get("ip")),)
                + _texts(event, TRAIT_TEXTS) + (_flag(event, "is_bot"), _cost(event)))
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadEvent(f"malformed impression: {exc!r}") from None


CONVERSION_TEXTS = ("event", "txid", "status")
CONVERSION_MORE_TEXTS = ("raw_status", "currency")
CONVERSION_TAIL_TEXTS = ("customer_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4",
                         "sub5", "country", "device", "source")
STATUSES = frozenset(["pending", "approved", "declined", "reversed"])


def _amount(event: dict[str, Any], name: str) -> str:
    try:
        return money.event_amount(event.get(name))
    except money.MoneyError as exc:
        raise BadEvent(f"{name}: {exc}") from None


def _ms(event: dict[str, Any], name: str) -> datetime:
    value = event[name]
    if type(value) is not int:
        raise BadEvent(f"{name} must be an integer, not {value!r:.80}")
    return datetime.fromtimestamp(value / 1000, UTC)


def conversion_record(event: dict[str, Any]) -> tuple[Any, ...]:
    """A conversion's version, in conversions.COLUMNS order."""
    try:
        conv_uuid, _ = decode_id(event["id"])
        click_uuid, click_ts = decode_id(event["click_id"])
        version, campaign_id = event["version"], event["campaign_id"]
        if type(version) is not int or type(campaign_id) is not int:
            raise BadEvent("version and campaign_id must be integers")
        status, old_status = event["status"], event.get("old_status")
        if status not in STATUSES or (old_status is not None and old_status not in STATUSES):
            raise BadEvent(f"bad status {status!r} (from {old_status!r})")
        order_value = event.get("order_value")
        source_net = event.get("source_net")
        if source_net is not None and (type(source_net) is not str or len(source_net) > 50):
            raise BadEvent(f"bad source_net {source_net!r:.80}")
        return ((conv_uuid, version, click_uuid, click_ts, campaign_id)
                + _texts(event, CONVERSION_TEXTS) + (old_status,)
                + _texts(event, CONVERSION_MORE_TEXTS[:1])
                + (_amount(event, "amount"),) + _texts(event, CONVERSION_MORE_TEXTS[1:])
                + (_amount(event, "revenue"), _amount(event, "cost"),
                   None if order_value is None else _amount(event, "order_value"))
                + _texts(event, CONVERSION_TAIL_TEXTS)
                + (_ms(event, "created_ms"), _ms(event, "ts_ms"), source_net)
                + _texts(event, ("postback",)))
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadEvent(f"malformed conversion: {exc!r}") from None


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
