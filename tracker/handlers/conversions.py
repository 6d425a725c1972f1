"""Operator API: a conversion by id, and a click's conversions. Read-your-writes: a
conversion recorded a moment ago is in Redis (its click's state hash) before PostgreSQL has
it, so both are read and the higher version wins; the history is the union of both."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from .. import money
from ..errors import ApiError, bad_request, not_found
from ..ids import id_uuid, parse_id, uuid_to_id
from ..attribution import DEFAULT_MODEL, UnknownModel
from ..attribution_view import attribution_view
from ..keys import BUFFER, PG, REDIS, REDIS_KEYS, SETTINGS
from ..storage import conversions as store
from ..storage import deliveries
from .common import json_response

VIEW_TEXTS = ("event", "txid", "status", "raw_status", "currency", "customer_id", "source",
              "pub", "sub1", "sub2", "sub3", "sub4", "sub5", "country", "device")


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ms_iso(ms: int) -> str:
    return _iso(datetime.fromtimestamp(ms / 1000, UTC))


def _money(value: Any) -> str | None:
    if value is None:
        return None
    return money.to_str(value if isinstance(value, Decimal) else Decimal(value))


def _from_row(row: Any) -> dict[str, Any]:
    view = {"conversion_id": uuid_to_id(row["id"]), "click_id": uuid_to_id(row["click_id"]),
            "campaign_id": row["campaign_id"], "campaign": row["campaign"],
            "version": row["version"]}
    view |= {k: row[k].strip() if k == "currency" else row[k] for k in VIEW_TEXTS}
    view |= {"amount": _money(row["amount"]), "revenue": _money(row["revenue"]),
             "revenue_currency": (row["campaign_currency"] or "").strip() or None,
             "cost": _money(row["cost"]), "order_value": _money(row["order_value"]),
             "time": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"])}
    return view


def _from_event(event: dict[str, Any]) -> dict[str, Any]:
    view = {"conversion_id": event["id"], "click_id": event["click_id"],
            "campaign_id": event["campaign_id"], "campaign": event.get("campaign"),
            "version": event["version"]}
    view |= {k: event.get(k) or "" for k in VIEW_TEXTS}
    view |= {"amount": event["amount"], "revenue": event["revenue"],
             "revenue_currency": event.get("revenue_currency"), "cost": event["cost"],
             "order_value": event["order_value"], "time": _ms_iso(event["created_ms"]),
             "updated_at": _ms_iso(event["ts_ms"])}
    return view


def _history_row(row: Any) -> dict[str, Any]:
    return {"version": row["version"], "time": _iso(row["ts"]), "old_status": row["old_status"],
            "status": row["new_status"], "raw_status": row["raw_status"],
            "amount": _money(row["amount"]), "currency": row["currency"].strip(),
            "revenue": _money(row["revenue"]), "source_net": row["source_net"],
            "source": row["source"]}


def _history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {"version": entry["version"], "time": _ms_iso(entry["ts_ms"]),
            "old_status": entry["old_status"], "status": entry["status"],
            "raw_status": entry["raw_status"], "amount": entry["amount"],
            "currency": entry["currency"], "revenue": entry["revenue"],
            "source_net": entry["source_net"], "source": entry["source"]}


async def _recent(app: web.Application, click_id: str) -> dict[str, dict[str, Any]]:
    """The click's conversions as Redis holds them: field → {"event", "history"}."""
    try:
        raw = await app[REDIS].hgetall(app[REDIS_KEYS].conversions(click_id))
    except RedisError:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        kind, _, rest = _text(key).partition(":")
        if kind == "e":
            found.setdefault(rest, {"history": {}})["event"] = orjson.loads(value)
        elif kind == "h":
            field, _, version = rest.rpartition(":")
            found.setdefault(field, {"history": {}})["history"][int(version)] = \
                _history_entry(orjson.loads(value))
    return {f: c for f, c in found.items() if "event" in c}


