"""What a stream entry holds: the one place that knows its fields.

An entry appended by the hot path (ingest/buffer.py, RECORD_EVENTS) holds the events of one
round and shard, as the lines the writer COPYs (storage/lines.py), joined by newlines: `c`
the clicks', `i` the impressions' (each only when there are some); `n`, how many events in
all; `k`, the sets that name the entry for read-your-writes (`Keys.recent`, comma-separated),
which the writer takes it out of once its rows are committed. A conversion's entry (RECORD_CONVERSION),
and one put back by a tool (`tracker dead-letters --replay`), holds one JSON event: `e`;
`n` is 1 when the script counted it in the backlog (a tool's entry is not counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from ..storage import lines

CLICKS = b"c"
IMPRESSIONS = b"i"
SINGLE = b"e"
COUNT = b"n"
RECENT = b"k"

Fields = dict[bytes, bytes]


def fields_of(reply: Any) -> list[tuple[bytes | str, Fields]]:
    """The entries of an XRANGE reply, or of one stream's part of an XREADGROUP reply: raw
    from one server ([[id, [field, value, ...]], ...]), parsed ([(id, {field: value})]) from a
    Cluster pipeline. An entry deleted while pending reads without fields: skipped."""
    entries = []
    for entry_id, fields in reply or ():
        if not fields:
            continue
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2]))
        entries.append((entry_id, fields))
    return entries


def pieces(fields: Fields) -> Iterator[tuple[bytes, bytes]]:
    """(kind, bytes) of what an entry holds: CLICKS or IMPRESSIONS lines, a SINGLE event."""
    for kind in (CLICKS, IMPRESSIONS, SINGLE):
        raw = fields.get(kind)
        if raw is not None:
            yield kind, raw


def size(fields: Fields) -> int:
    """How many events an entry holds, as its fields say (without splitting it)."""
    try:
        return max(1, int(fields.get(COUNT, 1)))
    except ValueError:
        return 1


def counted(fields: Fields) -> int:
    """How many of the entry's events its script added to the backlog counter."""
    try:
        return int(fields.get(COUNT, 0))
    except ValueError:
        return 0


def decoded(fields: Fields) -> list[dict[str, Any]]:
    """Every event of an entry as its fields, with its "type" (for tools and tests that
    look into the stream; the writer never decodes a line)."""
    events: list[dict[str, Any]] = []
    for kind, raw in pieces(fields):
        if kind is SINGLE:
            events.append(orjson.loads(raw))
        elif kind is CLICKS:
            events += ({"type": "click", **lines.click_event(line)} for line in raw.split(b"\n"))
        else:
            events += ({"type": "impression", **lines.impression_event(line)}
                       for line in raw.split(b"\n"))
    return events
