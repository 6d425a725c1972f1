"""Event ids: ULIDs (48-bit millisecond time + 80 random bits, 26 URL-safe characters).

The id's time part is the event's stored `ts`, so an id alone names its partition.
"""

from __future__ import annotations

import base64
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


# Every byte value to the Crockford digit of its low 5 bits: a uniformly random byte gives a
# uniformly random digit, so 16 random bytes are an id's 80 random bits, translated in C.
_DIGIT_OF_BYTE = bytes(_CROCKFORD.encode()[b & 31] for b in range(256))
# Two digits for every 10-bit number: a millisecond time (48 bits, 10 digits) in 5 lookups.
_PAIRS = [_CROCKFORD[n >> 5] + _CROCKFORD[n & 31] for n in range(1024)]
# Random bytes read from the kernel at once: one getrandom() per 256 ids, not one per id.
RANDOM_POOL = 4096


def time_text(ms: int) -> str:
    """The first 10 characters of a ULID made at `ms`."""
    pairs = _PAIRS
    return (pairs[ms >> 40 & 1023] + pairs[ms >> 30 & 1023] + pairs[ms >> 20 & 1023]
            + pairs[ms >> 10 & 1023] + pairs[ms & 1023])


def random_text(random: bytes) -> str:
    """The 16 random characters of a ULID from 16 random bytes (5 bits of each)."""
    return random.translate(_DIGIT_OF_BYTE).decode()


class _IdSource:
    """ULID texts made directly, without a ULID object: a click needs two, and str(new_id())
    cost as much as the rest of the click's tracking. The time part is encoded once per
    millisecond; the random part comes from the kernel's CSPRNG (os.urandom, as in new_id),
    read in blocks and translated to digits a block at a time."""

    __slots__ = ("_digits", "_at", "_ms", "_prefix")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._digits = ""
        self._at = 0
        self._ms = -1
        self._prefix = ""

    def next(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            self._ms = ms
            self._prefix = time_text(ms)
        at = self._at
        if at == len(self._digits):
            self._digits = random_text(os.urandom(RANDOM_POOL))
            at = 0
        self._at = at + 16
        return self._prefix + self._digits[at:at + 16]


_SOURCE = _IdSource()
# A forked child must never hand out the random digits its parent holds too.
os.register_at_fork(after_in_child=_SOURCE.reset)
new_id_text = _SOURCE.next
"""The text of a new ULID: what str(new_id()) gives, at a fraction of its cost."""


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