async def _merged(app: web.Application, row: Any, recent: dict[str, Any] | None,
                  with_history: bool) -> dict[str, Any]:
    """One conversion from PostgreSQL's row and Redis's copy, whichever is newer."""
    if row is not None and (recent is None or row["version"] >= recent["event"]["version"]):
        view = _from_row(row)
    else:
        assert recent is not None
        view = _from_event(recent["event"])
    if with_history:
        history: dict[int, dict[str, Any]] = dict(recent["history"]) if recent else {}
        if row is not None:
            for h in await store.history(app[PG], row["id"]):
                history[h["version"]] = _history_row(h)
        view["history"] = [history[v] for v in sorted(history)]
    return view


async def of_click(app: web.Application, click_id: str) -> list[dict[str, Any]]:
    """Every conversion of a click, oldest first, as the click lookup shows them."""
    ulid = parse_id(click_id)
    assert ulid is not None
    # PostgreSQL's rows and Redis's states asked at once: the lookup waits for the slower.
    stored, held = await asyncio.gather(store.of_click(app[PG], id_uuid(ulid)),
                                        _recent(app, click_id))
    rows = {uuid_to_id(r["id"]): r for r in stored}
    recent = {c["event"]["id"]: c for c in held.values()}
    views = [await _merged(app, rows.get(cid), recent.get(cid), with_history=True)
             for cid in rows.keys() | recent.keys()]
    return sorted(views, key=lambda v: (v["time"], v["conversion_id"]))


async def _find(request: web.Request) -> tuple[UUID, Any, dict[str, Any] | None]:
    """(its id, PostgreSQL's row, Redis's copy) of the conversion the path names; 404 when
    neither has it."""
    raw = request.match_info["conversion_id"]
    ulid = parse_id(raw)
    if ulid is None:
        raise bad_request("invalid_conversion_id", "conversion_id must be a 26-character id",
                          "conversion_id")
    conversion_id = str(ulid)
    app = request.app
    row = await store.get(app[PG], id_uuid(ulid))
    recent = None
    try:
        # Its id does not spell its shard: asked of every shard, in one pipeline.
        found = await asyncio.gather(*(app[BUFFER].call("GET", key) for key in
                                       app[REDIS_KEYS].conversion_everywhere(conversion_id)))
        pointer = next((p for p in found if p is not None), None)
    except RedisError:
        pointer = None
    if pointer is not None:
        click_id, _, field = _text(pointer).partition("\x1f")
        recent = (await _recent(app, click_id)).get(field)
    if row is None and recent is None:
        if pointer is None and not await _redis_up(app):
            raise ApiError(503, "not_ready", "Redis is unavailable; try again shortly")
        raise not_found("no conversion has this id", code="unknown_conversion")
    return id_uuid(ulid), row, recent


async def get(request: web.Request) -> web.Response:
    app = request.app
    conversion_uuid, row, recent = await _find(request)
    view = await _merged(app, row, recent, with_history=True)
    view["postbacks"] = await deliveries.for_conversion(app[PG], conversion_uuid)
    # Imported here: the click lookup imports this module for a click's conversions.
    from .clicks import click_view
    view["click"] = await click_view(app, view["click_id"], with_conversions=False)
    return json_response(view)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def attribution(request: web.Request) -> web.Response:
    _, row, recent = await _find(request)
    if row is not None:
        conversion: dict[str, Any] = dict(row)
    else:
        assert recent is not None
        event = recent["event"]
        conversion = {k: event.get(k) or "" for k in (
            "click_id", "visitor_id", "customer_id", "pub", "sub1", "sub2", "sub3", "sub4",
            "sub5")}
        conversion |= {"id": event["id"], "campaign_id": event["campaign_id"],
                       "created_at": datetime.fromtimestamp(event["created_ms"] / 1000, UTC)}
    model = request.query.get("model", DEFAULT_MODEL) or DEFAULT_MODEL
    try:
        view = await attribution_view(request.app[PG], request.app[SETTINGS], conversion, model)
    except UnknownModel as exc:
        raise bad_request("invalid_model", str(exc), "model") from None
    if row is not None:
        view["conversion_id"] = uuid_to_id(row["id"])
    return json_response(view)


async def _redis_up(app: web.Application) -> bool:
    try:
        await app[REDIS].ping()
    except RedisError:
        return False
    return True
