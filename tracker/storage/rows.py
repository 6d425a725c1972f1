"""Buffered events (JSON from the Redis stream) turned into table rows, checked on the way.

An event that could never be stored as it is raises BadEvent here, alone, and goes to
dead_letters; a row that PostgreSQL refuses all the same fails its batch, which the writer
splits until the culprit stands alone (ingest/writer.py). Catching what we can here is the
cheap road: a split costs a dozen transactions.

Clicks and impressions become rows of text, in their table's column order: the writer sends
them as COPY's text format (storage/events.py), where PostgreSQL's input functions, in C,
parse the id, time, address and amount far cheaper than Python could encode them. The same
values, unescaped, fill the arrays of the replayed road. Conversions are sent as arrays.
"""

from __future__ import annotations

from datetime import UTC, datetime
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

from .. import money
from ..ids import decode_id
from .lines import (CLICK_COLUMNS, CLICK_PARAMS, IMPRESSION_COLUMNS, IMPRESSION_PARAMS, NULL,
                    stamp, ulid_number)

__all__ = ["CLICK_COLUMNS", "IMPRESSION_COLUMNS", "BadEvent", "click_row", "impression_row",
           "conversion_record"]

# NULL, and what a value must escape, in COPY's text format.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class BadEvent(ValueError):
    """An event that can never be stored as it is (malformed in the buffer)."""


# Free-text columns of each kind of event, in CLICK_COLUMNS / IMPRESSION_COLUMNS order.
CLICK_TEXTS = CLICK_PARAMS
IMPRESSION_TEXTS = IMPRESSION_PARAMS
TRAIT_TEXTS = ("country", "device", "user_agent")
CLICK_TRAIT_TEXTS = TRAIT_TEXTS + ("referer",)
# "" for each absent one: map(event.get, names, blanks) reads them all in C.
_BLANKS = ("",) * len(CLICK_TEXTS)
_FLAGS = {True: "t", False: "f"}


def _id(value: Any) -> tuple[str, str]:
    """(the id as 32 hex digits, its millisecond as timestamptz text) of a ULID: the instant
    ids.decode_id gives, so a lookup by id finds the row's partition and key."""
    if type(value) is not str:
        raise BadEvent(f"not a ULID: {value!r:.60}")
    try:
        number = ulid_number(value)
    except ValueError:  # UnicodeEncodeError is one
        raise BadEvent(f"not a ULID: {value!r:.60}") from None
    return f"{number:032x}", stamp(number >> 80)


def _texts_ok(values: tuple[Any, ...]) -> bool:
    """Every value is text PostgreSQL will take (not a null, number or list: text columns
    are NOT NULL; no NUL byte, which text refuses). True when none holds a character COPY's
    text format must escape."""
    try:
        joined = "".join(values)
    except TypeError:
        wrong = next(v for v in values if type(v) is not str)
        raise BadEvent(f"a text field holds {type(wrong).__name__}: {wrong!r:.80}") from None
    if "\x00" in joined:
        raise BadEvent("a text field holds a NUL byte, which PostgreSQL refuses")
    return not ("\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined)


def _escaped(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.translate(_ESCAPES) for v in values)


def _ip(value: Any) -> str | None:
    """The address, checked as PostgreSQL's inet would (the service sends masked addresses,
    never a prefix)."""
    if not value:
        return None
    if type(value) is not str or len(value) > 45:
        raise BadEvent(f"bad ip {value!r:.80}")
    try:
        inet_pton(AF_INET6 if ":" in value else AF_INET, value)
    except OSError:
        raise BadEvent(f"bad ip {value!r:.80}") from None
    return value


# Amount texts already checked: a campaign's few costs are checked once each.
_COSTS: set[str] = {"0"}


def _cost(value: Any) -> str:
    if type(value) is str and value in _COSTS:
        return value
    try:
        text = money.event_amount(value)
    except money.MoneyError as exc:
        raise BadEvent(str(exc)) from None
    if len(_COSTS) >= 10_000:
        _COSTS.clear()
    _COSTS.add(text)
    return text


def _flag(value: Any, name: str) -> str:
    if type(value) is not bool:
        raise BadEvent(f"{name} must be true or false, not {value!r:.80}")
    return _FLAGS[value]


def _campaign(value: Any) -> str:
    if type(value) is not int:
        raise BadEvent(f"campaign_id must be an integer, not {value!r:.80}")
    return str(value)


def click_row(event: dict[str, Any], copy: bool = False) -> tuple[Any, ...]:
    """A click's values as text, in CLICK_COLUMNS order (the address None when absent); with
    copy=True, ready for COPY's text format (escaped, NULL spelled out)."""
    try:
        uid, ts = _id(event["id"])
        campaign_id = _campaign(event["campaign_id"])
        free = (event["visitor_id"], *map(event.get, CLICK_TEXTS, _BLANKS),
                *map(event.get, CLICK_TRAIT_TEXTS, _BLANKS), event["destination"])
        if not _texts_ok(free) and copy:
            free = _escaped(free)
        ip = _ip(event.get("ip"))
        return (uid, ts, campaign_id, *free[:20], NULL if ip is None and copy else ip,
                *free[20:24], _flag(event["is_bot"], "is_bot"), free[24],
                _cost(event.get("cost")), _flag(event["is_unique"], "is_unique"))
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadEvent(f"malformed click: {exc!r}") from None


def impression_row(event: dict[str, Any], copy: bool = False) -> tuple[Any, ...]:
    """An impression's values as text, in IMPRESSION_COLUMNS order (see click_row)."""
    try:
        uid, ts = _id(event["id"])
        campaign_id = _campaign(event["campaign_id"])
        free = (event["visitor_id"], *map(event.get, IMPRESSION_TEXTS, _BLANKS),
                *map(event.get, TRAIT_TEXTS, _BLANKS))
        if not _texts_ok(free) and copy:
            free = _escaped(free)
        ip = _ip(event.get("ip"))
        return (uid, ts, campaign_id, *free[:7], NULL if ip is None and copy else ip,
                *free[7:10], _flag(event["is_bot"], "is_bot"), _cost(event.get("cost")))
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadEvent(f"malformed impression: {exc!r}") from None


CONVERSION_TEXTS = ("event", "txid", "status")
CONVERSION_MORE_TEXTS = ("raw_status", "currency")
CONVERSION_TAIL_TEXTS = ("customer_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4",
                         "sub5", "country", "device", "source")
STATUSES = frozenset(["pending", "approved", "declined", "reversed"])


def _texts(event: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """The named text values ("" when absent). A value asyncpg could not encode (a number,
    a list) is refused here, alone; a null goes on to PostgreSQL, whose NOT NULL refuses it
    as the event's fault (class 23) and the writer sets that event aside."""
    values = tuple(event.get(name, "") for name in names)
    for value in values:
        if value is not None and type(value) is not str:
            raise BadEvent(f"a text field holds {type(value).__name__}: {value!r:.80}")
    return values


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
