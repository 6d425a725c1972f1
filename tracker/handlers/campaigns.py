"""Operator API: campaigns."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import campaigns as model
from ..errors import bad_request, not_found
from ..keys import CAMPAIGNS, PG, SETTINGS
from ..storage import campaigns as store
from .common import json_response, read_json


def _campaign_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise not_found("no campaign has this id")
    return int(raw)


async def create(request: web.Request) -> web.Response:
    values = model.validate(await read_json(request), partial=False)
    pool = request.app[PG]
    explicit_slug = "slug" in values
    explicit_name = "name" in values
    for _ in range(5):
        if not explicit_slug:
            values["slug"] = model.new_slug()
        if not explicit_name:
            values["name"] = values["slug"]  # the slug of this try, not of a taken one
        try:
            row = await store.insert(pool, values)
            break
        except store.SlugTaken:
            if explicit_slug:
                raise model.slug_taken(values["slug"]) from None
    else:  # pragma: no cover - five random 48-bit slugs all taken
        raise model.slug_taken(values["slug"])
    await request.app[CAMPAIGNS].changed(row["id"])
    body = model.to_json(row, request.app[SETTINGS].base_url)
    response = json_response(body, status=201)
    response.headers["Location"] = f"/api/campaigns/{row['id']}"
    return response


async def list_(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", 100, 1, 1000)
    after = _int_param(request, "after", 0, 0, 2**62)
    rows = await store.list_page(request.app[PG], after, limit)
    base = request.app[SETTINGS].base_url
    return json_response({
        "campaigns": [model.to_json(r, base) for r in rows],
        "next_after": rows[-1]["id"] if len(rows) == limit else None,
    })


async def get(request: web.Request) -> web.Response:
    row = await store.get(request.app[PG], _campaign_id(request))
    if row is None:
        raise not_found("no campaign has this id")
    return json_response(model.to_json(row, request.app[SETTINGS].base_url))


async def patch(request: web.Request) -> web.Response:
    campaign_id = _campaign_id(request)
    values = model.validate(await read_json(request), partial=True)
    async with request.app[PG].acquire() as conn, conn.transaction():
        current = await store.get(conn, campaign_id, for_update=True)
        if current is None:
            raise not_found("no campaign has this id")
        merged: dict[str, Any] = dict(current) | values
        model.check_whole(merged)
        if values:
            try:
                row = await store.update(conn, campaign_id, values)
            except store.SlugTaken:
                raise model.slug_taken(values["slug"]) from None
        else:
            row = current
    await request.app[CAMPAIGNS].changed(campaign_id)
    return json_response(model.to_json(row, request.app[SETTINGS].base_url))


async def delete(request: web.Request) -> web.Response:
    campaign_id = _campaign_id(request)
    if await store.soft_delete(request.app[PG], campaign_id) is None:
        raise not_found("no campaign has this id")
    await request.app[CAMPAIGNS].changed(campaign_id)
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise bad_request("invalid_parameter", f"{name} must be an integer from {low} to {high}",
                          name)
    return int(raw)
