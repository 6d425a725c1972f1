"""The URL map, nothing else."""

from __future__ import annotations

from aiohttp import web

from .handlers import campaigns, clicks, conversions, fx_rates, ops, postback, reports, tracking

# Answered on TRACKER_ADMIN_LISTEN instead of the public port when that is set.
ADMIN_PATHS = frozenset(["/metrics", "/healthz", "/readyz", "/readyz/tracking"])


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/c/{slug}", tracking.click)          # GET and HEAD
    r.add_get("/i/{slug}", tracking.impression)
    r.add_get("/postback", postback.postback)
    r.add_post("/postback", postback.postback)
    r.add_get("/click.php", postback.binom)         # Binom's postback address
    r.add_post("/click.php", postback.binom)
    r.add_get("/conversion.gif", postback.pixel)
    r.add_post("/api/campaigns", campaigns.create)
    r.add_get("/api/campaigns", campaigns.list_)
    r.add_get("/api/campaigns/{id}", campaigns.get)
    r.add_patch("/api/campaigns/{id}", campaigns.patch)
    r.add_delete("/api/campaigns/{id}", campaigns.delete)
    r.add_get("/api/clicks/{click_id}", clicks.get)
    r.add_get("/api/conversions/{conversion_id}", conversions.get)
    r.add_get("/api/conversions/{conversion_id}/attribution", conversions.attribution)
    r.add_get("/api/reports", reports.get)
    r.add_put("/api/fx-rates", fx_rates.put)
    r.add_get("/api/fx-rates", fx_rates.get)
    r.add_get("/healthz", ops.healthz)
    r.add_get("/readyz", ops.readyz)
    r.add_get("/readyz/tracking", ops.tracking_ready)
    r.add_get("/metrics", ops.metrics_)
