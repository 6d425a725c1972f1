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
from ..keys import CAMPAIGNS, GAUGES_LEASE, PG, REDIS, SETTINGS, WRITER
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
    body, content_type = metrics.render(await global_figures(request.app))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def global_figures(app: web.Application) -> dict[metrics.GlobalGauge, float]:
    """The deployment's figures if this instance holds the gauges lease, else none: the
    samples are left out, not 0, so that a sum across instances counts them once."""
    if not app[GAUGES_LEASE].held:
        return {}
    try:
        events, age = await asyncio.wait_for(app[WRITER].backlog(), CHECK_TIMEOUT)
    except Exception:  # noqa: BLE001 - a scrape still answers with what it has
        metrics.BACKEND_ERRORS.labels("redis").inc()
        return {}
    return {metrics.BACKLOG: events, metrics.BACKLOG_AGE: age,
            metrics.BACKLOG_LIMIT: app[SETTINGS].backlog_limit}
