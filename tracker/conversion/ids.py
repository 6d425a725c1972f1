"""Conversion ids, derived from the conversion's identity (click, event, txid).

The same identity always gets the same id, so PostgreSQL's primary key on the id *is* the
unique key on the identity (a partitioned table could not hold one), and a postback repeated
after Redis lost its data still names the conversion already stored. The id is a ULID: the
click's millisecond, then 80 bits of SHA-256 of the identity (as unguessable as the click id
it is made from, and ordered by click time like every other id here).
"""

from __future__ import annotations

import hashlib

from ..ids import encode_id


def conversion_id(click_id: str, click_ms: int, event: str, txid: str) -> str:
    """`click_id` in its canonical (upper-case) spelling, `click_ms` its time (the caller has
    parsed it already)."""
    digest = hashlib.sha256(f"{click_id}\x1f{event}\x1f{txid}".encode()).digest()
    return encode_id(click_ms << 80 | int.from_bytes(digest[:10], "big"))


def state_field(event: str, txid: str) -> str:
    """The conversion's name among its click's conversions (Redis hash fields)."""
    return f"{event}\x1f{txid}"
