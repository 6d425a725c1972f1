"""Operator API: the exchange rates conversions' revenue is converted at.

`PUT /api/fx-rates` sets, for one day, the rates of one base currency:
`{"date": "2024-05-01", "base": "USD", "rates": {"EUR": "0.92", "TRY": "34.1"}}` means that
on that day 1 USD = 0.92 EUR = 34.1 TRY. `GET /api/fx-rates?date=…[&base=…]` lists the rates
in force on a day: per pair, the latest dated that day or before.

Rates are decimal strings, as every amount in this API: a JSON number is refused, so no rate
ever passes through a binary float (the body parser reads JSON numbers as floats, and
0.1 + 0.2 is not 0.3 there). An operator's script sends `"rate": "0.92"`, not `0.92`.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from .. import money
from ..errors import bad_request, object_with
from ..keys import FX, PG
from ..storage import fx as store
from .common import json_response, read_json

FIELDS = frozenset(["date", "base", "rates"])
DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# What fx_rates.rate (numeric(24, 12)) holds exactly: 12 digits either side of the point.
RATE = re.compile(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,12})?")
RATE_RULE = ('a decimal string such as "0.92": not a JSON number, greater than 0, at most 12 '
             'digits before the point and 12 after, no sign or exponent')


def _today() -> date:
    return datetime.now(UTC).date()


def _day(value: Any, field: str) -> date:
    try:
        if not isinstance(value, str) or not DATE.fullmatch(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise bad_request("invalid_date", f"{field} must be a date, YYYY-MM-DD", field) from None


def _currency(value: Any, field: str) -> str:
    code = money.currency(value)
    if code is None:
        raise bad_request("invalid_currency", f"{field} must be an ISO 4217 code such as USD",
                          field)
    return code


def _rate(value: Any, field: str) -> Decimal:
    if not isinstance(value, str) or not RATE.fullmatch(value) or not Decimal(value):
        raise bad_request("invalid_rate", f"{field} must be {RATE_RULE}", field)
    return Decimal(value)


def _rates(value: Any, base: str) -> dict[str, Decimal]:
    if not isinstance(value, dict) or not value:
        raise bad_request("invalid_rates", 'rates must be an object such as {"EUR": "0.92"}',
                          "rates")
    rates: dict[str, Decimal] = {}
    for code, rate in value.items():
        field = f"rates.{code}"
        quote = _currency(code, field)
        if quote == base:
            raise bad_request("invalid_currency", f"{field}: 1 {base} is always 1 {base}", field)
        if quote in rates:
            raise bad_request("repeated_currency", f"{quote} is given more than once", field)
        rates[quote] = _rate(rate, field)
    return rates


def _view(row: Any) -> dict[str, Any]:
    return {"base": row["base"], "quote": row["quote"], "rate": money.to_str(row["rate"]),
            "date": row["day"].isoformat(),
            "updated_at": row["updated_at"].isoformat().replace("+00:00", "Z")}


async def put(request: web.Request) -> web.Response:
    body = object_with(await read_json(request), FIELDS)
    day = _today() if body.get("date") is None else _day(body["date"], "date")
    if body.get("base") is None:
        raise bad_request("required", "base is required: the currency the rates are of", "base")
    base = _currency(body["base"], "base")
    rates = _rates(body.get("rates"), base)
    rows = await store.upsert(request.app[PG], day, base, rates)
    # This worker sees the new rates at once; the others within FRESH_SECONDS.
    request.app[FX].forget()
    return json_response({"date": day.isoformat(), "base": base,
                          "rates": {r["quote"]: money.to_str(r["rate"])
                                    for r in sorted(rows, key=lambda r: str(r["quote"]))}})


async def get(request: web.Request) -> web.Response:
    raw_day = request.query.get("date", "")
    day = _day(raw_day, "date") if raw_day else _today()
    raw_base = request.query.get("base", "")
    base = _currency(raw_base, "base") if raw_base else None
    rows = await store.in_force(request.app[PG], day, base)
    return json_response({"date": day.isoformat(), "rates": [_view(r) for r in rows]})
