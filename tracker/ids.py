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
