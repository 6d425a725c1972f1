"""The public tracking endpoints: the redirect and the impression pixel."""

from __future__ import annotations

import base64

from aiohttp import web

from .. import metrics
from ..metrics import DropReason
from ..campaigns import SLUG
from ..errors import ApiError, not_found
from ..ingest.params import read_params
from ..ingest.track import LAST_CLICK_COOKIE, VISITOR_COOKIE
from ..keys import CAMPAIGNS, SETTINGS, TRACKER

GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = "no-store"
YEAR = 365 * 24 * 3600
LAST_CLICK_AGE = 90 * 24 * 3600


def _unknown_link() -> ApiError:
    metrics.dropped("click", DropReason.UNKNOWN_CAMPAIGN)
    return not_found("no active campaign has this link", code="unknown_link")


async def click(request: web.Request) -> web.StreamResponse:
    slug = request.match_info["slug"]
    if not SLUG.fullmatch(slug):
        raise _unknown_link()
    campaign = await request.app[CAMPAIGNS].get(slug)
    if campaign is None:
        raise _unknown_link()
    if campaign.status != "active":
        metrics.dropped("click", DropReason.CAMPAIGN_PAUSED)
        if campaign.fallback_url:
            return _redirect(campaign.fallback_url)
        raise not_found("this campaign is paused", code="campaign_paused")
    try:
        params = read_params(request.query)
    except ApiError:
        metrics.dropped("click", DropReason.INVALID_PARAMS)
        raise
    tracker = request.app[TRACKER]
    if request.method == "HEAD":
        # Link checkers and unfurlers probe with HEAD: same answer, nothing recorded.
        _, location = tracker.location(campaign, params, "")
        return _redirect(location)
    result = await tracker.click(request, campaign, params)
    response = _redirect(result.location)
    # Written by hand: both values are ULIDs (nothing to quote), and http.cookies' Morsel
    # costs more than the rest of the response.
    attributes = _cookie_attributes(request.app[SETTINGS].secure_cookies)
    response.headers.add("Set-Cookie", f"{VISITOR_COOKIE}={result.visitor_id}; Max-Age={YEAR}{attributes}")
    if result.recorded:
        response.headers.add(
            "Set-Cookie", f"{LAST_CLICK_COOKIE}={result.click_id}; Max-Age={LAST_CLICK_AGE}{attributes}")
    return response


def _cookie_attributes(secure: bool) -> str:
    return "; Path=/; HttpOnly; SameSite=None; Secure" if secure else "; Path=/; HttpOnly; SameSite=Lax"


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": NO_STORE})


async def impression(request: web.Request) -> web.StreamResponse:
    """Always the GIF: a broken pixel must never break the page that carries it."""
    if request.method != "HEAD":
        try:
            slug = request.match_info["slug"]
            campaign = await request.app[CAMPAIGNS].get(slug) if SLUG.fullmatch(slug) else None
            if campaign is None:
                metrics.dropped("impression", DropReason.UNKNOWN_CAMPAIGN)
            else:
                await request.app[TRACKER].impression(
                    request, campaign, read_params(request.query))
        except ApiError:
            metrics.dropped("impression", DropReason.INVALID_PARAMS)
        except Exception:  # noqa: BLE001 - whatever failed is counted, the GIF still goes out
            metrics.dropped("impression", DropReason.INTERNAL_ERROR)
            request.app.logger.exception("impression not recorded")
    return gif()


def gif() -> web.Response:
    return web.Response(body=GIF, content_type="image/gif",
                        headers={"Cache-Control": NO_STORE})

