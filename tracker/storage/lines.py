"""A click or impression as the line the batch writer COPYs: made once, on the hot path.

The hot path writes each event into the stream as its row in COPY's text format (tab between
values, `\\N` for NULL, backslash escapes), in the column order below: the writer sends a
round's lines to PostgreSQL as they came, and PostgreSQL's input functions (in C) parse the
id, the time, the address and the amount. A click's line ends with is_unique, which the
Redis script appends once it knows (ingest/buffer.py); read-your-writes finds the same line
in its stream entry. The readers of a line (a lookup, a postback, the replayed road, dead letters) turn it
back into the event's fields here.

Values are checked where they are made (ingest/params.py refuses control characters,
ingest/visitor.py removes them from headers); what may still need escaping (a backslash, a
tab in an operator's URL) is escaped here, so a line always has its columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..ids import _CROCKFORD

# COPY's column lists: the columns of each table a line holds, in its order (is_unique last:
# the script appends it).
CLICK_COLUMNS = (
    "id", "ts", "campaign_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5",
    "ext_click_id", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
    "customer_id", "gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid", "ip",
    "country", "device", "user_agent", "referer", "is_bot", "destination", "cost", "is_unique",
)
IMPRESSION_COLUMNS = (
    "id", "ts", "campaign_id", "visitor_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5",
    "ip", "country", "device", "user_agent", "is_bot", "cost",
)
CLICK_PARAMS = CLICK_COLUMNS[4:23]
IMPRESSION_PARAMS = IMPRESSION_COLUMNS[4:10]

NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": None})
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "b": "\b", "f": "\f", "v": "\v"}
_BLANKS = ("",) * len(CLICK_PARAMS)
# Where each parameter sits among a click's free values (visitor_id first).
_CLICK_PLACE = {name: 1 + i for i, name in enumerate(CLICK_PARAMS)}

# ULID text → its 128-bit number in C: bytes.translate maps Crockford's alphabet onto the
# digits int(…, 32) reads, and every other byte onto one that int() refuses.
_ULID_DIGITS = bytearray(b"!" * 256)
for _digit, _char in enumerate(_CROCKFORD):
    _ULID_DIGITS[ord(_char)] = _ULID_DIGITS[ord(_char.lower())] = ord(
        "0123456789abcdefghijklmnopqrstuv"[_digit])
ULID_TABLE = bytes(_ULID_DIGITS)

# Formatted seconds: events come in time order, many to a second.
_SECONDS: dict[int, str] = {}


def stamp(ms: int) -> str:
    """A millisecond since the epoch as timestamptz text (UTC)."""
    second = _SECONDS.get(ms // 1000)
    if second is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        second = _SECONDS[ms // 1000] = datetime.fromtimestamp(ms // 1000, UTC).strftime(
            "%Y-%m-%d %H:%M:%S.")
    return f"{second}{ms % 1000:03d}+00"


def ulid_number(text: str) -> int:
    """The 128-bit number of a ULID's text (ValueError when it is not one)."""
    if len(text) != 26 or text[0] > "7":
        raise ValueError(f"not a ULID: {text!r:.60}")
    return int(text.encode("ascii").translate(ULID_TABLE), 32)


def ulid_text(number: int) -> str:
    """The ULID text of a 128-bit number (upper case, as ids are issued)."""
    digits = []
    for _ in range(26):
        digits.append(_CROCKFORD[number & 31])
        number >>= 5
    return "".join(reversed(digits))


def escaped(values: Sequence[str]) -> Sequence[str]:
    """The values as COPY's text format spells them (NUL bytes dropped: text refuses them)."""
    probe = "".join(values)
    if "\\" in probe or "\t" in probe or "\n" in probe or "\r" in probe or "\x00" in probe:
        return tuple(v.translate(_ESCAPES) for v in values)
    return values


def click_line(click_id: str, campaign_id: int, visitor_id: str, params: Mapping[str, str],
               ip: str | None, country: str, device: str, user_agent: str, referer: str,
               is_bot: bool, destination: str, cost: str) -> str:
    """A click's line, all but its last column (is_unique)."""
    number = ulid_number(click_id)
    # The known parameters, in their columns' places: most clicks carry one or two of the
    # nineteen, so placing those costs less than asking for all of them.
    values = [visitor_id, *_BLANKS, country, device, user_agent, referer, destination]
    for name, value in params.items():
        place = _CLICK_PLACE.get(name)
        if place:
            values[place] = value
    free = escaped(values)
    return "\t".join((
        f"{number:032x}", stamp(number >> 80), str(campaign_id), *free[:20],
        NULL if ip is None else ip, *free[20:24], "t" if is_bot else "f", free[24], cost))


def impression_line(impression_id: str, campaign_id: int, visitor_id: str,
                    params: Mapping[str, str], ip: str | None, country: str, device: str,
                    user_agent: str, is_bot: bool, cost: str) -> str:
    number = ulid_number(impression_id)
    free = escaped((visitor_id, *map(params.get, IMPRESSION_PARAMS, _BLANKS), country, device,
                    user_agent))
    return "\t".join((
        f"{number:032x}", stamp(number >> 80), str(campaign_id), *free[:7],
        NULL if ip is None else ip, *free[7:10], "t" if is_bot else "f", cost))


def values(line: bytes | str) -> list[str | None]:
    """A line's values, unescaped (None for NULL)."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    fields: list[str | None] = list(text.split("\t"))
    if "\\" in text:
        fields = [None if v == NULL else _unescape(v) if v and "\\" in v else v
                  for v in fields]
    return fields


def _unescape(value: str) -> str:
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append(_UNESCAPES.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def click_event(line: bytes | str) -> dict[str, Any]:
    """A click's line as the event's fields (what a lookup and a postback read of a click
    not yet in PostgreSQL). ValueError when it is not a click's line."""
    fields = values(line)
    if len(fields) != len(CLICK_COLUMNS):
        raise ValueError(f"a click's line has {len(CLICK_COLUMNS)} values, not {len(fields)}")
    event: dict[str, Any] = dict(zip(CLICK_COLUMNS, fields))
    event["id"] = ulid_text(int(str(fields[0]), 16))
    event["campaign_id"] = int(str(fields[2]))
    event["is_bot"] = fields[28] == "t"
    event["is_unique"] = fields[31] == "t"
    del event["ts"]
    return event


def impression_event(line: bytes | str) -> dict[str, Any]:
    fields = values(line)
    if len(fields) != len(IMPRESSION_COLUMNS):
        raise ValueError(f"an impression's line has {len(IMPRESSION_COLUMNS)} values, "
                         f"not {len(fields)}")
    event: dict[str, Any] = dict(zip(IMPRESSION_COLUMNS, fields))
    event["id"] = ulid_text(int(str(fields[0]), 16))
    event["campaign_id"] = int(str(fields[2]))
    event["is_bot"] = fields[14] == "t"
    del event["ts"]
    return event
