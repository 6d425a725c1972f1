"""Money, in one format for every layer: campaign validation, event costs, the batch
writer's check and reports all call this module, so no two layers can disagree.

Amounts travel as decimal strings (never binary floats: a JSON number is refused), live as
`Decimal` in Python and as NUMERIC in PostgreSQL. What a person or a network sends (a
campaign's `cost_value`, a payout) has at most 12 integer digits and 6 decimals. What an
event carries may have 9 decimals: a CPM impression costs `cost_value / 1000` exactly, so
N impressions always add up to N × their unit cost, to the last digit.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pycountry

INTEGER_DIGITS = 12
INPUT_PLACES = 6
# An event's amount is an input amount divided by at most 1000 (CPM): three places more.
EVENT_PLACES = INPUT_PLACES + 3
ZERO = Decimal(0)
_PER_MILLE = -3


class MoneyError(ValueError):
    """Not an amount in our format; the message says what is wrong, for a person."""


def _pattern(places: int) -> re.Pattern[str]:
    # Plain notation only: no sign, no exponent, no NaN/Infinity, no leading zeros.
    return re.compile(rf"(0|[1-9][0-9]{{0,{INTEGER_DIGITS - 1}}})(\.[0-9]{{1,{places}}})?")


_INPUT = _pattern(INPUT_PLACES)
_EVENT = _pattern(EVENT_PLACES)

INPUT_RULE = (f'a decimal string such as "0.25": not a JSON number, at most {INTEGER_DIGITS} '
              f"digits before the point and {INPUT_PLACES} after, no sign or exponent")


def parse(value: object) -> Decimal:
    """An amount a person or a network sent; MoneyError unless it is in the input format."""
    if not isinstance(value, str) or not _INPUT.fullmatch(value):
        raise MoneyError(f"must be {INPUT_RULE}")
    return Decimal(value)


def event_amount(value: object) -> str:
    """An amount an event carries, checked before it is staged as text for PostgreSQL:
    returns it (empty or absent is 0), MoneyError when it could never be stored."""
    if not value:
        return "0"
    if not isinstance(value, str) or not _EVENT.fullmatch(value):
        raise MoneyError(f"bad amount {value!r}")
    return value


def per_mille(value: Decimal) -> Decimal:
    """value / 1000, exact (a shift of the exponent, no rounding)."""
    return value.scaleb(_PER_MILLE)


def to_str(value: Decimal) -> str:
    """The shortest plain string: 0.250000 → "0.25", 2.000000 → "2", never an exponent."""
    if not value:
        return "0"
    return format(value.normalize(), "f")


def nanos(text: str) -> int:
    """An amount PostgreSQL wrote as numeric(_, 9) text ("1069.050000000"), in whole units of
    10^-9. Reports sum thousands of rows: integers are exact, and many times faster to read
    and to write out than Decimal (asyncpg makes a Decimal of a numeric through its text)."""
    whole, _, part = text.partition(".")
    if len(part) != EVENT_PLACES:
        raise ValueError(f"not an amount with {EVENT_PLACES} places: {text!r}")
    return int(whole + part)


_NANO = 10 ** EVENT_PLACES


def nanos_to_str(units: int) -> str:
    """to_str of units × 10^-9 (without making the Decimal)."""
    sign = ""
    if units < 0:
        sign, units = "-", -units
    whole, part = divmod(units, _NANO)
    if not part:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{str(_NANO + part)[1:].rstrip('0')}"


def nanos_per_unit(units: int, count: int) -> str | None:
    """A money figure per unit (cost per click, revenue per click) of units × 10^-9 over
    `count`, to the event precision, half to even; None over a zero count."""
    if not count:
        return None
    quotient, remainder = divmod(abs(units), abs(count))
    if 2 * remainder > abs(count) or (2 * remainder == abs(count) and quotient % 2):
        quotient += 1
    return nanos_to_str(-quotient if (units < 0) != (count < 0) else quotient)


def currency(value: object) -> str | None:
    """The upper-case ISO 4217 code `value` spells (any case), or None when it is not one."""
    if not isinstance(value, str) or len(value) != 3 or not value.isalpha():
        return None
    code = value.upper()
    return code if pycountry.currencies.get(alpha_3=code) is not None else None
