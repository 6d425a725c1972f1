"""Event ids: ULIDs (48-bit millisecond time + 80 random bits, 26 URL-safe characters).

The id's time part is the event's stored `ts`, so an id alone names its partition.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

from ulid import ULID


def new_id(now_ms: int | None = None) -> ULID:
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return ULID.from_bytes(ms.to_bytes(6, "big") + os.urandom(10))


# ULIDs are base 32 in Crockford's alphabet; Python's int() reads base 32 in its own.
# Translating one alphabet to the other decodes in C: the batch writer decodes every id.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_PYTHON = str.maketrans(_CROCKFORD + _CROCKFORD.lower(), "0123456789abcdefghijklmnopqrstuv" * 2)


def id_int(text: str) -> int:
    """The 128-bit number a ULID's text spells; ValueError when `text` is not one."""
    if len(text) != 26 or not text.isascii():
        raise ValueError(f"not a ULID: {text!r}")
    digits = text.translate(_TO_PYTHON)
    if not digits.isalnum() or digits[0] > "7":
        raise ValueError(f"not a ULID: {text!r}")
    return int(digits, 32)


def decode_id(text: str) -> tuple[uuid.UUID, datetime]:
    """(uuid, time) of a ULID written by new_id; ValueError when `text` is not one."""
    value = id_int(text)
    return uuid.UUID(int=value), datetime.fromtimestamp((value >> 80) / 1000, UTC)


def encode_id(value: int) -> str:
    """The ULID text of a 128-bit number (what str(ULID) gives, at a fraction of its cost)."""
    digits = []
    for _ in range(26):
        digits.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(digits))


def parse_id(text: str) -> ULID | None:
    """The ULID spelled by `text`, or None when it is not one."""
    if len(text) != 26:
        return None
    try:
        return ULID.from_str(text.upper())
    except ValueError:
        return None


def id_time(ulid: ULID) -> datetime:
    return datetime.fromtimestamp(ulid.milliseconds / 1000, UTC)


def id_uuid(ulid: ULID) -> uuid.UUID:
    return ulid.to_uuid()


def uuid_to_id(value: uuid.UUID) -> str:
    return str(ULID.from_bytes(value.bytes))
