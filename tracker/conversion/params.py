"""What a postback or conversion pixel asks for, read once from its parameters.

Networks and shops fill postback URLs from their own templates, written for whatever tracker
they were set up for. So every alias of the contract's table is read, and the drop-in
formats of Voluum (`et`), Keitaro (`subid`, `status=lead|sale|rejected|rebill`, the
`*_status=` maps, `return=`) and Binom (`cnv_id`, `cnv_status`, `cnv_currency`). Parameters
we do not know are ignored (networks append their own); a known one that is malformed,
repeated or too long is refused by the contract's name for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from .. import money
from ..errors import bad_request

# The contract's name of each parameter, and every name it arrives under.
ALIASES: dict[str, tuple[str, ...]] = {
    "click_id": ("click_id", "cid", "clickid", "subid", "cnv_id"),
    "event": ("event", "goal", "type", "et"),
    "amount": ("amount", "payout", "sum", "revenue"),
    "currency": ("currency", "cnv_currency"),
    "txid": ("txid", "transaction_id", "order_id", "tid"),
    "status": ("status", "cnv_status"),
    "customer_id": ("customer_id",),
    "token": ("token",),
    # The order's value, for a campaign that pays a percent of it (revshare payouts).
    "order_value": ("order_value", "order_total"),
    # Keitaro: per-request maps from the network's own status words to ours.
    "sale_status": ("sale_status",),
    "lead_status": ("lead_status",),
    "rejected_status": ("rejected_status",),
    # Keitaro: answer this text instead of JSON.
    "return": ("return",),
    # Signed postbacks (tracker/conversion/security.py).
    "ts": ("ts",),
    "sig": ("sig",),
}
NAME_OF = {alias: name for name, aliases in ALIASES.items() for alias in aliases}

EVENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_EVENT = "conversion"
MAX_CLICK_ID = 40
MAX_TEXT = 255

# Our statuses, and Keitaro's words for them. `rejected` means declined or reversed, by the
# conversion's state; `rebill` is a further approved conversion under its own txid.
STATUSES = ("approved", "pending", "declined", "reversed")
WORDS = {"approved": "approved", "pending": "pending", "declined": "declined",
         "reversed": "reversed", "lead": "pending", "sale": "approved", "rejected": "rejected",
         "rebill": "rebill"}
MAPS = {"sale_status": "approved", "lead_status": "pending", "rejected_status": "rejected"}


@dataclass(frozen=True, slots=True)
class ConversionInput:
    click_id: str | None
    event: str
    txid: str
    # approved, pending, declined, reversed, or rejected (declined or reversed, decided
    # against the conversion's state)
    status: str
    rebill: bool
    raw_status: str          # the word the network sent, as sent ("" when none)
    amount: Decimal | None   # None: not given (a new conversion takes the campaign's payout)
    currency: str | None     # None: the campaign's
    order_value: Decimal | None
    customer_id: str
    token: str | None
    return_text: str | None
    signed: bool             # carries a signature (`sig`)
    pairs: tuple[tuple[str, str], ...]  # every parameter as received, for the signature


def _text(name: str, value: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise bad_request("value_too_long", f"{name} must be at most {limit} characters", name)
    if "\ufffd" in value:
        raise bad_request("invalid_encoding", f"{name} is not valid UTF-8", name)
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise bad_request("invalid_value", f"{name} must not hold control characters", name)
    return value


def _money(name: str, value: str) -> Decimal:
    try:
        return money.parse(value)
    except money.MoneyError as exc:
        raise bad_request(f"invalid_{name}", f"{name} {exc}", name) from None


def _currency(value: str) -> str:
    code = money.currency(value)
    if code is None:
        raise bad_request("invalid_currency", "currency must be an ISO 4217 code such as USD",
                          "currency")
    return code


def _status(raw: str, values: dict[str, str]) -> str:
    word = raw.strip().lower()
    # The request's own maps first: a network's word may shadow one of ours on purpose.
    for map_name, status in MAPS.items():
        listed = values.get(map_name)
        if listed and word in {w.strip().lower() for w in listed.split(",") if w.strip()}:
            return status
    ours = WORDS.get(word)
    if ours is None:
        raise bad_request(
            "invalid_status",
            "status must be one of approved, pending, declined, reversed (or Keitaro's lead, "
            "sale, rejected, rebill, or a word listed in sale_status, lead_status, "
            "rejected_status)", "status")
    return ours


def read(pairs: Iterable[tuple[str, str]], cookie_click_id: str = "") -> ConversionInput:
    """The conversion a request asks for. `cookie_click_id`: the pixel's last-click cookie,
    used when the request names no click."""
    received = tuple(pairs)
    values: dict[str, str] = {}
    for alias, value in received:
        name = NAME_OF.get(alias)
        if name is None:
            continue
        if name in values:
            raise bad_request("repeated_parameter",
                              f"{name} is given more than once (as {alias!r} among others)", name)
        values[name] = value
    # An empty value is an empty macro in the network's template: the parameter is absent.
    given = {name: value for name, value in values.items() if value != ""}

    click_id: str | None = given.get("click_id") or cookie_click_id or None
    if click_id is not None:
        if len(click_id) > MAX_CLICK_ID:
            raise bad_request("invalid_click_id",
                              f"click_id must be at most {MAX_CLICK_ID} characters", "click_id")
        _text("click_id", click_id)
    event = given.get("event", DEFAULT_EVENT)
    if not EVENT.fullmatch(event):
        raise bad_request("invalid_event", "event must match [A-Za-z0-9_.-]{1,64}", "event")
    txid = _text("txid", given.get("txid", ""))
    for map_name in MAPS:
        if map_name in given:
            _text(map_name, given[map_name], 1000)
    raw_status = _text("status", given.get("status", ""), 64)
    status = _status(raw_status, given) if raw_status else "approved"
    rebill = status == "rebill"
    if rebill:
        if not txid:
            raise bad_request("required", "a rebill is a new conversion and needs its own txid",
                              "txid")
        status = "approved"
    amount = _money("amount", given["amount"]) if "amount" in given else None
    order_value = _money("order_value", given["order_value"]) if "order_value" in given else None
    currency = _currency(given["currency"]) if "currency" in given else None
    return_text = _text("return", given["return"]) if "return" in given else None
    return ConversionInput(
        click_id=click_id, event=event, txid=txid, status=status, rebill=rebill,
        raw_status=raw_status, amount=amount, currency=currency, order_value=order_value,
        customer_id=_text("customer_id", given.get("customer_id", "")),
        token=_text("token", given["token"]) if "token" in given else None,
        return_text=return_text, signed="sig" in given, pairs=received,
    )
