"""Multi-touch attribution: touches in, credits out. Pure functions, no I/O.

A conversion's touches are the clicks of its visitor (or of its customer on another device)
in the lookback window before it. A model shares one conversion's credit among them; the
credits are Decimals that add up to exactly 1, so revenue split by them adds back up to the
revenue itself.

Bot clicks are not touches: they are never billed, so they earn no credit. `credit` gives
them 0 and leaves them out of every count (a bot between two real clicks does not make the
U-shape's middle wider, nor take a linear share).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal

DEFAULT_MODEL = "last_click"
HALF_LIFE = timedelta(days=7)
ENDS_SHARE = Decimal("0.4")
# Six places: each share is cut at most a millionth of the conversion below its exact value,
# and the converting touch takes those crumbs.
PLACES = Decimal("0.000001")
ONE = Decimal(1)
ZERO = Decimal(0)


class UnknownModel(ValueError):
    """The model named is not one of MODELS; the message lists them, for a person."""

    def __init__(self, model: str) -> None:
        super().__init__(f"unknown attribution model {model!r}: must be one of {', '.join(MODELS)}")
        self.model = model


@dataclass(frozen=True, slots=True)
class Touch:
    """One click on a conversion's path, with what an operator needs to tell touches apart."""

    click_id: str
    ts: datetime
    campaign_id: int
    pub: str = ""
    sub1: str = ""
    sub2: str = ""
    sub3: str = ""
    sub4: str = ""
    sub5: str = ""
    is_bot: bool = False


def check_model(model: str) -> str:
    """`model` when it is one of MODELS, else UnknownModel: callers check it before they
    spend a database query on a request that will be refused anyway."""
    if model not in MODELS:
        raise UnknownModel(model)
    return model


def credit(model: str, touches: Sequence[Touch], converted_at: datetime, *,
           half_life: timedelta = HALF_LIFE, ends_share: Decimal = ENDS_SHARE) -> list[Decimal]:
    """Each touch's share of the conversion under `model`, in the order `touches` came in
    (credits[i] is touches[i]'s), whatever that order: the models read the touches by time.

    Shares are cut to 6 places, rounding down, and the converting (last) touch takes what
    is left, so they add up to exactly 1 and none is negative (rounding down can only leave
    the last touch more than its share, never less). Bots get 0.

    UnknownModel for a model not in MODELS; ValueError when no touch is a real click, or for
    a half life that is not positive, or ends that would take more than the whole.
    """
    weigh = _WEIGHTS.get(model)
    if weigh is None:
        raise UnknownModel(model)
    if half_life <= timedelta(0):
        raise ValueError("half_life must be positive")
    if not ZERO <= ends_share <= ONE / 2:
        raise ValueError("ends_share must be between 0 and 0.5: the two ends share at most 1")
    # Ties in time are broken by click id (ULIDs sort by creation), so the same touches in
    # any order give the same credits.
    order = sorted((i for i, t in enumerate(touches) if not t.is_bot),
                   key=lambda i: (touches[i].ts, touches[i].click_id))
    if not order:
        raise ValueError("no touch to credit: every touch given is a bot")
    path = [touches[i] for i in order]
    weights = weigh(path, converted_at, half_life, ends_share)
    total = sum(weights, ZERO)
    shares = [(w / total).quantize(PLACES, rounding=ROUND_DOWN) for w in weights[:-1]]
    shares.append(ONE - sum(shares, ZERO))
    credits = [ZERO] * len(touches)
    for i, share in zip(order, shares):
        credits[i] = share
    return credits


# A model: the time-ordered real touches (at least one) → a non-negative weight each, not
# all zero. `credit` turns weights into shares.
Weights = Callable[[list[Touch], datetime, timedelta, Decimal], list[Decimal]]


def _last_click(path: list[Touch], _at: datetime, _hl: timedelta, _ends: Decimal) -> list[Decimal]:
    return [ZERO] * (len(path) - 1) + [ONE]


def _first_click(path: list[Touch], _at: datetime, _hl: timedelta, _ends: Decimal) -> list[Decimal]:
    return [ONE] + [ZERO] * (len(path) - 1)


def _linear(path: list[Touch], _at: datetime, _hl: timedelta, _ends: Decimal) -> list[Decimal]:
    return [ONE] * len(path)


def _time_decay(path: list[Touch], converted_at: datetime, half_life: timedelta,
                _ends: Decimal) -> list[Decimal]:
    # 2^(-(converted_at - ts) / half_life), normalized. Measured from the last touch instead
    # of converted_at: the common factor cancels in the normalization, and this way the
    # newest weight is exactly 1, so the sum can never underflow to zero (a touch a year
    # before a conversion with a one-second half life would).
    newest = path[-1].ts
    unit = _micros(half_life)
    return [Decimal(2) ** (-Decimal(_micros(newest - t.ts)) / unit) for t in path]


def _position_based(path: list[Touch], _at: datetime, _hl: timedelta,
                    ends_share: Decimal) -> list[Decimal]:
    # U-shaped: the touch that found the visitor and the one that converted them count most.
    if len(path) <= 2:
        return [ONE] * len(path)
    middle = (ONE - 2 * ends_share) / (len(path) - 2)
    return [ends_share] + [middle] * (len(path) - 2) + [ends_share]


def _micros(span: timedelta) -> int:
    # Whole microseconds, exactly: timedelta / timedelta would go through a binary float.
    return (span.days * 86_400 + span.seconds) * 1_000_000 + span.microseconds


_WEIGHTS: dict[str, Weights] = {
    "last_click": _last_click,
    "first_click": _first_click,
    "linear": _linear,
    "time_decay": _time_decay,
    "position_based": _position_based,
}
# last_click, first_click, linear, time_decay, position_based.
MODELS = tuple(_WEIGHTS)
