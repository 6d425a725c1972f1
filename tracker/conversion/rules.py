"""The rules of a conversion's life, as pure functions: a conversion's current state and a
postback in, the outcome and the new state out. No I/O: the recorder (record.py) reads the
state, asks here, and writes what comes back.

- (click, event, txid) is one conversion. The same status and amount again: `duplicate`.
  A new status, or a new amount: `updated`. Anything else is refused, nothing changed.
- Statuses move pending → approved | declined, and approved → reversed. Declined and
  reversed are final.
- Only approved conversions are revenue; pending ones are reported apart. Traffic cost for
  a conversion (cpa: the campaign's cost_value; revshare: that percent of the revenue) is set
  when it is approved, and taken back when it is reversed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

from .. import money
from ..campaigns import Campaign
from .params import ConversionInput

TRANSITIONS = {"pending": frozenset(["approved", "declined"]), "approved": frozenset(["reversed"])}
FIRST_STATUSES = frozenset(["approved", "pending", "declined"])
EVENT_QUANTUM = Decimal(1).scaleb(-money.EVENT_PLACES)


class InvalidTransition(Exception):
    """The postback asks for a change the rules do not allow (409 invalid_transition)."""


@dataclass(frozen=True, slots=True)
class State:
    version: int
    status: str
    raw_status: str
    amount: Decimal       # as the network sent it, in `currency`
    currency: str
    revenue: Decimal      # in the campaign's currency
    cost: Decimal
    order_value: Decimal | None
    created_ms: int       # when first recorded: the conversion's time in reports


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str          # accepted, duplicate, updated
    state: State          # the state after the postback (unchanged for a duplicate)
    old_status: str | None
    amount_changed: bool  # revenue must be converted again (the caller does it)


def payout(campaign: Campaign, event: str, order_value: Decimal | None) -> Decimal:
    """The campaign's payout for an event whose postback named no amount (in the campaign's
    currency): a fixed amount, or a percent of the order's value; 0 when the event has no
    rule or a percent rule has no order value."""
    rule = campaign.payouts.get(event)
    if rule is None:
        return money.ZERO
    kind, value = rule
    if kind == "amount":
        return value
    if order_value is None:
        return money.ZERO
    return (order_value * value / 100).quantize(EVENT_QUANTUM)


def cost(campaign: Campaign, status: str, revenue: Decimal, current: State | None) -> Decimal:
    """The traffic cost this conversion carries in `status`."""
    if status != "approved":
        return money.ZERO
    if current is not None and current.status == "approved" and campaign.cost_model == "cpa":
        return current.cost  # fixed when it was approved
    if campaign.cost_model == "cpa":
        return campaign.cost_value
    if campaign.cost_model == "revshare":
        return (revenue * campaign.cost_value / 100).quantize(EVENT_QUANTUM)
    return money.ZERO


def decide(current: State | None, ask: ConversionInput, campaign: Campaign, now_ms: int) -> Decision:
    """What a postback does to a conversion. The new state's revenue is still in the
    network's currency when `amount_changed` (the caller converts it, then calls `priced`)."""
    status = ask.status
    if status == "rejected":
        # Declined or reversed, whichever this conversion can be (or already is).
        status = ("reversed" if current is not None and current.status in ("approved", "reversed")
                  else "declined")
    if current is None:
        if status not in FIRST_STATUSES:
            raise InvalidTransition(f"a conversion cannot start {status}: nothing to reverse")
        if ask.amount is not None:
            amount, currency = ask.amount, ask.currency or campaign.currency
        else:
            amount, currency = payout(campaign, ask.event, ask.order_value), campaign.currency
        state = State(version=1, status=status, raw_status=ask.raw_status, amount=amount,
                      currency=currency, revenue=amount, cost=money.ZERO,
                      order_value=ask.order_value, created_ms=now_ms)
        return Decision("accepted", state, None, amount_changed=True)

    amount, currency = current.amount, current.currency
    if ask.amount is not None:
        amount, currency = ask.amount, ask.currency or current.currency
    amount_changed = amount != current.amount or currency != current.currency
    if status == current.status and not amount_changed:
        return Decision("duplicate", current, current.status, amount_changed=False)
    if status != current.status and status not in TRANSITIONS.get(current.status, ()):
        raise InvalidTransition(f"a {current.status} conversion cannot become {status}")
    if status == current.status and current.status not in TRANSITIONS:
        raise InvalidTransition(f"a {current.status} conversion is final: its amount stays")
    state = replace(current, version=current.version + 1, status=status,
                    raw_status=ask.raw_status, amount=amount, currency=currency,
                    order_value=ask.order_value if ask.order_value is not None
                    else current.order_value)
    return Decision("updated", state, current.status, amount_changed)


def priced(decision: Decision, campaign: Campaign, revenue: Decimal, current: State | None) -> State:
    """The decided state with its revenue (in the campaign's currency) and cost filled in."""
    state = decision.state
    return replace(state, revenue=revenue, cost=cost(campaign, state.status, revenue, current))
