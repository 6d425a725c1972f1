"""Operator API: a click by id, read-your-writes (Redis first, then PostgreSQL), with its
conversions."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from .. import money
from ..errors import ApiError, bad_request, not_found
from ..ids import id_time, id_uuid, parse_id
from ..ingest.params import TRACKING_PARAMS
from ..keys import BUFFER, CAMPAIGNS, PG, SETTINGS
from ..storage import clicks as store
from .common import json_response
from .conversions import of_click

# A click is found in Redis's stream (read-your-writes) at most TRACKER_CLICK_CACHE_TTL after the
# time in its id (plus this, for clocks): an older click is asked of PostgreSQL alone, and of
# Redis only when PostgreSQL does not have it.
COPY_MARGIN = timedelta(minutes=5)

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


async def _recent(app: web.Application, click_id: str) -> dict[str, Any] | None | RedisError:
    try:
        return await app[BUFFER].recent_click(click_id)
    except RedisError as exc:
        return exc


async def click_view(app: web.Application, raw: str, *, with_conversions: bool) -> dict[str, Any]:
    ulid = parse_id(raw)
    if ulid is None:
        raise bad_request("invalid_click_id", "click_id must be a 26-character ULID", "click_id")
    click_id = str(ulid)
    when = id_time(ulid)
    # Redis's line (a click not yet in PostgreSQL), PostgreSQL's row and the conversions are
    # asked for at once: a lookup waits for the slowest round trip, not for their sum. The
    # row is read even when Redis has the click (one wasted index probe for a recent click).
    fresh = datetime.now(UTC) - when <= timedelta(
        seconds=app[SETTINGS].click_cache_ttl) + COPY_MARGIN
    conversions = (asyncio.ensure_future(of_click(app, click_id)) if with_conversions
                   else None)
    try:
        recent: dict[str, Any] | None | BaseException
        row: asyncpg.Record | None | BaseException
        if fresh:
            recent, row = await asyncio.gather(_recent(app, click_id),
                                               store.get(app[PG], id_uuid(ulid), when),
                                               return_exceptions=True)
            if recent is None and row is None:
                # The writer drops the click's entry only after the row's commit: a line missing
                # when Redis answered means a commit the row's read may have started before.
                row = await store.get(app[PG], id_uuid(ulid), when)
        else:
            recent, row = None, await store.get(app[PG], id_uuid(ulid), when)
            if row is None:
                # Still waiting in the spool, or Redis away: a 503, not a wrong 404.
                recent = await _recent(app, click_id)
        if isinstance(recent, dict):
            # The line names its campaign by id, as the row does before its join.
            campaign = await app[CAMPAIGNS].by_id(int(recent["campaign_id"]))
            recent["campaign"] = campaign.slug if campaign is not None else None
            body = _view(click_id, when, recent)
        else:
            if isinstance(row, BaseException):
                raise row
            if row is None:
                if isinstance(recent, RedisError):
                    # The click may be waiting in the spool: we cannot say it does not exist.
                    raise ApiError(503, "not_ready", "Redis is unavailable; try again shortly")
                raise not_found("no click has this id", code="unknown_click")
            body = _view(click_id, when, dict(row))
        if conversions is not None:
            body["conversions"] = await conversions
    finally:
        if conversions is not None:
            # Not needed (an unknown click, a failure): stopped, and its outcome collected.
            conversions.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await conversions
    return body


async def get(request: web.Request) -> web.Response:
    return json_response(await click_view(request.app, request.match_info["click_id"],
                                          with_conversions=True))
