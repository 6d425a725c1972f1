"""Operator API: a click by id, read-your-writes (Redis first, then PostgreSQL), with its
conversions."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from .. import money
from ..errors import ApiError, bad_request, not_found
from ..ids import id_time, id_uuid, parse_id
from ..ingest.params import TRACKING_PARAMS
from ..keys import BUFFER, PG
from ..storage import clicks as store
from .common import json_response
from .conversions import of_click

FIELDS = ("campaign_id", "campaign", *TRACKING_PARAMS, "country", "device", "ip",
          "is_unique", "is_bot", "destination")


def _view(click_id: str, when: datetime, source: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"click_id": click_id, "time": when.isoformat().replace("+00:00", "Z")}
    for name in FIELDS:
        value = source.get(name)
        body[name] = "" if value is None and name in TRACKING_PARAMS else value
    cost = source.get("cost") or "0"
    body["cost"] = money.to_str(cost if isinstance(cost, Decimal) else Decimal(cost))
    return body


async def click_view(app: web.Application, raw: str, *, with_conversions: bool) -> dict[str, Any]:
    ulid = parse_id(raw)
    if ulid is None:
        raise bad_request("invalid_click_id", "click_id must be a 26-character ULID", "click_id")
    click_id = str(ulid)
    when = id_time(ulid)
    redis_down = False
    try:
        recent = await app[BUFFER].recent_click(click_id)
    except RedisError:
        recent, redis_down = None, True
    if recent is not None:
        body = _view(click_id, when, recent)
    else:
        row = await store.get(app[PG], id_uuid(ulid), when)
        if row is None:
            if redis_down:
                # The click may be waiting in the spool: we cannot say it does not exist.
                raise ApiError(503, "not_ready", "Redis is unavailable; try again shortly")
            raise not_found("no click has this id", code="unknown_click")
        body = _view(click_id, when, dict(row))
    if with_conversions:
        body["conversions"] = await of_click(app, click_id)
    return body


async def get(request: web.Request) -> web.Response:
    return json_response(await click_view(request.app, request.match_info["click_id"],
                                          with_conversions=True))
