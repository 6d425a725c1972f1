"""Health, readiness and metrics.

`/readyz` is the contract's: PostgreSQL, Redis and the write backlog, for dashboards and
people. `/readyz/tracking` is what a load balancer should ask: whether this worker answers
redirects and pixels, which it does through PostgreSQL and Redis outages (campaigns as last
known, events spooled). Taking every instance out of rotation during the very outage the
spool exists for would turn our outage into our customers'.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import metrics
from ..keys import CAMPAIGNS, PG, REDIS, SETTINGS, WRITER
from ..storage import db
from .common import json_response

CHECK_TIMEOUT = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    body: dict[str, Any] = {}
    not_ready: list[str] = []
    try:
        await asyncio.wait_for(db.ping(app[PG]), CHECK_TIMEOUT)
        body["postgres"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        body["postgres"] = {"ok": False, "error": type(exc).__name__}
        not_ready.append("postgres")
    try:
        await asyncio.wait_for(app[REDIS].ping(), CHECK_TIMEOUT)
        body["redis"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001
        body["redis"] = {"ok": False, "error": type(exc).__name__}
        not_ready.append("redis")
    limit = app[SETTINGS].backlog_limit
    if "redis" in not_ready:
        body["backlog"] = {"ok": False, "events": None, "limit": limit}
        not_ready.append("backlog")
    else:
        try:
            events, age = await asyncio.wait_for(app[WRITER].backlog(), CHECK_TIMEOUT)
            ok = events < limit
            body["backlog"] = {"ok": ok, "events": events, "limit": limit,
                               "oldest_age_seconds": round(age, 3)}
            if not ok:
                not_ready.append("backlog")
        except Exception as exc:  # noqa: BLE001
            body["backlog"] = {"ok": False, "events": None, "limit": limit,
                               "error": type(exc).__name__}
            not_ready.append("backlog")
    body = {"status": "not_ready" if not_ready else "ready", "not_ready": not_ready} | body
    return json_response(body, status=503 if not_ready else 200)


async def tracking_ready(request: web.Request) -> web.Response:
    loaded = request.app[CAMPAIGNS].loaded
    return json_response({"status": "ready" if loaded else "not_ready", "campaigns_loaded": loaded},
                         status=200 if loaded else 503)


async def metrics_(request: web.Request) -> web.Response:
    try:
        await request.app[WRITER].update_backlog_gauge()
    except Exception:  # noqa: BLE001 - a scrape still answers with what it has
        metrics.BACKEND_ERRORS.labels("redis").inc()
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})
