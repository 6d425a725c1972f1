"""What `GET /api/conversions/{id}/attribution?model=M` answers: a conversion's touches, oldest
first, each with its credit under the model. The handler finds the conversion, calls this,
and turns UnknownModel into 400 `invalid_model` (field `model`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from . import money
from .attribution import Touch, check_model, credit
from .ids import decode_id, uuid_to_id
from .settings import Settings
from .storage import attribution as store

TOUCH_FIELDS = ("pub", "sub1", "sub2", "sub3", "sub4", "sub5")


async def attribution_view(pool: asyncpg.Pool | asyncpg.Connection, settings: Settings,
                           conversion: Mapping[str, Any], model: str) -> dict[str, Any]:
    """`conversion` is the conversion's row (or a dict of it): id (or conversion_id),
    click_id (ULID text, UUID text or UUID), visitor_id, customer_id, created_at, and the
    campaign_id, pub and sub1..sub5 it copied from its click.

    The click the conversion is attributed to is always a touch, even when it is older than
    the window, flagged a bot, or not yet written to PostgreSQL: the network named it, so it
    is the one touch known to have led to this conversion, and without it a conversion whose
    only click was flagged would have no credit to give (credits must add up to 1)."""
    check_model(model)
    converted_at: datetime = conversion["created_at"]
    lookback = timedelta(days=settings.attribution_lookback_days)
    path = await store.touches(pool, conversion["visitor_id"], conversion["customer_id"],
                               converted_at, lookback)
    attributed_id, attributed_uuid, attributed_ts = _click_ref(conversion["click_id"])
    attributed = next((t for t in path if t.click_id == attributed_id), None)
    if attributed is None:
        attributed = (await store.click(pool, attributed_uuid, attributed_ts)
                      or _copied_touch(attributed_id, attributed_ts, conversion))
        path.append(attributed)
    # Credited as a real click whatever its flag (see above); shown with the flag it has.
    counted = [replace(t, is_bot=False) if t is attributed else t for t in path]
    shares = credit(model, counted, converted_at)
    rows = sorted(zip(path, shares), key=lambda pair: (pair[0].ts, pair[0].click_id))
    conversion_id = conversion.get("id", conversion.get("conversion_id"))
    return {
        "conversion_id": None if conversion_id is None else str(conversion_id),
        "model": model,
        "lookback_days": settings.attribution_lookback_days,
        "touches": [_touch_view(t, share, t is attributed) for t, share in rows],
    }


def _click_ref(value: object) -> tuple[str, uuid.UUID, datetime]:
    """(ULID text, UUID, time) of a click id as a conversion may hold it. Click ids are ULIDs
    whose time is the click's, so the id alone finds its partition."""
    if isinstance(value, uuid.UUID):
        value = uuid_to_id(value)
    elif isinstance(value, str) and len(value) == 36:
        value = uuid_to_id(uuid.UUID(value))
    if not isinstance(value, str):
        raise ValueError(f"not a click id: {value!r}")
    click_uuid, ts = decode_id(value)
    return uuid_to_id(click_uuid), click_uuid, ts


def _copied_touch(click_id: str, ts: datetime, conversion: Mapping[str, Any]) -> Touch:
    # The click is not in PostgreSQL yet (the batch writer stores it within seconds), but the
    # conversion copied its campaign and sub ids when it was recorded.
    def copied(name: str) -> str:
        return str(conversion.get(name) or "")

    return Touch(click_id=click_id, ts=ts, campaign_id=int(conversion.get("campaign_id") or 0),
                 pub=copied("pub"), sub1=copied("sub1"), sub2=copied("sub2"),
                 sub3=copied("sub3"), sub4=copied("sub4"), sub5=copied("sub5"))


def _touch_view(touch: Touch, share: Decimal, attributed: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "click_id": touch.click_id,
        "time": touch.ts.isoformat().replace("+00:00", "Z"),
        "campaign_id": touch.campaign_id,
    }
    view.update({name: getattr(touch, name) for name in TOUCH_FIELDS})
    view["is_bot"] = touch.is_bot
    view["attributed"] = attributed
    view["credit"] = money.to_str(share)
    return view
